"""The scale-out engines must fail safely (issue 12): a real `bastion serve`
with its index on a throwaway PostgreSQL 15 cluster that each test starts
itself (initdb + pg_ctl, as scripts/postgres.sh does) so that it can stop and
start it; blobs on a throwaway Garage node (scripts/garage.sh) for the
kill -9 test.

- PostgreSQL stopped mid-ingest (`pg_ctl stop -m fast` while pynetdicom
  sends a series): every C-STORE is answered success (and the instance is
  there after recovery, bit-identical) or a failure status (0xA700/0xC000),
  never a success for something not committed; C-FIND answers a failure,
  never an empty success; STOW-RS answers 503 with Retry-After; the operator
  log names the index. PostgreSQL started again: new C-STOREs and C-FIND
  succeed WITHOUT restarting Bastion (the pool reconnects).
- kill -9 of `bastion serve` during ingest with the index on PostgreSQL and
  the blobs on Garage: after a restart every acknowledged instance is there
  and bit-identical, every index row has its blob (each row found by C-FIND
  is retrieved), and an orphan blob (uploaded, never committed) is swept.

A wrong PostgreSQL password (serve refuses to start naming `[index] url`) is
test_cli.py::test_index_on_postgres_credentials (second interop pass).

Without PostgreSQL 15 (BASTION_PG_BIN_DIR, default /usr/lib/postgresql/15/bin)
or Garage the tests skip, naming what is missing; scripts/test.sh installs
both, so in CI they run.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import re
import secrets
import shutil
import ssl
import http.client
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_FIND

import corpus
import helpers
from helpers import SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND

PG_BIN = Path(os.environ.get("BASTION_PG_BIN_DIR", "/usr/lib/postgresql/15/bin"))
REPO = Path(__file__).resolve().parents[2]
GARAGE_BIN = Path(os.environ.get("GARAGE_BIN", Path.home() / ".cargo" / "bin" / "garage"))
MOD = "PGMOD"
PASSWORD = "correct horse battery staple 42"
FAILURES = (OUT_OF_RESOURCES, CANNOT_UNDERSTAND)


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       stdin=kw.pop("stdin", subprocess.DEVNULL), **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}: {r.stdout}{r.stderr}"
    return r


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (a fixed port across
    stop/start), with a least-privilege role owning one database."""

    def __init__(self):
        self.as_ = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        self.tmp = Path(tempfile.mkdtemp(prefix="bastion-pgf."))
        os.chmod(self.tmp, 0o711)
        self.data, self.sock = self.tmp / "data", self.tmp / "sock"
        for d in (self.data, self.sock):
            d.mkdir(mode=0o700)
            if self.as_:
                shutil.chown(d, "postgres", "postgres")
        _run([*self.as_, str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
              "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
              "--locale=C.UTF-8"])
        self.port = helpers.free_port()
        self.start()
        self.password = secrets.token_urlsafe(18)
        _run([*self.as_, str(PG_BIN / "psql"), "-q", "-h", str(self.sock), "-p", str(self.port),
              "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1"],
             stdin=None, input=(
                 f"CREATE ROLE bastion_test LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                 f"NOREPLICATION PASSWORD '{self.password}';\n"
                 "CREATE DATABASE bastion_test OWNER bastion_test;\n"
                 "REVOKE ALL ON DATABASE bastion_test FROM PUBLIC;\n"))
        self.url = f"postgres://bastion_test@127.0.0.1:{self.port}/bastion_test"

    def start(self):
        _run([*self.as_, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60",
              "-l", str(self.tmp / "server.log") if not self.as_ else str(self.data / "server.log"),
              "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sock} -c fsync=on",
              "start"])

    def stop(self, mode="fast"):
        _run([*self.as_, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
              "-t", "60", "stop"])

    def close(self):
        subprocess.run([*self.as_, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m",
                        "immediate", "-w", "stop"], capture_output=True, timeout=120,
                       stdin=subprocess.DEVNULL)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def pg(monkeypatch):
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"SKIP: needs PostgreSQL 15 at BASTION_PG_BIN_DIR={PG_BIN} "
                    "(scripts/test.sh installs Debian's postgresql)")
    p = Postgres()
    monkeypatch.setenv("PGPASSWORD", p.password)
    yield p
    p.close()


@pytest.fixture(autouse=True)
def _reactor_race_fixed():
    with helpers.pynetdicom_reactor_race_fixed():
        yield


def _pg_server(make_server, pg, *extra_init):
    srv = make_server(init=False, start=False)
    srv.cli("init", "--index-url", pg.url, *extra_init)
    assert f'url = "{pg.url}"' in (srv.data / "bastion.toml").read_text()
    srv.start()
    srv.device_add(MOD, transport="plain", allow="echo,store,find")
    return srv


def _find_sop_uids(srv, patient_id="*") -> tuple[int, list[str]]:
    """A relational C-FIND at IMAGE level (Study Root, PS3.4 C.4.1.2.2):
    (final status, SOP Instance UIDs), or (None, ...) when it broke off."""
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = STUDY_FIND
    item.service_class_application_information = b"\x01"
    ae = helpers.make_ae(MOD, contexts=[STUDY_FIND])
    assoc = ae.associate("127.0.0.1", srv.plain_port, ae_title=srv.ae_title, ext_neg=[item])
    assert assoc.is_established, helpers.rejection(assoc)
    ident = Dataset()
    ident.QueryRetrieveLevel = "IMAGE"
    ident.PatientID = patient_id
    ident.StudyInstanceUID = ""
    ident.SeriesInstanceUID = ""
    ident.SOPInstanceUID = ""
    uids, final = [], None
    try:
        for st, ds in assoc.send_c_find(ident, STUDY_FIND):
            if not st or "Status" not in st:
                final = None
                break
            if st.Status in (0xFF00, 0xFF01):
                uids.append(str(ds.SOPInstanceUID))
            else:
                final = st.Status
    finally:
        if assoc.is_established:
            assoc.release()
    return final, uids


def _new_token(srv) -> str:
    subprocess.run([str(srv.bin), "--data", str(srv.data), "user", "add", "tech", "--role",
                    "technologist", "--password-stdin"], input=PASSWORD + "\n", text=True,
                   capture_output=True, timeout=120, check=True)
    out = subprocess.run([str(srv.bin), "--data", str(srv.data), "token", "create", "--user",
                          "tech", "--expires", "1d"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return out.strip().splitlines()[-1]


def _request(srv, token, method, path, headers=None, body=None):
    ctx = ssl.create_default_context(cafile=str(srv.data / "tls" / "ca.crt"))
    conn = http.client.HTTPSConnection("localhost", srv.http_port, context=ctx, timeout=90)
    try:
        conn.request(method, path, body=body,
                     headers={"Authorization": f"Bearer {token}", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _stow(srv, token, files):
    b = "pgfaultboundary42"
    body = b"".join(f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + f.read_bytes() + b"\r\n" for f in files) + f"--{b}--\r\n".encode()
    return _request(srv, token, "POST", "/dicomweb/studies", {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary="{b}"',
        "Accept": "application/dicom+json"}, body)


def test_pg_stopped_mid_ingest_fails_safely_then_recovers(make_server, pg, tmp_path):
    srv = _pg_server(make_server, pg)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    token = _new_token(srv)
    files = {}
    study, series = generate_uid(), generate_uid()
    for i in range(70):
        # one series of one study: the writers contend on its rows
        ds = helpers.make_dataset(patient_id="PGF-1", pixel_bytes=64 * 1024, seed_value=i,
                                  study_uid=study, series_uid=series)
        ds.InstanceNumber = i + 1
        p = tmp_path / f"s{i:03d}.dcm"
        files[p] = (ds.SOPInstanceUID, helpers.dataset_file(ds, p))
    paths = list(files)
    for p in paths[:3]:
        assert helpers.store_one(srv.plain_port, MOD, p)[0] == SUCCESS
    statuses: dict[Path, int | None] = {}
    stopped = threading.Event()
    after_stop: list[Path] = []
    enough = threading.Event()

    def sender():
        try:
            assoc = helpers.associate(srv.plain_port, MOD, contexts=[
                (helpers.CT_IMAGE_STORAGE, "1.2.840.10008.1.2.1")])
            if not assoc.is_established:
                return
            with helpers.chunked_send():
                for p in paths[3:-2]:
                    if enough.is_set() or not assoc.is_established:
                        break
                    # after the first 5, paced so that the stop (a second or
                    # so under load) lands while the series is still flowing
                    if len(statuses) >= 5 and not stopped.is_set():
                        time.sleep(0.1)
                    was_stopped = stopped.is_set()
                    try:
                        st = assoc.send_c_store(p)
                    except Exception:  # noqa: BLE001
                        break
                    statuses[p] = st.Status if "Status" in st else None
                    if was_stopped:
                        after_stop.append(p)
                        if len(after_stop) >= 2:
                            break
            if assoc.is_established:
                assoc.release()
        except Exception:  # noqa: BLE001
            pass

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while len(statuses) < 5 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(statuses) >= 5, statuses
    pg.stop("fast")
    stopped.set()
    t.join(timeout=180)
    enough.set()
    assert not t.is_alive(), "the sender did not finish within 180 s"
    assert srv.proc.poll() is None, "serve exited when PostgreSQL stopped"
    answered = {p: st for p, st in statuses.items()}
    bad = {p.name: st for p, st in answered.items() if st != SUCCESS and st not in FAILURES}
    assert not bad, f"C-STOREs answered neither success nor 0xA700/0xC000: {bad}"
    assert after_stop and all(answered[p] in FAILURES for p in after_stop), \
        {p.name: answered.get(p) for p in after_stop}
    failed = [p for p, st in answered.items() if st != SUCCESS]
    # C-FIND while the index is down: a failure, never an empty success
    final, uids = _find_sop_uids(srv)
    assert final in FAILURES and not uids, (final, uids)
    # STOW-RS while the index is down: 503 with Retry-After, nothing stored
    stow_file = paths[-1]
    status, headers, body = _stow(srv, token, [stow_file])
    assert status == 503 and headers.get("retry-after"), (status, headers, body[:400])
    # QIDO-RS too: 503 with Retry-After, not an empty 200 nor a 500
    status, headers, body = _request(srv, token, "GET", "/dicomweb/studies")
    assert status == 503 and headers.get("retry-after"), (status, headers, body[:400])
    log = srv.log()
    assert "index database unavailable" in log and "PostgreSQL" in log, log[-3000:]
    assert pg.password not in log

    pg.start()
    # no restart of Bastion: the pool reconnects, new C-STOREs succeed and
    # the refused ones can be sent again
    for p in [*failed, stow_file]:
        st, rsp = helpers.store_one(srv.plain_port, MOD, p)
        assert st == SUCCESS, (p.name, st, rsp)
        answered[p] = SUCCESS
    status, _, body = _stow(srv, token, [paths[-2]])
    assert status == 200, (status, body[:400])
    status, _, body = _request(srv, token, "GET", "/dicomweb/studies")
    assert status == 200 and study in body.decode(), (status, body[:400])
    answered[paths[-2]] = SUCCESS
    assert srv.starts == 1
    final, uids = _find_sop_uids(srv)
    assert final == SUCCESS
    acknowledged = [*paths[:3], *[p for p, st in answered.items() if st == SUCCESS]]
    assert set(uids) == {files[p][0] for p in acknowledged}
    for p in acknowledged:
        uid, raw = files[p]
        data = srv.instance_get(uid, check=False)
        assert data is not None, f"acknowledged {p.name} lost"
        assert corpus.dataset_bytes(data)[1] == raw, f"{p.name} is not bit-identical"


# -- kill -9 with PostgreSQL + Garage -----------------------------------------

def _sigv4(method, url, key_id, secret, region, body=b"") -> urllib.request.Request:
    """An AWS SigV4-signed request (service s3), for counting and planting
    objects in the test bucket with the test's own key."""
    u = urllib.parse.urlsplit(url)
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body).hexdigest()
    query = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                     for k, v in sorted(urllib.parse.parse_qsl(u.query, keep_blank_values=True)))
    headers = {"host": u.netloc, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, urllib.parse.quote(u.path), query,
                           "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                           signed, payload])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + secret).encode()
    for part in (day, region, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={key_id}/{scope}, "
                                f"SignedHeaders={signed}, Signature={sig}")
    del headers["host"]
    return urllib.request.Request(url, data=body if method == "PUT" else None,
                                  headers=headers, method=method)


class Bucket:
    """The objects under one prefix of the Garage test bucket."""

    def __init__(self, garage, prefix):
        m = re.match(r"s3://([^/?]+)\?endpoint=([^&]+)&region=(\w+)", garage.url)
        assert m, garage.url
        self.bucket, self.endpoint, self.region = m.groups()
        self.prefix = prefix
        self.key_id = garage.env["AWS_ACCESS_KEY_ID"]
        self.secret = garage.env["AWS_SECRET_ACCESS_KEY"]

    def _do(self, method, path, body=b""):
        req = _sigv4(method, f"{self.endpoint}/{self.bucket}{path}", self.key_id,
                     self.secret, self.region, body)
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def names(self) -> list[str]:
        out, token = [], None
        for _ in range(1000):
            q = f"?list-type=2&prefix={self.prefix}/"
            if token:
                q += "&continuation-token=" + urllib.parse.quote(token, safe="")
            xml = self._do("GET", q).decode()
            out += [k.rsplit("/", 1)[1] for k in re.findall(r"<Key>([^<]+)</Key>", xml)]
            m = re.search(r"<NextContinuationToken>([^<]+)</NextContinuationToken>", xml)
            if not m:
                return out
            token = m.group(1)
        raise AssertionError("listing did not end")

    def put(self, name, body):
        self._do("PUT", f"/{self.prefix}/{name}", body)


def test_kill9_on_postgres_and_garage(make_server, pg, tmp_path, monkeypatch):
    if not os.environ.get("BASTION_GARAGE_DIR") and not GARAGE_BIN.exists():
        pytest.skip("SKIP: needs Garage (scripts/test.sh installs it and sets BASTION_GARAGE_DIR)")
    from test_s3 import Garage
    garage = Garage(tmp_path / "garage")
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", garage.env["AWS_ACCESS_KEY_ID"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", garage.env["AWS_SECRET_ACCESS_KEY"])
        _kill9(make_server, pg, garage, tmp_path)
    finally:
        garage.stop()


def _kill9(make_server, pg, garage, tmp_path):
    prefix = "k" + secrets.token_hex(8)
    bucket_url, _, query = garage.url.partition("?")
    srv = _pg_server(make_server, pg, "--store-url", f"{bucket_url}/{prefix}?{query}")
    bucket = Bucket(garage, prefix)
    sent = {}
    for i in range(60):
        ds = helpers.make_dataset(patient_id=f"K{i}", pixel_bytes=96 * 1024, seed_value=i)
        p = tmp_path / f"k{i:03d}.dcm"
        sent[p] = (ds.SOPInstanceUID, helpers.dataset_file(ds, p))
    statuses, stop = {}, threading.Event()

    def sender():
        try:
            assoc = helpers.associate(srv.plain_port, MOD, contexts=[
                (helpers.CT_IMAGE_STORAGE, "1.2.840.10008.1.2.1")])
            if not assoc.is_established:
                return
            with helpers.chunked_send():
                for f in sent:
                    if stop.is_set() or not assoc.is_established:
                        break
                    try:
                        st = assoc.send_c_store(f)
                    except Exception:  # noqa: BLE001
                        break
                    statuses[f] = st.Status if "Status" in st else None
            if assoc.is_established:
                assoc.release()
        except Exception:  # noqa: BLE001
            pass

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while len(statuses) < 10 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.kill9()
    stop.set()
    t.join(timeout=60)
    assert not t.is_alive()
    acknowledged = [f for f, st in statuses.items() if st == SUCCESS]
    assert len(acknowledged) >= 10, statuses
    # an upload whose index commit never happened (the crash window between
    # the two): an object named like a blob that no row references
    orphan = secrets.token_hex(16)
    bucket.put(orphan, secrets.token_bytes(4096))
    before = bucket.names()
    assert orphan in before
    srv.start()
    # every acknowledged instance is there, bit-identical
    for f in acknowledged:
        uid, raw = sent[f]
        data = srv.instance_get(uid, check=False)
        assert data is not None, f"acknowledged {f.name} lost after kill -9"
        assert corpus.dataset_bytes(data)[1] == raw, f"{f.name} is not intact"
    # no half-visible instance: every row C-FIND finds has its blob, whole
    final, rows = _find_sop_uids(srv)
    assert final == SUCCESS
    by_uid = {uid: raw for uid, raw in sent.values()}
    assert set(rows) >= {sent[f][0] for f in acknowledged}
    for uid in rows:
        data = srv.instance_get(uid, check=False)
        assert data is not None, f"index row {uid} without a readable blob"
        assert corpus.dataset_bytes(data)[1] == by_uid[uid]
    # the orphan sweep (at start and every 60 s, age guard 60 s) removes the
    # unreferenced objects and only those: one object per row remains
    deadline = time.monotonic() + 150
    names = before
    while time.monotonic() < deadline:
        names = bucket.names()
        if orphan not in names and len(names) == len(rows):
            break
        time.sleep(2)
    assert orphan not in names, "the orphan object was not swept"
    assert len(names) == len(rows), (len(names), len(rows))
    assert "removed orphan blobs" in srv.log()
