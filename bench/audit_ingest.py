#!/usr/bin/env python3
"""Ingest with auditing on versus off, in one run (issue 5; not a test).

The audit trail cannot be switched off in Bastion, so "off" is a build of an
earlier commit without it (`--off-bin`; bench/audit.sh builds one in a git
worktree at the commit before the trail, inventory and detection existed).
Both binaries ingest the same 1,000 × 512 KiB CT instances with DCMTK
storescu over TLS, 1 and 4 associations, alternating which goes first, and
the paired median ratio on/off of the elapsed time is printed (target: the
trail costs < 5 %, i.e. throughput ratio ≥ 0.95).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402  (data set and the Bastion runner)

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--on-bin", default=str(REPO / "target" / "release" / "bastion"))
    ap.add_argument("--off-bin", required=True)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    ap.add_argument("--corpus", default=os.environ.get("BASTION_CORPUS",
                                                        str(REPO / ".cache" / "corpus")))
    args = ap.parse_args()
    files = ingest.generate(Path(args.out) / "instances", args.count, Path(args.corpus))
    mib = sum(f.stat().st_size for f in files) / 2**20
    bins = {"on": Path(args.on_bin), "off": Path(args.off_bin)}
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="bastion-audit-bench-", dir=args.out) as tmp:
        work = Path(tmp)
        for rnd in range(args.rounds):
            for parallel in (1, 4):
                for which in (["on", "off"] if rnd % 2 == 0 else ["off", "on"]):
                    r = ingest.run_bastion(bins[which], files, parallel, work)
                    res.setdefault((which, parallel), []).append(r)
                    print(f"round {rnd + 1} audit {which:3s} x{parallel}: "
                          f"{len(files) / r['secs']:.0f} inst/s, "
                          f"{r['cpu_ms_per_inst']:.2f} ms CPU/inst, "
                          f"peak RSS {r['rss_mib']:.0f} MiB", flush=True)
    print()
    print(f"{len(files)} instances, {mib:.1f} MiB; Bastion over TLS (mTLS device), DCMTK storescu")
    print()
    print("| audit trail | associations | inst/s (median) | CPU ms/inst (median) "
          "| paired median throughput ratio on/off |")
    print("|---|---|---|---|---|")
    for parallel in (1, 4):
        on, off = res[("on", parallel)], res[("off", parallel)]
        ratio = statistics.median(b["secs"] / a["secs"] for a, b in zip(on, off))
        for which, rs in (("on", on), ("off", off)):
            ips = statistics.median(len(files) / r["secs"] for r in rs)
            cpu = statistics.median(r["cpu_ms_per_inst"] for r in rs)
            print(f"| {which} | {parallel} | {ips:.0f} | {cpu:.2f} | "
                  f"{f'{ratio:.2f}' if which == 'on' else ''} |")


if __name__ == "__main__":
    main()
