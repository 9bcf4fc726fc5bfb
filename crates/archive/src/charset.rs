//! Specific Character Set (0008,0005) with ISO 2022 code extensions
//! (PS3.5 §6.1.2.5.3, Annexes H–K).
//!
//! dicom-rs decodes text with the first value of (0008,0005) only. When the
//! attribute is multi-valued or names an `ISO 2022` term, [`normalize`]
//! recovers each text element's bytes (re-encoding dicom-rs's decoding with
//! the same codec, which is its exact inverse) and decodes them here: escape
//! sequences designate G0/G1 sets, bytes with the high bit set use G1, and the
//! state returns to the initial sets at each `\`, at `^` and `=` in a PN, and
//! at the end of a value.

use std::borrow::Cow;

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Length, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::text::{SpecificCharacterSet, TextCodec};
use dicom_object::InMemDicomObject;
use encoding_rs::Encoding;

/// A graphic character set that can be designated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Set {
    /// ISO 646 / ASCII (G0, `ESC ( B`).
    Ascii,
    /// JIS X 0201 Romaji (G0, `ESC ( J`).
    JisRoman,
    /// JIS X 0201 Katakana (G1, `ESC ) I`).
    JisKatakana,
    /// JIS X 0208 (G0, `ESC $ B`).
    Jis0208,
    /// JIS X 0212 (G0, `ESC $ ( D`).
    Jis0212,
    /// KS X 1001 (G1, `ESC $ ) C`).
    Ksx1001,
    /// GB 2312 (G1, `ESC $ ) A`).
    Gb2312,
    /// An ISO 8859 / TIS 620 right half (G1, `ESC - F`).
    Single(&'static Encoding),
}

impl Set {
    fn double(self) -> bool {
        matches!(
            self,
            Set::Jis0208 | Set::Jis0212 | Set::Ksx1001 | Set::Gb2312
        )
    }
}

/// Initial G0 and G1 of one Defined Term.
fn term_sets(term: &str) -> Option<(Option<Set>, Option<Set>)> {
    let t = term.trim_matches([' ', '\0']);
    let num = t
        .strip_prefix("ISO 2022 IR ")
        .or_else(|| t.strip_prefix("ISO_IR "))
        .unwrap_or(t);
    let single = |e| Some((Some(Set::Ascii), Some(Set::Single(e))));
    match num {
        "" | "6" => Some((Some(Set::Ascii), None)),
        "13" => Some((Some(Set::JisRoman), Some(Set::JisKatakana))),
        "87" => Some((Some(Set::Jis0208), None)),
        "159" => Some((Some(Set::Jis0212), None)),
        "149" => Some((None, Some(Set::Ksx1001))),
        "58" => Some((None, Some(Set::Gb2312))),
        "100" => single(encoding_rs::WINDOWS_1252),
        "101" => single(encoding_rs::ISO_8859_2),
        "109" => single(encoding_rs::ISO_8859_3),
        "110" => single(encoding_rs::ISO_8859_4),
        "126" => single(encoding_rs::ISO_8859_7),
        "127" => single(encoding_rs::ISO_8859_6),
        "138" => single(encoding_rs::ISO_8859_8),
        "144" => single(encoding_rs::ISO_8859_5),
        "148" => single(encoding_rs::WINDOWS_1254),
        "166" => single(encoding_rs::WINDOWS_874),
        "203" => single(encoding_rs::ISO_8859_15),
        _ => None,
    }
}

/// The escape sequence (after ESC) designating a set: (is G1, set).
fn escape(seq: &[u8]) -> Option<(usize, bool, Set)> {
    let g1 = |e| (3, true, Set::Single(e));
    Some(match seq {
        [b'(', b'B', ..] => (3, false, Set::Ascii),
        [b'(', b'J', ..] => (3, false, Set::JisRoman),
        [b')', b'I', ..] => (3, true, Set::JisKatakana),
        [b'$', b'B', ..] | [b'$', b'@', ..] => (3, false, Set::Jis0208),
        [b'$', b'(', b'D', ..] => (4, false, Set::Jis0212),
        [b'$', b')', b'C', ..] => (4, true, Set::Ksx1001),
        [b'$', b')', b'A', ..] => (4, true, Set::Gb2312),
        [b'-', b'A', ..] => g1(encoding_rs::WINDOWS_1252),
        [b'-', b'B', ..] => g1(encoding_rs::ISO_8859_2),
        [b'-', b'C', ..] => g1(encoding_rs::ISO_8859_3),
        [b'-', b'D', ..] => g1(encoding_rs::ISO_8859_4),
        [b'-', b'F', ..] => g1(encoding_rs::ISO_8859_7),
        [b'-', b'G', ..] => g1(encoding_rs::ISO_8859_6),
        [b'-', b'H', ..] => g1(encoding_rs::ISO_8859_8),
        [b'-', b'L', ..] => g1(encoding_rs::ISO_8859_5),
        [b'-', b'M', ..] => g1(encoding_rs::WINDOWS_1254),
        [b'-', b'T', ..] => g1(encoding_rs::WINDOWS_874),
        [b'-', b'b', ..] => g1(encoding_rs::ISO_8859_15),
        _ => return None,
    })
}

/// Whether text under this (0008,0005) needs [`decode`] rather than dicom-rs:
/// multi-valued, or an ISO 2022 term.
#[must_use]
pub fn needs_extensions(terms: &[String]) -> bool {
    terms.len() > 1 || terms.iter().any(|t| t.contains("2022"))
}

fn decode_with(e: &'static Encoding, bytes: &[u8], out: &mut String) {
    out.push_str(&e.decode_without_bom_handling(bytes).0);
}

/// Decodes the bytes of a text value under the Defined Terms `terms` of
/// (0008,0005) with ISO 2022 code extensions. `pn`: `^` and `=` also reset the
/// designations (PS3.5 §6.1.2.5.3).
#[must_use]
pub fn decode(bytes: &[u8], terms: &[String], pn: bool) -> String {
    let first = terms
        .first()
        .and_then(|t| term_sets(t))
        .unwrap_or((Some(Set::Ascii), None));
    let init_g0 = first.0.unwrap_or(Set::Ascii);
    let init_g1 = first.1;
    let (mut g0, mut g1) = (init_g0, init_g1);
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == 0x1b {
            if let Some((n, is_g1, set)) = escape(&bytes[i + 1..]) {
                if is_g1 {
                    g1 = Some(set);
                } else {
                    g0 = set;
                }
                i += n;
                continue;
            }
            out.push('\u{1b}');
            i += 1;
            continue;
        }
        if b >= 0x80 {
            match g1 {
                Some(set) if set.double() && i + 1 < bytes.len() && bytes[i + 1] >= 0x80 => {
                    let pair = &bytes[i..i + 2];
                    match set {
                        Set::Ksx1001 => decode_with(encoding_rs::EUC_KR, pair, &mut out),
                        _ => decode_with(encoding_rs::GBK, pair, &mut out),
                    }
                    i += 2;
                }
                Some(Set::JisKatakana) if (0xa1..=0xdf).contains(&b) => {
                    out.push(char::from_u32(0xff61 + u32::from(b - 0xa1)).unwrap_or('\u{fffd}'));
                    i += 1;
                }
                Some(Set::Single(e)) => {
                    decode_with(e, &[b], &mut out);
                    i += 1;
                }
                _ => {
                    out.push('\u{fffd}');
                    i += 1;
                }
            }
            continue;
        }
        if g0.double() && b > 0x20 && b < 0x7f && i + 1 < bytes.len() {
            let b2 = bytes[i + 1];
            if b2 > 0x20 && b2 < 0x7f {
                match g0 {
                    Set::Jis0212 => {
                        decode_with(encoding_rs::EUC_JP, &[0x8f, b | 0x80, b2 | 0x80], &mut out)
                    }
                    _ => decode_with(encoding_rs::EUC_JP, &[b | 0x80, b2 | 0x80], &mut out),
                }
                i += 2;
                continue;
            }
        }
        if b == b'\\' || (pn && (b == b'^' || b == b'=')) {
            g0 = init_g0;
            g1 = init_g1;
        }
        // JIS X 0201 Romaji is read as ASCII, as pydicom does: 0x5C is the
        // value delimiter whatever G0 holds.
        out.push(char::from(b));
        i += 1;
    }
    out
}

/// The Defined Terms of the (0008,0005) of `obj` (empty when absent).
#[must_use]
pub fn terms_of(obj: &InMemDicomObject) -> Vec<String> {
    obj.get(tags::SPECIFIC_CHARACTER_SET)
        .and_then(|e| e.to_str().ok().map(|s| s.into_owned()))
        .map(|s| {
            s.split('\\')
                .map(|t| t.trim_matches([' ', '\0']).to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `obj` with every text element decoded with ISO 2022 code extensions when
/// its (0008,0005) needs them (see [`needs_extensions`]); otherwise `obj`.
///
/// Sequence items are decoded too, each with its own (0008,0005) when it has
/// one, else with its enclosing dataset's (PS3.5 §6.1.2.5.3). dicom-rs switches
/// its decoder at every (0008,0005) it reads, items included, and keeps it
/// after the item ends; `normalize` follows the same order to know which codec
/// dicom-rs used for each value, so a value decoded with the wrong set (an
/// item's, or the first term only) is recovered and decoded with the right one.
#[must_use]
pub fn normalize(obj: &InMemDicomObject) -> Cow<'_, InMemDicomObject> {
    let terms = terms_of(obj);
    let mut parsed_with = SpecificCharacterSet::default();
    match normalize_in(obj, &terms, &mut parsed_with) {
        Some(out) => Cow::Owned(out),
        None => Cow::Borrowed(obj),
    }
}

/// The codec dicom-rs switches to when it reads a (0008,0005) holding `terms`
/// (`None`: it keeps the current one).
fn dicom_rs_codec(terms: &[String]) -> Option<SpecificCharacterSet> {
    terms
        .first()
        .and_then(|t| SpecificCharacterSet::from_code(t))
}

/// [`normalize`] of one dataset or item whose text is in `terms`; `parsed_with`
/// is dicom-rs's decoder state before it, updated as dicom-rs would. `None` when
/// nothing changes.
fn normalize_in(
    obj: &InMemDicomObject,
    terms: &[String],
    parsed_with: &mut SpecificCharacterSet,
) -> Option<InMemDicomObject> {
    let extensions = needs_extensions(terms);
    // The codec the standard says `terms` use when no extension is needed.
    let plain = dicom_rs_codec(terms).unwrap_or_default();
    let mut out: Option<InMemDicomObject> = None;
    for e in obj.iter() {
        let vr = e.vr();
        if e.tag() == tags::SPECIFIC_CHARACTER_SET {
            if let Some(codec) = dicom_rs_codec(terms) {
                *parsed_with = codec;
            }
            continue;
        }
        if let Some(items) = e.items() {
            let mut changed = false;
            let mut new_items = Vec::with_capacity(items.len());
            for item in items {
                let own = terms_of(item);
                let item_terms = if own.is_empty() { terms } else { &own[..] };
                match normalize_in(item, item_terms, parsed_with) {
                    Some(n) => {
                        changed = true;
                        new_items.push(n);
                    }
                    None => new_items.push(item.clone()),
                }
            }
            if changed {
                out.get_or_insert_with(|| obj.clone()).put(DataElement::new(
                    e.tag(),
                    VR::SQ,
                    Value::from(DataSetSequence::new(new_items, Length::UNDEFINED)),
                ));
            }
            continue;
        }
        if !matches!(
            vr,
            VR::PN | VR::LO | VR::SH | VR::LT | VR::ST | VR::UC | VR::UT
        ) {
            continue;
        }
        if !extensions && plain == *parsed_with {
            continue; // dicom-rs decoded it with the right set
        }
        let Value::Primitive(PrimitiveValue::Str(_) | PrimitiveValue::Strs(_)) = e.value() else {
            continue;
        };
        let Ok(s) = e.to_str() else { continue };
        let Ok(bytes) = parsed_with.encode(&s) else {
            continue;
        };
        let text = if extensions {
            decode(&bytes, terms, vr == VR::PN)
        } else {
            match plain.decode(&bytes) {
                Ok(t) => t,
                Err(_) => continue,
            }
        };
        let parts: Vec<String> = text.split('\\').map(str::to_owned).collect();
        out.get_or_insert_with(|| obj.clone()).put(DataElement::new(
            e.tag(),
            vr,
            PrimitiveValue::Strs(parts.into()),
        ));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn terms(s: &str) -> Vec<String> {
        s.split('\\').map(str::to_owned).collect()
    }

    /// PS3.5 Annex H.3.1 (chrH31): `\ISO 2022 IR 87`.
    #[test]
    fn annex_h31_jis_x_0208() {
        let bytes =
            b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B";
        assert_eq!(
            decode(bytes, &terms("\\ISO 2022 IR 87"), true),
            "Yamada^Tarou=山田^太郎=やまだ^たろう"
        );
    }

    /// PS3.5 Annex H.3.2 (chrH32): `ISO 2022 IR 13\ISO 2022 IR 87`.
    #[test]
    fn annex_h32_jis_x_0201_and_0208() {
        let bytes = b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3=\x1b$B;3ED\x1b(J^\x1b$BB@O:\x1b(J=\x1b$B$d$^$@\x1b(J^\x1b$B$?$m$&\x1b(J";
        assert_eq!(
            decode(bytes, &terms("ISO 2022 IR 13\\ISO 2022 IR 87"), true),
            "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"
        );
    }

    /// PS3.5 Annex I.2 (chrI2): `\ISO 2022 IR 149`.
    #[test]
    fn annex_i2_ks_x_1001() {
        let bytes = b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7=\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf";
        assert_eq!(
            decode(bytes, &terms("\\ISO 2022 IR 149"), true),
            "Hong^Gildong=洪^吉洞=홍^길동"
        );
    }

    /// JIS X 0212 (`ESC $ ( D`); G1 returns to the initial set after `\`.
    #[test]
    fn jis_x_0212_and_reset() {
        // 0x3021 in JIS X 0212 is U+4E02.
        let bytes = b"\x1b$(D0!\x1b(B";
        assert_eq!(decode(bytes, &terms("\\ISO 2022 IR 159"), false), "丂");
        let bytes = b"\x1b-F\xe1\\\xb1";
        assert_eq!(
            decode(bytes, &terms("ISO 2022 IR 13\\ISO 2022 IR 126"), false),
            "α\\ｱ"
        );
        // In a PN, `^` resets too.
        let bytes = b"\x1b-F\xe1^\xb1";
        assert_eq!(
            decode(bytes, &terms("ISO 2022 IR 13\\ISO 2022 IR 126"), true),
            "α^ｱ"
        );
    }

    /// ISO 8859 G1 sets by escape (PS3.5 Annex K style).
    #[test]
    fn iso_8859_g1() {
        let bytes = b"\x1b-F\xe1\xe2\x1b-L\xbb";
        assert_eq!(
            decode(bytes, &terms("\\ISO 2022 IR 126\\ISO 2022 IR 144"), false),
            "αβЛ"
        );
        assert!(needs_extensions(&terms("ISO 2022 IR 100")));
        assert!(!needs_extensions(&terms("ISO_IR 100")));
    }

    fn parse(charset: &[u8], pn: &[u8]) -> InMemDicomObject {
        use dicom_encoding::TransferSyntaxIndex;
        let mut bytes = Vec::new();
        for (tag, v) in [((0x0008u16, 0x0005u16), charset), ((0x0010, 0x0010), pn)] {
            let mut v = v.to_vec();
            if v.len() % 2 == 1 {
                v.push(b' ');
            }
            bytes.extend_from_slice(&tag.0.to_le_bytes());
            bytes.extend_from_slice(&tag.1.to_le_bytes());
            bytes.extend_from_slice(&u32::try_from(v.len()).expect("short value").to_le_bytes());
            bytes.extend_from_slice(&v);
        }
        let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
            .get("1.2.840.10008.1.2")
            .expect("implicit VR little endian");
        InMemDicomObject::read_dataset_with_ts(&bytes[..], ts).expect("parsed")
    }

    /// Implicit VR LE bytes of one element (value padded to even length).
    pub(crate) fn element(group: u16, elem: u16, v: &[u8]) -> Vec<u8> {
        let mut v = v.to_vec();
        if v.len() % 2 == 1 {
            v.push(b' ');
        }
        let mut out = Vec::new();
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&elem.to_le_bytes());
        out.extend_from_slice(&u32::try_from(v.len()).expect("short value").to_le_bytes());
        out.extend_from_slice(&v);
        out
    }

    /// Implicit VR LE bytes of a sequence of undefined length holding `items`
    /// (each the bytes of its elements), items of undefined length.
    pub(crate) fn sequence(group: u16, elem: u16, items: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&elem.to_le_bytes());
        out.extend_from_slice(&u32::MAX.to_le_bytes());
        for item in items {
            out.extend_from_slice(&[0xfe, 0xff, 0x00, 0xe0, 0xff, 0xff, 0xff, 0xff]);
            out.extend_from_slice(item);
            out.extend_from_slice(&[0xfe, 0xff, 0x0d, 0xe0, 0, 0, 0, 0]);
        }
        out.extend_from_slice(&[0xfe, 0xff, 0xdd, 0xe0, 0, 0, 0, 0]);
        out
    }

    pub(crate) fn read_implicit(bytes: &[u8]) -> InMemDicomObject {
        use dicom_encoding::TransferSyntaxIndex;
        let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
            .get("1.2.840.10008.1.2")
            .expect("implicit VR little endian");
        InMemDicomObject::read_dataset_with_ts(bytes, ts).expect("parsed")
    }

    fn item_text(
        obj: &InMemDicomObject,
        seq: dicom_core::Tag,
        n: usize,
        tag: dicom_core::Tag,
    ) -> String {
        let obj = normalize(obj);
        let items = obj.get(seq).and_then(|e| e.items()).expect("items");
        items[n]
            .get(tag)
            .expect("element")
            .to_str()
            .expect("text")
            .trim_end()
            .to_owned()
    }

    /// ISO 2022 IR 87 (PS3.5 Annex H.3.1 bytes) inside a sequence item, under
    /// the dataset's `\ISO 2022 IR 87`.
    #[test]
    fn sequence_items_decoded_with_the_dataset_character_set() {
        let item = [
            element(0x0008, 0x0100, b"P1"),
            element(0x0008, 0x0104, b"\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"),
        ]
        .concat();
        let bytes = [
            element(0x0008, 0x0005, b"\\ISO 2022 IR 87"),
            sequence(0x0008, 0x1032, &[item]),
            element(
                0x0010,
                0x0010,
                b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B",
            ),
        ]
        .concat();
        let obj = read_implicit(&bytes);
        assert_eq!(
            item_text(&obj, tags::PROCEDURE_CODE_SEQUENCE, 0, tags::CODE_MEANING),
            "山田^太郎"
        );
        assert_eq!(
            item_text(&obj, tags::PROCEDURE_CODE_SEQUENCE, 0, tags::CODE_VALUE),
            "P1"
        );
        assert_eq!(name(&obj), "Yamada^Tarou=山田^太郎");
    }

    /// An item's own (0008,0005) governs its values (PS3.5 §6.1.2.5.3); the
    /// dataset's values after the item keep the dataset's set, although dicom-rs
    /// decoded them with the item's.
    #[test]
    fn sequence_item_with_its_own_character_set() {
        let ir87 = [
            element(0x0008, 0x0005, b"\\ISO 2022 IR 87"),
            element(0x0008, 0x0104, b"\x1b$B;3ED\x1b(B"),
        ]
        .concat();
        let cyrillic = [
            element(0x0008, 0x0005, b"ISO_IR 144"),
            element(0x0008, 0x0104, b"\xbb\xee\xdace\xdc\xd0"),
        ]
        .concat();
        let plain = element(0x0008, 0x0104, b"Buc^J\xe9r\xf4me");
        let bytes = [
            element(0x0008, 0x0005, b"ISO_IR 100"),
            sequence(0x0008, 0x1032, &[ir87, cyrillic, plain]),
            element(0x0010, 0x0010, b"Buc^J\xe9r\xf4me"),
        ]
        .concat();
        let obj = read_implicit(&bytes);
        let seq = tags::PROCEDURE_CODE_SEQUENCE;
        assert_eq!(item_text(&obj, seq, 0, tags::CODE_MEANING), "山田");
        assert_eq!(item_text(&obj, seq, 1, tags::CODE_MEANING), "Люкceма");
        // dicom-rs read the third item and the name after it with ISO_IR 144.
        assert_eq!(item_text(&obj, seq, 2, tags::CODE_MEANING), "Buc^Jérôme");
        assert_eq!(name(&obj), "Buc^Jérôme");
    }

    fn name(obj: &InMemDicomObject) -> String {
        normalize(obj)
            .get(tags::PATIENT_NAME)
            .expect("PatientName")
            .to_str()
            .expect("text")
            .trim_end()
            .to_owned()
    }

    /// Through dicom-rs's parser: the bytes are recovered from its decoding
    /// with the first term (default, IR 13, IR 6) and decoded here.
    #[test]
    fn normalize_parsed_datasets() {
        let obj = parse(
            b"ISO 2022 IR 13\\ISO 2022 IR 87",
            b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3=\x1b$B;3ED\x1b(J^\x1b$BB@O:\x1b(J",
        );
        assert_eq!(name(&obj), "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎");
        let obj = parse(
            b"\\ISO 2022 IR 149",
            b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7",
        );
        assert_eq!(name(&obj), "Hong^Gildong=洪^吉洞");
        let obj = parse(
            b"ISO 2022 IR 6\\ISO 2022 IR 87",
            b"\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B",
        );
        assert_eq!(name(&obj), "やまだ^たろう");
        // A single-valued set is left to dicom-rs.
        let obj = parse(b"ISO_IR 100", b"Buc^J\xe9r\xf4me");
        assert!(matches!(normalize(&obj), Cow::Borrowed(_)));
    }
}
