//! A bounds check of encoded datasets before any parser allocates.
//!
//! dicom-object allocates the length an element *declares* before reading
//! its value: a 674-byte file declaring a 3 GB element drives it to 3.6 GB
//! of RSS (see `shared/design/libraries.md`). No library offers a
//! "declared length ≤ bytes present" pass, so this module walks the encoded
//! element headers (PS3.5 §7.1 data elements, §7.5 nesting of sequences,
//! §A.4 encapsulated pixel data) without decoding any value, and refuses a
//! dataset in which any declared length exceeds the bytes that remain, any
//! element exceeds the configured maximum, or nesting is deeper than allowed.
//!
//! It also reports where the top-level Pixel Data element starts, so the
//! caller can parse only the attributes before it.

use dicom_core::{
    dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr},
    Tag, VR,
};
use dicom_dictionary_std::StandardDataDictionary;

/// How the dataset is encoded (from its transfer syntax, PS3.5 §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// Explicit VR (true) or implicit VR (false).
    pub explicit_vr: bool,
    /// Little endian (true) or big endian (false).
    pub little_endian: bool,
}

/// Limits for [`scan`].
#[derive(Debug, Clone, Copy)]
pub struct ScanLimits {
    /// Largest declared length of one element value, in bytes.
    pub max_element_len: u64,
    /// Deepest sequence nesting accepted.
    pub max_depth: u32,
}

/// What [`scan`] learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanReport {
    /// Byte offset of the top-level (7FE0,0010) Pixel Data element header.
    pub pixel_data_offset: Option<usize>,
    /// Byte offset where the scan stopped (the end of the input, or the
    /// first element whose group differs from `only_group`).
    pub end: usize,
    /// Byte ranges `[start, end)` of top-level elements that carry no
    /// content of their own: group lengths (gggg,0000), retired and freely
    /// dropped by peers such as DCMTK, and Data Set Trailing Padding
    /// (FFFC,FFFC). The identical-re-send check ignores them.
    pub non_content: Vec<(usize, usize)>,
}

/// A malformed or oversized encoding, with the byte offset where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} at byte offset {offset}")]
pub struct ScanError {
    /// What is wrong.
    pub what: String,
    /// Byte offset in the scanned buffer.
    pub offset: usize,
}

const ITEM: Tag = Tag(0xFFFE, 0xE000);
const ITEM_DELIMITATION: Tag = Tag(0xFFFE, 0xE00D);
const SEQUENCE_DELIMITATION: Tag = Tag(0xFFFE, 0xE0DD);
const PIXEL_DATA: Tag = Tag(0x7FE0, 0x0010);
const TRAILING_PADDING: Tag = Tag(0xFFFC, 0xFFFC);
const UNDEFINED: u32 = 0xFFFF_FFFF;

/// Scans `buf` as a dataset. When `only_group` is set (file meta, group
/// 0002), the scan stops at the first element of another group.
///
/// # Errors
/// [`ScanError`] naming the first violation and its offset.
pub fn scan(
    buf: &[u8],
    enc: Encoding,
    limits: ScanLimits,
    only_group: Option<u16>,
) -> Result<ScanReport, ScanError> {
    scan_source(buf, enc, limits, only_group)
}

/// Where [`scan_source`] reads the encoded dataset from: a slice, or a
/// dataset spooled to disk ([`bastion_store::Spooled`]) that is read a few
/// header bytes at a time and never held whole.
pub trait ScanSource {
    /// Length of the dataset in bytes.
    fn len(&self) -> usize;
    /// Whether the dataset is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `out` with the bytes at `at`; `false` when they are not all
    /// present (or cannot be read: the caller checks why afterwards).
    fn read_at(&self, at: usize, out: &mut [u8]) -> bool;
}

impl ScanSource for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn read_at(&self, at: usize, out: &mut [u8]) -> bool {
        match at.checked_add(out.len()).and_then(|end| self.get(at..end)) {
            Some(b) => {
                out.copy_from_slice(b);
                true
            }
            None => false,
        }
    }
}

/// [`scan`] over any [`ScanSource`]: the same walk, the same report.
///
/// # Errors
/// As [`scan`].
pub fn scan_source<S: ScanSource + ?Sized>(
    buf: &S,
    enc: Encoding,
    limits: ScanLimits,
    only_group: Option<u16>,
) -> Result<ScanReport, ScanError> {
    let mut s = Scanner {
        buf,
        enc,
        limits,
        pos: 0,
        pixel: None,
        non_content: Vec::new(),
    };
    // A delimiter ends the scan of its level early: at the top level (or in
    // an item of defined length, below) the bytes after it would go to the
    // parser unchecked (fuzz finding), so it is refused there.
    if !matches!(s.dataset(buf.len(), 0, only_group)?, Stop::End) {
        return s.err("item or sequence delimitation outside a sequence");
    }
    Ok(ScanReport {
        pixel_data_offset: s.pixel,
        end: s.pos,
        non_content: s.non_content,
    })
}

struct Scanner<'a, S: ScanSource + ?Sized> {
    buf: &'a S,
    enc: Encoding,
    limits: ScanLimits,
    pos: usize,
    pixel: Option<usize>,
    non_content: Vec<(usize, usize)>,
}

enum Stop {
    End,
    ItemDelimiter,
    SequenceDelimiter,
}

impl<S: ScanSource + ?Sized> Scanner<'_, S> {
    fn err<T>(&self, what: impl Into<String>) -> Result<T, ScanError> {
        Err(ScanError {
            what: what.into(),
            offset: self.pos,
        })
    }

    fn u16_at(&self, at: usize, le: bool) -> Result<u16, ScanError> {
        let mut b2 = [0u8; 2];
        match self.buf.read_at(at, &mut b2).then_some(b2) {
            Some([a, b]) => Ok(if le {
                u16::from_le_bytes([a, b])
            } else {
                u16::from_be_bytes([a, b])
            }),
            _ => self.err("truncated element header"),
        }
    }

    fn u32_at(&self, at: usize, le: bool) -> Result<u32, ScanError> {
        let mut b4 = [0u8; 4];
        match self.buf.read_at(at, &mut b4).then_some(b4) {
            Some([a, b, c, d]) => Ok(if le {
                u32::from_le_bytes([a, b, c, d])
            } else {
                u32::from_be_bytes([a, b, c, d])
            }),
            _ => self.err("truncated element header"),
        }
    }

    /// Checks that `len` bytes are present before `end` and within limits,
    /// then skips them.
    fn skip_value(&mut self, len: u32, end: usize) -> Result<(), ScanError> {
        let len64 = u64::from(len);
        if len64 > self.limits.max_element_len {
            return self.err(format!(
                "element length {len} exceeds the limit of {} bytes",
                self.limits.max_element_len
            ));
        }
        let len = len as usize;
        if len > end.saturating_sub(self.pos) {
            return self.err(format!(
                "declared length {len} exceeds the {} bytes present",
                end.saturating_sub(self.pos)
            ));
        }
        self.pos += len;
        Ok(())
    }

    /// Scans elements until `end`, an item delimiter or a sequence delimiter.
    fn dataset(
        &mut self,
        end: usize,
        depth: u32,
        only_group: Option<u16>,
    ) -> Result<Stop, ScanError> {
        let le = self.enc.little_endian;
        while self.pos < end {
            let start = self.pos;
            // PS3.5 §7.1: group and element numbers. The meta group is always
            // little endian; only the dataset proper may be big endian.
            let group = self.u16_at(start, le)?;
            if let Some(g) = only_group {
                if group != g {
                    return Ok(Stop::End);
                }
            }
            let tag = Tag(group, self.u16_at(start + 2, le)?);
            // Items and delimiters have no VR in any transfer syntax (§7.5).
            if tag.0 == 0xFFFE {
                let len = self.u32_at(start + 4, le)?;
                self.pos = start + 8;
                return match tag {
                    ITEM_DELIMITATION => Ok(Stop::ItemDelimiter),
                    SEQUENCE_DELIMITATION => Ok(Stop::SequenceDelimiter),
                    _ => {
                        self.pos = start;
                        self.err(format!(
                            "unexpected {tag} (length {len}) outside a sequence"
                        ))
                    }
                };
            }
            let (vr, len) = if self.enc.explicit_vr {
                let mut vr_buf = [0u8; 2];
                let vr_bytes: &[u8] = if self.buf.read_at(start + 4, &mut vr_buf) {
                    &vr_buf
                } else {
                    &[]
                };
                let vr = std::str::from_utf8(vr_bytes)
                    .ok()
                    .and_then(|s| s.parse::<VR>().ok());
                let Some(vr) = vr else {
                    self.pos = start;
                    return self.err(format!("invalid VR in element {tag}"));
                };
                if matches!(
                    vr,
                    VR::OB
                        | VR::OD
                        | VR::OF
                        | VR::OL
                        | VR::OV
                        | VR::OW
                        | VR::SQ
                        | VR::SV
                        | VR::UC
                        | VR::UN
                        | VR::UR
                        | VR::UT
                        | VR::UV
                ) {
                    let len = self.u32_at(start + 8, le)?;
                    self.pos = start + 12;
                    (Some(vr), len)
                } else {
                    let len = u32::from(self.u16_at(start + 6, le)?);
                    self.pos = start + 8;
                    (Some(vr), len)
                }
            } else {
                let len = self.u32_at(start + 4, le)?;
                self.pos = start + 8;
                (None, len)
            };
            if depth == 0 && tag == PIXEL_DATA && self.pixel.is_none() {
                self.pixel = Some(start);
            }
            let is_sequence = match vr {
                Some(VR::SQ) => true,
                Some(VR::UN) => len == UNDEFINED, // CP-246: UN of undefined length is an implicit-VR SQ
                Some(_) => false,
                None => implicit_is_sequence(tag, len),
            };
            if is_sequence {
                self.sequence(len, end, depth + 1)?;
            } else if len == UNDEFINED {
                if tag == PIXEL_DATA {
                    self.encapsulated(end)?;
                } else {
                    self.pos = start;
                    return self.err(format!("undefined length on non-sequence element {tag}"));
                }
            } else {
                // dicom-parser reads `len / size` values of a binary VR and
                // moves on as if it had read `len` bytes: any remainder
                // desynchronises it, and it then takes value bytes for the
                // next header and allocates whatever length it finds there
                // (fuzz finding: 146 bytes → 3 GB). Top-level Pixel Data is
                // never parsed (ingest stops before it).
                let unit = value_unit(vr.unwrap_or_else(|| implicit_vr(tag)));
                if len % unit != 0 && !(depth == 0 && tag == PIXEL_DATA) {
                    self.pos = start;
                    return self.err(format!(
                        "length {len} of {tag} is not a multiple of its value size {unit}"
                    ));
                }
                self.skip_value(len, end)?;
            }
            if depth == 0 && (tag.1 == 0x0000 || tag == TRAILING_PADDING) {
                self.non_content.push((start, self.pos));
            }
        }
        if self.pos > end {
            return self.err("element overruns its container");
        }
        Ok(Stop::End)
    }

    fn sequence(&mut self, len: u32, outer_end: usize, depth: u32) -> Result<(), ScanError> {
        if depth > self.limits.max_depth {
            return self.err(format!(
                "sequences nested deeper than {}",
                self.limits.max_depth
            ));
        }
        let end = if len == UNDEFINED {
            outer_end
        } else {
            let present = outer_end.saturating_sub(self.pos);
            if len as usize > present {
                return self.err(format!(
                    "sequence length {len} exceeds the {present} bytes present"
                ));
            }
            self.pos + len as usize
        };
        // An implicit-VR LE encoding inside UN (CP-246) is scanned with the
        // outer encoding here; both item headers and lengths are 4+4 bytes,
        // so the bounds check holds either way.
        while self.pos < end {
            let tag = Tag(
                self.u16_at(self.pos, self.enc.little_endian)?,
                self.u16_at(self.pos + 2, self.enc.little_endian)?,
            );
            let item_len = self.u32_at(self.pos + 4, self.enc.little_endian)?;
            self.pos += 8;
            match tag {
                SEQUENCE_DELIMITATION if len == UNDEFINED => return Ok(()),
                ITEM if item_len == UNDEFINED => match self.dataset(end, depth, None)? {
                    Stop::ItemDelimiter => {}
                    _ => return self.err("item without an item delimitation"),
                },
                ITEM => {
                    let present = end.saturating_sub(self.pos);
                    if item_len as usize > present {
                        return self.err(format!(
                            "item length {item_len} exceeds the {present} bytes present"
                        ));
                    }
                    let item_end = self.pos + item_len as usize;
                    if !matches!(self.dataset(item_end, depth, None)?, Stop::End) {
                        return self.err("delimitation inside an item of defined length");
                    }
                    self.pos = item_end;
                }
                other => return self.err(format!("expected an item in a sequence, found {other}")),
            }
        }
        if len == UNDEFINED {
            return self.err("sequence without a sequence delimitation");
        }
        Ok(())
    }

    /// Encapsulated pixel data (PS3.5 §A.4): fragments as items of defined
    /// length, ended by a sequence delimitation.
    fn encapsulated(&mut self, end: usize) -> Result<(), ScanError> {
        loop {
            let le = self.enc.little_endian;
            let tag = Tag(self.u16_at(self.pos, le)?, self.u16_at(self.pos + 2, le)?);
            let len = self.u32_at(self.pos + 4, le)?;
            self.pos += 8;
            match tag {
                SEQUENCE_DELIMITATION => return Ok(()),
                ITEM if len != UNDEFINED => self.skip_value(len, end)?,
                other => return self.err(format!("expected a pixel data fragment, found {other}")),
            }
        }
    }
}

/// The VR dicom-parser gives `tag` in an implicit VR encoding: the
/// dictionary's (ambiguous ones relaxed: US, OW), UN when unknown.
fn implicit_vr(tag: Tag) -> VR {
    StandardDataDictionary
        .by_tag(tag)
        .map_or(VR::UN, |e| e.vr().relaxed())
}

/// Bytes per value of a binary VR (PS3.5 §6.2, Table 6.2-1); a value length
/// must be a multiple of it. 1 for the VRs whose values are bytes or text.
fn value_unit(vr: VR) -> u32 {
    match vr {
        VR::US | VR::SS | VR::OW => 2,
        VR::UL | VR::SL | VR::FL | VR::AT | VR::OL | VR::OF => 4,
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => 8,
        _ => 1,
    }
}

fn implicit_is_sequence(tag: Tag, len: u32) -> bool {
    match StandardDataDictionary.by_tag(tag).map(|e| e.vr()) {
        Some(VirtualVr::Exact(VR::SQ)) => true,
        // Unknown (private) elements of undefined length can only be
        // sequences in implicit VR (PS3.5 §7.5, CP-246).
        None => len == UNDEFINED && tag != PIXEL_DATA,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVRLE: Encoding = Encoding {
        explicit_vr: true,
        little_endian: true,
    };
    const IVRLE: Encoding = Encoding {
        explicit_vr: false,
        little_endian: true,
    };
    const LIMITS: ScanLimits = ScanLimits {
        max_element_len: 1 << 30,
        max_depth: 16,
    };

    fn evr(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(tag.0.to_le_bytes());
        v.extend(tag.1.to_le_bytes());
        v.extend(vr);
        v.extend(u16::try_from(value.len()).unwrap_or(0).to_le_bytes());
        v.extend(value);
        v
    }

    /// Fuzz finding (`fuzz/corpus/ingest_parse/regression-oom-top-level-delimiter`):
    /// a delimiter stopped the scan of its level as if it were the end, and
    /// the bytes after it reached the parser unchecked (3 GB for 1 KB).
    #[test]
    fn regression_delimiters_outside_a_sequence_are_refused() {
        let mut ds = evr((0x0008, 0x0060), b"CS", b"CT");
        ds.extend([0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        ds.extend(evr((0x0010, 0x0010), b"PN", b"Doe"));
        let e = scan(&ds, EVRLE, LIMITS, None).expect_err("top-level delimiter");
        assert_eq!(e.what, "item or sequence delimitation outside a sequence");
        let mut ds = evr((0x0008, 0x0060), b"CS", b"CT");
        ds.extend([0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        assert!(scan(&ds, IVRLE, LIMITS, None).is_err());
        // (0008,1032) SQ of defined length, one item of defined length 16
        // holding an item delimitation then 8 more bytes.
        let mut sq = vec![0x08, 0x00, 0x32, 0x10, b'S', b'Q', 0, 0];
        sq.extend(24u32.to_le_bytes());
        sq.extend([0xFE, 0xFF, 0x00, 0xE0]);
        sq.extend(16u32.to_le_bytes());
        sq.extend([0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        sq.extend([0x08, 0x00, 0x00, 0x01, 0xFF, 0xFF, 0xFF, 0x7F]);
        let e = scan(&sq, EVRLE, LIMITS, None).expect_err("delimiter in a defined item");
        assert_eq!(e.what, "delimitation inside an item of defined length");
    }

    /// dicom-parser reads `len / size` values of a binary VR: a remainder
    /// would desynchronise it (see the fuzz regression in `tests/it.rs`).
    #[test]
    fn binary_values_must_be_whole_values() {
        let refused = |ds: &[u8], enc: Encoding| {
            scan(ds, enc, LIMITS, None)
                .expect_err("refused")
                .what
                .contains("not a multiple of its value size")
        };
        assert!(refused(&evr((0x0028, 0x0010), b"US", &[1, 0, 2]), EVRLE));
        assert!(refused(&evr((0x0018, 0x9004), b"FD", &[0; 12]), EVRLE));
        // Implicit VR: the dictionary's VR; (gggg,0000) group lengths are UL.
        let implicit = |tag: (u16, u16), value: &[u8]| {
            let mut v = Vec::new();
            v.extend(tag.0.to_le_bytes());
            v.extend(tag.1.to_le_bytes());
            v.extend(u32::try_from(value.len()).unwrap_or(0).to_le_bytes());
            v.extend(value);
            v
        };
        assert!(refused(&implicit((0x8E01, 0x0000), &[0]), IVRLE));
        assert!(refused(&implicit((0x0028, 0x0010), &[1, 0, 2]), IVRLE));
        assert_eq!(
            scan(
                &implicit((0x0028, 0x0010), &[1, 0, 0, 0]),
                IVRLE,
                LIMITS,
                None
            )
            .map(|r| r.end),
            Ok(8 + 4)
        );
        // Bytes and text: any length; private (unknown) tags are UN.
        assert!(scan(&evr((0x0010, 0x0010), b"PN", b"Doe"), EVRLE, LIMITS, None).is_ok());
        let ob = [9, 0, 0x10, 0, b'O', b'B', 0, 0, 3, 0, 0, 0, 1, 2, 3];
        assert!(scan(&ob, EVRLE, LIMITS, None).is_ok());
        assert!(scan(&implicit((0x0009, 0x1001), &[1, 2, 3]), IVRLE, LIMITS, None).is_ok());
        // Top-level Pixel Data is never parsed: an odd OW length is left alone.
        assert!(scan(&implicit((0x7FE0, 0x0010), &[1, 2, 3]), IVRLE, LIMITS, None).is_ok());
    }

    #[test]
    fn accepts_well_formed_and_finds_pixel_data() {
        let mut ds = evr((0x0008, 0x0018), b"UI", b"1.2.3\0");
        ds.extend(evr((0x0010, 0x0010), b"PN", b"Doe^John"));
        let px = ds.len();
        ds.extend([
            0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 4, 0, 0, 0, 1, 2, 3, 4,
        ]);
        let padding = ds.len();
        ds.extend([0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 0]);
        let r = scan(&ds, EVRLE, LIMITS, None);
        assert_eq!(
            r,
            Ok(ScanReport {
                pixel_data_offset: Some(px),
                end: ds.len(),
                non_content: vec![(padding, ds.len())],
            })
        );
    }

    #[test]
    fn refuses_declared_length_beyond_buffer() {
        // OB element declaring 0xFFFFFFF0 bytes followed by 4 bytes.
        let ds = [
            0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF, 1, 2, 3, 4,
        ];
        let e = scan(&ds, EVRLE, LIMITS, None).err();
        assert_eq!(e.map(|e| e.offset), Some(12));
        // Implicit VR: 4-byte length 0x40000000 with 2 bytes present.
        let ds = [0x10, 0x00, 0x10, 0x00, 0, 0, 0, 0x40, b'A', b'B'];
        assert!(scan(&ds, IVRLE, LIMITS, None).is_err());
    }

    #[test]
    fn refuses_large_element_inside_sequence() {
        // SQ undefined length, item undefined length, inner element with a huge length.
        let mut ds = vec![
            0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        ds.extend([0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        ds.extend([
            0x08, 0x00, 0x50, 0x11, b'U', b'T', 0, 0, 0x00, 0x00, 0x00, 0x70, b'x',
        ]);
        assert!(scan(&ds, EVRLE, LIMITS, None).is_err());
    }

    #[test]
    fn accepts_nested_sequences_and_encapsulated_pixel_data() {
        let mut ds = vec![
            0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        ds.extend([0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        ds.extend(evr((0x0008, 0x1150), b"UI", b"1.2\0"));
        ds.extend([0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        ds.extend([0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        ds.extend([
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        ds.extend([0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]); // empty offset table
        ds.extend([0xFE, 0xFF, 0x00, 0xE0, 2, 0, 0, 0, 0xAB, 0xCD]);
        ds.extend([0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        assert!(scan(&ds, EVRLE, LIMITS, None).is_ok());
        // truncating anywhere in the middle is refused
        for cut in [13, 30, ds.len() - 3] {
            assert!(
                scan(&ds[..cut], EVRLE, LIMITS, None).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn refuses_deep_nesting() {
        let mut ds = Vec::new();
        for _ in 0..20 {
            ds.extend([
                0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
            ]);
            ds.extend([0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        let e = scan(&ds, EVRLE, LIMITS, None).err().map(|e| e.what);
        assert!(e.is_some_and(|w| w.contains("nested")));
    }
}
