"""The corpus studies the OHIF browser test opens (issue 11): one per kind of
image a reading room sees, each made its own study (fresh Study, Series and
SOP Instance UIDs, PatientName `OHIF^<label>`) so that files of the corpus
that share UIDs (MR_small and its compressed copies) can be stored side by
side. The pixel data and transfer syntax are kept as they are. The file whose
standard attributes are VR UN is sent untouched (rewriting it with pydicom
would give them their VR back)."""
from __future__ import annotations

import io
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

import corpus

# (label, file name, rewrite UIDs?)
CASES = [
    ("CT", "CT_small.dcm", True),
    ("MR", "MR_small.dcm", True),
    ("US_MULTIFRAME", "examples_ybr_color.dcm", True),
    ("JPEG_BASELINE", "SC_rgb_jpeg_dcmtk.dcm", True),
    ("JPEG2000", "US1_J2KR.dcm", True),
    ("JPEG_LS", "MR_small_jpeg_ls_lossless.dcm", True),
    ("RLE", "MR_small_RLE.dcm", True),
    ("PALETTE", "OBXXXX1A.dcm", True),
    ("JPEG_12BIT", "JPGExtended.dcm", True),
    ("ECG", "waveform_ecg.dcm", True),
    ("UN_VR", "explicit_VR-UN.dcm", False),
    # no Modality: OHIF's unfiltered worklist once failed on the empty
    # ModalitiesInStudy this study gave
    ("NO_MODALITY", "CT_small.dcm", True),
]


def find(name: str) -> Path:
    hits = sorted(corpus.corpus_root().rglob(name))
    if not hits:
        raise FileNotFoundError(name)
    return hits[0]


def prepared() -> list[tuple[str, str, bytes]]:
    """(label, Study Instance UID, Part 10 bytes) of every case."""
    out = []
    for label, name, rewrite in CASES:
        path = find(name)
        if not rewrite:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                 specific_tags=["StudyInstanceUID"])
            out.append((label, str(ds.StudyInstanceUID), path.read_bytes()))
            continue
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = f"OHIF^{label}"
        ds.PatientID = f"OHIF-{label}"
        if label == "NO_MODALITY":
            del ds.Modality
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((label, str(ds.StudyInstanceUID), buf.getvalue()))
    return out
