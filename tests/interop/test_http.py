"""HTTPS front end of the real binary (issue 4): TLS only, security headers,
authentication on every route, limits and timeouts, tokens, cookies, CSRF.

Standard library only (ssl, socket, http.client): no extra pip package.
"""
import http.client
import json
import socket
import ssl
import subprocess
import time

import helpers

PASSWORD = "correct horse battery staple 42"

ROUTES = [
    ("GET", "/dicomweb/studies"),
    ("POST", "/dicomweb/studies"),
    ("GET", "/dicomweb/series"),
    ("GET", "/dicomweb/instances"),
    ("GET", "/dicomweb/studies/1.2.3"),
    ("GET", "/dicomweb/studies/1.2.3/metadata"),
    ("GET", "/dicomweb/studies/1.2.3/series"),
    ("GET", "/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5"),
    ("GET", "/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5/frames/1"),
    ("GET", "/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5/rendered"),
    ("GET", "/api/me"),
    ("POST", "/api/logout"),
    ("GET", "/api/events"),
    ("GET", "/anything/else"),
]


def start(make_server, **http):
    """A server whose [http] settings are overridden by `http`."""
    srv = make_server(start=False)
    cfg = srv.data / "bastion.toml"
    text = cfg.read_text()
    for key, value in http.items():
        lines = [l for l in text.splitlines() if l.startswith(f"{key} = ")]
        assert lines, key
        text = text.replace(lines[0], f"{key} = {value}")
    cfg.write_text(text)
    srv.start()
    helpers.wait_port(srv.http_port, 30, srv.proc)
    return srv


def run(srv, *args, stdin=None):
    r = subprocess.run([str(srv.bin), "--data", str(srv.data), *args], input=stdin,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def add_user(srv, name, role):
    run(srv, "user", "add", name, "--role", role, "--password-stdin", stdin=PASSWORD + "\n")


def token(srv, name, role):
    add_user(srv, name, role)
    return run(srv, "token", "create", "--user", name, "--expires", "1d").strip().splitlines()[-1]


def ctx(srv):
    return ssl.create_default_context(cafile=str(srv.data / "tls" / "ca.crt"))


def request(srv, method, path, headers=None, body=None):
    conn = http.client.HTTPSConnection("127.0.0.1", srv.http_port, context=ctx(srv), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def raw_tls(srv, data: bytes, wait: float = 10.0) -> bytes:
    """Sends `data` over TLS and reads until the server closes or `wait` passes."""
    s = socket.create_connection(("127.0.0.1", srv.http_port), timeout=wait)
    t = ctx(srv).wrap_socket(s, server_hostname="127.0.0.1")
    try:
        t.sendall(data)
        out = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = t.recv(65536)
            except (socket.timeout, ssl.SSLError, ConnectionError):
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        t.close()


def assert_security_headers(h):
    assert h["strict-transport-security"] == "max-age=31536000"
    assert h["x-content-type-options"] == "nosniff"
    assert h["referrer-policy"] == "no-referrer"
    assert h["x-frame-options"] == "DENY"
    assert h["cache-control"] == "no-store"
    csp = h["content-security-policy"]
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp


def still_up(srv):
    status, _, _ = request(srv, "GET", "/dicomweb/studies")
    assert status == 401


def _plain(srv, request: bytes) -> bytes:
    """Sends `request` in plain text to the HTTPS port; everything it answers
    until it closes (bounded: 10 reads, 10 s each)."""
    answer = b""
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as s:
        s.sendall(request)
        for _ in range(10):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer


def test_https_only(make_server):
    """Plain HTTP on the HTTPS port gets a fixed 400 with a text hint naming
    https://, nothing else (no data, no cookie), and the connection is
    closed; HTTPS keeps working."""
    srv = start(make_server)
    answer = _plain(srv, b"GET /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                    % srv.http_port)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 400 Bad Request", answer
    headers = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:]}
    assert headers["content-type"].startswith("text/plain")
    assert headers["connection"] == "close"
    assert "set-cookie" not in headers and "location" not in headers
    assert int(headers["content-length"]) == len(body)
    assert body == b"This port speaks HTTPS: use https://127.0.0.1:%d/\n" % srv.http_port
    # a Host that is not a plain host name is not echoed: the listener's address is named
    answer = _plain(srv, b"POST /api/login HTTP/1.1\r\nHost: <b>x</b>\r\nContent-Length: 0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"<b>" not in answer
    assert answer.endswith(b"use https://127.0.0.1:%d/\n" % srv.http_port)
    still_up(srv)


def test_every_route_needs_credentials_and_401_has_security_headers(make_server):
    srv = start(make_server)
    for method, path in ROUTES:
        status, h, body = request(srv, method, path, body=b"" if method == "POST" else None)
        assert status == 401, (method, path, status)
        assert h["www-authenticate"].startswith("Bearer")
        assert_security_headers(h)
        assert json.loads(body)["status"] == 401


def test_oversize_content_length_is_413_and_server_stays_up(make_server):
    srv = start(make_server)
    t = token(srv, "tech", "technologist")
    answer = raw_tls(srv, (
        "POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {t}\r\n"
        "Content-Type: multipart/related; type=\"application/dicom\"; boundary=B\r\n"
        "Content-Length: 4294967295\r\n\r\n").encode(), wait=5)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    still_up(srv)


def test_slow_body_is_408(make_server):
    srv = start(make_server, body_timeout_secs=2)
    t = token(srv, "tech", "technologist")
    started = time.monotonic()
    answer = raw_tls(srv, (
        "POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {t}\r\n"
        "Content-Type: multipart/related; type=\"application/dicom\"; boundary=B\r\n"
        "Content-Length: 100000\r\n\r\n--B\r\n").encode(), wait=15)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 10
    still_up(srv)


def test_slow_headers_are_cut_off(make_server):
    srv = start(make_server, header_timeout_secs=2)
    started = time.monotonic()
    raw_tls(srv, b"GET /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", wait=20)
    assert time.monotonic() - started < 10
    still_up(srv)


def test_gzip_body_is_415(make_server):
    srv = start(make_server)
    t = token(srv, "tech", "technologist")
    status, h, _ = request(srv, "POST", "/dicomweb/studies", body=b"\x1f\x8b\x08\x00", headers={
        "Authorization": f"Bearer {t}", "Content-Encoding": "gzip",
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
    assert status == 415
    assert_security_headers(h)


def test_token_in_query_string_is_refused(make_server):
    srv = start(make_server)
    t = token(srv, "doc", "clinician")
    status, _, _ = request(srv, "GET", "/dicomweb/studies", headers={"Authorization": f"Bearer {t}"})
    assert status == 200
    for q in (f"access_token={t}", f"token={t}", f"access%5Ftoken={t}", f"%74oken={t}"):
        status, _, _ = request(srv, "GET", f"/dicomweb/studies?{q}")
        assert status == 400, q
    # a control character in a QIDO matching value is refused, not matched
    for q in ("PatientName=%00", "PatientID=a%1Bb"):
        status, _, body = request(srv, "GET", f"/dicomweb/studies?{q}",
                                  headers={"Authorization": f"Bearer {t}"})
        assert status == 400 and b"control characters" in body, (q, status, body)


def test_roles(make_server):
    srv = start(make_server)
    doc = token(srv, "doc", "clinician")
    aud = token(srv, "aud", "auditor")
    # No token can be made for a researcher (the role allows nothing): log in.
    add_user(srv, "res", "researcher")
    login = json.dumps({"username": "res", "password": PASSWORD}).encode()
    status, h, _ = request(srv, "POST", "/api/login", {"Content-Type": "application/json"}, login)
    assert status == 200
    res_cookie = {"Cookie": h["set-cookie"].split(";")[0]}
    auth = lambda t: {"Authorization": f"Bearer {t}"}  # noqa: E731
    assert request(srv, "GET", "/dicomweb/studies", auth(doc))[0] == 200
    stow = {**auth(doc), "Content-Type": 'multipart/related; type="application/dicom"; boundary=B'}
    assert request(srv, "POST", "/dicomweb/studies", stow, b"--B--\r\n")[0] == 403
    assert request(srv, "GET", "/dicomweb/studies", auth(aud))[0] == 403
    status, _, body = request(srv, "GET", "/api/events", auth(aud))
    assert status == 200 and isinstance(json.loads(body), list)
    assert request(srv, "GET", "/dicomweb/studies", res_cookie)[0] == 403
    assert request(srv, "GET", "/dicomweb/studies/1.2.3", res_cookie)[0] == 403
    assert request(srv, "GET", "/api/events", res_cookie)[0] == 403


def test_login_cookie_flags_and_csrf(make_server):
    srv = start(make_server)
    add_user(srv, "alice", "technologist")
    body = json.dumps({"username": "alice", "password": PASSWORD}).encode()
    status, h, resp = request(srv, "POST", "/api/login", {"Content-Type": "application/json"}, body)
    assert status == 200, resp
    cookie = h["set-cookie"]
    for flag in ("bastion_session=", "HttpOnly", "Secure", "SameSite=Strict", "Path=/", "Max-Age="):
        assert flag in cookie, cookie
    session = cookie.split(";")[0]
    csrf = json.loads(resp)["csrf"]
    # Wrong password and unknown user: the same 401 body.
    wrong = json.dumps({"username": "alice", "password": "not the password"}).encode()
    unknown = json.dumps({"username": "nobody", "password": "not the password"}).encode()
    a = request(srv, "POST", "/api/login", {"Content-Type": "application/json"}, wrong)
    b = request(srv, "POST", "/api/login", {"Content-Type": "application/json"}, unknown)
    assert a[0] == b[0] == 401 and a[2] == b[2]
    # Another origin may not log in.
    evil = {"Content-Type": "application/json", "Origin": "https://evil.example"}
    assert request(srv, "POST", "/api/login", evil, body)[0] == 403
    # The session works for reads; state changes need the CSRF token.
    assert request(srv, "GET", "/api/me", {"Cookie": session})[0] == 200
    assert request(srv, "POST", "/api/logout", {"Cookie": session})[0] == 403
    assert request(srv, "POST", "/api/logout", {"Cookie": session, "X-CSRF-Token": "x" * 43})[0] == 403
    status, h, _ = request(srv, "POST", "/api/logout", {"Cookie": session, "X-CSRF-Token": csrf})
    assert status == 204
    assert "Max-Age=0" in h["set-cookie"]
    assert request(srv, "GET", "/api/me", {"Cookie": session})[0] == 401
