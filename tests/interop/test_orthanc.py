"""Orthanc 1.10 (Debian's `orthanc` and `orthanc-dicomweb`) as a real peer in
both directions (issue 11).

Orthanc cannot listen on loopback only, so it runs inside a network
namespace this test creates (`ip netns add`), joined to the host by a veth
pair on a /30 of its own; Bastion's plain DICOM and HTTPS listeners bind to
the host end (its server certificate names that address), Orthanc to the
namespace end. No other address is involved and everything is torn down at
the end. Checked, every instance by dataset equality with the original:

* Orthanc pulls from Bastion: a C-MOVE initiated from Orthanc's REST API
  (`/modalities/bastion/move`, Orthanc as its own destination);
* Bastion moves to Orthanc: a workstation (pynetdicom, over DICOM-TLS on
  loopback) asks Bastion to move a study to ORTHANC;
* Orthanc pushes to Bastion: C-STORE (`/modalities/bastion/store`) and
  STOW-RS through its DICOMweb plugin as a client
  (`/dicom-web/servers/bastion/stow`, bearer token, Bastion's CA trusted).

C-GET initiated from Orthanc is not tested: Orthanc implements C-GET as an
SCU only since 1.12.6; Debian ships 1.10.1.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

import corpus
import helpers
from test_dicomweb import new_token

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
FILES = ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm",
         "OBXXXX1A.dcm"]


def _sh(*args):
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns():
    """A network namespace joined by a veth pair: (name, host address, namespace address)."""
    assert os.geteuid() == 0, "creating a network namespace needs root (CI runs as root)"
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    ns, host_if, ns_if = f"bastion-orthanc-{tag}", f"bo{tag}h", f"bo{tag}n"
    third = random.randrange(1, 250)
    host_ip, ns_ip = f"10.213.{third}.1", f"10.213.{third}.2"
    _sh("ip", "netns", "add", ns)
    try:
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _sh("ip", "link", "set", ns_if, "netns", ns)
        _sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        _sh("ip", "link", "set", host_if, "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, host_ip, ns_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class Orthanc:
    """Orthanc inside the namespace, driven over its REST API."""

    def __init__(self, ns, ns_ip, base: Path, bastion_host, bastion_dicom_port,
                 bastion_http_port, token, ca: Path):
        assert os.access(ORTHANC, os.X_OK), "Orthanc missing (scripts/test.sh installs orthanc)"
        assert Path(DICOMWEB_PLUGIN).is_file(), "orthanc-dicomweb missing"
        self.url = f"http://{ns_ip}:8042"
        store = base / "orthanc-db"
        store.mkdir(parents=True)
        config = {
            "Name": "bastion-peer-test",
            "StorageDirectory": str(store),
            "IndexDirectory": str(store),
            "HttpPort": 8042,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "DicomAet": "ORTHANC",
            "DicomPort": 4242,
            "DicomModalities": {"bastion": ["BASTION", bastion_host, bastion_dicom_port]},
            "Plugins": [DICOMWEB_PLUGIN],
            "HttpsCACertificates": str(ca),
            "HttpsVerifyPeers": True,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {"bastion": {
                    "Url": f"https://{bastion_host}:{bastion_http_port}/dicomweb/",
                    "HttpHeaders": {"Authorization": f"Bearer {token}"},
                }},
            },
        }
        cfg = base / "orthanc.json"
        cfg.write_text(json.dumps(config))
        self.log = open(base / "orthanc.log", "wb")
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, ORTHANC, str(cfg)],
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (base / "orthanc.log").read_text()[-3000:]
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("Orthanc did not start: " + (base / "orthanc.log").read_text()[-3000:])

    def _call(self, method, path, body=None, ctype="application/json"):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", ctype)
        # the namespace address is never behind a proxy
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=120) as r:
            raw = r.read()
        return raw

    def get(self, path):
        raw = self._call("GET", path)
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def post(self, path, body, ctype="application/json"):
        raw = self._call("POST", path, body, ctype)
        return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw

    def instance_by_sop(self, sop):
        found = self.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop}})
        return found[0] if found else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def _same(a: bytes, b: bytes) -> bool:
    """Equal datasets and transfer syntax (group lengths and trailing
    padding aside: peers re-encode them)."""
    x, y = pydicom.dcmread(io.BytesIO(a)), pydicom.dcmread(io.BytesIO(b))
    keep = lambda ds: {e.tag: e for e in ds  # noqa: E731
                       if e.tag.element != 0 and e.tag != 0xFFFCFFFC}
    return (x.file_meta.TransferSyntaxUID == y.file_meta.TransferSyntaxUID
            and keep(x) == keep(y))


def _fresh(name: str, label: str) -> tuple[str, str, bytes]:
    """A corpus file as a study of its own: (study, SOP Instance UID, bytes)."""
    path = sorted(corpus.corpus_root().rglob(name))[0]
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = f"ORTHANC-{label}"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), buf.getvalue()


def test_orthanc_pulls_receives_and_pushes(make_server, netns, tmp_path):
    ns, host_ip, ns_ip = netns
    srv = make_server(start=False)
    srv.peer_host = host_ip
    # the server certificate must name the address Orthanc connects to
    srv.cli("cert", "server", "--host", host_ip)
    srv.start(plain=True)
    helpers.wait_port(srv.http_port, 30, srv.proc, host=host_ip)
    srv.device_add("ORTHANC", network=f"{ns_ip}/32", transport="plain",
                   allow="echo,store,find,move", host=ns_ip, port=4242)
    srv.device_add("WS", transport="mtls", allow="echo,move", move_destinations="ORTHANC")
    token = new_token(srv, "orthanc-stow", "technologist")
    orthanc = Orthanc(ns, ns_ip, tmp_path, host_ip, srv.plain_port, srv.http_port, token,
                      srv.data / "tls" / "ca.crt")
    try:
        # the DICOM link, both ways
        echo = orthanc.post("/modalities/bastion/echo", {})
        assert echo in ({}, b"{}", b"") or isinstance(echo, dict), echo

        sent = [_fresh(n, f"P{i}") for i, n in enumerate(FILES)]
        for study, sop, data in sent:
            f = tmp_path / f"{sop}.dcm"
            f.write_bytes(data)
            code, _, _, _ = srv.import_(f)
            assert code == 0

        # 1. Orthanc pulls: C-MOVE from its REST API, itself as destination
        for study, sop, data in sent[:3]:
            orthanc.post("/modalities/bastion/move",
                         {"Level": "Study", "Resources": [{"StudyInstanceUID": study}],
                          "TargetAet": "ORTHANC", "Synchronous": True})
            oid = orthanc.instance_by_sop(sop)
            assert oid, f"Orthanc did not receive {sop}"
            assert _same(orthanc.get(f"/instances/{oid}/file"), data), sop

        # 2. Bastion moves to Orthanc at a workstation's request
        from pynetdicom import AE
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove
        ae = AE(ae_title="WS")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", srv.tls_port, ae_title=srv.ae_title,
                             tls_args=(srv.tls_context("WS"), "localhost"))
        assert assoc.is_established
        try:
            for study, sop, data in sent[3:]:
                q = pydicom.Dataset()
                q.QueryRetrieveLevel = "STUDY"
                q.StudyInstanceUID = study
                statuses = [s.Status for s, _ in
                            assoc.send_c_move(q, "ORTHANC", StudyRootQueryRetrieveInformationModelMove)
                            if s]
                assert statuses and statuses[-1] == 0x0000, statuses
                oid = orthanc.instance_by_sop(sop)
                assert oid and _same(orthanc.get(f"/instances/{oid}/file"), data), sop
        finally:
            assoc.release()

        # 3. Orthanc pushes: C-STORE, then STOW-RS through its DICOMweb plugin
        pushed = [_fresh("MR_small.dcm", "PUSH-DIMSE"), _fresh("US1_J2KR.dcm", "PUSH-STOW"),
                  _fresh("emri_small_RLE.dcm", "PUSH-STOW2")]
        ids = [orthanc.post("/instances", data, "application/dicom")["ID"]
               for _, _, data in pushed]
        orthanc.post("/modalities/bastion/store", {"Resources": [ids[0]], "Synchronous": True})
        orthanc.post("/dicom-web/servers/bastion/stow", {"Resources": ids[1:], "Synchronous": True})
        for study, sop, data in pushed:
            got = srv.instance_get(sop, out=tmp_path / "back" / f"{sop}.dcm", check=False)
            assert got is not None, f"Bastion did not receive {sop}"
            assert _same(got, data), sop
        stow = [e for e in srv.events() if e.get("type") == "http.request"
                and e.get("action") == "stow" and e.get("user") == "orthanc-stow"]
        assert stow and all(str(e.get("status")) == "200" for e in stow), stow
    finally:
        orthanc.stop()
