#!/usr/bin/env bash
# Fetches the OHIF Viewer the browser tests serve (issue 11): the npm package
# @ohif/app at the pinned version, checked against its pinned sha512 (npm's
# "integrity"), unpacked OUTSIDE the checkout into a cache that survives
# clones (nothing of OHIF is committed):
#
#   $BASTION_OHIF_CACHE/<version>/package/dist/index.html
#
# (default cache ~/.cache/bastion-ohif). Idempotent: an unpacked copy with
# its stamp is used as it is; the tarball is kept and re-checked. The last
# line printed is the package directory, for `bastion serve --ohif-dir`.
set -euo pipefail

OHIF_VERSION=3.13.2
OHIF_INTEGRITY=sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==

CACHE=${BASTION_OHIF_CACHE:-$HOME/.cache/bastion-ohif}
DIR=$CACHE/$OHIF_VERSION
TGZ=$CACHE/ohif-app-$OHIF_VERSION.tgz
STAMP=$DIR/.unpacked

integrity_of() { printf 'sha512-%s' "$(openssl dgst -sha512 -binary "$1" | base64 -w0)"; }

mkdir -p "$CACHE"
if [[ -f $STAMP && "$(cat "$STAMP")" == "$OHIF_INTEGRITY" && -f $DIR/package/dist/index.html ]]; then
    echo "ohif: @ohif/app $OHIF_VERSION cached in $DIR" >&2
    echo "$DIR/package"
    exit 0
fi
if [[ ! -f $TGZ || "$(integrity_of "$TGZ")" != "$OHIF_INTEGRITY" ]]; then
    echo "ohif: downloading @ohif/app $OHIF_VERSION from the npm registry" >&2
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack "@ohif/app@$OHIF_VERSION" --silent >/dev/null)
    mv "$tmp/ohif-app-$OHIF_VERSION.tgz" "$TGZ"
    rm -rf "$tmp"
fi
got=$(integrity_of "$TGZ")
if [[ "$got" != "$OHIF_INTEGRITY" ]]; then
    echo "ohif: $TGZ has integrity $got, expected $OHIF_INTEGRITY: refusing it" >&2
    rm -f "$TGZ"
    exit 1
fi
rm -rf "$DIR"
mkdir -p "$DIR"
tar -xzf "$TGZ" -C "$DIR"
[[ -f $DIR/package/dist/index.html ]] || { echo "ohif: no dist/index.html in the package" >&2; exit 1; }
echo "$OHIF_INTEGRITY" >"$STAMP"
echo "ohif: @ohif/app $OHIF_VERSION unpacked in $DIR" >&2
echo "$DIR/package"
