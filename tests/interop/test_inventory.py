"""Device inventory: what a device's stored headers say, its history, and
unknown devices that tried to connect (`bastion device list`)."""
from __future__ import annotations

import json
import time

import pydicom
from pydicom.uid import generate_uid

import helpers
from helpers import SUCCESS, associate, rejection


def ts(value: str):
    """An RFC 3339 time as a datetime (the fraction has a variable number of
    digits, so the strings do not compare as times)."""
    import datetime
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


WAIT = 15  # seconds; inventory writes are asynchronous (milliseconds)


def inventory(srv, ae):
    return next(d for d in srv.device_list() if d["ae"] == ae)["inventory"]


def wait_for(what, fn):
    deadline = time.monotonic() + WAIT
    while True:
        v = fn()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def with_headers(src, dst, **changes):
    ds = pydicom.dcmread(src)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(dst)
    return dst


def test_headers_history_and_software_change(make_server, corpus_root, tmp_path):
    srv = make_server()
    srv.device_add("CT1", transport="tls", allow="echo,store")
    ct = corpus_root / "pydicom" / "test_files" / "CT_small.dcm"
    ctx = srv.tls_context()
    assert inventory(srv, "CT1") is None, "a device never seen has no inventory"

    status, _ = helpers.store_one(srv.tls_port, "CT1", ct, tls=ctx)
    assert status == SUCCESS
    inv = wait_for("the first inventory entry", lambda: inventory(srv, "CT1"))
    assert inv["headers"] == {
        "manufacturer": "GE MEDICAL SYSTEMS", "model": "RHAPSODE", "software_versions": "05",
        "serial_number": "", "station_name": "CT01_OC0",
    }
    assert inv["transport"] == "tls"
    assert inv["first_seen"] and ts(inv["last_seen"]) >= ts(inv["first_seen"])
    assert len(inv["history"]) == 1

    # the same headers again: no new history entry, no event
    same = with_headers(ct, tmp_path / "same.dcm")
    assert helpers.store_one(srv.tls_port, "CT1", same, tls=ctx)[0] == SUCCESS
    # a firmware update
    updated = with_headers(ct, tmp_path / "updated.dcm", SoftwareVersions="06")
    assert helpers.store_one(srv.tls_port, "CT1", updated, tls=ctx)[0] == SUCCESS
    inv = wait_for("the second history entry",
                   lambda: (lambda i: i if i and len(i["history"]) == 2 else None)(inventory(srv, "CT1")))
    assert [h["software_versions"] for h in inv["history"]] == ["05", "06"]
    assert inv["headers"]["software_versions"] == "06"
    changed = [e for e in srv.events() if e["type"] == "device.software_changed"]
    assert len(changed) == 1, changed
    assert {k: changed[0][k] for k in ("ae", "field", "old", "new")} == {
        "ae": "CT1", "field": "SoftwareVersions", "old": "05", "new": "06"}

    # the change survives a restart, and the table shows the device's values
    srv.restart()
    text = srv.cli("device", "list").stdout
    assert "GE MEDICAL SYSTEMS" in text and "RHAPSODE" in text and "06" in text, text
    # existing fields are still there
    d = next(d for d in srv.device_list() if d["ae"] == "CT1")
    assert d["transport"] == "tls" and d["network"] == "127.0.0.1/32"


def test_unknown_device_listed_with_count(make_server):
    srv = make_server()
    for calling in ("INTRUDER", "INTRUDER", "INTRUDER2"):
        assoc = associate(srv.plain_port, calling)
        try:
            # recorded before the answer; pynetdicom now and then reports
            # the A-ASSOCIATE-RJ as an abort
            assert not assoc.is_established
            assert rejection(assoc) in ((1, 1, 3), None)
        finally:
            if assoc.is_established:
                assoc.release()

    def listed():
        r = json.loads(srv.cli("device", "list", "--unknown", "--json").stdout)
        return r if r and r[0]["attempts"] >= 3 else None

    unknown = wait_for("the unknown device", listed)
    assert len(unknown) == 1, unknown
    u = unknown[0]
    assert u["address"] == "127.0.0.1"
    assert u["attempts"] == 3
    assert u["ae_titles"] == ["INTRUDER", "INTRUDER2"]
    assert ts(u["last_attempt"]) >= ts(u["first_attempt"])
    text = srv.cli("device", "list").stdout
    assert "127.0.0.1" in text and "INTRUDER,INTRUDER2" in text, text
