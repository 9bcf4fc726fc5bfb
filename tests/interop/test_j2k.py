"""JPEG 2000 (PS3.5 §A.4.4) decoded in the sandboxed child process
(`bastion decode-image`, seccomp + resource limits; see
crates/bastion/src/decoder_sandbox.rs), never in the server:

- lossless JPEG 2000 corpus files decode to exactly the pixel data of their
  uncompressed twins (WADO-RS in Explicit VR Little Endian), grey and
  colour (YBR_RCT → RGB), single- and multi-frame;
- /rendered of lossless and lossy files is a PNG of the image's size;
- a corrupted codestream is a clear 4xx for that image, the server keeps
  serving, and the log names the failure.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

import corpus
import helpers
from test_dicomweb import _multipart, new_token, request

ROOT = corpus.corpus_root()
# (JPEG 2000 lossless file, uncompressed twin)
LOSSLESS = [
    ("pydicom/test_files/MR_small_jp2klossless.dcm", "pydicom/test_files/MR_small.dcm"),
    ("pydicom-data/US1_J2KR.dcm", "pydicom-data/US1_UNCR.dcm"),
    ("pydicom-data/693_J2KR.dcm", "pydicom-data/693_UNCR.dcm"),
    ("pydicom-data/emri_small_jpeg_2k_lossless.dcm", "pydicom-data/emri_small.dcm"),
]
LOSSY = ["pydicom-data/RG1_J2KI.dcm", "pydicom-data/US1_J2KI.dcm", "pydicom/test_files/693_J2KI.dcm"]
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _path(ds):
    return (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


@pytest.fixture(scope="module")
def j2k(bastion_bin, tmp_path_factory):
    from conftest import Server
    srv = Server(bastion_bin, tmp_path_factory.mktemp("j2k"))
    srv.init()
    srv.start(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    tech = new_token(srv, "tech", "technologist")
    reader = new_token(srv, "reader", "clinician")
    files = [ROOT / j for j, _ in LOSSLESS] + [ROOT / f for f in LOSSY]
    body, b = _multipart(files)
    st, _, out = request(srv, "POST", "/dicomweb/studies", tech,
                         {"Content-Type": f'multipart/related; type="application/dicom"; '
                                          f'boundary="{b}"', "Accept": "application/dicom+json"},
                         body)
    assert st == 200, out[:500]
    yield srv, tech, reader
    srv.stop()


def _single_part(headers, body):
    boundary = headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    parts = [p for p in body.split(b"--" + boundary.encode()) if p.strip(b"-\r\n")]
    assert len(parts) == 1
    return parts[0].split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]


@pytest.mark.parametrize("j2k_file,twin", LOSSLESS, ids=[j.split("/")[-1] for j, _ in LOSSLESS])
def test_lossless_jpeg2000_decodes_to_the_uncompressed_twin(j2k, j2k_file, twin):
    srv, _, reader = j2k
    ds = pydicom.dcmread(ROOT / j2k_file, stop_before_pixels=True)
    st, hd, body = request(srv, "GET", _path(ds), reader,
                           {"Accept": f'multipart/related; type="application/dicom"; '
                                      f'transfer-syntax={EXPLICIT_LE}'})
    assert st == 200, body[:300]
    got = pydicom.dcmread(io.BytesIO(_single_part(hd, body)))
    assert str(got.file_meta.TransferSyntaxUID) == EXPLICIT_LE
    expected = pydicom.dcmread(ROOT / twin)
    assert got.pixel_array.shape == expected.pixel_array.shape
    if int(expected.SamplesPerPixel) == 3:
        assert got.PhotometricInterpretation == "RGB"
        exp = expected.pixel_array
        if expected.PhotometricInterpretation != "RGB":
            exp = pydicom.pixels.convert_color_space(exp, expected.PhotometricInterpretation, "RGB")
        assert np.array_equal(got.pixel_array, exp)
    else:
        assert np.array_equal(got.pixel_array, expected.pixel_array)


@pytest.mark.parametrize("rel", [j for j, _ in LOSSLESS] + LOSSY)
def test_rendered_jpeg2000_is_a_png_of_the_right_size(j2k, rel):
    srv, _, reader = j2k
    ds = pydicom.dcmread(ROOT / rel, stop_before_pixels=True)
    frame = "/frames/3" if int(ds.get("NumberOfFrames", 1) or 1) > 1 else ""
    st, hd, png = request(srv, "GET", f"{_path(ds)}{frame}/rendered", reader, {"Accept": "image/png"})
    assert st == 200, (st, png[:200])
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.size == (ds.Columns, ds.Rows)
    extrema = img.convert("L").getextrema()
    assert extrema[1] - extrema[0] > 20, extrema  # not blank


def test_corrupted_codestream_is_refused_and_the_server_keeps_serving(j2k, tmp_path):
    srv, tech, reader = j2k
    ds = pydicom.dcmread(ROOT / "pydicom/test_files/MR_small_jp2klossless.dcm")
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    data = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
    for i in range(60, min(len(data), 400)):  # after SOC/SIZ: garbage tile data
        data[i] ^= 0x5A
    ds.PixelData = pydicom.encaps.encapsulate([bytes(data)])
    f = tmp_path / "broken_j2k.dcm"
    ds.save_as(f, enforce_file_format=True)
    body, b = _multipart([f])
    st, _, out = request(srv, "POST", "/dicomweb/studies", tech,
                         {"Content-Type": f'multipart/related; type="application/dicom"; '
                                          f'boundary="{b}"', "Accept": "application/dicom+json"},
                         body)
    assert st == 200, out[:300]
    st, _, out = request(srv, "GET", f"{_path(ds)}/rendered", reader, {"Accept": "image/png"})
    # openjp2 may decode damaged tile data to noise (200) or refuse it; a
    # truncated codestream is always refused.
    assert st in (200, 422), (st, out[:300])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PixelData = pydicom.encaps.encapsulate([bytes(data[:len(data) // 3])])
    ds.save_as(f, enforce_file_format=True)
    body, b = _multipart([f])
    assert request(srv, "POST", "/dicomweb/studies", tech,
                   {"Content-Type": f'multipart/related; type="application/dicom"; '
                                    f'boundary="{b}"'}, body)[0] == 200
    st, _, out = request(srv, "GET", f"{_path(ds)}/rendered", reader, {"Accept": "image/png"})
    assert st == 422, (st, out[:300])
    err = json.loads(out)["error"]
    assert "JPEG 2000" in err or "1.2.840.10008.1.2.4.90" in err, err
    # still serving, other images still render
    good = pydicom.dcmread(ROOT / LOSSLESS[0][0], stop_before_pixels=True)
    assert request(srv, "GET", f"{_path(good)}/rendered", reader, {"Accept": "image/png"})[0] == 200
    assert srv.proc.poll() is None
