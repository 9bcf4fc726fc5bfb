"""Association policy (PS3.8 A-ASSOCIATE-RJ) and DIMSE refusals (PS3.7 statuses)."""
from pathlib import Path

import pydicom
import pytest

import corpus
import helpers
from helpers import (SUCCESS, NOT_AUTHORIZED, DUPLICATE_SOP_INSTANCE, DATASET_MISMATCH,
                     CANNOT_UNDERSTAND, associate, rejection)

RJ_CALLING = (1, 1, 3)  # rejected-permanent, service-user, calling AE not recognized
RJ_CALLED = (1, 1, 7)   # rejected-permanent, service-user, called AE not recognized


def refused(assoc):
    try:
        return rejection(assoc)
    finally:
        if assoc.is_established:
            assoc.release()


def rj(port, calling, **kw):
    """The A-ASSOCIATE-RJ pynetdicom reads for this association request.

    pynetdicom 3.0.4 now and then reports a rejected association as aborted
    (its reactor sees the transport event before the RJ PDU, about 3 % of
    runs on loopback, although Bastion keeps the connection open until the
    requestor closes it): such a run is retried, at most 3 times. Any RJ
    read must be the expected one; an accepted association never passes."""
    for _ in range(3):
        assoc = associate(port, calling, **kw)
        aborted = assoc.is_aborted
        got = refused(assoc)
        if got is not None or not aborted:
            return got
    return None


def test_unknown_calling_ae(server):
    assert rj(server.tls_port, "NOBODY", tls=server.tls_context()) == RJ_CALLING
    assert rj(server.plain_port, "NOBODY") == RJ_CALLING


def test_wrong_called_ae(server):
    server.device_add("KNOWN", transport="plain", allow="echo")
    assert rj(server.plain_port, "KNOWN", called="NOTBASTION") == RJ_CALLED


def test_right_ae_wrong_address(server):
    # we connect from 127.0.0.1, outside 10.0.0.0/8 (no traffic goes to 10.x)
    server.device_add("FARAWAY", network="10.0.0.0/8", transport="plain", allow="echo")
    server.device_add("FARTLS", network="10.0.0.0/8", transport="tls", allow="echo")
    assert rj(server.plain_port, "FARAWAY") == RJ_CALLING
    assert rj(server.tls_port, "FARTLS", tls=server.tls_context()) == RJ_CALLING


def test_tls_device_on_plain_listener(server):
    server.device_add("TLSONLY", transport="tls", allow="echo")
    assert rj(server.plain_port, "TLSONLY") == RJ_CALLING
    server.device_add("MTLSONLY", transport="mtls", allow="echo")
    assert rj(server.plain_port, "MTLSONLY") == RJ_CALLING
    # the same device over TLS works
    assert server.echo("TLSONLY") == SUCCESS


def test_plain_device_on_tls_listener_allowed_or_refused_consistently(server):
    """Not in the contract's refusal list; only checks the server answers."""
    server.device_add("PLAINDEV", transport="plain", allow="echo")
    assoc = associate(server.tls_port, "PLAINDEV", tls=server.tls_context())
    got = refused(assoc)
    assert got in (None, RJ_CALLING)


def _mtls_not_accepted(assoc):
    got = refused(assoc)
    assert not assoc.is_established or got is not None
    assert got in (None, RJ_CALLING), got  # None: TLS handshake failed / aborted


def test_mtls_without_cert_refused(server):
    server.device_add("MTLS1", transport="mtls", allow="echo")
    assoc = associate(server.tls_port, "MTLS1", tls=server.tls_context())
    assert not assoc.is_established
    _mtls_not_accepted(assoc)


def test_mtls_foreign_cert_refused_unless_pinned(server, tmp_path):
    crt, key, fp = helpers.foreign_ca_and_client(tmp_path / "foreign")
    ctx = helpers.client_ssl_context(server.data / "tls" / "ca.crt", crt, key)
    server.device_add("MTLS2", transport="mtls", allow="echo")
    assoc = associate(server.tls_port, "MTLS2", tls=ctx)
    assert not assoc.is_established
    _mtls_not_accepted(assoc)
    # pinned by fingerprint (colons and upper case are not significant)
    pinned = ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()
    server.device_add("MTLS3", transport="mtls", allow="echo", cert_sha256=pinned)
    assert server.echo("MTLS3", ctx=ctx) == SUCCESS
    # a pin is exclusive: even a certificate from our own CA, issued to this
    # very device, is refused while the device pins another one
    own = server.tls_context("MTLS3")
    assert rj(server.tls_port, "MTLS3", tls=own) == RJ_CALLING


def test_ca_certificate_is_bound_to_its_device(server):
    """A certificate from Bastion's CA names one AE title (subject CN); it
    cannot be used to connect as another registered device."""
    server.device_add("CTA", transport="mtls", allow="echo")
    server.device_add("CTB", transport="mtls", allow="echo")
    server.device_add("TLSB", transport="tls", allow="echo")
    ctx_b = server.tls_context("CTB")
    assert server.echo("CTB", ctx=ctx_b) == SUCCESS
    assert rj(server.tls_port, "CTA", tls=ctx_b) == RJ_CALLING
    assert rj(server.tls_port, "TLSB", tls=ctx_b) == RJ_CALLING
    rejected = [e for e in server.events() if e.get("type") == "association.rejected"
                and e.get("calling_ae") == "CTA"]
    assert rejected and rejected[-1]["reason"] == "certificate_for_another_device"
    accepted = [e for e in server.events() if e.get("type") == "association.accepted"
                and e.get("ae") == "CTB"]
    assert accepted and len(accepted[-1]["certificate_sha256"]) == 64


def test_cert_issue_needs_a_registered_device(server):
    r = server.cli("cert", "issue", "--ae", "GHOST", "--out", str(server.base / "ghost"), check=False)
    assert r.returncode != 0
    assert "no device with AE title GHOST" in r.stderr
    assert not (server.base / "ghost" / "client.key").exists()


def test_tls_foreign_cert_refused(server, tmp_path):
    """tls: a client certificate is optional but must chain to our CA if sent."""
    crt, key, _ = helpers.foreign_ca_and_client(tmp_path / "foreign")
    ctx = helpers.client_ssl_context(server.data / "tls" / "ca.crt", crt, key)
    server.device_add("TLSX", transport="tls", allow="echo")
    assoc = associate(server.tls_port, "TLSX", tls=ctx)
    assert not assoc.is_established
    _mtls_not_accepted(assoc)


def test_echo_without_permission(server):
    server.device_add("NOECHO", transport="plain", allow="store")
    assert server.echo("NOECHO", tls=False) == NOT_AUTHORIZED


def test_store_without_permission(server, tmp_path):
    server.device_add("NOSTORE", transport="plain", allow="echo")
    ds = helpers.make_dataset()
    p = tmp_path / "x.dcm"
    helpers.dataset_file(ds, p)
    st, _ = helpers.store_one(server.plain_port, "NOSTORE", p)
    assert st == NOT_AUTHORIZED
    assert server.instance_get(ds.SOPInstanceUID, check=False) is None


@pytest.mark.parametrize("field", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_invalid_uid_refused(server, tmp_path, field):
    server.device_add("BADUID", transport="plain", allow="echo,store")
    ds = helpers.make_dataset()
    good_uid = ds.SOPInstanceUID
    setattr(ds, field, "../../x")
    # the command's Affected SOP Instance UID stays the valid one (pynetdicom
    # refuses to encode an invalid UID there); the dataset carries ../../x
    p = tmp_path / "bad.dcm"
    helpers.dataset_file(ds, p)
    st, rsp = helpers.store_one(server.plain_port, "BADUID", p)
    assert st == DATASET_MISMATCH
    assert "ErrorComment" in rsp and str(rsp.ErrorComment).strip()
    assert server.instance_get(good_uid, check=False) is None
    # nothing was written outside blobs/ under a name derived from the UID
    assert not any("x" == q.name for q in server.data.parent.rglob("x"))


def test_invalid_uid_value_is_not_echoed(server, tmp_path):
    """A patient name pasted into a UID field is refused (0xA900) and the
    value appears neither in the log, nor in the event log, nor on disk."""
    server.device_add("BADUID2", transport="plain", allow="store")
    ds = helpers.make_dataset()
    ds.StudyInstanceUID = "Zzyzx^Quintessa"
    p = tmp_path / "phi-uid.dcm"
    helpers.dataset_file(ds, p)
    st, rsp = helpers.store_one(server.plain_port, "BADUID2", p)
    assert st == DATASET_MISMATCH
    assert "Study Instance UID" in str(rsp.ErrorComment)
    assert "Zzyzx" not in str(rsp.ErrorComment)
    server.stop()
    assert "Zzyzx" not in server.log()
    for f in server.data.rglob("*"):
        if f.is_file():
            assert b"Zzyzx" not in f.read_bytes(), f


def test_missing_study_uid_refused(server, tmp_path):
    server.device_add("NOSTUDY", transport="plain", allow="store")
    ds = helpers.make_dataset()
    del ds.StudyInstanceUID
    p = tmp_path / "nostudy.dcm"
    helpers.dataset_file(ds, p)
    st, rsp = helpers.store_one(server.plain_port, "NOSTUDY", p)
    assert st == DATASET_MISMATCH
    assert server.instance_get(ds.SOPInstanceUID, check=False) is None


def _conflict_pair():
    pairs = corpus.conflicting_pairs()
    assert pairs, "corpus has no conflicting pair"
    # a small uncompressed pair keeps the test fast
    return min(pairs, key=lambda pr: pr[0].stat().st_size + pr[1].stat().st_size)


def _rewrap(path: Path, out: Path) -> tuple[str, bytes]:
    ts, raw = corpus.dataset_bytes(path)
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    out.write_bytes(helpers.part10(helpers.file_meta_for(ds.SOPClassUID, ds.SOPInstanceUID, ts), raw))
    return str(ds.SOPInstanceUID), raw


def test_conflicting_resend_refused_and_recorded(server, tmp_path):
    server.device_add("CONFL", transport="plain", allow="store")
    first, other = _conflict_pair()
    uid, raw1 = _rewrap(first, tmp_path / "first.dcm")
    _, raw2 = _rewrap(other, tmp_path / "other.dcm")
    assert raw1 != raw2
    st, _ = helpers.store_one(server.plain_port, "CONFL", tmp_path / "first.dcm")
    assert st == SUCCESS
    st, _ = helpers.store_one(server.plain_port, "CONFL", tmp_path / "other.dcm")
    assert st == DUPLICATE_SOP_INSTANCE
    # the first version is kept
    assert corpus.dataset_bytes(server.instance_get(uid))[1] == raw1
    types = [ev.get("type", "") for ev in server.events()]
    assert any("conflict" in t for t in types), types


def test_conflicting_resend_replace_device(server, tmp_path):
    server.device_add("REPL", transport="plain", allow="store", on_conflict="replace")
    first, other = _conflict_pair()
    uid, raw1 = _rewrap(first, tmp_path / "first.dcm")
    _, raw2 = _rewrap(other, tmp_path / "other.dcm")
    assert helpers.store_one(server.plain_port, "REPL", tmp_path / "first.dcm")[0] == SUCCESS
    assert helpers.store_one(server.plain_port, "REPL", tmp_path / "other.dcm")[0] == SUCCESS
    assert corpus.dataset_bytes(server.instance_get(uid))[1] == raw2


def test_identical_resend_idempotent(server, tmp_path):
    server.device_add("SAME", transport="plain", allow="store")
    ds = helpers.make_dataset()
    p = tmp_path / "same.dcm"
    raw = helpers.dataset_file(ds, p)
    for _ in range(3):
        st, _ = helpers.store_one(server.plain_port, "SAME", p)
        assert st == SUCCESS
    assert corpus.dataset_bytes(server.instance_get(ds.SOPInstanceUID))[1] == raw
    # importing the same instance is a duplicate, not a second copy
    code, summary, rejected, out = server.import_(p)
    assert code == 0, out
    assert summary == {"stored": 0, "duplicates": 1, "conflicts": 0, "rejected": 0}, out


def test_device_changes_apply_without_restart(server):
    assert rj(server.plain_port, "LATE") == RJ_CALLING
    server.device_add("LATE", transport="plain", allow="echo")
    assert server.echo("LATE", tls=False) == SUCCESS
    server.device_update("LATE", network=None, transport=None, allow="store")
    assert server.echo("LATE", tls=False) == NOT_AUTHORIZED
    server.device_remove("LATE")
    assert rj(server.plain_port, "LATE") == RJ_CALLING
    assert server.starts == 1


def test_unparseable_dataset_gets_an_error_comment(server, tmp_path):
    """A C-STORE whose dataset cannot be parsed is refused 0xC000 with an
    Error Comment (0000,0902, PS3.7 C.4.2.1.4) saying why, at most 64
    characters, without the patient data it carried."""
    server.device_add("BADDS", transport="plain", allow="store")
    uid = pydicom.uid.generate_uid()
    dataset = (helpers.key_elements(helpers.SECONDARY_CAPTURE, uid, pydicom.uid.generate_uid(),
                                    pydicom.uid.generate_uid())
               + helpers.element(0x0010, 0x0010, b"PN", b"Xyloph^Quimby")
               # a Patient ID declaring 200 bytes, 4 present: past the end
               + helpers.element(0x0010, 0x0020, b"LO", b"P-77", length=200))
    p = tmp_path / "truncated.dcm"
    p.write_bytes(helpers.part10(helpers.file_meta_for(helpers.SECONDARY_CAPTURE, uid), dataset))
    st, rsp = helpers.store_one(server.plain_port, "BADDS", p)
    assert st in (CANNOT_UNDERSTAND, DATASET_MISMATCH), hex(st)
    comment = str(rsp.ErrorComment).strip()
    assert comment and len(comment) <= 64, comment
    # the reason first (0xC000 already says "not DICOM"), cut at a word
    assert comment.startswith("malformed dataset: declared length 200 "), comment
    assert comment.endswith("..."), comment
    assert "Xyloph" not in comment and "P-77" not in comment, comment
    assert server.instance_get(uid, check=False) is None
