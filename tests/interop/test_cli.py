"""init, device and cert CLI contract."""
import json
import os
import stat

PASSWORD_LINE = "Initial admin password for user 'admin': "


def mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_init_layout_and_secrets(make_server):
    srv = make_server(start=False)
    d = srv.data
    assert mode(d) == 0o700
    for f in ["bastion.toml", "tls/ca.crt", "tls/server.crt", "security.db", "index.db",
              "events/events.log"]:
        assert (d / f).is_file(), f
    assert (d / "blobs").is_dir()
    for f in ["tls/ca.key", "tls/server.key", "secrets/master.key",
              "secrets/audit-signing.key", "initial-admin-password"]:
        assert (d / f).is_file(), f
        assert mode(d / f) == 0o600, f"{f} has mode {oct(mode(d / f))}"
    lines = [l for l in srv.init_output.splitlines() if PASSWORD_LINE in l]
    assert len(lines) == 1, srv.init_output
    password = lines[0].split(PASSWORD_LINE, 1)[1].strip()
    assert len(password) >= 12
    assert (d / "initial-admin-password").read_text().strip() == password
    # a second init on an initialised dir fails and prints no password
    r = srv.cli("init", check=False)
    assert r.returncode != 0
    assert PASSWORD_LINE not in r.stdout + r.stderr


def test_serve_initialises_empty_dir(make_server):
    srv = make_server(init=False, start=True)
    assert (srv.data / "tls" / "ca.crt").is_file()
    assert mode(srv.data / "secrets" / "master.key") == 0o600
    assert PASSWORD_LINE in srv.log()
    assert sum(PASSWORD_LINE in l for l in srv.log().splitlines()) == 1


def test_device_crud_json(make_server):
    srv = make_server(start=False)
    srv.device_add("MOD1", network="10.1.0.0/16", transport="mtls", allow="echo,store",
                   cert_sha256="AB" * 32)
    srv.device_add("LEGACY", network="127.0.0.1/32", transport="plain", allow="echo",
                   host="127.0.0.1", port=11112, on_conflict="replace")
    r = srv.device_add("MOD1", check=False)
    assert r.returncode != 0, "adding an existing AE must fail"
    devs = {d["ae"]: d for d in srv.device_list()}
    assert set(devs) == {"MOD1", "LEGACY"}
    m = devs["MOD1"]
    assert m["network"] == "10.1.0.0/16"
    assert m["transport"] == "mtls"
    assert sorted(m["allow"]) == ["echo", "store"]
    assert m["cert_sha256"].replace(":", "").lower() == "ab" * 32
    l = devs["LEGACY"]
    assert l["transport"] == "plain" and l["allow"] == ["echo"]
    assert l["host"] == "127.0.0.1" and int(l["port"]) == 11112
    assert l["on_conflict"] == "replace"
    srv.device_update("LEGACY", network=None, transport=None, allow="echo,store,find")
    devs = {d["ae"]: d for d in srv.device_list()}
    assert sorted(devs["LEGACY"]["allow"]) == ["echo", "find", "store"]
    srv.device_remove("LEGACY")
    assert [d["ae"] for d in srv.device_list()] == ["MOD1"]
    assert srv.device_remove("LEGACY", check=False).returncode != 0


def test_cert_issue(make_server):
    import hashlib, ssl
    srv = make_server(start=False)
    srv.device_add("MOD1")
    crt, key, ca, fp = srv.cert_issue("MOD1")
    assert mode(key) == 0o600
    assert ca.read_bytes() == (srv.data / "tls" / "ca.crt").read_bytes()
    pem = crt.read_text()
    first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    der = ssl.PEM_cert_to_DER_cert(first)
    assert hashlib.sha256(der).hexdigest() == fp
    assert "BEGIN PRIVATE KEY" in key.read_text()  # unencrypted PKCS#8


def test_serve_refuses_secret_readable_by_others(make_server):
    """A secret file readable by group/others stops `serve` with a message naming it."""
    srv = make_server(start=False)
    key = srv.data / "secrets" / "master.key"
    os.chmod(key, 0o640)
    r = srv.cli("serve", "--dicom-addr", "127.0.0.1:0", check=False, timeout=30)
    assert r.returncode != 0
    assert "master.key" in r.stderr and "readable by other users" in r.stderr, r.stderr
    # the other commands refuse too
    r = srv.cli("device", "list", check=False)
    assert r.returncode != 0 and "master.key" in r.stderr
    os.chmod(key, 0o600)
    srv.device_add("MOD1", transport="tls", allow="echo")
    srv.start()
    assert srv.echo("MOD1") == 0x0000
    assert srv.stop() == 0, "SIGTERM must end serve with exit code 0"


def test_second_serve_on_same_data_dir_refused(make_server):
    srv = make_server()
    r = srv.cli("serve", "--dicom-addr", "127.0.0.1:0", check=False, timeout=30)
    assert r.returncode != 0
    assert "already running" in r.stderr, r.stderr


def test_instance_get_never_overwrites(make_server, corpus_root, tmp_path):
    srv = make_server(start=False)
    ct = corpus_root / "pydicom" / "test_files" / "CT_small.dcm"
    code, summary, _, out = srv.import_(ct)
    assert code == 0 and summary["stored"] == 1, out
    uid = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    existing = tmp_path / "exists.dcm"
    existing.write_bytes(b"keep me")
    r = srv.cli("instance", "get", "--sop-uid", uid, "--out", str(existing), check=False)
    assert r.returncode != 0 and "must not exist" in r.stderr
    assert existing.read_bytes() == b"keep me"
    fresh = tmp_path / "fresh.dcm"
    srv.cli("instance", "get", "--sop-uid", uid, "--out", str(fresh))
    assert mode(fresh) == 0o600
    assert fresh.read_bytes()[128:132] == b"DICM"


def test_import_reports_what_it_skips(make_server, corpus_root, tmp_path):
    srv = make_server(start=False)
    ct = corpus_root / "pydicom" / "test_files" / "CT_small.dcm"
    folder = tmp_path / "imp"
    folder.mkdir()
    (folder / "link.dcm").symlink_to(ct)
    os.mkfifo(folder / "pipe")
    code, summary, rejected, out = srv.import_(folder)
    assert code == 1, out
    assert summary["rejected"] == 2 and summary["stored"] == 0, out
    reasons = {os.path.basename(p): r for p, r in rejected}
    assert "symbolic link" in reasons["link.dcm"]
    assert "not a regular file" in reasons["pipe"]
    # a symlink named on the command line is followed
    code, summary, _, out = srv.import_(folder / "link.dcm")
    assert code == 0 and summary["stored"] == 1, out


def test_cert_server_renews_server_certificate(make_server):
    """`cert server` replaces the server certificate under the same CA:
    clients keep their ca.crt, the new certificate names the extra host."""
    import ssl
    srv = make_server(start=False)
    before = (srv.data / "tls" / "server.crt").read_bytes()
    ca_before = (srv.data / "tls" / "ca.crt").read_bytes()
    r = srv.cli("cert", "server", "--host", "pacs.example.org")
    assert "restart" in r.stdout
    after = (srv.data / "tls" / "server.crt").read_bytes()
    assert after != before
    assert (srv.data / "tls" / "ca.crt").read_bytes() == ca_before
    assert mode(srv.data / "tls" / "server.key") == 0o600
    srv.device_add("RENEW", transport="tls", allow="echo")
    srv.start()
    assert srv.echo("RENEW") == 0x0000
    # the running server presents the new certificate
    pem = ssl.get_server_certificate(("127.0.0.1", srv.tls_port))
    assert ssl.PEM_cert_to_DER_cert(pem) == ssl.PEM_cert_to_DER_cert(after.decode())


def test_doctor_reports_each_check_and_fails_on_a_damaged_database(make_server):
    """`bastion doctor`: every check on a fresh installation (exit 0, the keys
    inside the data directory are warnings), then a damaged index database and
    a world-readable key are failures (exit 1) naming what and where."""
    srv = make_server(start=False)
    r = srv.cli("doctor", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    checks = {line[6:26].strip(): line[:4].strip() for line in r.stdout.splitlines()
              if line[:4].strip() in ("ok", "warn", "FAIL")}
    for name in ("configuration", "permissions", "key location", "disk space", "master key",
                 "security database", "index database", "audit trail", "audit recording",
                 "certificates", "accounts", "alerts"):
        assert name in checks, (name, r.stdout)
    assert checks["index database"] == "ok" and checks["audit trail"] == "ok", r.stdout
    assert checks["key location"] == "warn", r.stdout
    assert "0 failures" in r.stdout
    j = srv.cli("doctor", "--json", check=False)
    rows = [json.loads(l) for l in j.stdout.splitlines() if l.strip()]
    assert {row["level"] for row in rows} <= {"ok", "warn", "fail"}
    assert any(row["check"] == "audit trail" and row["level"] == "ok" for row in rows)

    # Damage the index database: overwrite 4 KiB in its second page.
    db = srv.data / "index.db"
    with open(db, "r+b") as f:
        f.seek(4096 + 100)
        f.write(os.urandom(4096))
    key = srv.data / "tls" / "ca.key"
    key.chmod(0o644)
    r = srv.cli("doctor", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    fails = [l for l in r.stdout.splitlines() if l.startswith("FAIL")]
    assert any("permissions" in l and "ca.key" in l for l in fails), r.stdout
    assert any("index database" in l for l in fails), r.stdout


def test_doctor_without_installation(tmp_path, bastion_bin):
    import subprocess
    r = subprocess.run([str(bastion_bin), "--data", str(tmp_path / "none"), "doctor"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "bastion init" in r.stderr
