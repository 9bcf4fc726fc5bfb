"""C-MOVE and C-GET SCP (issue 3; pitfalls C01-C04, C12, C14-C16).

Peers: DCMTK movescu/getscu over TLS with a client certificate (DCMTK 3.6.7
builds them without TLS options, so they connect through `TlsRelay`, a local
relay that opens the TLS connection and presents the certificate), DCMTK
storescp (plain) and a scripted pynetdicom Storage SCP (delays every
C-STORE-RSP, fails the Nth) as move destinations, pynetdicom as C-GET SCU
with and without SCP/SCU role selection. Every wait is bounded.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import helpers
from conftest import Server

from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet as STUDY_GET,
    StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE,
)

CT = helpers.CT_IMAGE_STORAGE
RETR = "RETR"          # mtls, may echo/store/find/move/get; may move to the two destinations
OTHER = "OTHER"        # tls, move/get, no move destinations (until updated)
NOMOVE = "NOMOVE"      # tls, echo/find only
SELF = "SELFMOVER"     # plain, move; host/port = the scripted SCP: may move to itself
DCM_DEST = "DCMSTORE"  # plain destination: DCMTK storescp
SLOW_DEST = "SLOWSTORE"  # plain destination: scripted pynetdicom SCP
PENDING = 0xFF00
CANCEL = 0xFE00
WARNING = 0xB000
ALL_FAILED = 0xA702
DEST_UNKNOWN = 0xA801
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


def dataset_bytes(path: Path) -> bytes:
    """The dataset of a Part 10 file: what follows the group 0002 meta."""
    b = Path(path).read_bytes()
    assert b[128:132] == b"DICM", path
    pos = 132
    while pos + 8 <= len(b) and int.from_bytes(b[pos:pos + 2], "little") == 2:
        vr = b[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR"):
            pos += 12 + int.from_bytes(b[pos + 8:pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(b[pos + 6:pos + 8], "little")
    return b[pos:]


class ScriptedStoreSCP:
    """pynetdicom Storage SCP that delays each C-STORE-RSP and fails the Nth
    (1-based) C-STORE with 0xA700; records what it actually received."""

    def __init__(self, port: int, delay: float = 0.0, fail_nth: int | None = None):
        self.port = port
        self.delay = delay
        self.fail_nth = fail_nth
        self.received: list[tuple[float, str]] = []
        self.connections = 0
        self.lock = threading.Lock()
        ae = AE(ae_title="ANY")
        ae.network_timeout = helpers.TIMEOUT
        ae.dimse_timeout = helpers.TIMEOUT
        ae.acse_timeout = helpers.TIMEOUT
        ae.add_supported_context(CT, [ExplicitVRLittleEndian])
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_CONN_OPEN, self._conn)])

    def configure(self, delay: float = 0.0, fail_nth: int | None = None):
        with self.lock:
            self.delay, self.fail_nth = delay, fail_nth
            self.received = []

    def _conn(self, event):
        with self.lock:
            self.connections += 1

    def _store(self, event):
        with self.lock:
            self.received.append((time.monotonic(), str(event.request.AffectedSOPInstanceUID)))
            n = len(self.received)
            delay, fail = self.delay, self.fail_nth
        time.sleep(delay)
        return 0xA700 if fail is not None and n == fail else 0x0000

    def uids(self) -> list[str]:
        with self.lock:
            return [u for _, u in self.received]

    def stop(self):
        self.server.shutdown()


class TlsRelay:
    """Plain TCP on a local port -> TLS to Bastion with a client certificate."""

    def __init__(self, target_port: int, ctx: ssl.SSLContext):
        self.target_port, self.ctx = target_port, ctx
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.stop_flag = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stop_flag:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            raw = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            t = self.ctx.wrap_socket(raw, server_hostname="localhost")
        except OSError as e:  # shown by pytest when the test fails
            print(f"TlsRelay: cannot reach Bastion over TLS: {e!r}", file=sys.stderr)
            c.close()
            return
        for s in (c, t):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(60)
        # One thread per connection: an SSLSocket must not be read and written
        # from two threads at once (OpenSSL objects are not thread-safe; with
        # TLS 1.3 session tickets this stalled the handshake now and then).
        import select
        try:
            while True:
                ready = [t] if t.pending() else select.select([c, t], [], [], 60)[0]
                if not ready:
                    break
                done = False
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        done = True
                        break
                    (t if src is c else c).sendall(data)
                if done:
                    break
        except OSError:
            pass
        for s in (c, t):
            try:
                s.close()
            except OSError:
                pass

    def close(self):
        self.stop_flag = True
        self.sock.close()


def make_study(n: int, base: Path, pixel_bytes: int = 512) -> tuple[str, str, list[Path]]:
    study, series = generate_uid(), generate_uid()
    base.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        ds = helpers.make_dataset(pixel_bytes=pixel_bytes, study_uid=study, series_uid=series,
                                  patient_id="RETRIEVE-1", seed_value=i)
        ds.InstanceNumber = i + 1
        p = base / f"{i:04d}.dcm"
        helpers.dataset_file(ds, p)
        files.append(p)
    return study, series, files


@pytest.fixture(scope="module")
def rv(bastion_bin, tmp_path_factory):
    base = tmp_path_factory.mktemp("retrieve")
    srv = Server(bastion_bin, base)
    srv.init()
    srv.start(plain=True)
    slow_port, dcm_port = helpers.free_port(), helpers.free_port()
    srv.device_add(DCM_DEST, transport="plain", allow="echo", host="127.0.0.1", port=dcm_port)
    srv.device_add(SLOW_DEST, transport="plain", allow="echo", host="127.0.0.1", port=slow_port)
    srv.device_add(RETR, transport="mtls", allow="echo,store,find,move,get",
                   move_destinations=f"{DCM_DEST}, {SLOW_DEST}")
    srv.device_add(OTHER, transport="tls", allow="echo,move,get")
    srv.device_add(NOMOVE, transport="tls", allow="echo,find")
    srv.device_add(SELF, transport="plain", allow="echo,move", host="127.0.0.1", port=slow_port)
    crt, key, ca, _ = srv.cert_issue(RETR)
    ctx = helpers.client_ssl_context(ca, crt, key)
    studies = {
        "small": make_study(3, base / "small", pixel_bytes=40 * 1024),  # > 16 KiB PDUs
        "twenty": make_study(20, base / "twenty"),
        "many": make_study(200, base / "many", pixel_bytes=256),
    }
    files = [f for _, _, fs in studies.values() for f in fs]
    res = helpers.store_files(srv.tls_port, RETR, files, tls=ctx)
    assert all(s == 0 for s in res.values()), res
    scp = ScriptedStoreSCP(slow_port)
    env = {"srv": srv, "ctx": ctx, "certs": (crt, key, ca), "studies": studies, "scp": scp,
           "dcm_port": dcm_port, "plain_ctx": srv.tls_context()}
    yield env
    scp.stop()
    srv.stop()


def study_identifier(study: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study
    return ds


def _assoc(env, calling, contexts, ctx=None, roles=(), handlers=(), max_pdu=None):
    ae = helpers.make_ae(calling, contexts=contexts)
    if max_pdu is not None:
        ae.maximum_pdu_size = max_pdu
    srv = env["srv"]
    if calling == SELF:  # a plain device: plain listener
        port, tls_args = srv.plain_port, None
    else:
        port, tls_args = srv.tls_port, (ctx or env["plain_ctx"], "localhost")
    assoc = ae.associate("127.0.0.1", port, ae_title=srv.ae_title, tls_args=tls_args,
                         ext_neg=list(roles), evt_handlers=list(handlers))
    assert assoc.is_established, helpers.rejection(assoc)
    return assoc


def move(env, identifier, dest, calling=RETR, ctx=None, cancel_after=None, msg_id=9):
    """[(status, response dataset, identifier)] of one C-MOVE; the last is final.
    With cancel_after=k a C-CANCEL-RQ is sent once Completed+Failed >= k."""
    assoc = _assoc(env, calling, [STUDY_MOVE], ctx=ctx or (env["ctx"] if calling == RETR else None))
    out = []
    cancelled_at = None
    try:
        for st, ident in assoc.send_c_move(identifier, dest, STUDY_MOVE, msg_id=msg_id):
            code = st.Status if "Status" in st else None
            out.append((code, st, ident, time.monotonic()))
            if code == PENDING and cancel_after is not None and cancelled_at is None:
                done = st.NumberOfCompletedSuboperations + st.NumberOfFailedSuboperations
                if done >= cancel_after:
                    cid = assoc._get_valid_context(STUDY_MOVE, "", "scu").context_id
                    assoc.send_c_cancel(msg_id, cid)
                    cancelled_at = time.monotonic()
    finally:
        if assoc.is_established:
            assoc.release()
    assert out and out[-1][0] is not None, "no final C-MOVE-RSP"
    return out


def get(env, identifier, with_role=True, calling=RETR, ctx=None, msg_id=11, max_pdu=None,
        delay=0.0, cancel_after=None, times=None, ts=ExplicitVRLittleEndian):
    """(responses, received {uid: dataset bytes}) of one C-GET. `times` collects
    the arrival time of each C-STORE; with cancel_after=k a C-CANCEL-RQ is sent
    once a pending response reports k sub-operations done."""
    received: dict[str, bytes] = {}

    def on_store(event):
        received[str(event.request.AffectedSOPInstanceUID)] = bytes(event.request.DataSet.getvalue())
        if times is not None:
            times.append(time.monotonic())
        time.sleep(delay)
        return 0x0000

    roles = [build_role(CT, scp_role=True)] if with_role else []
    assoc = _assoc(env, calling, [STUDY_GET, (CT, [ts])],
                   ctx=ctx or (env["ctx"] if calling == RETR else None), roles=roles,
                   handlers=[(evt.EVT_C_STORE, on_store)], max_pdu=max_pdu)
    out = []
    cancelled = False
    try:
        for st, ident in assoc.send_c_get(identifier, STUDY_GET, msg_id=msg_id):
            code = st.Status if "Status" in st else None
            out.append((code, st, ident, time.monotonic()))
            if code == PENDING and cancel_after is not None and not cancelled:
                if st.NumberOfCompletedSuboperations + st.NumberOfFailedSuboperations >= cancel_after:
                    cid = assoc._get_valid_context(STUDY_GET, "", "scu").context_id
                    assoc.send_c_cancel(msg_id, cid)
                    cancelled = True
    finally:
        if assoc.is_established:
            assoc.release()
    assert out and out[-1][0] is not None, "no final C-GET-RSP"
    return out, received


def counts(st) -> tuple[int, int, int, int]:
    g = lambda k: int(st.get(k, 0) or 0)  # noqa: E731
    return (g("NumberOfRemainingSuboperations"), g("NumberOfCompletedSuboperations"),
            g("NumberOfFailedSuboperations"), g("NumberOfWarningSuboperations"))


def failed_list(ident) -> list[str]:
    assert ident is not None and "FailedSOPInstanceUIDList" in ident, ident
    v = ident.FailedSOPInstanceUIDList
    if v in (None, ""):
        return []
    return [str(x) for x in (v if isinstance(v, pydicom.multival.MultiValue) else [v])]


def events(srv, kind):
    return [e for e in srv.events() if e["type"] == kind]


# --------------------------------------------------------------------------
# DCMTK
# --------------------------------------------------------------------------

def test_dcmtk_movescu_to_storescp_byte_exact(rv, tmp_path):
    srv = rv["srv"]
    study, _, files = rv["studies"]["small"]
    out = tmp_path / "received"
    out.mkdir()
    relay = None
    scp = subprocess.Popen(["/usr/bin/storescp", "-aet", DCM_DEST, "+B", "-od", str(out),
                            str(rv["dcm_port"])], env=DCMTK_ENV, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        helpers.wait_port(rv["dcm_port"], timeout=20, proc=scp)
        relay = TlsRelay(srv.tls_port, rv["ctx"])
        r = subprocess.run(["/usr/bin/movescu", "-S", "-aet", RETR, "-aec", srv.ae_title,
                            "-aem", DCM_DEST,
                            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                            "127.0.0.1", str(relay.port)],
                           capture_output=True, text=True, timeout=60, env=DCMTK_ENV,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        if relay is not None:
            relay.close()
        scp.terminate()
        try:
            scp.wait(timeout=10)
        except subprocess.TimeoutExpired:
            scp.kill()
    got = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(p)
           for p in out.iterdir()}
    want = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(p)
            for p in files}
    assert set(got) == set(want)
    for uid in want:
        assert got[uid] == want[uid], f"dataset of {uid} differs"
    ev = events(srv, "retrieve.move")[-1]
    assert ev["ae"] == RETR and ev["destination"] == DCM_DEST
    assert ev["completed"] == 3 and ev["failed"] == 0 and ev["studies"] == [study]
    assert "PatientID" not in str(ev) and "RETRIEVE-1" not in str(ev)


def test_dcmtk_getscu_over_tls_byte_exact(rv, tmp_path):
    srv = rv["srv"]
    study, _, files = rv["studies"]["small"]
    out = tmp_path / "got"
    out.mkdir()
    relay = TlsRelay(srv.tls_port, rv["ctx"])
    # getscu announces a 16 KiB maximum PDU: the 40 KiB datasets are fragmented.
    try:
        r = subprocess.run(["/usr/bin/getscu", "-S", "-aet", RETR, "-aec", srv.ae_title,
                            "+B", "-od", str(out), "-pdu", "16384",
                            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                            "127.0.0.1", str(relay.port)],
                           capture_output=True, text=True, timeout=60, env=DCMTK_ENV,
                           stdin=subprocess.DEVNULL)
    finally:
        relay.close()
    assert r.returncode == 0, r.stdout + r.stderr
    got = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(p)
           for p in out.iterdir()}
    want = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(p)
            for p in files}
    assert set(got) == set(want), r.stdout + r.stderr
    for uid in want:
        assert got[uid] == want[uid], f"dataset of {uid} differs"
    ev = events(srv, "retrieve.get")[-1]
    assert ev["ae"] == RETR and ev["completed"] == 3 and ev["status"] == 0


# --------------------------------------------------------------------------
# C-GET role selection (C04), UID lists (C12)
# --------------------------------------------------------------------------

def test_get_with_role_selection(rv):
    study, _, files = rv["studies"]["small"]
    rsps, received = get(rv, study_identifier(study))
    final = rsps[-1]
    assert final[0] == 0x0000, rsps
    assert counts(final[1])[1:] == (3, 0, 0)
    for code, st, _, _ in rsps[:-1]:
        assert code == PENDING
        assert sum(counts(st)) == 3
    want = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(p)
            for p in files}
    assert received == want


def test_get_to_a_peer_announcing_no_pdu_limit(rv):
    """C01: Maximum Length 0 means no limit; datasets arrive byte-identical."""
    study, _, files = rv["studies"]["small"]
    rsps, received = get(rv, study_identifier(study), max_pdu=0)
    assert rsps[-1][0] == 0x0000, rsps
    want = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(p)
            for p in files}
    assert received == want


def test_get_without_role_selection_fails_every_suboperation(rv):
    study, _, files = rv["studies"]["small"]
    t0 = time.monotonic()
    rsps, received = get(rv, study_identifier(study), with_role=False)
    assert time.monotonic() - t0 < 15, "C-GET without an SCP role must not hang"
    assert received == {}
    code, st, ident, _ = rsps[-1]
    assert code == ALL_FAILED, rsps
    assert counts(st)[1:] == (0, 3, 0)
    want = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files)
    assert sorted(failed_list(ident)) == want


def test_get_uid_list_at_image_level(rv):
    study, series, files = rv["studies"]["twenty"]
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files[2:5]]
    ident = Dataset()
    ident.QueryRetrieveLevel = "IMAGE"
    ident.StudyInstanceUID = study
    ident.SeriesInstanceUID = series
    ident.SOPInstanceUID = uids + ["1.2.3.999.404"]  # one unknown UID: OR semantics
    rsps, received = get(rv, ident)
    assert rsps[-1][0] == 0x0000, rsps
    assert sorted(received) == sorted(uids)


def test_get_refusals(rv):
    study, _, _ = rv["studies"]["small"]
    rsps, received = get(rv, study_identifier(study), calling=NOMOVE, ctx=rv["plain_ctx"])
    assert rsps[-1][0] == 0x0124 and not received
    # no unique key at the retrieve level
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = ""
    rsps, received = get(rv, ident)
    assert rsps[-1][0] == 0xA900 and not received


# --------------------------------------------------------------------------
# C-MOVE: scripted destination (C15), refusals (C14, C03), cancel (C16)
# --------------------------------------------------------------------------

def test_move_counts_match_the_cstores_received(rv):
    scp = rv["scp"]
    study, _, files = rv["studies"]["twenty"]
    scp.configure(delay=0.2, fail_nth=5)
    rsps = move(rv, study_identifier(study), SLOW_DEST)
    code, st, ident, t_final = rsps[-1]
    received = scp.uids()
    assert len(received) == 20 and len(set(received)) == 20
    assert code == WARNING, rsps
    assert counts(st)[1:] == (19, 1, 0)
    assert failed_list(ident) == [received[4]]
    pend = [counts(s) for c, s, _, _ in rsps[:-1]]
    assert pend and all(c == PENDING for c, *_ in rsps[:-1])
    assert all(sum(p) == 20 for p in pend)
    done = [p[1] + p[2] for p in pend]
    assert done == sorted(done) and done[-1] <= 20
    # the final response came after the last C-STORE (C15)
    assert max(t for t, _ in scp.received) < t_final


def test_move_unknown_destination_makes_no_connection(rv):
    scp, srv = rv["scp"], rv["srv"]
    study, _, _ = rv["studies"]["small"]
    before = scp.connections
    rsps = move(rv, study_identifier(study), "NOT_CONFIGURED")
    assert len(rsps) == 1 and rsps[0][0] == DEST_UNKNOWN, rsps
    assert counts(rsps[0][1])[1:] == (0, 0, 0)
    ev = events(srv, "retrieve.move")[-1]
    assert ev["outcome"] == "refused" and ev["reason"] == "not a registered device"
    assert ev["destination"] == "NOT_CONFIGURED"
    time.sleep(0.5)
    assert scp.connections == before


def test_move_destination_must_be_allowed_for_the_device(rv):
    scp, srv = rv["scp"], rv["srv"]
    study, _, files = rv["studies"]["small"]
    scp.configure()
    before = scp.connections
    rsps = move(rv, study_identifier(study), SLOW_DEST, calling=OTHER)
    assert rsps[-1][0] == DEST_UNKNOWN, rsps
    assert events(srv, "retrieve.move")[-1]["reason"] == "destination not allowed for this device"
    time.sleep(0.5)
    assert scp.connections == before and scp.uids() == []
    # a device may move to itself (its host/port: the scripted SCP), AE padding ignored
    rsps = move(rv, study_identifier(study), SELF + " ", calling=SELF)
    assert rsps[-1][0] == 0x0000, rsps
    assert len(scp.uids()) == 3
    # allowed once listed
    srv.device_update(OTHER, network=None, transport=None, allow=None,
                      move_destinations=SLOW_DEST)
    assert [d for d in srv.device_list() if d["ae"] == OTHER][0]["move_destinations"] == [SLOW_DEST]
    scp.configure()
    rsps = move(rv, study_identifier(study), SLOW_DEST, calling=OTHER)
    assert rsps[-1][0] == 0x0000, rsps
    assert counts(rsps[-1][1])[1:] == (3, 0, 0)
    assert len(scp.uids()) == 3


def test_move_refusals_and_unreachable_destination(rv, tmp_path):
    srv = rv["srv"]
    study, _, files = rv["studies"]["small"]
    rsps = move(rv, study_identifier(study), SLOW_DEST, calling=NOMOVE)
    assert rsps[-1][0] == 0x0124, rsps
    # DCMSTORE registered and allowed but nothing listens now: every sub-op fails
    rsps = move(rv, study_identifier(study), DCM_DEST)
    code, st, ident, _ = rsps[-1]
    assert code == ALL_FAILED, rsps
    assert counts(st)[1:] == (0, 3, 0)
    assert len(failed_list(ident)) == 3
    ev = events(srv, "retrieve.move")[-1]
    assert ev["outcome"] == "failure" and ev["failed"] == 3


def test_cancel_a_move_of_200_instances(rv):
    scp = rv["scp"]
    study, _, files = rv["studies"]["many"]
    scp.configure(delay=0.05)
    rsps = move(rv, study_identifier(study), SLOW_DEST, cancel_after=10)
    code, st, ident, t_final = rsps[-1]
    assert code == CANCEL, rsps[-3:]
    remaining, completed, failed, warning = counts(st)
    n_received = len(scp.uids())
    time.sleep(1.0)
    assert len(scp.uids()) == n_received, "C-STORE after the final C-MOVE-RSP"
    assert completed + failed + warning == n_received
    assert 10 <= n_received < 200
    assert remaining == 200 - n_received
    assert all(t < t_final for t, _ in scp.received)


def test_cancel_after_the_first_pending(rv):
    scp = rv["scp"]
    study, _, _ = rv["studies"]["many"]
    scp.configure(delay=0.05)
    assoc = _assoc(rv, RETR, [STUDY_MOVE], ctx=rv["ctx"])
    out = []
    try:
        gen = assoc.send_c_move(study_identifier(study), SLOW_DEST, STUDY_MOVE, msg_id=21)
        cid = assoc._get_valid_context(STUDY_MOVE, "", "scu").context_id
        # the generator sends the request on its first step; cancel right after it
        first = next(gen)
        assoc.send_c_cancel(21, cid)
        out.append(first)
        out.extend(gen)
    finally:
        if assoc.is_established:
            assoc.release()
    code = out[-1][0].Status
    assert code == CANCEL, [o[0] for o in out][-3:]
    assert len(scp.uids()) < 50


def test_cancel_a_get_of_200_instances(rv):
    study, _, _ = rv["studies"]["many"]
    times: list[float] = []
    rsps, received = get(rv, study_identifier(study), delay=0.02, cancel_after=10, times=times)
    code, st, ident, t_final = rsps[-1]
    assert code == CANCEL, [r[0] for r in rsps][-3:]
    remaining, completed, failed, warning = counts(st)
    assert completed + failed + warning == len(received)
    assert 10 <= len(received) < 200
    assert remaining == 200 - len(received)
    assert all(t < t_final for t in times), "C-STORE after the final C-GET-RSP"


# --------------------------------------------------------------------------
# Transfer syntax fallback (PS3.4 C.4.2.2 / C.4.3.3: the stored syntax first,
# else an uncompressed one Bastion can produce)
# --------------------------------------------------------------------------
def _same_dataset(original_file: Path, received: bytes, implicit: bool) -> None:
    import io
    from pydicom.filereader import read_dataset
    want = pydicom.dcmread(original_file)
    got = read_dataset(io.BytesIO(received), is_implicit_VR=implicit, is_little_endian=True)
    assert got.SOPInstanceUID == want.SOPInstanceUID
    assert got.PixelData == want.PixelData
    for kw in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
        assert getattr(got, kw, None) == getattr(want, kw, None), kw


def test_get_converts_to_implicit_vr_when_only_that_is_offered(rv):
    study, _, files = rv["studies"]["small"]  # stored Explicit VR Little Endian
    from pydicom.uid import ImplicitVRLittleEndian
    rsps, received = get(rv, study_identifier(study), ts=ImplicitVRLittleEndian)
    assert rsps[-1][0] == 0x0000, rsps
    assert counts(rsps[-1][1])[1:] == (3, 0, 0)
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    assert set(received) == set(by_uid)
    for uid, data in received.items():
        assert data != dataset_bytes(by_uid[uid]), "must have been re-encoded"
        _same_dataset(by_uid[uid], data, implicit=True)


def test_move_converts_for_an_implicit_only_destination(rv):
    from pydicom.uid import ImplicitVRLittleEndian
    srv = rv["srv"]
    port = helpers.free_port()
    got: dict[str, tuple[str, bytes]] = {}

    def on_store(event):
        got[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax), bytes(event.request.DataSet.getvalue()))
        return 0x0000

    ae = AE(ae_title="IVRONLY")
    ae.add_supported_context(CT, [ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        srv.device_add("IVRDEST", transport="plain", allow="echo", host="127.0.0.1", port=port)
        srv.device_update(RETR, network=None, transport=None, allow=None,
                          move_destinations=f"{DCM_DEST},{SLOW_DEST},IVRDEST")
        study, _, files = rv["studies"]["small"]
        rsps = move(rv, study_identifier(study), "IVRDEST")
        assert rsps[-1][0] == 0x0000, rsps
        by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
        assert set(got) == set(by_uid)
        for uid, (ts, data) in got.items():
            assert ts == ImplicitVRLittleEndian
            _same_dataset(by_uid[uid], data, implicit=True)
    finally:
        server.shutdown()
