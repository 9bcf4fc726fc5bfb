"""What OHIF tripped over in Bastion's DICOMweb (issue 11), each checked on the
wire as the viewer asks it:

* an unfiltered worklist broke when a study lacks Modality, because QIDO-RS
  returned `"00080061": {"vr": "CS"}` with no Value: empty attributes the
  request did not name are now left out (named ones stay, empty);
* ECG waveforms stayed blank: bulk data asked as `application/octet-stream`
  answered 406; it is now a single-part body (multipart still on request);
* a file that encodes standard attributes as VR UN showed nothing: metadata
  returned them as UN + InlineBinary; now with the dictionary VR, as QIDO-RS.
"""
from __future__ import annotations

import base64
import json

import pydicom
import pytest

import corpus
import helpers
from test_dicomweb import _multipart, new_token, request

ECG = corpus.corpus_root() / "pydicom" / "test_files" / "waveform_ecg.dcm"


def _find(name):
    hits = sorted(corpus.corpus_root().rglob(name))
    assert hits, name
    return hits[0]


@pytest.fixture(scope="module")
def viewer_srv(bastion_bin, tmp_path_factory):
    from conftest import Server
    srv = Server(bastion_bin, tmp_path_factory.mktemp("viewer"))
    srv.init()
    srv.start(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    yield srv
    srv.stop()


def _stow(srv, token, files):
    body, b = _multipart(files)
    status, _, out = request(srv, "POST", "/dicomweb/studies", token,
                             {"Content-Type": f'multipart/related; type="application/dicom"; '
                                              f'boundary="{b}"',
                              "Accept": "application/dicom+json"}, body)
    assert status == 200, out[:500]


def _get_json(srv, token, path):
    status, headers, body = request(srv, "GET", path, token,
                                    {"Accept": "application/dicom+json"})
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


def test_empty_attributes_not_asked_for_are_left_out(viewer_srv, tmp_path):
    srv = viewer_srv
    token = new_token(srv, "ohif1", "clinician")
    tech = new_token(srv, "tech1", "technologist")
    ds = helpers.make_dataset(patient_name="No^Modality", patient_id="NOMOD-1")
    del ds.Modality
    p = tmp_path / "nomod.dcm"
    helpers.dataset_file(ds, p)
    _stow(srv, tech, [p])
    study = str(ds.StudyInstanceUID)
    # OHIF's worklist: unfiltered, limit=101
    results = _get_json(srv, token, "/dicomweb/studies?limit=101&offset=0&fuzzymatching=false"
                                    "&includefield=00081030%2C00080060")
    mine = [r for r in results if r["0020000D"]["Value"] == [study]]
    assert len(mine) == 1, results
    assert "00080061" not in mine[0], mine[0]
    for r in results:
        for key, attr in r.items():
            # every attribute either has a value or was named by the request
            assert any(k in attr for k in ("Value", "BulkDataURI", "InlineBinary")) \
                or key in ("00081030", "00080060"), (key, attr)
    # named by the request: returned, empty
    results = _get_json(srv, token, f"/dicomweb/studies?StudyInstanceUID={study}"
                                    "&includefield=00080061")
    assert results[0]["00080061"] == {"vr": "CS"}, results[0]


def _bulk_uri(meta: dict, tag: str):
    """The first BulkDataURI of `tag` anywhere in a DICOM JSON object."""
    for key, attr in meta.items():
        if key == tag and "BulkDataURI" in attr:
            return attr["BulkDataURI"]
        for item in attr.get("Value", []) if attr.get("vr") == "SQ" else []:
            found = _bulk_uri(item, tag)
            if found:
                return found
    return None


def test_waveform_bulk_data_single_part_and_multipart(viewer_srv):
    srv = viewer_srv
    token = new_token(srv, "ohif2", "clinician")
    tech = new_token(srv, "tech2", "technologist")
    _stow(srv, tech, [ECG])
    ds = pydicom.dcmread(ECG)
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    meta = _get_json(srv, token, f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"
                                 "/metadata")[0]
    uri = _bulk_uri(meta, "54001010")  # Waveform Data, inside Waveform Sequence
    assert uri, meta.get("54000100")
    path = uri[uri.index("/dicomweb/"):]
    expected = ds.WaveformSequence[0].WaveformData
    # what OHIF asks: a single part
    status, headers, body = request(srv, "GET", path, token, {"Accept": "application/octet-stream"})
    assert status == 200, (status, body[:200])
    assert headers["content-type"] == "application/octet-stream"
    assert body == expected
    # multipart on request, the same bytes inside
    status, headers, body = request(
        srv, "GET", path, token,
        {"Accept": 'multipart/related; type="application/octet-stream"'})
    assert status == 200
    assert headers["content-type"].startswith("multipart/related")
    assert expected in body
    # anything else: 406
    status, _, _ = request(srv, "GET", path, token, {"Accept": "image/png"})
    assert status == 406
    # without a token: refused
    status, _, _ = request(srv, "GET", path, None, {"Accept": "application/octet-stream"})
    assert status == 401


def test_standard_attributes_sent_as_un_have_their_dictionary_vr(viewer_srv):
    srv = viewer_srv
    token = new_token(srv, "ohif3", "clinician")
    tech = new_token(srv, "tech3", "technologist")
    f = _find("explicit_VR-UN.dcm")
    _stow(srv, tech, [f])
    raw = f.read_bytes()
    pydicom.config.replace_un_with_known_vr = True
    ds = pydicom.dcmread(f, force=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID",
                                                       "SOPInstanceUID"])
    study = ds.StudyInstanceUID
    meta = _get_json(srv, token, f"/dicomweb/studies/{study}/metadata")[0]
    assert meta["00080060"] == {"vr": "CS", "Value": ["CT"]}, meta["00080060"]
    assert meta["00100010"]["vr"] == "PN"
    assert meta["00100010"]["Value"][0]["Alphabetic"] == "PANCREAS_0001"
    assert meta["00280030"] == {"vr": "DS", "Value": [0.859375, 0.859375]}, meta["00280030"]
    assert meta["00200013"] == {"vr": "IS", "Value": [122]}, meta["00200013"]
    # private attributes stay UN
    assert meta["00131010"]["vr"] == "UN"
    # QIDO-RS shows the same values
    q = _get_json(srv, token, f"/dicomweb/studies?StudyInstanceUID={study}")
    assert q[0]["00080061"]["Value"] == ["CT"]
    # the stored dataset is unchanged, byte for byte (the file meta is Bastion's)
    got = srv.instance_get(str(ds.SOPInstanceUID))
    assert _dataset(got) == _dataset(raw)


def _dataset(part10: bytes) -> bytes:
    """The dataset after the File Meta Information group."""
    assert part10[128:132] == b"DICM" and part10[132:136] == b"\x02\x00\x00\x00"
    return part10[144 + int.from_bytes(part10[140:144], "little"):]
