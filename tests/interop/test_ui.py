"""The web UI in a real browser (issue 6, first slice): Debian's chromium
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
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
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


def test_clinician_reads_a_ct_in_the_browser(make_server, tmp_path):
    assert os.access(CHROMIUM, os.X_OK), "chromium missing (scripts/test.sh installs it)"
    node = shutil.which("node")
    assert node, "node missing (scripts/test.sh installs it)"
    assert (UI_DIR / "node_modules" / "playwright-core").is_dir(), \
        "tests/ui/node_modules missing: run `npm ci` in tests/ui (scripts/test.sh does)"

    srv = make_server(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    tech = new_token(srv, "tech", "technologist")
    run(srv, "user", "add", "reader", "--role", "clinician", "--password-stdin",
        stdin=PASSWORD + "\n")

    # a generated password: must be changed at the first login
    m = GENERATED.search(run(srv, "user", "add", "newbie", "--role", "clinician").stdout)
    assert m, "no generated password"

    ct = corpus.corpus_root() / "pydicom" / "test_files" / "CT_small.dcm"
    mr = corpus.corpus_root() / "pydicom" / "test_files" / "MR_small.dcm"
    ct2 = tmp_path / "CT_small_2.dcm"
    ct2.write_bytes(_second_instance(ct))
    body, b = _multipart([ct, ct2, mr])
    status, _, out = request(srv, "POST", "/dicomweb/studies", tech,
                             {"Content-Type": f'multipart/related; type="application/dicom"; '
                                              f'boundary="{b}"',
                              "Accept": "application/dicom+json"}, body)
    assert status == 200, out[:500]

    shots = tmp_path / "ui"
    env = dict(os.environ, BASE_URL=f"https://localhost:{srv.http_port}", UI_USER="reader",
               UI_PASSWORD=PASSWORD, NEW_USER="newbie", NEW_PASSWORD=m.group(2),
               OUT_DIR=str(shots))
    r = subprocess.run([node, str(UI_DIR / "ui.test.mjs")], cwd=UI_DIR, env=env,
                       capture_output=True, text=True, timeout=240)
    print(r.stdout)
    print(r.stderr[-4000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    results = json.loads((shots / "result.json").read_text())
    assert results and all(c["ok"] for c in results), results
    for name in ("login", "studies", "viewer", "viewer-cannot", "expired", "password"):
        png = shots / f"{name}.png"
        assert png.stat().st_size > 1000, png
    print(f"screenshots: {shots}")
