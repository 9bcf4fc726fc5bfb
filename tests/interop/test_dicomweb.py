"""DICOMweb (PS3.18) of the real binary with real clients (issue 4):
dicomweb-client 0.61.2 (QIDO-RS, WADO-RS, STOW-RS) with a bearer token, the
C-FIND matching table replayed through QIDO-RS, a STOW → WADO round trip of
the whole corpus, /rendered of CT, MR, JPEG and RLE files, and the account
security rules seen from HTTP (roles, brute force, lock, revoked token).
"""
from __future__ import annotations

import http.client
import io
import json
import ssl
import subprocess
import time
import urllib.parse

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image

import corpus
import helpers
import test_find
from conftest import Server

PASSWORD = "correct horse battery staple 42"
UNIQUE_TAG = {"STUDY": "0020000D", "SERIES": "0020000E", "IMAGE": "00080018"}
QIDO_PATH = {"STUDY": "/dicomweb/studies", "SERIES": "/dicomweb/series",
             "IMAGE": "/dicomweb/instances"}


def run(srv: Server, *args, stdin=None, check=True):
    r = subprocess.run([str(srv.bin), "--data", str(srv.data), *args], input=stdin,
                       capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def new_token(srv: Server, name: str, role: str) -> str:
    run(srv, "user", "add", name, "--role", role, "--password-stdin", stdin=PASSWORD + "\n")
    out = run(srv, "token", "create", "--user", name, "--expires", "1d").stdout
    return out.strip().splitlines()[-1]


def request(srv: Server, method: str, path: str, token: str | None = None, headers=None,
            body=None):
    ctx = ssl.create_default_context(cafile=str(srv.data / "tls" / "ca.crt"))
    conn = http.client.HTTPSConnection("localhost", srv.http_port, context=ctx, timeout=60)
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def client(srv: Server, token: str) -> DICOMwebClient:
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE would replace `verify`
    s.verify = str(srv.data / "tls" / "ca.crt")
    s.headers["Authorization"] = f"Bearer {token}"
    return DICOMwebClient(url=f"https://localhost:{srv.http_port}/dicomweb", session=s)


@pytest.fixture(scope="module")
def web(bastion_bin, tmp_path_factory):
    """A server holding the matching table's instances (stored by C-STORE) and
    tokens for each role."""
    srv = Server(bastion_bin, tmp_path_factory.mktemp("web"))
    srv.init()
    srv.start(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    srv.device_add(test_find.FINDER, transport="mtls", allow="echo,store,find")
    crt, key, ca, _ = srv.cert_issue(test_find.FINDER)
    ctx = helpers.client_ssl_context(ca, crt, key)
    with helpers.pynetdicom_reactor_race_fixed():
        test_find.store_datasets(srv, test_find.table_datasets(), test_find.FINDER, ctx)
    tokens = {role: new_token(srv, f"u-{role}", role)
              for role in ("clinician", "technologist", "auditor")}
    # a researcher cannot even get a token (its role allows nothing yet): it logs in
    run(srv, "user", "add", "u-researcher", "--role", "researcher", "--password-stdin",
        stdin=PASSWORD + "\n")
    yield srv, tokens
    srv.stop()


# -- the matching table through QIDO-RS ---------------------------------------

def _qido_applicable(case) -> str | None:
    """Why a C-FIND case has no QIDO-RS counterpart (None when it has one)."""
    if case["level"] == "PATIENT" or case["model"] == "patient":
        return "QIDO-RS has no Patient Root model or PATIENT level"
    if "status" in case and (case["name"].startswith("C08 hierarchical")
                             or case["name"].startswith("patient root")):
        return "QIDO-RS queries are relational (PS3.18 8.3.4): no hierarchical refusal"
    return None


def qido_params(case) -> list[tuple[str, str]]:
    params = []
    for k, v in case["keys"].items():
        if isinstance(v, list):
            if not v:
                params.append(("includefield", k))
            for item in v:
                for ik, iv in item.items():
                    params.append((f"{k}.{ik}", iv))
        elif v == "":
            params.append(("includefield", k))
        elif k.endswith("UID"):
            params.append((k, ",".join(test_find.UIDS.get(x, x) for x in v.split("\\"))))
        else:
            params.append((k, v))
    return params


QIDO_CASES = [c for c in test_find.TABLE["queries"] if _qido_applicable(c) is None]


def test_every_table_case_is_replayed_or_has_a_reason():
    skipped = [(c["name"], _qido_applicable(c)) for c in test_find.TABLE["queries"]
               if _qido_applicable(c)]
    assert len(QIDO_CASES) + len(skipped) == len(test_find.TABLE["queries"])
    assert len(QIDO_CASES) >= 45, skipped


@pytest.mark.parametrize("case", QIDO_CASES, ids=[c["name"] for c in QIDO_CASES])
def test_matching_table_through_qido(web, case):
    srv, tokens = web
    path = QIDO_PATH[case["level"]] + "?" + urllib.parse.urlencode(qido_params(case))
    status, headers, body = request(srv, "GET", path, tokens["clinician"],
                                    {"Accept": "application/dicom+json"})
    if "status" in case:
        assert status == 400, (status, body[:300])
        return
    assert status == 200, (status, body[:300])
    assert headers["content-type"].startswith("application/dicom+json")
    items = json.loads(body)
    got = sorted(it[UNIQUE_TAG[case["level"]]]["Value"][0] for it in items)
    want = sorted(test_find.UIDS.get(x, x) for x in case["expect"])
    assert got == want


# -- dicomweb-client ------------------------------------------------------------

def test_dicomweb_client_search_retrieve_store(web, tmp_path):
    srv, tokens = web
    c = client(srv, tokens["technologist"])
    studies = c.search_for_studies(search_filters={"PatientID": "PID003"})
    uids = sorted(s["0020000D"]["Value"][0] for s in studies)
    assert uids == sorted([test_find.UIDS["S3"], test_find.UIDS["S4"]])
    for s in studies:  # required attributes of PS3.18 Table 10.6.3-3
        for tag in ("00080020", "00080050", "00100010", "00100020", "00081190"):
            assert tag in s, (tag, s)
        assert s["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{s['0020000D']['Value'][0]}")
    # WADO-RS of a study: the instances as stored
    got = c.retrieve_study(test_find.UIDS["S3"])
    assert {str(ds.StudyInstanceUID) for ds in got} == {test_find.UIDS["S3"]}
    series = c.search_for_series(test_find.UIDS["S3"])
    assert series and all(s["0020000D"]["Value"][0] == test_find.UIDS["S3"] for s in series)
    # STOW-RS of a corpus file, then found and retrieved
    src = corpus.corpus_root() / "pydicom" / "test_files" / "CT_small.dcm"
    ds = pydicom.dcmread(src)
    resp = c.store_instances([ds])
    assert "00081199" in resp, resp  # ReferencedSOPSequence
    found = c.search_for_instances(search_filters={"SOPInstanceUID": str(ds.SOPInstanceUID)})
    assert len(found) == 1
    back = c.retrieve_instance(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                               str(ds.SOPInstanceUID))
    assert back.PixelData == ds.PixelData
    assert str(back.PatientName) == str(ds.PatientName)
    meta = c.retrieve_instance_metadata(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                        str(ds.SOPInstanceUID))
    assert meta["00100010"]["Value"][0]["Alphabetic"] == str(ds.PatientName)
    assert "BulkDataURI" in meta["7FE00010"]


def test_unknown_qido_attribute_is_400(web):
    srv, tokens = web
    status, _, _ = request(srv, "GET", "/dicomweb/studies?NoSuchKeyword=1", tokens["clinician"])
    assert status == 400


def test_unmatchable_key_is_warned(web):
    """A key the engine cannot match (PatientAge, AS) restricts nothing: the
    answer carries `Warning: 299` (PS3.18 8.3.4.3) instead of looking exact."""
    srv, tokens = web
    status, headers, _ = request(srv, "GET", "/dicomweb/studies?PatientAge=999Y",
                                 tokens["clinician"])
    assert status == 200
    assert headers.get("warning", "").startswith("299"), headers


# -- STOW every corpus file, WADO it back --------------------------------------

def _multipart(files):
    boundary = "testboundary0123456789"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + f.read_bytes() + b"\r\n" for f in files)
    return body + f"--{boundary}--\r\n".encode(), boundary


def test_stow_failure_reason_reaches_the_client(make_server, tmp_path):
    """Each FailedSOPSequence item carries an Error Comment (0000,0902, LO)
    saying why, next to the numeric Failure Reason, without patient data."""
    srv = make_server(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    token = new_token(srv, "tech", "technologist")
    ds = helpers.make_dataset(patient_name="Quorra^Zebedee", patient_id="PID-SECRET-77",
                              pixel_bytes=512)
    good = tmp_path / "good.dcm"
    helpers.dataset_file(ds, good)
    b = "reasonboundary42"
    body = (f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + b"this is not a DICOM file at all, Quorra^Zebedee" + b"\r\n"
            + f"--{b}\r\nContent-Type: text/plain\r\n\r\n".encode() + b"hello\r\n"
            + f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + good.read_bytes() + b"\r\n" + f"--{b}--\r\n".encode())
    status, _, out = request(srv, "POST", "/dicomweb/studies", token,
                             {"Content-Type": f'multipart/related; type="application/dicom"; '
                                              f'boundary="{b}"',
                              "Accept": "application/dicom+json"}, body)
    assert status == 202, (status, out[:500])
    doc = json.loads(out)
    failed = doc["00081198"]["Value"]
    assert len(failed) == 2, failed
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC000, 0xC000]
    for f in failed:
        assert f["00000902"]["vr"] == "LO"
        comment = f["00000902"]["Value"][0]
        assert 0 < len(comment) <= 64 and comment.isascii(), comment
    assert "no DICM prefix" in failed[0]["00000902"]["Value"][0]
    assert "Content-Type" in failed[1]["00000902"]["Value"][0]
    assert [it["00081155"]["Value"][0] for it in doc["00081199"]["Value"]] == [ds.SOPInstanceUID]
    assert b"Quorra" not in out and b"PID-SECRET" not in out
    # a conflicting re-send: 0x0111 with its reason
    ds.PatientName = "Other^Name"
    helpers.dataset_file(ds, good)
    body2, b2 = _multipart([good])
    status, _, out = request(srv, "POST", "/dicomweb/studies", token,
                             {"Content-Type": f'multipart/related; type="application/dicom"; '
                                              f'boundary="{b2}"',
                              "Accept": "application/dicom+json"}, body2)
    assert status == 409, (status, out[:500])
    item = json.loads(out)["00081198"]["Value"][0]
    assert item["00081197"]["Value"] == [0x0111]
    assert "different content" in item["00000902"]["Value"][0]


def test_stow_every_corpus_file_then_wado_returns_the_same_dataset(web):
    srv, tokens = web
    files = corpus.one_per_sop_uid()
    assert len(files) > 100
    stored, compared = 0, 0
    for i in range(0, len(files), 25):
        batch = files[i:i + 25]
        body, b = _multipart(batch)
        status, _, out = request(srv, "POST", "/dicomweb/studies", tokens["technologist"],
                                 {"Content-Type": f'multipart/related; type="application/dicom"; '
                                                  f'boundary="{b}"',
                                  "Accept": "application/dicom+json"}, body)
        assert status in (200, 202), (status, out[:500])
        resp = json.loads(out)
        ok = {it["00081155"]["Value"][0] for it in resp.get("00081199", {}).get("Value", [])}
        stored += len(ok)
        for f in batch:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            uid = str(ds.SOPInstanceUID)
            if uid not in ok:
                continue
            st, hd, got = request(
                srv, "GET", f"/dicomweb/studies/{ds.StudyInstanceUID}/series/"
                f"{ds.SeriesInstanceUID}/instances/{uid}", tokens["technologist"],
                {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
            assert st == 200, (f, st)
            ctype = hd["content-type"]
            boundary = ctype.split("boundary=")[1].split(";")[0].strip('"')
            parts = [p for p in got.split(b"--" + boundary.encode()) if p.strip(b"-\r\n")]
            assert len(parts) == 1, f
            part = parts[0].split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
            ts_sent, data_sent = corpus.dataset_bytes(f)
            ts_got, data_got = corpus.dataset_bytes(part)
            assert ts_got == ts_sent, f
            assert data_got == data_sent, f  # the dataset as received; only the meta is new
            compared += 1
    assert stored == compared
    assert stored >= 0.9 * len(corpus.valid_files() and corpus.one_per_sop_uid_entries()) - 5, stored


# -- rendered -------------------------------------------------------------------

RENDER_FILES = ["pydicom/test_files/CT_small.dcm", "pydicom/test_files/MR_small.dcm",
                "pydicom/test_files/SC_rgb_jpeg_dcmtk.dcm", "pydicom/test_files/MR_small_RLE.dcm"]


@pytest.mark.parametrize("rel", RENDER_FILES)
def test_rendered_is_a_png_of_the_right_size(web, rel):
    srv, tokens = web
    f = corpus.corpus_root() / rel
    body, b = _multipart([f])
    status, _, out = request(srv, "POST", "/dicomweb/studies", tokens["technologist"],
                             {"Content-Type": f'multipart/related; type="application/dicom"; '
                                              f"boundary={b}"}, body)
    assert status in (200, 409), (status, out[:300])  # 409: already stored by another test
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    path = (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}/rendered")
    st, hd, png = request(srv, "GET", path, tokens["clinician"], {"Accept": "image/png"})
    assert st == 200, (st, png[:200])
    assert hd["content-type"] == "image/png"
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.format == "PNG"
    assert img.size == (ds.Columns, ds.Rows)


# -- security as seen from HTTP ---------------------------------------------------

def test_role_refusals(web):
    srv, tokens = web
    # auditor: the event log only
    assert request(srv, "GET", "/dicomweb/studies", tokens["auditor"])[0] == 403
    assert request(srv, "GET", "/api/events", tokens["auditor"])[0] == 200
    # clinician: query and view, no upload
    body, b = _multipart([corpus.corpus_root() / "pydicom/test_files/CT_small.dcm"])
    st = request(srv, "POST", "/dicomweb/studies", tokens["clinician"],
                 {"Content-Type": f'multipart/related; type="application/dicom"; boundary={b}'},
                 body)[0]
    assert st == 403
    assert request(srv, "GET", "/api/events", tokens["clinician"])[0] == 403
    # researcher: no token, and its session may do nothing yet
    r = run(srv, "token", "create", "--user", "u-researcher", "--expires", "1d", check=False)
    assert r.returncode != 0 and "researcher" in r.stderr
    st, hd, _ = _login(srv, "u-researcher", PASSWORD)
    assert st == 200
    cookie = hd["set-cookie"].split(";")[0]
    for path in ("/dicomweb/studies", "/api/events"):
        assert request(srv, "GET", path, None, {"Cookie": cookie})[0] == 403
    # every refusal is recorded
    ev = [e for e in srv.events() if e.get("outcome") in ("refused", "denied", "failure")]
    assert any("u-researcher" in json.dumps(e) for e in ev), ev[-5:]


def _login(srv, user, password):
    body = json.dumps({"username": user, "password": password}).encode()
    return request(srv, "POST", "/api/login", None, {"Content-Type": "application/json"}, body)


def server_with(make_server, **settings):
    """A server whose bastion.toml `key = value` lines are replaced by `settings`."""
    srv = make_server(start=False)
    cfg = srv.data / "bastion.toml"
    text = cfg.read_text()
    for key, value in settings.items():
        lines = [l for l in text.splitlines() if l.startswith(f"{key} = ")]
        assert len(lines) == 1, key
        text = text.replace(lines[0], f"{key} = {value}")
    cfg.write_text(text)
    srv.start()
    helpers.wait_port(srv.http_port, 30, srv.proc)
    return srv


def test_brute_force_is_throttled_recorded_and_the_lock_holds(make_server):
    # Short delays so that the lock (10 failures) is reached within seconds;
    # the rules are the defaults' (doubling back-off, lock, per-address delays).
    srv = server_with(make_server, base_delay_ms=1, max_delay_secs=1,
                      per_address_max_delay_secs=1)
    run(srv, "user", "add", "victim", "--role", "clinician", "--password-stdin",
        stdin=PASSWORD + "\n")
    statuses = []
    deadline = time.monotonic() + 120
    for i in range(100):
        st, hd, _ = _login(srv, "victim", f"wrong password {i:04d}")
        statuses.append(st)
        assert st in (401, 429), st
        if st == 429:
            assert int(hd["retry-after"]) >= 1
            time.sleep(0.05)
        assert time.monotonic() < deadline
    assert statuses.count(401) >= 10 and statuses.count(429) > 0, statuses
    # locked now: the right password is refused, also after every delay has passed
    time.sleep(1.5)
    st, hd, _ = _login(srv, "victim", PASSWORD)
    assert st == 429, st
    assert "retry-after" in hd
    events = srv.events()
    assert any(e.get("type") == "user.locked" and "victim" in json.dumps(e) for e in events), \
        [e.get("type") for e in events][-20:]
    assert sum(1 for e in events if e.get("type", "").startswith("http")
               and e.get("status") in (401, 429)) >= 100
    # an unknown user gets the same answers as a wrong password
    assert _login(srv, "nobody-here", "whatever password 1")[0] in (401, 429)
    # unlocked by the CLI: the right password works again
    run(srv, "user", "unlock", "victim")
    time.sleep(1.1)  # the per-address delay of this test's client address
    st, _, body = _login(srv, "victim", PASSWORD)
    assert st == 200, body


def test_revoked_token_is_401(make_server):
    srv = make_server()
    helpers.wait_port(srv.http_port, 30, srv.proc)
    tok = new_token(srv, "reader", "clinician")
    assert request(srv, "GET", "/dicomweb/studies", tok)[0] == 200
    listed = json.loads(run(srv, "token", "list", "--json").stdout)
    tid = next(t["id"] for t in listed if t.get("user", t.get("username")) == "reader")
    run(srv, "token", "revoke", tid)
    assert request(srv, "GET", "/dicomweb/studies", tok)[0] == 401


# -- content negotiation with curl ----------------------------------------------

def curl(srv: Server, token: str, path: str, accept: str) -> tuple[int, dict, bytes]:
    """GET with curl (a client other than Python's), headers and body."""
    out = subprocess.run(
        ["curl", "-s", "-D", "-", "--cacert", str(srv.data / "tls" / "ca.crt"),
         "-H", f"Authorization: Bearer {token}", "-H", f"Accept: {accept}",
         f"https://localhost:{srv.http_port}{path}"],
        capture_output=True, timeout=60, check=True).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    return status, headers, body


def test_negotiation_with_curl(web):
    srv, tokens = web
    f = corpus.corpus_root() / "pydicom/test_files/CT_small.dcm"
    body, b = _multipart([f])
    st = request(srv, "POST", "/dicomweb/studies", tokens["technologist"],
                 {"Content-Type": f'multipart/related; type="application/dicom"; '
                                  f"boundary={b}"}, body)[0]
    assert st in (200, 409)
    ds = pydicom.dcmread(f)
    inst = (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")
    tok = tokens["clinician"]
    # a transfer syntax Bastion cannot produce from the stored one: 406
    st, _, _ = curl(srv, tok, inst, 'multipart/related; type="application/dicom"; '
                                    "transfer-syntax=1.2.840.10008.1.2.4.50")
    assert st == 406
    # one it can produce: the part says which, and the dataset is in it
    st, hd, got = curl(srv, tok, inst, 'multipart/related; type="application/dicom"; '
                                       "transfer-syntax=1.2.840.10008.1.2")
    assert st == 200, got[:200]
    assert hd["content-type"].startswith("multipart/related")
    assert b"transfer-syntax=1.2.840.10008.1.2\r\n" in got
    boundary = hd["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    # a random boundary per response
    assert boundary != curl(srv, tok, inst, 'multipart/related; type="application/dicom"; '
                                            "transfer-syntax=*")[1]["content-type"] \
        .split("boundary=")[1].split(";")[0].strip('"')
    # metadata as DICOM JSON
    st, hd, got = curl(srv, tok, inst + "/metadata", "application/dicom+json")
    assert st == 200 and hd["content-type"].startswith("application/dicom+json")
    meta = json.loads(got)
    assert meta[0]["00080018"]["Value"] == [str(ds.SOPInstanceUID)]
    assert meta[0]["00280010"]["Value"] == [ds.Rows]
    # rendered as JPEG on request, thumbnail within 128 px
    st, hd, got = curl(srv, tok, inst + "/rendered", "image/jpeg")
    assert st == 200 and hd["content-type"] == "image/jpeg" and got[:2] == b"\xff\xd8"
    st, hd, got = curl(srv, tok, inst + "/thumbnail", "image/png")
    assert st == 200
    assert max(Image.open(io.BytesIO(got)).size) <= 128
    # frame 1: the native pixel data of the frame
    st, hd, got = curl(srv, tok, inst + "/frames/1",
                       'multipart/related; type="application/octet-stream"')
    assert st == 200, got[:200]
    assert ds.PixelData in got
    # an unsupported Accept: 406
    assert curl(srv, tok, inst + "/metadata", "text/html")[0] == 406
