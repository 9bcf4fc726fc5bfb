#!/usr/bin/env bash
# Audit trail benchmark (not a test): `bastion audit verify` speed on a
# trail of N records (default 1,000,000) and its peak memory, so that
# "memory flat while verifying" is a number. The trail is generated with
# the hidden `bastion audit generate --records N` (synthetic store.stored
# events through the real append path: encryption, hash chain,
# checkpoints every 1000 records).
#
#   bench/audit.sh [N]            (release build: cargo build --release -p bastion)
#
# Ingest with auditing on versus off is not measured here: the trail cannot
# be switched off (it is not optional), see bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
BIN=${BASTION_BIN:-target/release/bastion}
[[ -x $BIN ]] || cargo build --release -p bastion
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
DATA=$WORK/data
"$BIN" --data "$DATA" init >/dev/null

t0=$(date +%s.%N)
"$BIN" --data "$DATA" audit generate --records "$N" >/dev/null
t1=$(date +%s.%N)
size=$(stat -c %s "$DATA/audit/records")

/usr/bin/time -v "$BIN" --data "$DATA" audit verify >"$WORK/verify.out" 2>"$WORK/verify.time"
t2=$(date +%s.%N)
records=$(grep -o '[0-9]* records' "$WORK/verify.out" | head -1 | cut -d' ' -f1)
rss=$(grep 'Maximum resident set size' "$WORK/verify.time" | awk '{print $NF}')
elapsed=$(grep 'Elapsed (wall clock)' "$WORK/verify.time" | awk '{print $NF}')

/usr/bin/time -v "$BIN" --data "$DATA" audit search --patient-id nobody >/dev/null 2>"$WORK/search.time"
srss=$(grep 'Maximum resident set size' "$WORK/search.time" | awk '{print $NF}')
selapsed=$(grep 'Elapsed (wall clock)' "$WORK/search.time" | awk '{print $NF}')

python3 - "$N" "$t0" "$t1" "$t2" "$size" "$records" "$rss" "$elapsed" "$srss" "$selapsed" <<'PY'
import sys
n, t0, t1, t2, size, records, rss, elapsed, srss, selapsed = sys.argv[1:]
def secs(s):
    parts = [float(p) for p in s.split(":")]
    v = 0.0
    for p in parts:
        v = v * 60 + p
    return v
gen = float(t1) - float(t0)
ver = secs(elapsed)
print(f"records generated   {int(n):>12,}  in {gen:8.1f} s  ({int(n)/gen:,.0f} appends/s)")
print(f"trail size          {int(size)/1e6:>12,.1f} MB ({int(size)/int(n):.0f} bytes/record)")
print(f"audit verify        {int(records):>12,}  in {ver:8.1f} s  ({int(records)/ver:,.0f} records/s), peak RSS {int(rss)/1024:.1f} MiB")
print(f"audit search (scan) {int(records):>12,}  in {secs(selapsed):8.1f} s, peak RSS {int(srss)/1024:.1f} MiB")
PY
