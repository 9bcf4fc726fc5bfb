"""The audit trail never fails open (issue 10, finding 1).

The data directory lives on a small tmpfs that the test mounts (root is
needed; scripts/test.sh runs as root in CI) and fills with a filler file.
While the trail cannot keep its reserve, Bastion refuses every operation
that would produce an audit record: QIDO-RS 503 with Retry-After, C-FIND
and C-STORE 0xA700 on an open association, a new association
A-ASSOCIATE-RJ 2/1/1 (transient). The refusals and the "Audit Recording
Stopped" Security Alert (110133) are written into the reserve; `bastion
audit verify` and the posture page keep working; once the filler is
removed service resumes by itself (110134), and a restart records again.

A second test fills only the syslog spool's file system: export stops
with a 110133 record in the trail while service continues, and resumes
without a gap when space returns.
"""
from __future__ import annotations

import errno
import json
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

import helpers
from helpers import rejection
from test_admin_api import call, run
from test_syslog import Rsyslog, make_test_ca, reject, wait_markers

LIVENESS = 60  # seconds: wide bound for a state change to show (not a timing assertion)


def mount_tmpfs(where: Path, size: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test (needs root): {r.stderr}")
    return where


@pytest.fixture
def mounts():
    done: list[Path] = []
    yield done
    for m in reversed(done):
        subprocess.run(["umount", "-l", str(m)], check=False)


def fill(path: Path) -> int:
    """Writes `path` until the file system is full; returns its size."""
    n = 0
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 512):
            chunk = b"\xa5" * size
            for _ in range(100_000):
                try:
                    w = f.write(chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
                n += w or 0
                if not w:
                    break
    return n


def qido(srv, token):
    return call(srv, "GET", "/dicomweb/studies?limit=10", token,
                headers={"Accept": "application/dicom+json"})


def wait_until(what, fn, timeout=LIVENESS, every=0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)


def events(srv, kind):
    return [e for e in srv.events() if e.get("type") == kind]


def c_find_status(assoc) -> int:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    q.PatientID = ""
    last = None
    for status, _ in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
        last = status
    assert last is not None, "no C-FIND response"
    return int(last.Status)


def test_full_disk_refuses_unaudited_access_and_resumes_by_itself(make_server, tmp_path, mounts):
    disk = mount_tmpfs(tmp_path / "small-disk", "96m")
    mounts.append(disk)
    srv = make_server(data=disk / "data")
    srv.torn_events_expected = True
    helpers.wait_port(srv.http_port, 30, srv.proc)
    srv.device_add("MODALITY", transport="plain", allow="echo,store,find")
    token = run(srv, "token", "create", "--user", "admin",
                "--expires", "1h").stdout.strip().splitlines()[-1]
    src = tmp_path / "ct.dcm"
    ds = helpers.make_dataset(patient_name="Full^Disk", patient_id="FULL-0001")
    helpers.dataset_file(ds, src)
    assert helpers.store_one(srv.plain_port, "MODALITY", src)[0] == 0x0000
    st, _, body = qido(srv, token)
    assert st == 200 and len(body) == 1, (st, body)
    contexts = [StudyRootQueryRetrieveInformationModelFind, Verification, CTImageStorage]
    open_assoc = helpers.associate(srv.plain_port, "MODALITY", contexts=contexts)
    assert open_assoc.is_established
    assert c_find_status(open_assoc) == 0x0000

    filler = disk / "filler"
    filled = fill(filler)
    assert filled > 0

    # Requests keep coming; each either is served AND recorded (in the
    # reserve) or is refused. The first append that cannot top the reserve
    # up stops recording, within a few records.
    answered_ok = 0
    def refused():
        nonlocal answered_ok
        st, hd, body = qido(srv, token)
        if st == 200:
            answered_ok += 1
            return None
        return st, hd, body
    st, hd, body = wait_until("QIDO-RS refused while the trail cannot record", refused,
                              every=0.05)
    assert st == 503, (st, body)
    assert hd.get("retry-after") == "30", hd
    assert "audit trail is not recording" in body["error"], body
    assert answered_ok <= 50, f"{answered_ok} QIDO-RS answered after the disk filled"
    # Every further one too (no fail-open).
    for _ in range(20):
        st, hd, _ = qido(srv, token)
        assert st == 503 and hd.get("retry-after") == "30", st
    # DIMSE on an association opened before: C-FIND and C-STORE 0xA700.
    assert c_find_status(open_assoc) == 0xA700
    store = open_assoc.send_c_store(helpers.make_dataset(patient_id="FULL-0002"))
    assert int(store.Status) == 0xA700, store
    assert open_assoc.send_c_echo().Status == 0x0000
    open_assoc.release()
    # A new association: A-ASSOCIATE-RJ 2/1/1 (transient).
    def transient():
        a = helpers.associate(srv.plain_port, "MODALITY", contexts=contexts)
        try:
            assert not a.is_established, "an association was accepted while the trail is down"
            return rejection(a)
        finally:
            if a.is_established:
                a.release()
    # pynetdicom 3.0.4 sometimes reports an RJ as an abort (conftest notes the race)
    got = wait_until("A-ASSOCIATE-RJ 2/1/1", lambda: transient() == (2, 1, 1), timeout=30)
    assert got
    # The posture page and `audit verify` keep working while the disk is full.
    st, _, p = call(srv, "GET", "/api/posture", token)
    assert st == 200, p
    assert p["audit"]["recording"] is False and p["audit"]["refusing"] is True, p["audit"]
    assert any("audit trail is not recording" in w for w in p["warnings"]), p["warnings"]
    v = srv.cli("audit", "verify", check=False)
    assert v.returncode == 0, v.stdout + v.stderr
    # `bastion doctor` too: it reads the trail (intact) and says what is wrong.
    d = srv.cli("doctor", check=False)
    assert d.returncode == 1, d.stdout + d.stderr
    lines = d.stdout.splitlines()
    assert any(l.startswith("ok") and "audit trail" in l and "intact" in l for l in lines), d.stdout
    assert any(l.startswith("FAIL") and ("disk space" in l or "audit recording" in l)
               for l in lines), d.stdout

    # Space comes back: service resumes by itself.
    filler.unlink()
    wait_until("QIDO-RS served again", lambda: qido(srv, token)[0] == 200)
    assert helpers.echo_status(srv.plain_port, "MODALITY") == 0x0000
    a = helpers.associate(srv.plain_port, "MODALITY", contexts=contexts)
    assert a.is_established
    assert c_find_status(a) == 0x0000
    a.release()
    st, _, p = call(srv, "GET", "/api/posture", token)
    assert p["audit"]["recording"] is True and p["audit"]["refusing"] is False, p["audit"]
    # The event log (on the same full disk) could not keep the refusals;
    # the trail kept them in its reserve (checked below, after the stop).
    wait_until("recording resumed event", lambda: events(srv, "audit.recording_resumed"))
    def recording_alerts():
        out = run(srv, "alerts", "--json", "--all").stdout
        got = [json.loads(l) for l in out.splitlines() if l.strip()]
        return [a for a in got if a.get("rule") == "audit_recording"]
    # both alerts: "stopped" was kept in memory while the security database
    # was full, and stored once it could be
    def both():
        qido(srv, token)  # events keep the detector busy
        got = recording_alerts()
        return len(got) >= 2 and got
    got = wait_until("the audit_recording alerts (stopped, resumed)", both)
    assert any("stopped" in a["summary"] for a in got), got

    # A restart on the once-full disk records as before.
    assert srv.stop() == 0
    srv.start()
    helpers.wait_port(srv.http_port, 30, srv.proc)
    st, _, body = qido(srv, token)
    assert st == 200 and len(body) == 1, (st, body)  # the acknowledged study is kept
    assert srv.stop() == 0
    v = srv.cli("audit", "verify", check=False)
    assert v.returncode == 0, v.stdout + v.stderr
    recorded = [json.loads(l) for l in srv.cli("audit", "search", "--json").stdout.splitlines()
                if l.strip()]
    kinds = [r.get("type") for r in recorded]
    assert "audit.recording_stopped" in kinds and "audit.recording_resumed" in kinds, kinds[-40:]
    assert kinds.index("audit.recording_stopped") < kinds.index("audit.recording_resumed")
    stopped = [r for r in recorded if r.get("type") == "audit.recording_stopped"]
    assert len(stopped) == 1 and "No space left" in stopped[0]["event"]["reason"], stopped
    assert "Security Alert" in stopped[0]["event_ids"] or stopped[0]["event_ids"], stopped
    assert "association.refused_unaudited" in kinds, "the A-ASSOCIATE-RJ was not recorded"
    assert "dimse.refused_unaudited" in kinds, "the 0xA700 refusals were not recorded"
    # Every QIDO-RS answered 200 left a record: the 503s did not hide any.
    refused_http = [r for r in recorded if r.get("type") == "http.request"
                    and str(r["event"].get("status")) == "503"]
    assert refused_http, "the 503 refusals are not in the trail"
    refusals = refused_http + [r for r in recorded if r.get("type") in
                               ("association.refused_unaudited", "dimse.refused_unaudited")]
    print(f"disk full: {answered_ok} QIDO-RS answered (and recorded) before recording stopped; "
          f"{len(refusals)} refusals recorded in the reserve; trail verifies intact")


def test_torn_tail_left_by_a_crash_is_cut_at_start(make_server):
    """A record torn by a crash or a full disk (bytes after the last newline)
    is cut off when the trail is next opened, with a record saying so;
    serve starts and `audit verify` passes."""
    srv = make_server()
    assert srv.stop() == 0
    records = srv.data / "audit" / "records"
    before = records.read_bytes()
    with open(records, "ab") as f:
        f.write(b'{"seq":999,"prev":"00","nonce":"ab","ct":"AAAA')  # no newline
    srv.start()
    assert helpers.echo_status(srv.plain_port, "NOBODY") != 0x0000
    assert srv.stop() == 0
    after = records.read_bytes()
    assert after.startswith(before) and after.endswith(b"\n")
    assert b'"seq":999' not in after
    v = srv.cli("audit", "verify", check=False)
    assert v.returncode == 0, v.stdout + v.stderr
    kinds = [json.loads(l).get("type") for l in
             srv.cli("audit", "search", "--json").stdout.splitlines() if l.strip()]
    assert "audit.tail_repaired" in kinds, kinds[-20:]


def test_full_syslog_spool_stops_export_not_service_and_resumes_without_gaps(
        make_server, tmp_path, mounts):
    ca, crt, key = make_test_ca(tmp_path / "collector-pki")
    srv = make_server(start=False, init=True)
    spool = srv.data / "spool" / "syslog"
    mount_tmpfs(spool, "2m")
    mounts.append(spool)
    port = helpers.free_port()
    rs = Rsyslog(tmp_path / "rsyslog", port, srv.data / "tls" / "ca.crt", crt, key)
    with open(srv.data / "bastion.toml", "a") as f:
        f.write(f'\n[audit.syslog]\nurl = "tls://127.0.0.1:{port}"\nca = "{ca}"\n')
    try:
        srv.start()
        helpers.wait_port(srv.http_port, 30, srv.proc)
        token = run(srv, "token", "create", "--user", "admin",
                    "--expires", "1h").stdout.strip().splitlines()[-1]
        # Collector down: messages pile up in the spool until it is full.
        filler = spool / "filler"
        fill(filler)
        before = [f"SPLA{i:03}" for i in range(5)]
        for ae in before:
            reject(srv, ae)
        wait_until("syslog.export_stopped", lambda: events(srv, "syslog.export_stopped"))
        # Service continues: the trail records, QIDO-RS answers.
        assert qido(srv, token)[0] == 200
        st, _, p = call(srv, "GET", "/api/posture", token)
        assert p["audit"]["recording"] is True, p["audit"]
        assert p["audit"]["syslog_export"]["exporting"] is False, p["audit"]
        assert any("syslog export" in w for w in p["warnings"]), p["warnings"]
        during = [f"SPLB{i:03}" for i in range(5)]
        for ae in during:
            reject(srv, ae)
        # Space back, collector up: everything arrives, in order, no gap.
        filler.unlink()
        rs.start()
        wait_until("syslog.export_resumed", lambda: events(srv, "syslog.export_resumed"))
        wait_markers(rs, before + during)
    finally:
        srv.stop()
        rs.stop()
    msgs = rs.messages()
    seqs = sorted({m["seq"] for m in msgs})
    assert seqs == list(range(1, max(seqs) + 1)), "gaps in the exported sequence"
    text = "\n".join(m["msg"] for m in msgs)
    assert "110133" in text, "the export-stopped Security Alert did not reach the collector"
    # serve starts again on that spool
    srv.start()
    assert srv.stop() == 0
