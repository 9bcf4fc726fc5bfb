"""Classification of the test corpus (see scripts/fetch-corpus.sh).

The corpus is the pydicom 3.0.2 wheel's ``test_files`` and ``charset_files``
plus the pydicom-data 1.0.0 wheel, unpacked under ``$BASTION_CORPUS``
(default ``.cache/corpus``).

A file is **valid** (the server must store it) when all of these hold:

* it is at most 20 MiB;
* pydicom ``dcmread`` (without ``force``) reads it, i.e. it has a preamble,
  ``DICM`` and a File Meta Information group with a Transfer Syntax UID;
* the dataset's SOP Class UID, SOP Instance UID, Study Instance UID and Series
  Instance UID are all present and valid UIDs (PS3.5 9.1: digits and dots,
  no empty component, no leading zero, at most 64 characters);
* the SOP Class is a Storage SOP Class (pynetdicom's service class table);
* the file is structurally complete: every declared element length fits in
  the bytes present (our own walker below; pydicom silently accepts a value
  cut short by the end of the file, the server must not).

A file is **invalid** (the server must refuse it) when it is not Part 10, its
Part 10 structure is truncated, or one of the four UIDs is missing or invalid.
Files that are neither (e.g. a non-storage SOP class with valid UIDs) are not
used for assertions about acceptance.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

MAX_SIZE = 20 * 1024 * 1024
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

KEY_UIDS = (
    ("SOPClassUID", "SOP Class UID"),
    ("SOPInstanceUID", "SOP Instance UID"),
    ("StudyInstanceUID", "Study Instance UID"),
    ("SeriesInstanceUID", "Series Instance UID"),
)

UNCOMPRESSED_TS = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
}


def corpus_root() -> Path:
    return Path(os.environ.get("BASTION_CORPUS", ".cache/corpus")).resolve()


def corpus_dirs() -> list[Path]:
    """The directories a test imports: every corpus file lives under one."""
    root = corpus_root()
    return [root / "pydicom", root / "pydicom-data"]


def is_valid_uid(value) -> bool:
    if value is None:
        return False
    s = str(value)
    return 0 < len(s) <= 64 and UID_RE.match(s) is not None


# --------------------------------------------------------------------------
# Structural walker: checks that every declared length fits in the file.
# --------------------------------------------------------------------------

class Truncated(Exception):
    pass


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
             b"UN", b"UR", b"UT", b"UV"}
UNDEFINED = 0xFFFFFFFF


def _walk(buf: bytes, pos: int, end: int, explicit: bool, little: bool,
          depth: int = 0, stop_at_item_delim: bool = False) -> int:
    """Walk elements in buf[pos:end]; return the position after the walk.

    Raises Truncated when an element's header or value does not fit."""
    if depth > 64:
        raise Truncated("nesting deeper than 64")
    e = "<" if little else ">"
    while pos < end:
        if pos + 8 > end:
            raise Truncated(f"element header cut at offset {pos}")
        group, elem = struct.unpack_from(e + "HH", buf, pos)
        if group == 0xFFFE:
            # item delimiter / sequence delimiter inside a dataset
            (length,) = struct.unpack_from(e + "I", buf, pos + 4)
            pos += 8
            if elem == 0xE00D and stop_at_item_delim:
                return pos
            if elem in (0xE00D, 0xE0DD):
                return pos if stop_at_item_delim else pos
            raise Truncated(f"unexpected item tag at offset {pos - 8}")
        vr = None
        if explicit:
            vr = buf[pos + 4:pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise Truncated(f"element header cut at offset {pos}")
                (length,) = struct.unpack_from(e + "I", buf, pos + 8)
                pos += 12
            else:
                (length,) = struct.unpack_from(e + "H", buf, pos + 6)
                pos += 8
        else:
            (length,) = struct.unpack_from(e + "I", buf, pos + 4)
            pos += 8
        if length == UNDEFINED:
            is_pixel = (group, elem) == (0x7FE0, 0x0010)
            if is_pixel and vr != b"SQ":
                pos = _walk_fragments(buf, pos, end, little)
            else:
                # SQ (or UN/implicit with undefined length: an implicit VR LE
                # sequence, PS3.5 6.2.2)
                nested_explicit = explicit and vr == b"SQ"
                nested_little = little if vr != b"UN" else True
                pos = _walk_sequence(buf, pos, end, nested_explicit,
                                     nested_little, depth + 1, defined=False)
        else:
            if pos + length > end:
                raise Truncated(
                    f"element ({group:04X},{elem:04X}) declares {length} bytes,"
                    f" {end - pos} present")
            if explicit and vr == b"SQ":
                _walk_sequence(buf, pos, pos + length, True, little, depth + 1,
                               defined=True)
            pos += length
    return pos


def _walk_sequence(buf, pos, end, explicit, little, depth, defined):
    e = "<" if little else ">"
    while True:
        if defined and pos == end:
            return end  # defined-length sequence fully consumed
        if pos + 8 > end:
            raise Truncated(f"sequence not closed at offset {pos}")
        group, elem, length = struct.unpack_from(e + "HHI", buf, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000):
            raise Truncated(f"expected item at offset {pos - 8}")
        if length == UNDEFINED:
            pos = _walk(buf, pos, end, explicit, little, depth,
                        stop_at_item_delim=True)
        else:
            if pos + length > end:
                raise Truncated(f"item declares {length} bytes, {end - pos} present")
            _walk(buf, pos, pos + length, explicit, little, depth)
            pos += length


def _walk_fragments(buf, pos, end, little):
    e = "<" if little else ">"
    while True:
        if pos + 8 > end:
            raise Truncated(f"encapsulated pixel data not closed at offset {pos}")
        group, elem, length = struct.unpack_from(e + "HHI", buf, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000) or length == UNDEFINED:
            raise Truncated(f"bad fragment at offset {pos - 8}")
        if pos + length > end:
            raise Truncated(f"fragment declares {length} bytes, {end - pos} present")
        pos += length


def split_part10(data: bytes):
    """Return (transfer syntax UID, offset of the dataset) of a Part 10 file.

    Raises Truncated/ValueError when the meta group is not well formed."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("no DICM prefix")
    pos = 132
    ts = None
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            hdr = 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            hdr = 8
        if pos + hdr + length > len(data):
            raise Truncated("file meta truncated")
        if elem == 0x0010:
            ts = data[pos + hdr:pos + hdr + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos += hdr + length
    if ts is None:
        raise ValueError("no Transfer Syntax UID in file meta")
    return ts, pos


def dataset_bytes(path_or_bytes) -> tuple[str, bytes]:
    """(transfer syntax, raw dataset bytes after the File Meta group)."""
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    ts, off = split_part10(data)
    return ts, data[off:]


def structure_error(path: Path, force_ts: str | None = None) -> str | None:
    """None if every declared length fits, else a reason."""
    try:
        data = path.read_bytes()
        ts, off = split_part10(data)
        ts = force_ts or ts
        body = data
        if ts == "1.2.840.10008.1.2.1.99":
            body = zlib.decompressobj(-15).decompress(data[off:])
            off = 0
        explicit = ts != "1.2.840.10008.1.2"
        little = ts != "1.2.840.10008.1.2.2"
        _walk(body, off, len(body), explicit, little)
    except Truncated as e:
        return f"truncated: {e}"
    except (ValueError, struct.error, zlib.error) as e:
        return f"malformed: {e}"
    return None


# --------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------

@dataclass
class Entry:
    path: Path
    size: int
    valid: bool = False
    reason: str | None = None  # why invalid (None when valid or undecided)
    transfer_syntax: str | None = None
    sop_class: str | None = None
    sop_instance: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    dataset_sha256: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def uncompressed(self) -> bool:
        return self.transfer_syntax in UNCOMPRESSED_TS


def _is_storage(sop_class: str) -> bool:
    from pynetdicom.sop_class import uid_to_service_class
    from pynetdicom.service_class import StorageServiceClass
    try:
        return uid_to_service_class(sop_class) is StorageServiceClass
    except Exception:
        return False


def _classify(path: Path) -> Entry:
    import pydicom
    from pydicom.errors import InvalidDicomError

    ent = Entry(path=path, size=path.stat().st_size)
    if ent.size > MAX_SIZE:
        ent.extra["skipped"] = "larger than 20 MiB"
        return ent
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path))
    except InvalidDicomError as e:
        ent.reason = f"not a DICOM Part 10 file: {str(e)[:80]}"
        return ent
    except Exception as e:  # noqa: BLE001 - anything pydicom cannot read
        ent.reason = f"unreadable: {type(e).__name__}: {str(e)[:80]}"
        return ent
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        ent.reason = "file meta has no Transfer Syntax UID"
        return ent
    ent.transfer_syntax = str(ts)
    for kw, name in KEY_UIDS:
        v = ds.get(kw)
        if v is None or str(v) == "":
            ent.reason = f"missing {name}"
            break
        if not is_valid_uid(v):
            ent.reason = f"invalid {name}: {str(v)[:70]!r}"
            break
    ent.sop_class = str(ds.get("SOPClassUID")) if ds.get("SOPClassUID") else None
    ent.sop_instance = str(ds.get("SOPInstanceUID")) if ds.get("SOPInstanceUID") else None
    pn, pid = ds.get("PatientName"), ds.get("PatientID")
    ent.patient_name = str(pn) if pn else None
    ent.patient_id = str(pid) if pid else None
    serr = structure_error(path)
    if serr:
        if structure_error(path, force_ts="1.2.840.10008.1.2") is None:
            # e.g. SC_rgb_jpeg.dcm: meta says JPEG (explicit VR) but the
            # dataset is implicit VR. Whether to refuse or sniff is up to
            # the server: assert nothing about such files.
            ent.extra["skipped"] = "dataset encoding differs from its transfer syntax"
            return ent
        ent.reason = serr
        return ent
    if ent.reason:
        return ent
    if not _is_storage(ent.sop_class):
        ent.extra["skipped"] = f"not a Storage SOP Class: {ent.sop_class}"
        return ent
    _, raw = dataset_bytes(path)
    ent.dataset_sha256 = hashlib.sha256(raw).hexdigest()
    ent.valid = True
    return ent


@functools.lru_cache(maxsize=None)
def entries() -> tuple[Entry, ...]:
    out = []
    for d in corpus_dirs():
        if not d.is_dir():
            raise RuntimeError(f"corpus directory {d} missing: run scripts/fetch-corpus.sh")
        for p in sorted(d.rglob("*")):
            if p.is_file():
                out.append(_classify(p))
    return tuple(out)


def all_files() -> list[Path]:
    return [e.path for e in entries()]


def valid_entries() -> list[Entry]:
    return [e for e in entries() if e.valid]


def valid_files() -> list[Path]:
    return [e.path for e in valid_entries()]


def invalid_files() -> list[tuple[Path, str]]:
    """Files the server must refuse, with the reason."""
    return [(e.path, e.reason) for e in entries() if e.reason is not None]


_TS_PREFERENCE = [
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2",
]


def _preference(e: Entry):
    ts_rank = _TS_PREFERENCE.index(e.transfer_syntax) if e.transfer_syntax in _TS_PREFERENCE else 10
    return (ts_rank, e.size, str(e.path))


def one_per_sop_uid_entries() -> list[Entry]:
    groups: dict[str, list[Entry]] = {}
    for e in valid_entries():
        groups.setdefault(e.sop_instance, []).append(e)
    return [min(g, key=_preference) for _, g in sorted(groups.items())]


def one_per_sop_uid() -> list[Path]:
    """One valid file per SOP Instance UID, preferring uncompressed (explicit
    VR LE first), then the smallest; deterministic."""
    return [e.path for e in one_per_sop_uid_entries()]


def conflicting_pairs() -> list[tuple[Path, Path]]:
    """(chosen, other): two valid files with the same SOP Instance UID whose
    dataset bytes differ. ``chosen`` is the one_per_sop_uid() file."""
    chosen = {e.sop_instance: e for e in one_per_sop_uid_entries()}
    out = []
    for e in valid_entries():
        c = chosen[e.sop_instance]
        if e.path != c.path and (e.dataset_sha256 != c.dataset_sha256
                                 or e.transfer_syntax != c.transfer_syntax):
            out.append((c.path, e.path))
    return out


def patient_strings(min_len: int = 6, count: int = 3) -> list[str]:
    """Distinctive patient names/IDs (>= min_len characters) from valid files."""
    seen, out = set(), []
    for e in valid_entries():
        for s in (e.patient_name, e.patient_id):
            if s and len(s) >= min_len and s.isascii() and s not in seen:
                seen.add(s)
                out.append(s)
    # prefer names with letters (more distinctive than digit runs)
    out.sort(key=lambda s: (not any(c.isalpha() for c in s), -len(s), s))
    return out[:count]


if __name__ == "__main__":  # a quick report: python tests/interop/corpus.py
    import collections
    es = entries()
    print(f"{len(es)} files, {len(valid_entries())} valid, "
          f"{len(one_per_sop_uid())} SOP Instance UIDs, "
          f"{len(conflicting_pairs())} conflicting pairs, "
          f"{len(invalid_files())} invalid")
    print("transfer syntaxes of one_per_sop_uid:",
          dict(collections.Counter(e.transfer_syntax for e in one_per_sop_uid_entries())))
    for p, r in invalid_files():
        print("INVALID", p.relative_to(corpus_root()), "--", r)
    for e in es:
        if not e.valid and e.reason is None:
            print("SKIPPED", e.path.relative_to(corpus_root()), "--", e.extra)
    print("patient strings:", patient_strings())
