"""The OHIF Viewer served by Bastion (issue 11), in a real browser.

`bastion serve --ohif-dir` serves the pinned @ohif/app (scripts/fetch-ohif.sh,
outside the checkout) at /viewer/. One study per kind of image a reading room
sees (tests/interop/ohif_cases.py: CT, MR, US multi-frame, JPEG baseline,
JPEG 2000, JPEG-LS, RLE, palette colour, 12-bit JPEG, ECG, attributes as VR
UN) is stored by STOW-RS; tests/ui/ohif.test.mjs logs a clinician in to
Bastion and opens the unfiltered worklist and every study in OHIF, checking
the viewport shows pixels. Afterwards: the clinician's reading raised no
broad_query or bulk_retrieval alert (what OHIF really sends is a viewer's
normal use), OHIF's program files are served without a session but nothing
under /dicomweb is, and its own requests are in the event log.
Screenshots: the test's tmp dir, ohif/*.png.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import helpers
import ohif_cases
from test_dicomweb import PASSWORD, new_token, request, run
from test_ui import _node, _run_browser


def ohif_dir() -> Path:
    d = Path(os.environ.get("BASTION_OHIF_DIR")
             or Path.home() / ".cache" / "bastion-ohif" / "3.13.2" / "package")
    assert (d / "dist" / "index.html").is_file(), \
        f"no OHIF at {d}: run scripts/fetch-ohif.sh (scripts/test.sh does)"
    return d


def test_ohif_opens_every_kind_of_study(make_server, tmp_path):
    node = _node()
    srv = make_server(start=False)
    srv.start(plain=False, extra=("--ohif-dir", str(ohif_dir())))
    helpers.wait_port(srv.http_port, 30, srv.proc)
    run(srv, "user", "add", "reader", "--role", "clinician", "--password-stdin",
        stdin=PASSWORD + "\n")
    tech = new_token(srv, "stow", "technologist")
    cases = ohif_cases.prepared()
    b = "ohifboundary0123456789"
    body = b"".join(f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                    for _, _, data in cases) + f"--{b}--\r\n".encode()
    status, _, out = request(srv, "POST", "/dicomweb/studies", tech,
                             {"Content-Type": f'multipart/related; type="application/dicom"; '
                                              f'boundary="{b}"',
                              "Accept": "application/dicom+json"}, body)
    assert status == 200, out[:500]

    # Program files without a session; data never.
    status, headers, index = request(srv, "GET", "/viewer/")
    assert status == 200 and b"/viewer/app-config.js" in index
    status, _, config = request(srv, "GET", "/viewer/app-config.js")
    assert status == 200 and b"/dicomweb" in config and b"Bearer" not in config
    status, _, _ = request(srv, "GET", "/viewer/../bastion.toml")
    assert status in (401, 404)
    status, _, _ = request(srv, "GET", "/viewer/%2e%2e/bastion.toml")
    assert status == 404
    status, _, _ = request(srv, "GET", "/dicomweb/studies", None,
                           {"Accept": "application/dicom+json"})
    assert status == 401
    # Program files may be cached a day; the index, the config and data not.
    assert headers["cache-control"] == "no-store", headers
    assert b"/viewer/assets/mstile-144x144.png" in index
    bundle = next(p.name for p in (ohif_dir() / "dist").glob("app.bundle.*.js"))
    status, h, _ = request(srv, "GET", f"/viewer/{bundle}")
    assert status == 200 and h["cache-control"] == "private, max-age=86400", h
    assert request(srv, "GET", "/viewer/app-config.js")[1]["cache-control"] == "no-store"

    shots = tmp_path / "ohif"
    labels = [c[0] for c in cases]
    _run_browser(node, "ohif.test.mjs", {
        "BASE_URL": f"https://localhost:{srv.http_port}", "UI_USER": "reader",
        "UI_PASSWORD": PASSWORD, "OUT_DIR": str(shots),
        "OHIF_CASES": json.dumps([{"label": l, "uid": u} for l, u, _ in cases])},
        shots, ["worklist", *labels], timeout=600)

    # A clinician reading in OHIF is not a harvester.
    alerts = [json.loads(l) for l in run(srv, "alerts", "--json", "--all").stdout.splitlines()
              if l.strip()]
    noisy = [a for a in alerts if a.get("rule") in ("broad_query", "bulk_retrieval")]
    assert not noisy, noisy
    # OHIF's DICOMweb requests were recorded, as the clinician, its program files not.
    events = srv.events()
    mine = [e for e in events if e.get("type") == "http.request" and e.get("user") == "reader"]
    actions = {e.get("action") for e in mine}
    assert {"qido.studies", "wado.metadata", "wado.frames"} <= actions, actions
    assert not [e for e in events if e.get("action") == "viewer.asset"
                and str(e.get("status")) == "200"]


def test_ohif_dir_serves_nothing_of_bastion_and_no_link_out(make_server, tmp_path):
    """The viewer's files are anonymous: an ohif_dir overlapping the data or
    key directory is refused at start, and a symbolic link inside it that
    leads out is not followed (the outside trial read secrets/master.key and
    /etc/shadow through both)."""
    import subprocess
    srv = make_server(start=False)
    (srv.data / "index.html").write_text("<html></html>")
    r = subprocess.run([str(srv.bin), "serve", "--data", str(srv.data),
                        "--dicom-addr", f"127.0.0.1:{srv.tls_port}",
                        "--http-addr", f"127.0.0.1:{srv.http_port}",
                        "--ohif-dir", str(srv.data)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "overlaps the data directory" in r.stderr, r.stderr[-2000:]

    fake = tmp_path / "ohif" / "dist"
    fake.mkdir(parents=True)
    (fake / "index.html").write_text('<script>window.PUBLIC_URL="/"</script>')
    (fake / "app.js").write_text("// ok")
    (fake / "etc").symlink_to("/etc")
    (fake / "key").symlink_to(srv.data / "secrets" / "master.key")
    srv.start(plain=False, extra=("--ohif-dir", str(fake.parent)))
    helpers.wait_port(srv.http_port, 30, srv.proc)
    assert request(srv, "GET", "/viewer/app.js")[0] == 200
    for path in ("/viewer/etc/hostname", "/viewer/etc/passwd", "/viewer/key"):
        status, _, body = request(srv, "GET", path)
        assert status == 404, (path, status, body[:100])
