#!/usr/bin/env bash
# The supply-chain gate (issue 10), offline against the RustSec snapshot
# beside the checkout (../shared/advisory-db):
#   1. cargo deny check licenses bans advisories sources (deny.toml): fails
#      on any vulnerability, on an unmaintained or unsound crate outside the
#      ignore list (each with its reason), on a license that is not
#      permissive, on a second version of a crate outside the reasoned skip
#      list, on OpenSSL/native-tls, on a source other than crates.io;
#   2. with BASTION_CARGO_AUDIT=1, also cargo audit against the same
#      snapshot (--deny unmaintained --deny unsound; ignore list in
#      .cargo/audit.toml). Off by default: its cold build (gix, reqwest:
#      ~390 CPU-seconds) costs more than cargo-deny's and cargo-cyclonedx's
#      together, and cargo-deny's advisories check reads the same database
#      with the same ignore list;
#   3. a CycloneDX SBOM of the `bastion` binary: target/sbom/bastion.cdx.json.
#
# The tools are built once, pinned, and cached OUTSIDE the checkout in
# $BASTION_TOOLS (default ~/.cache/bastion-tools); an install is skipped when
# the cached binary has the pinned version.
#
# Environment:
#   BASTION_TOOLS        tool cache (default $HOME/.cache/bastion-tools)
#   BASTION_ADVISORY_DB  RustSec database snapshot
#                        (default: shared/advisory-db beside the checkout)
#   BASTION_CARGO_AUDIT  1: run cargo audit too (default 0)
#
# Exit status: 0 when every check passes, 1 otherwise (each check runs, so
# one run reports every problem), 2 without the advisory database.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOUT=$(pwd -P)

CARGO_AUDIT_VERSION=0.22.2
CARGO_DENY_VERSION=0.20.2
CARGO_CYCLONEDX_VERSION=0.5.9

TOOLS=${BASTION_TOOLS:-$HOME/.cache/bastion-tools}
WITH_AUDIT=${BASTION_CARGO_AUDIT:-0}
DB=${BASTION_ADVISORY_DB:-$(dirname "$CHECKOUT")/shared/advisory-db}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step() { printf '\n==> %s\n' "$*"; }

if [[ ! -d $DB/crates ]]; then
    echo "no RustSec advisory database at $DB (set BASTION_ADVISORY_DB)" >&2
    exit 2
fi

# install_tool CRATE VERSION: `cargo install --locked` into $TOOLS unless
# that version is already there (cargo's own install record says which).
install_tool() {
    local crate=$1 version=$2
    if [[ -x $TOOLS/bin/$crate ]] && grep -q "^\"$crate $version " "$TOOLS/.crates.toml" 2>/dev/null; then
        echo "$crate $version: cached in $TOOLS"
        return
    fi
    local start=$SECONDS
    # Its own target directory (removed afterwards): the workspace's
    # target/ is not touched and the cache stays small. A light release
    # profile (config overrides the tools' own: cargo-deny asks for fat LTO
    # and one codegen unit): the tools run for seconds, their build would
    # take minutes more.
    CARGO_TARGET_DIR="$TOOLS/build" \
        CARGO_PROFILE_RELEASE_LTO=false \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
        CARGO_PROFILE_RELEASE_DEBUG=false \
        CARGO_PROFILE_RELEASE_INCREMENTAL=false \
        cargo install --locked --quiet --force \
        --root "$TOOLS" "$crate" --version "$version"
    rm -rf "$TOOLS/build"
    echo "$crate $version: installed in $((SECONDS - start)) s"
}

step "supply chain 1/4: tools (cache $TOOLS)"
mkdir -p "$TOOLS"
install_tool cargo-deny "$CARGO_DENY_VERSION"
if [[ $WITH_AUDIT == 1 ]]; then
    install_tool cargo-audit "$CARGO_AUDIT_VERSION"
fi
install_tool cargo-cyclonedx "$CARGO_CYCLONEDX_VERSION"
export PATH="$TOOLS/bin:$PATH"

failed=()

step "supply chain 2/4: cargo deny check licenses bans advisories sources ($DB: $(head -n1 "$DB/SNAPSHOT.txt" 2>/dev/null || echo snapshot))"
# cargo-deny reads each advisory database from db-path (deny.toml) in a
# directory named after its URL, and takes the mtime of .git/FETCH_HEAD as
# the time it was fetched. The snapshot is read-only and not a git clone, so
# it is linked into target/ with that marker (staleness is not judged here,
# as with cargo audit --stale: the snapshot is refreshed in shared/).
DENY_DB=target/supply-chain/advisory-dbs/advisory-db-3157b0e258782691
rm -rf "$DENY_DB"
mkdir -p "$DENY_DB/.git"
ln -s "$DB/crates" "$DENY_DB/crates"
touch "$DENY_DB/.git/FETCH_HEAD"
# --offline keeps cargo-deny from fetching the advisory database; it also
# makes its `cargo metadata` offline, which reads the manifests of the
# crates of every platform, so those are fetched first (a no-op when cached).
cargo fetch --locked --quiet
if ! cargo deny --offline --locked check licenses bans advisories sources; then
    failed+=("cargo deny")
fi

if [[ $WITH_AUDIT == 1 ]]; then
    step "supply chain 3/4: cargo audit (offline, $DB)"
    # .cargo/audit.toml holds the ignore list (unmaintained crates we must keep).
    if ! cargo audit --db "$DB" --no-fetch --stale \
        --deny unmaintained --deny unsound; then
        failed+=("cargo audit")
    fi
else
    step "supply chain 3/4: cargo audit skipped (BASTION_CARGO_AUDIT=1 runs it; cargo deny checked the advisories)"
fi

step "supply chain 4/4: CycloneDX SBOM of the bastion binary"
mkdir -p target/sbom
# Every crate the binary is built from (--all: transitive ones too), for
# the host target; the timestamp is the commit's, so the same commit gives
# the same SBOM.
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
export SOURCE_DATE_EPOCH
# cargo-cyclonedx writes one file beside each workspace member's
# Cargo.toml: the binary's is kept in target/sbom/, the others removed.
SBOM_NAME=bastion-sbom.cdx
stray() { find . -path ./target -prune -o -path ./.cache -prune -o -name "$SBOM_NAME.json" -print; }
stray | xargs -r rm -f
if cargo cyclonedx --manifest-path crates/bastion/Cargo.toml --format json \
    --spec-version 1.5 --all --override-filename "$SBOM_NAME" &&
    mv -f "crates/bastion/$SBOM_NAME.json" target/sbom/bastion.cdx.json; then
    echo "SBOM: target/sbom/bastion.cdx.json ($(wc -c <target/sbom/bastion.cdx.json) bytes)"
else
    failed+=("cargo cyclonedx")
fi
stray | xargs -r rm -f

if ((${#failed[@]})); then
    printf '\nsupply chain: FAILED: %s\n' "${failed[*]}"
    exit 1
fi
printf '\nsupply chain: passed\n'
