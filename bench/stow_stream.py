#!/usr/bin/env python3
"""Large STOW-RS requests under the memory budget (issue 10, finding 2; not a
test).

For each size S MiB (default 64, 512, 1024): a fresh data dir and `bastion
serve` on its defaults (memory budget 384 MiB, 256 MiB per transfer), one
STOW-RS request of S one-MiB CT instances (one study), sent from a file so the
client holds nothing. Prints, per size, the HTTP status, how many instances
were stored, the server's peak RSS above its baseline (VmHWM) and the
throughput, as a markdown table. Before the body was streamed, a request over
256 MiB was refused whole with 503.

Usage: .cache/venv/bin/python bench/stow_stream.py [--bin target/release/bastion]
       [--sizes 64,512,1024]
"""
from __future__ import annotations

import argparse
import http.client
import json
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "interop"))
import helpers  # noqa: E402
from conftest import Server  # noqa: E402

PASSWORD = "correct horse battery staple 42"
BOUNDARY = "streamboundary0123456789"


def token(srv: Server) -> str:
    cmd = [str(srv.bin), "--data", str(srv.data)]
    subprocess.run([*cmd, "user", "add", "stower", "--role", "technologist", "--password-stdin"],
                   input=PASSWORD + "\n", text=True, capture_output=True, check=True, timeout=120)
    out = subprocess.run([*cmd, "token", "create", "--user", "stower", "--expires", "1d"],
                         text=True, capture_output=True, check=True, timeout=120).stdout
    return out.strip().splitlines()[-1]


def write_body(path: Path, n: int) -> int:
    """S instances of 1 MiB of pixels in one study, as one multipart body."""
    study = helpers.generate_uid()
    size = 0
    with open(path, "wb") as out:
        for i in range(n):
            ds = helpers.make_dataset(patient_name="Stream^Bench", patient_id="STREAM-BENCH",
                                      pixel_bytes=1 << 20, study_uid=study, seed_value=i)
            p = path.parent / "one.dcm"
            helpers.dataset_file(ds, p)
            part = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + p.read_bytes() + b"\r\n")
            out.write(part)
            size += len(part)
        tail = f"--{BOUNDARY}--\r\n".encode()
        out.write(tail)
        return size + len(tail)


def one_round(bin_: Path, mib: int, tmp: Path) -> dict:
    srv = Server(bin_, tmp / f"s{mib}")
    srv.init()
    srv.start(plain=False)
    try:
        helpers.wait_port(srv.http_port, 30, srv.proc)
        tok = token(srv)
        body = tmp / f"body-{mib}.multipart"
        length = write_body(body, mib)
        baseline = helpers.vm_hwm_kib(srv.pid)
        ctx = ssl.create_default_context(cafile=str(srv.data / "tls" / "ca.crt"))
        conn = http.client.HTTPSConnection("localhost", srv.http_port, context=ctx, timeout=3600)
        t0 = time.monotonic()
        with open(body, "rb") as f:
            conn.request("POST", "/dicomweb/studies", body=f, headers={
                "Authorization": f"Bearer {tok}", "Content-Length": str(length),
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                "Accept": "application/dicom+json"})
            r = conn.getresponse()
            doc = r.read()
        secs = time.monotonic() - t0
        conn.close()
        peak = helpers.vm_hwm_kib(srv.pid)
        stored = len(json.loads(doc).get("00081199", {}).get("Value", [])) if doc else 0
        return {"mib": mib, "status": r.status, "stored": stored, "baseline_mib": baseline / 1024,
                "above_mib": (peak - baseline) / 1024, "mib_s": length / 2**20 / secs}
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, default=REPO / "target" / "release" / "bastion")
    ap.add_argument("--sizes", default="64,512,1024")
    args = ap.parse_args()
    print("| request MiB | status | instances stored | baseline (start-up high-water) MiB | peak RSS above it MiB | MiB/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bastion-stow-") as d:
        for mib in (int(x) for x in args.sizes.split(",")):
            r = one_round(args.bin, mib, Path(d))
            print(f"| {r['mib']} | {r['status']} | {r['stored']} | {r['baseline_mib']:.0f} | "
                  f"{r['above_mib']:.0f} | {r['mib_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
