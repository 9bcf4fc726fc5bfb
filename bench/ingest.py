#!/usr/bin/env python3
"""Ingest benchmark (not a test): DCMTK storescu -> bastion serve (TLS) vs
DCMTK storescp (plain, no index/encryption/fsync), alternating, >= 3 rounds,
over 1 and 4 parallel associations. With `--engines embedded,scaleout`,
Bastion runs twice per round: on its embedded default and with its index on
PostgreSQL and its blobs on Garage (bench/engines.py), paired in the same run.
See bench/README.md."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "interop"))
import helpers  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from engines import ScaleOut, parse_engines  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1")
TARGET_BYTES = 512 * 1024


def generate(out: Path, n: int, corpus: Path) -> list[Path]:
    files = sorted(out.glob("ct-*.dcm"))
    if len(files) == n:
        return files
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    src = pydicom.dcmread(str(corpus / "pydicom" / "test_files" / "CT_small.dcm"))
    # 512 x 512 x 16 bit = 512 KiB: tile the 128 x 128 source image
    px = src.PixelData
    rows_src, cols = src.Rows, src.Columns
    tiled = b"".join(px[r * cols * 2:(r + 1) * cols * 2] * 4 for r in range(rows_src)) * 4
    study = generate_uid()
    series = generate_uid()
    for i in range(n):
        ds = src.copy()
        ds.Rows, ds.Columns = 512, 512
        ds.PixelData = tiled[:TARGET_BYTES]
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        p = out / f"ct-{i:05d}.dcm"
        ds.save_as(str(p), enforce_file_format=True)
    return sorted(out.glob("ct-*.dcm"))


def cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks * 1000.0 / os.sysconf("SC_CLK_TCK")


def send(port: int, files: list[Path], parallel: int, tls: list[str], aet: str, aec: str) -> float:
    chunks = [files[i::parallel] for i in range(parallel)]
    t0 = time.monotonic()
    procs = [subprocess.Popen(["/usr/bin/storescu", "-aet", aet, "-aec", aec, *tls,
                               "127.0.0.1", str(port), *map(str, c)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
             for c in chunks]
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"storescu failed:\n{out.decode(errors='replace')[-3000:]}")
    return time.monotonic() - t0


def run_bastion(binary: Path, files, parallel, work: Path,
                scaleout: ScaleOut | None = None) -> dict:
    """One fresh Bastion; `scaleout`: its index in a fresh PostgreSQL schema
    and its blobs under a fresh Garage key prefix."""
    data = work / "bastion-data"
    shutil.rmtree(data, ignore_errors=True)
    env = scaleout.process_env() if scaleout else None
    extra = scaleout.init_args() if scaleout else []

    def cli(*a):
        p = subprocess.run([str(binary), *a], capture_output=True, timeout=300, env=env)
        if p.returncode != 0:
            raise SystemExit(f"bastion {a[0]} failed:\n{p.stderr.decode(errors='replace')[-2000:]}")
    cli("init", "--data", str(data), *extra)
    cli("device", "add", "--data", str(data), "--ae", "BENCH", "--network", "127.0.0.1/32",
        "--transport", "mtls", "--allow", "echo,store")
    certs = work / "certs"
    shutil.rmtree(certs, ignore_errors=True)
    cli("cert", "issue", "--data", str(data), "--ae", "BENCH", "--out", str(certs))
    port = helpers.free_port()
    log = open(work / "bastion.log", "ab")
    proc = subprocess.Popen([str(binary), "serve", "--data", str(data),
                             "--dicom-addr", f"127.0.0.1:{port}", "--http-addr", "off"],
                            stdout=log, stderr=log, env=env)
    try:
        helpers.wait_port(port, 60, proc)
        c0 = cpu_ms(proc.pid)
        tls = ["+tls", str(certs / "client.key"), str(certs / "client.crt"), "-pw",
               "+cf", str(certs / "ca.crt")]
        secs = send(port, files, parallel, tls, "BENCH", "BASTION")
        cpu = cpu_ms(proc.pid) - c0
        rss = helpers.vm_hwm_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if scaleout:
            scaleout.drop_schema(scaleout.schemas[-1])
    return {"secs": secs, "cpu_ms_per_inst": cpu / len(files), "rss_mib": rss / 1024}


def run_storescp(files, parallel, work: Path) -> dict:
    out = work / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = helpers.free_port()
    proc = subprocess.Popen(["/usr/bin/storescp", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        helpers.wait_port(port, 30, proc)
        c0 = cpu_ms(proc.pid)
        secs = send(port, files, parallel, [], "BENCH", "STORESCP")
        cpu = cpu_ms(proc.pid) - c0
        rss = helpers.vm_hwm_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(out, ignore_errors=True)
    return {"secs": secs, "cpu_ms_per_inst": cpu / len(files), "rss_mib": rss / 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "bastion"))
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    ap.add_argument("--corpus", default=os.environ.get("BASTION_CORPUS", str(REPO / ".cache" / "corpus")))
    ap.add_argument("--engines", default="embedded",
                    help="Bastion engines, comma-separated: embedded (SQLCipher index + local "
                         "files) and/or scaleout (index on PostgreSQL, blobs on Garage; see "
                         "bench/engines.py). Default: embedded")
    ap.add_argument("--no-storescp", action="store_true", help="skip the DCMTK storescp rows")
    args = ap.parse_args()
    engines = parse_engines(args.engines)
    servers = [{"embedded": "bastion", "scaleout": "scaleout"}[e] for e in engines]
    if not args.no_storescp:
        servers.append("storescp")
    files = generate(Path(args.out) / "instances", args.count, Path(args.corpus))
    mib = sum(f.stat().st_size for f in files) / 2**20
    print(f"{len(files)} instances, {mib:.1f} MiB total", flush=True)
    results = {}  # (server, parallel) -> [dict per round]
    with tempfile.TemporaryDirectory(prefix="bastion-bench-", dir=args.out) as tmp:
        work = Path(tmp)
        so = ScaleOut(work) if "scaleout" in servers else None
        try:
            if so:
                so.start()
                print(f"scale-out engines: {', '.join(so.started) or 'from the environment'}",
                      flush=True)
            for rnd in range(args.rounds):
                for parallel in (1, 4):
                    # alternate the order each round
                    order = servers if rnd % 2 == 0 else servers[::-1]
                    for server in order:
                        if server == "bastion":
                            r = run_bastion(Path(args.bin), files, parallel, work)
                        elif server == "scaleout":
                            c0 = so.components_cpu_ms()
                            r = run_bastion(Path(args.bin), files, parallel, work, so)
                            c1 = so.components_cpu_ms()
                            if c0 is not None and c1 is not None:
                                r["pg_cpu_ms_per_inst"] = (c1[0] - c0[0]) / len(files)
                                r["garage_cpu_ms_per_inst"] = (c1[1] - c0[1]) / len(files)
                        else:
                            r = run_storescp(files, parallel, work)
                        results.setdefault((server, parallel), []).append(r)
                        extra = (f", PostgreSQL {r['pg_cpu_ms_per_inst']:.2f} + Garage "
                                 f"{r['garage_cpu_ms_per_inst']:.2f} ms CPU/inst"
                                 if "pg_cpu_ms_per_inst" in r else "")
                        print(f"round {rnd + 1} {server:8s} x{parallel}: "
                              f"{len(files) / r['secs']:.0f} inst/s, {mib / r['secs']:.1f} MiB/s, "
                              f"{r['cpu_ms_per_inst']:.2f} ms CPU/inst{extra}, "
                              f"peak RSS {r['rss_mib']:.0f} MiB", flush=True)
        finally:
            if so:
                so.stop()
    names = {"bastion": "bastion embedded (TLS)", "scaleout": "bastion scale-out (TLS; PostgreSQL + Garage)",
             "storescp": "storescp (plain)"}

    def paired(a: str, b: str, parallel: int):
        """Median over rounds of throughput(a) / throughput(b), same round."""
        ra, rb = results.get((a, parallel)), results.get((b, parallel))
        if not ra or not rb:
            return ""
        return f"{statistics.median(xb['secs'] / xa['secs'] for xa, xb in zip(ra, rb)):.2f}"
    print()
    print("| server | associations | instances/s (median) | MiB/s (median) | CPU ms/instance (median) "
          "| peak RSS MiB (max) | paired median ratio Bastion/storescp "
          "| paired median ratio scale-out/embedded |")
    print("|---|---|---|---|---|---|---|---|")
    for parallel in (1, 4):
        for server in servers:
            rs = results[(server, parallel)]
            ips = statistics.median(len(files) / r["secs"] for r in rs)
            mibs = statistics.median(mib / r["secs"] for r in rs)
            cpu = statistics.median(r["cpu_ms_per_inst"] for r in rs)
            cpu_s = f"{cpu:.2f}"
            pg = [r["pg_cpu_ms_per_inst"] for r in rs if "pg_cpu_ms_per_inst" in r]
            ga = [r["garage_cpu_ms_per_inst"] for r in rs if "garage_cpu_ms_per_inst" in r]
            if pg and ga:
                cpu_s += (f" (+ PostgreSQL {statistics.median(pg):.2f}"
                          f" + Garage {statistics.median(ga):.2f})")
            rss = max(r["rss_mib"] for r in rs)
            vs_scp = paired(server, "storescp", parallel) if server != "storescp" else ""
            vs_emb = paired(server, "bastion", parallel) if server == "scaleout" else ""
            print(f"| {names[server]} | {parallel} | {ips:.0f} | {mibs:.1f} | {cpu_s} | {rss:.0f} "
                  f"| {vs_scp} | {vs_emb} |")


if __name__ == "__main__":
    main()
