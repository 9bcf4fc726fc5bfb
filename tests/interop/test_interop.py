"""Real peers: DCMTK echoscu/storescu over TLS, pynetdicom over TLS and plain."""
import collections
import os
import subprocess
from pathlib import Path

import pydicom
import pytest

import corpus
import helpers
from helpers import SUCCESS

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
# DCMTK 3.6.7: +py = BCP 195 non-downgrading (default), +px = BCP 195,
# +pz = extended BCP 195 (TLS 1.2 only).
PROFILES = ["+py", "+px", "+pz"]


def dcmtk_tls_args(crt, key, ca, profile="+py"):
    return ["+tls", str(key), str(crt), "-pw", "+cf", str(ca), profile]


@pytest.mark.parametrize("profile", PROFILES)
def test_echo_tls_dcmtk(server, profile):
    server.device_add("DCMTKECHO", transport="mtls", allow="echo")
    crt, key, ca, _ = server.cert_issue("DCMTKECHO")
    r = subprocess.run(["/usr/bin/echoscu", "-v", "-aet", "DCMTKECHO", "-aec", "BASTION",
                        *dcmtk_tls_args(crt, key, ca, profile), "127.0.0.1", str(server.tls_port)],
                       capture_output=True, text=True, timeout=60, env=DCMTK_ENV)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Received Echo Response (Success)" in out, out


def _strip(ds):
    """DCMTK drops group lengths and dataset trailing padding when it re-encodes."""
    for el in list(ds):
        if el.tag.element == 0 or el.tag == 0xFFFCFFFC:
            del ds[el.tag]
        elif el.VR == "SQ":
            for it in el.value:
                _strip(it)
    return ds


def check_part10(data: bytes, sop_uid: str):
    assert data[:128] == b"\0" * 128, "preamble not zeroed"
    assert data[128:132] == b"DICM"
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    assert str(ds.file_meta.MediaStorageSOPInstanceUID) == sop_uid
    assert str(ds.file_meta.MediaStorageSOPClassUID) == str(ds.SOPClassUID)
    assert str(ds.SOPInstanceUID) == sop_uid
    return ds


DCMTK_TS = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99"}


def test_store_roundtrip_dcmtk_tls(server, tmp_path):
    """storescu sends one file per SOP Instance UID (uncompressed and deflated
    transfer syntaxes: storescu cannot send the others without a matching
    context, and pynetdicom covers them below), grouped by transfer syntax
    with -R so that each group proposes its own syntax."""
    server.device_add("STORESCU", transport="mtls", allow="echo,store")
    crt, key, ca, _ = server.cert_issue("STORESCU")
    groups = collections.defaultdict(list)
    for e in corpus.one_per_sop_uid_entries():
        if e.transfer_syntax in DCMTK_TS and e.path.name != "explicit_VR-UN.dcm":
            groups[e.transfer_syntax].append(e)
    sent = []
    for ts, ents in sorted(groups.items()):
        r = subprocess.run(["/usr/bin/storescu", "-nh", "-R", "-aet", "STORESCU", "-aec", "BASTION",
                            *dcmtk_tls_args(crt, key, ca), "127.0.0.1", str(server.tls_port),
                            *[str(e.path) for e in ents]],
                           capture_output=True, text=True, timeout=600, env=DCMTK_ENV)
        out = r.stdout + r.stderr
        errors = [l for l in out.splitlines() if l.startswith(("E:", "F:"))]
        assert r.returncode == 0 and not errors, f"storescu ({ts}):\n{out[-3000:]}"
        sent += ents
    assert len(sent) > 100
    for e in sent:
        data = server.instance_get(e.sop_instance)
        assert data is not None, f"{e.path.name} not stored"
        got = check_part10(data, e.sop_instance)
        want = pydicom.dcmread(str(e.path))
        assert _strip(got) == _strip(want), f"{e.path.name}: dataset differs"


def test_store_roundtrip_pynetdicom_tls_all_syntaxes(server, tmp_path):
    """Every transfer syntax in the corpus, dataset bytes sent exactly (chunked
    mode) and read back exactly. Files whose meta names another SOP Instance
    UID than the dataset are re-wrapped with a consistent meta first."""
    server.device_add("PYNET", transport="mtls", allow="echo,store")
    ctx = server.tls_context("PYNET")
    files, expect = [], {}
    for e in corpus.one_per_sop_uid_entries():
        ts, raw = corpus.dataset_bytes(e.path)
        p = tmp_path / "send" / f"{e.sop_instance}.dcm"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(helpers.part10(helpers.file_meta_for(e.sop_class, e.sop_instance, ts), raw))
        files.append(p)
        expect[p] = (e, ts, raw)
    statuses = helpers.store_files(server.tls_port, "PYNET", files, tls=ctx)
    bad = {expect[p][0].path.name: st for p, st in statuses.items() if st != SUCCESS}
    assert not bad, f"C-STORE not successful: {bad}"
    for p in files:
        e, ts, raw = expect[p]
        data = server.instance_get(e.sop_instance)
        check_part10(data, e.sop_instance)
        ts2, raw2 = corpus.dataset_bytes(data)
        assert ts2 == ts, f"{e.path.name}: transfer syntax {ts2} != {ts}"
        assert raw2 == raw, f"{e.path.name}: dataset bytes differ"


def test_pynetdicom_tls_echo_and_store(server, tmp_path):
    server.device_add("PYTLS", transport="tls", allow="echo,store")
    # tls: a client certificate is optional
    assert server.echo("PYTLS", ctx=server.tls_context()) == SUCCESS
    ds = helpers.make_dataset()
    p = tmp_path / "one.dcm"
    raw = helpers.dataset_file(ds, p)
    st, _ = helpers.store_one(server.tls_port, "PYTLS", p, tls=server.tls_context())
    assert st == SUCCESS
    assert corpus.dataset_bytes(server.instance_get(ds.SOPInstanceUID))[1] == raw
    # ... and with one issued by our CA
    assert server.echo("PYTLS", ctx=server.tls_context("PYTLS")) == SUCCESS


def test_pynetdicom_plain_echo_and_store(server, tmp_path):
    server.device_add("PYPLAIN", transport="plain", allow="echo,store")
    assert server.echo("PYPLAIN", tls=False) == SUCCESS
    ds = helpers.make_dataset()
    p = tmp_path / "one.dcm"
    raw = helpers.dataset_file(ds, p)
    st, _ = helpers.store_one(server.plain_port, "PYPLAIN", p)
    assert st == SUCCESS
    assert corpus.dataset_bytes(server.instance_get(ds.SOPInstanceUID))[1] == raw


def test_ae_title_spaces_not_significant(server):
    server.device_add("SPACEY", transport="plain", allow="echo")
    assert server.echo(" SPACEY ", tls=False, called="BASTION ") == SUCCESS


def test_preamble_executable_zeroed_and_event(server, tmp_path):
    ds = helpers.make_dataset()
    p = tmp_path / "mz.dcm"
    preamble = b"MZ\x90\x00" + b"\x41" * 124
    raw = helpers.dataset_file(ds, p, preamble=preamble)
    code, summary, rejected, out = server.import_(p)
    assert code == 0, out
    assert summary["stored"] == 1
    data = server.instance_get(ds.SOPInstanceUID)
    assert data[:128] == b"\0" * 128
    assert corpus.dataset_bytes(data)[1] == raw
    assert any(ev.get("type") == "security.preamble_executable" for ev in server.events())
