#!/usr/bin/env python3
"""Deflate-bomb memory benchmark (issue 10, finding 2; not a test).

For each count N (default 1, 6, 16, 64): a fresh data dir and `bastion serve`,
4 registered plain devices and 2 STOW-RS users; a normal instance is stored to
warm up, then N deflate bombs (1.5 GiB of zeros in ~1.5 MiB, Deflated Explicit
VR LE) are sent at once, half by C-STORE (pynetdicom, devices in turn), half by
STOW-RS (users in turn) (`--route dimse|stow` for one route only). Prints, per
N, the server's peak RSS above its baseline (VmHWM after minus VmHWM before),
the outcomes, the slowest refusal, and whether a normal instance is stored
afterwards, as a markdown table.

Usage: .cache/venv/bin/python bench/bombs.py [--bin target/release/bastion]
       [--counts 1,6,16,64] [--route mix|dimse|stow]
"""
from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "interop"))
import bombs  # noqa: E402
import helpers  # noqa: E402
from conftest import Server  # noqa: E402

PASSWORD = "correct horse battery staple 42"
DEVICES = ("BOMB1", "BOMB2", "BOMB3", "BOMB4")


def token(srv: Server, name: str) -> str:
    cmd = [str(srv.bin), "--data", str(srv.data)]
    subprocess.run([*cmd, "user", "add", name, "--role", "technologist", "--password-stdin"],
                   input=PASSWORD + "\n", text=True, capture_output=True, check=True, timeout=120)
    out = subprocess.run([*cmd, "token", "create", "--user", name, "--expires", "1d"],
                         text=True, capture_output=True, check=True, timeout=120).stdout
    return out.strip().splitlines()[-1]


def normal(tmp: Path, name: str) -> tuple[str, Path]:
    ds = helpers.make_dataset(patient_name="Normal^After", patient_id="BOMB-OK")
    p = tmp / name
    helpers.dataset_file(ds, p)
    return str(ds.SOPInstanceUID), p


def one_round(bin_: Path, n: int, route: str, bomb: Path, tmp: Path) -> dict:
    srv = Server(bin_, tmp / f"n{n}-{route}")
    srv.init()
    srv.start(plain=True)
    try:
        helpers.wait_port(srv.http_port, 30, srv.proc)
        for ae in DEVICES:
            srv.device_add(ae, transport="plain", allow="echo,store")
        tokens = [token(srv, f"bomber{i}") for i in range(2)]
        _, p = normal(tmp, f"warm-{n}.dcm")
        assert helpers.store_one(srv.plain_port, DEVICES[0], p)[0] == helpers.SUCCESS
        status = bombs.stow(srv, tokens[0], bombs.multipart(normal(tmp, f"w2-{n}.dcm")[1].read_bytes()))[0]
        assert status == 200, status
        baseline = helpers.vm_hwm_kib(srv.pid)
        body = bombs.multipart(bomb.read_bytes())
        jobs = []
        for i in range(n):
            dimse = route == "dimse" or (route == "mix" and i % 2 == 0)
            if dimse:
                ae = DEVICES[i % len(DEVICES)]
                jobs.append(lambda ae=ae: ("C-STORE", bombs.c_store(srv.plain_port, ae, bomb)))
            else:
                tok = tokens[i % len(tokens)]
                jobs.append(lambda tok=tok: ("STOW-RS", bombs.stow(srv, tok, body)))
        results = bombs.parallel(jobs)
        alive = srv.proc.poll() is None
        peak = helpers.vm_hwm_kib(srv.pid) if alive else None
        outcomes = collections.Counter()
        slowest = 0.0
        for r in results:
            if r is None:
                outcomes["no answer"] += 1
                continue
            kind, out = r
            if kind == "C-STORE":
                st, secs = out
                outcomes[f"C-STORE {st:#06x}" if isinstance(st, int) else f"C-STORE {st}"] += 1
            else:
                st, headers, doc, secs = out
                reasons = bombs.stow_failure_reasons(doc)
                extra = f" {[hex(x) for x in reasons if x is not None]}" if reasons else ""
                if st == 503:
                    extra += f" Retry-After {headers.get('retry-after')}"
                outcomes[f"STOW-RS {st}{extra}"] += 1
            slowest = max(slowest, secs)
        after = "server died"
        if alive:
            _, p = normal(tmp, f"after-{n}.dcm")
            after = "stored" if helpers.store_one(srv.plain_port, DEVICES[1], p)[0] == 0 else "REFUSED"
        return {"n": n, "route": route, "baseline_mib": baseline / 1024,
                "above_mib": None if peak is None else (peak - baseline) / 1024,
                "outcomes": dict(outcomes), "slowest_s": slowest, "after": after}
    finally:
        try:
            srv.stop()
        except Exception as e:  # noqa: BLE001
            print(f"stop: {e}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, default=REPO / "target" / "release" / "bastion")
    ap.add_argument("--counts", default="1,6,16,64")
    ap.add_argument("--route", choices=("mix", "dimse", "stow"), default="mix")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bastion-bombs-") as d:
        tmp = Path(d)
        uid, data = bombs.bomb_part10()
        bomb = tmp / "bomb.dcm"
        bomb.write_bytes(data)
        print(f"bomb: {len(data) / 2**20:.2f} MiB on the wire, 1.50 GiB inflated", file=sys.stderr)
        print("| N | route | baseline MiB | peak above baseline MiB | outcomes | slowest refusal s | normal instance after |")
        print("|---|---|---|---|---|---|---|")
        for n in (int(x) for x in args.counts.split(",")):
            r = one_round(args.bin, n, args.route, bomb, tmp)
            above = "—" if r["above_mib"] is None else f"{r['above_mib']:.0f}"
            outcomes = ", ".join(f"{k} ×{v}" for k, v in sorted(r["outcomes"].items()))
            print(f"| {n} | {r['route']} | {r['baseline_mib']:.0f} | {above} | {outcomes} | "
                  f"{r['slowest_s']:.1f} | {r['after']} |", flush=True)


if __name__ == "__main__":
    main()
