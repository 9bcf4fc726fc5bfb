#!/usr/bin/env python3
"""DICOMweb benchmark (not a test): `bastion serve` (HTTPS, bearer token) vs
Orthanc 1.10 with its DICOMweb plugin (Debian `orthanc-dicomweb`, plain HTTP,
inside the network namespace of bench/query.py), same 10,000-instance data set,
same client code, alternating, one run.

Orthanc runs over plain HTTP, the reference of issue 4: Orthanc 1.10.1 from
Debian crashes (SIGSEGV in a civetweb worker) on its first HTTPS connection
when `SslEnabled` is set, so a like-for-like TLS comparison is not possible
with it.

Measures (issue 4): QIDO-RS `/studies?PatientID=…` median / p95 over 200
queries (one keep-alive connection per block, every answer checked against
the expected studies), WADO-RS retrieval of the 100-instance study in MiB/s
(`multipart/related; type="application/dicom"`, body read and counted), and
STOW-RS of 500 fresh instances in instances/s (requests of 50 instances), and
prints a markdown table with the ratios Bastion/Orthanc. See bench/README.md.

The measuring client is this file: `dicomweb.py worker SPEC OUT` runs one
series with http.client (no third-party HTTP stack on either side) and writes
JSON, so that the Orthanc side can run it with `ip netns exec`.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import query as q  # noqa: E402  (data set, Orthanc set-up, process helpers)

REPO = q.REPO
STOW_N, STOW_BATCH = 500, 50


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Worker (runs inside the netns for Orthanc)
# --------------------------------------------------------------------------

def _conn(spec) -> http.client.HTTPConnection:
    if spec.get("ca"):
        ctx = ssl.create_default_context(cafile=spec["ca"])
        c = http.client.HTTPSConnection(spec["host"], spec["port"], context=ctx, timeout=120)
    else:
        c = http.client.HTTPConnection(spec["host"], spec["port"], timeout=120)
    c.connect()
    import socket
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def _headers(spec, extra=None) -> dict:
    h = {"Authorization": spec["auth"]}
    h.update(extra or {})
    return h


def w_qido(spec):
    c = _conn(spec)
    lat, wrong, errors, matches = [], 0, [], 0
    qs = spec["queries"]
    for i, qq in enumerate(qs[:spec["warmup"]] + qs):
        path = (f"{spec['root']}/studies?PatientID={urllib.parse.quote(qq['value'])}"
                "&includefield=StudyDate")
        t0 = time.perf_counter()
        c.request("GET", path, headers=_headers(spec, {"Accept": "application/dicom+json"}))
        r = c.getresponse()
        body = r.read()
        dt = time.perf_counter() - t0
        if i < spec["warmup"]:
            continue
        lat.append(dt)
        if r.status not in (200, 204):
            errors.append(f"status {r.status}: {body[:200]!r}")
            continue
        items = json.loads(body) if body else []
        uids = sorted(it.get("0020000D", {}).get("Value", [""])[0] for it in items)
        matches += len(uids)
        if uids != qq["expected"]:
            wrong += 1
    c.close()
    return {"lat": lat, "wrong": wrong, "errors": errors[:5], "n_errors": len(errors),
            "matches": matches}


def w_wado(spec):
    """WADO-RS of one study with curl (libcurl + OpenSSL: a client fast enough
    that the servers, not Python's ssl module, are measured)."""
    accept = 'multipart/related; type="application/dicom"'
    if spec.get("any_ts"):
        accept += "; transfer-syntax=*"
    scheme = "https" if spec.get("ca") else "http"
    cmd = ["curl", "-s", "-o", "/dev/null", "--tcp-nodelay",
           "-w", "%{http_code} %{size_download} %{time_total}",
           "-H", f"Authorization: {spec['auth']}", "-H", f"Accept: {accept}",
           f"{scheme}://{spec['host']}:{spec['port']}{spec['root']}/studies/{spec['study']}"]
    if spec.get("ca"):
        cmd[1:1] = ["--cacert", spec["ca"]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    code, size, secs = p.stdout.split()
    if code != "200":
        return {"error": f"status {code}"}
    return {"secs": float(secs), "bytes": int(size)}


def w_stow(spec):
    files = spec["files"]
    boundary = "benchboundary" + os.urandom(8).hex()
    bodies = []
    for i in range(0, len(files), spec["batch"]):
        parts = []
        for f in files[i:i + spec["batch"]]:
            parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                         + Path(f).read_bytes() + b"\r\n")
        bodies.append(b"".join(parts) + f"--{boundary}--\r\n".encode())
    c = _conn(spec)
    ct = f'multipart/related; type="application/dicom"; boundary={boundary}'
    failed, statuses = 0, []
    t0 = time.perf_counter()
    for b in bodies:
        c.request("POST", f"{spec['root']}/studies", body=b,
                  headers=_headers(spec, {"Content-Type": ct,
                                          "Accept": "application/dicom+json"}))
        r = c.getresponse()
        out = r.read()
        statuses.append(r.status)
        if r.status != 200:
            failed += 1
            if failed == 1:
                log(f"STOW status {r.status}: {out[:300]!r}")
    secs = time.perf_counter() - t0
    c.close()
    return {"secs": secs, "n": len(files), "statuses": statuses, "failed_requests": failed}


def worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        res = {"qido": w_qido, "wado": w_wado, "stow": w_stow}[spec["op"]](spec)
    except Exception as e:  # noqa: BLE001 -- reported to the driver
        res = {"error": f"{type(e).__name__}: {e}"}
    Path(out_path).write_text(json.dumps(res))


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

class WebBench(q.Bench):
    def run_web(self, spec: dict, in_netns: bool, timeout: float) -> dict:
        self.n += 1
        sp, op = self.work / f"wspec-{self.n}.json", self.work / f"wout-{self.n}.json"
        sp.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "worker", str(sp), str(op)]
        if in_netns:
            cmd = self.netns(cmd)
        try:
            p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=q.ENV)
        except subprocess.TimeoutExpired:
            return {"error": f"{spec['op']} timed out after {timeout} s"}
        if not op.exists():
            return {"error": f"worker rc={p.returncode}: {p.stderr.decode(errors='replace')[-1500:]}"}
        return json.loads(op.read_text())


def stow_set(out: Path, corpus: Path) -> list[str]:
    """500 fresh CT instances (new UIDs, 10 studies) for STOW, regenerated each run."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ds = pydicom.dcmread(str(corpus / "pydicom" / "test_files" / "CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    files = []
    for s in range(10):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientID, ds.PatientName = f"STOW{s:03d}", f"STOW^P{s}"
        for i in range(STOW_N // 10):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = i + 1
            p = out / f"{s:02d}-{i:03d}.dcm"
            ds.save_as(str(p), enforce_file_format=True)
            files.append(str(p))
    return files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "bastion"))
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    ap.add_argument("--corpus", default=os.environ.get("BASTION_CORPUS",
                                                        str(REPO / ".cache" / "corpus")))
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--netns", default="bastion-bench")
    ap.add_argument("--seed", type=int, default=3)
    # what q.Bench / q.Bench.setup_* read
    ap.add_argument("--max-pdu", type=int, default=16382)
    ap.add_argument("--nagle", action="store_true")
    ap.add_argument("--orthanc-storage-access", default="Always")
    ap.add_argument("--client", default="pynetdicom")
    ap.add_argument("--client-bin", default="")
    ap.add_argument("--dest-parse", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (ip netns)")
    m = q.generate(Path(args.out) / "qr", Path(args.corpus), args.seed)
    inst_dir = Path(args.out) / "qr" / "instances"
    qs = q.build_queries(m, args.queries, args.seed)["PatientID"]

    def _term(signum, frame):
        raise SystemExit(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)
    work = Path(tempfile.mkdtemp(prefix="web-run-", dir=args.out))
    stow_files = {srv: stow_set(work / f"stow-{srv}", Path(args.corpus))
                  for srv in ("bastion", "orthanc")}
    bench = WebBench(args, work)
    # Orthanc with the DICOMweb plugin: the config query.py writes, plus the plugin.
    orig_start = bench.start

    def start(cmd, logname, in_netns=False):
        if cmd and cmd[0] == "/usr/sbin/Orthanc":
            cfgp = Path(cmd[1])
            cfg = json.loads(cfgp.read_text())
            cfg["Plugins"] = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
            cfgp.write_text(json.dumps(cfg, indent=1))
        return orig_start(cmd, logname, in_netns)
    bench.start = start
    res: dict = {}
    try:
        bench.setup_bastion(inst_dir)
        bench.setup_orthanc(inst_dir)
        data = work / "bastion-data"
        pw = os.urandom(18).hex() + "Aa1!"
        subprocess.run([args.bin, "user", "add", "bench", "--role", "technologist",
                        "--password-stdin", "--data", str(data)], input=pw.encode(),
                       check=True, capture_output=True, timeout=120)
        tok = subprocess.run([args.bin, "token", "create", "--user", "bench", "--expires", "1d",
                              "--data", str(data)], check=True, capture_output=True,
                             timeout=120).stdout.decode().strip().splitlines()[-1]
        b_http = bench.b_http_port
        specs = {
            "bastion": {"host": "localhost", "port": b_http, "root": "/dicomweb",
                        "ca": str(bench.b_certs / "ca.crt"), "auth": f"Bearer {tok}"},
            "orthanc": {"host": "127.0.0.1", "port": 8042, "root": "/dicom-web",
                        "auth": "Basic " + base64.b64encode(
                            f"{bench.o_auth['user']}:{bench.o_auth['password']}".encode()
                        ).decode()},
        }
        in_ns = {"bastion": False, "orthanc": True}
        for b in range(args.blocks):
            for srv in (["bastion", "orthanc"] if b % 2 == 0 else ["orthanc", "bastion"]):
                r = bench.run_web(dict(specs[srv], op="qido", warmup=args.warmup,
                                       queries=qs[b::args.blocks]), in_ns[srv], 900)
                acc = res.setdefault(("qido", srv), {"lat": [], "wrong": 0, "errors": []})
                if "lat" not in r:
                    acc["errors"].append(r.get("error"))
                    log(f"QIDO {srv}: {r.get('error')}")
                    continue
                acc["lat"] += r["lat"]
                acc["wrong"] += r["wrong"]
                acc["errors"] += r["errors"]
                log(f"QIDO {srv:8s} block {b + 1}: median {statistics.median(r['lat']) * 1e3:.2f}"
                    f" ms, wrong {r['wrong']}, errors {r['n_errors']}")
        for rnd in range(args.rounds):
            for srv in (["bastion", "orthanc"] if rnd % 2 == 0 else ["orthanc", "bastion"]):
                r = bench.run_web(dict(specs[srv], op="wado", study=m["retrieve_study"],
                                       any_ts=srv == "bastion"), in_ns[srv], 600)
                res.setdefault(("wado", srv), []).append(r)
                log(f"WADO {srv:8s} round {rnd + 1}: " + (
                    f"{r['secs']:.3f} s, {r['bytes'] / 2**20:.1f} MiB body"
                    if "error" not in r else r["error"]))
        for srv in ("bastion", "orthanc"):
            r = bench.run_web(dict(specs[srv], op="stow", files=stow_files[srv],
                                   batch=STOW_BATCH), in_ns[srv], 1800)
            res[("stow", srv)] = r
            log(f"STOW {srv:8s}: " + (f"{r['secs']:.2f} s for {r['n']}, statuses "
                                      f"{sorted(set(r['statuses']))}"
                                      if "error" not in r else r["error"]))
    finally:
        bench.cleanup()
    report(res, m, args)
    shutil.rmtree(work, ignore_errors=True)


def report(res, m, args) -> None:
    mib = m["retrieve_file_bytes"] / 2**20
    print()
    print(f"Data: {m['instances']} instances; WADO study: {q.RETRIEVE_N} instances, {mib:.1f} MiB "
          f"of Part 10 files; STOW: {STOW_N} CT_small instances in requests of {STOW_BATCH}. "
          "Client: Python http.client (QIDO, STOW; one keep-alive connection per series), "
          "curl (WADO, time includes the TLS handshake). Bastion over "
          "HTTPS with a bearer token; Orthanc 1.10 + DICOMweb plugin over plain HTTP with "
          f"Basic auth in netns `{args.netns}`.")
    print()
    print("| measurement | Bastion (HTTPS) | Orthanc (HTTP) | ratio Bastion/Orthanc | target |")
    print("|---|---|---|---|---|")
    b, o = res.get(("qido", "bastion")), res.get(("qido", "orthanc"))

    def st(a, f):
        return f(a["lat"]) * 1e3 if a and a["lat"] else None
    bm, om = st(b, statistics.median), st(o, statistics.median)
    bp, op = st(b, lambda x: q.pct(x, 95)), st(o, lambda x: q.pct(x, 95))

    def cell(v):
        return "n/a" if v is None else f"{v:.2f}"
    print(f"| QIDO-RS /studies?PatientID median ms ({len(b['lat']) if b else 0}) | {cell(bm)} | "
          f"{cell(om)} | **{q.fmt_ratio(bm, om)}** | ≤ 0.5 |")
    print(f"| QIDO-RS p95 ms | {cell(bp)} | {cell(op)} | {q.fmt_ratio(bp, op)} | |")
    print(f"| QIDO-RS answers checked | {b['wrong'] if b else '-'} wrong, "
          f"{len(b['errors']) if b else '-'} errors | {o['wrong'] if o else '-'} wrong, "
          f"{len(o['errors']) if o else '-'} errors | | all right |")

    def wado(srv):
        rs = [r for r in res.get(("wado", srv), []) if "error" not in r]
        return mib / statistics.median(r["secs"] for r in rs) if rs else None
    bw, ow = wado("bastion"), wado("orthanc")
    print(f"| WADO-RS study ({q.RETRIEVE_N} instances) MiB/s | {cell(bw)} | {cell(ow)} "
          f"| **{q.fmt_ratio(bw, ow)}** | ≥ 1 |")

    def stow(srv):
        r = res.get(("stow", srv))
        return r["n"] / r["secs"] if r and "error" not in r and not r["failed_requests"] else None
    bs, os_ = stow("bastion"), stow("orthanc")
    print(f"| STOW-RS {STOW_N} instances, instances/s | {cell(bs)} | {cell(os_)} "
          f"| **{q.fmt_ratio(bs, os_)}** | ≥ 2 |")
    for srv in ("bastion", "orthanc"):
        for k in ("qido",):
            for e in (res.get((k, srv)) or {}).get("errors", [])[:3]:
                print(f"* {k} error, {srv}: {e}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
