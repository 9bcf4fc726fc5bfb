"""Bad input: the peer gets A-ABORT/RJ or a failure status, nothing is stored
half-way, and the server keeps serving."""
import socket
import ssl
import struct
import threading
import time

import pytest

import corpus
import helpers
from helpers import SUCCESS, CANNOT_UNDERSTAND, DATASET_MISMATCH


@pytest.fixture
def srv(server):
    server.device_add("RAWPLAIN", transport="plain", allow="echo,store")
    server.device_add("RAWTLS", transport="tls", allow="echo,store")
    return server


def still_serving(srv):
    assert srv.echo("RAWPLAIN", tls=False) == SUCCESS
    assert srv.echo("RAWTLS") == SUCCESS


def tls_socket(srv):
    ctx = srv.tls_context()
    raw = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def test_http_to_plain_port(srv):
    with socket.create_connection(("127.0.0.1", srv.plain_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert helpers.ends_in_abort_or_close(s) in ("abort", "close")
    still_serving(srv)


def test_http_to_tls_port(srv):
    with socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(15)
        try:
            data = s.recv(65536)
            # a TLS alert at most, never a DICOM or HTTP answer
            assert data == b"" or data[0] == 0x15, data[:20]
        except (ConnectionResetError, socket.timeout):
            pass
    still_serving(srv)


def test_plaintext_associate_rq_to_tls_port(srv):
    with socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10) as s:
        s.sendall(helpers.associate_rq("RAWTLS"))
        s.settimeout(15)
        try:
            data = s.recv(65536)
            assert data == b"" or data[0] == 0x15, data[:20]
        except (ConnectionResetError, socket.timeout):
            pass
    still_serving(srv)


def _associated_plain(srv, max_pdu=16384):
    s = socket.create_connection(("127.0.0.1", srv.plain_port), timeout=10)
    s.sendall(helpers.associate_rq("RAWPLAIN", max_pdu=max_pdu))
    pdu = helpers.read_pdu(s)
    assert pdu is not None and pdu[0] == 0x02, f"expected A-ASSOCIATE-AC, got {pdu!r:.80}"
    return s


def test_oversized_pdu(srv):
    with _associated_plain(srv) as s:
        # P-DATA-TF declaring 1 GiB: must be refused without reading (or allocating) it
        s.sendall(struct.pack(">BBI", 0x04, 0, 0x40000000) + b"\0" * 1024)
        # PS3.8: A-ABORT, source 2 (service provider), reason 6 (invalid PDU parameter)
        assert helpers.read_abort(s) == (2, 6)
    still_serving(srv)


def test_second_associate_rq_mid_association(srv):
    with _associated_plain(srv) as s:
        s.sendall(helpers.associate_rq("RAWPLAIN"))
        # A-ABORT, source 2, reason 2 (unexpected PDU)
        assert helpers.read_abort(s) == (2, 2)
    still_serving(srv)


def test_garbage_pdu_type(srv):
    with _associated_plain(srv) as s:
        s.sendall(struct.pack(">BBI", 0x42, 0, 4) + b"\xde\xad\xbe\xef")
        # A-ABORT, source 2, reason 1 (unrecognized PDU)
        assert helpers.read_abort(s) == (2, 1)
    still_serving(srv)


def test_truncated_dataset_in_c_store(srv, tmp_path):
    ds = helpers.make_dataset(pixel_bytes=8192)
    raw = helpers.encode_dataset(ds)
    p = tmp_path / "trunc.dcm"
    p.write_bytes(helpers.part10(ds.file_meta, raw[:-100]))  # pixel data cut short
    try:
        st, _ = helpers.store_one(srv.plain_port, "RAWPLAIN", p)
    except Exception:
        st = "aborted"
    assert st in (CANNOT_UNDERSTAND, DATASET_MISMATCH, "aborted", None), hex(st) if isinstance(st, int) else st
    assert srv.instance_get(ds.SOPInstanceUID, check=False) is None
    still_serving(srv)


def test_not_dicom_via_import(srv, tmp_path):
    p = tmp_path / "notdicom.dcm"
    p.write_bytes(b"this is not DICOM\n" * 20)
    code, summary, rejected, out = srv.import_(p)
    assert code == 1
    assert summary == {"stored": 0, "duplicates": 0, "conflicts": 0, "rejected": 1}
    assert len(rejected) == 1 and rejected[0][0].endswith("notdicom.dcm") and rejected[0][1].strip()


def test_idle_connections_do_not_delay_echo(srv):
    idle = []
    try:
        for _ in range(20):
            idle.append(socket.create_connection(("127.0.0.1", srv.tls_port), timeout=5))
        ctx = srv.tls_context()
        time.sleep(0.2)
        t0 = time.monotonic()
        st = helpers.echo_status(srv.tls_port, "RAWTLS", tls=ctx)
        elapsed = time.monotonic() - t0
        assert st == SUCCESS
        assert elapsed < 1.0, f"C-ECHO over TLS took {elapsed:.3f} s with 20 idle sockets"
    finally:
        for s in idle:
            s.close()


def test_socket_flood_from_another_address_does_not_lock_out_devices(srv):
    """Unauthenticated sockets (no TLS handshake, no A-ASSOCIATE-RQ) do not
    use association slots: 100 of them from 127.0.0.2 (more than
    max_associations and the per-address cap) leave a registered device on
    127.0.0.1 able to connect."""
    idle = []
    try:
        for _ in range(100):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(5)
            s.bind(("127.0.0.2", 0))
            try:
                s.connect(("127.0.0.1", srv.tls_port))
            except OSError:
                s.close()
                continue
            idle.append(s)
        assert len(idle) >= 65
        time.sleep(0.3)
        assert helpers.echo_status(srv.tls_port, "RAWTLS", tls=srv.tls_context()) == SUCCESS
    finally:
        for s in idle:
            s.close()
