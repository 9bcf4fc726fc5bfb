"""The audit trail of the real binary (issue 5): an end-to-end scenario
(serve, C-STORE, C-FIND, login, QIDO-RS, `bastion import`, a refused
association), every DICOM audit message it produced validated against the
PS3.15 A.5.1 schema with Debian's jing, the EventIDs present, search,
GET /api/audit roles, and tamper detection by `bastion audit verify`.
"""
import base64
import http.client
import io
import json
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

import helpers

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "schemas" / "dicom-audit-message.rnc"
PASSWORD = "correct horse battery staple 42"


def cli(srv, *args, stdin=None, check=True):
    r = subprocess.run([str(srv.bin), "--data", str(srv.data), *args], input=stdin,
                       capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def request(srv, method, path, headers=None, body=None):
    ctx = ssl.create_default_context(cafile=str(srv.data / "tls" / "ca.crt"))
    conn = http.client.HTTPSConnection("127.0.0.1", srv.http_port, context=ctx, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def search(srv, *args):
    out = cli(srv, "audit", "search", "--json", *args).stdout
    return [json.loads(l) for l in out.splitlines() if l.strip()]


def scenario(make_server, tmp_path):
    srv = make_server()
    helpers.wait_port(srv.http_port, 30, srv.proc)
    srv.device_add("MODALITY", transport="plain", allow="echo,store,find")
    # C-STORE (plain listener; the device is registered for it).
    files = []
    study = None
    for i in range(2):
        ds = helpers.make_dataset(patient_name="Audit^Alice", patient_id="AUD-001",
                                  study_uid=study, seed_value=i)
        study = ds.StudyInstanceUID
        p = tmp_path / f"s{i}.dcm"
        helpers.dataset_file(ds, p)
        files.append(p)
    res = helpers.store_files(srv.plain_port, "MODALITY", files)
    assert all(s == 0 for s in res.values()), res
    # C-FIND.
    assoc = helpers.associate(srv.plain_port, "MODALITY",
                              contexts=[StudyRootQueryRetrieveInformationModelFind])
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study
    q.PatientID = "AUD-001"
    list(assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    # A refused association (unknown AE).
    a = helpers.associate(srv.plain_port, "STRANGER")
    assert not a.is_established
    # Login and QIDO-RS.
    cli(srv, "user", "add", "doc", "--role", "clinician", "--password-stdin", stdin=PASSWORD + "\n")
    body = json.dumps({"username": "doc", "password": PASSWORD}).encode()
    status, h, _ = request(srv, "POST", "/api/login", {"Content-Type": "application/json"}, body)
    assert status == 200
    cookie = {"Cookie": h["set-cookie"].split(";")[0]}
    bad = json.dumps({"username": "doc", "password": "wrong"}).encode()
    assert request(srv, "POST", "/api/login", {"Content-Type": "application/json"}, bad)[0] == 401
    status, _, _ = request(srv, "GET", f"/dicomweb/studies?StudyInstanceUID={study}", cookie)
    assert status == 200
    status, _, _ = request(srv, "GET", f"/dicomweb/studies/{study}/metadata", cookie)
    assert status == 200
    # The admin API: a device added and a user disabled by an administrator
    # over HTTPS (from 127.0.0.1).
    cli(srv, "user", "add", "boss", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n")
    boss = cli(srv, "token", "create", "--user", "boss", "--expires", "1d").stdout.strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {boss}", "Content-Type": "application/json"}
    body = json.dumps({"ae": "APIDEV", "network": "127.0.0.1/32", "transport": "tls",
                       "allow": ["echo"]}).encode()
    status, _, out = request(srv, "POST", "/api/devices", auth, body)
    assert status == 201, out
    cli(srv, "user", "add", "temp", "--role", "auditor", "--password-stdin", stdin=PASSWORD + "\n")
    status, _, out = request(srv, "POST", "/api/users/temp/disable", auth)
    assert status == 200, out
    # bastion import.
    ds = helpers.make_dataset(patient_name="Import^Ivan", patient_id="IMP-002")
    p = tmp_path / "import.dcm"
    helpers.dataset_file(ds, p)
    cli(srv, "import", str(p))
    return srv, study, ds.StudyInstanceUID


@pytest.fixture
def jing():
    j = shutil.which("jing")
    if j is None:
        pytest.fail("jing missing: apt-get install -y jing (scripts/test.sh installs it)")
    return j


def test_every_audit_message_validates_and_event_ids(make_server, tmp_path, jing):
    srv, study, imported = scenario(make_server, tmp_path)
    srv.stop()
    assert cli(srv, "audit", "verify").returncode == 0  # recorded: Audit Log Used
    records = search(srv)
    messages = [m for r in records for m in r["messages"]]
    assert len(messages) > 10
    xml_dir = tmp_path / "xml"
    xml_dir.mkdir()
    paths = []
    for i, m in enumerate(messages):
        p = xml_dir / f"{i}.xml"
        p.write_text(m)
        paths.append(str(p))
    # The standard's `##` trailing documentation comments are not valid
    # RELAX NG compact there; as `#` comments the grammar is identical.
    schema = tmp_path / "schema.rnc"
    schema.write_text(SCHEMA.read_text().replace("##", "#"))
    r = subprocess.run([jing, "-c", str(schema), *paths], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[:4000] + r.stderr[-2000:]
    ids = {i for r in records for i in r["event_ids"]}
    for expected in ("Application Activity", "DICOM Instances Transferred", "Query",
                     "User Authentication", "Security Alert", "Import",
                     "DICOM Instances Accessed", "Audit Log Used"):
        assert expected in ids, (expected, sorted(ids))
    # The trail names the patients (it is encrypted); the event log does not.
    stored = [r for r in records if r["type"] == "store.stored" and r["device"] == "MODALITY"]
    assert stored and all(p["patient_id"] == "AUD-001" for r in stored for p in r["patients"])
    # Query (PS3.15 A.5.3): the C-FIND identifier itself, as sent, with the
    # SOP Class UID as ParticipantObjectID; QIDO-RS: its query string.
    finds = [m for r in records if r["type"] == "query.find" and r["device"] == "MODALITY"
             for m in r["messages"]]
    assert finds
    for m in finds:
        assert 'ParticipantObjectID="1.2.840.10008.5.1.4.1.2.2.1"' in m, m
        assert 'csd-code="110181"' in m, m
        raw_query = base64.b64decode(m.split("<ParticipantObjectQuery>")[1].split("<")[0])
        ts = base64.b64decode(m.split('type="TransferSyntax" value="')[1].split('"')[0]).decode()
        ident = read_dataset(io.BytesIO(raw_query), is_implicit_VR=ts == "1.2.840.10008.1.2",
                             is_little_endian=True)
        assert ident.PatientID == "AUD-001" and ident.StudyInstanceUID == study, ident
    qido = [m for r in records if r["type"] == "http.request" for m in r["messages"]
            if "<ParticipantObjectQuery>" in m]
    assert any(base64.b64decode(m.split("<ParticipantObjectQuery>")[1].split("<")[0])
               == f"StudyInstanceUID={study}".encode() for m in qido), qido
    # One access, one message (issue 10, item 7).
    def of_type(kind, **kw):
        return [r for r in records if r["type"] == kind
                and all(r["event"].get(k) == v for k, v in kw.items())]

    def attr(xml, name):
        return [part.split('"')[0] for part in xml.split(f' {name}="')[1:]]

    # The one QIDO-RS search: exactly one Query message (its http.request),
    # none for the archive's query.find (ae web:doc).
    qido_msgs = [m for r in of_type("http.request", action="qido.studies") for m in r["messages"]]
    web_find = of_type("query.find", ae="web:doc")
    assert web_find and all(r["messages"] == [] for r in web_find), web_find
    assert len(qido_msgs) == 1 and 'csd-code="110112"' in qido_msgs[0], qido_msgs
    # The failed login: one User Authentication (110114), outcome 4, no
    # Use of Restricted Function (110132) for the 401.
    failed = of_type("login.failure", username="doc")
    assert len(failed) == 1 and len(failed[0]["messages"]) == 1, failed
    m = failed[0]["messages"][0]
    assert 'csd-code="110114"' in m and attr(m, "EventOutcomeIndicator") == ["4"], m
    logins = of_type("http.request", action="login")
    assert [r["event"]["status"] for r in logins] == [200, 401], logins
    assert all(r["messages"] == [] for r in logins), logins
    assert not any('csd-code="110132"' in m for r in records if r["user"] == "doc"
                   for m in r["messages"])
    # Accepted associations: recorded, but no Security Alert (110113);
    # the refused one (STRANGER) still is.
    accepted = of_type("association.accepted")
    assert accepted and all(r["messages"] == [] for r in accepted), accepted
    rejected = of_type("association.rejected")
    assert rejected and all(len(r["messages"]) == 1 and 'csd-code="110113"' in r["messages"][0]
                            for r in rejected), rejected
    # Admin API changes: the admin from 127.0.0.1 (NetworkAccessPointID).
    for kind, field in (("device.added", None), ("user.disabled", "temp")):
        recs = [r for r in of_type(kind, actor="boss")
                if field is None or r["event"].get("username") == field]
        assert len(recs) == 1 and len(recs[0]["messages"]) == 1, (kind, recs)
        m = recs[0]["messages"][0]
        assert 'UserID="boss"' in m and attr(m, "NetworkAccessPointID") == ["127.0.0.1"], m
    # The plain listener: a Security Alert at start (Security Configuration).
    plain = of_type("config.plain_listener")
    assert len(plain) >= 1, sorted({r["type"] for r in records})
    assert all(len(r["messages"]) == 1 and 'csd-code="110113"' in r["messages"][0]
               and 'csd-code="110129"' in r["messages"][0] for r in plain), plain
    # ... and the event log never holds it.
    events_log = (srv.data / "events" / "events.log").read_bytes()
    assert b"AUD-001" not in events_log and b"private" not in events_log
    raw = b"".join(f.read_bytes() for f in (srv.data / "audit").iterdir() if f.is_file())
    assert b"AUD-001" not in raw and b"Audit^Alice" not in raw
    assert cli(srv, "audit", "verify").returncode == 0


def test_search_filters_and_api_roles(make_server, tmp_path):
    srv, study, imported = scenario(make_server, tmp_path)
    by_patient = search(srv, "--patient-id", "AUD-001")
    assert by_patient and all(any(p["patient_id"] == "AUD-001" for p in r["patients"])
                              for r in by_patient)
    assert search(srv, "--patient-id", "IMP-002", "--event", "import")
    assert all(r["user"] == "doc" for r in search(srv, "--user", "doc"))
    assert search(srv, "--device", "MODALITY", "--event", "query")
    assert search(srv, "--study", study)
    assert search(srv, "--event", "login.failure")
    assert search(srv, "--since", "2000-01-01T00:00:00Z", "--until", "2999-01-01T00:00:00Z")
    assert not search(srv, "--until", "2000-01-01T00:00:00Z")
    assert cli(srv, "audit", "search", "--event", "nonsense", check=False).returncode != 0
    assert "user-authentication" in cli(srv, "audit", "search", "--help").stdout
    # API: auditor yes, clinician no.
    for name, role in (("aud", "auditor"), ("clin", "clinician")):
        cli(srv, "user", "add", name, "--role", role, "--password-stdin", stdin=PASSWORD + "\n")
    tok = lambda u: cli(srv, "token", "create", "--user", u, "--expires", "1d").stdout.strip().splitlines()[-1]  # noqa: E731
    aud, clin = tok("aud"), tok("clin")
    status, _, body = request(srv, "GET", "/api/audit?patient_id=AUD-001&limit=5",
                              {"Authorization": f"Bearer {aud}"})
    assert status == 200, body
    got = json.loads(body)
    assert 0 < len(got) <= 5 and all(any(p["patient_id"] == "AUD-001" for p in r["patients"]) for r in got)
    assert request(srv, "GET", "/api/audit", {"Authorization": f"Bearer {clin}"})[0] == 403
    assert request(srv, "GET", "/api/audit?bogus=1", {"Authorization": f"Bearer {aud}"})[0] == 400
    srv.stop()
    used = search(srv, "--event", "audit-log-used")
    # The one successful read: one Audit Log Used message (the handler's
    # audit.read); its http.request, marked audited, adds none. The refused
    # reads (403, 400) are one Audit Log Used each, outcome 4.
    reads = [r for r in used if r["type"] == "audit.read" and r["event"].get("via") == "api"]
    assert len(reads) == 1 and len(reads[0]["messages"]) == 1, reads
    requests_ = [r for r in search(srv) if r["type"] == "http.request"
                 and r["event"].get("action") == "audit.search"]
    assert sorted(r["event"]["status"] for r in requests_) == [200, 400, 403], requests_
    for r in requests_:
        if r["event"]["status"] == 200:
            assert r["messages"] == [] and r["event"].get("audited") is True, r
        else:
            assert len(r["messages"]) == 1 and ' EventOutcomeIndicator="4"' in r["messages"][0], r


def _lines(p: Path):
    return p.read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize("kind", ["edit", "delete", "reorder", "truncate", "truncate_checkpoints",
                                  "no_key", "no_trail"])
def test_verify_detects_tampering(make_server, tmp_path, kind):
    srv = make_server()
    srv.device_add("MODALITY", transport="plain", allow="echo,store")
    for i in range(3):
        helpers.echo_status(srv.plain_port, "MODALITY")
    srv.stop()
    assert cli(srv, "audit", "verify").returncode == 0
    records = srv.data / "audit" / "records"
    checkpoints = srv.data / "audit" / "checkpoints"
    lines = _lines(records)
    assert len(lines) > 8
    if kind == "edit":
        line = bytearray(lines[4])
        i = line.index(b'"ct":"') + 12
        line[i] = ord("A") if line[i] != ord("A") else ord("B")
        lines[4] = bytes(line)
        records.write_bytes(b"".join(lines))
        expect = "record 4"
    elif kind == "delete":
        del lines[3]
        records.write_bytes(b"".join(lines))
        expect = "record 3"
    elif kind == "reorder":
        lines[2], lines[3] = lines[3], lines[2]
        records.write_bytes(b"".join(lines))
        expect = "record 2"
    elif kind == "truncate":
        records.write_bytes(b"".join(lines[:-3]))
        expect = "truncated"
    elif kind == "truncate_checkpoints":
        checkpoints.write_bytes(b"".join(_lines(checkpoints)[:-1]))
        expect = "checkpoint"
    elif kind == "no_key":
        (srv.data / "secrets" / "audit-signing.key").unlink()
        expect = "audit-signing.key"
    else:
        shutil.rmtree(srv.data / "audit")
        expect = "no audit trail"
    r = cli(srv, "audit", "verify", check=False)
    assert r.returncode != 0, r.stdout
    assert expect in (r.stdout + r.stderr), r.stdout + r.stderr
    if kind in ("no_key", "no_trail"):
        # Never re-created silently: serve refuses to start.
        assert not (srv.data / "audit").exists() or kind == "no_key"
        r = cli(srv, "serve", check=False)
        assert r.returncode != 0
