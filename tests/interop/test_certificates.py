"""Certificate verification at the TLS handshake, revocation, and alerts
when Bastion as a client (or its blob store) finds something wrong (issue 10,
findings 5 and 6).

Bad certificates are made with Python `cryptography`; handshakes are real
(Python `ssl` for the raw handshake, pynetdicom for associations and as a
TLS Storage SCP). A refused certificate must end the handshake with a TLS
alert, before any A-ASSOCIATE PDU, and the refusal must be in the log and
the event trail with its reason. Every wait is bounded.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

import helpers
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet as STUDY_GET,
    StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE,
)

SUCCESS = 0x0000
PENDING = (0xFF00, 0xFF01)
CT = helpers.CT_IMAGE_STORAGE
# The revocation list is cached by serve for about 2 s; a CLI change must
# apply within this (wide) liveness margin.
APPLY_WITHIN = 15.0


# ---------------------------------------------------------------- certificates

def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _write(out: Path, name: str, cert: x509.Certificate, key) -> tuple[Path, Path, str]:
    out.mkdir(parents=True, exist_ok=True)
    crt, k = out / f"{name}.crt", out / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    os.chmod(k, 0o600)
    der = cert.public_bytes(serialization.Encoding.DER)
    return crt, k, hashlib.sha256(der).hexdigest()


def _bastion_ca(srv):
    tls = srv.data / "tls"
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((tls / "ca.key").read_bytes(), password=None)
    return ca, key


def make_cert(out: Path, name: str, cn: str, signer=None, expired=False, server=False,
              eku=None) -> tuple[Path, Path, str]:
    """A leaf certificate for `cn`: self-signed (signer None) or signed by
    (ca_cert, ca_key); expired or valid; client or server usage."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    start, end = ((now - datetime.timedelta(days=400), now - datetime.timedelta(days=30))
                  if expired else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer, signing_key = (subject, key) if signer is None else (signer[0].subject, signer[1])
    usage = eku or ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH])
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = b.sign(signing_key, hashes.SHA256())
    return _write(out, name, cert, key)


def foreign_ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign Test CA")])
    now = _now()
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
    return ca, key


# ---------------------------------------------------------------- handshakes

def raw_handshake(srv, crt: Path | None, key: Path | None, calling="CERTDEV") -> tuple[str, str]:
    """Opens TLS to the DICOM-TLS listener with this client certificate and
    sends an A-ASSOCIATE-RQ. Returns ("alert", reason) when the TLS layer
    refused the certificate, ("pdu", hex of the first PDU type) when a DICOM
    answer came, ("closed", "") when the connection just closed."""
    ctx = helpers.client_ssl_context(srv.data / "tls" / "ca.crt", crt, key)
    raw = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=15)
    try:
        try:
            s = ctx.wrap_socket(raw, server_hostname="localhost")
        except ssl.SSLError as e:
            return "alert", e.reason or str(e)
        try:
            # TLS 1.3: the client finishes first; the server's verdict on
            # the client certificate arrives as an alert on the next read.
            s.sendall(helpers.associate_rq(calling))
            first = s.recv(1)
        except ssl.SSLError as e:
            return "alert", e.reason or str(e)
        except (ConnectionResetError, BrokenPipeError):
            return "closed", ""
        finally:
            s.close()
        return ("pdu", first.hex()) if first else ("closed", "")
    finally:
        raw.close()


def wait_for(check, what: str, timeout=APPLY_WITHIN):
    """Polls `check()` until truthy (bounded); returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            assert got, f"{what}: not within {timeout} s"
            return got
        time.sleep(0.25)


def tls_rejections(srv, sha256: str) -> list[dict]:
    return [e for e in srv.events() if e.get("type") == "association.rejected"
            and e.get("stage") == "tls_handshake" and e.get("certificate_sha256") == sha256]


def assert_refused_at_handshake(srv, crt, key, sha, code: str, alert: str):
    kind, reason = raw_handshake(srv, crt, key)
    assert (kind, alert in reason) == ("alert", True), (kind, reason)
    ev = wait_for(lambda: tls_rejections(srv, sha), f"event for {code}", timeout=10)
    assert ev[-1]["reason"] == code, ev[-1]
    assert ev[-1]["outcome"] == "refused" and ev[-1]["listener"] == "tls"
    assert ev[-1]["detail"], ev[-1]
    log = srv.log()
    assert "client certificate rejected" in log and code in log


def issue(srv, ae, out: Path, *extra) -> tuple[Path, Path, str]:
    r = srv.cli("cert", "issue", "--ae", ae, "--out", str(out), *extra)
    sha = next(l.split()[-1] for l in r.stdout.splitlines() if l.startswith("certificate SHA-256:"))
    return out / "client.crt", out / "client.key", sha


def cert_list(srv, *args) -> list[dict]:
    return json.loads(srv.cli("cert", "list", "--json", *args).stdout)


def echo_with(srv, ae, crt, key):
    ctx = helpers.client_ssl_context(srv.data / "tls" / "ca.crt", crt, key)
    return helpers.echo_status(srv.tls_port, ae, tls=ctx)


def established(srv, ae, crt, key) -> bool:
    return echo_with(srv, ae, crt, key) == SUCCESS


# ---------------------------------------------------------------- finding 5

def test_bad_certificates_fail_the_tls_handshake(server, tmp_path):
    """Self-signed, expired (our CA), foreign-CA and server-only certificates
    get a TLS alert, never an A-ASSOCIATE-RJ; the reason is logged and in
    the events (hence the audit trail's Security Alert)."""
    srv = server
    srv.device_add("CERTDEV", transport="mtls", allow="echo")
    ours = _bastion_ca(srv)
    cases = [
        (make_cert(tmp_path, "self", "CERTDEV"), "certificate_not_trusted", "UNKNOWN_CA"),
        (make_cert(tmp_path, "foreign", "CERTDEV", signer=foreign_ca()),
         "certificate_not_trusted", "UNKNOWN_CA"),
        (make_cert(tmp_path, "expired", "CERTDEV", signer=ours, expired=True),
         "certificate_expired", "CERTIFICATE_EXPIRED"),
        (make_cert(tmp_path, "serveronly", "CERTDEV", signer=ours, server=True),
         "certificate_wrong_usage", "ALERT"),
    ]
    for (crt, key, sha), code, alert in cases:
        assert_refused_at_handshake(srv, crt, key, sha, code, alert)
    # the audit trail records each refusal (association.rejected → Security Alert)
    r = srv.cli("audit", "search", "--json", check=False)
    if r.returncode == 0:
        assert "association.rejected" in r.stdout or "110113" in r.stdout
    # A valid certificate of our CA issued to another registered AE passes
    # the handshake and is refused by the policy: A-ASSOCIATE-RJ 1/1/3.
    srv.device_add("OTHERDEV", transport="mtls", allow="echo")
    crt, key, _ = issue(srv, "OTHERDEV", tmp_path / "other")
    assert raw_handshake(srv, crt, key, calling="CERTDEV") == ("pdu", "03")
    # a tls device may still connect without a certificate
    srv.device_add("NOCERT", transport="tls", allow="echo")
    assert helpers.echo_status(srv.tls_port, "NOCERT", tls=srv.tls_context()) == SUCCESS
    # and a valid certificate of its own works
    crt, key, _ = issue(srv, "CERTDEV", tmp_path / "good")
    assert echo_with(srv, "CERTDEV", crt, key) == SUCCESS


def test_cert_issue_twice_revokes_the_first_unless_keep_previous(server, tmp_path):
    srv = server
    srv.device_add("REISSUE", transport="mtls", allow="echo")
    c1, k1, s1 = issue(srv, "REISSUE", tmp_path / "one")
    assert echo_with(srv, "REISSUE", c1, k1) == SUCCESS
    c2, k2, s2 = issue(srv, "REISSUE", tmp_path / "two")
    rows = cert_list(srv, "--ae", "REISSUE")
    assert [(r["sha256"], r["revoked"]) for r in rows] == [(s1, True), (s2, False)]
    wait_for(lambda: raw_handshake(srv, c1, k1, calling="REISSUE")[0] == "alert",
             "the first certificate refused after the re-issue")
    assert tls_rejections(srv, s1)[-1]["reason"] == "certificate_revoked"
    assert echo_with(srv, "REISSUE", c2, k2) == SUCCESS
    # --keep-previous: the second stays valid next to the third
    c3, k3, s3 = issue(srv, "REISSUE", tmp_path / "three", "--keep-previous")
    rows = cert_list(srv, "--ae", "REISSUE")
    assert [(r["sha256"], r["revoked"]) for r in rows] == [(s1, True), (s2, False), (s3, False)]
    assert echo_with(srv, "REISSUE", c2, k2) == SUCCESS
    assert echo_with(srv, "REISSUE", c3, k3) == SUCCESS


def test_cert_list_json_shape(server, tmp_path):
    srv = server
    srv.device_add("LISTED", transport="tls", allow="echo")
    _, _, sha = issue(srv, "LISTED", tmp_path / "l")
    rows = cert_list(srv)
    assert len(rows) == 1
    row = rows[0]
    assert set(row) == {"serial", "ae", "sha256", "not_after", "issued_at", "revoked", "revoked_at"}
    assert row["ae"] == "LISTED" and row["sha256"] == sha and row["revoked"] is False
    assert row["revoked_at"] is None
    assert isinstance(row["serial"], str) and all(c in "0123456789abcdef" for c in row["serial"])
    # the serial is the certificate's own
    crt = x509.load_pem_x509_certificate((tmp_path / "l" / "client.crt").read_bytes())
    assert int(row["serial"], 16) == crt.serial_number
    not_after = datetime.datetime.fromisoformat(row["not_after"].replace("Z", "+00:00"))
    assert abs((not_after - crt.not_valid_after_utc).total_seconds()) < 2
    assert cert_list(srv, "--ae", "NOBODY") == []
    text = srv.cli("cert", "list").stdout
    assert sha in text and "LISTED" in text


def test_cert_revoke_by_ae_and_by_sha256(server, tmp_path):
    srv = server
    srv.device_add("REVAE", transport="mtls", allow="echo")
    crt, key, sha = issue(srv, "REVAE", tmp_path / "a")
    assert echo_with(srv, "REVAE", crt, key) == SUCCESS
    r = srv.cli("cert", "revoke", "--ae", "REVAE")
    assert sha in r.stdout
    wait_for(lambda: raw_handshake(srv, crt, key, calling="REVAE")[0] == "alert",
             "revoke --ae applied")
    ev = wait_for(lambda: tls_rejections(srv, sha), "the revoked handshake's event", timeout=10)
    assert ev[-1]["reason"] == "certificate_revoked", ev[-1]
    assert cert_list(srv, "--ae", "REVAE")[0]["revoked"] is True
    # a pinned third-party certificate, never recorded: revoke by fingerprint
    fcrt, fkey, fsha = make_cert(tmp_path, "pinned", "PINNED", signer=foreign_ca())
    colons = ":".join(fsha[i:i + 2] for i in range(0, 64, 2)).upper()
    srv.device_add("PINNED", transport="mtls", allow="echo", cert_sha256=colons)
    assert echo_with(srv, "PINNED", fcrt, fkey) == SUCCESS
    r = srv.cli("cert", "revoke", "--sha256", colons)
    assert fsha in r.stdout
    wait_for(lambda: raw_handshake(srv, fcrt, fkey, calling="PINNED")[0] == "alert",
             "revoke --sha256 applied")
    row = [x for x in cert_list(srv) if x["sha256"] == fsha]
    assert row and row[0]["revoked"] is True and row[0]["ae"] is None
    # usage errors
    assert srv.cli("cert", "revoke", check=False).returncode != 0
    assert srv.cli("cert", "revoke", "--sha256", "xyz", check=False).returncode != 0
    assert srv.cli("cert", "revoke", "--ae", "A", "--sha256", fsha, check=False).returncode != 0
    kinds = [e.get("type") for e in srv.events()]
    assert kinds.count("cert.revoked") >= 2


# ---------------------------------------------------------------- finding 6

def all_alerts(srv) -> list[dict]:
    out = srv.cli("alerts", "--all", "--json").stdout
    return [json.loads(l) for l in out.splitlines() if l.strip()]


def wait_alert(srv, rule: str, timeout=20.0) -> dict:
    got = wait_for(lambda: [a for a in all_alerts(srv) if a["rule"] == rule], f"alert {rule}",
                   timeout=timeout)
    return got[-1]


def store_study(srv, ae: str, tmp_path: Path) -> tuple[str, str]:
    ds = helpers.make_dataset()
    p = tmp_path / "one.dcm"
    helpers.dataset_file(ds, p)
    st, _ = helpers.store_one(srv.plain_port, ae, p)
    assert st == SUCCESS
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


def study_identifier(study: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study
    return ds


class TlsStoreSCP:
    """pynetdicom Storage SCP over TLS with the given server certificate."""

    def __init__(self, crt: Path, key: Path):
        self.port = helpers.free_port()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(crt), str(key))
        ae = AE(ae_title="ANY")
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = helpers.TIMEOUT
        ae.add_supported_context(CT, [ExplicitVRLittleEndian])
        self.stored = 0
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=ctx,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event):
        self.stored += 1
        return SUCCESS

    def stop(self):
        self.server.shutdown()


def c_move(srv, calling: str, study: str, dest: str):
    ae = helpers.make_ae(calling, contexts=[STUDY_MOVE])
    assoc = ae.associate("127.0.0.1", srv.plain_port, ae_title=srv.ae_title)
    assert assoc.is_established, helpers.rejection(assoc)
    out = []
    try:
        for st, _ in assoc.send_c_move(study_identifier(study), dest, STUDY_MOVE):
            out.append(st.Status if "Status" in st else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return out


@pytest.mark.parametrize("bad", ["foreign_ca", "expired"])
def test_move_to_a_destination_with_a_bad_certificate_alerts(server, tmp_path, bad):
    srv = server
    if bad == "foreign_ca":
        crt, key, _ = make_cert(tmp_path, "dest", "DEST", signer=foreign_ca(), server=True)
        expect = "UnknownIssuer"
    else:
        crt, key, _ = make_cert(tmp_path, "dest", "DEST", signer=_bastion_ca(srv), server=True,
                                expired=True)
        expect = "expired"
    scp = TlsStoreSCP(crt, key)
    try:
        srv.device_add("BADDEST", transport="tls", allow="echo", host="127.0.0.1", port=scp.port)
        srv.device_add("MOVER", transport="plain", allow="echo,store,move",
                       move_destinations="BADDEST")
        study, _ = store_study(srv, "MOVER", tmp_path)
        statuses = c_move(srv, "MOVER", study, "BADDEST")
        assert statuses and statuses[-1] not in (SUCCESS, None, *PENDING), statuses
        assert scp.stored == 0
        ev = wait_for(lambda: [e for e in srv.events() if e.get("type") == "tls.peer_rejected"],
                      "tls.peer_rejected event", timeout=10)
        assert expect in ev[-1]["reason"], ev[-1]
        assert ev[-1]["ae"] == "BADDEST" and ev[-1]["peer"] == f"127.0.0.1:{scp.port}"
        alert = wait_alert(srv, "tls_peer_rejected")
        assert expect in alert["summary"] or expect in json.dumps(alert["details"]), alert
        assert "C-MOVE destination certificate refused" in srv.log()
        assert expect in srv.log()
    finally:
        scp.stop()


def test_tampered_blob_fails_cleanly_and_alerts(server, tmp_path):
    srv = server
    srv.device_add("GETTER", transport="plain", allow="echo,store,get")
    study, sop = store_study(srv, "GETTER", tmp_path)
    root = srv.data / "blobs"
    blobs = [p for p in root.rglob("*") if p.is_file() and "tmp" not in p.relative_to(root).parts]
    assert len(blobs) == 1, blobs
    b = bytearray(blobs[0].read_bytes())
    b[len(b) // 2] ^= 0x01
    blobs[0].write_bytes(bytes(b))
    received = []

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return SUCCESS

    ae = helpers.make_ae("GETTER", contexts=[STUDY_GET, (CT, [ExplicitVRLittleEndian])])
    assoc = ae.associate("127.0.0.1", srv.plain_port, ae_title=srv.ae_title,
                         ext_neg=[build_role(CT, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    statuses = []
    try:
        for st, _ in assoc.send_c_get(study_identifier(study), STUDY_GET):
            statuses.append(st.Status if "Status" in st else None)
    finally:
        if assoc.is_established:
            assoc.release()
    assert received == [] and statuses and statuses[-1] not in (SUCCESS, None, *PENDING), statuses
    # WADO-RS: a clean error status, not a cut stream
    from test_dicomweb import new_token, request
    token = new_token(srv, "tamperview", "clinician")
    status, headers, body = request(srv, "GET", f"/dicomweb/studies/{study}", token,
                                    headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert status == 500, (status, body[:200])
    assert json.loads(body) == {"error": "internal error", "status": 500}
    assert "a stored instance could not be read" in srv.log()
    # the server is still up and answers
    assert srv.echo("GETTER", tls=False) == SUCCESS
    ev = wait_for(lambda: [e for e in srv.events() if e.get("type") == "blob.auth_failed"],
                  "blob.auth_failed event", timeout=10)
    assert ev[-1]["sop_instance_uid"] == sop and ev[-1]["outcome"] == "failure"
    alert = wait_alert(srv, "blob_auth_failed")
    assert alert["severity"] == "high"
    assert alert["details"]["sop_instance_uid"] == sop
    # the event log names no patient
    assert "Test^Patient" not in json.dumps(ev[-1])


class TlsSink:
    """A TLS server standing in for a syslog collector: completes what
    handshakes it can with the given certificate and counts connections."""

    def __init__(self, crt: Path, key: Path):
        import threading
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(crt), str(key))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop_flag = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stop_flag:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            c.settimeout(10)
            try:
                self.ctx.wrap_socket(c, server_side=True).close()
            except (ssl.SSLError, OSError):
                pass
            finally:
                c.close()

    def close(self):
        self.stop_flag = True
        self.sock.close()


def test_syslog_collector_with_an_untrusted_certificate_alerts_once(make_server, tmp_path):
    """The collector's certificate is from a CA Bastion was not told about:
    the export is refused as before, and now the exact failure is logged,
    recorded (`tls.peer_rejected`) and raises one alert, not one event per
    reconnect."""
    crt, key, _ = make_cert(tmp_path, "collector", "collector.test", signer=foreign_ca(),
                            server=True)
    sink = TlsSink(crt, key)
    srv = make_server(start=False)
    try:
        with open(srv.data / "bastion.toml", "a") as f:
            f.write(f'\n[audit.syslog]\nurl = "tls://127.0.0.1:{sink.port}"\n')
        srv.start()

        def rejected():
            return [e for e in srv.events() if e.get("type") == "tls.peer_rejected"]

        ev = wait_for(rejected, "tls.peer_rejected for the collector", timeout=60)
        assert ev[0]["purpose"] == "syslog collector", ev[0]
        assert ev[0]["peer"] == f"127.0.0.1:{sink.port}"
        assert "UnknownIssuer" in ev[0]["reason"], ev[0]
        alert = wait_alert(srv, "tls_peer_rejected")
        assert "UnknownIssuer" in alert["summary"], alert
        assert "syslog collector certificate refused" in srv.log()
        # the exporter retries (back-off from 1 s): the same failure is not
        # recorded again at each attempt
        wait_for(lambda: sink.connections >= 3, "three connection attempts", timeout=90)
        assert len(rejected()) == 1, rejected()
    finally:
        srv.stop()
        sink.close()
