"""Decompression bombs under the memory budget (issue 10, finding 2).

Deflate bombs (1.5 GiB of zeros in ~1.5 MiB, Deflated Explicit VR LE) sent in
parallel by several registered devices (pynetdicom C-STORE) and several users
(STOW-RS) are each refused (C-STORE 0xA700; STOW-RS a FailedSOPSequence item
with FailureReason 0xA700 in a 409, or the whole request 503 + Retry-After
while the budget is in use), the server's peak RSS stays under a stated bound
above its baseline (a memory bound read from /proc/PID/status VmHWM, not a
time assertion), nothing of the bombs is stored, and normal instances sent
afterwards by both routes are stored. The 64-parallel measurement is
bench/bombs.py.
"""
from __future__ import annotations

import pytest

import bombs
import helpers
from test_dicomweb import new_token

# Stated bound (docs/defaults.md, `memory_budget_mib` = 384): the budget plus
# parse and allocator overhead stays under 512 MiB above the baseline.
BOUND_KIB = 512 * 1024
PARALLEL = 16
DEVICES = ("BOMB1", "BOMB2", "BOMB3", "BOMB4")


@pytest.fixture(scope="module")
def bomb_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("bombs") / "bomb.dcm"
    uid, data = bombs.bomb_part10()
    p.write_bytes(data)
    return uid, p


def _normal_file(tmp_path, name):
    ds = helpers.make_dataset(patient_name="Normal^After", patient_id="BOMB-OK")
    p = tmp_path / name
    helpers.dataset_file(ds, p)
    return str(ds.SOPInstanceUID), p


def test_parallel_deflate_bombs_are_refused_within_the_memory_bound(make_server, bomb_file,
                                                                     tmp_path):
    bomb_uid, bomb_file = bomb_file
    srv = make_server(plain=True)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    for ae in DEVICES:
        srv.device_add(ae, transport="plain", allow="echo,store")
    tokens = [new_token(srv, f"bomber{i}", "technologist") for i in range(2)]
    # warm up both routes with a normal instance, then take the baseline
    uid, p = _normal_file(tmp_path, "warm.dcm")
    assert helpers.store_one(srv.plain_port, DEVICES[0], p)[0] == helpers.SUCCESS
    status, _, _, _ = bombs.stow(srv, tokens[0],
                                 bombs.multipart(_normal_file(tmp_path, "warm2.dcm")[1].read_bytes()))
    assert status == 200
    baseline = helpers.vm_hwm_kib(srv.pid)

    body = bombs.multipart(bomb_file.read_bytes())
    jobs = []
    for i in range(PARALLEL):
        if i % 2 == 0:
            ae = DEVICES[(i // 2) % len(DEVICES)]
            jobs.append(lambda ae=ae: ("dimse", bombs.c_store(srv.plain_port, ae, bomb_file)))
        else:
            tok = tokens[(i // 2) % len(tokens)]
            jobs.append(lambda tok=tok: ("stow", bombs.stow(srv, tok, body)))
    results = bombs.parallel(jobs)

    peak = helpers.vm_hwm_kib(srv.pid)
    assert srv.proc.poll() is None, "the server died"
    for r in results:
        assert r is not None, "a sender did not finish"
        kind, out = r
        if kind == "dimse":
            assert out[0] == helpers.OUT_OF_RESOURCES, out
        else:
            status, headers, doc, _ = out
            assert status in (409, 503), out
            if status == 409:
                assert bombs.stow_failure_reasons(doc) == [0xA700], doc
            else:
                assert int(headers.get("retry-after", "0")) >= 1, headers
    assert peak - baseline < BOUND_KIB, f"peak RSS {peak} KiB, baseline {baseline} KiB"

    # nothing of a bomb is stored; normal instances still are, by both routes
    assert srv.instance_get(bomb_uid, check=False) is None
    uid, p = _normal_file(tmp_path, "after.dcm")
    assert helpers.store_one(srv.plain_port, DEVICES[1], p)[0] == helpers.SUCCESS
    assert srv.instance_get(uid) is not None
    uid2, p2 = _normal_file(tmp_path, "after2.dcm")
    status, _, doc, _ = bombs.stow(srv, tokens[1], bombs.multipart(p2.read_bytes()))
    assert status == 200, doc
    assert srv.instance_get(uid2) is not None


def test_association_continues_after_a_refused_bomb(make_server, bomb_file, tmp_path):
    """A lone bomb is refused (0xA700) at its association's share of the memory
    budget, not as 'budget in use', and does not end its association: the next
    C-STORE on it is stored."""
    bomb_uid, bomb_file = bomb_file
    srv = make_server(plain=True)
    srv.device_add("BOMBSEQ", transport="plain", allow="echo,store")
    uid, p = _normal_file(tmp_path, "same-assoc.dcm")
    results = helpers.store_files(srv.plain_port, "BOMBSEQ", [bomb_file, p])
    assert results == {bomb_file: helpers.OUT_OF_RESOURCES, p: helpers.SUCCESS}, results
    assert srv.instance_get(uid) is not None
    assert srv.instance_get(bomb_uid, check=False) is None
    refused = [e for e in srv.events() if e.get("type") == "store.refused"]
    assert refused and all("budget of" not in str(e) for e in refused), refused
