"""Deflate bombs (issue 10, finding 2), shared by tests/interop/test_bombs.py and
bench/bombs.py: a Deflated Explicit VR Little Endian instance (PS3.5 Annex A.5,
1.2.840.10008.1.2.1.99) whose Pixel Data is a run of zeros, 1.5 GiB inflated
(over the 1 GiB `max_inflated_bytes`) and ~1.5 MiB on the wire, sent in
parallel by pynetdicom (C-STORE) and over STOW-RS, while the server's peak RSS
(VmHWM) is read."""
from __future__ import annotations

import http.client
import json
import ssl
import struct
import threading
import time
import zlib
from pathlib import Path

from pydicom.uid import generate_uid

import helpers

DEFLATED = "1.2.840.10008.1.2.1.99"
BOUNDARY = "bombboundary0123456789"


def bomb_part10(inflated_bytes: int = 0x6000_0000) -> tuple[str, bytes]:
    """(SOP Instance UID, a Part 10 file): meta (not deflated), then the raw-deflated dataset:
    the four key UIDs, a name, and (7FE0,0010) OB of `inflated_bytes` zeros
    (default 1.5 GiB: refused whatever the budget, by `max_inflated_bytes`)."""
    uid = generate_uid()
    head = (helpers.key_elements(helpers.SECONDARY_CAPTURE, uid, generate_uid(), generate_uid())
            + helpers.element(0x0010, 0x0010, b"PN", b"Bomb^Deflate")
            + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes))
    z = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, no zlib header
    parts = [z.compress(head)]
    zeros = bytes(1 << 24)
    left = inflated_bytes
    while left > 0:
        n = min(left, len(zeros))
        parts.append(z.compress(zeros[:n]))
        left -= n
    parts.append(z.flush())
    meta = helpers.file_meta_for(helpers.SECONDARY_CAPTURE, uid, ts=DEFLATED)
    return uid, helpers.part10(meta, b"".join(parts))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def c_store(port: int, calling: str, path: Path):
    """(status or a string saying why there is none, seconds)."""
    t0 = time.monotonic()
    try:
        st, _ = helpers.store_one(port, calling, path)
    except Exception as e:  # noqa: BLE001 - reported as the outcome
        st = f"error: {e!r}"
    return st, time.monotonic() - t0


def stow(srv, token: str, body: bytes):
    """(HTTP status, headers, JSON or None, seconds) of one STOW-RS request."""
    t0 = time.monotonic()
    ctx = ssl.create_default_context(cafile=str(srv.data / "tls" / "ca.crt"))
    conn = http.client.HTTPSConnection("localhost", srv.http_port, context=ctx, timeout=120)
    try:
        conn.request("POST", "/dicomweb/studies", body=body, headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"',
            "Accept": "application/dicom+json"})
        r = conn.getresponse()
        data = r.read()
        headers = {k.lower(): v for k, v in r.getheaders()}
        try:
            doc = json.loads(data) if data else None
        except ValueError:
            doc = None
        return r.status, headers, doc, time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 - reported as the outcome
        return f"error: {e!r}", {}, None, time.monotonic() - t0
    finally:
        conn.close()


def multipart(file_bytes: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + file_bytes + f"\r\n--{BOUNDARY}--\r\n".encode())


def parallel(jobs):
    """Runs each zero-argument callable on its own thread; their results in order."""
    results = [None] * len(jobs)

    def run(i, job):
        results[i] = job()

    threads = [threading.Thread(target=run, args=(i, j), daemon=True) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def stow_failure_reasons(doc) -> list[int]:
    """FailureReason (0008,1197) of each FailedSOPSequence (0008,1198) item."""
    items = (doc or {}).get("00081198", {}).get("Value", [])
    return [it.get("00081197", {}).get("Value", [None])[0] for it in items]
