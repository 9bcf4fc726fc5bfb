"""DCMTK sends a mixed folder completely, every file as stored (issue 11).

The README's `storescu +sd +r` command sent 17 of the corpus' files: DCMTK
3.6.7's storescu proposes only uncompressed transfer syntaxes unless a -x…
flag names one compressed syntax, skips (or converts) every other file, and
still exits 0. Two commands that send everything as stored, each checked on
the real tools:

* over TLS: storescu with the configuration `scripts/storescu-as-stored.sh`
  writes for the folder (one presentation context per SOP Class and Transfer
  Syntax found in the files);
* over the plain listener (legacy tools): dcmsend, which proposes each file's
  own syntax (after Explicit VR Little Endian for uncompressed files, which
  it then converts).

Every valid corpus file (one per SOP Instance UID) must then be stored in its
own transfer syntax, and read back as an equal dataset (the tools re-encode
group and sequence lengths as they send; Bastion stores what it received).
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pydicom

import corpus

REPO = Path(__file__).resolve().parents[2]


def _folder(tmp_path):
    """The corpus (one valid file per SOP Instance UID) copied into one
    folder tree; its entries."""
    root = tmp_path / "mixed"
    # DCMTK itself cannot send explicit_VR-UN.dcm: its SOP Class and Instance
    # UIDs are encoded with VR UN, which storescu/dcmsend do not decode ("No
    # SOP Class or Instance UID in file"). Bastion stores it by STOW-RS and
    # pynetdicom (tests/interop/test_viewer_dicomweb.py).
    entries = [e for e in corpus.one_per_sop_uid_entries() if e.path.name != "explicit_VR-UN.dcm"]
    for i, e in enumerate(entries):
        dst = root / f"d{i % 4}" / e.path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(e.path, dst)
    return root, entries


UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def _same_dataset(got: bytes, path: Path, uncompressed_may_convert=False) -> bool:
    """Same transfer syntax (sent as stored, not converted) and equal
    datasets: the DCMTK tools re-encode what they send (group lengths,
    sequence lengths, padding) and drop Data Set Trailing Padding
    (FFFC,FFFC), so the comparison is of elements, as pydicom reads them,
    not of bytes."""
    a = pydicom.dcmread(io.BytesIO(got))
    b = pydicom.dcmread(path)
    ts_a, ts_b = a.file_meta.TransferSyntaxUID, b.file_meta.TransferSyntaxUID
    converted = uncompressed_may_convert and {ts_a, ts_b} <= UNCOMPRESSED
    if ts_a != ts_b and not converted:
        return False
    strip = lambda ds: {e.tag: e for e in ds  # noqa: E731
                        if e.tag.element != 0 and e.tag != 0xFFFCFFFC}
    return strip(a) == strip(b)


def _check_all_stored(srv, files, tmp_path, uncompressed_may_convert=False):
    missing, different = [], []
    for e in files:
        got = srv.instance_get(e.sop_instance, out=tmp_path / "get" / f"{e.sop_instance}.dcm",
                               check=False)
        if got is None:
            missing.append(e.path.name)
        elif not _same_dataset(got, e.path, uncompressed_may_convert):
            different.append(e.path.name)
    assert not missing, f"{len(missing)} of {len(files)} not stored: {missing}"
    assert not different, f"stored datasets differ: {different}"


def test_storescu_over_tls_sends_a_mixed_folder_as_stored(make_server, tmp_path):
    srv = make_server(plain=False)
    srv.device_add("CT1", transport="mtls", allow="echo,store")
    crt, key, ca, _ = srv.cert_issue("CT1")
    root, files = _folder(tmp_path)
    cfg = tmp_path / "as-stored.cfg"
    r = subprocess.run([str(REPO / "scripts" / "storescu-as-stored.sh"), str(root)],
                       capture_output=True, text=True, timeout=300, check=True)
    cfg.write_text(r.stdout)
    assert r.stdout.count("PresentationContext") > 5, r.stdout
    env = dict(os.environ, TCP_NODELAY="1")
    r = subprocess.run(["/usr/bin/storescu", "-xf", str(cfg), "AsStored", "-aet", "CT1",
                        "-aec", srv.ae_title, "+tls", str(key), str(crt), "-pw", "+cf", str(ca),
                        "+sd", "+r", "-nh", "127.0.0.1", str(srv.tls_port), str(root)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Failed" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    _check_all_stored(srv, files, tmp_path)


def test_dcmsend_over_the_plain_listener_sends_a_mixed_folder_as_stored(make_server, tmp_path):
    srv = make_server(plain=True)
    srv.device_add("OLDCT", transport="plain", allow="echo,store")
    root, files = _folder(tmp_path)
    env = dict(os.environ, TCP_NODELAY="1")
    r = subprocess.run(["/usr/bin/dcmsend", "-aet", "OLDCT", "-aec", srv.ae_title, "+sd", "+r",
                        "127.0.0.1", str(srv.plain_port), str(root)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # dcmsend proposes an uncompressed file's syntax after Explicit VR Little
    # Endian, so Implicit VR and Big Endian files arrive converted to it
    # (compressed ones as they are).
    _check_all_stored(srv, files, tmp_path, uncompressed_may_convert=True)
