"""Decompressed fallback on retrieval (PS3.4 C.4.3.3.1): a C-GET requestor
that accepts only uncompressed transfer syntaxes for a SOP class receives
compressed instances decoded; one that accepts the stored syntax receives the
stored bytes. Corpus pairs give the expected pixel data: MR_small_RLE.dcm
(RLE Lossless) decodes to MR_small.dcm's pixel data, SC_rgb_jpeg_gdcm.dcm
(JPEG Lossless SV1) to SC_rgb.dcm's. Every wait is bounded.
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    RLELossless,
)

import corpus
import helpers
from conftest import Server

from pynetdicom import build_role, evt
from pynetdicom.sop_class import (
    MRImageStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelGet as STUDY_GET,
)

GETTER = "TSGET"  # mtls, store and get
RLE_MR = "pydicom/test_files/MR_small_RLE.dcm"
MR = "pydicom/test_files/MR_small.dcm"
JPEG_LL_SC = "pydicom/test_files/SC_rgb_jpeg_gdcm.dcm"
SC = "pydicom-data/SC_rgb.dcm"


@pytest.fixture(scope="module")
def env(bastion_bin, corpus_root, tmp_path_factory):
    srv = Server(bastion_bin, tmp_path_factory.mktemp("transcode"))
    srv.init()
    srv.start(plain=False)
    srv.device_add(GETTER, transport="mtls", allow="echo,store,get")
    crt, key, ca, _ = srv.cert_issue(GETTER)
    ctx = helpers.client_ssl_context(ca, crt, key)
    files = [corpus_root / RLE_MR, corpus_root / JPEG_LL_SC]
    res = helpers.store_files(srv.tls_port, GETTER, files, tls=ctx)
    assert all(s == 0 for s in res.values()), res
    yield {"srv": srv, "ctx": ctx, "root": corpus_root}
    srv.stop()


def image_identifier(path: Path) -> Dataset:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ident = Dataset()
    ident.QueryRetrieveLevel = "IMAGE"
    ident.StudyInstanceUID = ds.StudyInstanceUID
    ident.SeriesInstanceUID = ds.SeriesInstanceUID
    ident.SOPInstanceUID = ds.SOPInstanceUID
    return ident


def get(env, path: Path, sop_class: str, transfer_syntaxes: list[str]):
    """(final status, counts, [(transfer syntax, dataset bytes)]) of a C-GET of
    one instance by a requestor proposing one presentation context for
    `sop_class` per transfer syntax in `transfer_syntaxes`."""
    received: list[tuple[str, bytes]] = []

    def on_store(event):
        received.append((str(event.context.transfer_syntax),
                         bytes(event.request.DataSet.getvalue())))
        return 0x0000

    ae = helpers.make_ae(GETTER, contexts=[STUDY_GET] + [(sop_class, [ts]) for ts in transfer_syntaxes])
    srv = env["srv"]
    assoc = ae.associate("127.0.0.1", srv.tls_port, ae_title=srv.ae_title,
                         tls_args=(env["ctx"], "localhost"),
                         ext_neg=[build_role(sop_class, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established, helpers.rejection(assoc)
    final = None
    try:
        for st, _ in assoc.send_c_get(image_identifier(path), STUDY_GET, msg_id=7):
            if "Status" in st and st.Status != 0xFF00:
                final = st
    finally:
        if assoc.is_established:
            assoc.release()
    assert final is not None, "no final C-GET-RSP"
    completed = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
    return final.Status, (completed, failed), received


def decoded(data: bytes, transfer_syntax: str) -> Dataset:
    return read_dataset(io.BytesIO(data),
                        is_implicit_VR=transfer_syntax == ImplicitVRLittleEndian,
                        is_little_endian=True)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_get_decompresses_rle_for_an_uncompressed_only_requestor(env, ts):
    status, counts, received = get(env, env["root"] / RLE_MR, MRImageStorage, [ts])
    assert status == 0x0000 and counts == (1, 0), (hex(status), counts)
    assert len(received) == 1
    got_ts, data = received[0]
    assert got_ts == ts
    got = decoded(data, got_ts)
    want = pydicom.dcmread(env["root"] / MR)
    assert got.SOPInstanceUID == want.SOPInstanceUID
    assert (got.Rows, got.Columns, got.BitsAllocated) == (want.Rows, want.Columns, 16)
    assert got.PhotometricInterpretation == "MONOCHROME2"
    assert len(got.PixelData) == 64 * 64 * 2
    assert got.PixelData == want.PixelData


def test_get_decompresses_jpeg_lossless_colour(env):
    status, counts, received = get(env, env["root"] / JPEG_LL_SC, SecondaryCaptureImageStorage,
                                   [ExplicitVRLittleEndian])
    assert status == 0x0000 and counts == (1, 0), (hex(status), counts)
    got = decoded(received[0][1], received[0][0])
    want = pydicom.dcmread(env["root"] / SC)
    assert got.PhotometricInterpretation == "RGB"
    assert got.PlanarConfiguration == 0
    assert got.PixelData == want.PixelData


@pytest.mark.parametrize("path,sop_class,stored", [
    (RLE_MR, MRImageStorage, RLELossless),
    (JPEG_LL_SC, SecondaryCaptureImageStorage, JPEGLosslessSV1),
])
def test_get_sends_the_stored_syntax_when_it_is_accepted(env, path, sop_class, stored):
    status, counts, received = get(env, env["root"] / path, sop_class,
                                   [ExplicitVRLittleEndian, stored])
    assert status == 0x0000 and counts == (1, 0), (hex(status), counts)
    assert received == [(stored, corpus.dataset_bytes(env["root"] / path)[1])]
