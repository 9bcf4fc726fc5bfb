#!/usr/bin/env bash
# The whole test suite: lint, build, Rust tests, then the interop tests
# (DCMTK and pynetdicom against a real `bastion serve`, on the pinned corpus).
# Idempotent and non-interactive (works with CI=true and no terminal).
set -euo pipefail
cd "$(dirname "$0")/.."

# `--full`: also the long runs that do not fit CI's budget (every fuzz
# target FUZZ_LONG_SECONDS, default 600 s, after the tests). Other
# arguments go to pytest.
FULL=0
if [[ "${1:-}" == "--full" ]]; then
    FULL=1
    shift
fi

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

VENV=.cache/venv
PY_PACKAGES=(pydicom==3.0.2 pynetdicom==3.0.4 pytest==9.2.0 cryptography==50.0.2 dicomweb-client==0.61.2 requests==2.34.2)

step() { printf '\n==> %s\n' "$*"; }

step "1/10 system packages (DCMTK, cmake, nasm, g++, chromium, node, Orthanc)"
need=()
[[ -x /usr/bin/storescu && -x /usr/bin/echoscu && -x /usr/bin/storescp ]] || need+=(dcmtk)
# PostgreSQL 15 for the index engine's conformance suite (scripts/postgres.sh)
[[ -x /usr/lib/postgresql/15/bin/initdb ]] || need+=(postgresql)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
# the sandboxed decoders' C/C++ sources: CharLS (JPEG-LS, C++) and
# libjpeg-turbo 3.1 (12-bit JPEG; nasm for its SIMD code)
command -v nasm >/dev/null 2>&1 || need+=(nasm)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v curl >/dev/null 2>&1 || need+=(curl)
{ [[ -x /usr/sbin/rsyslogd ]] && compgen -G "/usr/lib/*/rsyslog/lmnsd_gtls.so" >/dev/null; } || need+=(rsyslog rsyslog-gnutls)
command -v jing >/dev/null 2>&1 || need+=(jing)
# Orthanc 1.10 and its DICOMweb plugin, a peer in a network namespace
# (tests/interop/test_orthanc.py; `ip` from iproute2)
[[ -x /usr/sbin/Orthanc ]] || need+=(orthanc)
[[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || need+=(orthanc-dicomweb)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# the OHIF tarball's sha512 check (scripts/fetch-ohif.sh)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# the web UI's browser tests: Debian's chromium (never a downloaded browser), node + npm
[[ -x /usr/bin/chromium ]] || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if ((${#need[@]})); then
    SUDO=
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; fi
    echo "installing: ${need[*]}"
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
else
    echo "dcmtk, cmake and nasm present"
fi

step "2/10 python venv ($VENV) and tests/ui node modules"
if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" - "${PY_PACKAGES[@]}" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PYEOF
then
    "$VENV/bin/python" -m pip install --quiet "${PY_PACKAGES[@]}"
fi
"$VENV/bin/python" -c 'import pydicom, pynetdicom, pytest, cryptography, dicomweb_client, requests; print("pydicom", pydicom.__version__, "pynetdicom", pynetdicom.__version__, "pytest", pytest.__version__, "dicomweb-client", dicomweb_client.__version__)'

# playwright-core for the browser tests (pinned in tests/ui/package-lock.json;
# it drives /usr/bin/chromium and downloads no browser)
if [[ ! -d tests/ui/node_modules/playwright-core ]]; then
    (cd tests/ui && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund)
fi

step "3/10 test corpus, and the OHIF Viewer the browser tests serve (cached outside the checkout)"
PYTHON=$VENV/bin/python ./scripts/fetch-corpus.sh
BASTION_OHIF_DIR=$(./scripts/fetch-ohif.sh)
export BASTION_OHIF_DIR

step "4/10 cargo fmt + clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "5/10 Garage (S3-compatible object store) for the object-store tests: a throwaway node on 127.0.0.1"
# Built once per machine into ~/.cargo/bin (about 12 min on 2 cores); the
# node lives in a temp dir and stops when this script exits. Its env
# (BASTION_TEST_S3_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# BASTION_GARAGE_DIR) makes the S3 conformance tests run instead of SKIP.
GARAGE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/bastion-garage.XXXXXX")
trap './scripts/garage.sh stop "$GARAGE_DIR"; rm -rf "$GARAGE_DIR"' EXIT
./scripts/garage.sh start "$GARAGE_DIR"
set -a
# shellcheck disable=SC1091
source "$GARAGE_DIR/env"
set +a

step "6/10 cargo build + cargo test (a throwaway PostgreSQL 15 for the index conformance suite)"
cargo build --workspace
# Starts a cluster on 127.0.0.1 in a temp dir, exports BASTION_TEST_PG_URL
# (password in a 0600 file, never printed) and removes it at exit.
# shellcheck source=scripts/postgres.sh
. scripts/postgres.sh
cargo test --workspace

step "7/10 supply chain: cargo deny (advisories offline, licenses, bans, sources), CycloneDX SBOM"
./scripts/supply-chain.sh

step "8/10 fuzz smoke (every target ~10 s, nightly + cargo-fuzz cached outside the checkout)"
./scripts/fuzz.sh smoke

step "9/10 interop tests (pytest tests/interop)"
BASTION_BIN=target/debug/bastion BASTION_CORPUS=.cache/corpus \
    "$VENV/bin/python" -m pytest tests/interop -v -p no:cacheprovider "$@"
# The same ingest, query/retrieve, DICOMweb, CLI and large-instance tests
# again on the scale-out engines (issue 12): every server's index on the
# throwaway PostgreSQL (a schema per server) and its blobs in the Garage
# bucket (a key prefix per server). The password goes to this pytest run's
# environment only, never printed.
step "10/10 interop tests again, index on PostgreSQL and blobs on Garage (S3)"
PGPASSWORD=$(cat "$BASTION_TEST_PG_PASSWORD_FILE") BASTION_TEST_INDEX_URL=$BASTION_TEST_PG_URL \
    BASTION_TEST_STORE_URL=$BASTION_TEST_S3_URL \
    BASTION_BIN=target/debug/bastion BASTION_CORPUS=.cache/corpus \
    "$VENV/bin/python" -m pytest tests/interop/test_find.py tests/interop/test_dicomweb.py \
    tests/interop/test_retrieve.py tests/interop/test_archive.py tests/interop/test_interop.py \
    tests/interop/test_cli.py tests/interop/test_users.py tests/interop/test_spill.py \
    -q -p no:cacheprovider "$@"

if ((FULL)); then
    step "full: long fuzz runs (${FUZZ_LONG_SECONDS:-600} s per target)"
    ./scripts/fuzz.sh long "${FUZZ_LONG_SECONDS:-600}"
fi

step "all tests passed"
