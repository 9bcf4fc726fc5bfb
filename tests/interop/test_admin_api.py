"""The admin / security-officer JSON API of the real binary (issue 6):
devices (and that a change applies to the next DICOM association, without a
restart), users, alert evidence and acknowledgement, the audit chain status
and the security posture; and, for every new endpoint, 401 without
credentials, 403 for the wrong role and 403 for a cookie session without
its X-CSRF-Token.

Standard library HTTP (http.client, ssl), pynetdicom for the associations.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.client
import json
import re
import ssl
import struct
import subprocess
import time
import urllib.parse

import pytest

import helpers
from conftest import Server
from helpers import NOT_AUTHORIZED, SUCCESS
from test_refusals import RJ_CALLING, rj

PASSWORD = "correct horse battery staple 42"
WAIT = 20  # seconds: inventory and detection are asynchronous


# ---------------------------------------------------------------- helpers

def run(srv: Server, *args, stdin=None, check=True):
    r = subprocess.run([str(srv.bin), "--data", str(srv.data), *args], input=stdin,
                       capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def add_user(srv, name, role):
    run(srv, "user", "add", name, "--role", role, "--password-stdin", stdin=PASSWORD + "\n")


def new_token(srv, name, role):
    add_user(srv, name, role)
    out = run(srv, "token", "create", "--user", name, "--expires", "1d").stdout
    return out.strip().splitlines()[-1]


def call(srv, method, path, auth=None, body=None, headers=None):
    """(status, headers, parsed JSON or raw bytes). `auth`: a bearer token
    (str), a session dict {"cookie", "csrf"} (csrf None: not sent), or None."""
    h = dict(headers or {})
    if isinstance(auth, str):
        h["Authorization"] = f"Bearer {auth}"
    elif isinstance(auth, dict):
        h["Cookie"] = auth["cookie"]
        if auth.get("csrf"):
            h["X-CSRF-Token"] = auth["csrf"]
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    ctx = ssl.create_default_context(cafile=str(srv.data / "tls" / "ca.crt"))
    conn = http.client.HTTPSConnection("localhost", srv.http_port, context=ctx, timeout=60)
    try:
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        raw = r.read()
        hd = {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw
    return r.status, hd, parsed


def totp(uri: str, at: float | None = None) -> str:
    """The RFC 6238 code of an otpauth:// URI now."""
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(uri).query))
    secret = q["secret"]
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    digits = int(q.get("digits", 6))
    period = int(q.get("period", 30))
    algo = {"SHA1": hashlib.sha1, "SHA256": hashlib.sha256,
            "SHA512": hashlib.sha512}[q.get("algorithm", "SHA1").upper()]
    counter = int((at or time.time()) // period)
    mac = hmac.new(key, struct.pack(">Q", counter), algo).digest()
    o = mac[-1] & 0x0F
    code = (struct.unpack(">I", mac[o:o + 4])[0] & 0x7FFFFFFF) % 10 ** digits
    return f"{code:0{digits}d}"


def login(srv, username, password, totp_code=None):
    """POST /api/login, waiting out a 429 (per-address back-off) at most 5 times."""
    body = {"username": username, "password": password}
    if totp_code:
        body["totp"] = totp_code
    for _ in range(5):
        st, hd, resp = call(srv, "POST", "/api/login", body=body)
        if st != 429:
            return st, hd, resp
        time.sleep(float(hd.get("retry-after", "1")))
    return st, hd, resp


def rfc3339(s: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))


def wait_for(what, fn, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def device(srv, token, ae):
    st, _, body = call(srv, "GET", "/api/devices", token)
    assert st == 200, body
    return next((d for d in body if d["ae"] == ae), None)


def events_of(srv, kind):
    return [e for e in srv.events() if e.get("type") == kind]


# ---------------------------------------------------------------- fixture

@pytest.fixture(scope="module")
def api(bastion_bin, tmp_path_factory):
    """A server (TLS, plain and HTTPS listeners) with an admin `boss` (a
    token, and a browser session after a TOTP login), a clinician and an
    auditor token. The `admin` account of `bastion init` stays without TOTP."""
    srv = Server(bastion_bin, tmp_path_factory.mktemp("admin-api"))
    srv.init()
    # Short login back-off: the tests log in after failures from 127.0.0.1.
    cfg = srv.data / "bastion.toml"
    text = cfg.read_text()
    for key, value in (("base_delay_ms", 1), ("max_delay_secs", 1),
                       ("per_address_max_delay_secs", 1)):
        line = next(l for l in text.splitlines() if l.startswith(f"{key} = "))
        text = text.replace(line, f"{key} = {value}")
    cfg.write_text(text)
    srv.start(plain=True)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    tokens = {"admin": new_token(srv, "boss", "admin"),
              "clinician": new_token(srv, "doc", "clinician"),
              "auditor": new_token(srv, "aud", "auditor")}
    uri = run(srv, "user", "totp-enable", "boss").stdout.strip().splitlines()[-1]
    st, hd, body = call(srv, "POST", "/api/login",
                        body={"username": "boss", "password": PASSWORD, "totp": totp(uri)})
    assert st == 200, body
    session = {"cookie": hd["set-cookie"].split(";")[0], "csrf": body["csrf"]}
    yield srv, tokens, session
    srv.stop()


# ---------------------------------------------------------------- access

# (method, path, body, who may: "admin" or "audit")
ENDPOINTS = [
    ("GET", "/api/devices", None, "admin"),
    ("GET", "/api/devices/unknown", None, "admin"),
    ("POST", "/api/devices", {"ae": "NEVER", "network": "127.0.0.1/32", "transport": "tls",
                              "allow": ["echo"]}, "admin"),
    ("PUT", "/api/devices/NEVER", {"allow": ["store"]}, "admin"),
    ("DELETE", "/api/devices/NEVER", None, "admin"),
    ("GET", "/api/users", None, "admin"),
    ("POST", "/api/users", {"username": "never", "role": "auditor"}, "admin"),
    ("POST", "/api/users/admin/disable", None, "admin"),
    ("POST", "/api/users/admin/enable", None, "admin"),
    ("POST", "/api/users/admin/unlock", None, "admin"),
    ("POST", "/api/users/admin/password", None, "admin"),
    ("GET", "/api/posture", None, "admin"),
    ("GET", "/api/alerts/99999", None, "audit"),
    ("POST", "/api/alerts/99999/ack", {"comment": "never"}, "audit"),
    ("GET", "/api/audit/chain", None, "audit"),
]


def test_every_endpoint_needs_credentials_the_role_and_csrf(api):
    srv, tokens, session = api
    before = len(srv.events())
    for method, path, body, who in ENDPOINTS:
        st, hd, resp = call(srv, method, path, None, body)
        assert st == 401, (method, path, st, resp)
        assert hd.get("www-authenticate", "").startswith("Bearer"), (method, path)
        st, _, resp = call(srv, method, path, tokens["clinician"], body)
        assert st == 403, (method, path, st, resp)
        st, _, resp = call(srv, method, path, tokens["auditor"], body)
        if who == "admin":
            assert st == 403, (method, path, st, resp)
        else:
            assert st != 403 and st != 401, (method, path, st, resp)
        if method != "GET":
            st, _, resp = call(srv, method, path, {**session, "csrf": None}, body)
            assert st == 403, (method, path, st, resp)
            assert "CSRF" in resp["error"], resp
            st, _, resp = call(srv, method, path, {**session, "csrf": "x" * 43}, body)
            assert st == 403, (method, path, st, resp)
    # None of the refused requests changed anything.
    types = {e["type"] for e in srv.events()[before:]}
    assert not types & {"device.added", "device.updated", "device.removed", "user.added",
                        "user.disabled", "user.enabled", "user.unlocked",
                        "user.password_set", "alert.acknowledged"}, types
    # The browser session with its CSRF token works for reads and changes.
    st, _, body = call(srv, "GET", "/api/devices", session)
    assert st == 200 and isinstance(body, list), body
    st, _, body = call(srv, "DELETE", "/api/devices/NEVER", session)
    assert st == 404, body


# ---------------------------------------------------------------- devices

def test_device_changes_over_the_api_apply_to_the_next_association(api):
    srv, tokens, session = api
    admin = tokens["admin"]
    assert rj(srv.plain_port, "APIDEV") == RJ_CALLING
    body = {"ae": "APIDEV", "network": "127.0.0.1/32", "transport": "plain",
            "allow": ["echo", "store"], "host": "127.0.0.1", "port": 11112}
    st, _, dev = call(srv, "POST", "/api/devices", session, body)
    assert st == 201, dev
    assert dev["ae"] == "APIDEV" and dev["transport"] == "plain" and dev["plaintext"] is True
    assert dev["allow"] == ["echo", "store"]
    assert (dev["host"], dev["port"], dev["on_conflict"]) == ("127.0.0.1", 11112, "refuse")
    assert dev["inventory"] is None and dev["last_rejected"] is None
    # The CLI sees the same device, field for field.
    cli = next(d for d in srv.device_list() if d["ae"] == "APIDEV")
    for k, v in cli.items():
        assert dev[k] == v, (k, dev[k], v)
    # Effective at once: the next association is accepted.
    assert srv.echo("APIDEV", tls=False) == SUCCESS
    inv = wait_for("the inventory entry", lambda: (device(srv, admin, "APIDEV") or {})
                   .get("inventory"))
    assert inv["transport"] == "plain"
    assert rfc3339(inv["first_seen"]) <= rfc3339(inv["last_seen"])
    # Same AE again: 409; bad fields: 400 naming them.
    st, _, err = call(srv, "POST", "/api/devices", admin, body)
    assert st == 409 and "APIDEV" in err["error"], err
    for bad, field in [({**body, "ae": "X2", "network": "127.0.0.1/8"}, "network"),
                       ({**body, "ae": "X2", "transport": "ftp"}, "transport"),
                       ({**body, "ae": "X2", "allow": ["fly"]}, "allow"),
                       ({**body, "ae": "X2", "port": None}, "host"),
                       ({**body, "ae": "X2", "colour": "red"}, "colour")]:
        st, _, err = call(srv, "POST", "/api/devices", admin, bad)
        assert st == 400 and field in err["error"], (bad, err)
    # Permission removed: the echo is refused (0x0124), and is the device's
    # last refusal.
    st, _, dev = call(srv, "PUT", "/api/devices/APIDEV", admin, {"allow": ["store"]})
    assert st == 200 and dev["allow"] == ["store"] and dev["transport"] == "plain", dev
    assert srv.echo("APIDEV", tls=False) == NOT_AUTHORIZED
    rej = wait_for("the permission refusal", lambda: (device(srv, admin, "APIDEV") or {})
                   .get("last_rejected"))
    assert rej["reason"] == "permission_denied:echo" and rej["address"] == "127.0.0.1", rej
    # Network moved away: the association is refused (A-ASSOCIATE-RJ).
    st, _, dev = call(srv, "PUT", "/api/devices/APIDEV", admin,
                      {"network": "10.0.0.0/8", "allow": ["echo"]})
    assert st == 200 and dev["network"] == "10.0.0.0/8", dev
    assert rj(srv.plain_port, "APIDEV") == RJ_CALLING
    rej = wait_for("the network refusal", lambda: (
        (device(srv, admin, "APIDEV") or {}).get("last_rejected") or {}).get("reason")
        == "address_outside_network" and device(srv, admin, "APIDEV")["last_rejected"])
    assert rej["address"] == "127.0.0.1"
    assert rfc3339(rej["at"]) <= datetime.datetime.now(datetime.timezone.utc)
    # Back, then removed: accepted, then refused, without a restart.
    st, _, dev = call(srv, "PUT", "/api/devices/APIDEV", admin,
                      {"network": "127.0.0.1/32", "host": None, "port": None})
    assert st == 200 and dev["host"] is None and dev["port"] is None, dev
    assert srv.echo("APIDEV", tls=False) == SUCCESS
    st, _, _ = call(srv, "DELETE", "/api/devices/APIDEV", session)
    assert st == 204
    assert rj(srv.plain_port, "APIDEV") == RJ_CALLING
    assert device(srv, admin, "APIDEV") is None
    assert call(srv, "DELETE", "/api/devices/APIDEV", admin)[0] == 404
    assert call(srv, "PUT", "/api/devices/APIDEV", admin, {"allow": ["echo"]})[0] == 404
    assert srv.starts == 1
    # Recorded as the CLI records them, with the web user as actor ...
    added = [e for e in events_of(srv, "device.added") if e["device"]["ae"] == "APIDEV"]
    assert len(added) == 1 and added[0]["actor"] == "boss"
    updated = [e for e in events_of(srv, "device.updated") if e["device"]["ae"] == "APIDEV"]
    assert [e["device"]["network"] for e in updated] == ["127.0.0.1/32", "10.0.0.0/8",
                                                         "127.0.0.1/32"]
    assert all(e["actor"] == "boss" for e in updated)
    removed = [e for e in events_of(srv, "device.removed") if e["ae"] == "APIDEV"]
    assert len(removed) == 1 and removed[0]["actor"] == "boss"
    # ... so the audit trail names boss in the same DICOM audit message.
    st, _, found = call(srv, "GET", "/api/audit?event=device.added&user=boss",
                        tokens["auditor"])
    assert st == 200 and found, found
    rec = found[-1]
    assert rec["user"] == "boss" and "boss" in rec["messages"][0], rec
    assert "Security Alert" in json.dumps(rec["event_ids"]), rec["event_ids"]


# ---------------------------------------------------------------- users

def test_users_over_the_api(api):
    srv, tokens, session = api
    admin = tokens["admin"]
    st, _, made = call(srv, "POST", "/api/users", session,
                       {"username": "newbie", "role": "clinician"})
    assert st == 201, made
    assert made["username"] == "newbie" and made["role"] == "clinician"
    password = made["password"]
    assert len(password) >= 12
    assert password not in (srv.data / "events" / "events.log").read_text()
    st, _, listed = call(srv, "GET", "/api/users", admin)
    assert st == 200
    text = json.dumps(listed)
    assert "argon2" not in text and password not in text
    u = next(x for x in listed if x["username"] == "newbie")
    assert (u["role"], u["disabled"], u["locked"], u["totp"], u["must_change_password"]) == \
        ("clinician", False, False, False, True)
    assert next(x for x in listed if x["username"] == "boss")["totp"] is True
    # The generated password logs in, and must be changed first.
    st, _, body = login(srv, "newbie", password)
    assert st == 200 and body["must_change_password"] is True, body
    # A name equal to an existing one but for letter case: 409, saying so.
    st, _, err = call(srv, "POST", "/api/users", admin, {"username": "NewBie", "role": "admin"})
    assert st == 409, err
    assert err["error"] == ("user name NewBie differs from the existing user newbie only in "
                            "letter case; user names must differ by more than case"), err
    assert "NewBie" not in {u["username"] for u in call(srv, "GET", "/api/users", admin)[2]}
    for bad, want in [({"username": "newbie", "role": "clinician"}, 409),
                      ({"username": "x", "role": "root"}, 400),
                      ({"username": "bad name", "role": "clinician"}, 400),
                      ({"username": "x"}, 400)]:
        st, _, err = call(srv, "POST", "/api/users", admin, bad)
        assert st == want, (bad, err)
    # Disable: the login fails; enable: it works again.
    st, _, u = call(srv, "POST", "/api/users/newbie/disable", session)
    assert st == 200 and u["disabled"] is True, u
    assert login(srv, "newbie", password)[0] == 401
    st, _, u = call(srv, "POST", "/api/users/newbie/enable", admin)
    assert st == 200 and u["disabled"] is False, u
    st, _, u = call(srv, "POST", "/api/users/newbie/unlock", admin)
    assert st == 200 and u["locked"] is False and u["failed_logins"] == 0, u
    # Reset: a new generated password; the old one stops working.
    st, _, body = call(srv, "POST", "/api/users/newbie/password", admin)
    assert st == 200, body
    new = body["password"]
    assert new != password and len(new) >= 12
    assert login(srv, "newbie", password)[0] == 401
    st, _, body = login(srv, "newbie", new)
    assert st == 200 and body["must_change_password"] is True, body
    # An admin cannot disable (or reset) their own account.
    st, _, err = call(srv, "POST", "/api/users/boss/disable", admin)
    assert st == 409 and "own account" in err["error"], err
    assert call(srv, "POST", "/api/users/boss/password", admin)[0] == 409
    for verb in ("disable", "enable", "unlock", "password"):
        assert call(srv, "POST", f"/api/users/nobody/{verb}", admin)[0] == 404, verb
    # The CLI agrees, and the events name boss.
    cli = {u["username"]: u for u in json.loads(run(srv, "user", "list", "--json").stdout)}
    assert cli["newbie"]["must_change_password"] is True and cli["newbie"]["disabled"] is False
    for kind in ("user.added", "user.disabled", "user.enabled", "user.unlocked",
                 "user.password_set"):
        e = [x for x in events_of(srv, kind) if x.get("username") == "newbie"]
        assert len(e) == 1 and e[0]["actor"] == "boss", (kind, e)


def test_the_last_enabled_admin_is_kept(api):
    """`admin` (no TOTP) and `boss` are the admins; boss disables admin,
    and then nobody can disable boss: not boss (own account); the CLI's
    last-admin rule holds underneath."""
    srv, tokens, _ = api
    admin = tokens["admin"]
    st, _, u = call(srv, "POST", "/api/users/admin/disable", admin)
    assert st == 200 and u["disabled"] is True
    try:
        r = run(srv, "user", "disable", "boss", check=False)
        assert r.returncode != 0 and "last enabled admin" in r.stderr
        st, _, err = call(srv, "POST", "/api/users/boss/disable", admin)
        assert st == 409, err
    finally:
        st, _, u = call(srv, "POST", "/api/users/admin/enable", admin)
        assert st == 200 and u["disabled"] is False


# ---------------------------------------------------------------- alerts

def test_alert_evidence_and_acknowledgement(api):
    srv, tokens, session = api
    auditor = tokens["auditor"]
    st, _, listed = call(srv, "GET", "/api/alerts?all=true", auditor)
    since = max((a["id"] for a in listed), default=0)
    for _ in range(12):
        status = helpers.echo_status(srv.plain_port, "INTRUDER")
        assert str(status).startswith("not established"), status

    def scan():
        st, _, listed = call(srv, "GET", "/api/alerts", auditor)
        assert st == 200
        return next((a for a in listed if a["rule"] == "association_scan"
                     and a["id"] > since), None)

    alert = wait_for("the association_scan alert", scan)
    st, _, got = call(srv, "GET", f"/api/alerts/{alert['id']}", auditor)
    assert st == 200, got
    assert {k: got[k] for k in alert} == alert
    # The last ten rejections from 127.0.0.1 (the scan's key is the address;
    # earlier tests' refusals from it may be among them), ending with ours.
    ev = got["evidence"]
    assert len(ev) == 10, ev
    assert ev[-1]["ae"] == "INTRUDER"
    assert sum(e["ae"] == "INTRUDER" for e in ev) >= 6, ev
    for e in ev:
        assert e["type"] == "association.rejected" and e["outcome"] == "refused", e
        assert e["peer"] == "127.0.0.1" and e["reason"], e
        assert set(e) <= {"ts", "type", "outcome", "user", "actor", "ae", "peer", "source",
                          "reason", "action", "status"}, e
    times = [rfc3339(e["ts"]) for e in ev]
    assert times == sorted(times)
    assert rfc3339(ev[-1]["ts"]) <= rfc3339(got["ts"])
    # The unknown device is listed for the admin.
    st, _, unknown = call(srv, "GET", "/api/devices/unknown", tokens["admin"])
    assert st == 200
    row = next(u for u in unknown if u["address"] == "127.0.0.1")
    assert "INTRUDER" in row["ae_titles"] and row["attempts"] >= 12
    # Acknowledge: comment required, at most 1000 characters, once.
    ack = f"/api/alerts/{alert['id']}/ack"
    for bad in ({"comment": "  "}, {"comment": "x" * 1001}, {}, {"comment": "ok", "by": "x"}):
        st, _, err = call(srv, "POST", ack, auditor, bad)
        assert st == 400, (bad, err)
    st, _, acked = call(srv, "POST", ack, auditor, {"comment": "pentest by the IT team"})
    assert st == 200, acked
    assert acked["status"] == "acknowledged" and acked["id"] == alert["id"]
    assert acked["ack"]["by"] == "aud" and acked["ack"]["comment"] == "pentest by the IT team"
    st, _, err = call(srv, "POST", ack, session, {"comment": "again"})
    assert st == 409 and "already acknowledged" in err["error"], err
    assert call(srv, "GET", "/api/alerts/99999", auditor)[0] == 404
    assert call(srv, "POST", "/api/alerts/99999/ack", auditor, {"comment": "x"})[0] == 404
    # The CLI sees the acknowledgement; the event names the web user.
    cli = [json.loads(l) for l in run(srv, "alerts", "--all", "--json").stdout.splitlines()]
    mine = next(a for a in cli if a["id"] == alert["id"])
    assert mine["status"] == "acknowledged" and mine["ack"]["by"] == "aud"
    e = [x for x in events_of(srv, "alert.acknowledged") if x["alert_id"] == alert["id"]]
    assert len(e) == 1 and e[0]["actor"] == "aud" and e[0]["rule"] == "association_scan"


def test_failed_logins_alert_has_the_failures_as_evidence(api):
    srv, tokens, _ = api
    add_user(srv, "victim", "clinician")
    for i in range(5):
        st, _, _ = call(srv, "POST", "/api/login",
                        body={"username": "victim", "password": f"wrong password {i:04d}"})
        assert st in (401, 429), st
        time.sleep(0.05)

    def brute():
        st, _, listed = call(srv, "GET", "/api/alerts", tokens["auditor"])
        return next((a for a in listed if a["rule"] == "login_brute_force"
                     and a["details"]["username"] == "victim"), None)

    alert = wait_for("the login_brute_force alert", brute)
    st, _, got = call(srv, "GET", f"/api/alerts/{alert['id']}", tokens["admin"])
    assert st == 200
    # The five attempts on this account (a throttled one is a refusal); the
    # address's other recent failures too when they alone reached the
    # threshold (earlier tests fail logins from 127.0.0.1 as well).
    ev = got["evidence"]
    victim = [e for e in ev if e.get("user") == "victim"]
    assert len(victim) == 5, ev
    assert all(e["type"] in ("login.failure", "login.refused")
               and e["source"] == "127.0.0.1" for e in ev), ev
    assert victim[0]["type"] == "login.failure" and victim[0]["reason"] == "wrong_password"
    assert len(ev) == 5 or got["details"]["failures_from_address"] >= 5, got
    assert "wrong password" not in json.dumps(got)


# ---------------------------------------------------------------- audit chain

def test_audit_chain_status(api):
    srv, tokens, _ = api
    st, _, chain = call(srv, "GET", "/api/audit/chain", tokens["auditor"])
    assert st == 200, chain
    assert chain["ok"] is True and chain["problems"] == [], chain
    assert chain["records"] > 10 and chain["checkpoints"] >= 0
    if chain["checkpoints"]:
        assert rfc3339(chain["last_checkpoint"]) <= rfc3339(chain["checked_at"])
    else:
        assert chain["last_checkpoint"] is None
    checked = rfc3339(chain["checked_at"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - checked).total_seconds()) < 60
    # The CLI agrees on the records verified then.
    out = run(srv, "audit", "verify").stdout
    m = re.search(r"intact: (\d+) records", out)
    assert m and int(m.group(1)) >= chain["records"], out
    # Each verification is recorded with the web user; within a minute the
    # answer comes from the cache (admins may read it too), not verified again.
    def web_verifications():
        return [e for e in events_of(srv, "audit.verify") if e.get("actor") in ("aud", "boss")]

    done = web_verifications()
    assert done and done[-1]["result"] == "intact" and done[-1]["outcome"] == "success", done
    st, _, again = call(srv, "GET", "/api/audit/chain", tokens["admin"])
    assert st == 200 and again == chain
    assert len(web_verifications()) == len(done)


# ---------------------------------------------------------------- posture

def test_posture(api):
    srv, tokens, session = api
    st, _, dev = call(srv, "POST", "/api/devices", session,
                      {"ae": "OLDMOD", "network": "127.0.0.1/32", "transport": "plain",
                       "allow": ["store"]})
    assert st == 201, dev
    try:
        st, _, p = call(srv, "GET", "/api/posture", tokens["admin"])
        assert st == 200, p
        listeners = {l["name"]: l for l in p["listeners"]}
        assert listeners == {
            "dicom-tls": {"name": "dicom-tls", "address": f"127.0.0.1:{srv.tls_port}",
                          "exposure": "loopback", "tls": True},
            "dicom-plain": {"name": "dicom-plain", "address": f"127.0.0.1:{srv.plain_port}",
                            "exposure": "loopback", "tls": False},
            "https": {"name": "https", "address": f"127.0.0.1:{srv.http_port}",
                      "exposure": "loopback", "tls": True},
        }
        assert "OLDMOD" in p["plaintext_devices"]
        assert "admin" in p["admins_without_totp"] and "boss" not in p["admins_without_totp"]
        assert p["admin_requires_totp"] is True
        assert isinstance(p["open_alerts"], int) and p["open_alerts"] >= 1
        by = p["open_alerts_by_severity"]
        assert set(by) == {"high", "medium", "low"} and sum(by.values()) == p["open_alerts"], p
        # admin API changes (this device, earlier tests') are low-severity
        # alerts; the CLI set-up on the host raised none
        assert by["low"] >= 1, by
        # the plain listener is there: the plain device can connect
        assert not any("no plain listener" in w for w in p["warnings"]), p["warnings"]
        for which, low, high in (("server_certificate", 800, 825),
                                 ("ca_certificate", 3600, 3650)):
            c = p[which]
            assert low <= c["days_left"] <= high, (which, c)
            assert "CN=" in c["subject"], c
            left = rfc3339(c["not_after"]) - datetime.datetime.now(datetime.timezone.utc)
            assert abs(left.days - c["days_left"]) <= 1, c
        w = "\n".join(p["warnings"])
        assert f"dicom-plain listener on 127.0.0.1:{srv.plain_port}" in w, w
        assert "device OLDMOD uses the plain transport" in w, w
        assert "admin account admin has no second factor" in w, w
        urgent = by["high"] + by["medium"]
        if urgent:
            assert f"{urgent} open high/medium-severity alert" in w, w
        else:
            assert "open" not in w, w
        assert "admin account boss" not in w, w
    finally:
        assert call(srv, "DELETE", "/api/devices/OLDMOD", tokens["admin"])[0] == 204


def test_posture_counts_urgent_alerts_and_plain_devices_without_a_listener(make_server):
    """serve without a plain listener: a device registered with the plain
    transport cannot connect (a warning); an administrator's changes through
    the admin API are low-severity alerts (counted, no warning; the same on
    the host's CLI are routine, no alert); an unknown device trying to
    connect is a medium one (a warning)."""
    srv = make_server(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    admin = run(srv, "token", "create", "--user", "admin",
                "--expires", "1h").stdout.strip().splitlines()[-1]
    st, _, body = call(srv, "POST", "/api/devices", admin, {
        "ae": "OLDMOD", "network": "127.0.0.1/32", "transport": "plain", "allow": ["store"]})
    assert st in (200, 201), body

    def posture():
        st, _, p = call(srv, "GET", "/api/posture", admin)
        assert st == 200, p
        return p

    p = wait_for("the change alert", lambda: (lambda p: p if p["open_alerts"] >= 1 else None)(
        posture()))
    assert p["open_alerts_by_severity"] == {"high": 0, "medium": 0, "low": p["open_alerts"]}, p
    assert [l["name"] for l in p["listeners"]] == ["dicom-tls", "https"]
    assert p["plaintext_devices"] == ["OLDMOD"]
    assert ("device OLDMOD uses the plain transport but cannot connect: no plain listener "
            "(start serve with --dicom-plain-addr, or register it with transport tls)"
            in p["warnings"]), p["warnings"]
    assert not any("alert" in w for w in p["warnings"]), p["warnings"]

    status = srv.echo("INTRUDER")
    assert str(status).startswith("not established"), status
    p = wait_for("the unknown_device alert",
                 lambda: (lambda p: p if p["open_alerts_by_severity"]["medium"] else None)(
                     posture()))
    assert p["open_alerts_by_severity"]["medium"] == 1 and p["open_alerts_by_severity"]["high"] == 0
    assert "1 open high/medium-severity alert to review" in p["warnings"], p["warnings"]
