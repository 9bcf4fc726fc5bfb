"""STOW-RS bodies are streamed one part at a time (issue 10, finding 2).

Before, the whole request body was held in memory under one transfer's share
of the memory budget (`transfer_budget_mib`), so a legitimate upload of a
study larger than that share was refused whole with 503. Now the body is
split as it arrives and each instance is stored before the next is read: a
request many times the share is stored whole, the server's peak RSS grows by
about one instance, and one instance larger than the share is spilled to
disk, encrypted (test_spill.py), or, with no room there, fails alone
(FailedSOPSequence, 0xA700) while the others are stored.
"""
from __future__ import annotations

import pytest

import bombs
import helpers
from test_dicomweb import new_token

MIB = 1 << 20


def _server(make_server, spool_budget_mib=4096):
    srv = make_server(start=False)
    cfg = srv.data / "bastion.toml"
    text = cfg.read_text()
    for key, value in (("memory_budget_mib", 16), ("transfer_budget_mib", 8),
                       ("spool_budget_mib", spool_budget_mib)):
        old = next(line for line in text.splitlines() if line.startswith(f"{key} ="))
        text = text.replace(old, f"{key} = {value}")
    cfg.write_text(text)
    srv.start()
    helpers.wait_port(srv.http_port, 30, srv.proc)
    return srv


def _instances(tmp_path, sizes, study_uid):
    """Part 10 bytes and SOP Instance UID of one CT image per size (pixel bytes)."""
    out = []
    for i, size in enumerate(sizes):
        ds = helpers.make_dataset(patient_name="Stream^Big", patient_id="STREAM-1",
                                  pixel_bytes=size, study_uid=study_uid, seed_value=i)
        p = tmp_path / f"i{i}.dcm"
        helpers.dataset_file(ds, p)
        out.append((str(ds.SOPInstanceUID), p.read_bytes()))
    return out


def _body(files):
    b = bombs.BOUNDARY
    parts = [f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
             for _, data in files]
    return b"".join(parts) + f"--{b}--\r\n".encode()


def _referenced(doc):
    return [it["00081155"]["Value"][0] for it in (doc or {}).get("00081199", {}).get("Value", [])]


def test_a_body_many_times_the_transfer_share_is_stored_whole(make_server, tmp_path):
    srv = _server(make_server)
    token = new_token(srv, "streamer", "technologist")
    study = helpers.generate_uid()
    files = _instances(tmp_path, [MIB] * 40, study)  # ~40 MiB, the share is 8 MiB
    # warm the route, then take the baseline
    (tmp_path / "warm").mkdir()
    warm = _instances(tmp_path / "warm", [64 * 1024], helpers.generate_uid())
    assert bombs.stow(srv, token, _body(warm))[0] == 200
    baseline = helpers.vm_hwm_kib(srv.pid)

    status, _, doc, _ = bombs.stow(srv, token, _body(files))
    assert status == 200, (status, doc)
    assert sorted(_referenced(doc)) == sorted(uid for uid, _ in files)
    peak = helpers.vm_hwm_kib(srv.pid)
    # One instance (1 MiB) at a time, plus its parse: far below the 40 MiB
    # the old code would have had to hold.
    assert peak - baseline < 24 * 1024, f"peak {peak} KiB, baseline {baseline} KiB"
    # the bytes stored are the bytes sent
    for uid, data in (files[0], files[-1]):
        got = srv.instance_get(uid, out=tmp_path / f"{uid}.out")
        assert got is not None
        assert (tmp_path / f"{uid}.out").read_bytes()[-MIB:] == data[-MIB:]


def test_one_instance_over_the_share_fails_alone_without_a_spool(make_server, tmp_path):
    """With no room to spill (`spool_budget_mib = 0`), an instance larger than
    the memory share fails alone (0xA700, named), the others are stored. With
    room, it is spilled and stored: test_spill.py."""
    srv = _server(make_server, spool_budget_mib=0)
    token = new_token(srv, "streamer2", "technologist")
    study = helpers.generate_uid()
    small_a, big, small_b = _instances(tmp_path, [MIB, 12 * MIB, MIB], study)
    status, _, doc, _ = bombs.stow(srv, token, _body([small_a, big, small_b]))
    assert status == 202, (status, doc)
    assert sorted(_referenced(doc)) == sorted([small_a[0], small_b[0]])
    assert bombs.stow_failure_reasons(doc) == [0xA700], doc
    item = doc["00081198"]["Value"][0]
    # named by its meta information, the limit named too
    assert item["00081155"]["Value"] == [big[0]], item
    assert "transfer_budget_mib" in item["00000902"]["Value"][0], item
    assert srv.instance_get(small_b[0]) is not None
    assert srv.instance_get(big[0], check=False) is None
    assert srv.proc.poll() is None


@pytest.mark.parametrize("cut", ["unclosed", "broken_framing"])
def test_a_broken_body_keeps_the_whole_instances_before_it(make_server, tmp_path, cut):
    """Instances whose closing delimiter arrived are stored whole (acknowledged
    in the index) and the answer says so: 202 with them referenced and the
    rest of the request as one failed item (0xC000) naming the error; the
    instance cut off by the end of an unclosed body is not stored at all."""
    srv = _server(make_server)
    token = new_token(srv, f"streamer-{cut}", "technologist")
    files = _instances(tmp_path, [256 * 1024, 256 * 1024], helpers.generate_uid())
    body = _body(files)
    body = body[: -len(f"--{bombs.BOUNDARY}--\r\n")]  # drop the close
    if cut == "broken_framing":
        body += f"--{bombs.BOUNDARY}XX\r\n".encode()
    status, _, doc, _ = bombs.stow(srv, token, body)
    complete = files if cut == "broken_framing" else files[:1]
    assert status == 202, (status, doc)
    assert sorted(_referenced(doc)) == sorted(uid for uid, _ in complete)
    failed = doc["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC000], failed
    assert failed[0]["00000902"]["Value"][0].startswith("rest of the request not read"), failed
    for uid, data in complete:
        got = srv.instance_get(uid, out=tmp_path / f"{uid}.out")
        assert got is not None
        assert (tmp_path / f"{uid}.out").read_bytes()[-1000:] == data[-1000:]
    if cut == "unclosed":
        assert srv.instance_get(files[1][0], check=False) is None


def test_a_framing_limit_is_a_400_that_names_it(make_server, tmp_path):
    """413 is for max_upload_bytes only; a part header over its limit is 400
    naming that limit (it was 413 "request body too large" for a 70 KB body)."""
    srv = _server(make_server)
    token = new_token(srv, "streamer-limit", "technologist")
    b = bombs.BOUNDARY
    body = (f"--{b}\r\nContent-Type: application/dicom\r\nX-Pad: {'p' * (70 << 10)}\r\n\r\n"
            f"x\r\n--{b}--\r\n").encode()
    status, _, doc, _ = bombs.stow(srv, token, body)
    assert status == 400, (status, doc)
    assert "header bytes per part" in doc["error"], doc


def test_a_request_of_garbage_parts_stops_after_a_thousand_failures(make_server, tmp_path):
    """Each refused instance is an audit record: a request of 1,500 garbage
    parts is cut off after 1,000 failures (400 naming it), not 1,500 records."""
    srv = _server(make_server)
    token = new_token(srv, "garbage", "technologist")
    b = bombs.BOUNDARY
    part = f"--{b}\r\nContent-Type: application/dicom\r\n\r\nnot dicom\r\n".encode()
    status, _, doc, _ = bombs.stow(srv, token, part * 1500 + f"--{b}--\r\n".encode())
    assert status == 400, (status, doc)
    assert "1000 instances of this request failed" in doc["error"], doc
    refused = [e for e in srv.events() if e.get("type") == "store.refused"]
    assert 1000 <= len(refused) <= 1001, len(refused)
