#!/usr/bin/env python3
"""Query/Retrieve benchmark (not a test): `bastion serve` (DICOM over TLS) vs
Orthanc 1.10 (Debian package, plain DICOM, inside a network namespace that
only has loopback), same data, same client code, alternating, one run.

Measures 200 STUDY-level C-FIND queries each by exact PatientID, PatientName
wildcard and StudyDate range (median / p95 per request-response cycle, one
association per block of queries, every answer checked against the expected
studies), C-GET and C-MOVE of one 100-instance study, and prints a markdown
table with the ratios Bastion/Orthanc of issue 3. See bench/README.md.

The same file is the measuring client: `query.py worker SPEC OUT` runs one
series (find / findscu / get / move / echo / orthanc-stats) and writes JSON,
so that the Orthanc side can run it with `ip netns exec`.

With `--engines embedded,scaleout` Bastion runs twice on the same data: on its
embedded default and with its index on PostgreSQL and its blobs on Garage
(bench/engines.py); the C-FIND and C-GET series then also print the paired
ratios scale-out/embedded. `--no-orthanc` leaves Orthanc out (no root needed),
`--studies N` a smaller data set.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import fnmatch
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TCP_NODELAY="1")
sys.path.insert(0, str(REPO / "bench"))
from engines import ScaleOut, parse_engines  # noqa: E402

N_INSTANCES, N_STUDIES, N_PATIENTS, RETRIEVE_N = 10_000, 1_000, 200, 100
DATA_VERSION = 1  # bump when the generated set changes
FAMILIES = ["DOE", "SMITH", "JONES", "BROWN", "MILLER", "DAVIS", "GARCIA", "WILSON", "TAYLOR",
            "MARTIN", "LEE", "WALKER", "HALL", "ALLEN", "YOUNG", "KING", "WRIGHT", "SCOTT",
            "GREEN", "BAKER"]
GIVENS = ["JOHN", "JANE", "JAMES", "JULIA", "JACK", "MARY", "MARK", "MARTHA", "PETER", "PAULA",
          "ANNA", "ALEX", "SARAH", "SAM", "LUCY", "LIAM", "EMMA", "ERIC", "OLIVIA", "OSCAR",
          "DAVID", "DIANA", "HENRY", "HELEN", "TOM", "TINA"]
MODALITIES = ["CT", "MR", "CR", "US", "PT", "DX"]
FIRST_DAY = datetime.date(2015, 1, 1)
N_DAYS = 3653  # 2015-01-01 .. 2024-12-31
QTYPES = [("PatientID", "exact PatientID"), ("PatientName", "PatientName wildcard"),
          ("StudyDate", "StudyDate range")]
RETURN_KEYS = ["StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "StudyTime",
               "AccessionNumber", "StudyDescription", "ModalitiesInStudy",
               "NumberOfStudyRelatedInstances"]
PENDING = (0xFF00, 0xFF01)
NOT_IMPLEMENTED = (0x0211, 0x0124)  # unrecognized operation; refused: not authorized


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------

def generate(out: Path, corpus: Path, seed: int) -> dict:
    """10,000 CT instances in 1,000 studies of 200 patients under out/instances,
    described by out/manifest.json; reused when complete."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    manifest_path, inst_dir = out / "manifest.json", out / "instances"
    if manifest_path.exists():
        m = json.loads(manifest_path.read_text())
        if (m.get("version") == DATA_VERSION and len(m["studies"]) == N_STUDIES
                and sum(1 for _ in inst_dir.rglob("*.dcm")) == m["instances"]):
            return m
    log(f"generating {N_INSTANCES} instances into {inst_dir} ...")
    shutil.rmtree(out, ignore_errors=True)
    inst_dir.mkdir(parents=True)
    rng = random.Random(seed)
    pairs = rng.sample([(f, g) for f in FAMILIES for g in GIVENS], N_PATIENTS)
    patients = [{"id": f"BQR{i:05d}", "name": f"{f}^{g}",
                 "sex": rng.choice("MF"),
                 "birth": (datetime.date(1930, 1, 1)
                           + datetime.timedelta(days=rng.randrange(30000))).strftime("%Y%m%d")}
                for i, (f, g) in enumerate(pairs)]
    # study sizes: the retrieval study has exactly 100, the others 9 or 10 (sum 10,000)
    rest = N_INSTANCES - RETRIEVE_N
    n_big = rest - 9 * (N_STUDIES - 1)  # studies with 10 instances
    sizes = [10] * n_big + [9] * (N_STUDIES - 1 - n_big)
    rng.shuffle(sizes)
    sizes = [RETRIEVE_N] + sizes
    owners = [i % N_PATIENTS for i in range(N_STUDIES)]  # 5 studies per patient
    rng.shuffle(owners)
    studies = []
    for s, (n, p) in enumerate(zip(sizes, owners)):
        date = FIRST_DAY + datetime.timedelta(days=rng.randrange(N_DAYS))
        n_series = 1 if n < 10 else 2
        studies.append({"uid": generate_uid(), "patient": p, "n": n,
                        "date": date.strftime("%Y%m%d"),
                        "time": f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}00",
                        "modality": rng.choice(MODALITIES),
                        "accession": f"ACC{s:07d}",
                        "series": [generate_uid() for _ in range(n_series)],
                        "frame": generate_uid()})
    src = pydicom.dcmread(str(corpus / "pydicom" / "test_files" / "CT_small.dcm"))
    for kw in ("OtherPatientIDsSequence", "ImageComments", "AdditionalPatientHistory"):
        if kw in src:
            delattr(src, kw)
    small_px, rows_src, cols = src.PixelData, src.Rows, src.Columns
    # the retrieval study: 512 x 512 x 16 bit (512 KiB) images, the source tiled
    big_px = b"".join(small_px[r * cols * 2:(r + 1) * cols * 2] * 4 for r in range(rows_src)) * 4
    src.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = src  # mutated in place: every varying attribute is set for every instance
    k = 0
    for s_idx, st in enumerate(studies):
        pat = patients[st["patient"]]
        big = s_idx == 0
        ds.Rows, ds.Columns = (512, 512) if big else (rows_src, cols)
        ds.PixelData = big_px if big else small_px
        ds.PatientName, ds.PatientID = pat["name"], pat["id"]
        ds.PatientBirthDate, ds.PatientSex = pat["birth"], pat["sex"]
        ds.StudyInstanceUID, ds.StudyID = st["uid"], str(s_idx + 1)
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = st["date"]
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = st["time"]
        ds.AccessionNumber, ds.Modality = st["accession"], st["modality"]
        ds.StudyDescription = f"BENCH {st['modality']} STUDY {s_idx + 1}"
        ds.FrameOfReferenceUID = st["frame"]
        d = inst_dir / f"{st['patient']:03d}" / f"{s_idx:04d}"
        d.mkdir(parents=True)
        per_series = -(-st["n"] // len(st["series"]))
        for i in range(st["n"]):
            se = i // per_series
            ds.SeriesInstanceUID, ds.SeriesNumber = st["series"][se], se + 1
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = i + 1
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(str(d / f"{i:03d}.dcm"), enforce_file_format=True)
            k += 1
    retrieve_bytes = sum(f.stat().st_size for f in (inst_dir / f"{studies[0]['patient']:03d}"
                                                    / "0000").glob("*.dcm"))
    m = {"version": DATA_VERSION, "instances": k, "patients": patients, "studies": studies,
         "retrieve_study": studies[0]["uid"], "retrieve_dir": f"{studies[0]['patient']:03d}/0000",
         "retrieve_file_bytes": retrieve_bytes}
    manifest_path.write_text(json.dumps(m))
    return m


def build_queries(m: dict, n: int, seed: int) -> dict:
    """{qtype: [{"value": key value, "expected": [study uids]}]}, the same for both servers."""
    rng = random.Random(seed + 1)
    pats, studies = m["patients"], m["studies"]
    by_patient: dict[int, list[str]] = {}
    for st in studies:
        by_patient.setdefault(st["patient"], []).append(st["uid"])
    out = {q: [] for q, _ in QTYPES}
    for _ in range(n):
        p = rng.randrange(len(pats))
        out["PatientID"].append({"value": pats[p]["id"], "expected": sorted(by_patient[p])})
        fam, giv = pats[rng.randrange(len(pats))]["name"].split("^")
        pattern = f"{fam}^{giv[0]}*"
        exp = sorted(st["uid"] for st in studies
                     if fnmatch.fnmatchcase(pats[st["patient"]]["name"], pattern))
        out["PatientName"].append({"value": pattern, "expected": exp})
        lo = FIRST_DAY + datetime.timedelta(days=rng.randrange(N_DAYS - 90))
        hi = lo + datetime.timedelta(days=rng.randint(7, 90))
        lo_s, hi_s = lo.strftime("%Y%m%d"), hi.strftime("%Y%m%d")
        exp = sorted(st["uid"] for st in studies if lo_s <= st["date"] <= hi_s)
        out["StudyDate"].append({"value": f"{lo_s}-{hi_s}", "expected": exp})
    return out


def query_dataset(qtype: str, value: str):
    from pydicom.dataset import Dataset
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for kw in RETURN_KEYS:
        setattr(ds, kw, "")
    setattr(ds, qtype, value)
    return ds


def write_findscu_files(queries: list[dict], qtype: str, d: Path) -> list[str]:
    """Query identifiers as Part 10 files for DCMTK findscu."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for i, q in enumerate(queries):
        ds = query_dataset(qtype, q["value"])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
        meta.MediaStorageSOPInstanceUID = f"2.25.{i + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        p = d / f"q{i:03d}.dcm"
        ds.save_as(str(p), enforce_file_format=True)
        files.append(str(p))
    return files


# --------------------------------------------------------------------------
# Worker: one series against one server (run inside the netns for Orthanc)
# --------------------------------------------------------------------------

def _client_fixes(nodelay: bool) -> None:
    """Two fixes to pynetdicom 3.0.4 as a pure SCU, applied for both servers alike.

    * Its reactor thread takes any complete DIMSE message off the queue whenever
      it is not paused, and `send_c_find` pauses it with a check-then-act race
      (`_is_paused` is read while the reactor is between `wait()` and
      `get_msg()`): under CPU load it steals a pending C-FIND-RSP now and then
      (handled as an unexpected message and dropped), and a correct server looks
      as if it lost a match. Here no request is expected from the peer outside
      the send_c_*() generators (C-GET's C-STOREs are served by the C-GET
      generator), so the reactor never takes messages.
    * It leaves Nagle's algorithm on: its command and dataset PDVs are separate
      small writes, and Nagle + delayed ACK then add ~40 ms to every C-FIND on
      loopback. TCP_NODELAY=1 does the same for DCMTK (and Orthanc)."""
    import threading

    from pynetdicom.association import Association
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.transport import AssociationSocket
    if not getattr(DIMSEServiceProvider, "_bench_fixed", False):
        get_msg = DIMSEServiceProvider.get_msg

        def only_requestor_gets(self, block=False):
            if not block and isinstance(threading.current_thread(), Association):
                return None, None
            return get_msg(self, block)
        DIMSEServiceProvider.get_msg = only_requestor_gets
        DIMSEServiceProvider._bench_fixed = True
    if nodelay and not getattr(AssociationSocket, "_bench_nodelay", False):
        orig = AssociationSocket._create_socket

        def create(self, address):
            sock = orig(self, address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        AssociationSocket._create_socket = create
        AssociationSocket._bench_nodelay = True


def _ae(spec, contexts):
    from pynetdicom import AE
    _client_fixes(nodelay=not spec.get("nagle"))
    ae = AE(ae_title=spec["calling"])
    t = spec.get("timeout", 30)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = t
    ae.maximum_pdu_size = spec.get("max_pdu", 16382)
    for c in contexts:
        if isinstance(c, tuple):
            ae.add_requested_context(*c)
        else:
            ae.add_requested_context(c)
    return ae


def _associate(spec, ae, **kw):
    tls_args = None
    if spec.get("tls"):
        import ssl
        t = spec["tls"]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=t["ca"])
        ctx.load_cert_chain(certfile=t["crt"], keyfile=t["key"])
        tls_args = (ctx, t.get("server_name", "localhost"))
    return ae.associate(spec["host"], spec["port"], ae_title=spec["called"],
                        tls_args=tls_args, **kw)


def _refusal(assoc) -> str:
    if assoc.is_rejected:
        p = assoc.acceptor.primitive
        return f"association rejected ({p.result}/{p.result_source}/{p.diagnostic})"
    return "association aborted" if assoc.is_aborted else "association failed"


def w_echo(spec):
    from pynetdicom.sop_class import Verification
    deadline = time.monotonic() + spec.get("wait", 60)
    last = ""
    while time.monotonic() < deadline:
        ae = _ae(dict(spec, timeout=5), [Verification])
        try:
            assoc = _associate(spec, ae)
        except Exception as e:  # noqa: BLE001 -- connection refused while starting
            assoc, last = None, str(e)
        if assoc is not None and assoc.is_established:
            st = assoc.send_c_echo()
            assoc.release()
            if st and st.Status == 0:
                return {"ok": True}
            last = f"status {st.Status if st else None}"
        elif assoc is not None:
            last = _refusal(assoc)
        time.sleep(0.5)
    return {"ok": False, "error": last}


def w_find(spec):
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
    ae = _ae(spec, [FIND])
    assoc = _associate(spec, ae)
    if not assoc.is_established:
        return {"error": _refusal(assoc)}
    lat, wrong, errors, matches, examples = [], 0, [], 0, []
    queries = spec["queries"]
    try:
        for i, q in enumerate(queries[:spec["warmup"]] + queries):
            ds = query_dataset(spec["qtype"], q["value"])
            uids, final, missing = [], None, set()
            t0 = time.perf_counter()
            for status, ident in assoc.send_c_find(ds, FIND):
                if not status:  # timeout / abort: pynetdicom yields an empty Dataset
                    final = "no response"
                    break
                if status.Status in PENDING:
                    uids.append(str(ident.get("StudyInstanceUID", "")) if ident else "")
                    if ident is not None:
                        missing |= {kw for kw in RETURN_KEYS if kw not in ident}
                else:
                    final = status.Status
            dt = time.perf_counter() - t0
            if not assoc.is_established:
                errors.append(f"query {i}: association ended (final={final})")
                break
            if i < spec["warmup"]:
                continue
            lat.append(dt)
            matches += len(uids)
            if final != 0:
                errors.append(f"{q['value']!r}: final status "
                              f"{final if isinstance(final, str) else hex(final)}")
            elif sorted(uids) != q["expected"] or missing:
                wrong += 1
                if len(examples) < 5:
                    examples.append({"value": q["value"], "expected": len(q["expected"]),
                                     "got": len(uids), "distinct": len(set(uids)),
                                     "unexpected": len(set(uids) - set(q["expected"])),
                                     "missing": len(set(q["expected"]) - set(uids)),
                                     "missing_return_keys": sorted(missing)})
    finally:
        if assoc.is_established:
            assoc.release()
    return {"lat": lat, "wrong": wrong, "errors": errors[:5], "n_errors": len(errors),
            "matches": matches, "examples": examples}


def w_findscu(spec):
    """DCMTK findscu: all query files over one association, and one file alone;
    (all - one) / (n - 1) is its mean time per query without association setup."""
    def run(files):
        cmd = ["/usr/bin/findscu", "-S", "-aet", spec["calling"], "-aec", spec["called"]]
        if spec.get("tls"):
            t = spec["tls"]
            cmd += ["+tls", t["key"], t["crt"], "-pw", "+cf", t["ca"]]
        cmd += [spec["host"], str(spec["port"]), *files]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, env=ENV, timeout=600)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"findscu rc={p.returncode}: "
                               f"{(p.stdout + p.stderr).decode(errors='replace')[-1500:]}")
        return dt
    files = spec["files"]
    try:
        run(files[:1])  # warm-up (TLS session, caches)
        one = statistics.median(run(files[:1]) for _ in range(3))
        alln = run(files)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}
    return {"mean": (alln - one) / (len(files) - 1), "total": alln, "one": one}


def _retrieve(spec, op):
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import CTImageStorage
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE
    got = {"n": 0, "bytes": 0}

    def on_store(event):
        got["n"] += 1
        got["bytes"] += len(event.request.DataSet.getvalue())
        return 0x0000

    if op == "get":
        ae = _ae(spec, [GET, (CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])])
        assoc = _associate(spec, ae, ext_neg=[build_role(CTImageStorage, scp_role=True)],
                           evt_handlers=[(evt.EVT_C_STORE, on_store)])
        model = GET
    else:
        ae = _ae(spec, [MOVE])
        assoc = _associate(spec, ae)
        model = MOVE
    if not assoc.is_established:
        return {"error": _refusal(assoc), "status_text": _refusal(assoc),
                "not_implemented": assoc.is_rejected}
    if not any(c.abstract_syntax == model and c.result == 0 for c in assoc.accepted_contexts):
        assoc.release()
        return {"error": "presentation context not accepted",
                "status_text": "context not accepted", "not_implemented": True}
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = spec["study"]
    final, counts, comment = None, {}, ""
    try:
        t0 = time.perf_counter()
        rsps = (assoc.send_c_get(ds, model) if op == "get"
                else assoc.send_c_move(ds, spec["destination"], model))
        for status, _ in rsps:
            if not status:
                final = "no response"
                break
            if status.Status not in PENDING:
                final = status.Status
                counts = {k: int(status.get(f"NumberOf{k}Suboperations", -1) or 0)
                          for k in ("Completed", "Failed", "Warning")}
                comment = str(status.get("ErrorComment", ""))
        secs = time.perf_counter() - t0
    finally:
        if assoc.is_established:
            assoc.release()
    out = {"secs": secs, "status": final, "counts": counts, "received": got["n"],
           "bytes": got["bytes"]}
    if final != 0:
        out["status_text"] = final if isinstance(final, str) else f"status 0x{final:04X}"
        out["error"] = f"final {out['status_text']} {counts} {comment}".strip()
        out["not_implemented"] = final in NOT_IMPLEMENTED
    return out


def w_orthanc_stats(spec):
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{spec['http_port']}/statistics")
    tok = base64.b64encode(f"{spec['user']}:{spec['password']}".encode()).decode()
    req.add_header("Authorization", f"Basic {tok}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    op = spec["op"]
    try:
        res = {"echo": w_echo, "find": w_find, "findscu": w_findscu,
               "get": lambda s: _retrieve(s, "get"), "move": lambda s: _retrieve(s, "move"),
               "orthanc-stats": w_orthanc_stats}[op](spec)
    except Exception as e:  # noqa: BLE001 -- reported to the driver, never a crash
        res = {"error": f"{type(e).__name__}: {e}"}
    Path(out_path).write_text(json.dumps(res))


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

class Bench:
    def __init__(self, args, work: Path):
        self.args, self.work, self.n = args, work, 0
        self.procs: list[subprocess.Popen] = []
        self.netns_made = False

    # -- helpers ----------------------------------------------------------
    def netns(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.args.netns, *cmd]

    def run_worker(self, spec: dict, in_netns: bool, timeout: float) -> dict:
        if self.args.client == "rust" and spec["op"] in ("find", "get", "move"):
            return self.run_rust_client(spec, in_netns, timeout)
        self.n += 1
        sp, op = self.work / f"spec-{self.n}.json", self.work / f"out-{self.n}.json"
        sp.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "worker", str(sp), str(op)]
        if in_netns:
            cmd = self.netns(["env", "TCP_NODELAY=1", *cmd])
        try:
            p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=ENV)
        except subprocess.TimeoutExpired:
            return {"error": f"worker {spec['op']} timed out after {timeout} s"}
        if not op.exists():
            return {"error": f"worker {spec['op']} rc={p.returncode}: "
                             f"{p.stderr.decode(errors='replace')[-2000:]}"}
        return json.loads(op.read_text())

    def run_rust_client(self, spec: dict, in_netns: bool, timeout: float) -> dict:
        """bench/client (Rust, dicom-ul): the same spec, results in the Python worker's shape."""
        self.n += 1
        sp, op = self.work / f"spec-{self.n}.json", self.work / f"out-{self.n}.json"
        sp.write_text(json.dumps(spec))
        cmd = [str(self.args.client_bin), str(sp), str(op)]
        if in_netns:
            cmd = self.netns(["env", "TCP_NODELAY=1", *cmd])
        try:
            p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=ENV)
        except subprocess.TimeoutExpired:
            return {"error": f"bench-client {spec['op']} timed out after {timeout} s"}
        if not op.exists():
            return {"error": f"bench-client {spec['op']} rc={p.returncode}: "
                             f"{p.stderr.decode(errors='replace')[-2000:]}"}
        r = json.loads(op.read_text())
        if "error" in r or spec["op"] != "find":
            if spec["op"] != "find" and "error" not in r and r["status"] != 0:
                st = r["status"]
                r["status_text"] = f"status 0x{st:04X}"
                r["error"] = f"final {r['status_text']} {r['counts']} {r.get('comment', '')}".strip()
                r["not_implemented"] = st in NOT_IMPLEMENTED
            return r
        lat, wrong, errors, matches, examples = [], 0, [], 0, []
        for q, res in zip(spec["queries"], r["results"]):
            lat.append(res["secs"])
            uids = res["uids"]
            matches += len(uids)
            if res["status"] != 0:
                errors.append(f"{q['value']!r}: final status {res['status']:#06x}")
            elif sorted(uids) != q["expected"] or res["missing"]:
                wrong += 1
                if len(examples) < 5:
                    examples.append({"value": q["value"], "expected": len(q["expected"]),
                                     "got": len(uids), "distinct": len(set(uids)),
                                     "unexpected": len(set(uids) - set(q["expected"])),
                                     "missing": len(set(q["expected"]) - set(uids)),
                                     "missing_return_keys": sorted(res["missing"])})
        return {"lat": lat, "wrong": wrong, "errors": errors[:5], "n_errors": len(errors),
                "matches": matches, "examples": examples}

    def start(self, cmd, logname, in_netns=False, env=None) -> subprocess.Popen:
        logf = open(self.work / logname, "ab")
        if in_netns:
            cmd = self.netns(cmd)  # `ip netns exec` execs: the pid is the server's
        p = subprocess.Popen(cmd, stdout=logf, stderr=logf, env=env or ENV,
                             start_new_session=True)
        logf.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        if p in self.procs:
            self.procs.remove(p)

    def cleanup(self) -> None:
        for p in list(self.procs):
            try:
                self.stop(p)
            except Exception:  # noqa: BLE001
                pass
        if self.netns_made:
            subprocess.run(["ip", "netns", "del", self.args.netns], timeout=30,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # -- Bastion ----------------------------------------------------------
    def setup_bastion(self, inst_dir: Path, name: str = "bastion",
                      scaleout: ScaleOut | None = None) -> dict:
        """A loaded `bastion serve`: `name` "bastion" on the embedded default
        (its attributes b_* are what dicomweb.py reads), or any other name
        with `scaleout` (index on PostgreSQL, blobs on Garage)."""
        b = self.args.bin
        data = self.work / ("bastion-data" if name == "bastion" else f"{name}-data")
        env = scaleout.process_env(ENV) if scaleout else ENV

        def cli(*a, timeout=300):
            p = subprocess.run([b, *a, "--data", str(data)], capture_output=True,
                               timeout=timeout, env=env)
            if p.returncode != 0:
                raise SystemExit(f"bastion {a[0]} ({name}) failed: "
                                 f"{p.stderr.decode(errors='replace')[-2000:]}")
            return p
        cli("init", *(scaleout.init_args() if scaleout else []))
        self.b_dest_port = free_port()
        cli("device", "add", "--ae", "BENCH", "--network", "127.0.0.1/32", "--transport", "tls",
            "--allow", "echo,find,get,move", "--host", "127.0.0.1",
            "--port", str(self.b_dest_port))
        # BENCHP: the same client over Bastion's plain listener, moving to a plain
        # storescp: the transport Orthanc uses, for a like-for-like row.
        self.b_dest_port_plain = free_port()
        cli("device", "add", "--ae", "BENCHP", "--network", "127.0.0.1/32", "--transport",
            "plain", "--allow", "echo,get,move", "--host", "127.0.0.1",
            "--port", str(self.b_dest_port_plain))
        certs = self.work / ("bench-cert" if name == "bastion" else f"{name}-cert")
        cli("cert", "issue", "--ae", "BENCH", "--out", str(certs))
        t0 = time.monotonic()
        p = subprocess.run([b, "import", "--data", str(data), str(inst_dir)], capture_output=True,
                           timeout=3600, env=env)
        load = time.monotonic() - t0
        summary = p.stdout.decode(errors="replace").strip().splitlines()[-4:]
        if p.returncode != 0:
            raise SystemExit(f"bastion import failed: {p.stderr.decode(errors='replace')[-2000:]}")
        log(f"bastion import ({name}): {load:.1f} s ({' '.join(summary)})")
        if scaleout:
            size = scaleout.schema_bytes(scaleout.schemas[-1])
        else:
            size = sum(f.stat().st_size for f in data.glob("index.db*"))
        self.index_bytes = getattr(self, "index_bytes", {})
        self.index_bytes[name] = size
        port, plain_port, self.b_http_port = free_port(), free_port(), free_port()
        self.b_proc = self.start([b, "serve", "--data", str(data), "--dicom-addr",
                                  f"127.0.0.1:{port}", "--dicom-plain-addr",
                                  f"127.0.0.1:{plain_port}", "--http-addr",
                                  f"127.0.0.1:{self.b_http_port}"], f"{name}.log",
                                 **({"env": env} if scaleout else {}))
        self.b_certs = certs
        spec = {"host": "127.0.0.1", "port": port, "calling": "BENCH", "called": "BASTION",
                "max_pdu": self.args.max_pdu, "nagle": self.args.nagle,
                "tls": {"ca": str(certs / "ca.crt"), "crt": str(certs / "client.crt"),
                        "key": str(certs / "client.key"), "server_name": "localhost"}}
        r = self.run_worker(dict(spec, op="echo", wait=60), False, 90)
        if not r.get("ok"):
            raise SystemExit(f"bastion ({name}) does not answer C-ECHO: {r}")
        self.loads = getattr(self, "loads", {})
        self.loads[name] = load
        self.b_plain_spec = {"host": "127.0.0.1", "port": plain_port, "calling": "BENCHP",
                             "called": "BASTION", "max_pdu": self.args.max_pdu,
                             "nagle": self.args.nagle}
        self.bastions = getattr(self, "bastions", {})
        self.bastions[name] = {"proc": self.b_proc, "certs": certs, "dest_port": self.b_dest_port,
                               "dest_port_plain": self.b_dest_port_plain,
                               "plain_spec": self.b_plain_spec}
        return spec

    # -- Orthanc ----------------------------------------------------------
    def setup_orthanc(self, inst_dir: Path) -> dict:
        ns = self.args.netns
        subprocess.run(["ip", "netns", "del", ns], timeout=30, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)  # a leftover of an interrupted run
        subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
        self.netns_made = True
        subprocess.run(self.netns(["ip", "link", "set", "lo", "up"]), check=True, timeout=30)
        d = self.work / "orthanc"
        (d / "storage").mkdir(parents=True)
        dicom_port, http_port, self.o_dest_port = 4242, 8042, 4243  # inside the netns
        self.o_auth = {"user": "bench", "password": secrets.token_urlsafe(18)}
        cfg = {
            "Name": "bastion-bench",
            "StorageDirectory": str(d / "storage"), "IndexDirectory": str(d / "storage"),
            "StorageCompression": False, "Plugins": [],
            "HttpServerEnabled": True, "HttpPort": http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.o_auth["user"]: self.o_auth["password"]},
            "DicomServerEnabled": True, "DicomAet": "ORTHANC", "DicomPort": dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": False, "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomModalities": {"bench": ["BENCH", "127.0.0.1", self.o_dest_port]},
            "StorageAccessOnFind": self.args.orthanc_storage_access,
            "SaveJobs": False, "LimitFindResults": 0, "LimitFindInstances": 0,
        }
        (d / "orthanc.json").write_text(json.dumps(cfg, indent=1))
        self.o_proc = self.start(["/usr/sbin/Orthanc", str(d / "orthanc.json")], "orthanc.log",
                                 in_netns=True)
        spec = {"host": "127.0.0.1", "port": dicom_port, "calling": "BENCH", "called": "ORTHANC",
                "max_pdu": self.args.max_pdu, "nagle": self.args.nagle}
        r = self.run_worker(dict(spec, op="echo", wait=60), True, 90)
        if not r.get("ok"):
            raise SystemExit(f"Orthanc does not answer C-ECHO: {r}; see {self.work}/orthanc.log")
        # load: DCMTK storescu, 2 associations in parallel (2 cores)
        dirs = sorted(p for p in inst_dir.iterdir() if p.is_dir())
        halves = [dirs[0::2], dirs[1::2]]
        t0 = time.monotonic()
        ps = [subprocess.Popen(self.netns(["/usr/bin/storescu", "-aet", "BENCH", "-aec",
                                           "ORTHANC", "+sd", "+r", "127.0.0.1", str(dicom_port),
                                           *map(str, h)]),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
              for h in halves]
        for p in ps:
            out, _ = p.communicate(timeout=3600)
            if p.returncode != 0:
                raise SystemExit(f"storescu to Orthanc failed:\n"
                                 f"{out.decode(errors='replace')[-2000:]}")
        load = time.monotonic() - t0
        st = self.run_worker({"op": "orthanc-stats", "http_port": http_port, **self.o_auth},
                             True, 60)
        log(f"orthanc load (storescu x2): {load:.1f} s, {st.get('CountInstances')} instances, "
            f"{st.get('CountStudies')} studies")
        if st.get("CountInstances") != N_INSTANCES:
            raise SystemExit(f"Orthanc holds {st} instead of {N_INSTANCES} instances")
        self.loads = getattr(self, "loads", {})
        self.loads["orthanc"] = load
        return spec

    # -- measurements -----------------------------------------------------
    def cpu_ms(self, server: str) -> float:
        if server == "orthanc":
            pid = self.o_proc.pid
        else:  # "bastion-plain" is the "bastion" process
            pid = self.bastions[server.removesuffix("-plain")]["proc"].pid
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) * 1000.0 / os.sysconf("SC_CLK_TCK")

    def start_dest(self, server: str, out: Path) -> subprocess.Popen:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        # +B: files written as received, so that the destination's own parsing is
        # not what is measured (--dest-parse turns it off).
        bp = [] if self.args.dest_parse else ["+B"]
        bastions = getattr(self, "bastions", {})
        if server in bastions:  # Bastion connects with TLS (device transport tls), our CA
            c = bastions[server]["certs"]
            cmd = ["/usr/bin/storescp", "-aet", "BENCH", "+tls", str(c / "client.key"),
                   str(c / "client.crt"), "-pw", "+cf", str(c / "ca.crt"), *bp, "-od", str(out),
                   str(bastions[server]["dest_port"])]
            p = self.start(cmd, f"storescp-{server}.log")
        elif server == "bastion-plain":
            cmd = ["/usr/bin/storescp", "-aet", "BENCHP", *bp, "-od", str(out),
                   str(bastions["bastion"]["dest_port_plain"])]
            p = self.start(cmd, "storescp-bastion-plain.log")
        else:
            cmd = ["/usr/bin/storescp", "-aet", "BENCH", *bp, "-od", str(out),
                   str(self.o_dest_port)]
            p = self.start(cmd, "storescp-orthanc.log", in_netns=True)
        port = ({n: b["dest_port"] for n, b in bastions.items()}
                | {"bastion-plain": bastions.get("bastion", {}).get("dest_port_plain"),
                   "orthanc": getattr(self, "o_dest_port", None)})[server]
        if server != "orthanc":
            wait_port(port, 20, p)
        else:  # probe inside the netns
            for _ in range(100):
                r = subprocess.run(self.netns([sys.executable, "-c",
                                   f"import socket; socket.create_connection(('127.0.0.1',{port}),1)"]),
                                   capture_output=True, timeout=10)
                if r.returncode == 0:
                    break
                time.sleep(0.1)
        return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} not listening after {timeout} s")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


def fmt_ratio(b, o, target: str | None = None) -> str:
    if b is None or o is None or o == 0:
        return "n/a"
    return f"{b / o:.2f}"


def main() -> None:
    global N_INSTANCES, N_STUDIES, N_PATIENTS  # --studies
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "bastion"))
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    ap.add_argument("--corpus", default=os.environ.get("BASTION_CORPUS",
                                                        str(REPO / ".cache" / "corpus")))
    ap.add_argument("--queries", type=int, default=200, help="C-FIND queries per type and server")
    ap.add_argument("--blocks", type=int, default=2,
                    help="associations per query type and server (queries split, alternating)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed queries per association")
    ap.add_argument("--rounds", type=int, default=3, help="C-GET and C-MOVE rounds per server")
    ap.add_argument("--max-pdu", type=int, default=16382,
                    help="maximum PDU the measuring client announces (pynetdicom default)")
    ap.add_argument("--nagle", action="store_true",
                    help="leave Nagle's algorithm on in the pynetdicom client (pynetdicom's "
                         "default; adds ~40 ms per C-FIND on loopback)")
    ap.add_argument("--client", choices=["rust", "pynetdicom"], default="rust",
                    help="measuring client for C-FIND/C-GET/C-MOVE: bench/client (Rust, "
                         "dicom-ul; default) or the pynetdicom worker")
    ap.add_argument("--client-bin", default=str(REPO / "target" / "release" / "bench-client"))
    ap.add_argument("--dest-parse", action="store_true",
                    help="C-MOVE destination storescp parses and re-encodes each file "
                         "(default: +B, written as received)")
    ap.add_argument("--netns", default="bastion-bench")
    ap.add_argument("--orthanc-storage-access", default="Always",
                    help="Orthanc StorageAccessOnFind (Always is its default)")
    ap.add_argument("--no-findscu", action="store_true", help="skip the DCMTK findscu cross-check")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--engines", default="embedded",
                    help="Bastion engines, comma-separated: embedded and/or scaleout (index on "
                         "PostgreSQL, blobs on Garage; bench/engines.py). Default: embedded")
    ap.add_argument("--no-orthanc", action="store_true",
                    help="leave Orthanc out (no network namespace, no root needed)")
    ap.add_argument("--studies", type=int, default=N_STUDIES,
                    help="studies in the data set (10 instances each, 5 per patient; "
                         f"100..2600, default {N_STUDIES}); the data lives in out/qr "
                         "(out/qr-N for another N)")
    args = ap.parse_args()
    engines = parse_engines(args.engines)
    if not args.no_orthanc and os.geteuid() != 0:
        raise SystemExit("needs root (ip netns); --no-orthanc runs without Orthanc")
    if not 100 <= args.studies <= 2600:
        raise SystemExit("--studies: 100..2600")
    N_STUDIES, N_INSTANCES, N_PATIENTS = args.studies, 10 * args.studies, args.studies // 5
    qr = Path(args.out) / ("qr" if args.studies == 1000 else f"qr-{args.studies}")
    m = generate(qr, Path(args.corpus), args.seed)
    inst_dir = qr / "instances"
    qs = build_queries(m, args.queries, args.seed)
    rbytes = m["retrieve_file_bytes"]
    log(f"data: {m['instances']} instances, {len(m['studies'])} studies, "
        f"{len(m['patients'])} patients; retrieval study {RETRIEVE_N} instances, "
        f"{rbytes / 2**20:.1f} MiB of files")

    def _term(signum, frame):
        raise SystemExit(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)

    tmp = tempfile.mkdtemp(prefix="qr-run-", dir=args.out)
    work = Path(tmp)
    bench = Bench(args, work)
    res: dict = {}
    so = None
    try:
        specs = {}
        if "embedded" in engines:
            specs["bastion"] = bench.setup_bastion(inst_dir)
            specs["bastion-plain"] = bench.b_plain_spec
        if "scaleout" in engines:
            so = ScaleOut(work).start()
            log(f"scale-out engines: {', '.join(so.started) or 'from the environment'}")
            specs["scaleout"] = bench.setup_bastion(inst_dir, "scaleout", so)
        if not args.no_orthanc:
            specs["orthanc"] = bench.setup_orthanc(inst_dir)
        in_ns = {"bastion": False, "bastion-plain": False, "scaleout": False, "orthanc": True}
        # the servers measured by C-FIND (TLS Bastions and Orthanc), and by C-GET/C-MOVE
        finders = [s for s in ("bastion", "scaleout", "orthanc") if s in specs]
        retrievers = [s for s in ("bastion", "scaleout", "orthanc", "bastion-plain")
                      if s in specs]
        retr_order = [retrievers[i:] + retrievers[:i] for i in range(len(retrievers))]

        # C-FIND, pynetdicom: per type, `blocks` associations per server, alternating
        for ti, (qt, label) in enumerate(QTYPES):
            for b in range(args.blocks):
                order = finders if (ti + b) % 2 == 0 else finders[::-1]
                for srv in order:
                    spec = dict(specs[srv], op="find", qtype=qt, warmup=args.warmup,
                                queries=qs[qt][b::args.blocks])
                    c0 = bench.cpu_ms(srv)
                    e0 = so.components_cpu_ms() if so and srv == "scaleout" else None
                    r = bench.run_worker(spec, in_ns[srv], 900)
                    r["cpu_ms"] = bench.cpu_ms(srv) - c0
                    e1 = so.components_cpu_ms() if e0 else None
                    acc = res.setdefault(("find", qt, srv), {"lat": [], "wrong": 0, "errors": [],
                                                             "n_errors": 0, "matches": 0,
                                                             "examples": [], "cpu_ms": 0.0,
                                                             "n": 0})
                    if "lat" not in r:
                        acc["errors"].append(r.get("error"))
                        acc["n_errors"] += 1
                        log(f"C-FIND {label} {srv}: {r.get('error')}")
                        continue
                    for k in ("lat", "errors", "examples"):
                        acc[k] += r[k]
                    for k in ("wrong", "n_errors", "matches"):
                        acc[k] += r[k]
                    acc["cpu_ms"] += r["cpu_ms"]
                    if e0 and e1:  # PostgreSQL, Garage
                        acc["pg_cpu_ms"] = acc.get("pg_cpu_ms", 0.0) + e1[0] - e0[0]
                    acc["n"] += len(r["lat"]) + args.warmup
                    lat = r["lat"]
                    log(f"C-FIND {label:21s} {srv:8s} block {b + 1}: "
                        f"median {statistics.median(lat) * 1e3:.2f} ms, "
                        f"p95 {pct(lat, 95) * 1e3:.2f} ms, wrong {r['wrong']}, "
                        f"errors {r['n_errors']}" if lat else f"C-FIND {srv}: no latencies {r}")

        # C-FIND, DCMTK findscu (C client, less client overhead): mean per query
        if not args.no_findscu:
            for ti, (qt, label) in enumerate(QTYPES):
                files = write_findscu_files(qs[qt], qt, work / f"findscu-{qt}")
                order = finders if ti % 2 == 0 else finders[::-1]
                for srv in order:
                    r = bench.run_worker(dict(specs[srv], op="findscu", files=files),
                                         in_ns[srv], 900)
                    res[("findscu", qt, srv)] = r
                    log(f"findscu {label:21s} {srv:8s}: "
                        + (f"{r['mean'] * 1e3:.2f} ms/query" if "mean" in r else r["error"]))

        # C-GET of the 100-instance study
        for rnd in range(args.rounds):
            for srv in retr_order[rnd % len(retr_order)]:
                r = bench.run_worker(dict(specs[srv], op="get", study=m["retrieve_study"]),
                                     in_ns[srv], 600)
                res.setdefault(("get", srv), []).append(r)
                log(f"C-GET  round {rnd + 1} {srv:13s}: " + (
                    f"{r['secs']:.3f} s, {r['received']} instances, "
                    f"{r['bytes'] / 2**20 / r['secs']:.1f} MiB/s" if "error" not in r
                    else r["error"]))

        # C-MOVE of the study to DCMTK storescp (AE BENCH; BENCHP for Bastion in plain)
        for rnd in range(args.rounds):
            for srv in retr_order[rnd % len(retr_order)]:
                dest_dir = work / f"move-{srv}"
                dest = bench.start_dest(srv, dest_dir)
                try:
                    r = bench.run_worker(dict(specs[srv], op="move", study=m["retrieve_study"],
                                              destination=specs[srv]["calling"]), in_ns[srv], 600)
                finally:
                    time.sleep(0.2)
                    bench.stop(dest)
                files = list(dest_dir.glob("*"))
                r["dest_files"] = len(files)
                r["dest_bytes"] = sum(f.stat().st_size for f in files)
                if "error" not in r and r["dest_files"] != RETRIEVE_N:
                    r["error"] = f"destination received {r['dest_files']} files"
                res.setdefault(("move", srv), []).append(r)
                log(f"C-MOVE round {rnd + 1} {srv:13s}: " + (
                    f"{r['secs']:.3f} s, {r['dest_files']} files at the destination"
                    if "error" not in r else r["error"]))
                shutil.rmtree(dest_dir, ignore_errors=True)
    finally:
        bench.cleanup()
        if so:
            so.stop()
    if "orthanc" in specs and "bastion" in specs:
        report(res, m, args, bench)
    if "scaleout" in specs:
        report_engines(res, m, args, bench, specs)
    shutil.rmtree(work, ignore_errors=True)


def report_engines(res: dict, m: dict, args, bench: Bench, specs: dict) -> None:
    """Bastion scale-out (PostgreSQL + Garage) against the embedded default:
    medians, and the paired median ratio scale-out/embedded (per query: the
    same query, the same block, the two servers one after the other)."""
    mib = m["retrieve_file_bytes"] / 2**20
    cols = [s for s in ("bastion", "scaleout") if s in specs]
    names = {"bastion": "embedded (SQLCipher + files)", "scaleout": "scale-out (PostgreSQL + Garage)"}
    print()
    print(f"Data: {m['instances']} instances, {len(m['studies'])} studies, "
          f"{len(m['patients'])} patients. Load (bastion import): "
          + ", ".join(f"{names[c]} {bench.loads.get(c, 0):.1f} s "
                      f"({m['instances'] / max(bench.loads.get(c, 0), 1e-9):.0f} inst/s)"
                      for c in cols)
          + ". Index size on disk after the load: "
          + ", ".join(f"{names[c]} "
                      + (f"{bench.index_bytes[c] / 2**20:.1f} MiB"
                         if bench.index_bytes.get(c) is not None else "n/a") for c in cols)
          + f". Client: {args.client}, TLS for both.")
    print()
    print("| measurement | " + " | ".join(f"Bastion {names[c]}" for c in cols)
          + " | ratio scale-out/embedded (of medians) | paired median ratio | target |")
    print("|---" * (len(cols) + 4) + "|")

    def lat(c, qt):
        a = res.get(("find", qt, c))
        return a["lat"] if a and a["lat"] else []
    for qt, label in QTYPES:
        med = {c: statistics.median(lat(c, qt)) * 1e3 if lat(c, qt) else None for c in cols}
        p95 = {c: pct(lat(c, qt), 95) * 1e3 if lat(c, qt) else None for c in cols}
        le, ls = lat("bastion", qt), lat("scaleout", qt)
        paired = (f"**{statistics.median(s_ / e for e, s_ in zip(le, ls) if e > 0):.2f}**"
                  if le and len(le) == len(ls) else "n/a")
        f = (lambda v: "n/a" if v is None else f"{v:.2f}")
        print(f"| C-FIND {label}: median ms ({len(ls)} queries) | "
              + " | ".join(f(med[c]) for c in cols)
              + f" | {fmt_ratio(med.get('scaleout'), med.get('bastion'))} | {paired} | ≤ 2 |")
        print(f"| C-FIND {label}: p95 ms | " + " | ".join(f(p95[c]) for c in cols)
              + f" | {fmt_ratio(p95.get('scaleout'), p95.get('bastion'))} | | |")
        cpu = {}
        chk = {}
        for c in cols:
            a = res.get(("find", qt, c))
            cpu[c] = a["cpu_ms"] / a["n"] if a and a["n"] else None
            chk[c] = (f"{a['matches'] / max(1, len(a['lat'])):.1f} matches/query, "
                      f"{a['wrong']} wrong, {a['n_errors']} errors") if a else "n/a"
        print(f"| C-FIND {label}: Bastion CPU ms/query | " + " | ".join(f(cpu[c]) for c in cols)
              + f" | {fmt_ratio(cpu.get('scaleout'), cpu.get('bastion'))} | | |")
        a = res.get(("find", qt, "scaleout"))
        if a and "pg_cpu_ms" in a and a["n"]:
            print(f"| C-FIND {label}: PostgreSQL CPU ms/query | "
                  + " | ".join("" if c != "scaleout" else f(a["pg_cpu_ms"] / a["n"]) for c in cols)
                  + " | | | |")
        print(f"| C-FIND {label}: answers checked | " + " | ".join(chk[c] for c in cols)
              + " | | | all right |")
    for op, label in (("get", "C-GET"), ("move", "C-MOVE")):
        vals = {}
        for c in cols:
            rs = res.get((op, c), [])
            ok = [r for r in rs if "error" not in r]
            vals[c] = statistics.median(r["secs"] for r in ok) if ok and len(ok) == len(rs) else None
        paired = "n/a"
        re_, rs_ = res.get((op, "bastion"), []), res.get((op, "scaleout"), [])
        if re_ and len(re_) == len(rs_) and all("error" not in r for r in re_ + rs_):
            paired = f"{statistics.median(s_['secs'] / e['secs'] for e, s_ in zip(re_, rs_)):.2f}"
        cells = " | ".join("n/a" if vals[c] is None else f"{vals[c]:.3f} s, {mib / vals[c]:.0f} MiB/s"
                           for c in cols)
        print(f"| {label} of the {RETRIEVE_N}-instance study over TLS (median of {args.rounds}) | "
              f"{cells} | {fmt_ratio(vals.get('scaleout'), vals.get('bastion'))} (time) "
              f"| {paired} (time) | |")


def report(res: dict, m: dict, args, bench: Bench) -> None:
    mib = m["retrieve_file_bytes"] / 2**20
    print()
    print(f"Data: {m['instances']} instances, {len(m['studies'])} studies, "
          f"{len(m['patients'])} patients; retrieval study: {RETRIEVE_N} CT instances, "
          f"{mib:.1f} MiB of Part 10 files. Load: bastion import "
          f"{bench.loads.get('bastion', 0):.0f} s, Orthanc storescu x2 "
          f"{bench.loads.get('orthanc', 0):.0f} s. Client: {args.client} (both servers), "
          f"max PDU {args.max_pdu}, TCP_NODELAY {'off' if args.nagle else 'on'}; Bastion over TLS, Orthanc plain in netns "
          f"`{args.netns}`, StorageAccessOnFind={args.orthanc_storage_access}.")
    print()
    print("| measurement | Bastion (TLS) | Orthanc 1.10 (plain) | ratio Bastion/Orthanc | target |")
    print("|---|---|---|---|---|")
    for qt, label in QTYPES:
        b, o = res.get(("find", qt, "bastion")), res.get(("find", qt, "orthanc"))

        def stat(a, f):
            return f(a["lat"]) * 1e3 if a and a["lat"] else None

        def cell(a, v, fmt="{:.2f}"):
            if v is None:
                errs = (a or {}).get("errors", [])
                return ("error: " + "; ".join(map(str, errs))[:200]) if errs else "not run"
            return fmt.format(v)
        bm, om = stat(b, statistics.median), stat(o, statistics.median)
        bp, op = stat(b, lambda x: pct(x, 95)), stat(o, lambda x: pct(x, 95))
        n = len(b["lat"]) if b else 0
        print(f"| C-FIND {label}: median ms ({n} queries) | {cell(b, bm)} | {cell(o, om)} "
              f"| **{fmt_ratio(bm, om)}** | ≤ 0.25 |")
        print(f"| C-FIND {label}: p95 ms | {cell(b, bp)} | {cell(o, op)} | {fmt_ratio(bp, op)} | |")

        def check(a):
            if not a:
                return "n/a"
            s = f"{a['matches'] / max(1, len(a['lat'])):.1f} matches/query, {a['wrong']} wrong"
            if a["n_errors"]:
                s += f", {a['n_errors']} errors"
            return s
        print(f"| C-FIND {label}: answers checked | {check(b)} | {check(o)} | | all right |")
        bc = b["cpu_ms"] / b["n"] if b and b["n"] else None
        oc = o["cpu_ms"] / o["n"] if o and o["n"] else None
        print(f"| C-FIND {label}: server CPU ms/query | {cell(b, bc)} | {cell(o, oc)} "
              f"| {fmt_ratio(bc, oc)} | |")
        fb, fo = res.get(("findscu", qt, "bastion")), res.get(("findscu", qt, "orthanc"))
        if fb or fo:
            vb = fb["mean"] * 1e3 if fb and "mean" in fb else None
            vo = fo["mean"] * 1e3 if fo and "mean" in fo else None
            print(f"| C-FIND {label}: DCMTK findscu mean ms | "
                  f"{f'{vb:.2f}' if vb is not None else 'error'} | "
                  f"{f'{vo:.2f}' if vo is not None else 'error'} | {fmt_ratio(vb, vo)} | |")

    notes = []
    for qt, label in QTYPES:
        for srv in ("bastion", "orthanc"):
            a = res.get(("find", qt, srv))
            for e in (a or {}).get("examples", []):
                notes.append(f"* wrong C-FIND answer, {srv}, {label} `{e['value']}`: expected "
                             f"{e['expected']} studies, got {e['got']} responses ({e['distinct']} "
                             f"distinct; {e['unexpected']} unexpected, {e['missing']} missing)"
                             + (f", return keys absent: {', '.join(e['missing_return_keys'])}"
                                if e["missing_return_keys"] else ""))
            for err in (a or {}).get("errors", [])[:3]:
                notes.append(f"* C-FIND error, {srv}, {label}: {err}")

    def retr(op, srv):
        rs = res.get((op, srv), [])
        ok = [r for r in rs if "error" not in r]
        if rs and len(ok) == len(rs):
            secs = statistics.median(r["secs"] for r in ok)
            return secs, None
        bad = next((r for r in rs if "error" in r), {"error": "not run"})
        if bad.get("not_implemented"):
            return None, f"n/a (not implemented: {bad.get('status_text', bad['error'])})"
        return None, f"n/a (failed: {bad['error']}, {bad.get('received', 0)} received)"

    for op, label in (("get", "C-GET"), ("move", "C-MOVE")):
        for bsrv, how in (("bastion", "Bastion over TLS"),
                          ("bastion-plain", "Bastion in plain, as Orthanc")):
            (bs, be), (os_, oe) = retr(op, bsrv), retr(op, "orthanc")
            print(f"| {label} of the {RETRIEVE_N}-instance study, {how}: s (median of "
                  f"{args.rounds}) | {be or f'{bs:.3f}'} | {oe or f'{os_:.3f}'} "
                  f"| {'**' + fmt_ratio(bs, os_) + '**' if op == 'move' else fmt_ratio(bs, os_)} "
                  f"| {'≤ 0.5' if op == 'move' else ''} |")
            bm = mib / bs if bs else None
            om = mib / os_ if os_ else None
            print(f"| {label}, {how}: MiB/s | {be or f'{bm:.1f}'} | {oe or f'{om:.1f}'} "
                  f"| {'**' + fmt_ratio(bm, om) + '**' if op == 'get' else fmt_ratio(bm, om)} "
                  f"| {'≥ 1.5' if op == 'get' else ''} |")
    if notes:
        print()
        print("\n".join(notes))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
