"""Alert noise (issue 10, finding 8) against the real `bastion serve`: a scan
of 50 AE titles from one address is one unknown_device alert with a count
(not 50) and a couple of webhook posts (not 50); an administrator's routine
CLI set-up on the host opens no alert but stays in the event log and the
audit trail; web admin changes of one burst are one alert; alerts are
acknowledged in bulk (API with CSRF and the audit permission, CLI).
"""
from __future__ import annotations

import http.server
import json
import ssl
import threading
import time

import helpers
from test_admin_api import call
from test_detect import _Hook, alerts_since, all_alerts, detect_server, last_id, rules
from test_dicomweb import PASSWORD, new_token, run

SCAN_TITLES = 50


def hook_server(srv, port):
    _Hook.received = []
    httpd = http.server.HTTPServer(("127.0.0.1", port), _Hook)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(srv.data / "tls" / "server.crt", srv.data / "tls" / "server.key")
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_scan_of_50_ae_titles_is_one_alert_per_rule_and_few_posts(make_server):
    port = helpers.free_port()
    srv = make_server(start=False)
    cfg = srv.data / "bastion.toml"
    text = cfg.read_text()
    text = text.replace('webhook_url = ""', f'webhook_url = "https://127.0.0.1:{port}/hook"')
    text = text.replace('webhook_ca_file = ""',
                        f'webhook_ca_file = "{srv.data / "tls" / "ca.crt"}"')
    cfg.write_text(text)
    httpd = hook_server(srv, port)
    try:
        srv.start()
        since = last_id(srv)
        for i in range(SCAN_TITLES):
            status = helpers.echo_status(srv.plain_port, f"SCAN{i:02d}")
            assert str(status).startswith("not established"), status
        new = alerts_since(srv, since, ["association_scan", "unknown_device"])
        # One alert per rule for the burst; the unknown devices counted.
        assert rules(new) == ["association_scan", "unknown_device"], new
        unknown = next(a for a in new if a["rule"] == "unknown_device")
        assert unknown["count"] == SCAN_TITLES, unknown
        tried = unknown["details"]["varied"]["calling_ae"]
        assert sorted(tried) == [f"SCAN{i:02d}" for i in range(SCAN_TITLES)], tried
        assert unknown["details"]["peer"] == "127.0.0.1"
        # Each finding is still an event (and so in the audit trail).
        raised = [e for e in srv.events() if e.get("type") == "security.alert"
                  and e.get("rule") == "unknown_device"]
        assert len(raised) == SCAN_TITLES
        assert {e["alert_id"] for e in raised} == {unknown["id"]}
        # Webhook: rate-limited per source; the scan (high) follows the
        # unknown device (medium) once. Not 50 posts.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_Hook.received) < 2:
            time.sleep(0.2)
        time.sleep(3)  # nothing else may follow
        assert sorted(a["rule"] for a in _Hook.received) == [
            "association_scan", "unknown_device"], _Hook.received
    finally:
        httpd.shutdown()


def test_host_cli_changes_are_recorded_without_alerts(make_server):
    srv = detect_server(make_server)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    since = last_id(srv)
    srv.device_add("CT_NEW", transport="tls", allow="echo,store")
    srv.cert_issue("CT_NEW")
    srv.device_update("CT_NEW", network=None, transport=None, allow="echo,store,find")
    admin = new_token(srv, "boss2", "admin")
    run(srv, "user", "add", "nurse", "--role", "clinician", "--password-stdin",
        stdin=PASSWORD + "\n")
    run(srv, "user", "disable", "nurse")
    assert rules(alerts_since(srv, since, [], timeout=3)) == []
    kinds = {e.get("type") for e in srv.events() if e.get("actor") == "cli"}
    assert {"device.added", "device.updated", "cert.issued", "user.added",
            "token.created", "user.disabled"} <= kinds, kinds
    for kind in ("device.added", "cert.issued", "user.added", "token.created"):
        out = run(srv, "audit", "search", "--event", kind, "--json").stdout
        assert [l for l in out.splitlines() if l.strip()], f"{kind} not in the audit trail"
    # The same kind of change through the web admin API still alerts, and a
    # burst of them by one administrator is one alert with a count.
    for i in range(3):
        st, _, body = call(srv, "POST", "/api/devices", admin, {
            "ae": f"WEBDEV{i}", "network": "127.0.0.1/32", "transport": "tls",
            "allow": ["echo"]})
        assert st in (200, 201), body
    deadline = time.monotonic() + 20
    new = []
    while time.monotonic() < deadline:
        new = [a for a in all_alerts(srv) if a["id"] > since]
        if new and new[0].get("count") == 3:
            break
        time.sleep(0.3)
    assert rules(new) == ["security_change"], new
    assert new[0]["count"] == 3 and new[0]["details"]["actor"] == "boss2", new


def test_bulk_acknowledgement_api_and_cli(make_server):
    srv = detect_server(make_server)
    tokens = {r: new_token(srv, f"u-{r}", r) for r in ("auditor", "clinician", "admin")}
    since = last_id(srv)
    for ae in ("INTRUDER", "OTHER1", "OTHER2"):
        for _ in range(4):
            helpers.echo_status(srv.plain_port, ae)
    new = alerts_since(srv, since, ["association_scan", "unknown_device"])
    assert rules(new) == ["association_scan", "unknown_device"], new
    # A third alert from another source: a web admin change.
    st, _, body = call(srv, "POST", "/api/devices", tokens["admin"], {
        "ae": "WEBDEV", "network": "127.0.0.1/32", "transport": "tls", "allow": ["echo"]})
    assert st in (200, 201), body
    new = alerts_since(srv, since, ["association_scan", "unknown_device", "security_change"])
    assert len(new) == 3, new
    bulk = "/api/alerts/ack"
    everything = {"all": True, "comment": "reviewed"}
    # Refusals: no credentials, a role without the audit permission, a
    # session without its CSRF token, no selection, no comment.
    assert call(srv, "POST", bulk, None, everything)[0] == 401
    assert call(srv, "POST", bulk, tokens["clinician"], everything)[0] == 403
    st, hd, body = call(srv, "POST", "/api/login",
                        body={"username": "u-auditor", "password": PASSWORD})
    assert st == 200, body
    cookie, csrf = hd["set-cookie"].split(";")[0], body["csrf"]
    st, _, body = call(srv, "POST", bulk, {"cookie": cookie, "csrf": ""}, everything)
    assert st == 403, body
    assert call(srv, "POST", bulk, tokens["auditor"], {"comment": "x"})[0] == 400
    assert call(srv, "POST", bulk, tokens["auditor"], {"all": True})[0] == 400
    assert len([a for a in all_alerts(srv) if a["id"] > since and a["status"] == "open"]) == 3
    # By rule, with the session and its CSRF token.
    st, _, body = call(srv, "POST", bulk, {"cookie": cookie, "csrf": csrf},
                       {"rule": "unknown_device", "comment": "pentest"})
    assert st == 200, body
    unknown = next(a for a in new if a["rule"] == "unknown_device")
    assert body["acknowledged"] == [unknown["id"]] and body["count"] == 1, body
    acked = [e for e in srv.events() if e.get("type") == "alert.acknowledged"]
    assert acked[-1]["actor"] == "u-auditor" and acked[-1]["alert_ids"] == [unknown["id"]]
    # The rest from the CLI.
    assert run(srv, "alerts", "ack", "--all", check=False).returncode != 0, "comment required"
    out = run(srv, "alerts", "ack", "--all", "--comment", "all reviewed").stdout
    assert "2 alert(s) acknowledged" in out, out
    assert run(srv, "alerts", "--json").stdout.strip() == ""
    done = [a for a in all_alerts(srv) if a["id"] > since]
    assert all(a["status"] == "acknowledged" for a in done), done
    assert {a["ack"]["comment"] for a in done} == {"pentest", "all reviewed"}

