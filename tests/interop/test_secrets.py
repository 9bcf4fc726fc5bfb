"""Where the keys live (issue 10, finding 4): a key directory outside the
data directory (`bastion init --secrets-dir DIR`), systemd credentials
(`[secrets] dir = "$CREDENTIALS_DIRECTORY"`, read-only), a master key wrapped
by a passphrase (`--passphrase-stdin`, `--passphrase-file`), and the warnings
of `serve` and the posture page when keys sit inside the data directory.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import helpers
from helpers import SUCCESS
from test_admin_api import call, run

KEY_NAMES = {"master.key", "master.key.wrapped", "audit-signing.key", "ca.key"}
INSIDE = "is inside the data directory"
PASSPHRASE = "velvet kettle orbit 7319 marmalade"


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def bastion(srv, *args, stdin=None, env=None, check=False):
    """`bastion --data DATA args...`; returns the CompletedProcess."""
    r = subprocess.run([str(srv.bin), "--data", str(srv.data), *args], input=stdin,
                       capture_output=True, text=True, timeout=120,
                       stdin=None if stdin is not None else subprocess.DEVNULL,
                       env=env)
    if check:
        assert r.returncode == 0, f"{args} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def snapshot(root: Path) -> dict:
    """Every path under root with (size, mtime) for files: to show nothing was written."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns) if p.is_file() else "dir"
    return out


def key_files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name in KEY_NAMES or p.name.endswith(".key") and p.name != "server.key")


def posture_warnings(srv) -> list[str]:
    token = run(srv, "token", "create", "--user", "admin",
                "--expires", "1h").stdout.strip().splitlines()[-1]
    helpers.wait_port(srv.http_port, 30, srv.proc)
    st, _, p = call(srv, "GET", "/api/posture", token)
    assert st == 200, p
    return p["warnings"]


def echo_ok(srv, ae="ECHO1"):
    assert srv.echo(ae) == SUCCESS


def test_default_layout_keeps_working_and_warns(make_server):
    """The embedded default: keys inside the data directory; serve and the
    posture page say so, one line per key."""
    srv = make_server(init=False, start=False)
    srv.start()  # serve initialises the empty directory, no extra step
    for f in ("secrets/master.key", "secrets/audit-signing.key", "tls/ca.key"):
        assert mode(srv.data / f) == 0o600, f
    log = srv.log()
    for what in ("the master key", "the audit signing key", "the CA key"):
        assert any(what in l and INSIDE in l and "WARN" in l for l in log.splitlines()), (what, log)
    warnings = posture_warnings(srv)
    inside = [w for w in warnings if INSIDE in w]
    assert len(inside) == 3, warnings
    assert any(w.startswith("the master key") and "decrypts every image" in w for w in inside)
    assert any(w.startswith("the audit signing key") and "forge audit checkpoints" in w
               for w in inside)
    assert any(w.startswith("the CA key") and "issue device certificates" in w for w in inside)
    srv.device_add("ECHO1", allow="echo")
    echo_ok(srv)


def test_secrets_dir_keeps_every_key_out_of_the_data_dir(make_server, tmp_path):
    srv = make_server(init=False, start=False)
    keys = tmp_path / "etc" / "bastion-secrets"
    r = bastion(srv, "init", "--secrets-dir", str(keys), check=True)
    assert str(keys) in r.stdout, r.stdout
    # No key file anywhere under the data directory.
    assert key_files_under(srv.data) == [], key_files_under(srv.data)
    assert not (srv.data / "secrets").exists()
    assert mode(keys) == 0o700
    assert sorted(p.name for p in keys.iterdir()) == ["audit-signing.key", "ca.key", "master.key"]
    for p in keys.iterdir():
        assert mode(p) == 0o600, p
    # The master key's bytes appear in no file of the data directory.
    master = (keys / "master.key").read_text().strip()
    for p in srv.data.rglob("*"):
        if p.is_file():
            assert master.encode() not in p.read_bytes(), p
    toml = (srv.data / "bastion.toml").read_text()
    assert "[secrets]" in toml and f'dir = "{keys.resolve()}"' in toml, toml

    # Every command finds the keys there: device add, cert issue (CA key), serve.
    srv.device_add("ECHO1", allow="echo")
    srv.device_add("MTLS1", transport="mtls", allow="echo")
    srv.start()
    echo_ok(srv)
    assert srv.echo("MTLS1", ctx=srv.tls_context("MTLS1")) == SUCCESS
    assert INSIDE not in srv.log()
    warnings = posture_warnings(srv)
    assert not any(INSIDE in w for w in warnings), warnings
    st, _, body = call(srv, "POST", "/api/login",
                       body={"username": "admin", "password": "wrong password here"})
    assert st == 401, body


def test_a_copy_of_the_data_dir_alone_cannot_be_opened(make_server, tmp_path):
    srv = make_server(init=False, start=False)
    keys = tmp_path / "keys"
    bastion(srv, "init", "--secrets-dir", str(keys), check=True)
    copy = tmp_path / "stolen"
    shutil.copytree(srv.data, copy)
    away = tmp_path / "keys-away"
    keys.rename(away)  # the thief has the data directory, not the keys
    thief = srv.__class__(srv.bin, tmp_path / "thief", data=copy)
    for args in (("device", "list"), ("audit", "verify"), ("serve",)):
        r = bastion(thief, *args)
        assert r.returncode != 0, (args, r.stdout)
        assert "master key" in r.stderr and "is missing" in r.stderr, r.stderr
        assert "a copy of the data directory alone cannot be opened" in r.stderr, r.stderr
    # Editing the copy's bastion.toml to look inside the directory: no key there either.
    toml = copy / "bastion.toml"
    toml.write_text("\n".join(l for l in toml.read_text().splitlines()
                              if not l.startswith("dir = ")) + "\n")
    r = bastion(thief, "device", "list")
    assert r.returncode != 0 and "master key" in r.stderr and "is missing" in r.stderr, r.stderr
    # The keys back: the original opens again.
    away.rename(keys)
    r = bastion(srv, "device", "list", "--json", check=True)
    assert r.stdout.strip() == "[]"


def test_secrets_dir_inside_the_data_dir_is_refused(make_server, tmp_path):
    srv = make_server(init=False, start=False)
    for inside in (srv.data / "keys", srv.data, tmp_path / "s" / ".." / "s" / "data" / "k"):
        r = bastion(srv, "init", "--secrets-dir", str(inside))
        assert r.returncode != 0, r.stdout
        assert "refusing --secrets-dir" in r.stderr, r.stderr
        assert not srv.data.exists(), "nothing may be written on refusal"
    # A data directory inside the key directory is refused as well.
    r = bastion(srv, "init", "--secrets-dir", str(srv.data.parent))
    assert r.returncode != 0 and "is inside it" in r.stderr, r.stderr


def test_systemd_credentials_are_read_and_never_written(make_server, tmp_path, monkeypatch):
    srv = make_server(init=False, start=False)
    made = tmp_path / "made-keys"
    bastion(srv, "init", "--secrets-dir", str(made), check=True)
    # What systemd's LoadCredential= gives the service: a read-only
    # directory of read-only files named like the keys.
    creds = tmp_path / "credentials"
    creds.mkdir()
    for p in made.iterdir():
        shutil.copy(p, creds / p.name)
        os.chmod(creds / p.name, 0o400)
    os.chmod(creds, 0o500)
    shutil.rmtree(made)
    toml = srv.data / "bastion.toml"
    text = toml.read_text()
    assert f'dir = "{made.resolve()}"' in text
    toml.write_text(text.replace(f'dir = "{made.resolve()}"', 'dir = "$CREDENTIALS_DIRECTORY"'))

    # Without the variable: a clear error.
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    r = bastion(srv, "device", "list")
    assert r.returncode != 0 and "$CREDENTIALS_DIRECTORY is not set" in r.stderr, r.stderr

    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    srv.device_add("ECHO1", allow="echo")
    srv.device_add("MTLS1", transport="mtls", allow="echo")
    srv.start()
    echo_ok(srv)
    assert srv.echo("MTLS1", ctx=srv.tls_context("MTLS1")) == SUCCESS
    assert not any(INSIDE in w for w in posture_warnings(srv))
    srv.stop()
    assert sorted(p.name for p in creds.iterdir()) == ["audit-signing.key", "ca.key", "master.key"]

    # Commands that must write keys refuse, naming the variable, and write nothing.
    fresh = make_server(name="fresh", init=False, start=False)
    for args in (("init",), ("init", "--secrets-dir", "$CREDENTIALS_DIRECTORY"), ("serve",)):
        r = bastion(fresh, *args)
        assert r.returncode != 0, (args, r.stdout)
        assert "$CREDENTIALS_DIRECTORY" in r.stderr and "read-only" in r.stderr, (args, r.stderr)
        assert not fresh.data.exists(), args
    # A missing credential is named with the unit setting that passes it.
    os.chmod(creds, 0o700)
    (creds / "ca.key").unlink()
    r = bastion(srv, "device", "list")
    assert r.returncode != 0 and "LoadCredential=ca.key:" in r.stderr, r.stderr


def test_passphrase_wrapped_master_key(make_server, tmp_path):
    srv = make_server(init=False, start=False)
    r = bastion(srv, "init", "--passphrase-stdin", stdin=PASSPHRASE + "\n", check=True)
    secrets = srv.data / "secrets"
    assert sorted(p.name for p in secrets.iterdir()) == ["audit-signing.key", "master.key.wrapped"]
    assert mode(secrets / "master.key.wrapped") == 0o600
    assert PASSPHRASE not in (secrets / "master.key.wrapped").read_text()
    assert "--passphrase-stdin" in r.stdout

    # Without, or with a wrong passphrase: a clear error, non-zero, nothing written.
    before = snapshot(srv.data)
    r = bastion(srv, "device", "add", "--ae", "ECHO1", "--network", "127.0.0.1/32",
                "--transport", "tls", "--allow", "echo")
    assert r.returncode != 0 and "wrapped by a passphrase" in r.stderr, r.stderr
    for args in (("device", "add", "--ae", "ECHO1", "--network", "127.0.0.1/32",
                  "--transport", "tls", "--allow", "echo"),
                 ("serve", "--dicom-addr", f"127.0.0.1:{srv.tls_port}",
                  "--http-addr", f"127.0.0.1:{srv.http_port}")):
        r = bastion(srv, "--passphrase-stdin", *args, stdin="not the passphrase\n")
        assert r.returncode != 0, (args, r.stdout)
        assert "wrong passphrase" in r.stderr, r.stderr
        assert PASSPHRASE not in r.stderr and "not the passphrase" not in r.stderr
    assert snapshot(srv.data) == before

    # The right one, on stdin: commands work.
    bastion(srv, "--passphrase-stdin", "device", "add", "--ae", "ECHO1", "--network",
            "127.0.0.1/32", "--transport", "tls", "--allow", "echo",
            stdin=PASSPHRASE + "\n", check=True)

    # serve with --passphrase-file (a private file, e.g. a systemd credential).
    pf = tmp_path / "passphrase"
    pf.write_text(PASSPHRASE + "\n")
    os.chmod(pf, 0o644)
    r = bastion(srv, "--passphrase-file", str(pf), "device", "list")
    assert r.returncode != 0 and "readable by other users" in r.stderr, r.stderr
    os.chmod(pf, 0o600)
    srv.start(extra=["--passphrase-file", str(pf)])
    echo_ok(srv)
    # The wrapped master key inside the data directory is not a warning;
    # the audit and CA keys still are.
    log = srv.log()
    assert "the master key" not in log, log
    assert "the audit signing key" in log and "the CA key" in log, log
    srv.stop()

    # serve with the passphrase on stdin.
    log = open(srv.base / "serve-stdin.log", "wb")
    proc = subprocess.Popen([str(srv.bin), "--data", str(srv.data), "serve", "--passphrase-stdin",
                             "--dicom-addr", f"127.0.0.1:{srv.tls_port}",
                             "--http-addr", f"127.0.0.1:{srv.http_port}"],
                            stdin=subprocess.PIPE, stdout=log, stderr=log)
    try:
        proc.stdin.write((PASSPHRASE + "\n").encode())
        proc.stdin.close()
        helpers.wait_port(srv.tls_port, 60, proc)
        echo_ok(srv)
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        log.close()


def test_weak_passphrase_is_refused_before_anything_is_written(make_server):
    srv = make_server(init=False, start=False)
    r = bastion(srv, "init", "--passphrase-stdin", stdin="short\n")
    assert r.returncode != 0 and "passphrase refused" in r.stderr, r.stderr
    assert not srv.data.exists()


def test_moving_the_keys_of_an_existing_installation(make_server, tmp_path):
    """The README's steps for an installation made with the default layout;
    a key left behind in the data directory is still reported."""
    srv = make_server(start=False)
    srv.device_add("ECHO1", allow="echo")
    keys = tmp_path / "moved-keys"
    keys.mkdir(mode=0o700)
    for f in ("secrets/master.key", "secrets/audit-signing.key", "tls/ca.key"):
        shutil.move(srv.data / f, keys / Path(f).name)
    toml = srv.data / "bastion.toml"
    text = toml.read_text()
    assert '# dir = "/etc/bastion/secrets"' in text
    toml.write_text(text.replace('# dir = "/etc/bastion/secrets"', f'dir = "{keys}"'))
    assert key_files_under(srv.data) == []
    srv.start()
    echo_ok(srv)
    assert INSIDE not in srv.log()
    srv.stop()
    shutil.copy(keys / "ca.key", srv.data / "tls" / "ca.key")
    srv.start()
    warnings = [w for w in posture_warnings(srv) if INSIDE in w]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"the CA key ({srv.data / 'tls' / 'ca.key'})"), warnings


def test_secrets_move_takes_the_keys_of_an_existing_installation_out(make_server, tmp_path):
    srv = make_server(start=False)
    srv.device_add("ECHO1", allow="echo")
    keys = tmp_path / "etc" / "moved"
    # Inside the data directory: refused, nothing changed.
    before = snapshot(srv.data)
    r = bastion(srv, "secrets", "move", "--to", str(srv.data / "k"))
    assert r.returncode != 0 and "refusing --to" in r.stderr, r.stderr
    assert snapshot(srv.data) == before
    # While serve runs: refused.
    srv.start()
    r = bastion(srv, "secrets", "move", "--to", str(keys))
    assert r.returncode != 0 and "stop it before moving the keys" in r.stderr, r.stderr
    assert not keys.exists()
    srv.stop()

    r = bastion(srv, "secrets", "move", "--to", str(keys), check=True)
    assert str(keys) in r.stdout
    assert key_files_under(srv.data) == [], key_files_under(srv.data)
    assert mode(keys) == 0o700
    assert sorted(p.name for p in keys.iterdir()) == ["audit-signing.key", "ca.key", "master.key"]
    assert all(mode(p) == 0o600 for p in keys.iterdir())
    toml = (srv.data / "bastion.toml").read_text()
    assert f'\ndir = "{keys.resolve()}"\n' in toml and "# dir =" not in toml, toml
    assert any(e.get("event") == "secrets.moved" or "secrets.moved" in str(e) for e in srv.events())
    # Everything still opens, with no key inside the data directory.
    srv.start()
    echo_ok(srv)
    assert INSIDE not in srv.log().split("===== start #2 =====")[-1]
    assert not any(INSIDE in w for w in posture_warnings(srv))
    srv.stop()
    r = bastion(srv, "secrets", "move", "--to", str(tmp_path / "again"))
    assert r.returncode != 0 and "already outside" in r.stderr, r.stderr
    assert bastion(srv, "audit", "verify").returncode == 0
