#!/usr/bin/env bash
# Builds the release binary and runs the ingest benchmark (see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.cache/venv
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import pydicom, pynetdicom' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet pydicom==3.0.2 pynetdicom==3.0.4
fi
[[ -x /usr/bin/storescu ]] || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dcmtk; }
PYTHON=$VENV/bin/python ./scripts/fetch-corpus.sh
cargo build --release -p bastion 2>/dev/null || cargo build --release
mkdir -p bench/out
exec "$VENV/bin/python" bench/ingest.py "$@"
