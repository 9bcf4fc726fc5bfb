"""Issue 6 API pieces behind the web UI, driven against the real binary:

- the study download (`GET /api/studies/{study}/export`): a zip of the
  stored Part 10 files for the roles with the export permission (admin,
  clinician), refused to a technologist, an auditor, a read-scoped token and
  an anonymous caller, recorded as a DICOM "Export" audit message (EventID
  110106);
- TOTP enrolment of an administrator from the browser (`POST
  /api/totp/enrol`): only after the right password, only for an admin who
  must have TOTP and has none; a wrong code is refused; the right one stores
  the secret and logs in; the code cannot be replayed; an enrolled account
  cannot enrol again.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import struct
import time
import zipfile

import pydicom

import corpus
import helpers
from test_dicomweb import PASSWORD, _multipart, new_token, request, run

CT = corpus.corpus_root() / "pydicom" / "test_files" / "CT_small.dcm"
MR = corpus.corpus_root() / "pydicom" / "test_files" / "MR_small.dcm"


def totp(secret: str, step: int) -> str:
    """RFC 6238 (SHA-1, 6 digits, 30 s steps), as an authenticator app."""
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    h = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    o = h[-1] & 0x0F
    return f"{(struct.unpack('>I', h[o:o + 4])[0] & 0x7FFFFFFF) % 1_000_000:06d}"


def post_json(srv, path, body, headers=None):
    h = {"Content-Type": "application/json", **(headers or {})}
    status, hdrs, out = request(srv, "POST", path, None, h, json.dumps(body).encode())
    return status, hdrs, json.loads(out) if out else None


def post_patiently(srv, path, body, tries=5):
    """POST, waiting out a 429 back-off (Retry-After) at most `tries` times."""
    for _ in range(tries):
        status, headers, out = post_json(srv, path, body)
        if status != 429:
            return status, headers, out
        time.sleep(int(headers.get("retry-after", "1")) + 0.3)
    return status, headers, out


def test_study_export_zip_roles_and_audit(make_server):
    srv = make_server(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    tech = new_token(srv, "tech", "technologist")
    body, b = _multipart([CT, MR])
    status, _, out = request(srv, "POST", "/dicomweb/studies", tech,
                             {"Content-Type": f'multipart/related; type="application/dicom"; '
                                              f'boundary="{b}"',
                              "Accept": "application/dicom+json"}, body)
    assert status == 200, out[:300]
    study = str(pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID)
    path = f"/api/studies/{study}/export"

    reader = new_token(srv, "reader", "clinician")
    status, headers, data = request(srv, "GET", path, reader)
    assert status == 200, data[:300]
    assert headers["content-type"] == "application/zip"
    assert headers["content-disposition"] == f'attachment; filename="study-{study}.zip"'
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None
        names = z.namelist()
        original = pydicom.dcmread(CT)
        assert names == [f"{original.SeriesInstanceUID}/{original.SOPInstanceUID}.dcm"]
        got = pydicom.dcmread(io.BytesIO(z.read(names[0])))
    # the instance as stored: same UIDs, same pixel bytes
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert got.PixelData == original.PixelData
    assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID

    # an admin token may too
    admin = run(srv, "token", "create", "--user", "admin", "--expires", "1h").stdout.strip().splitlines()[-1]
    assert request(srv, "GET", path, admin)[0] == 200

    # refusals: roles without export, a read-scoped token, no credentials,
    # malformed and unknown studies
    auditor = new_token(srv, "aud", "auditor")
    read = run(srv, "token", "create", "--user", "reader", "--expires", "1h", "--scope",
               "read").stdout.strip().splitlines()[-1]
    for token in (tech, auditor, read):
        status, _, out = request(srv, "GET", path, token)
        assert status == 403, (status, out)
        assert b"export" in out or b"view" in out, out
    assert request(srv, "GET", path, None)[0] == 401
    assert request(srv, "GET", "/api/studies/1.2.x/export", reader)[0] == 400
    assert request(srv, "GET", "/api/studies/1.2.3.4.5/export", reader)[0] == 404

    # recorded: the success as a DICOM Export message naming the study, the
    # refusals with their users
    events = [e for e in srv.events() if e.get("action") == "export.study"]
    ok = [e for e in events if e["outcome"] == "success"]
    assert {e["user"] for e in ok} == {"reader", "admin"}, ok
    assert {e["user"] for e in events if e["outcome"] != "success"} >= {"tech", "aud"}
    out = run(srv, "audit", "search", "--event", "export", "--json").stdout
    found = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert any(r.get("user") == "reader" and study in r.get("studies", []) for r in found), found
    messages = "".join(m for r in found for m in r.get("messages", []))
    assert 'csd-code="110106"' in messages, messages[:500]


def test_admin_totp_enrolment_from_the_browser_api(make_server):
    srv = make_server(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    initial = (srv.data / "initial-admin-password").read_text().strip()
    run(srv, "user", "add", "reader", "--role", "clinician", "--password-stdin",
        stdin=PASSWORD + "\n")

    # a wrong password says nothing more than a failed login
    status, _, body = post_json(srv, "/api/login", {"username": "admin", "password": "wrong-1"})
    assert status == 401, body
    time.sleep(1.5)  # the back-off of the first failure
    assert post_json(srv, "/api/totp/enrol", {"username": "admin", "password": "wrong-2"})[0] in (401, 429)
    # the right password: the login asks for the enrolment
    status, _, body = post_patiently(srv, "/api/login", {"username": "admin", "password": initial})
    assert status == 403 and "two-factor" in body["error"], body

    status, _, e = post_patiently(srv, "/api/totp/enrol", {"username": "admin", "password": initial})
    assert status == 200, e
    secret = e["secret"]
    assert len(secret) == 32 and e["uri"].startswith("otpauth://totp/") and f"secret={secret}" in e["uri"]
    assert e["qr_svg"].lstrip().startswith("<?xml") or "<svg" in e["qr_svg"][:200]

    # a wrong code is refused and nothing is stored
    time.sleep(0.5)
    step = int(time.time()) // 30
    wrong = "000000" if totp(secret, step) != "000000" else "111111"
    status, _, _ = post_json(srv, "/api/totp/enrol", {"username": "admin", "password": initial,
                                                      "secret": secret, "totp": wrong})
    assert status in (401, 429)
    users = json.loads(run(srv, "user", "list", "--json").stdout)
    assert not next(u for u in users if u["username"] == "admin")["totp_enabled"]

    # the right code: stored, logged in (session cookie), password still to change
    for _ in range(4):
        step = int(time.time()) // 30
        status, headers, me = post_json(srv, "/api/totp/enrol", {
            "username": "admin", "password": initial, "secret": secret, "totp": totp(secret, step)})
        if status != 429:
            break
        time.sleep(int(headers.get("retry-after", "1")) + 0.3)
    assert status == 200, me
    assert me["username"] == "admin" and me["must_change_password"] is True
    assert "bastion_session=" in headers["set-cookie"]
    users = json.loads(run(srv, "user", "list", "--json").stdout)
    assert next(u for u in users if u["username"] == "admin")["totp_enabled"]
    events = [e for e in srv.events() if e["type"] == "user.totp_enabled"]
    assert events and events[-1]["username"] == "admin" and events[-1]["via"] == "web"

    # the same code cannot be used again, and an enrolled account cannot
    # enrol again (401, as a failed login)
    status, _, _ = post_json(srv, "/api/login", {"username": "admin", "password": initial,
                                                 "totp": totp(secret, step)})
    assert status in (401, 429)
    time.sleep(3)
    status, _, _ = post_json(srv, "/api/totp/enrol", {"username": "admin", "password": initial})
    assert status in (401, 429)
    # a clinician (no TOTP required) is not offered an enrolment
    status, _, _ = post_patiently(srv, "/api/totp/enrol", {"username": "reader", "password": PASSWORD})
    assert status == 401
    # a cross-site form cannot drive it
    status, _, _ = post_json(srv, "/api/totp/enrol", {"username": "admin", "password": initial},
                             {"Origin": "https://evil.example"})
    assert status == 403
    # the secret never reaches the logs
    assert secret not in srv.log()
    assert secret not in (srv.data / "events" / "events.log").read_text()
