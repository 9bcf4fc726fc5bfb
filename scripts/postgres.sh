# shellcheck shell=bash
# A throwaway PostgreSQL cluster for the tests (issue 12): SOURCE this file
# (`. scripts/postgres.sh`), it is not run on its own.
#
# It starts PostgreSQL 15 (Debian's /usr/lib/postgresql/15/bin) in a fresh
# temp dir, listening on 127.0.0.1 at a free port with its socket in the temp
# dir; creates a least-privilege role `bastion_test` (LOGIN, no superuser,
# no CREATEDB/CREATEROLE) owning one database `bastion_test`, with a random
# password; and exports
#   BASTION_TEST_PG_URL      postgres://bastion_test@127.0.0.1:PORT/bastion_test
#   BASTION_TEST_PG_PASSWORD_FILE  a 0600 file holding the password (the Rust
#                            tests read it; the password is never printed nor put
#                            in the environment or a URL)
#   PGPASSFILE               the same password as a 0600 libpq file (pg_dump)
#   BASTION_TEST_PG_DATADIR  the cluster's data directory (for the plaintext check)
#   BASTION_TEST_PG_BIN      the PostgreSQL bin directory (pg_dump)
# The cluster is stopped and its directory removed when the shell exits
# (an EXIT trap chained after any trap already set).
#
# PostgreSQL refuses to run as root: as root, the cluster runs as the
# `postgres` system user (runuser); its data and socket directories are
# owned by that user, the password files by the caller (0600).

bastion_pg_start() {
    local bin=${BASTION_PG_BIN_DIR:-/usr/lib/postgresql/15/bin}
    if [[ ! -x $bin/initdb ]]; then
        echo "postgres.sh: $bin/initdb not found (install Debian's postgresql package)" >&2
        return 1
    fi
    local as=()
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || {
            echo "postgres.sh: running as root needs the postgres system user" >&2
            return 1
        }
        as=(runuser -u postgres --)
    fi
    BASTION_PG_TMP=$(mktemp -d /tmp/bastion-pg.XXXXXX)
    chmod 0711 "$BASTION_PG_TMP"
    mkdir -m 0700 "$BASTION_PG_TMP/data" "$BASTION_PG_TMP/sock"
    if ((${#as[@]})); then chown postgres: "$BASTION_PG_TMP/data" "$BASTION_PG_TMP/sock"; fi

    # The superuser authenticates by peer/trust on the socket only; TCP needs
    # a password (scram-sha-256) for every role.
    "${as[@]}" "$bin/initdb" -D "$BASTION_PG_TMP/data" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$BASTION_PG_TMP/initdb.log" 2>&1 || {
        cat "$BASTION_PG_TMP/initdb.log" >&2
        return 1
    }
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "${as[@]}" "$bin/pg_ctl" -D "$BASTION_PG_TMP/data" -w -t 60 -l "$BASTION_PG_TMP/data/server.log" \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $BASTION_PG_TMP/sock -c fsync=on -c max_connections=200" \
        start >/dev/null || {
        cat "$BASTION_PG_TMP/data/server.log" >&2
        return 1
    }
    BASTION_PG_AS=("${as[@]}")
    BASTION_PG_BIN=$bin
    # scripts/test.sh sets no other EXIT trap; one that was set is kept.
    local previous
    previous=$(trap -p EXIT)
    previous=${previous#"trap -- '"}
    previous=${previous%"' EXIT"}
    # shellcheck disable=SC2064
    trap "bastion_pg_stop${previous:+; $previous}" EXIT

    # A random password, written only to the 0600 passfile and sent on stdin.
    local password
    password=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
    (umask 077 && printf '127.0.0.1:%s:bastion_test:bastion_test:%s\n' "$port" "$password" >"$BASTION_PG_TMP/pgpass" &&
        printf '%s\n' "$password" >"$BASTION_PG_TMP/password")
    "${as[@]}" "$bin/psql" -q -h "$BASTION_PG_TMP/sock" -p "$port" -U postgres -d postgres \
        -v ON_ERROR_STOP=1 -v pw="$password" >/dev/null <<'SQL'
CREATE ROLE bastion_test LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'pw';
CREATE DATABASE bastion_test OWNER bastion_test;
REVOKE ALL ON DATABASE bastion_test FROM PUBLIC;
\connect bastion_test
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
    export BASTION_TEST_PG_URL="postgres://bastion_test@127.0.0.1:$port/bastion_test"
    export PGPASSFILE="$BASTION_PG_TMP/pgpass"
    export BASTION_TEST_PG_PASSWORD_FILE="$BASTION_PG_TMP/password"
    export BASTION_TEST_PG_DATADIR="$BASTION_PG_TMP/data"
    export BASTION_TEST_PG_BIN="$bin"
    echo "PostgreSQL test cluster: $BASTION_TEST_PG_URL (password in \$PGPASSFILE)"
}

bastion_pg_stop() {
    [[ -n ${BASTION_PG_TMP:-} && -d $BASTION_PG_TMP ]] || return 0
    "${BASTION_PG_AS[@]}" "$BASTION_PG_BIN/pg_ctl" -D "$BASTION_PG_TMP/data" -m immediate -w stop \
        >/dev/null 2>&1 || true
    rm -rf "$BASTION_PG_TMP"
    BASTION_PG_TMP=
}

bastion_pg_start
