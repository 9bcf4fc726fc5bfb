#!/usr/bin/env python3
"""Writes the DICOM-side seed corpora of fuzz/corpus/ (pdu, pdata,
dimse_command, scan, ingest_parse, cfind_query, multipart, qido).

The encodings are made by independent real encoders (pydicom for datasets and
command sets, pynetdicom for PDUs), so the seeds are what peers send. All
values are synthetic: no patient data. The blob_reader and audit_record seeds
of the "file" modes are written by the targets themselves from their
round-trip modes (see fuzz/README.md).

    .cache/venv/bin/python fuzz/make_seeds.py
"""

import io
import os
import struct
import zlib
from pathlib import Path

from pydicom import Dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import pdu, pdu_primitives
from pynetdicom.dsutils import encode as encode_ds

ROOT = Path(__file__).resolve().parent / "corpus"
PREFIX = "1.2.826.0.1.3680043.10.1234."  # test UIDs
CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"


def put(target, name, data):
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(bytes(data))


def enc(ds, implicit=True, little=True):
    b = io.BytesIO()
    write_dataset_to(b, ds, implicit, little)
    return b.getvalue()


def write_dataset_to(fp, ds, implicit, little):
    from pydicom.filebase import DicomFileLike

    f = DicomFileLike(fp)
    f.is_implicit_VR = implicit
    f.is_little_endian = little
    write_dataset(f, ds)


# ---------------------------------------------------------------- datasets


def instance(n=1):
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = PREFIX + f"3.{n}"
    ds.StudyDate = "20240229"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "A1"
    ds.Modality = "CT"
    ds.ReferringPhysicianName = "Ref^Doctor"
    ds.StudyDescription = "Synthetic"
    proc = Dataset()
    proc.CodeValue = "X1"
    proc.CodingSchemeDesignator = "L"
    proc.CodeMeaning = "Head"
    ds.ProcedureCodeSequence = Sequence([proc])
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "FUZZ-1"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = PREFIX + "1"
    ds.SeriesInstanceUID = PREFIX + "2"
    ds.StudyID = "S1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = b"\x00\x40\x80\xff"
    return ds


def part10(ds, ts):
    meta = Dataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PREFIX + "99"
    b = io.BytesIO()
    b.write(b"\0" * 128 + b"DICM")
    from pydicom.filebase import DicomFileLike

    write_file_meta_info(DicomFileLike(b), meta, enforce_standard=True)
    if ts == DeflatedExplicitVRLittleEndian:
        raw = enc(ds, implicit=False, little=True)
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        b.write(c.compress(raw) + c.flush())
    else:
        b.write(
            enc(
                ds,
                implicit=ts == ImplicitVRLittleEndian,
                little=ts != ExplicitVRBigEndian,
            )
        )
    return b.getvalue()


def seeds_scan_and_ingest():
    ds = instance()
    for i, (implicit, little) in enumerate([(True, True), (False, True), (False, False)]):
        flags = (0 if implicit else 1) | (2 if little else 0)
        put("scan", f"dataset-{i}", bytes([flags]) + enc(ds, implicit, little))
    # Encapsulated pixel data (PS3.5 A.4) in explicit VR LE, undefined lengths.
    encap = instance(2)
    encap.PixelData = (
        b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
        + b"\xfe\xff\x00\xe0\x04\x00\x00\x00\x01\x02\x03\x04"
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )
    raw = bytearray(enc(encap, implicit=False, little=True))
    # pydicom writes OB with a defined length; make it undefined (encapsulated).
    at = raw.rfind(b"\xe0\x7f\x10\x00OB\x00\x00")
    if at >= 0:
        raw[at + 8 : at + 12] = b"\xff\xff\xff\xff"
    put("scan", "encapsulated", bytes([3]) + bytes(raw))
    meta = part10(ds, ExplicitVRLittleEndian)[132:]
    put("scan", "file-meta", bytes([7]) + meta)

    for name, ts in [
        ("implicit", ImplicitVRLittleEndian),
        ("explicit", ExplicitVRLittleEndian),
        ("big", ExplicitVRBigEndian),
        ("deflated", DeflatedExplicitVRLittleEndian),
    ]:
        put("ingest_parse", f"file-{name}", b"\x00" + part10(ds, ts))
    put("ingest_parse", "file-no-preamble", b"\x00" + part10(ds, ExplicitVRLittleEndian)[128:])
    net = instance()
    net.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    net.SOPInstanceUID = "1.2.3.4.5"
    put("ingest_parse", "network-implicit", bytes([1 | (0 << 1)]) + enc(net, True, True))
    put("ingest_parse", "network-explicit", bytes([1 | (1 << 1)]) + enc(net, False, True))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    defl = c.compress(enc(net, False, True)) + c.flush()
    put("ingest_parse", "network-deflated", bytes([1 | (3 << 1)]) + defl)


# ---------------------------------------------------------------- DIMSE


def command(**kw):
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    body = encode_ds(ds, True, True)
    # Command Group Length first (PS3.7 E.1), as peers send it.
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


COMMANDS = {
    "c-echo-rq": dict(AffectedSOPClassUID="1.2.840.10008.1.1", CommandField=0x0030, MessageID=1, CommandDataSetType=0x0101),
    "c-store-rq": dict(AffectedSOPClassUID=CT, CommandField=0x0001, MessageID=2, Priority=0, CommandDataSetType=0x0000, AffectedSOPInstanceUID=PREFIX + "3.1"),
    "c-find-rq": dict(AffectedSOPClassUID=STUDY_FIND, CommandField=0x0020, MessageID=3, Priority=0, CommandDataSetType=0x0000),
    "c-move-rq": dict(AffectedSOPClassUID=STUDY_MOVE, CommandField=0x0021, MessageID=4, Priority=0, CommandDataSetType=0x0000, MoveDestination="DEST"),
    "c-get-rq": dict(AffectedSOPClassUID=STUDY_GET, CommandField=0x0010, MessageID=5, Priority=1, CommandDataSetType=0x0000),
    "c-cancel-rq": dict(CommandField=0x0FFF, MessageIDBeingRespondedTo=3, CommandDataSetType=0x0101),
    "c-store-rsp": dict(AffectedSOPClassUID=CT, CommandField=0x8001, MessageIDBeingRespondedTo=7, CommandDataSetType=0x0101, Status=0, AffectedSOPInstanceUID=PREFIX + "3.1"),
    "n-event-report-rq": dict(AffectedSOPClassUID="1.2.840.10008.1.20.1", CommandField=0x0100, MessageID=9, CommandDataSetType=0x0101),
}


def identifier(level, **kw):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


IDENTIFIERS = {
    "patient": (0, identifier("PATIENT", PatientName="Test*", PatientID="", PatientBirthDate="19600101-19801231")),
    "study": (1, identifier("STUDY", StudyInstanceUID="", StudyDate="20240101-", StudyTime="-120000", PatientName="test^*", ModalitiesInStudy="CT\\MR", AccessionNumber="A?")),
    "series": (3, identifier("SERIES", StudyInstanceUID=PREFIX + "1", SeriesInstanceUID="", Modality="CT", SeriesNumber="1")),
    "image": (3, identifier("IMAGE", StudyInstanceUID=PREFIX + "1", SeriesInstanceUID=PREFIX + "2", SOPInstanceUID=PREFIX + "3.1\\" + PREFIX + "3.2", InstanceNumber="")),
}


def seeds_dimse():
    for name, kw in COMMANDS.items():
        put("dimse_command", name, command(**kw))
    # C-FIND identifiers; byte 0: bit 0 study root, bit 1 relational,
    # bits 2..3 transfer syntax (0 implicit, 1 explicit LE, 2 big endian).
    for name, (model, ds) in IDENTIFIERS.items():
        seq = Dataset()
        seq.CodeValue = "X*"
        if name == "study":
            ds.ProcedureCodeSequence = Sequence([seq])
        for ts, (implicit, little) in enumerate([(True, True), (False, True), (False, False)]):
            flags = model | (ts << 2)
            tail = b'{"00081032":[{"00080100":"X1"}]}' if name == "study" else b"CT"
            body = encode_ds(ds, implicit, little)
            put("cfind_query", f"{name}-{ts}", bytes([flags, len(tail)]) + body + tail)
    # Charset with code extensions (ISO 2022), as Japanese peers send.
    j = identifier("STUDY", StudyInstanceUID="")
    j.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    j.PatientName = "Yamada^Tarou=\033$B;3ED\033(B^\033$BB@O:\033(B"
    put("cfind_query", "iso2022", bytes([1, 0]) + encode_ds(j, True, True))


def pdv(pc, data, cmd, last):
    return struct.pack(">IBB", len(data) + 2, pc, (1 if cmd else 0) | (2 if last else 0)) + data


def pdata_pdu(*pdvs):
    body = b"".join(pdvs)
    return struct.pack(">BBI", 4, 0, len(body)) + body


def seeds_pdu():
    rq = pdu_primitives.A_ASSOCIATE()
    rq.application_context_name = "1.2.840.10008.3.1.1.1"
    rq.calling_ae_title = "FUZZSCU"
    rq.called_ae_title = "BASTION"
    ctxs = []
    for i, (asyn, tss) in enumerate(
        [
            ("1.2.840.10008.1.1", [ImplicitVRLittleEndian]),
            (CT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]),
            (STUDY_FIND, [ImplicitVRLittleEndian]),
        ]
    ):
        from pynetdicom.presentation import PresentationContext

        c = PresentationContext()
        c.context_id = 2 * i + 1
        c.abstract_syntax = asyn
        c.transfer_syntax = tss
        ctxs.append(c)
    rq.presentation_context_definition_list = ctxs
    ml = pdu_primitives.MaximumLengthNotification()
    ml.maximum_length_received = 16384
    ic = pdu_primitives.ImplementationClassUIDNotification()
    ic.implementation_class_uid = PREFIX + "99"
    iv = pdu_primitives.ImplementationVersionNameNotification()
    iv.implementation_version_name = "FUZZ_1"
    role = pdu_primitives.SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CT
    role.scu_role = True
    role.scp_role = True
    ext = pdu_primitives.SOPClassExtendedNegotiation()
    ext.sop_class_uid = STUDY_FIND
    ext.service_class_application_information = b"\x01"
    uid = pdu_primitives.UserIdentityNegotiation()
    uid.user_identity_type = 2
    uid.primary_field = b"user"
    uid.secondary_field = b"pass"
    uid.positive_response_requested = True
    rq.user_information = [ml, ic, iv, role, ext, uid]
    p = pdu.A_ASSOCIATE_RQ()
    p.from_primitive(rq)
    assoc = p.encode()
    put("pdu", "a-associate-rq", assoc)

    echo = command(**COMMANDS["c-echo-rq"])
    find = command(**COMMANDS["c-find-rq"])
    ident = encode_ds(IDENTIFIERS["study"][1], True, True)
    put("pdu", "p-data-echo", pdata_pdu(pdv(1, echo, True, True)))
    put(
        "pdu",
        "p-data-find-fragmented",
        pdata_pdu(pdv(5, find[:20], True, False))
        + pdata_pdu(pdv(5, find[20:], True, True), pdv(5, ident, False, True)),
    )
    release = struct.pack(">BBI", 5, 0, 4) + b"\0" * 4
    abort = struct.pack(">BBI", 7, 0, 4) + b"\0\0\2\0"
    put("pdu", "session", assoc + pdata_pdu(pdv(1, echo, True, True)) + release)
    put("pdu", "a-abort", abort)

    # pdata: pc id, fragment size (BE u16), dataset flag, command length, command, dataset.
    def spec(pc, frag, with_ds, cmd, ds=b""):
        return bytes([pc]) + struct.pack(">H", frag) + bytes([with_ds]) + struct.pack(">H", len(cmd)) + cmd + ds

    put("pdata", "echo", spec(1, 16378, 0, echo))
    put("pdata", "find-small-fragments", spec(3, 16, 1, find, ident))
    put("pdata", "empty-dataset", spec(7, 1, 1, echo[:8]))


# ---------------------------------------------------------------- DICOMweb


def seeds_web():
    boundary = "fuzzBoundary42"
    ct = f'multipart/related; type="application/dicom"; boundary={boundary}'.encode()
    f1 = part10(instance(1), ExplicitVRLittleEndian)
    body = (
        b"preamble\r\n"
        + f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + f1[:300]
        + f"\r\n--{boundary} \t\r\nContent-Type: application/dicom;\r\n transfer-syntax=1.2.840.10008.1.2.1\r\n\r\nxyz".encode()
        + f"\r\n--{boundary}--\r\nepilogue".encode()
    )
    put("multipart", "stow", bytes([len(ct)]) + ct + body)
    ct2 = b"multipart/related; type=application/dicom; boundary=\"a b:c\""
    put("multipart", "quoted", bytes([len(ct2)]) + ct2 + b"--a b:c\r\n\r\n\r\n--a b:c--")

    # qido: byte 0 level (0 study, 1 series, 2 instance) | 4 study in path |
    # 8 series in path; byte 1 stored-tail length; the query string.
    for name, flags, q in [
        ("studies", 0, "PatientName=test*&StudyDate=20200101-20241231&limit=10&offset=2&fuzzymatching=true&includefield=00081030,ModalitiesInStudy"),
        ("studies-all", 0, "includefield=all&00100020=FUZZ-1&StudyTime=1000-&AccessionNumber=A%3F"),
        ("series", 5, "Modality=CT&SeriesNumber=1&ProcedureCodeSequence.CodeValue=X1&includefield=SeriesDescription"),
        ("instances", 10, "SOPInstanceUID=1.2.3,1.2.4%5C1.2.5&InstanceNumber=7&AcquisitionDateTime=20240229000000-"),
        ("seq", 0, "00081032.00080100=X*&PatientBirthDate=-19800101"),
    ]:
        tail = b"20240229"
        put("qido", name, bytes([flags, len(tail)]) + q.encode() + tail)


if __name__ == "__main__":
    seeds_scan_and_ingest()
    seeds_dimse()
    seeds_pdu()
    seeds_web()
    for d in sorted(ROOT.iterdir()):
        files = list(d.iterdir())
        print(f"{d.name:14} {len(files):3} seeds {sum(f.stat().st_size for f in files):7} bytes")
