"""Engines for the benchmarks (issue 12): Bastion on its embedded default
(SQLCipher index + encrypted local files) or scaled out (index on PostgreSQL,
encrypted blobs on an S3-compatible store, Garage).

`ScaleOut` starts a throwaway PostgreSQL 15 (scripts/postgres.sh, sourced by a
bash process that lives as long as the bench: closing its stdin stops and
removes the cluster) and a throwaway single-node Garage (scripts/garage.sh
start/stop), or takes both from the environment exactly as the interop tests
do (tests/interop/conftest.py `engine_args`): BASTION_TEST_INDEX_URL with the
password in PGPASSWORD, BASTION_TEST_STORE_URL with AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY. Every `bastion init` gets a schema and a key prefix of
its own, so that runs never see each other's rows or blobs. Passwords and
keys only travel in the environment of the bastion processes, never on a
command line or in the output.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("embedded", "scaleout")


def parse_engines(s: str) -> list[str]:
    """`embedded,scaleout` -> ["embedded", "scaleout"]; unknown names refused."""
    out = [e.strip() for e in s.split(",") if e.strip()]
    bad = [e for e in out if e not in ENGINES]
    if bad or not out:
        raise SystemExit(f"--engines: unknown {bad or s!r}; choose from {','.join(ENGINES)}")
    return list(dict.fromkeys(out))


class ScaleOut:
    """PostgreSQL + Garage for `bastion init --index-url ... --store-url ...`."""

    def __init__(self, work: Path):
        self.work = work
        self.pg_proc: subprocess.Popen | None = None
        self.garage_dir: Path | None = None
        self.env: dict[str, str] = {}
        self.index_url = os.environ.get("BASTION_TEST_INDEX_URL", "")
        self.store_url = os.environ.get("BASTION_TEST_STORE_URL", "")
        self.pg_bin = os.environ.get("BASTION_TEST_PG_BIN", "/usr/lib/postgresql/15/bin")
        self.schemas: list[str] = []
        self.pg_datadir: Path | None = None
        self.started: list[str] = []

    # -- start / stop -----------------------------------------------------
    def start(self) -> "ScaleOut":
        if self.index_url:
            if not os.environ.get("PGPASSWORD"):
                raise SystemExit("BASTION_TEST_INDEX_URL is set but PGPASSWORD is not")
            self.env["PGPASSWORD"] = os.environ["PGPASSWORD"]
        else:
            self._start_postgres()
        if self.store_url:
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                if not os.environ.get(k):
                    raise SystemExit(f"BASTION_TEST_STORE_URL is set but {k} is not")
                self.env[k] = os.environ[k]
        else:
            self._start_garage()
        return self

    def _start_postgres(self) -> None:
        # postgres.sh is sourced (it sets an EXIT trap that stops the cluster):
        # the shell prints what we need, then waits for its stdin to close.
        script = (". scripts/postgres.sh >&2 && printf '%s\\n%s\\n%s\\n' "
                  "\"$BASTION_TEST_PG_URL\" \"$BASTION_TEST_PG_PASSWORD_FILE\" "
                  "\"$BASTION_TEST_PG_DATADIR\" && cat >/dev/null")
        self.pg_proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)
        assert self.pg_proc.stdout is not None
        url = self.pg_proc.stdout.readline().strip()
        pwfile = self.pg_proc.stdout.readline().strip()
        self.pg_datadir = Path(self.pg_proc.stdout.readline().strip())
        if not url.startswith("postgres://") or not pwfile:
            self.stop()
            raise SystemExit("scripts/postgres.sh did not start PostgreSQL "
                             "(is Debian's postgresql package installed?)")
        self.index_url = url
        self.env["PGPASSWORD"] = Path(pwfile).read_text().strip()
        self.started.append("PostgreSQL 15 (scripts/postgres.sh)")

    def _start_garage(self) -> None:
        self.garage_dir = Path(tempfile.mkdtemp(prefix="bench-garage-", dir=self.work))
        r = subprocess.run([str(REPO / "scripts" / "garage.sh"), "start", str(self.garage_dir)],
                           cwd=REPO, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise SystemExit(f"scripts/garage.sh start failed:\n{r.stderr[-2000:]}")
        vals = {}
        for line in (self.garage_dir / "env").read_text().splitlines():
            k, _, v = line.partition("=")
            vals[k] = v.strip("'")
        self.store_url = vals["BASTION_TEST_S3_URL"]
        self.env["AWS_ACCESS_KEY_ID"] = vals["AWS_ACCESS_KEY_ID"]
        self.env["AWS_SECRET_ACCESS_KEY"] = vals["AWS_SECRET_ACCESS_KEY"]
        self.started.append("Garage 2.5 (scripts/garage.sh)")

    def stop(self) -> None:
        if self.garage_dir is not None:
            subprocess.run([str(REPO / "scripts" / "garage.sh"), "stop", str(self.garage_dir)],
                           cwd=REPO, capture_output=True, timeout=120)
            shutil.rmtree(self.garage_dir, ignore_errors=True)
            self.garage_dir = None
        if self.pg_proc is not None:
            if self.pg_proc.stdin:
                self.pg_proc.stdin.close()  # the shell's EXIT trap stops the cluster
            try:
                self.pg_proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.pg_proc.kill()
                self.pg_proc.wait()
            self.pg_proc = None

    def components_cpu_ms(self) -> tuple[float, float] | None:
        """CPU time (user + system, ms) used so far by the PostgreSQL cluster
        (postmaster, its live backends, and its reaped children) and by Garage,
        when this object started them; None otherwise."""
        if self.pg_datadir is None or self.garage_dir is None:
            return None
        try:
            post = int((self.pg_datadir / "postmaster.pid").read_text().split()[0])
            garage = int((self.garage_dir / "garage.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        pg = ga = 0
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited meanwhile
            pid, ppid = int(d.name), int(f[1])
            if pid == post or ppid == post:
                pg += int(f[11]) + int(f[12])
            if pid == post:
                pg += int(f[13]) + int(f[14])  # backends already exited
            if pid == garage:
                ga += int(f[11]) + int(f[12])
        tick = 1000.0 / os.sysconf("SC_CLK_TCK")
        return pg * tick, ga * tick

    # -- per server ---------------------------------------------------------
    def init_args(self) -> list[str]:
        """`bastion init` options: a fresh schema and a fresh key prefix."""
        schema = "b" + uuid.uuid4().hex[:20]
        self.schemas.append(schema)
        scheme, rest = self.store_url.split("://", 1)
        bucket, _, query = rest.partition("?")
        prefix = "b" + uuid.uuid4().hex[:20]
        return ["--index-url", self.index_url, "--index-schema", schema,
                "--store-url", f"{scheme}://{bucket.rstrip('/')}/{prefix}?{query}"]

    def process_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for bastion commands: credentials added."""
        return dict(base if base is not None else os.environ, **self.env)

    def schema_bytes(self, schema: str) -> int | None:
        """Size on disk of one index schema (tables, indexes, TOAST), via psql."""
        psql = Path(self.pg_bin) / "psql"
        if not psql.exists():
            return None
        sql = ("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
               "JOIN pg_namespace n ON n.oid = c.relnamespace "
               f"WHERE n.nspname = '{schema}' AND c.relkind IN ('r', 'm')")
        r = subprocess.run([str(psql), "-XAtq", "-d", self.index_url, "-c", sql],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PGPASSWORD=self.env.get("PGPASSWORD", "")))
        try:
            return int(r.stdout.strip())
        except ValueError:
            return None

    def drop_schema(self, schema: str) -> None:
        """Drop a finished run's schema (keeps the database small between rounds)."""
        psql = Path(self.pg_bin) / "psql"
        if psql.exists():
            subprocess.run([str(psql), "-XAtq", "-d", self.index_url, "-c",
                            f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'],
                           capture_output=True, timeout=120,
                           env=dict(os.environ, PGPASSWORD=self.env.get("PGPASSWORD", "")))
