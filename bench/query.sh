#!/usr/bin/env bash
# Builds the release binary, installs what the Query/Retrieve benchmark needs
# (DCMTK, Orthanc, the venv, the corpus) and runs bench/query.py (see
# bench/README.md). Needs root: Orthanc runs in a network namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "query.sh needs root (ip netns)" >&2; exit 1; }
VENV=.cache/venv
NETNS=bastion-bench
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import pydicom, pynetdicom' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet pydicom==3.0.2 pynetdicom==3.0.4
fi
need=()
[[ -x /usr/bin/findscu && -x /usr/bin/storescp ]] || need+=(dcmtk)
if [[ ! -x /usr/sbin/Orthanc ]]; then
    apt-cache policy orthanc | grep -q 'Candidate: [0-9]' || apt-get update -q
    need+=(orthanc)
fi
command -v ip >/dev/null || need+=(iproute2)
if (( ${#need[@]} )); then
    # policy-rc.d (present in Debian containers) keeps the packaged service from starting;
    # the bench runs its own Orthanc with its own config inside the namespace.
    timeout 1200 env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
PYTHON=$VENV/bin/python ./scripts/fetch-corpus.sh
timeout --foreground 3600 cargo build --release -p bastion -p bastion-bench-client
mkdir -p bench/out
# query.py deletes the namespace itself; this catches an interrupted run too
trap 'ip netns del "$NETNS" 2>/dev/null || true' EXIT
timeout --foreground 7200 "$VENV/bin/python" bench/query.py --netns "$NETNS" "$@"
