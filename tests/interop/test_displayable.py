"""Every image displayable (issue 11): rendered images, thumbnails and frames
for every photometric interpretation and codec of the corpus.

- /rendered and /thumbnail of PALETTE COLOR (plain and segmented lookup
  tables, native and RLE), YBR_FULL_422 (native and JPEG), 32-bit (native and
  RLE), single-bit, JPEG-LS and 12-bit JPEG files are 200 with an image whose
  pixels are not all one value;
- /frames without a transfer-syntax parameter answer native little-endian
  pixel data (Explicit VR Little Endian, PS3.18 §8.7.3.5.2) of Rows × Columns
  × Samples × Bits Allocated / 8 bytes, also for compressed instances, equal
  to pydicom's decoding where pydicom decodes losslessly;
- `transfer-syntax=*` keeps the frames as stored (OHIF's default Accept);
- single-part frame requests (`Accept: application/octet-stream`,
  `image/dicom-rle`, `image/jls`…) get one body, not multipart;
- a C-GET requestor accepting only Explicit VR Little Endian receives 12-bit
  JPEG decoded.

Each file is stored under a fresh SOP Instance UID (several corpus files
share one).
"""
from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import corpus
import helpers
import test_transcode
from test_dicomweb import _multipart, new_token, request

ROOT = corpus.corpus_root()
STORED = {}  # corpus file -> the copy stored (fresh SOP Instance UID)

# (corpus file, whether pydicom's own decoding is the expected native frame)
FILES = {
    # PALETTE COLOR: plain 8-bit tables (16-bit entries), native and RLE
    "pydicom-data/OBXXXX1A.dcm": True,
    "pydicom-data/OBXXXX1A_2frame.dcm": True,
    "pydicom-data/OBXXXX1A_rle.dcm": True,
    "pydicom-data/OBXXXX1A_expb.dcm": True,
    "pydicom/test_files/examples_palette.dcm": True,
    # PALETTE COLOR with segmented lookup tables, 16-bit pixels
    "pydicom-data/gdcm-US-ALOKA-16.dcm": True,
    "pydicom-data/gdcm-US-ALOKA-16_big.dcm": True,
    # YBR_FULL_422: uncompressed (2 samples per pixel stored), and JPEG
    "pydicom/test_files/SC_ybr_full_422_uncompressed.dcm": True,
    "pydicom/test_files/SC_rgb_dcmtk_+eb+cy+s2.dcm": False,
    "pydicom/test_files/examples_ybr_color.dcm": False,  # 30 frames
    # 32 bits allocated: native and RLE, grey and colour
    "pydicom-data/SC_rgb_32bit.dcm": True,
    "pydicom/test_files/SC_rgb_rle_32bit.dcm": True,
    "pydicom/test_files/SC_rgb_rle_32bit_2frame.dcm": True,
    "pydicom/test_files/rtdose_rle.dcm": True,
    "pydicom/test_files/rtdose_rle_1frame.dcm": True,
    "pydicom/test_files/rtdose.dcm": True,
    # single bit (frames: 512 × 512 / 8 bytes each)
    "pydicom/test_files/liver_1frame.dcm": True,
    "pydicom-data/liver.dcm": True,
    # JPEG-LS (CharLS, in the sandboxed child)
    "pydicom/test_files/MR_small_jpeg_ls_lossless.dcm": "pydicom/test_files/MR_small.dcm",
    "pydicom-data/emri_small_jpeg_ls_lossless.dcm": "pydicom-data/emri_small.dcm",
    # 12-bit JPEG Extended (libjpeg-turbo, in the sandboxed child)
    "pydicom/test_files/JPEG-lossy.dcm": "dcmdjpeg",
    "pydicom/test_files/JPGExtended.dcm": "dcmdjpeg",
}
# Corpus files no viewer can show: their image attributes or codestream are
# deliberately corrupt (pydicom's parser tests).
BROKEN = {
    # a Sequence Delimitation Item's bytes inside the JPEG 2000 SIZ segment
    "pydicom/test_files/JPEG2000-embedded-sequence-delimiter.dcm",
    # Number of Frames "1A"
    "pydicom/test_files/badVR.dcm",
}
RENDER_ONLY: set[str] = set()


def _path(uids):
    study, series, sop = uids
    return f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"


@pytest.fixture(scope="module")
def shown(bastion_bin, tmp_path_factory):
    from conftest import Server
    tmp = tmp_path_factory.mktemp("displayable")
    srv = Server(bastion_bin, tmp)
    srv.init()
    srv.start(plain=False)
    helpers.wait_port(srv.http_port, 30, srv.proc)
    tech = new_token(srv, "tech", "technologist")
    reader = new_token(srv, "reader", "clinician")
    srv.device_add(test_transcode.GETTER, transport="mtls", allow="echo,store,get")
    uids, files = {}, []
    for i, rel in enumerate(FILES):
        ds = pydicom.dcmread(ROOT / rel)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["h8-displayable", rel])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = tmp / f"f{i}.dcm"
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
        uids[rel] = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        STORED[rel] = out
    body, b = _multipart(files)
    st, _, out = request(srv, "POST", "/dicomweb/studies", tech,
                         {"Content-Type": f'multipart/related; type="application/dicom"; '
                                          f'boundary="{b}"', "Accept": "application/dicom+json"},
                         body)
    assert st == 200, out[:500]
    yield srv, reader, uids
    srv.stop()


@pytest.fixture(scope="module")
def getter(shown, tmp_path_factory):
    """A C-GET requestor (mTLS) of the `shown` server, as test_transcode's."""
    srv, _, _ = shown
    crt, key, ca, _ = srv.cert_issue(test_transcode.GETTER)
    return {"srv": srv, "ctx": helpers.client_ssl_context(ca, crt, key)}


def _parts(headers, body):
    ct = headers["content-type"]
    assert ct.startswith("multipart/related"), ct
    boundary = ct.split("boundary=")[1].split(";")[0].strip('"')
    parts = [p for p in body.split(b"\r\n--" + boundary.encode())]
    out = []
    for p in parts:
        if p.startswith(b"--" + boundary.encode()):
            p = p[len(boundary) + 2:]
        if p.startswith(b"--"):
            continue
        head, data = p.split(b"\r\n\r\n", 1)
        out.append((head.decode(), data))
    return out


def _frame_bytes(ds) -> int:
    samples = 2 if ds.PhotometricInterpretation == "YBR_FULL_422" and \
        ds.file_meta.TransferSyntaxUID in corpus.UNCOMPRESSED_TS else int(ds.SamplesPerPixel)
    return int(ds.Rows) * int(ds.Columns) * samples * int(ds.BitsAllocated) // 8  # 1 bit: packed


@pytest.mark.parametrize("rel", list(FILES))
@pytest.mark.parametrize("resource", ["rendered", "thumbnail"])
def test_rendered_and_thumbnail_show_the_image(shown, rel, resource):
    srv, reader, uids = shown
    ds = pydicom.dcmread(ROOT / rel, stop_before_pixels=True)
    st, hd, png = request(srv, "GET", f"{_path(uids[rel])}/{resource}", reader,
                          {"Accept": "image/png"})
    assert st == 200, (st, png[:300])
    assert hd["content-type"] == "image/png"
    img = Image.open(io.BytesIO(png))
    img.load()
    if resource == "rendered":
        assert img.size == (ds.Columns, ds.Rows)
    else:
        assert max(img.size) <= 128
    lo, hi = img.convert("L").getextrema()
    assert hi > lo, (lo, hi)  # not all one value


def test_palette_colours_are_the_lookup_table(shown):
    """The rendered PNG is the palette applied (pydicom's apply_color_lut)."""
    srv, reader, uids = shown
    rel = "pydicom-data/OBXXXX1A.dcm"
    ds = pydicom.dcmread(ROOT / rel)
    st, _, png = request(srv, "GET", f"{_path(uids[rel])}/rendered", reader,
                         {"Accept": "image/png"})
    assert st == 200, png[:300]
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    want = pydicom.pixels.apply_color_lut(ds.pixel_array, ds)
    if want.dtype != np.uint8:
        want = (want >> 8).astype(np.uint8)
    assert np.array_equal(got, want)


def _dcmdjpeg(rel, tmp_path) -> Path:
    """DCMTK's decoding of a JPEG file (IJG's 12-bit codec)."""
    out = tmp_path / "dcmdjpeg.dcm"
    subprocess.run(["/usr/bin/dcmdjpeg", str(ROOT / rel), str(out)], check=True, timeout=60)
    return out


def _expected_native(rel, twin, frame):
    """The native little-endian bytes of 1-based `frame` pydicom decodes."""
    src = twin if isinstance(twin, Path) else ROOT / (twin if isinstance(twin, str) else rel)
    ds = pydicom.dcmread(src)
    if ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
        n = _frame_bytes(ds)
        return ds.PixelData[(frame - 1) * n: frame * n]
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[frame - 1]
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


@pytest.mark.parametrize("rel", [r for r in FILES if r not in RENDER_ONLY])
def test_frames_default_to_native_little_endian(shown, rel, tmp_path):
    srv, reader, uids = shown
    ds = pydicom.dcmread(ROOT / rel, stop_before_pixels=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    n = frames  # the last frame
    st, hd, body = request(srv, "GET", f"{_path(uids[rel])}/frames/{n}", reader,
                           {"Accept": 'multipart/related; type="application/octet-stream"'})
    assert st == 200, (st, body[:300])
    [(head, data)] = _parts(hd, body)
    assert f"transfer-syntax={ExplicitVRLittleEndian}" in head, head
    if ds.PhotometricInterpretation == "YBR_FULL_422" and \
            ds.file_meta.TransferSyntaxUID not in corpus.UNCOMPRESSED_TS:
        expected_len = int(ds.Rows) * int(ds.Columns) * 3  # decoded to RGB
    else:
        expected_len = _frame_bytes(ds)
    assert len(data) == expected_len
    twin = FILES[rel]
    if twin == "dcmdjpeg":
        # lossy: libjpeg-turbo and DCMTK's IJG code may round differently
        want = np.frombuffer(_expected_native(rel, _dcmdjpeg(rel, tmp_path), n), "<u2")
        got = np.frombuffer(data, "<u2")
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        assert got.max() > 0
    elif twin:
        assert data == _expected_native(rel, twin, n)


@pytest.mark.parametrize("rel", [r for r in FILES if r not in RENDER_ONLY])
def test_frames_with_any_transfer_syntax_are_as_stored(shown, rel):
    """OHIF's default Accept: the frames as stored."""
    srv, reader, uids = shown
    ds = pydicom.dcmread(ROOT / rel)
    ts = str(ds.file_meta.TransferSyntaxUID)
    st, hd, body = request(srv, "GET", f"{_path(uids[rel])}/frames/1", reader,
                           {"Accept": "multipart/related; type=application/octet-stream; "
                                      "transfer-syntax=*"})
    assert st == 200, (st, body[:300])
    [(head, data)] = _parts(hd, body)
    if ts in corpus.UNCOMPRESSED_TS:
        assert f"transfer-syntax={ExplicitVRLittleEndian}" in head
        assert data == _expected_native(rel, True, 1)
    else:
        assert f"transfer-syntax={ts}" in head, head
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        first = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=frames))
        assert data.rstrip(b"\0") == first.rstrip(b"\0")


def test_single_part_frames(shown):
    srv, reader, uids = shown
    rle = "pydicom/test_files/SC_rgb_rle_32bit_2frame.dcm"
    ds = pydicom.dcmread(ROOT / rle)
    # application/octet-stream: one body, native, not multipart
    st, hd, body = request(srv, "GET", f"{_path(uids[rle])}/frames/2", reader,
                           {"Accept": "application/octet-stream"})
    assert st == 200, body[:300]
    assert hd["content-type"] == f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
    assert body == _expected_native(rle, True, 2)
    # the stored codec's media type: the stored fragment
    st, hd, body = request(srv, "GET", f"{_path(uids[rle])}/frames/1", reader,
                           {"Accept": "image/dicom-rle"})
    assert st == 200, body[:300]
    assert hd["content-type"].startswith("image/dicom-rle")
    first = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=2))
    assert body == first
    jls = "pydicom/test_files/MR_small_jpeg_ls_lossless.dcm"
    st, hd, body = request(srv, "GET", f"{_path(uids[jls])}/frames/1", reader,
                           {"Accept": "image/jls"})
    assert st == 200, body[:300]
    assert hd["content-type"].startswith("image/jls") and body[:2] == b"\xff\xd8"
    # a codec that is not the stored one cannot be produced
    st, _, _ = request(srv, "GET", f"{_path(uids[rle])}/frames/1", reader,
                       {"Accept": "image/jls"})
    assert st == 406
    # an explicit uncompressed syntax for a compressed image: decoded
    st, hd, body = request(srv, "GET", f"{_path(uids[rle])}/frames/1", reader,
                           {"Accept": "multipart/related; type=application/octet-stream; "
                                      f"transfer-syntax={ExplicitVRLittleEndian}"})
    assert st == 200, body[:300]
    [(_, data)] = _parts(hd, body)
    assert data == _expected_native(rle, True, 1)


def test_frames_are_refused_to_a_caller_without_a_token(shown):
    srv, _, uids = shown
    rel = "pydicom-data/OBXXXX1A.dcm"
    st, _, _ = request(srv, "GET", f"{_path(uids[rel])}/frames/1", None,
                       {"Accept": "application/octet-stream"})
    assert st == 401


@pytest.mark.parametrize("rel", ["pydicom/test_files/JPGExtended.dcm",
                                 "pydicom/test_files/MR_small_jpeg_ls_lossless.dcm"])
def test_get_transcodes_12_bit_jpeg_and_jpeg_ls_to_explicit_le(shown, getter, rel, tmp_path):
    """A C-GET requestor accepting only Explicit VR Little Endian receives
    the image decoded (12-bit JPEG: `SamplePrecision(12)` before)."""
    ds = pydicom.dcmread(ROOT / rel, stop_before_pixels=True)
    status, counts, received = test_transcode.get(getter, STORED[rel], ds.SOPClassUID,
                                                  [ExplicitVRLittleEndian])
    assert status == 0x0000 and counts == (1, 0), (hex(status), counts)
    [(ts, data)] = received
    assert ts == ExplicitVRLittleEndian
    got = test_transcode.decoded(data, ts)
    assert len(got.PixelData) == _frame_bytes(ds)
    twin = FILES[rel]
    if twin == "dcmdjpeg":
        want = np.frombuffer(_expected_native(rel, _dcmdjpeg(rel, tmp_path), 1), "<u2")
        diff = np.frombuffer(got.PixelData, "<u2").astype(int) - want.astype(int)
        assert np.abs(diff).max() <= 1
        assert got.LossyImageCompression == "01"
    else:
        assert got.PixelData == _expected_native(rel, twin, 1)


def test_an_image_that_cannot_be_shown_says_why(shown, tmp_path):
    """The viewer shows `reason` in place of the image: plain words, no
    transfer syntax UID or attribute jargon, no patient data."""
    srv, reader, _ = shown
    tech = new_token(srv, "tech2", "technologist")
    ds = pydicom.dcmread(ROOT / "pydicom-data/SC_rgb.dcm")
    ds.PhotometricInterpretation = "HSV"  # retired colour model
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["h8-hsv"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    f = tmp_path / "hsv.dcm"
    ds.save_as(f, enforce_file_format=True)
    body, b = _multipart([f])
    st, _, out = request(srv, "POST", "/dicomweb/studies", tech,
                         {"Content-Type": f'multipart/related; type="application/dicom"; '
                                          f'boundary="{b}"', "Accept": "application/dicom+json"},
                         body)
    assert st == 200, out[:300]
    path = _path((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    for resource in ("rendered", "thumbnail"):
        st, hd, out = request(srv, "GET", f"{path}/{resource}", reader, {"Accept": "image/png"})
        assert st == 406, (st, out[:300])
        err = json.loads(out)
        assert err["reason"].startswith("This image cannot be displayed: its colour model"), err
        assert str(ds.PatientName) not in err["reason"]
    # the browser shows `reason` in place of the image: tests/ui/ui.test.mjs


def test_a_frame_decoded_alone_equals_the_whole_instance_decoded(shown):
    """Frame 17 of a 30-frame JPEG, decoded alone for /frames, is the 17th
    frame of the whole instance decoded for WADO-RS in Explicit VR LE."""
    srv, reader, uids = shown
    rel = "pydicom/test_files/examples_ybr_color.dcm"
    st, hd, body = request(srv, "GET", f"{_path(uids[rel])}/frames/17", reader,
                           {"Accept": "application/octet-stream"})
    assert st == 200, body[:300]
    st, hd2, whole = request(srv, "GET", _path(uids[rel]), reader,
                             {"Accept": 'multipart/related; type="application/dicom"; '
                                        f"transfer-syntax={ExplicitVRLittleEndian}"})
    assert st == 200, whole[:300]
    [(_, part)] = _parts(hd2, whole)
    ds = pydicom.dcmread(io.BytesIO(part))
    n = int(ds.Rows) * int(ds.Columns) * 3
    assert len(body) == n
    assert body == ds.PixelData[16 * n:17 * n]
    assert body != ds.PixelData[15 * n:16 * n]


def test_every_corpus_image_is_displayable(shown, tmp_path):
    """Every valid corpus file with Pixel Data: /rendered (first frame) is a
    PNG, and /frames/1 without a transfer-syntax answers native pixel data.
    Prints the counts (the issue's before/after figure)."""
    srv, reader, _ = shown
    tech = new_token(srv, "tech3", "technologist")
    targets, files = {}, []
    for i, f in enumerate(corpus.valid_files()):
        ds = pydicom.dcmread(f)
        if "PixelData" not in ds:
            continue
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["h8-every", str(f)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = tmp_path / f"e{i}.dcm"
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
        targets[str(f.relative_to(ROOT))] = (ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                             ds.SOPInstanceUID, ds.BitsAllocated)
    for i in range(0, len(files), 20):
        body, b = _multipart(files[i:i + 20])
        st, _, out = request(srv, "POST", "/dicomweb/studies", tech,
                             {"Content-Type": f'multipart/related; type="application/dicom"; '
                                              f'boundary="{b}"', "Accept": "application/dicom+json"},
                             body)
        assert st == 200, out[:500]
    not_rendered, not_native = [], []
    for rel, (study, series, sop, bits) in sorted(targets.items()):
        path = _path((study, series, sop))
        st, hd, out = request(srv, "GET", f"{path}/rendered", reader, {"Accept": "image/png"})
        if st != 200 or hd.get("content-type") != "image/png":
            not_rendered.append((rel, st, out))
        st, hd, out = request(srv, "GET", f"{path}/frames/1", reader,
                              {"Accept": 'multipart/related; type="application/octet-stream"'})
        if st != 200 or f"transfer-syntax={ExplicitVRLittleEndian}" not in out[:400].decode(
                "latin-1"):
            not_native.append((rel, st, out[:200]))
    framed = len(targets)
    print(f"\nrendered: {len(targets) - len(not_rendered)}/{len(targets)}; "
          f"native frames: {framed - len(not_native)}/{framed}")
    # the files that truly cannot be shown say why, in plain words
    assert {r for r, _, _ in not_rendered} == set(BROKEN), not_rendered
    for rel, st, out in not_rendered:
        assert st == 422 and json.loads(out)["reason"].startswith(
            "This image cannot be displayed"), (rel, out)
    assert {r for r, _, _ in not_native} == set(BROKEN), not_native


@pytest.mark.parametrize("rel,codec", [
    ("pydicom/test_files/MR_small_jpeg_ls_lossless.dcm", "JPEG-LS"),
    ("pydicom/test_files/JPGExtended.dcm", "12-bit JPEG"),
])
def test_a_corrupt_codestream_is_refused_by_the_child_and_the_server_keeps_serving(
        shown, tmp_path, rel, codec):
    srv, reader, uids = shown
    tech = new_token(srv, f"tech-{codec[:2]}", "technologist")
    ds = pydicom.dcmread(ROOT / rel)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["h8-corrupt", rel])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    data = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
    if codec == "JPEG-LS":
        for i in range(200, min(len(data) - 2, 1200)):  # entropy-coded data: garbage
            data[i] ^= 0x5A
    else:
        # a bogus Huffman table (counts adding up to more than 256 codes):
        # the marker structure stays sound, libjpeg-turbo refuses it
        dht = bytes(data).index(b"\xff\xc4")
        data[dht + 5:dht + 21] = b"\xfe" * 16
    ds.PixelData = pydicom.encaps.encapsulate([bytes(data)])
    f = tmp_path / "corrupt.dcm"
    ds.save_as(f, enforce_file_format=True)
    body, b = _multipart([f])
    st, _, out = request(srv, "POST", "/dicomweb/studies", tech,
                         {"Content-Type": f'multipart/related; type="application/dicom"; '
                                          f'boundary="{b}"', "Accept": "application/dicom+json"},
                         body)
    assert st == 200, out[:300]
    path = _path((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    st, _, out = request(srv, "GET", f"{path}/rendered", reader, {"Accept": "image/png"})
    assert st == 422, (st, out[:300])
    err = json.loads(out)
    # refused by the decoder in the child (not killed by seccomp or a limit)
    assert f"the {codec} codestream is malformed" in err["error"], err
    assert err["reason"].startswith("This image cannot be displayed"), err
    # the server and the sandbox keep working for the good copy
    st, _, _ = request(srv, "GET", f"{_path(uids[rel])}/rendered", reader, {"Accept": "image/png"})
    assert st == 200
