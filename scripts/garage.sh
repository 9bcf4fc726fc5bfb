#!/usr/bin/env bash
# A throwaway single-node Garage (crates.io `garage`, an S3-compatible object
# store) on 127.0.0.1, for the object-store tests (issue 12). Never a mock.
#
#   scripts/garage.sh install        build garage 2.5.0 into ~/.cargo/bin when
#                                    missing (about 12 min on 2 cores, once per
#                                    machine; cached outside the checkout)
#   scripts/garage.sh start DIR      install if needed, then start a node with
#                                    its config and data in DIR (free loopback
#                                    ports, replication_factor 1, sqlite
#                                    metadata, fsync on), apply a layout,
#                                    create bucket bastion-test and a key
#                                    allowed --read --write on it only (no
#                                    --owner: least privilege); writes
#                                    DIR/env (KEY='VALUE' lines, for `set -a; source`: BASTION_TEST_S3_URL,
#                                    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
#                                    BASTION_GARAGE_DIR) and DIR/garage.pid
#   scripts/garage.sh stop DIR       stop that node (the pid in DIR/garage.pid)
#   scripts/garage.sh resume DIR     start the stopped node again (same config,
#                                    data, layout, bucket and key)
#
# Bounded: every wait polls at most 60 times, 0.5 s apart.
set -euo pipefail

GARAGE_VERSION=2.5.0
GARAGE=${GARAGE_BIN:-$HOME/.cargo/bin/garage}
BUCKET=bastion-test
REGION=garage

die() { echo "garage.sh: $*" >&2; exit 1; }

install_garage() {
    if [[ -x $GARAGE ]] && "$GARAGE" --version 2>/dev/null | grep -qF ":$GARAGE_VERSION "; then
        return
    fi
    echo "garage.sh: building garage $GARAGE_VERSION (cargo install --locked; about 12 min on 2 cores, once)" >&2
    nice -n 19 cargo install garage --version "$GARAGE_VERSION" --locked --quiet
    [[ -x $GARAGE ]] || die "cargo install garage did not produce $GARAGE"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

g() { "$GARAGE" -c "$DIR/garage.toml" "$@"; }

start_server() {
    # setsid: its own process group, so that a test run's ^C or a stop kills it cleanly
    setsid "$GARAGE" -c "$DIR/garage.toml" server >>"$DIR/garage.log" 2>&1 </dev/null &
    echo $! >"$DIR/garage.pid"
    local i
    for ((i = 0; i < 60; i++)); do
        if g status >/dev/null 2>&1; then
            return
        fi
        kill -0 "$(cat "$DIR/garage.pid")" 2>/dev/null || { tail -20 "$DIR/garage.log" >&2; die "garage exited at start"; }
        sleep 0.5
    done
    tail -20 "$DIR/garage.log" >&2
    die "garage did not answer within 30 s"
}

wait_s3() {
    # The S3 API answers (any HTTP status) once the layout is live.
    local i
    for ((i = 0; i < 60; i++)); do
        if curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/" 2>/dev/null; then
            return
        fi
        sleep 0.5
    done
    die "garage's S3 API did not answer within 30 s"
}

start() {
    install_garage
    mkdir -p "$DIR/meta" "$DIR/data"
    chmod 700 "$DIR"
    S3_PORT=$(free_port)
    local rpc_port admin_port secret token
    rpc_port=$(free_port)
    admin_port=$(free_port)
    secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    token=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    umask 077
    cat >"$DIR/garage.toml" <<EOF
metadata_dir = "$DIR/meta"
data_dir = "$DIR/data"
db_engine = "sqlite"
metadata_fsync = true
data_fsync = true
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$secret"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin_port"
admin_token = "$token"
EOF
    start_server
    local node
    node=$(g status 2>/dev/null | grep -oE '^[0-9a-f]{16}' | head -1)
    [[ -n $node ]] || { g status >&2 || true; die "no node id in garage status"; }
    g layout assign -z dc1 -c 1G "$node" >/dev/null
    g layout apply --version 1 >/dev/null
    g bucket create "$BUCKET" >/dev/null
    local out key_id key_secret
    out=$(g key create bastion-test-key)
    key_id=$(awk -F': *' '/^Key ID/ {print $2; exit}' <<<"$out")
    key_secret=$(awk -F': *' '/^Secret key/ {print $2; exit}' <<<"$out")
    [[ -n $key_id && -n $key_secret ]] || die "cannot read the new key from garage key create"
    g bucket allow --read --write "$BUCKET" --key bastion-test-key >/dev/null
    wait_s3
    # single-quoted: the URL holds '&' and '?' (none of the values holds a quote)
    cat >"$DIR/env" <<EOF
BASTION_TEST_S3_URL='s3://$BUCKET?endpoint=http://127.0.0.1:$S3_PORT&region=$REGION'
AWS_ACCESS_KEY_ID='$key_id'
AWS_SECRET_ACCESS_KEY='$key_secret'
BASTION_GARAGE_DIR='$DIR'
EOF
    echo "garage.sh: Garage $GARAGE_VERSION on 127.0.0.1:$S3_PORT (bucket $BUCKET) in $DIR" >&2
}

stop() {
    [[ -f $DIR/garage.pid ]] || return 0
    local pid i
    pid=$(cat "$DIR/garage.pid")
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 60; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$DIR/garage.pid"
}

resume() {
    [[ -f $DIR/garage.toml ]] || die "$DIR holds no garage.toml (run start first)"
    S3_PORT=$(sed -n 's/^api_bind_addr = "127.0.0.1:\([0-9]*\)"$/\1/p' "$DIR/garage.toml" | head -1)
    start_server
    wait_s3
}

cmd=${1:-}
case $cmd in
    install) install_garage ;;
    start | stop | resume)
        [[ -n ${2:-} ]] || die "usage: $0 $cmd DIR"
        DIR=$(cd "$2" && pwd)
        "$cmd"
        ;;
    *) die "usage: $0 install | start DIR | stop DIR | resume DIR" ;;
esac
