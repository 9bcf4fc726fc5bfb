"""DICOM crafting, raw PDUs and pynetdicom helpers shared by the interop tests."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import ssl
import struct
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1466.1"  # only used in crafted meta

# PS3.7 statuses used by the contract
SUCCESS = 0x0000
NOT_AUTHORIZED = 0x0124
DUPLICATE_SOP_INSTANCE = 0x0111
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

# pynetdicom defaults to a 30 s ACSE/DIMSE/network timeout; tests want
# bounded but shorter waits.
TIMEOUT = 20


# --------------------------------------------------------------------------
# Crafting datasets and Part 10 files
# --------------------------------------------------------------------------

def make_dataset(patient_name="Test^Patient", patient_id="TEST-0001",
                 pixel_bytes: int = 64 * 64 * 2, sop_class=CT_IMAGE_STORAGE,
                 study_uid=None, series_uid=None, seed_value: int = 0) -> Dataset:
    """A small, valid CT image with fresh UIDs (explicit VR LE)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.Modality = "CT"
    ds.StudyDate = "20240101"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    # keep rows*cols*2 == pixel_bytes (pixel_bytes even)
    cols = 256
    rows = max(1, pixel_bytes // (cols * 2))
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    body = bytes((i * 7 + seed_value) & 0xFF for i in range(256)) * ((rows * cols * 2) // 256 + 1)
    ds.PixelData = body[: rows * cols * 2]
    ds.file_meta = file_meta_for(ds.SOPClassUID, ds.SOPInstanceUID)
    return ds


def file_meta_for(sop_class, sop_instance, ts=ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    return meta


def encode_dataset(ds: Dataset, implicit=False, little=True) -> bytes:
    """Raw dataset bytes (no preamble, no meta)."""
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian = little
    buf.is_implicit_VR = implicit
    pydicom.filewriter.write_dataset(buf, ds)
    return buf.getvalue()


def part10(meta: FileMetaDataset, raw_dataset: bytes, preamble: bytes = b"\0" * 128) -> bytes:
    """preamble + DICM + meta group + raw dataset bytes (kept exactly)."""
    assert len(preamble) == 128
    out = io.BytesIO()
    out.write(preamble)
    out.write(b"DICM")
    fb = pydicom.filebase.DicomFileLike(out)
    fb.is_little_endian = True
    fb.is_implicit_VR = False
    write_file_meta_info(fb, meta, enforce_standard=True)
    out.write(raw_dataset)
    return out.getvalue()


def dataset_file(ds: Dataset, path: Path, preamble: bytes = b"\0" * 128) -> bytes:
    raw = encode_dataset(ds)
    data = part10(ds.file_meta, raw, preamble)
    path.write_bytes(data)
    return raw


def element(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element; `length` may lie."""
    n = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr, n) + value


def ui(value: str) -> bytes:
    b = value.encode("ascii")
    return b + (b"\0" if len(b) % 2 else b"")


def key_elements(sop_class, sop_uid, study_uid, series_uid) -> bytes:
    return (element(0x0008, 0x0016, b"UI", ui(sop_class))
            + element(0x0008, 0x0018, b"UI", ui(sop_uid))
            + element(0x0020, 0x000D, b"UI", ui(study_uid))
            + element(0x0020, 0x000E, b"UI", ui(series_uid)))


def huge_length_dataset(sop_uid: str, declared: int = 0xFFFFFFF0) -> bytes:
    """Key UIDs, then (7FE0,0010) OB declaring `declared` bytes, 6 present."""
    return (key_elements(SECONDARY_CAPTURE, sop_uid, generate_uid(), generate_uid())
            + element(0x0010, 0x0010, b"PN", b"Huge^Len")
            + element(0x7FE0, 0x0010, b"OB", b"\x01\x02\x03\x04\x05\x06", length=declared))


# --------------------------------------------------------------------------
# pynetdicom
# --------------------------------------------------------------------------

def client_ssl_context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return ctx


def make_ae(calling: str, contexts=()) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = TIMEOUT
    ae.dimse_timeout = TIMEOUT
    ae.network_timeout = TIMEOUT
    ae.connection_timeout = TIMEOUT
    for ctx in contexts:
        if isinstance(ctx, tuple):
            ae.add_requested_context(ctx[0], ctx[1])
        else:
            ae.add_requested_context(ctx)
    if not contexts:
        ae.add_requested_context(Verification)
    return ae


def associate(port: int, calling: str, called: str = "BASTION", contexts=(), tls=None):
    """tls: None for plain, or an ssl.SSLContext."""
    ae = make_ae(calling, contexts)
    tls_args = (tls, "localhost") if tls is not None else None
    return ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)


def rejection(assoc):
    """(result, source, reason) of an A-ASSOCIATE-RJ, or None."""
    if not assoc.is_rejected:
        return None
    prim = assoc.acceptor.primitive
    return (prim.result, prim.result_source, prim.diagnostic)


def echo_status(port, calling, tls=None, called="BASTION"):
    """Status of one C-ECHO, or a string describing why there was none."""
    assoc = associate(port, calling, called, tls=tls)
    try:
        if not assoc.is_established:
            rj = rejection(assoc)
            return f"not established (rejection={rj}, aborted={assoc.is_aborted})"
        st = assoc.send_c_echo()
        return st.Status if "Status" in st else "no status"
    finally:
        if assoc.is_established:
            assoc.release()


@contextlib.contextmanager
def chunked_send():
    """Make pynetdicom send files as their raw dataset bytes (no re-encoding)."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def store_files(port, calling, files, tls=None, called="BASTION"):
    """Send Part 10 files byte-exactly (chunked mode) over one or more
    associations (at most 100 presentation contexts each). Returns
    {path: status or None}."""
    from pydicom.filereader import read_file_meta_info
    metas = {}
    for f in files:
        m = read_file_meta_info(str(f))
        metas[f] = (str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
    results = {}
    pending = list(files)
    while pending:
        batch, ctxs = [], set()
        for f in list(pending):
            c = metas[f]
            if c not in ctxs and len(ctxs) >= 100:
                continue
            ctxs.add(c)
            batch.append(f)
            pending.remove(f)
        assoc = associate(port, calling, called, contexts=sorted(ctxs), tls=tls)
        if not assoc.is_established:
            raise AssertionError(f"association refused: {rejection(assoc)}")
        try:
            with chunked_send():
                for f in batch:
                    if not assoc.is_established:  # aborted: the rest got no status
                        results[f] = None
                        continue
                    st = assoc.send_c_store(Path(f))
                    results[f] = st.Status if "Status" in st else None
        finally:
            if assoc.is_established:
                assoc.release()
    return results


def store_one(port, calling, path: Path, tls=None, called="BASTION"):
    """Status of one C-STORE of a Part 10 file sent byte-exactly, plus the
    response dataset (for the Error Comment)."""
    from pydicom.filereader import read_file_meta_info
    m = read_file_meta_info(str(path))
    ctx = (str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
    assoc = associate(port, calling, called, contexts=[ctx], tls=tls)
    if not assoc.is_established:
        raise AssertionError(f"association refused: {rejection(assoc)}")
    try:
        with chunked_send():
            st = assoc.send_c_store(Path(path))
        return (st.Status if "Status" in st else None), st
    finally:
        if assoc.is_established:
            assoc.release()


# --------------------------------------------------------------------------
# Raw upper layer PDUs (PS3.8 9.3)
# --------------------------------------------------------------------------

def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(calling: str, called: str = "BASTION", max_pdu: int = 16384) -> bytes:
    app_ctx = _item(0x10, b"1.2.840.10008.3.1.1.1")
    pres = _item(0x20, bytes([1, 0, 0, 0])
                 + _item(0x30, b"1.2.840.10008.1.1")
                 + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, struct.pack(">I", max_pdu))
                 + _item(0x52, IMPLEMENTATION_UID.encode()))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
            + b"\0" * 32 + app_ctx + pres + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def read_pdu(sock: socket.socket, timeout: float = 10.0):
    """(pdu type, body) or None when the peer closed the connection."""
    sock.settimeout(timeout)
    hdr = _recv_exact(sock, 6)
    if hdr is None:
        return None
    typ, _, length = struct.unpack(">BBI", hdr)
    body = _recv_exact(sock, length) if length else b""
    return typ, body


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except (ConnectionResetError, ssl.SSLError, OSError):
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


def read_abort(sock: socket.socket, timeout: float = 15.0):
    """Read until an A-ABORT arrives; return its (source, reason) fields
    (PS3.8 §9.3.8), or None when the connection closed without one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pdu = read_pdu(sock, timeout=max(0.1, deadline - time.monotonic()))
        if pdu is None:
            return None
        typ, body = pdu
        if typ == 0x07:
            return body[2], body[3]
    raise AssertionError("no A-ABORT within the timeout")


def ends_in_abort_or_close(sock: socket.socket, timeout: float = 15.0) -> str:
    """Read until an A-ABORT (0x07) arrives or the connection closes.
    Returns "abort", "close" or raises on timeout / anything else."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pdu = read_pdu(sock, timeout=max(0.1, deadline - time.monotonic()))
        except socket.timeout:
            break
        if pdu is None:
            return "close"
        if pdu[0] == 0x07:
            return "abort"
        if pdu[0] == 0x03:  # A-ASSOCIATE-RJ is also a refusal
            return "reject"
        # P-DATA etc.: keep reading
    raise AssertionError("server neither aborted nor closed the connection")


def wait_port(port: int, timeout: float = 60.0, proc=None, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"port {port} not accepting connections after {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def foreign_ca_and_client(out: Path, cn="FOREIGN") -> tuple[Path, Path, str]:
    """A CA we never told the server about, and a client cert it signed.
    Returns (client.crt, client.key, sha256 hex of the client DER)."""
    import datetime
    import hashlib
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign Test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    crt_path, key_path = out / "client.crt", out / "client.key"
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                         + ca.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    der = cert.public_bytes(serialization.Encoding.DER)
    return crt_path, key_path, hashlib.sha256(der).hexdigest()


@contextlib.contextmanager
def pynetdicom_reactor_race_fixed():
    """pynetdicom 3.0.4, acting as a pure SCU, has a check-then-act race: its
    reactor thread may take a pending C-FIND-RSP off the DIMSE queue while
    `send_c_find` is pausing it, and drop it as an unexpected message, so a
    correct, fast server looks as if it lost a match (seen in bench/query.py
    under load). Within this context the reactor thread of a *requestor*
    never takes messages: only for tests where no request is expected from
    the peer outside the send_c_*() generators (pynetdicom acting as SCP, as
    the retrieve tests' destinations do, needs the reactor)."""
    import threading

    from pynetdicom.association import Association
    from pynetdicom.dimse import DIMSEServiceProvider
    get_msg = DIMSEServiceProvider.get_msg

    def only_requestor_gets(self, block=False):
        t = threading.current_thread()
        if not block and isinstance(t, Association) and t.is_requestor:
            return None, None
        return get_msg(self, block)

    DIMSEServiceProvider.get_msg = only_requestor_gets
    try:
        yield
    finally:
        DIMSEServiceProvider.get_msg = get_msg
