#!/usr/bin/env bash
# Writes, on standard output, a DCMTK storescu configuration that sends every
# DICOM file under the given files/folders AS STORED, compressed or not:
#
#   scripts/storescu-as-stored.sh /path/to/images > as-stored.cfg
#   storescu -xf as-stored.cfg AsStored +tls KEY CRT +cf CA ... +sd +r /path/to/images
#
# Why: DCMTK 3.6.7's storescu proposes only uncompressed transfer syntaxes
# unless a -x… flag names one compressed syntax, so from a mixed folder it
# silently skips (or converts) every file in another syntax, and exits 0.
# dcmsend proposes each file's own syntax but has no TLS. This proposes one
# presentation context per (SOP Class, Transfer Syntax) pair found in the
# files' meta information (read with DCMTK's dcmdump), so each file goes in
# its own syntax and is stored byte for byte.
#
# Exit status: 0; 1 when the files hold more than 128 pairs (the most one
# association may propose, PS3.8 §9.3.2.2): send the folder in parts.
set -euo pipefail
(($#)) || { echo "usage: $0 FILE-OR-FOLDER..." >&2; exit 2; }
DCMDUMP=${DCMDUMP:-dcmdump}

skipped=$(mktemp)
trap 'rm -f "$skipped"' EXIT
pairs=$(
    find "$@" -type f -print0 | while IFS= read -r -d '' f; do
        pair=$("$DCMDUMP" -q -Un +P 0002,0002 +P 0002,0010 "$f" 2>/dev/null \
            | sed -n 's/^(0002,00\(02\|10\)) UI \[\([0-9.]*\)\].*/\2/p' | paste -sd' ' || true)
        if [[ $(wc -w <<<"$pair") -eq 2 ]]; then
            echo "$pair"
        else
            echo "$f" >>"$skipped"
        fi
    done | sort -u
)
# Files without File Meta Information (SOP Class and Transfer Syntax) are
# not DICOM Part 10 files: storescu will skip them ("No presentation
# context"). Say which, so that nobody believes the whole folder went.
if [[ -s $skipped ]]; then
    n_skipped=$(wc -l <"$skipped")
    echo "$n_skipped file(s) without File Meta Information are left out (not Part 10; storescu will not send them):" >&2
    head -n 20 "$skipped" | sed 's/^/  /' >&2
    ((n_skipped <= 20)) || echo "  ..." >&2
fi
n=$(printf '%s\n' "$pairs" | grep -c . || true)
if ((n > 128)); then
    echo "$n (SOP Class, Transfer Syntax) pairs: more than the 128 presentation contexts of one association; send the folder in parts" >&2
    exit 1
fi
echo "# storescu configuration written by scripts/storescu-as-stored.sh: one"
echo "# presentation context per (SOP Class, Transfer Syntax) pair of the files."
echo "[[TransferSyntaxes]]"
printf '%s\n' "$pairs" | awk 'NF == 2 {print $2}' | sort -u | awk '{printf "[TS%d]\nTransferSyntax1 = %s\n", NR, $1}'
echo "[[PresentationContexts]]"
echo "[AsStoredContexts]"
printf '%s\n' "$pairs" | awk 'NF == 2' | awk -v list="$(printf '%s\n' "$pairs" | awk 'NF == 2 {print $2}' | sort -u | paste -sd' ')" '
    BEGIN { n = split(list, ts, " "); for (i = 1; i <= n; i++) key[ts[i]] = "TS" i }
    { printf "PresentationContext%d = %s\\%s\n", NR, $1, key[$2] }'
echo "[[Profiles]]"
echo "[AsStored]"
echo "PresentationContexts = AsStoredContexts"
