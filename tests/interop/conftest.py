"""Fixtures: the bastion binary and a Server helper that runs `bastion serve`.

Every wait is bounded and every subprocess has a timeout. The server's
stderr goes to a log file that is printed when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import helpers  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CLI_TIMEOUT = 120
READY_TIMEOUT = 60
STOP_TIMEOUT = 15


def _bin() -> Path:
    p = Path(os.environ.get("BASTION_BIN", "target/debug/bastion"))
    if not p.is_absolute():
        p = REPO / p
    return p


@pytest.fixture(scope="session")
def bastion_bin() -> Path:
    p = _bin()
    if not p.exists():
        pytest.fail(f"bastion binary not found at {p} (set BASTION_BIN or run cargo build)")
    return p


@pytest.fixture(scope="session")
def corpus_root() -> Path:
    import corpus
    root = corpus.corpus_root()
    if not (root / "pydicom").is_dir():
        pytest.fail(f"corpus missing at {root}: run scripts/fetch-corpus.sh")
    return root


def engine_args(base: Path) -> list[str]:
    """`bastion init` options for the engines under test (issue 12). By
    default none: the embedded SQLite index and local encrypted store.
    scripts/test.sh's second interop pass sets BASTION_TEST_INDEX_URL (a
    PostgreSQL URL; the password in PGPASSWORD): each server's index in a
    schema of its own; and BASTION_TEST_STORE_URL (its Garage bucket): each
    server's blobs under a key prefix of their own, so that one server's
    orphan sweep never sees another's blobs."""
    args = []
    pg = os.environ.get("BASTION_TEST_INDEX_URL", "")
    if pg:
        args += ["--index-url", pg, "--index-schema", "i" + uuid.uuid4().hex[:20]]
    url = os.environ.get("BASTION_TEST_STORE_URL", "")
    if url:
        scheme, rest = url.split("://", 1)
        bucket, _, query = rest.partition("?")
        prefix = f"t{uuid.uuid4().hex[:20]}"
        args += ["--store-url", f"{scheme}://{bucket.rstrip('/')}/{prefix}?{query}"]
    return args


class Server:
    """One data dir, one `bastion serve` with a TLS and a plain listener."""

    def __init__(self, bin: Path, base: Path, ae_title="BASTION", data: Path | None = None):
        self.bin = bin
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.data = data or (base / "data")
        self.ae_title = ae_title
        self.tls_port = helpers.free_port()
        self.plain_port = helpers.free_port()
        self.http_port = helpers.free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = base / "serve.log"
        self._log = None
        self.starts = 0
        self.init_output: str | None = None
        # set by the disk-full tests: the event log may hold torn lines
        self.torn_events_expected = False
        # where the plain DICOM and HTTPS listeners bind: loopback, except for
        # a peer in a network namespace (test_orthanc.py: the host end of
        # its veth pair)
        self.peer_host = "127.0.0.1"

    # -- CLI ------------------------------------------------------------
    def cli(self, *args, check=True, timeout=CLI_TIMEOUT) -> subprocess.CompletedProcess:
        # insert --data after the (sub)command words
        cmd = [str(self.bin), *_with_data(list(args), self.data)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n"
                                 f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
        return r

    def init(self) -> subprocess.CompletedProcess:
        r = self.cli("init", *engine_args(self.base))
        self.init_output = r.stdout + r.stderr
        return r

    def device_add(self, ae, network="127.0.0.1/32", transport="tls",
                   allow="echo,store", cert_sha256=None, host=None, port=None,
                   on_conflict=None, move_destinations=None, check=True, verb="add"):
        args = ["device", verb, "--ae", ae]
        if network is not None:
            args += ["--network", network]
        if transport is not None:
            args += ["--transport", transport]
        if allow is not None:
            args += ["--allow", allow]
        if cert_sha256:
            args += ["--cert-sha256", cert_sha256]
        if host:
            args += ["--host", host, "--port", str(port)]
        if on_conflict:
            args += ["--on-conflict", on_conflict]
        if move_destinations is not None:
            args += ["--move-destinations", move_destinations]
        return self.cli(*args, check=check)

    def device_update(self, ae, **kw):
        return self.device_add(ae, verb="update", **kw)

    def device_remove(self, ae, check=True):
        return self.cli("device", "remove", "--ae", ae, check=check)

    def device_list(self) -> list[dict]:
        return json.loads(self.cli("device", "list", "--json").stdout)

    def cert_issue(self, ae) -> tuple[Path, Path, Path, str]:
        out = self.base / f"certs-{ae}"
        r = self.cli("cert", "issue", "--ae", ae, "--out", str(out))
        m = re.search(r"certificate SHA-256: ([0-9a-f]{64})", r.stdout + r.stderr)
        assert m, f"no 'certificate SHA-256: <hex>' line in:\n{r.stdout}{r.stderr}"
        return out / "client.crt", out / "client.key", out / "ca.crt", m.group(1)

    def tls_context(self, ae=None):
        """SSL context trusting our CA; with a client cert issued for `ae`."""
        if ae is None:
            return helpers.client_ssl_context(self.data / "tls" / "ca.crt")
        crt, key, ca, _ = self.cert_issue(ae)
        return helpers.client_ssl_context(ca, crt, key)

    def instance_get(self, uid, out: Path | None = None, check=True):
        out = out or (self.base / "get" / f"{uid}.dcm")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.unlink()
        r = self.cli("instance", "get", "--sop-uid", uid, "--out", str(out), check=check)
        if r.returncode != 0:
            return None
        return out.read_bytes()

    def import_(self, *paths, timeout=600) -> tuple[int, dict, list[tuple[str, str]], str]:
        """(exit code, {stored, duplicates, conflicts, rejected}, [(path, reason)], output)"""
        r = self.cli("import", *map(str, paths), check=False, timeout=timeout)
        out = r.stdout + "\n" + r.stderr
        summary = {}
        for key in ("stored", "duplicates", "conflicts", "rejected"):
            m = re.findall(rf"^\s*{key}: (\d+)\s*$", out, re.M)
            assert m, f"no '{key}: N' line in import output:\n{out[-4000:]}"
            summary[key] = int(m[-1])
        rejected = re.findall(r"^rejected (.+?): (.+)$", out, re.M)
        return r.returncode, summary, rejected, out

    def events(self) -> list[dict]:
        p = self.data / "events" / "events.log"
        if not p.exists():
            return []
        out = []
        for line in p.read_text(errors="replace").splitlines():
            line = line.strip()
            if line:
                # a line torn by a full disk is skipped (as bastion's own reader does)
                try:
                    out.append(json.loads(line))
                except ValueError:
                    if not self.torn_events_expected:
                        raise
        return out

    # -- serve ----------------------------------------------------------
    def start(self, plain=True, extra=()):
        assert self.proc is None or self.proc.poll() is not None
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n===== start #{self.starts + 1} =====\n".encode())
        self._log.flush()
        cmd = [str(self.bin), "serve", "--data", str(self.data),
               "--dicom-addr", f"127.0.0.1:{self.tls_port}", "--ae-title", self.ae_title,
               "--http-addr", f"{self.peer_host}:{self.http_port}"]
        if plain:
            cmd += ["--dicom-plain-addr", f"{self.peer_host}:{self.plain_port}"]
        cmd += list(extra)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log,
                                     stdin=subprocess.DEVNULL)
        self.starts += 1
        helpers.wait_port(self.tls_port, READY_TIMEOUT, self.proc)
        if plain:
            helpers.wait_port(self.plain_port, READY_TIMEOUT, self.proc, host=self.peer_host)
        # the contract: a 'listening' line per listener on stderr
        deadline = time.monotonic() + 10
        want = 2 if plain else 1
        while time.monotonic() < deadline:
            if self._count_listening() >= want * self.starts:
                break
            time.sleep(0.05)
        return self

    def _count_listening(self) -> int:
        return sum(1 for l in self.log().splitlines() if "listening" in l)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig=signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=STOP_TIMEOUT)
            raise AssertionError(f"server did not stop within {STOP_TIMEOUT} s of {sig!r}")
        finally:
            if self._log:
                self._log.close()
        return rc

    def kill9(self):
        self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)
        if self._log:
            self._log.close()

    def restart(self, **kw):
        self.stop()
        return self.start(**kw)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def echo(self, calling, tls=True, ctx=None, called=None):
        if tls:
            return helpers.echo_status(self.tls_port, calling, tls=ctx or self.tls_context(),
                                       called=called or self.ae_title)
        return helpers.echo_status(self.plain_port, calling, called=called or self.ae_title)


def _with_data(args: list[str], data: Path) -> list[str]:
    """bastion <cmd> [<sub>] --data DIR rest..."""
    two_word = {"device", "cert", "instance", "user"}
    n = 2 if args and args[0] in two_word else 1
    return args[:n] + ["--data", str(data)] + args[n:]


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def make_server(bastion_bin, tmp_path, request):
    """Factory: make_server(name="s", init=True, start=True, plain=True, data=None)."""
    servers: list[Server] = []

    def factory(name="s", init=True, start=True, plain=True, data=None, ae_title="BASTION"):
        srv = Server(bastion_bin, tmp_path / name, ae_title=ae_title, data=data)
        servers.append(srv)
        if init:
            srv.init()
        if start:
            srv.start(plain=plain)
        return srv

    yield factory
    failed = any(getattr(request.node, f"rep_{w}", None) is not None
                 and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call"))
    for srv in servers:
        try:
            srv.stop()
        except Exception as e:  # noqa: BLE001
            print(f"stopping server failed: {e}")
        if failed:
            log = srv.log()
            print(f"\n----- bastion serve log ({srv.base.name}), last 200 lines -----")
            print("\n".join(log.splitlines()[-200:]))


@pytest.fixture
def server(make_server):
    return make_server()
