"""Syslog export (IHE ATNA Record Audit Event) to a real rsyslog over TLS.

rsyslog (Debian `rsyslog` + `rsyslog-gnutls`) listens on 127.0.0.1 with the
gtls stream driver in `x509/certvalid` mode: Bastion must present a client
certificate signed by Bastion's CA, and Bastion verifies rsyslog's
certificate against a test CA created here. Messages are written to a file
with their structured data, MSGID, APP-NAME and PRI.

The exporter follows the audit trail itself, so records appended by CLI
processes, also while serve is stopped, are exported as well.

Guarantee under test: **at-least-once, in order**. Every audit message
carries `[meta sequenceId="N"]` (RFC 5424 7.3.1), N = 1, 2, ... across
restarts; the collector must end up with every N from 1 to the last one, the
first occurrence of each in increasing order; a repeated N is a duplicate
(a message re-sent because its delivery was not confirmed) and is reported.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import helpers
from helpers import associate, rejection

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
DELIVERY_TIMEOUT = 120  # seconds; reconnect back-off is at most 60 s


@pytest.fixture(autouse=True)
def rsyslog_installed():
    # A failure, not a skip: scripts/test.sh installs both packages.
    if not Path(RSYSLOGD).exists() or not list(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so")):
        pytest.fail("rsyslog and rsyslog-gnutls are needed (apt-get install rsyslog rsyslog-gnutls)")


SEQ = re.compile(r'sequenceId="(\d+)"')


def make_test_ca(out: Path) -> tuple[Path, Path, Path]:
    """A test CA and rsyslog's server certificate for 127.0.0.1 (RSA, so
    any GnuTLS build accepts it). Returns (ca.pem, server.crt, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    import ipaddress

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Syslog Test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "collector.test")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("collector.test")]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, crt_path, key_path = out / "ca.pem", out / "server.crt", out / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return ca_path, crt_path, key_path


class Rsyslog:
    """Our own rsyslogd (-n, own config, pid file and work directory)."""

    def __init__(self, base: Path, port: int, client_ca: Path, cert: Path, key: Path):
        self.base = base
        self.port = port
        self.out = base / "received.log"
        self.work = base / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.pidfile = base / "rsyslogd.pid"
        self.conf = base / "rsyslog.conf"
        self.log = base / "rsyslogd.stderr"
        self.proc: subprocess.Popen | None = None
        self.conf.write_text(f"""
global(
  workDirectory="{self.work}"
  maxMessageSize="256k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{client_ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}"
)
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"
       StreamDriver.AuthMode="x509/certvalid" MaxSessions="20")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="atna" type="string"
         string="%pri%\\t%app-name%\\t%msgid%\\t%structured-data%\\t%msg%\\n")
action(type="omfile" file="{self.out}" template="atna")
""")

    def start(self):
        assert self.proc is None or self.proc.poll() is not None
        if self.pidfile.exists():
            self.pidfile.unlink()
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        helpers.wait_port(self.port, 30, self.proc)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError("rsyslogd did not stop within 20 s of SIGTERM")

    def messages(self) -> list[dict]:
        """Received messages in arrival order."""
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_text(errors="replace").splitlines():
            parts = line.split("\t", 4)
            if len(parts) < 5:
                continue
            m = SEQ.search(parts[3])
            out.append({"pri": int(parts[0]), "app": parts[1], "msgid": parts[2],
                        "seq": int(m.group(1)) if m else None,
                        "msg": parts[4].lstrip("\ufeff")})
        return out


def reject(srv, calling):
    """One association from an unregistered AE title: one audit event (the
    server records the rejection before it answers; pynetdicom 3.0.4 on
    loopback now and then reports the A-ASSOCIATE-RJ as an abort, so only
    an accepted association is an error here)."""
    assoc = associate(srv.plain_port, calling)
    try:
        assert not assoc.is_established, f"{calling} was accepted"
        assert rejection(assoc) in ((1, 1, 3), None)
    finally:
        if assoc.is_established:
            assoc.release()


def wait_markers(rs: Rsyslog, markers, timeout=DELIVERY_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        text = "\n".join(m["msg"] for m in rs.messages())
        missing = [m for m in markers if f'"{m}"' not in text]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not received within {timeout} s: {missing}")
        time.sleep(0.25)


def test_every_message_across_collector_outage_and_restart(make_server, tmp_path):
    ca, crt, key = make_test_ca(tmp_path / "collector-pki")
    srv = make_server(start=False)
    port = helpers.free_port()
    rs = Rsyslog(tmp_path / "rsyslog", port, srv.data / "tls" / "ca.crt", crt, key)
    with open(srv.data / "bastion.toml", "a") as f:
        f.write(f'\n[audit.syslog]\nurl = "tls://127.0.0.1:{port}"\nca = "{ca}"\n')
    rs.start()
    try:
        srv.start()
        phase_a = [f"SYSA{i:03}" for i in range(12)]
        for ae in phase_a[:6]:
            reject(srv, ae)
        wait_markers(rs, phase_a[:3], timeout=30)
        for ae in phase_a[6:]:
            reject(srv, ae)
        # the collector goes down mid-stream, without waiting for phase A
        rs.stop()
        phase_b = [f"SYSB{i:03}" for i in range(10)]
        for ae in phase_b:
            reject(srv, ae)
        # Bastion restarts while the collector is still down
        assert srv.stop() == 0
        spool = srv.data / "spool" / "syslog"
        assert any(spool.glob("*.seg")), "no spool segment"
        for seg in spool.glob("*.seg"):
            raw = seg.read_bytes()
            assert b"SYSB" not in raw and b"AuditMessage" not in raw, "spool holds plaintext"
        srv.start()
        phase_c = [f"SYSC{i:03}" for i in range(10)]
        for ae in phase_c:
            reject(srv, ae)
        time.sleep(1)
        rs.start()
        wait_markers(rs, phase_a + phase_b + phase_c)
        time.sleep(2)
    finally:
        srv.stop()
        rs.stop()

    msgs = rs.messages()
    assert msgs, "nothing received"
    # RFC 5424 header as IHE ATNA wants it
    for m in msgs:
        assert m["app"] == "bastion" and m["msgid"] == "IHE+RFC-3881", m
        assert m["pri"] // 8 == 10, f"facility must be authpriv (10): {m['pri']}"
        assert m["seq"] is not None, m
        assert m["msg"].startswith("<?xml") or m["msg"].startswith("<AuditMessage"), m["msg"][:80]
    rejected = [m for m in msgs if "SYSA000" in m["msg"]]
    assert rejected and rejected[0]["pri"] % 8 <= 5
    seqs = [m["seq"] for m in msgs]
    # at least once: every sequence number from 1 to the last one
    assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), \
        f"gaps: {sorted(set(range(1, max(seqs) + 1)) - set(seqs))}"
    # in order: first occurrences increase
    firsts = []
    seen = set()
    for s in seqs:
        if s not in seen:
            seen.add(s)
            firsts.append(s)
    assert firsts == sorted(firsts), "out of order"
    # the markers arrive in the order they happened
    text_order = []
    for m in msgs:
        for mk in re.findall(r'"(SYS[ABC]\d{3})"', m["msg"]):
            if mk not in text_order:
                text_order.append(mk)
    assert text_order == phase_a + phase_b + phase_c
    dups = len(seqs) - len(set(seqs))
    print(f"received {len(seqs)} messages, {len(set(seqs))} distinct, {dups} duplicates (re-sent, same sequenceId)")


def test_cli_records_are_exported_from_the_trail(make_server, tmp_path):
    """serve's exporter follows the audit trail file: records appended by CLI
    processes (here `bastion device add`), while serve runs and while it is
    stopped, reach the collector too, each in exactly one message."""
    ca, crt, key = make_test_ca(tmp_path / "collector-pki")
    srv = make_server(start=False)
    port = helpers.free_port()
    rs = Rsyslog(tmp_path / "rsyslog", port, srv.data / "tls" / "ca.crt", crt, key)
    with open(srv.data / "bastion.toml", "a") as f:
        f.write(f'\n[audit.syslog]\nurl = "tls://127.0.0.1:{port}"\nca = "{ca}"\n')
    rs.start()
    try:
        srv.start()
        srv.device_add("SYSCLI1", transport="plain", allow="echo")  # serve running
        wait_markers(rs, ["SYSCLI1"])
        assert srv.stop() == 0
        srv.device_add("SYSCLI2", transport="plain", allow="echo")  # serve stopped
        srv.start()
        wait_markers(rs, ["SYSCLI2"])
        time.sleep(2)
    finally:
        srv.stop()
        rs.stop()
    msgs = rs.messages()
    seqs = [m["seq"] for m in msgs]
    assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), seqs
    for marker in ("SYSCLI1", "SYSCLI2"):
        carrying = {m["seq"] for m in msgs if f'"{marker}"' in m["msg"]}
        assert len(carrying) == 1, (marker, carrying)


def test_plain_syslog_url_is_refused(make_server):
    srv = make_server(start=False)
    with open(srv.data / "bastion.toml", "a") as f:
        f.write('\n[audit.syslog]\nurl = "udp://127.0.0.1:514"\n')
    r = srv.cli("serve", "--dicom-addr", "127.0.0.1:0", check=False, timeout=30)
    assert r.returncode != 0
    assert "tls://" in r.stderr, r.stderr
