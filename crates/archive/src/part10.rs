//! The Part 10 files the archive stores and hands out (PS3.10 §7.1: 128-byte
//! zero preamble, `DICM`, File Meta Information in Explicit VR Little Endian,
//! then the dataset): where the dataset starts in one, and building one for a
//! dataset in another transfer syntax (retrieval after `transcode`). Shared by
//! C-MOVE/C-GET and WADO-RS so that neither parses group 0002 itself.

use crate::{ingest::part10_header, ArchiveError};

/// Offset of the dataset in a Part 10 file as the archive writes it (after the
/// group 0002 elements); `None` when the bytes are not such a file or a meta
/// element overruns them. Only the archive's own files are expected here: the
/// walk trusts the explicit VR layout of group 0002 (PS3.10 §7.1).
pub fn dataset_offset(bytes: &[u8]) -> Option<usize> {
    if bytes.get(128..132)? != b"DICM" {
        return None;
    }
    let mut pos = 132usize;
    loop {
        let Some(head) = bytes.get(pos..pos + 8) else {
            return (pos <= bytes.len()).then_some(pos);
        };
        if u16::from_le_bytes([head[0], head[1]]) != 0x0002 {
            return Some(pos);
        }
        let vr = &head[4..6];
        let (header, len) = if matches!(
            vr,
            b"OB" | b"OW" | b"OF" | b"SQ" | b"UT" | b"UN" | b"UC" | b"UR" | b"OD" | b"OL" | b"OV"
        ) {
            let l = bytes.get(pos + 8..pos + 12)?;
            (
                12usize,
                u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize,
            )
        } else {
            (8usize, u16::from_le_bytes([head[6], head[7]]) as usize)
        };
        pos = pos.checked_add(header)?.checked_add(len)?;
        if pos > bytes.len() {
            return None;
        }
    }
}

/// A Part 10 file holding `dataset` (bytes in transfer syntax `ts`) of the
/// given SOP class and instance, with regenerated meta (our implementation
/// class UID and version name).
///
/// # Errors
/// [`ArchiveError::Internal`] when the meta cannot be built.
pub fn file(
    ts: &str,
    sop_class: &str,
    sop_instance: &str,
    dataset: &[u8],
) -> Result<Vec<u8>, ArchiveError> {
    let mut out = part10_header(ts, sop_class, sop_instance, "")?;
    out.reserve(dataset.len());
    out.extend_from_slice(dataset);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_dataset_after_the_meta_group() {
        let mut f = vec![0u8; 128];
        f.extend_from_slice(b"DICM");
        // (0002,0000) UL 4 = 10
        f.extend_from_slice(&[2, 0, 0, 0, b'U', b'L', 4, 0, 10, 0, 0, 0]);
        // (0002,0001) OB 00 00 len 2
        f.extend_from_slice(&[2, 0, 1, 0, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1]);
        // (0002,0010) UI 2 "1\0"
        f.extend_from_slice(&[2, 0, 0x10, 0, b'U', b'I', 2, 0, b'1', 0]);
        let at = f.len();
        let body = [8u8, 0, 0x18, 0, 2, 0, 0, 0, b'1', 0];
        f.extend_from_slice(&body);
        assert_eq!(dataset_offset(&f), Some(at));
        assert_eq!(dataset_offset(&f[..140]), None);
        assert_eq!(dataset_offset(b"nope"), None);
    }

    #[test]
    fn a_built_file_splits_back() -> Result<(), ArchiveError> {
        let body = [8u8, 0, 0x18, 0, 2, 0, 0, 0, b'1', 0];
        let f = file(
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3",
            &body,
        )?;
        let at = dataset_offset(&f).ok_or(ArchiveError::Internal("no dataset".into()))?;
        assert_eq!(&f[at..], &body[..]);
        Ok(())
    }
}
