#!/usr/bin/env bash
# Builds the release binary, installs what the DICOMweb benchmark needs (DCMTK,
# Orthanc and its DICOMweb plugin, the venv, the corpus) and runs
# bench/dicomweb.py (see bench/README.md). Needs root: Orthanc runs in a
# network namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "dicomweb.sh needs root (ip netns)" >&2; exit 1; }
VENV=.cache/venv
NETNS=bastion-bench
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import pydicom, pynetdicom' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet pydicom==3.0.2 pynetdicom==3.0.4
fi
need=()
[[ -x /usr/bin/storescu && -x /usr/bin/storescp ]] || need+=(dcmtk)
[[ -x /usr/sbin/Orthanc ]] || need+=(orthanc)
[[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || need+=(orthanc-dicomweb)
command -v ip >/dev/null || need+=(iproute2)
if (( ${#need[@]} )); then
    apt-cache policy orthanc-dicomweb | grep -q 'Candidate: [0-9]' || apt-get update -q
    timeout 1200 env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
PYTHON=$VENV/bin/python ./scripts/fetch-corpus.sh
timeout --foreground 3600 cargo build --release -p bastion
mkdir -p bench/out
trap 'ip netns del "$NETNS" 2>/dev/null || true' EXIT
timeout --foreground 7200 "$VENV/bin/python" bench/dicomweb.py --netns "$NETNS" "$@"
