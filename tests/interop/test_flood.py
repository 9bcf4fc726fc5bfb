"""Socket floods (issue 10, finding 3): idle and slowloris sockets, from
hundreds of addresses (127.0.3.x) and from the client's own address
(127.0.0.1), on the HTTPS port and the DICOM ports, leave a login, a QIDO-RS
and a C-ECHO from 127.0.0.1 answering, and the server closes the idle and
slow sockets within 30 s.

Every loop is bounded in count and time; every wait has a wide deadline.
"""
import http.client
import json
import resource
import selectors
import socket
import ssl
import subprocess
import time

import helpers
from test_http import PASSWORD, add_user
from test_interop import DCMTK_ENV, dcmtk_tls_args

FLOOD_ADDRESSES = 200      # 127.0.3.1 .. 127.0.3.200
FLOOD_SPREAD = 300         # idle sockets over those addresses (past 256)
FLOOD_OWN = 200            # idle sockets from the client's own address
SLOWLORIS = 5              # per port
CLOSE_WITHIN = 30.0        # the server must close idle/slow sockets by then
LIVENESS = 30.0            # wide deadline for each client operation


def raise_nofile(want=8192):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def idle_sockets(port, sources):
    """One TCP connection (no byte sent) per source address in `sources`."""
    out = []
    for src in sources:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.bind((src, 0))
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        out.append(s)
    return out


def flood_sources():
    spread = [f"127.0.3.{i % FLOOD_ADDRESSES + 1}" for i in range(FLOOD_SPREAD)]
    return spread + ["127.0.0.1"] * FLOOD_OWN


def https_slowloris(srv, n):
    """TLS done, a request head started and never finished."""
    ctx = ssl.create_default_context(cafile=str(srv.data / "tls" / "ca.crt"))
    out = []
    for i in range(n):
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.settimeout(10)
        raw.bind((f"127.0.3.{FLOOD_ADDRESSES + 1 + i}", 0))
        raw.connect(("127.0.0.1", srv.http_port))
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.sendall(b"GET /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        out.append(s)
    return out


def dicom_slowloris(port, n):
    """Plain DICOM: the first bytes of an A-ASSOCIATE-RQ and nothing more."""
    rq = helpers.associate_rq("FLOODER")
    out = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        s.bind((f"127.0.3.{FLOOD_ADDRESSES + 1 + i}", 0))
        s.connect(("127.0.0.1", port))
        s.sendall(rq[:10])
        out.append(s)
    return out


def trickle(socks, data):
    """Send one more slow byte on each socket still open (errors mean closed)."""
    for s in socks:
        try:
            s.sendall(data)
        except (OSError, ssl.SSLError):
            pass


def wait_all_closed(socks, deadline, slow=(), slow_bytes=()):
    """Sockets (of `socks`) the server has not closed by `deadline`: each is
    closed when a read returns EOF or fails. `slow` sockets get a byte a
    second meanwhile (a slowloris keeps talking)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_ = set(socks)
    next_trickle = time.monotonic()
    while open_ and time.monotonic() < deadline:
        if time.monotonic() >= next_trickle:
            for group, data in zip(slow, slow_bytes):
                trickle([s for s in group if s in open_], data)
            next_trickle = time.monotonic() + 1.0
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except (BlockingIOError, ssl.SSLWantReadError):
                continue
            except (OSError, ssl.SSLError):
                data = b""
            if not data:
                sel.unregister(s)
                open_.discard(s)
    sel.close()
    return open_


def login_and_qido(srv):
    ctx = ssl.create_default_context(cafile=str(srv.data / "tls" / "ca.crt"))
    conn = http.client.HTTPSConnection("127.0.0.1", srv.http_port, context=ctx, timeout=LIVENESS)
    try:
        conn.request("POST", "/api/login", body=json.dumps(
            {"username": "carol", "password": PASSWORD}),
            headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, (r.status, body[:200])
        cookie = r.getheader("set-cookie").split(";")[0]
    finally:
        conn.close()
    conn = http.client.HTTPSConnection("127.0.0.1", srv.http_port, context=ctx, timeout=LIVENESS)
    try:
        conn.request("GET", "/dicomweb/studies?limit=10", headers={
            "Cookie": cookie, "Accept": "application/dicom+json"})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, (r.status, body[:200])
        assert json.loads(body or b"[]") == []
    finally:
        conn.close()


def dcmtk_echo(srv, cert):
    """A C-ECHO by DCMTK's echoscu over DICOM-TLS, in a process of its own:
    this one holds more than 1024 descriptors, past select()'s reach, which
    pynetdicom uses."""
    crt, key, ca, _ = cert
    r = subprocess.run(["/usr/bin/echoscu", "-v", "-aet", "FLOODTLS", "-aec", "BASTION",
                        *dcmtk_tls_args(crt, key, ca), "127.0.0.1", str(srv.tls_port)],
                       capture_output=True, text=True, timeout=LIVENESS, env=DCMTK_ENV)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Received Echo Response (Success)" in out, out


def test_socket_floods_leave_login_qido_and_echo_reachable(make_server):
    raise_nofile()
    srv = make_server()
    srv.device_add("FLOODTLS", transport="mtls", allow="echo")
    cert = srv.cert_issue("FLOODTLS")
    add_user(srv, "carol", "clinician")

    sockets = []
    try:
        http_idle = idle_sockets(srv.http_port, flood_sources())
        dicom_idle = idle_sockets(srv.tls_port, flood_sources())
        plain_idle = idle_sockets(srv.plain_port, flood_sources()[:FLOOD_SPREAD])
        sockets = http_idle + dicom_idle + plain_idle
        # loopback accepts every connection into the backlog
        assert len(http_idle) == len(dicom_idle) == FLOOD_SPREAD + FLOOD_OWN
        http_slow = https_slowloris(srv, SLOWLORIS)
        dicom_slow = dicom_slowloris(srv.plain_port, SLOWLORIS)
        sockets += http_slow + dicom_slow
        flooded_at = time.monotonic()
        time.sleep(0.5)  # let the server accept them all

        # One attempt each, a wide liveness deadline: a refused connection
        # fails at once.
        login_and_qido(srv)
        dcmtk_echo(srv, cert)

        still_open = wait_all_closed(
            sockets, flooded_at + CLOSE_WITHIN,
            slow=(http_slow, dicom_slow), slow_bytes=(b"X-a: b\r\n", b"\x00"))
        assert not still_open, (
            f"{len(still_open)} idle/slow sockets still open {CLOSE_WITHIN} s after the flood: "
            f"https idle {len([s for s in http_idle if s in still_open])}, "
            f"dicom-tls idle {len([s for s in dicom_idle if s in still_open])}, "
            f"dicom-plain idle {len([s for s in plain_idle if s in still_open])}, "
            f"https slow {len([s for s in http_slow if s in still_open])}, "
            f"dicom slow {len([s for s in dicom_slow if s in still_open])}")
    finally:
        for s in sockets:
            s.close()
    # and the server still serves
    dcmtk_echo(srv, cert)
    assert "panicked" not in srv.log()


def test_max_associations_is_enforced_and_slots_come_back(make_server):
    """`[dicom] max_associations` counts associations the policy accepted:
    past it a registered device gets A-ASSOCIATE-RJ 1/1/1; a released
    association gives its slot back (before this, the counter was never
    raised: the limit was not enforced at all)."""
    srv = make_server(start=False)
    cfg = srv.data / "bastion.toml"
    text = cfg.read_text()
    assert "max_associations = 64" in text, text
    cfg.write_text(text.replace("max_associations = 64", "max_associations = 2"))
    srv.start()
    srv.device_add("MANY", transport="plain", allow="echo")
    held = [helpers.associate(srv.plain_port, "MANY") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = helpers.associate(srv.plain_port, "MANY")
        assert not third.is_established, "a third association was accepted"
        assert helpers.rejection(third) in ((1, 1, 1), None)  # pynetdicom's RJ-as-abort race
        held.pop().release()
        # the slot comes back (bounded wait: the release is asynchronous)
        deadline = time.monotonic() + 30
        while True:
            status = helpers.echo_status(srv.plain_port, "MANY")
            if status == 0x0000 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 0x0000, status
    finally:
        for a in held:
            if a.is_established:
                a.release()
    refused = [e for e in srv.events() if e.get("type") == "association.rejected"
               and e.get("reason") == "too_many_associations"]
    assert refused and refused[0]["calling_ae"] == "MANY", refused
