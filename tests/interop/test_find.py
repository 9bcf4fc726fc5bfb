"""C-FIND SCP (issue 3): the matching table replayed through pynetdicom,
DCMTK findscu over TLS, character sets, refusals, limits and cancel.

The matching rules live in one data file, `matching_table.json`, that the
QIDO-RS tests will replay later.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import helpers
from conftest import Server

from pynetdicom import build_context


@pytest.fixture(autouse=True)
def _reactor_race_fixed():
    with helpers.pynetdicom_reactor_race_fixed():
        yield
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT,
)

TABLE = json.loads((Path(__file__).parent / "matching_table.json").read_text())
UIDS = TABLE["uids"]
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
          "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
MODELS = {"study": STUDY_ROOT, "patient": PATIENT_ROOT}
PENDING = (0xFF00, 0xFF01)
CANCEL = 0xFE00
FINDER = "FINDER"


def _uid(v: str) -> str:
    return "\\".join(UIDS.get(x, x) for x in v.split("\\"))


# Attributes of the patient, study and series levels that the table sets (or
# leaves absent) for every instance: removed from a corpus file first so that
# its own values cannot leak into the table's studies and series.
HIERARCHY_KEYWORDS = ["PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                      "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                      "StudyDescription", "ReferringPhysicianName", "ProcedureCodeSequence",
                      "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined",
                      "RequestAttributesSequence"]


def _corpus_dataset(rel: str, inst: dict) -> Dataset:
    """A corpus file as a table instance: its hierarchy attributes removed, its
    own instance attributes checked against the table's."""
    import corpus
    ds = pydicom.dcmread(corpus.corpus_root() / rel)
    for k, v in inst.items():
        if k not in ("series", "corpus", "InstanceNumber"):
            assert str(ds.get(k, "")) == str(v), (rel, k, ds.get(k))
    for k in HIERARCHY_KEYWORDS:
        if k in ds:
            delattr(ds, k)
    return ds


def table_datasets() -> list[Dataset]:
    out = []
    for iid, inst in TABLE["instances"].items():
        se_id = inst["series"]
        se = TABLE["series"][se_id]
        st_id = se["study"]
        st = TABLE["studies"][st_id]
        if "corpus" in inst:
            ds = _corpus_dataset(inst["corpus"], inst)
        else:
            ds = helpers.make_dataset(pixel_bytes=512)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.StudyInstanceUID = UIDS[st_id]
        ds.SeriesInstanceUID = UIDS[se_id]
        ds.SOPInstanceUID = UIDS[iid]
        ds.file_meta = helpers.file_meta_for(ds.SOPClassUID, ds.SOPInstanceUID)
        for k, v in st.items():
            if k == "ProcedureCodeSequence":
                items = []
                for it in v:
                    item = Dataset()
                    for ik, iv in it.items():
                        setattr(item, ik, iv)
                    items.append(item)
                ds.ProcedureCodeSequence = Sequence(items)
            else:
                setattr(ds, k, v)
        for k, v in se.items():
            if k != "study":
                setattr(ds, k, v)
        for k, v in inst.items():
            if k not in ("series", "corpus"):
                setattr(ds, k, v)
        out.append(ds)
    return out


def store_datasets(srv: Server, datasets, calling, tls):
    files = []
    d = srv.base / "store"
    d.mkdir(exist_ok=True)
    for ds in datasets:
        p = d / f"{ds.SOPInstanceUID}.dcm"
        helpers.dataset_file(ds, p)
        files.append(p)
    res = helpers.store_files(srv.tls_port, calling, files, tls=tls)
    assert all(s == 0 for s in res.values()), res


def find(srv: Server, ctx, model, identifier: Dataset, calling=FINDER, relational=False,
         cancel_at_once=False):
    """[(status, identifier or None)] of one C-FIND; the last is the final one."""
    ae = helpers.make_ae(calling, contexts=[model])
    ext = []
    if relational:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = model
        item.service_class_application_information = b"\x01"
        ext = [item]
    assoc = ae.associate("127.0.0.1", srv.tls_port, ae_title=srv.ae_title,
                         tls_args=(ctx, "localhost"), ext_neg=ext)
    assert assoc.is_established, helpers.rejection(assoc)
    out = []
    try:
        gen = assoc.send_c_find(identifier, model, msg_id=7)
        if cancel_at_once:
            context_id = assoc._get_valid_context(model, "", "scu").context_id
            assoc.send_c_cancel(7, context_id)
        for status, ident in gen:
            out.append((status.Status if "Status" in status else None, ident, status))
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def identifier(level: str, keys: dict) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        if isinstance(v, list):
            items = []
            for it in v:
                item = Dataset()
                for ik, iv in it.items():
                    setattr(item, ik, iv)
                items.append(item)
            setattr(ds, k, Sequence(items))
        elif k.endswith("UID"):
            setattr(ds, k, _uid(v))
        else:
            setattr(ds, k, v)
    if UNIQUE[level] not in ds:
        setattr(ds, UNIQUE[level], "")
    return ds


@pytest.fixture(scope="module")
def qr(bastion_bin, tmp_path_factory):
    """One server holding the table's instances; FINDER may echo/store/find."""
    srv = Server(bastion_bin, tmp_path_factory.mktemp("find"))
    srv.init()
    srv.start(plain=False)
    srv.device_add(FINDER, transport="mtls", allow="echo,store,find")
    crt, key, ca, _ = srv.cert_issue(FINDER)
    ctx = helpers.client_ssl_context(ca, crt, key)
    store_datasets(srv, table_datasets(), FINDER, ctx)
    yield srv, ctx, (crt, key, ca)
    srv.stop()


@pytest.mark.parametrize("case", TABLE["queries"], ids=[q["name"] for q in TABLE["queries"]])
def test_matching_table(qr, case):
    srv, ctx, _ = qr
    rsps = find(srv, ctx, MODELS[case["model"]], identifier(case["level"], case["keys"]),
                relational=case.get("relational", False))
    final_status, _, final = rsps[-1]
    pendings = rsps[:-1]
    if "status" in case:
        assert final_status == case["status"], rsps
        assert not pendings
        offending = [pydicom.datadict.tag_for_keyword(k) for k in case["offending"]]
        assert "OffendingElement" in final, final
        got = final.OffendingElement
        got = list(got) if isinstance(got, (list, pydicom.multival.MultiValue)) else [got]
        assert [int(t) for t in got] == offending
        assert final.get("ErrorComment"), final
        return
    assert final_status == 0x0000, rsps
    assert all(s in PENDING for s, _, _ in pendings)
    key = UNIQUE[case["level"]]
    got = sorted(str(ident[key].value) for _, ident, _ in pendings)
    want = sorted(UIDS.get(x, x) for x in case["expect"])
    assert got == want


def test_return_keys_and_computed_attributes(qr):
    srv, ctx, _ = qr
    ident = identifier("STUDY", {"StudyInstanceUID": "S1", "PatientName": "", "StudyDate": "",
                                 "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "",
                                 "ModalitiesInStudy": "", "RetrieveAETitle": "",
                                 "InstitutionName": "", "ProcedureCodeSequence": []})
    rsps = find(srv, ctx, STUDY_ROOT, ident)
    assert [s for s, _, _ in rsps] == [0xFF00, 0x0000]
    r = rsps[0][1]
    assert r.QueryRetrieveLevel == "STUDY"
    assert r.RetrieveAETitle == srv.ae_title
    assert str(r.PatientName) == "Doe^John"
    assert r.StudyDate == "20140309"
    assert int(r.NumberOfStudyRelatedSeries) == 2
    assert int(r.NumberOfStudyRelatedInstances) == 3
    assert list(r.ModalitiesInStudy) == ["CT", "MR"]
    assert "InstitutionName" in r and r.InstitutionName in ("", None)  # requested, no value
    assert [i.CodeValue for i in r.ProcedureCodeSequence] == ["DEVICE1", "DEVICE2"]
    ident = identifier("SERIES", {"StudyInstanceUID": "S1", "SeriesInstanceUID": "SE1",
                                  "NumberOfSeriesRelatedInstances": "", "Modality": ""})
    rsps = find(srv, ctx, STUDY_ROOT, ident)
    assert int(rsps[0][1].NumberOfSeriesRelatedInstances) == 2
    assert rsps[0][1].Modality == "CT"


def test_acquisition_datetime_returned_as_stored(qr):
    """DT return key at IMAGE level: the stored value, offset and fraction kept;
    zero-length for an instance without one."""
    srv, ctx, _ = qr
    ident = identifier("IMAGE", {"StudyInstanceUID": "S5", "SeriesInstanceUID": "SE6",
                                 "AcquisitionDateTime": ""})
    rsps = find(srv, ctx, STUDY_ROOT, ident)
    assert rsps[-1][0] == 0
    got = {str(r.SOPInstanceUID): r.AcquisitionDateTime for _, r, _ in rsps[:-1]}
    assert got == {UIDS["I7"]: "", UIDS["I10"]: "20150101003000+0100",
                   UIDS["I11"]: "20110525145628.350000"}


def test_unsupported_optional_key_gives_ff01(qr):
    srv, ctx, _ = qr
    ident = identifier("STUDY", {"StudyInstanceUID": "S1", "InstitutionName": "X*"})
    rsps = find(srv, ctx, STUDY_ROOT, ident)
    assert [s for s, _, _ in rsps] == [0xFF01, 0x0000]


def test_value_of_an_unmatchable_vr_gives_ff01(qr):
    """PatientAge (AS) cannot be matched by the engine: the match is not
    restricted by it, and the pendings say so (0xFF01), not 0xFF00."""
    srv, ctx, _ = qr
    ident = identifier("STUDY", {"StudyInstanceUID": "S1", "PatientAge": "999Y"})
    rsps = find(srv, ctx, STUDY_ROOT, ident)
    assert [s for s, _, _ in rsps] == [0xFF01, 0x0000]


def test_non_ascii_response_carries_utf8_charset(qr):
    srv, ctx, _ = qr
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.PatientID = "PID004"
    ident.PatientName = ""
    ident.StudyInstanceUID = ""
    rsps = find(srv, ctx, STUDY_ROOT, ident)
    assert rsps[-1][0] == 0
    r = rsps[0][1]
    assert r.SpecificCharacterSet == "ISO_IR 192"
    assert str(r.PatientName) == "Müller^Jörg"


def test_find_events_hold_no_patient_data(qr):
    srv, ctx, _ = qr
    find(srv, ctx, STUDY_ROOT, identifier("STUDY", {"PatientName": "Doe^John"}))
    events = [e for e in srv.events() if e["type"] == "query.find"]
    assert events
    last = events[-1]
    assert last["ae"] == FINDER and last["level"] == "STUDY" and last["matches"] == 1
    assert last["study_uids"] == [UIDS["S1"]]
    text = (srv.data / "events" / "events.log").read_text()
    for name in ("Doe^John", "PID001", "Müller"):
        assert name not in text


def _findscu(srv: Server, cert_dir, model_flag, keys, out: Path):
    crt, key, ca = cert_dir
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["/usr/bin/findscu", model_flag, "-aet", FINDER, "-aec", srv.ae_title,
           "+tls", str(key), str(crt), "+cf", str(ca), "-X", "-od", str(out)]
    for k in keys:
        cmd += ["-k", k]
    cmd += ["127.0.0.1", str(srv.tls_port)]
    env = dict(os.environ, TCP_NODELAY="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_dcmtk_findscu_over_tls(qr, tmp_path):
    srv, _, certs = qr
    rsps = _findscu(srv, certs, "-S", ["QueryRetrieveLevel=STUDY", "PatientName=doe*",
                                       "StudyInstanceUID", "StudyDate"], tmp_path / "s")
    assert sorted(r.StudyInstanceUID for r in rsps) == sorted(UIDS[s] for s in ("S1", "S2", "S3", "S4"))
    rsps = _findscu(srv, certs, "-P", ["QueryRetrieveLevel=PATIENT", "PatientID=PID00*",
                                       "PatientName"], tmp_path / "p")
    assert sorted(r.PatientID for r in rsps) == ["PID001", "PID002", "PID003", "PID004"]


# --------------------------------------------------------------------------
# refusals, limits, cancel
# --------------------------------------------------------------------------

def test_device_without_find_is_not_authorized(make_server):
    srv = make_server(plain=False)
    srv.device_add("NOFIND", transport="mtls", allow="echo,store")
    ctx = srv.tls_context("NOFIND")
    rsps = find(srv, ctx, STUDY_ROOT, identifier("STUDY", {}), calling="NOFIND")
    assert [s for s, _, _ in rsps] == [helpers.NOT_AUTHORIZED]


def test_over_limit_refused_without_pendings_and_universal_query_alert(make_server):
    srv = make_server(plain=False, start=False)
    cfg = srv.data / "bastion.toml"
    cfg.write_text(cfg.read_text().replace("max_matches = 1000", "max_matches = 3"))
    srv.start(plain=False)
    srv.device_add(FINDER, transport="mtls", allow="echo,store,find")
    ctx = srv.tls_context(FINDER)
    store_datasets(srv, table_datasets(), FINDER, ctx)
    rsps = find(srv, ctx, STUDY_ROOT, identifier("STUDY", {"PatientName": "*"}))
    assert len(rsps) == 1, rsps
    assert rsps[0][0] == helpers.OUT_OF_RESOURCES
    assert "refine" in rsps[0][2].ErrorComment
    # at the limit: fine
    rsps = find(srv, ctx, STUDY_ROOT, identifier("STUDY", {"PatientName": "doe^j*"}))
    assert [s for s, _, _ in rsps] == [0xFF00, 0xFF00, 0]
    # universal PATIENT query: a security event (and refused here, 4 patients > 3)
    rsps = find(srv, ctx, PATIENT_ROOT, identifier("PATIENT", {"PatientName": ""}))
    assert rsps[-1][0] == helpers.OUT_OF_RESOURCES
    alerts = [e for e in srv.events() if e["type"] == "security.universal_query"]
    assert alerts and alerts[-1]["ae"] == FINDER and alerts[-1]["level"] == "PATIENT"


def test_cancel_stops_a_find_with_many_matches(make_server):
    srv = make_server(plain=False)
    srv.device_add(FINDER, transport="mtls", allow="echo,store,find")
    ctx = srv.tls_context(FINDER)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    many = [helpers.make_dataset(study_uid=study, series_uid=series, pixel_bytes=512)
            for _ in range(60)]
    store_datasets(srv, many, FINDER, ctx)
    ident = Dataset()
    ident.QueryRetrieveLevel = "IMAGE"
    ident.StudyInstanceUID = study
    ident.SeriesInstanceUID = series
    ident.SOPInstanceUID = ""
    # without cancel: 60 pendings
    rsps = find(srv, ctx, STUDY_ROOT, ident)
    assert len(rsps) == 61 and rsps[-1][0] == 0
    # C-CANCEL right behind the request: final 0xFE00, fewer pendings
    rsps = find(srv, ctx, STUDY_ROOT, ident, cancel_at_once=True)
    assert rsps[-1][0] == CANCEL, [s for s, _, _ in rsps]
    assert len(rsps) - 1 < 60
    # the association stays usable afterwards
    assert srv.echo(FINDER, ctx=ctx) == 0


# --------------------------------------------------------------------------
# character sets (pydicom charset_files)
# --------------------------------------------------------------------------

# chrFrenMulti.dcm shares chrFren.dcm's SOP Instance UID (a conflict, not stored).
SINGLE_VALUED = ["chrArab.dcm", "chrFren.dcm", "chrGerm.dcm",
                 "chrGreek.dcm", "chrHbrw.dcm", "chrRuss.dcm", "chrX1.dcm", "chrX2.dcm"]
# Multi-valued (0008,0005) with ISO 2022 code extensions (PS3.5 Annexes H-K).
# chrJapMultiExplicitIR6.dcm shares chrJapMulti.dcm's SOP Instance UID (its
# charset is used as a query charset instead); chrSQEncoding1.dcm has no SOP
# Instance UID.
MULTI_VALUED = ["chrH31.dcm", "chrH32.dcm", "chrI2.dcm", "chrJapMulti.dcm",
                "chrKoreanMulti.dcm"]
CHARSET_FILES = SINGLE_VALUED + MULTI_VALUED


@pytest.fixture(scope="module")
def charset_server(bastion_bin, tmp_path_factory, corpus_root):
    srv = Server(bastion_bin, tmp_path_factory.mktemp("charsets"))
    srv.init()
    files = [corpus_root / "pydicom" / "charset_files" / f for f in CHARSET_FILES]
    rc, summary, rejected, out = srv.import_(*files)
    assert summary["stored"] + summary["duplicates"] == len(files), out
    srv.start(plain=False)
    srv.device_add(FINDER, transport="mtls", allow="echo,find")
    yield srv, srv.tls_context(FINDER), files
    srv.stop()


@pytest.mark.parametrize("name", CHARSET_FILES)
@pytest.mark.parametrize("query_charset", ["own", "ISO_IR 192"])
def test_charset_files_found_by_name(charset_server, name, query_charset):
    srv, ctx, files = charset_server
    path = next(f for f in files if f.name == name)
    src = pydicom.dcmread(path, stop_before_pixels=True)
    want = str(src.PatientName).split("\\")[0] if "\\" in str(src.PatientName) else str(
        src.PatientName[0] if isinstance(src.PatientName, pydicom.multival.MultiValue) else src.PatientName)
    ident = Dataset()
    charset = src.SpecificCharacterSet if query_charset == "own" else "ISO_IR 192"
    if isinstance(charset, pydicom.multival.MultiValue) and name not in MULTI_VALUED:
        charset = charset[0]
    # multi-valued: pydicom encodes the query with ISO 2022 escape sequences
    ident.SpecificCharacterSet = charset
    ident.QueryRetrieveLevel = "STUDY"
    ident.PatientName = want
    ident.StudyInstanceUID = ""
    rsps = find(srv, ctx, STUDY_ROOT, ident)
    assert rsps[-1][0] == 0, rsps
    got = [r for s, r, _ in rsps[:-1]]
    assert src.StudyInstanceUID in [r.StudyInstanceUID for r in got], (want, got)
    for r in got:
        if r.StudyInstanceUID == src.StudyInstanceUID:
            names = r.PatientName
            first = names[0] if isinstance(names, pydicom.multival.MultiValue) else names
            assert str(first) == want
            if any(ord(c) > 127 for c in str(r.PatientName)):
                assert r.SpecificCharacterSet == "ISO_IR 192"


def test_charset_explicit_ir6_query_finds_iso2022_name(charset_server):
    """A query whose (0008,0005) is `ISO 2022 IR 6\\ISO 2022 IR 87` (as in
    chrJapMultiExplicitIR6.dcm) matches the JIS X 0208 name stored from
    chrJapMulti.dcm."""
    srv, ctx, files = charset_server
    path = next(f for f in files if f.name == "chrJapMulti.dcm")
    src = pydicom.dcmread(path, stop_before_pixels=True)
    ident = Dataset()
    ident.SpecificCharacterSet = ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    ident.QueryRetrieveLevel = "STUDY"
    ident.PatientName = "やまだ^たろう"
    ident.StudyInstanceUID = ""
    rsps = find(srv, ctx, STUDY_ROOT, ident)
    assert rsps[-1][0] == 0, rsps
    got = {r.StudyInstanceUID: str(r.PatientName) for s, r, _ in rsps[:-1]}
    assert got.get(src.StudyInstanceUID) == "やまだ^たろう", got


@pytest.mark.parametrize("query_charset", [["ISO 2022 IR 13", "ISO 2022 IR 87"], "ISO_IR 192"])
def test_iso2022_sequence_item_found(charset_server, corpus_root, tmp_path, query_charset):
    """A sequence item in ISO 2022 IR 87 (chrSQEncoding1.dcm, which has no UIDs:
    a copy with UIDs added, its item as the indexed Procedure Code Sequence,
    bytes as in the file) is found by the name in it, in the file's own
    character set and in UTF-8, and returned as Unicode."""
    srv, ctx, _ = charset_server
    ds = pydicom.dcmread(corpus_root / "pydicom" / "charset_files" / "chrSQEncoding1.dcm")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "2.25.773001"
    ds.SeriesInstanceUID = "2.25.773002"
    ds.ProcedureCodeSequence = ds.RequestedProcedureCodeSequence
    del ds.RequestedProcedureCodeSequence
    path = tmp_path / "chrSQEncoding1-uids.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert b"\x1b$B;3ED" in path.read_bytes()  # the item's bytes were kept
    rc, summary, rejected, out = srv.import_(path)
    assert summary["stored"] + summary["duplicates"] == 1, out
    full = "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"
    ident = Dataset()
    ident.SpecificCharacterSet = query_charset
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = ""
    item = Dataset()
    item.PatientName = "山田^太郎"
    ident.ProcedureCodeSequence = Sequence([item])
    rsps = find(srv, ctx, STUDY_ROOT, ident)
    assert rsps[-1][0] == 0, rsps
    got = {r.StudyInstanceUID: r for _, r, _ in rsps[:-1]}
    assert list(got) == ["2.25.773001"], got
    r = got["2.25.773001"]
    assert [str(i.PatientName) for i in r.ProcedureCodeSequence] == [full]
    assert r.SpecificCharacterSet == "ISO_IR 192"
