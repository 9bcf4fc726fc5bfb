"""Account flows of the real binary over HTTPS:

- `POST /api/password` of an account with TOTP needs the second factor: a
  session cookie of the same account (its login passed TOTP) or a valid,
  unused `totp` code; otherwise 401, the answer of a wrong password;
- a right password from an address with earlier failures does not re-arm
  the address's delay (a new admin's login, 403 "set up two-factor", then
  the enrolment at once, used to get 429 forever behind a noisy NAT);
- `GET /api/me` gives the session idle timeout (`session_idle_secs`);
- onboarding: `serve` logs the web UI's address, and the initial admin
  password file goes once the admin password is changed (web or CLI), or
  at start when it no longer opens the admin account.
"""
from __future__ import annotations

import os
import re
import time

import helpers
from test_admin_api import call, totp
from test_dicomweb import PASSWORD, run, server_with

NEW = "violet tractor umbrella sonnet 7"
NEWER = "amber lantern quietly folding 9"


def post(srv, path, body, auth=None, tries=6):
    """POST JSON, waiting out a 429 (Retry-After) at most `tries` times."""
    for _ in range(tries):
        st, hd, resp = call(srv, "POST", path, auth, body)
        if st != 429:
            return st, hd, resp
        time.sleep(float(hd.get("retry-after", "1")) + 0.2)
    return st, hd, resp


def session_of(hd, body):
    return {"cookie": hd["set-cookie"].split(";")[0], "csrf": body["csrf"]}


def code_at(uri, step):
    """The TOTP code of time step `step` (30 s steps)."""
    return totp(uri, at=step * 30 + 1)


def events_of(srv, kind):
    return [e for e in srv.events() if e.get("type") == kind]


def test_password_change_of_a_totp_account_needs_the_second_factor(make_server):
    srv = server_with(make_server, base_delay_ms=1, max_delay_secs=1,
                      per_address_max_delay_secs=1, session_idle_secs=600)
    for name in ("tess", "ursula"):
        run(srv, "user", "add", name, "--role", "clinician", "--password-stdin",
            stdin=PASSWORD + "\n")
    uri = run(srv, "user", "totp-enable", "tess").stdout.strip().splitlines()[-1]
    change = {"username": "tess", "old_password": PASSWORD, "new_password": NEW}

    # The old password alone: 401, as a wrong password, counted as a failure.
    st, _, body = post(srv, "/api/password", change)
    assert st == 401, body
    assert body["error"] == call(srv, "POST", "/api/password",
                                 body={**change, "old_password": "wrong password 1"})[2]["error"]
    failures = [e for e in events_of(srv, "login.failure") if e.get("username") == "tess"]
    assert [e["reason"] for e in failures] == ["totp_missing_on_change", "wrong_password_on_change"]
    # A wrong code: 401.
    step = int(time.time()) // 30
    right = code_at(uri, step)
    wrong = "000000" if right != "000000" else "111111"
    st, _, body = post(srv, "/api/password", {**change, "totp": wrong})
    assert st == 401, body
    # Another user's session cookie: 401.
    st, hd, body = post(srv, "/api/login", {"username": "ursula", "password": PASSWORD})
    assert st == 200, body
    theirs = session_of(hd, body)
    st, _, body = post(srv, "/api/password", change, auth=theirs)
    assert st == 401, body
    # Nothing changed so far.
    st, _, body = post(srv, "/api/login", {"username": "tess", "password": NEW,
                                           "totp": code_at(uri, step)})
    assert st == 401, body

    # The right code: 200 with a new session (the request proved both
    # factors); the code is used up (a login with it is refused).
    st, hd, body = post(srv, "/api/password", {**change, "totp": right})
    assert st == 200 and body["username"] == "tess", body
    assert body["must_change_password"] is False, body
    continued = session_of(hd, body)
    assert call(srv, "GET", "/api/me", continued)[0] == 200
    e = events_of(srv, "user.password_changed")[-1]
    assert (e["username"], e["second_factor"], e["source"]) == ("tess", "totp", "127.0.0.1")
    assert e["session_started"] is True
    st, _, _ = post(srv, "/api/login", {"username": "tess", "password": NEW, "totp": right})
    assert st == 401

    # Logged in fully (the next step's code is within the ±1 step window):
    # the session stands for the second factor, no code needed.
    st, hd, body = post(srv, "/api/login", {"username": "tess", "password": NEW,
                                            "totp": code_at(uri, step + 1)})
    assert st == 200, body
    own = session_of(hd, body)
    st, _, me = call(srv, "GET", "/api/me", own)
    assert st == 200 and me["username"] == "tess", me
    # G: the idle timeout for the UI's idle logout (configured: 600 s).
    assert me["session_idle_secs"] == 600, me
    st, hd, body = post(srv, "/api/password", {"username": "tess", "old_password": NEW,
                                               "new_password": NEWER}, auth=own)
    # The holder stays logged in: a new session (new cookie and CSRF token).
    assert st == 200, body
    assert "Max-Age=0" not in hd.get("set-cookie", ""), hd
    fresh = session_of(hd, body)
    assert fresh["cookie"] != own["cookie"] and fresh["csrf"] != own["csrf"]
    assert events_of(srv, "user.password_changed")[-1]["second_factor"] == "session"
    # Every other session of the account ended with the change.
    assert call(srv, "GET", "/api/me", own)[0] == 401
    assert call(srv, "GET", "/api/me", continued)[0] == 401
    st, _, me = call(srv, "GET", "/api/me", fresh)
    assert st == 200 and me["username"] == "tess", me
    # A token's /api/me says it too.
    token = run(srv, "token", "create", "--user", "ursula", "--expires", "1h").stdout.split()[-1]
    st, _, me = call(srv, "GET", "/api/me", token)
    assert st == 200 and me["method"] == "token" and me["session_idle_secs"] == 600, me
    # No code, password or session id in the event log.
    log = (srv.data / "events" / "events.log").read_text()
    for secret in (right, NEW, NEWER, own["cookie"].split("=", 1)[1]):
        assert secret not in log


def test_a_right_password_does_not_rearm_the_address_delay(make_server):
    """Default delays: five failures from 127.0.0.1 are free, the next
    attempt waits 1 s. A new admin's right password (403: set up two-factor)
    used to re-arm that delay, so the enrolment right after it got 429."""
    srv = make_server(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    initial = (srv.data / "initial-admin-password").read_text().strip()
    for i in range(5):
        st, _, _ = call(srv, "POST", "/api/login",
                        body={"username": f"typo{i}", "password": "wrong password"})
        assert st == 401, (i, st)
    time.sleep(1.3)  # the address's delay after five failures
    admin = {"username": "admin", "password": initial}
    st, _, body = call(srv, "POST", "/api/login", body=admin)
    assert st == 403 and "two-factor" in body["error"], body
    for n in range(2):
        st, hd, body = call(srv, "POST", "/api/totp/enrol", body=admin)
        assert st == 200, (n, st, hd.get("retry-after"), body)
        assert len(body["secret"]) == 32
    # The address is still remembered: the next failure is checked, the one
    # after it waits.
    st, _, _ = call(srv, "POST", "/api/login",
                    body={"username": "typo-x", "password": "wrong password"})
    assert st == 401
    st, hd, _ = call(srv, "POST", "/api/login",
                     body={"username": "typo-y", "password": "wrong password"})
    assert st == 429 and int(hd["retry-after"]) >= 1


def test_onboarding_log_line_and_initial_password_file(make_server):
    srv = make_server(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    url = f"https://127.0.0.1:{srv.http_port}/"
    deadline = time.monotonic() + 10
    while "web UI:" not in srv.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (f"web UI: {url} (log in as admin; first login sets up two-factor "
            "authentication)") in srv.log(), srv.log()[-2000:]
    file = srv.data / "initial-admin-password"
    initial = file.read_text().strip()

    # The browser's first login: enrolment, then the forced password change
    # with the new session (no code needed).
    admin = {"username": "admin", "password": initial}
    st, _, body = post(srv, "/api/login", admin)
    assert st == 403, body
    st, _, e = post(srv, "/api/totp/enrol", admin)
    assert st == 200, e
    uri = e["uri"]
    step = int(time.time()) // 30
    st, hd, body = post(srv, "/api/totp/enrol", {**admin, "secret": e["secret"],
                                                 "totp": code_at(uri, step)})
    assert st == 200 and body["must_change_password"] is True, body
    session = session_of(hd, body)
    assert file.exists(), "nothing changed yet"
    st, hd, body = post(srv, "/api/password", {"username": "admin", "old_password": initial,
                                               "new_password": NEW}, auth=session)
    # Still logged in, in the same 30-second step as the enrolment's code:
    # no second code, no wait (the code itself stays used up).
    assert st == 200 and body["must_change_password"] is False, body
    after = session_of(hd, body)
    st, _, me = call(srv, "GET", "/api/me", after)
    assert st == 200 and me["username"] == "admin" and "admin" in me["permissions"], me
    assert call(srv, "GET", "/api/me", session)[0] == 401
    st, _, _ = post(srv, "/api/login", {"username": "admin", "password": NEW,
                                        "totp": code_at(uri, step)})
    assert st == 401
    assert not file.exists()
    assert f"removed {file} (the admin password was changed)" in srv.log()

    # Next start: the address only.
    srv.restart(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    deadline = time.monotonic() + 10
    while srv.log().count("web UI:") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    last = [l for l in srv.log().splitlines() if "web UI:" in l][-1]
    assert last.endswith(f"web UI: {url}"), last


def test_initial_password_file_goes_with_a_cli_change_or_when_stale(make_server):
    srv = make_server(start=False)
    file = srv.data / "initial-admin-password"
    initial = file.read_text().strip()
    # Another account's change leaves it.
    run(srv, "user", "add", "vera", "--role", "clinician", "--password-stdin",
        stdin=PASSWORD + "\n")
    run(srv, "user", "passwd", "vera", "--password-stdin", stdin=NEW + "\n")
    assert file.exists()
    r = run(srv, "user", "passwd", "admin", "--password-stdin", stdin=NEW + "\n")
    assert not file.exists()
    assert "removed" in r.stderr and "initial-admin-password" in r.stderr, r.stderr

    # A file whose password no longer opens admin (left by an older
    # version) goes at the next start; a current one stays.
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, (initial + "\n").encode())
    os.close(fd)
    srv.start(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    assert not file.exists()
    assert re.search(r"removed \S*initial-admin-password \(it no longer opens the admin "
                     r"account\)", srv.log()), srv.log()[-2000:]
    # Without the file, the log line gives the address only.
    deadline = time.monotonic() + 10
    while "web UI:" not in srv.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(l for l in srv.log().splitlines() if "web UI:" in l)
    assert line.endswith(f"web UI: https://127.0.0.1:{srv.http_port}/"), line
