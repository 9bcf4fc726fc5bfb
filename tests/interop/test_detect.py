"""Detection rules and alerts (issue 5) with real clients against `bastion
serve`: each scripted scenario raises exactly the alerts listed for it, and
a normal day's traffic raises none. Alerts are read with `bastion alerts
--all --json` (a separate process reading the security database) and
`GET /api/alerts`; only alerts newer than the scenario's start count.

The detector runs on a thread of its own, so every check polls until the
expected alerts are there, then waits a little longer to see that no other
alert follows.
"""
from __future__ import annotations

import collections
import http.server
import json
import ssl
import threading
import time

import pytest
from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

import helpers
from test_dicomweb import PASSWORD, _login, client, new_token, request, run, server_with

SETTLE = 2.0  # seconds without a new alert before a scenario's list is final
MODALITY = "CT_ROOM1"
FINDER = "WS_FIND"


# ---------------------------------------------------------------- helpers

def all_alerts(srv) -> list[dict]:
    out = run(srv, "alerts", "--all", "--json").stdout
    return [json.loads(l) for l in out.splitlines() if l.strip()]


def last_id(srv) -> int:
    return max((a["id"] for a in all_alerts(srv)), default=0)


def alerts_since(srv, since: int, expect: list[str], timeout=20.0) -> list[dict]:
    """Alerts with id > since once `expect` (a multiset of rule names) is
    reached or `timeout` passed, and nothing new came for SETTLE seconds."""
    want = collections.Counter(expect)
    deadline = time.monotonic() + timeout
    new = []
    while time.monotonic() < deadline:
        new = [a for a in all_alerts(srv) if a["id"] > since]
        if collections.Counter(a["rule"] for a in new) >= want:
            break
        time.sleep(0.3)
    # Quiet period: nothing else may follow.
    while True:
        time.sleep(SETTLE)
        again = [a for a in all_alerts(srv) if a["id"] > since]
        if len(again) == len(new):
            return again
        new = again


def rules(alerts: list[dict]) -> list[str]:
    return sorted(a["rule"] for a in alerts)


def store_study(srv, calling, n=1, patient_id="PAT-1", **attrs) -> str:
    """Stores n instances of one new study over plain DICOM; returns its UID."""
    study = None
    files = []
    for i in range(n):
        ds = helpers.make_dataset(patient_id=patient_id, study_uid=study, pixel_bytes=512,
                                  seed_value=i)
        for k, v in attrs.items():
            setattr(ds, k, v)
        study = ds.StudyInstanceUID
        p = srv.base / "files" / f"{ds.SOPInstanceUID}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        helpers.dataset_file(ds, p)
        files.append(p)
    res = helpers.store_files(srv.plain_port, calling, files)
    assert all(s == 0 for s in res.values()), res
    return study


def c_find(srv, calling, identifier: Dataset) -> list[int]:
    assoc = helpers.associate(srv.plain_port, calling,
                              contexts=[StudyRootQueryRetrieveInformationModelFind])
    assert assoc.is_established, helpers.rejection(assoc)
    try:
        return [st.Status for st, _ in
                assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
                if st is not None and "Status" in st]
    finally:
        if assoc.is_established:
            assoc.release()


def detect_server(make_server, **settings):
    """A server with a modality (store) and a workstation (find) on the plain
    listener, and fast login throttling so that wrong passwords are checked."""
    base = dict(base_delay_ms=1, max_delay_secs=1, per_address_max_delay_secs=1)
    base.update(settings)
    srv = server_with(make_server, **base)
    srv.device_add(MODALITY, transport="plain", allow="echo,store")
    srv.device_add(FINDER, transport="plain", allow="echo,find")
    return srv


# ---------------------------------------------------------------- scenarios

def test_normal_day_raises_no_alert(make_server):
    srv = detect_server(make_server)
    clin = new_token(srv, "dr-house", "clinician")
    since = last_id(srv)  # setup (devices, user, token) raised change alerts
    # A modality stores a few studies of different patients.
    studies = [store_study(srv, MODALITY, n=2, patient_id=f"PAT-{i}",
                           Manufacturer="ACME", ManufacturerModelName="CT-9",
                           SoftwareVersions="4.2")
               for i in range(4)]
    # A workstation looks a patient up.
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = "PAT-1"
    q.StudyInstanceUID = ""
    assert c_find(srv, FINDER, q)[-1] == 0
    # A clinician logs in, runs a paged worklist and a few searches, views two studies.
    st, _, body = _login(srv, "dr-house", PASSWORD)
    assert st == 200, body
    for path in ("/dicomweb/studies?limit=25", "/dicomweb/studies?limit=25&offset=25",
                 "/dicomweb/studies?PatientID=PAT-2",
                 f"/dicomweb/studies/{studies[0]}/series"):
        st, _, body = request(srv, "GET", path, clin, {"Accept": "application/dicom+json"})
        assert st == 200, (path, body)
    c = client(srv, clin)
    for s in studies[:2]:
        assert len(c.retrieve_study(s)) == 2
    assert rules(alerts_since(srv, since, [])) == []


def test_unknown_device_scanning(make_server):
    srv = detect_server(make_server)
    since = last_id(srv)
    for _ in range(12):
        status = helpers.echo_status(srv.plain_port, "INTRUDER")
        assert str(status).startswith("not established"), status
    new = alerts_since(srv, since, ["association_scan", "unknown_device"])
    assert rules(new) == ["association_scan", "unknown_device"]
    unknown = next(a for a in new if a["rule"] == "unknown_device")
    assert unknown["details"]["calling_ae"] == "INTRUDER"
    assert unknown["details"]["peer"] == "127.0.0.1"
    scan = next(a for a in new if a["rule"] == "association_scan")
    assert scan["details"]["rejections"] >= 10


def test_a_few_rejections_of_a_known_device_raise_nothing(make_server):
    srv = detect_server(make_server)
    since = last_id(srv)
    for _ in range(3):  # a store-only modality asking for the wrong called AE
        status = helpers.echo_status(srv.plain_port, MODALITY, called="OTHER")
        assert str(status).startswith("not established"), status
    assert rules(alerts_since(srv, since, [])) == []


def test_brute_force(make_server):
    srv = detect_server(make_server)
    run(srv, "user", "add", "victim", "--role", "clinician", "--password-stdin",
        stdin=PASSWORD + "\n")
    since = last_id(srv)
    for i in range(6):
        st, _, _ = _login(srv, "victim", f"wrong password {i:04d}")
        assert st in (401, 429), st
        time.sleep(0.05)
    new = alerts_since(srv, since, ["login_brute_force"])
    assert rules(new) == ["login_brute_force"]
    assert new[0]["details"]["username"] == "victim"
    assert new[0]["details"]["source"] == "127.0.0.1"


def test_broad_queries(make_server):
    srv = detect_server(make_server)
    clin = new_token(srv, "dr-wilson", "clinician")
    store_study(srv, MODALITY, patient_id="PAT-9")
    since = last_id(srv)
    # A universal C-FIND at STUDY level: broad.
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientName = ""
    q.StudyInstanceUID = ""
    assert c_find(srv, FINDER, q)[-1] == 0
    new = alerts_since(srv, since, ["broad_query"])
    assert rules(new) == ["broad_query"]
    assert new[0]["details"]["ae"] == FINDER
    # A paged worklist (limit ≤ 100) and a restricted search: not broad.
    since = last_id(srv)
    for path in ("/dicomweb/studies?limit=25", "/dicomweb/studies?PatientID=PAT-9"):
        st, _, _ = request(srv, "GET", path, clin, {"Accept": "application/dicom+json"})
        assert st == 200
    assert rules(alerts_since(srv, since, [])) == []
    # QIDO-RS of every study without a limit: broad.
    st, _, _ = request(srv, "GET", "/dicomweb/studies", clin, {"Accept": "application/dicom+json"})
    assert st == 200
    new = alerts_since(srv, since, ["broad_query"])
    assert rules(new) == ["broad_query"]
    assert new[0]["details"]["user"] == "dr-wilson"
    assert new[0]["details"]["via"] == "QIDO-RS"


def test_bulk_retrieval(make_server):
    srv = detect_server(make_server, bulk_studies=3, bulk_patients=100)
    clin = new_token(srv, "dr-cuddy", "clinician")
    studies = [store_study(srv, MODALITY, patient_id=f"PAT-{i}") for i in range(5)]
    since = last_id(srv)
    c = client(srv, clin)
    for s in studies[:3]:
        c.retrieve_study(s)
    assert rules(alerts_since(srv, since, [])) == [], "3 studies is not more than 3"
    c.retrieve_study(studies[3])
    new = alerts_since(srv, since, ["bulk_retrieval"])
    assert rules(new) == ["bulk_retrieval"]
    d = new[0]["details"]
    assert d["actor"] == "user:dr-cuddy" and d["studies"] == 4 and d["patients"] == 4
    assert "PAT-" not in json.dumps(new), "patients are never named"


def test_bulk_retrieval_by_patients(make_server):
    srv = detect_server(make_server, bulk_studies=100, bulk_patients=2)
    clin = new_token(srv, "dr-chase", "clinician")
    studies = [store_study(srv, MODALITY, patient_id=f"PAT-{i}") for i in range(3)]
    # Two studies of the same patient count once.
    studies.append(store_study(srv, MODALITY, patient_id="PAT-0"))
    since = last_id(srv)
    c = client(srv, clin)
    for s in (studies[0], studies[3], studies[1]):
        c.retrieve_study(s)
    assert rules(alerts_since(srv, since, [])) == []
    c.retrieve_study(studies[2])
    new = alerts_since(srv, since, ["bulk_retrieval"])
    assert rules(new) == ["bulk_retrieval"]
    assert new[0]["details"]["patients"] == 3


def test_device_changes(make_server):
    srv = detect_server(make_server)
    store_study(srv, MODALITY, Manufacturer="ACME", ManufacturerModelName="CT-9",
                SoftwareVersions="4.2")
    since = last_id(srv)
    store_study(srv, MODALITY, Manufacturer="ACME", ManufacturerModelName="CT-9",
                SoftwareVersions="4.2")
    assert rules(alerts_since(srv, since, [])) == []
    # The same AE title now reports other software: a firmware update, or
    # someone impersonating the device.
    store_study(srv, MODALITY, Manufacturer="ACME", ManufacturerModelName="CT-9",
                SoftwareVersions="6.6.6")
    new = alerts_since(srv, since, ["device_changed"])
    assert rules(new) == ["device_changed"]
    assert new[0]["details"]["ae"] == MODALITY
    # An administrator changes the device's permissions on the host: routine
    # (issue 10), recorded but no alert.
    since = last_id(srv)
    srv.device_update(MODALITY, network=None, transport=None, allow="echo,store,find")
    assert rules(alerts_since(srv, since, [], timeout=3)) == []
    assert any(e.get("type") == "device.updated" and e.get("actor") == "cli"
               for e in srv.events())


# Corpus files of eight makers and models, stored in one batch as a mixed
# modality (or a gateway forwarding for several) would.
MIXED = ["CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "liver_1frame.dcm",
         "waveform_ecg.dcm", "reportsi.dcm", "examples_ybr_color.dcm", "examples_palette.dcm"]


def test_a_mixed_batch_from_one_device_is_one_alert(make_server, corpus_root):
    srv = detect_server(make_server)
    files = [corpus_root / "pydicom" / "test_files" / n for n in MIXED]
    since = last_id(srv)
    res = helpers.store_files(srv.plain_port, MODALITY, files)
    assert all(s == 0 for s in res.values()), res
    # Every change is an event of its own ...
    changed = [e for e in srv.events()
               if e.get("type") == "device.software_changed" and e.get("ae") == MODALITY]
    assert len(changed) >= len(files) - 2, changed
    assert {e["field"] for e in changed} == {"Manufacturer", "ManufacturerModelName",
                                             "SoftwareVersions"}, changed
    # ... but the device raises one alert for the quiet period (600 s).
    new = alerts_since(srv, since, ["device_changed"])
    assert rules(new) == ["device_changed"], [(a["rule"], a["summary"]) for a in new]
    assert new[0]["details"]["ae"] == MODALITY
    assert new[0]["details"]["old"] == "GE MEDICAL SYSTEMS", new[0]["details"]
    raised = [e for e in srv.events()
              if e.get("type") == "security.alert" and e.get("rule") == "device_changed"]
    assert len(raised) == 1, raised
    # Another batch within the quiet period: still the one alert.
    since = last_id(srv)
    res = helpers.store_files(srv.plain_port, MODALITY, [
        corpus_root / "pydicom" / "test_files" / n for n in ("JPEG-lossy.dcm", "examples_rgb_color.dcm")])
    assert all(s == 0 for s in res.values()), res
    assert rules(alerts_since(srv, since, [])) == []


def test_user_and_token_changes(make_server):
    """On the host they are routine (no alert, still events); with
    `alert_host_changes = true` each opens a security_change alert."""
    srv = detect_server(make_server)
    since = last_id(srv)
    run(srv, "user", "add", "newbie", "--role", "auditor", "--password-stdin",
        stdin=PASSWORD + "\n")
    run(srv, "token", "create", "--user", "newbie", "--expires", "1d")
    assert rules(alerts_since(srv, since, [], timeout=3)) == []
    assert {"user.added", "token.created"} <= {e.get("type") for e in srv.events()}
    cfg = srv.data / "bastion.toml"
    cfg.write_text(cfg.read_text().replace("alert_host_changes = false",
                                           "alert_host_changes = true"))
    run(srv, "user", "add", "newbie2", "--role", "auditor", "--password-stdin",
        stdin=PASSWORD + "\n")
    run(srv, "token", "create", "--user", "newbie2", "--expires", "1d")
    new = alerts_since(srv, since, ["security_change", "security_change"])
    assert sorted(a["details"]["event"] for a in new) == ["token.created", "user.added"]


def test_off_hours_access(make_server):
    # Working hours: one minute twelve hours from now, so now is outside.
    h = (time.gmtime().tm_hour + 12) % 24
    srv = detect_server(make_server, working_hours=f'"{h:02d}:00-{h:02d}:01"',
                        timezone='"UTC"')
    run(srv, "user", "add", "night-owl", "--role", "clinician", "--password-stdin",
        stdin=PASSWORD + "\n")
    since = last_id(srv)
    st, _, body = _login(srv, "night-owl", PASSWORD)
    assert st == 200, body
    new = alerts_since(srv, since, ["off_hours_access"])
    # Weekends are outside working hours too; either way one alert per person.
    assert rules(new) == ["off_hours_access"]
    assert new[0]["details"]["actor"] == "user:night-owl"


def test_no_off_hours_alert_by_default(make_server):
    srv = detect_server(make_server)
    run(srv, "user", "add", "day-shift", "--role", "clinician", "--password-stdin",
        stdin=PASSWORD + "\n")
    since = last_id(srv)
    assert _login(srv, "day-shift", PASSWORD)[0] == 200
    assert rules(alerts_since(srv, since, [])) == []


def test_api_alerts_metrics_and_ack(make_server):
    srv = detect_server(make_server)
    tokens = {r: new_token(srv, f"u-{r}", r) for r in ("auditor", "clinician")}
    for _ in range(12):
        helpers.echo_status(srv.plain_port, "INTRUDER")
    alerts_since(srv, 0, ["association_scan", "unknown_device"])
    # Roles: auditor (and admin) only.
    st, hd, body = request(srv, "GET", "/api/alerts", tokens["auditor"])
    assert st == 200, body
    listed = json.loads(body)
    assert {"association_scan", "unknown_device"} <= {a["rule"] for a in listed}
    assert request(srv, "GET", "/api/alerts", tokens["clinician"])[0] == 403
    assert request(srv, "GET", "/api/alerts")[0] == 401
    assert request(srv, "GET", "/metrics", tokens["clinician"])[0] == 403
    assert request(srv, "GET", "/metrics")[0] == 401
    st, hd, body = request(srv, "GET", "/metrics", tokens["auditor"])
    assert st == 200 and hd["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert "bastion_associations_rejected_total 12" in text, text
    assert 'bastion_alerts_total{rule="association_scan"} 1' in text, text
    assert 'bastion_events_total{type="association.rejected",outcome="refused"} 12' in text
    assert "# TYPE bastion_alerts_open gauge" in text
    # Acknowledge one from the CLI: it leaves the open list, keeps its id.
    scan = next(a for a in listed if a["rule"] == "association_scan")
    r = run(srv, "alerts", "ack", str(scan["id"]), check=False)
    assert r.returncode != 0, "a comment is required"
    run(srv, "alerts", "ack", str(scan["id"]), "--comment", "pentest by the IT team")
    open_ids = [json.loads(l)["id"] for l in run(srv, "alerts", "--json").stdout.splitlines()]
    assert scan["id"] not in open_ids
    acked = next(a for a in all_alerts(srv) if a["id"] == scan["id"])
    assert acked["status"] == "acknowledged"
    assert acked["ack"]["comment"] == "pentest by the IT team"
    assert acked["ack"]["by"]
    assert any(e.get("type") == "alert.acknowledged" and e.get("alert_id") == scan["id"]
               for e in srv.events())
    # Each alert is also a security.alert event, recorded once.
    raised = [e for e in srv.events() if e.get("type") == "security.alert"]
    assert len([e for e in raised if e.get("rule") == "association_scan"]) == 1
    table = run(srv, "alerts").stdout
    assert "unknown_device" in table and "association_scan" not in table
    assert run(srv, "alerts", "ack", "99999", "--comment", "x", check=False).returncode != 0


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        n = int(self.headers.get("Content-Length", "0"))
        _Hook.received.append(json.loads(self.rfile.read(n)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_webhook_with_retry(make_server):
    port = helpers.free_port()
    srv = make_server(start=False)
    cfg = srv.data / "bastion.toml"
    text = cfg.read_text()
    text = text.replace('webhook_url = ""', f'webhook_url = "https://127.0.0.1:{port}/hook"')
    text = text.replace('webhook_ca_file = ""',
                        f'webhook_ca_file = "{srv.data / "tls" / "ca.crt"}"')
    cfg.write_text(text)
    srv.start()
    helpers.wait_port(srv.http_port, 30, srv.proc)
    srv.device_add(FINDER, transport="plain", allow="echo,find")
    # The alert is raised while the receiver is down: delivery is retried.
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    c_find(srv, FINDER, q)
    alerts_since(srv, 0, ["broad_query"])
    time.sleep(1.5)
    _Hook.received = []
    httpd = http.server.HTTPServer(("127.0.0.1", port), _Hook)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # The receiver shows a certificate of Bastion's own CA (webhook_ca_file).
    ctx.load_cert_chain(srv.data / "tls" / "server.crt", srv.data / "tls" / "server.key")
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                a.get("rule") == "broad_query" for a in _Hook.received):
            time.sleep(0.2)
        got = [a for a in _Hook.received if a.get("rule") == "broad_query"]
        assert len(got) == 1, _Hook.received
        assert got[0]["details"]["ae"] == FINDER and got[0]["id"] > 0
    finally:
        httpd.shutdown()
    assert "webhook: delivery failed" in srv.log()


def test_detect_config_is_checked(make_server):
    srv = make_server(start=False)
    cfg = srv.data / "bastion.toml"
    cfg.write_text(cfg.read_text().replace('webhook_url = ""',
                                           'webhook_url = "http://example.org/hook"'))
    r = srv.cli("serve", "--http-addr", "off", check=False, timeout=30)
    assert r.returncode != 0 and "https://" in r.stderr, r.stderr


def test_audit_verification_failure(make_server):
    srv = detect_server(make_server)
    for _ in range(3):
        helpers.echo_status(srv.plain_port, MODALITY)
    srv.stop()
    assert run(srv, "audit", "verify").returncode == 0
    since = last_id(srv)
    records = srv.data / "audit" / "records"
    lines = records.read_bytes().splitlines(keepends=True)
    assert len(lines) > 8
    lines[2], lines[3] = lines[3], lines[2]
    records.write_bytes(b"".join(lines))
    assert run(srv, "audit", "verify", check=False).returncode != 0
    new = alerts_since(srv, since, ["audit_verify_failed"], timeout=5)
    assert rules(new) == ["audit_verify_failed"]
    assert "record 2" in new[0]["details"]["result"]
