"""The web UI in a real browser (issue 6): Debian's chromium
driven by playwright-core (tests/ui, pinned, installed by `npm ci`; no
browser download) against a real `bastion serve` holding CT_small (two
instances: the original and a copy with inverted pixels as instance 2) and
MR_small, stored by STOW-RS with a technologist token. A clinician fails to
log in with a wrong password, logs in, searches, opens the CT, checks its
size and pixels, switches a window preset, steps to the next instance, sees
"cannot display this image" for a failed render, logs out and is sent back
to the login page when the session is gone; a user with a generated password
is made to change it at the first login; no CSP violation. Screenshots go
to the test's tmp dir (ui/*.png).

The second test drives the administration side (tests/ui/security.test.mjs):
the initial admin enrols TOTP (the test computes the codes) and changes the
generated password; a clinician drags the window, zooms, pans and downloads
the CT as a zip; the same on a tablet-sized window; a technologist is
refused the download; an auditor sees alerts and audit only and is refused
images; scripted failed logins raise a brute-force alert whose evidence the
admin reads and acknowledges; the audit page shows the clinician's access
and an intact chain; devices are added, edited (then take effect on a real
DICOM association) and removed with confirmation; a user is added and
disabled; the posture page lists listeners and certificate expiry.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

import corpus
import helpers
from test_dicomweb import PASSWORD, _multipart, new_token, request, run
from test_users import GENERATED

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
CHROMIUM = "/usr/bin/chromium"


def _second_instance(src: Path) -> bytes:
    """CT_small as instance 2 of its series: new SOP Instance UID, inverted pixels."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 2
    arr = ds.pixel_array
    ds.PixelData = (arr.max() - arr + arr.min()).astype(arr.dtype).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _node() -> str:
    assert os.access(CHROMIUM, os.X_OK), "chromium missing (scripts/test.sh installs it)"
    node = shutil.which("node")
    assert node, "node missing (scripts/test.sh installs it)"
    assert (UI_DIR / "node_modules" / "playwright-core").is_dir(), \
        "tests/ui/node_modules missing: run `npm ci` in tests/ui (scripts/test.sh does)"
    return node


CT = corpus.corpus_root() / "pydicom" / "test_files" / "CT_small.dcm"
MR = corpus.corpus_root() / "pydicom" / "test_files" / "MR_small.dcm"


def _store_studies(srv, tmp_path, mr=True) -> str:
    """CT_small (2 instances) and MR_small by STOW-RS; the CT's Study UID."""
    tech = new_token(srv, "stow", "technologist")
    ct = CT
    ct2 = tmp_path / "CT_small_2.dcm"
    ct2.write_bytes(_second_instance(ct))
    body, b = _multipart([ct, ct2] + ([MR] if mr else []))
    status, _, out = request(srv, "POST", "/dicomweb/studies", tech,
                             {"Content-Type": f'multipart/related; type="application/dicom"; '
                                              f'boundary="{b}"',
                              "Accept": "application/dicom+json"}, body)
    assert status == 200, out[:500]
    return str(pydicom.dcmread(ct, stop_before_pixels=True).StudyInstanceUID)


def _run_browser(node, script, env, shots, pngs, timeout=300):
    r = subprocess.run([node, str(UI_DIR / script)], cwd=UI_DIR, env=dict(os.environ, **env),
                       capture_output=True, text=True, timeout=timeout)
    print(r.stdout)
    print(r.stderr[-4000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    results = json.loads((shots / "result.json").read_text())
    assert results and all(c["ok"] for c in results), results
    for name in pngs:
        png = shots / f"{name}.png"
        assert png.stat().st_size > 1000, png
    print(f"screenshots: {shots}")
    return results


def test_clinician_reads_a_ct_in_the_browser(make_server, tmp_path):
    node = _node()
    srv = make_server(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    run(srv, "user", "add", "reader", "--role", "clinician", "--password-stdin",
        stdin=PASSWORD + "\n")

    # a generated password: must be changed at the first login
    m = GENERATED.search(run(srv, "user", "add", "newbie", "--role", "clinician").stdout)
    assert m, "no generated password"
    _store_studies(srv, tmp_path)

    shots = tmp_path / "ui"
    _run_browser(node, "ui.test.mjs", {
        "BASE_URL": f"https://localhost:{srv.http_port}", "UI_USER": "reader",
        "UI_PASSWORD": PASSWORD, "NEW_USER": "newbie", "NEW_PASSWORD": m.group(2),
        "OUT_DIR": str(shots)}, shots,
        ("login", "studies", "viewer", "viewer-cannot", "expired", "password"))


def test_admin_and_security_pages_in_the_browser(make_server, tmp_path):
    node = _node()
    srv = make_server(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    admin_password = (srv.data / "initial-admin-password").read_text().strip()
    for name, role in (("reader", "clinician"), ("tech", "technologist"),
                       ("auditor", "auditor")):
        run(srv, "user", "add", name, "--role", role, "--password-stdin",
            stdin=PASSWORD + "\n")
    ct_study = _store_studies(srv, tmp_path, mr=False)
    # The devices page's material: a modality that stored an MR over
    # DICOM-TLS (its Manufacturer etc. in the inventory), a registered
    # device refused for its transport, an unknown AE title.
    srv.device_add("MODALITY")
    sent = helpers.store_files(srv.tls_port, "MODALITY", [MR], tls=srv.tls_context())
    assert list(sent.values()) == [0x0000], sent
    srv.device_add("PORTABLE_DX", transport="mtls")
    assert str(srv.echo("PORTABLE_DX")).startswith("not established")
    assert str(srv.echo("STRANGER")).startswith("not established")

    shots = tmp_path / "ui"
    results = _run_browser(node, "security.test.mjs", {
        "BASE_URL": f"https://localhost:{srv.http_port}", "HTTP_PORT": str(srv.http_port),
        "ADMIN_PASSWORD": admin_password, "READER": "reader", "READER_PASSWORD": PASSWORD,
        "TECH": "tech", "TECH_PASSWORD": PASSWORD, "AUDITOR": "auditor",
        "AUDITOR_PASSWORD": PASSWORD, "CT_STUDY": ct_study, "OUT_DIR": str(shots)}, shots,
        ("totp", "viewer-tools", "tablet-studies", "tablet-viewer", "auditor", "alerts",
         "audit", "devices", "users", "posture", "tablet-devices", "tablet-audit"))
    assert len(results) >= 30, len(results)

    # The device added in the browser is a real registration: it may
    # associate now (echo over TLS), and the one removed may not.
    assert srv.echo("CT_SCANNER") == 0x0000
    assert str(srv.echo("OLD_US")).startswith("not established"), srv.echo("OLD_US")
    # The study download holds the CT's two instances as Part 10 files.
    with zipfile.ZipFile(shots / "study.zip") as z:
        names = sorted(z.namelist())
        assert len(names) == 2
        sops = {n.split("/")[1][:-4] for n in names}
        for n in names:
            ds = pydicom.dcmread(io.BytesIO(z.read(n)))
            assert ds.StudyInstanceUID == ct_study
            assert ds.SOPInstanceUID in sops
    # The export is a DICOM "Export" audit message (EventID 110106).
    events = srv.events()
    exports = [e for e in events if e.get("action") == "export.study"]
    assert exports and exports[0]["user"] == "reader" and exports[0]["outcome"] == "success", exports
    refused = [e for e in events if e.get("action") == "export.study" and e.get("user") == "tech"]
    assert refused and refused[0]["outcome"] != "success", refused
