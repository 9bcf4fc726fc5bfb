"""Import, the plaintext-PHI invariant, crash consistency, full disk, memory bound."""
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

import corpus
import helpers
from pydicom.uid import generate_uid
from helpers import SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND, DATASET_MISMATCH

SYNTH_NAME = "Zyxwvut^Qqqrst"
SYNTH_ID = "PID-98765-XQ"


def _rel(p: str) -> str:
    return os.path.realpath(p)


def test_import_corpus(make_server, corpus_root):
    srv = make_server(start=False)
    code, summary, rejected, out = srv.import_(*corpus.corpus_dirs())
    assert code == 1, out[-3000:]
    total = len(corpus.all_files())
    assert sum(summary.values()) == total, (summary, total)
    rejected_paths = {_rel(p) for p, _ in rejected}
    assert len(rejected) == summary["rejected"], out[-3000:]
    for p, reason in rejected:
        assert reason.strip(), p
    must_refuse = {_rel(str(p)) for p, _ in corpus.invalid_files()}
    missing = must_refuse - rejected_paths
    assert not missing, f"invalid files not rejected: {sorted(missing)}"
    valid = {_rel(str(p)) for p in corpus.valid_files()}
    wrongly = valid & rejected_paths
    assert not wrongly, f"valid files rejected: {sorted(wrongly)}"
    uids = {e.sop_instance for e in corpus.valid_entries()}
    # skipped (undecided) files may add a few stored instances, never fewer
    assert summary["stored"] >= len(uids)
    assert summary["conflicts"] >= 1 and summary["duplicates"] >= 1
    for e in corpus.one_per_sop_uid_entries()[:20]:
        assert srv.instance_get(e.sop_instance) is not None
    # second import: nothing new
    code2, summary2, rejected2, out2 = srv.import_(*corpus.corpus_dirs())
    assert code2 == 1
    assert summary2["stored"] == 0, out2[-2000:]
    assert summary2["rejected"] == summary["rejected"]
    assert summary2["duplicates"] + summary2["conflicts"] == total - summary["rejected"]


def test_plaintext_phi_invariant(make_server, tmp_path):
    srv = make_server()
    srv.device_add("PHI", transport="tls", allow="store")
    code, summary, _, out = srv.import_(*corpus.corpus_dirs())
    assert summary["stored"] > 100, out[-2000:]
    ds = helpers.make_dataset(patient_name=SYNTH_NAME, patient_id=SYNTH_ID)
    p = tmp_path / "synth.dcm"
    helpers.dataset_file(ds, p)
    st, _ = helpers.store_one(srv.tls_port, "PHI", p, tls=srv.tls_context())
    assert st == SUCCESS
    srv.stop()
    needles = [SYNTH_NAME, SYNTH_ID, "Zyxwvut", "Qqqrst"] + corpus.patient_strings(6, 3)
    assert len(needles) >= 7
    patterns = set()
    for n in needles:
        for v in (n, n.lower(), n.upper()):
            patterns.add(v.encode())
    hits = []
    nfiles = 0
    for f in srv.data.rglob("*"):
        if f.is_file() and not f.is_symlink():
            nfiles += 1
            data = f.read_bytes()
            for pat in patterns:
                if pat in data:
                    hits.append((str(f.relative_to(srv.data)), pat.decode()))
    assert nfiles > 0
    assert not hits, f"plaintext patient data under the data dir: {hits}"
    # the server log too (stderr is the operator's log)
    log = srv.log().encode()
    assert not [p for p in patterns if p in log], "patient data in the server log"


def _sender(port, files, statuses, stop):
    """Send files one C-STORE at a time over one association; record statuses."""
    try:
        assoc = helpers.associate(port, "CRASH", contexts=[(helpers.CT_IMAGE_STORAGE,
                                                            "1.2.840.10008.1.2.1")])
        if not assoc.is_established:
            return
        with helpers.chunked_send():
            for f in files:
                if stop.is_set() or not assoc.is_established:
                    break
                try:
                    st = assoc.send_c_store(f)
                except Exception:  # noqa: BLE001
                    break
                statuses[f] = st.Status if "Status" in st else None
        if assoc.is_established:
            assoc.release()
    except Exception:  # noqa: BLE001
        pass


def test_crash_consistency(make_server, tmp_path):
    srv = make_server()
    srv.device_add("CRASH", transport="plain", allow="store")
    gen = tmp_path / "gen"
    gen.mkdir()
    sent = {}  # path -> (sop uid, raw dataset)
    for i in range(200):
        ds = helpers.make_dataset(patient_id=f"C{i}", pixel_bytes=32 * 1024, seed_value=i)
        p = gen / f"{i:04d}.dcm"
        sent[p] = (ds.SOPInstanceUID, helpers.dataset_file(ds, p))
    files = list(sent)
    acknowledged = {}
    for round_ in range(3):
        chunk = files[round_ * 60:(round_ + 1) * 60 + 20]
        statuses, stop = {}, threading.Event()
        t = threading.Thread(target=_sender, args=(srv.plain_port, chunk, statuses, stop), daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while len(statuses) < 10 + round_ * 5 and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.kill9()
        stop.set()
        t.join(timeout=30)
        assert not t.is_alive()
        acknowledged.update({f: st for f, st in statuses.items() if st == SUCCESS})
        srv.start()
        for f in chunk:
            uid, raw = sent[f]
            data = srv.instance_get(uid, check=False)
            if f in acknowledged:
                assert data is not None, f"acknowledged instance {f.name} lost after kill -9"
            if data is not None:
                assert data[:128] == b"\0" * 128
                assert corpus.dataset_bytes(data)[1] == raw, f"{f.name} is not intact"
    assert len(acknowledged) >= 10
    # everything visible is whole: importing all generated files stores only
    # the ones that were never acknowledged and never conflicts
    code, summary, _, out = srv.import_(gen)
    assert code == 0, out[-2000:]
    assert summary["conflicts"] == 0 and summary["rejected"] == 0
    assert summary["duplicates"] >= len(acknowledged)


@pytest.mark.skipif(bool(os.environ.get("BASTION_TEST_STORE_URL")),
                    reason="fills the data directory's disk: the local store's test (blobs are in S3 here)")
def test_full_disk(bastion_bin, tmp_path, make_server):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        srv = make_server(name="full", data=mnt / "data")
        srv.device_add("FILLER", transport="plain", allow="echo,store")
        gen = tmp_path / "gen"
        gen.mkdir()
        acknowledged, statuses = {}, []
        full = False
        for i in range(100):  # 100 x 512 KiB > 24 MiB
            ds = helpers.make_dataset(pixel_bytes=512 * 1024, seed_value=i)
            p = gen / f"{i}.dcm"
            raw = helpers.dataset_file(ds, p)
            st, _ = helpers.store_one(srv.plain_port, "FILLER", p)
            statuses.append(st)
            if st == SUCCESS:
                acknowledged[ds.SOPInstanceUID] = raw
            elif st == OUT_OF_RESOURCES:
                full = True
                break
            else:
                pytest.fail(f"unexpected status {st!r} at instance {i}")
        assert full, f"no 0xA700 after {len(statuses)} instances of 512 KiB on a 24 MiB tmpfs"
        assert srv.echo("FILLER", tls=False) == SUCCESS
        out = tmp_path / "out"
        for uid, raw in acknowledged.items():
            data = srv.instance_get(uid, out=out / f"{uid}.dcm")
            assert corpus.dataset_bytes(data)[1] == raw
        # space returns: the next store succeeds
        subprocess.run(["mount", "-o", "remount,size=96m", str(mnt)], check=True, timeout=30)
        ds = helpers.make_dataset(pixel_bytes=512 * 1024, seed_value=999)
        p = gen / "after.dcm"
        helpers.dataset_file(ds, p)
        assert helpers.store_one(srv.plain_port, "FILLER", p)[0] == SUCCESS
        srv.stop()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


MEMORY_BUDGET_KIB = 300 * 1024


def test_memory_bound_huge_declared_lengths(make_server, tmp_path):
    srv = make_server()
    srv.device_add("HUGE", transport="plain", allow="echo,store")
    files = []
    for declared in (0xFFFFFFF0, 0x7FFFFFF0, 0x40000000):
        uid = generate_uid()
        p = tmp_path / f"huge-{declared:x}.dcm"
        meta = helpers.file_meta_for(helpers.SECONDARY_CAPTURE, uid)
        p.write_bytes(helpers.part10(meta, helpers.huge_length_dataset(uid, declared)))
        files.append((uid, p))
    for uid, p in files:
        try:
            st, _ = helpers.store_one(srv.plain_port, "HUGE", p)
        except Exception:
            st = "aborted"
        assert st in (CANNOT_UNDERSTAND, DATASET_MISMATCH, "aborted"), st
        assert helpers.vm_hwm_kib(srv.pid) < MEMORY_BUDGET_KIB
    # the same via import (the CLI process) while serve runs, plus the
    # 674-byte corpus file known to drive dicom-object to 3.6 GB
    un_seq = corpus.corpus_root() / "pydicom" / "test_files" / "UN_sequence.dcm"
    paths = [p for _, p in files] + ([un_seq] if un_seq.exists() else [])
    proc = subprocess.Popen([str(srv.bin), "import", "--data", str(srv.data), *map(str, paths)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            peak = max(peak, helpers.vm_hwm_kib(proc.pid))
        except (FileNotFoundError, ProcessLookupError, AssertionError):
            pass
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
        pytest.fail("import of crafted files did not finish within 120 s")
    out = proc.stdout.read().decode(errors="replace")
    assert proc.returncode == 1, out
    assert "rejected: " in out
    assert peak < MEMORY_BUDGET_KIB, f"import peak RSS {peak} KiB"
    assert helpers.vm_hwm_kib(srv.pid) < MEMORY_BUDGET_KIB
    for uid, _ in files:
        assert srv.instance_get(uid, check=False) is None
    assert srv.echo("HUGE", tls=False) == SUCCESS


def test_a_reused_series_uid_cannot_move_another_patients_images(make_server, tmp_path):
    """An upload that reuses a stored Series Instance UID under a new study
    and patient is refused (it once re-homed the series: the original study
    vanished from study list, study show and QIDO-RS); the same through
    STOW-RS is a FailedSOPSequence item 0xA900 with the reason."""
    import pydicom
    from pydicom.uid import generate_uid

    import corpus
    from test_dicomweb import new_token, request

    srv = make_server(plain=False)
    ct = corpus.corpus_root() / "pydicom" / "test_files" / "CT_small.dcm"
    code, summary, _, _ = srv.import_(ct)
    assert code == 0 and summary["stored"] == 1
    ds = pydicom.dcmread(ct)
    study = str(ds.StudyInstanceUID)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.PatientID = "OTHERPAT"
    reparent = tmp_path / "reparent.dcm"
    ds.save_as(reparent, enforce_file_format=True)

    code, summary, rejected, out = srv.import_(reparent)
    assert code == 1 and summary["rejected"] == 1, out
    assert "series stored under another study" in rejected[0][1], rejected
    shown = srv.cli("study", "show", study, check=False)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert [e for e in srv.events() if e.get("type") == "security.hierarchy_mismatch"]

    tech = new_token(srv, "reuser", "technologist")
    b = "reuseboundary0123"
    body = (f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode() + reparent.read_bytes()
            + f"\r\n--{b}--\r\n".encode())
    status, _, doc = request(srv, "POST", "/dicomweb/studies", tech,
                             {"Content-Type": f'multipart/related; type="application/dicom"; boundary={b}',
                              "Accept": "application/dicom+json"}, body)
    import json
    doc = json.loads(doc)
    assert status == 409, doc
    item = doc["00081198"]["Value"][0]
    assert item["00081197"]["Value"] == [0xA900]
    assert item["00000902"]["Value"][0].startswith("series stored under another study"), item
    listed = json.loads(srv.cli("study", "list", "--json").stdout)
    assert [s["study_instance_uid"] for s in listed] == [study]
