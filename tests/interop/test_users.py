"""`bastion user …` and `bastion token …` CLI contract (issue 4)."""
import json
import re
import subprocess

PASSWORD = "correct horse battery staple"
GENERATED = re.compile(r"^Generated password for user '([^']+)': (\S+)$", re.M)
TOKEN = re.compile(r"^[A-Za-z0-9_-]{32,}$")


def run(srv, *args, stdin=None, check=True):
    """bastion <args> --data DIR, with `stdin` as text (or no stdin)."""
    cmd = [str(srv.bin), *args, "--data", str(srv.data)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n"
                             f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def users(srv):
    return {u["username"]: u for u in json.loads(run(srv, "user", "list", "--json").stdout)}


def test_user_add_with_password_stdin_and_generated(make_server):
    srv = make_server(start=False)
    r = run(srv, "user", "add", "alice", "--role", "clinician", "--password-stdin",
            stdin=PASSWORD + "\n")
    assert PASSWORD not in r.stdout + r.stderr
    assert not GENERATED.search(r.stdout)
    r = run(srv, "user", "add", "bob", "--role", "technologist")
    m = GENERATED.search(r.stdout)
    assert m and m.group(1) == "bob", r.stdout
    generated = m.group(2)
    assert len(generated) >= 12
    # shown once: not in the listing, nor in the event log
    u = users(srv)
    assert u["alice"]["must_change_password"] is False
    assert u["bob"]["must_change_password"] is True
    log = (srv.data / "events" / "events.log").read_text()
    assert generated not in log and PASSWORD not in log
    assert '"type":"user.added"' in log
    # a second add of the same name fails
    r = run(srv, "user", "add", "alice", "--role", "clinician", check=False)
    assert r.returncode != 0 and "already exists" in r.stderr


def test_user_names_differing_only_in_case_are_refused(make_server):
    srv = make_server(start=False)
    run(srv, "user", "add", "alice", "--role", "clinician", "--password-stdin",
        stdin=PASSWORD + "\n")
    for name in ("Alice", "ALICE"):
        r = run(srv, "user", "add", name, "--role", "admin", check=False)
        assert r.returncode != 0
        assert (f"user name {name} differs from the existing user alice only in letter case"
                in r.stderr), r.stderr
        assert not GENERATED.search(r.stdout), r.stdout
    # the initial account too
    r = run(srv, "user", "add", "Admin", "--role", "admin", check=False)
    assert r.returncode != 0 and "existing user admin only in letter case" in r.stderr
    assert set(users(srv)) == {"admin", "alice"}
    log = (srv.data / "events" / "events.log").read_text()
    assert log.count('"type":"user.added"') == 1


def test_weak_passwords_are_refused_with_a_reason(make_server):
    srv = make_server(start=False)
    for pw, why in [("short pw", "at least 12"), ("password1234", "too easy")]:
        r = run(srv, "user", "add", "carol", "--role", "clinician", "--password-stdin",
                stdin=pw + "\n", check=False)
        assert r.returncode != 0
        assert why in r.stderr, r.stderr
        assert pw not in r.stdout + r.stderr
    assert "carol" not in users(srv)
    # an empty stdin is an error, not an empty password
    r = run(srv, "user", "add", "carol", "--role", "clinician", "--password-stdin",
            stdin="", check=False)
    assert r.returncode != 0 and "stdin" in r.stderr


def test_user_list_json_fields_and_no_secrets(make_server):
    srv = make_server(start=False)
    run(srv, "user", "add", "dora", "--role", "auditor", "--password-stdin", stdin=PASSWORD)
    run(srv, "user", "totp-enable", "dora")
    r = run(srv, "user", "list", "--json")
    listing = json.loads(r.stdout)
    assert {u["username"] for u in listing} == {"admin", "dora"}
    for u in listing:
        for field in ("username", "role", "disabled", "locked", "must_change_password",
                      "totp_enabled", "created"):
            assert field in u, (field, u)
    dora = next(u for u in listing if u["username"] == "dora")
    assert dora["role"] == "auditor" and dora["totp_enabled"] is True
    assert dora["disabled"] is False and dora["locked"] is False
    assert "$argon2" not in r.stdout and "hash" not in r.stdout and "secret" not in r.stdout
    # the human listing too
    plain = run(srv, "user", "list").stdout
    assert "dora" in plain and "$argon2" not in plain


def test_totp_enable_prints_the_uri_once(make_server):
    srv = make_server(start=False)
    r = run(srv, "user", "totp-enable", "admin")
    uri = r.stdout.strip().splitlines()[-1]
    m = re.match(r"^otpauth://totp/Bastion:admin\?(.*)$", uri)
    assert m, uri
    params = dict(p.split("=", 1) for p in m.group(1).split("&"))
    assert len(params["secret"]) >= 32  # base32 of >= 160 bits
    assert params["issuer"] == "Bastion"
    assert params["secret"] not in (srv.data / "events" / "events.log").read_text()
    assert users(srv)["admin"]["totp_enabled"] is True
    assert run(srv, "user", "totp-enable", "nobody", check=False).returncode != 0


def test_disable_unlock_passwd_remove(make_server):
    srv = make_server(start=False)
    run(srv, "user", "add", "erin", "--role", "technologist", "--password-stdin", stdin=PASSWORD)
    run(srv, "user", "disable", "erin")
    assert users(srv)["erin"]["disabled"] is True
    run(srv, "user", "enable", "erin")
    assert users(srv)["erin"]["disabled"] is False
    run(srv, "user", "unlock", "erin")
    r = run(srv, "user", "passwd", "erin")
    m = GENERATED.search(r.stdout)
    assert m and m.group(1) == "erin"
    assert users(srv)["erin"]["must_change_password"] is True
    run(srv, "user", "passwd", "erin", "--password-stdin", stdin="violet tractor umbrella sonnet\n")
    assert users(srv)["erin"]["must_change_password"] is False
    run(srv, "user", "remove", "erin")
    assert "erin" not in users(srv)
    for verb in ("disable", "unlock", "passwd", "remove"):
        r = run(srv, "user", verb, "erin", check=False)
        assert r.returncode != 0 and "no user" in r.stderr, (verb, r.stderr)
    types = [json.loads(l)["type"] for l in
             (srv.data / "events" / "events.log").read_text().splitlines() if l.strip()]
    for t in ("user.disabled", "user.enabled", "user.unlocked", "user.password_set",
              "user.removed"):
        assert t in types, t


def test_last_admin_cannot_be_removed_or_disabled(make_server):
    srv = make_server(start=False)
    r = run(srv, "user", "remove", "admin", check=False)
    assert r.returncode != 0 and "last enabled admin" in r.stderr
    r = run(srv, "user", "disable", "admin", check=False)
    assert r.returncode != 0 and "last enabled admin" in r.stderr
    run(srv, "user", "add", "admin2", "--role", "admin", "--password-stdin", stdin=PASSWORD)
    run(srv, "user", "remove", "admin")
    assert set(users(srv)) == {"admin2"}
    r = run(srv, "user", "remove", "admin2", check=False)
    assert r.returncode != 0


def test_bad_role_is_a_clear_error(make_server):
    srv = make_server(start=False)
    r = run(srv, "user", "add", "frank", "--role", "root", check=False)
    assert r.returncode != 0
    assert "unknown role" in r.stderr and "clinician" in r.stderr, r.stderr
    assert "frank" not in users(srv)
    r = run(srv, "user", "add", "bad name", "--role", "clinician", check=False)
    assert r.returncode != 0 and "user name" in r.stderr


def test_token_create_list_revoke(make_server):
    srv = make_server(start=False)
    run(srv, "user", "add", "gus", "--role", "technologist", "--password-stdin", stdin=PASSWORD)
    r = run(srv, "token", "create", "--user", "gus", "--expires", "30d")
    lines = r.stdout.splitlines()
    assert lines, r.stderr
    token = lines[-1]
    assert TOKEN.match(token), token
    assert r.stdout.strip() == token, "only the token goes to stdout"
    r2 = run(srv, "token", "create", "--user", "gus", "--expires", "12h", "--scope", "read")
    read_token = r2.stdout.splitlines()[-1]
    assert TOKEN.match(read_token) and read_token != token

    listing = json.loads(run(srv, "token", "list", "--json").stdout)
    assert len(listing) == 2
    by_scope = {t["scope"]: t for t in listing}
    assert set(by_scope) == {"full", "read"}
    for t in listing:
        assert t["username"] == "gus" and t["revoked"] is None and t["expired"] is False
        assert t["id"] in (token if t["scope"] == "full" else read_token)
    text = run(srv, "token", "list").stdout + json.dumps(listing)
    assert token not in text and read_token not in text
    log = (srv.data / "events" / "events.log").read_text()
    assert token not in log and read_token not in log

    tid = by_scope["full"]["id"]
    run(srv, "token", "revoke", tid)
    listing = {t["id"]: t for t in json.loads(
        run(srv, "token", "list", "--user", "gus", "--json").stdout)}
    assert listing[tid]["revoked"] is not None
    assert listing[by_scope["read"]["id"]]["revoked"] is None
    assert json.loads(run(srv, "token", "list", "--user", "admin", "--json").stdout) == []
    assert run(srv, "token", "revoke", "0123456789abcdef", check=False).returncode != 0
    assert '"type":"token.revoked"' in (srv.data / "events" / "events.log").read_text()


def test_token_create_refusals(make_server):
    srv = make_server(start=False)
    run(srv, "user", "add", "hal", "--role", "auditor", "--password-stdin", stdin=PASSWORD)
    run(srv, "user", "add", "ivy", "--role", "researcher", "--password-stdin", stdin=PASSWORD)
    cases = [
        (["--user", "nobody", "--expires", "30d"], "no user"),
        (["--user", "hal", "--expires", "30"], "unit"),
        (["--user", "hal", "--expires", "400d"], "366d"),
        (["--user", "hal", "--expires", "1d", "--scope", "everything"], "scope"),
        (["--user", "hal", "--expires", "1d", "--scope", "upload"], "allows nothing"),
        (["--user", "ivy", "--expires", "1d"], "allows nothing"),
    ]
    for args, why in cases:
        r = run(srv, "token", "create", *args, check=False)
        assert r.returncode != 0, args
        assert why in r.stderr, (args, r.stderr)
        assert r.stdout.strip() == "", (args, r.stdout)
    # an auditor's default token exists (it reaches the audit API)
    r = run(srv, "token", "create", "--user", "hal", "--expires", "1d")
    assert TOKEN.match(r.stdout.splitlines()[-1])
    run(srv, "user", "disable", "hal")
    r = run(srv, "token", "create", "--user", "hal", "--expires", "1d", check=False)
    assert r.returncode != 0 and "disabled" in r.stderr
