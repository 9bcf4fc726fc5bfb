//! The Study Instance UID of a Part 10 file before it is stored, for
//! `POST /dicomweb/studies/{study}` (PS3.18 §10.5: instances of another study
//! are failed). Bounded like the ingest pipeline: every declared length is
//! checked against the bytes present (`bastion_archive::scan`) before
//! dicom-object parses the attributes that precede Pixel Data.

use bastion_archive::scan::{scan, Encoding, ScanLimits};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// The Media Storage SOP Class and Instance UIDs of a Part 10 file's meta
/// information (PS3.10 §7.1), read from its first bytes only: for naming an
/// instance whose dataset was not (or not wholly) read.
pub fn meta_uids(bytes: &[u8]) -> Option<(String, String)> {
    let (meta, _) = file_meta(bytes)?;
    let trim = |s: &str| s.trim_end_matches(['\0', ' ']).to_owned();
    Some((
        trim(&meta.media_storage_sop_class_uid),
        trim(&meta.media_storage_sop_instance_uid),
    ))
}

/// The File Meta Information of a Part 10 file (after the preamble, or at
/// its start), bounded by the scanner, and where the dataset starts.
fn file_meta(bytes: &[u8]) -> Option<(dicom_object::meta::FileMetaTable, usize)> {
    let dicm = if bytes.get(128..132) == Some(b"DICM") {
        128
    } else if bytes.get(0..4) == Some(b"DICM") {
        0
    } else {
        return None;
    };
    let meta_start = dicm + 4;
    let le = Encoding {
        explicit_vr: true,
        little_endian: true,
    };
    let meta_limits = ScanLimits {
        max_element_len: 64 * 1024,
        max_depth: 1,
    };
    let report = scan(bytes.get(meta_start..)?, le, meta_limits, Some(0x0002)).ok()?;
    let meta_end = meta_start + report.end;
    let meta = dicom_object::meta::FileMetaTable::from_reader(bytes.get(dicm..meta_end)?).ok()?;
    Some((meta, meta_end))
}

/// The Study Instance UID of a Part 10 file (`None`: not a readable file,
/// no such attribute, or a deflated dataset).
pub fn study_uid(bytes: &[u8]) -> Option<String> {
    let (meta, meta_end) = file_meta(bytes)?;
    let ts_uid = meta.transfer_syntax().trim_end_matches(['\0', ' ']);
    let ts = TransferSyntaxRegistry.get(ts_uid)?;
    if matches!(ts_uid, "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.4.95") {
        return None;
    }
    let enc = Encoding {
        explicit_vr: ts_uid != "1.2.840.10008.1.2",
        little_endian: ts.endianness() == dicom_encoding::transfer_syntax::Endianness::Little,
    };
    let dataset = bytes.get(meta_end..)?;
    let limits = ScanLimits {
        max_element_len: dataset.len() as u64,
        max_depth: 16,
    };
    let report = scan(dataset, enc, limits, None).ok()?;
    let head = &dataset[..report
        .pixel_data_offset
        .unwrap_or(report.end)
        .min(dataset.len())];
    let obj = InMemDicomObject::read_dataset_with_ts(head, ts).ok()?;
    let uid = obj.get(tags::STUDY_INSTANCE_UID)?.to_str().ok()?;
    Some(uid.trim_end_matches(['\0', ' ']).to_owned())
}
