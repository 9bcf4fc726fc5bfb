//! The DICOM JSON Model (PS3.18 Annex F): a dataset as one JSON object.
//!
//! dicom-json (0.10) is not used: it inlines Pixel Data as base64 (no
//! BulkDataURI output) and leaves UN elements binary, while metadata
//! responses must carry BulkDataURI and readable values. The mapping is
//! small and written here (PS3.18 §F.2):
//!
//! - each attribute is keyed by its tag as 8 upper-case hex digits and holds
//!   `"vr"` and, unless the value is empty, exactly one of `"Value"` (an
//!   array), `"BulkDataURI"` or `"InlineBinary"` (§F.2.2); group lengths
//!   (gggg,0000) are left out;
//! - PN values are objects with `"Alphabetic"`, `"Ideographic"` and
//!   `"Phonetic"` strings, the component groups split on `=` (§F.2.2), an
//!   empty group left out;
//! - DS, FL, FD, IS, SL, SS, UL, US, SV and UV values are JSON numbers
//!   (§F.2.3); an IS or DS text that is not a number, and an SV or UV beyond
//!   ±2^53 (not exact in a JSON number), stays a string as §F.2.3.1 allows;
//!   a non-finite FL/FD value is `null`;
//! - AT values are `"GGGGEEEE"` strings (§F.2.4), SQ values arrays of item
//!   objects (§F.2.2), an empty value in a multi-valued attribute `null`
//!   (§F.2.5);
//! - a standard attribute whose value arrived as UN is written with its
//!   data dictionary VR and value (`bastion_archive::unknown_vr`);
//! - binary values (OB, OD, OF, OL, OV, OW, UN) are `"InlineBinary"` (base64
//!   of the little-endian bytes, §F.2.7) up to [`JsonOptions::bulk_threshold`]
//!   bytes, `"BulkDataURI"` (§F.2.6) above; Pixel Data (7FE0,0010),
//!   native or encapsulated, is always a BulkDataURI; a value of another
//!   VR that may be bulk data (PS3.18 §8.7.3.2: FL, FD, IS, LT, SL, SS, ST,
//!   SV, UC, UL, US, UT, UV) is a BulkDataURI above the threshold too.
//!
//! Text is Unicode: the top-level dataset goes through
//! `bastion_archive::charset::normalize` (ISO 2022 code extensions, which
//! dicom-rs does not decode), and Specific Character Set (0008,0005), when
//! present, says `ISO_IR 192` since JSON is UTF-8 (§F.2).
//!
//! ## BulkDataURI paths
//!
//! The URI of an attribute is `{bulk_base}/{path}` where `path` is the tag
//! (`7FE00010`) for a top-level attribute and `SSSSSSSS/{i}/TTTTTTTT` inside
//! sequence `SSSSSSSS`, item `i` (0-based), repeated for deeper nesting.
//! [`bulk_value`] resolves such a path against the same dataset.

use base64::Engine as _;
use dicom_core::header::Header;
use dicom_core::value::PrimitiveValue;
use dicom_core::DicomValue;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use serde_json::{Map, Number, Value};

use crate::DicomWebError;

/// How binary and large values are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonOptions {
    /// The URL prefix of BulkDataURI values, without a trailing `/`, e.g.
    /// `https://host/dicomweb/studies/S/series/R/instances/I/bulk`
    /// (PS3.18 §8.7.3.3.2 leaves the URI to the origin server).
    pub bulk_base: String,
    /// Largest value, in bytes, written inline (`InlineBinary` for binary
    /// VRs, `Value` for the others); larger ones become BulkDataURI.
    pub bulk_threshold: usize,
}

impl Default for JsonOptions {
    /// No base (relative paths) and a 1 KiB threshold.
    fn default() -> Self {
        JsonOptions {
            bulk_base: String::new(),
            bulk_threshold: 1024,
        }
    }
}

/// The DICOM JSON object (PS3.18 Annex F) of `obj`: see the module docs for
/// the mapping. Never fails: a value that does not fit its VR's JSON type is
/// written as a string (numbers) or as its bytes (binary).
pub fn to_dicom_json(obj: &InMemDicomObject, opts: &JsonOptions) -> Value {
    // Standard attributes sent as UN get their dictionary VR first (as
    // QIDO-RS shows them: PS3.5 §6.2.2), then the text is made Unicode.
    let resolved = bastion_archive::unknown_vr::resolve_unknown_vrs(obj);
    let normalized = bastion_archive::charset::normalize(resolved.as_ref().unwrap_or(obj));
    dataset_json(&normalized, "", opts)
}

/// The value bytes of the attribute a BulkDataURI path (see the module docs)
/// names: native values as little-endian bytes, text as UTF-8.
///
/// # Errors
/// [`DicomWebError::InvalidParameter`] for a malformed path or one that
/// names no attribute; [`DicomWebError::Unsupported`] for encapsulated Pixel
/// Data (served as frames, PS3.18 §10.4.1.1.3).
pub fn bulk_value(obj: &InMemDicomObject, path: &str) -> Result<Vec<u8>, DicomWebError> {
    let bad = |reason: &str| DicomWebError::InvalidParameter {
        name: "bulkdata path".into(),
        reason: reason.into(),
    };
    let mut parts = path.trim_matches('/').split('/');
    let mut current = obj;
    loop {
        let tag = parts
            .next()
            .and_then(parse_hex_tag)
            .ok_or_else(|| bad("expected an 8-hex-digit tag"))?;
        let elem = current.get(tag).ok_or_else(|| bad("no such attribute"))?;
        match (elem.value(), parts.next()) {
            (DicomValue::Primitive(p), None) => return Ok(p.to_bytes().into_owned()),
            (DicomValue::PixelSequence(_), None) => {
                return Err(DicomWebError::Unsupported(
                    "encapsulated pixel data is retrieved as frames".into(),
                ))
            }
            (DicomValue::Sequence(seq), Some(index)) => {
                let i: usize = index.parse().map_err(|_| bad("expected an item index"))?;
                current = seq
                    .items()
                    .get(i)
                    .ok_or_else(|| bad("no such sequence item"))?;
            }
            _ => return Err(bad("path does not name a value")),
        }
    }
}

/// `GGGGEEEE` as a tag (PS3.18 §F.2.1.1).
pub(crate) fn parse_hex_tag(s: &str) -> Option<Tag> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let v = u32::from_str_radix(s, 16).ok()?;
    Some(Tag((v >> 16) as u16, (v & 0xFFFF) as u16))
}

/// The 8-digit upper-case hex form of a tag.
pub(crate) fn hex_tag(tag: Tag) -> String {
    format!("{:04X}{:04X}", tag.group(), tag.element())
}

fn dataset_json(obj: &InMemDicomObject, path: &str, opts: &JsonOptions) -> Value {
    let mut out = Map::new();
    for e in obj.iter() {
        let tag = e.tag();
        if tag.element() == 0x0000 {
            continue; // group length (PS3.5 §7.2), meaningless once re-encoded
        }
        let key = hex_tag(tag);
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}/{key}")
        };
        let vr = e.vr();
        let mut attr = Map::new();
        attr.insert("vr".into(), Value::String(vr.to_string().to_owned()));
        let bulk_uri = || Value::String(format!("{}/{here}", opts.bulk_base));
        match e.value() {
            DicomValue::Sequence(seq) => {
                let items: Vec<Value> = seq
                    .items()
                    .iter()
                    .enumerate()
                    .map(|(i, item)| dataset_json(item, &format!("{here}/{i}"), opts))
                    .collect();
                if !items.is_empty() {
                    attr.insert("Value".into(), Value::Array(items));
                }
            }
            DicomValue::PixelSequence(_) => {
                attr.insert("BulkDataURI".into(), bulk_uri());
            }
            DicomValue::Primitive(p) => {
                if matches!(p, PrimitiveValue::Empty) || p.calculate_byte_len() == 0 {
                    // no "Value" key (§F.2.5)
                } else if tag == tags::PIXEL_DATA {
                    attr.insert("BulkDataURI".into(), bulk_uri());
                } else if is_binary(vr) {
                    let bytes = p.to_bytes();
                    if bytes.len() > opts.bulk_threshold {
                        attr.insert("BulkDataURI".into(), bulk_uri());
                    } else {
                        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
                        attr.insert("InlineBinary".into(), Value::String(b64));
                    }
                } else if may_be_bulk(vr) && p.calculate_byte_len() > opts.bulk_threshold {
                    attr.insert("BulkDataURI".into(), bulk_uri());
                } else if tag == tags::SPECIFIC_CHARACTER_SET {
                    attr.insert("Value".into(), Value::Array(vec!["ISO_IR 192".into()]));
                } else {
                    let values = primitive_values(vr, p);
                    if !values.is_empty() {
                        attr.insert("Value".into(), Value::Array(values));
                    }
                }
            }
        }
        out.insert(key, Value::Object(attr));
    }
    Value::Object(out)
}

/// VRs whose values are bytes in JSON (§F.2.7).
fn is_binary(vr: VR) -> bool {
    matches!(
        vr,
        VR::OB | VR::OD | VR::OF | VR::OL | VR::OV | VR::OW | VR::UN
    )
}

/// Other VRs that PS3.18 §8.7.3.2 lets a server send as bulk data.
fn may_be_bulk(vr: VR) -> bool {
    matches!(
        vr,
        VR::FL
            | VR::FD
            | VR::IS
            | VR::LT
            | VR::SL
            | VR::SS
            | VR::ST
            | VR::SV
            | VR::UC
            | VR::UL
            | VR::US
            | VR::UT
            | VR::UV
    )
}

/// The `"Value"` array of a primitive value.
fn primitive_values(vr: VR, p: &PrimitiveValue) -> Vec<Value> {
    match vr {
        VR::PN => texts(vr, p).into_iter().map(person_name).collect(),
        VR::IS | VR::DS => texts(vr, p).into_iter().map(number_string).collect(),
        VR::AT => match p {
            PrimitiveValue::Tags(t) => t.iter().map(|t| Value::String(hex_tag(*t))).collect(),
            other => other
                .to_bytes()
                .chunks_exact(4)
                .map(|c| {
                    let g = u16::from_le_bytes([c[0], c[1]]);
                    let e = u16::from_le_bytes([c[2], c[3]]);
                    Value::String(hex_tag(Tag(g, e)))
                })
                .collect(),
        },
        VR::US | VR::SS | VR::UL | VR::SL | VR::FL | VR::FD | VR::UV | VR::SV => {
            binary_numbers(vr, p)
        }
        _ => texts(vr, p)
            .into_iter()
            .map(|s| {
                if s.is_empty() {
                    Value::Null
                } else {
                    Value::String(s)
                }
            })
            .collect(),
    }
}

/// The text values of a primitive, padding removed (PS3.5 §6.2: trailing
/// spaces are insignificant in every text VR, leading ones too except in
/// LT, ST, UT and UR; UI pads with NUL). LT, ST, UT and UR hold one value
/// in which `\` is an ordinary character.
fn texts(vr: VR, p: &PrimitiveValue) -> Vec<String> {
    let raw: Vec<String> = match p {
        PrimitiveValue::Str(s) => vec![s.clone()],
        PrimitiveValue::Strs(v) => v.to_vec(),
        other => other.to_multi_str().to_vec(),
    };
    let single = matches!(vr, VR::LT | VR::ST | VR::UT | VR::UR);
    let raw = if single && raw.len() > 1 {
        vec![raw.join("\\")]
    } else {
        raw
    };
    raw.into_iter()
        .map(|s| {
            let end = s.trim_end_matches([' ', '\0']);
            if single {
                end.to_owned()
            } else {
                end.trim_start_matches(' ').to_owned()
            }
        })
        .collect()
}

/// PS3.18 §F.2.2: `{"Alphabetic": …, "Ideographic": …, "Phonetic": …}`.
fn person_name(s: String) -> Value {
    if s.is_empty() {
        return Value::Null;
    }
    let mut m = Map::new();
    for (group, key) in s
        .splitn(3, '=')
        .zip(["Alphabetic", "Ideographic", "Phonetic"])
    {
        let group = group.trim_end_matches(' ');
        if !group.is_empty() {
            m.insert(key.into(), Value::String(group.to_owned()));
        }
    }
    Value::Object(m)
}

/// An IS or DS value as a JSON number when it is one (§F.2.3), else the
/// text (§F.2.3.1); empty → `null`.
fn number_string(s: String) -> Value {
    if s.is_empty() {
        return Value::Null;
    }
    if let Ok(i) = s.parse::<i64>() {
        return Value::Number(i.into());
    }
    match s.parse::<f64>().ok().and_then(Number::from_f64) {
        Some(n) => Value::Number(n),
        None => Value::String(s),
    }
}

/// Largest integer a JSON number (IEEE double) holds exactly.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

fn binary_numbers(vr: VR, p: &PrimitiveValue) -> Vec<Value> {
    let float = |f: f64| Number::from_f64(f).map_or(Value::Null, Value::Number);
    match p {
        PrimitiveValue::U16(v) => v.iter().map(|x| Value::from(*x)).collect(),
        PrimitiveValue::I16(v) => v.iter().map(|x| Value::from(*x)).collect(),
        PrimitiveValue::U32(v) => v.iter().map(|x| Value::from(*x)).collect(),
        PrimitiveValue::I32(v) => v.iter().map(|x| Value::from(*x)).collect(),
        PrimitiveValue::U64(v) => v
            .iter()
            .map(|x| {
                if *x <= MAX_SAFE_INTEGER {
                    Value::from(*x)
                } else {
                    Value::String(x.to_string())
                }
            })
            .collect(),
        PrimitiveValue::I64(v) => v
            .iter()
            .map(|x| {
                if x.unsigned_abs() <= MAX_SAFE_INTEGER {
                    Value::from(*x)
                } else {
                    Value::String(x.to_string())
                }
            })
            .collect(),
        PrimitiveValue::F32(v) => v.iter().map(|x| float(f64::from(*x))).collect(),
        PrimitiveValue::F64(v) => v.iter().map(|x| float(*x)).collect(),
        // Anything else (e.g. numbers held as text): parse each value.
        other => texts(vr, other).into_iter().map(number_string).collect(),
    }
}

#[cfg(test)]
mod tests {
    use dicom_core::value::DataSetSequence;
    use dicom_core::{DataElement, Length};
    use serde_json::json;

    use super::*;

    fn obj(elems: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
        InMemDicomObject::from_element_iter(elems)
    }

    #[test]
    fn value_kinds() {
        let o = obj(vec![
            DataElement::new(
                tags::PATIENT_NAME,
                VR::PN,
                PrimitiveValue::from("Yamada^Tarou=山田^太郎=やまだ^たろう"),
            ),
            DataElement::new(tags::SLICE_THICKNESS, VR::DS, PrimitiveValue::from("2.50 ")),
            DataElement::new(
                tags::WINDOW_CENTER,
                VR::DS,
                PrimitiveValue::Strs(["40".to_owned(), "".to_owned(), "x1".to_owned()][..].into()),
            ),
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(512_u16)),
            DataElement::new(
                tags::FRAME_INCREMENT_POINTER,
                VR::AT,
                PrimitiveValue::Tags([tags::FRAME_TIME][..].into()),
            ),
            DataElement::new(tags::STUDY_DESCRIPTION, VR::LO, PrimitiveValue::Empty),
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::from(vec![1u8, 2, 3, 4]),
            ),
            DataElement::new(
                tags::REFERENCED_SERIES_SEQUENCE,
                VR::SQ,
                DataSetSequence::new(
                    vec![obj(vec![DataElement::new(
                        tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                        VR::OW,
                        PrimitiveValue::from(vec![0u8; 16]),
                    )])],
                    Length::UNDEFINED,
                ),
            ),
        ]);
        let opts = JsonOptions {
            bulk_base: "https://h/bulk".into(),
            bulk_threshold: 8,
        };
        let j = to_dicom_json(&o, &opts);
        assert_eq!(
            j["00100010"],
            json!({"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou",
                "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}]})
        );
        assert_eq!(j["00180050"]["Value"], json!([2.5]));
        assert_eq!(j["00281050"]["Value"], json!([40, null, "x1"]));
        assert_eq!(j["00280010"]["Value"], json!([512]));
        assert_eq!(j["00280009"]["Value"], json!(["00181063"]));
        assert_eq!(j["00081030"], json!({"vr": "LO"}));
        assert_eq!(
            j["7FE00010"],
            json!({"vr": "OW", "BulkDataURI": "https://h/bulk/7FE00010"})
        );
        assert_eq!(
            j["00081115"]["Value"][0]["00281201"]["BulkDataURI"],
            json!("https://h/bulk/00081115/0/00281201")
        );
        let small = JsonOptions {
            bulk_threshold: 64,
            ..opts
        };
        let j = to_dicom_json(&o, &small);
        assert_eq!(
            j["00081115"]["Value"][0]["00281201"]["InlineBinary"],
            json!("AAAAAAAAAAAAAAAAAAAAAA==")
        );
        assert_eq!(bulk_value(&o, "00081115/0/00281201"), Ok(vec![0u8; 16]));
        assert_eq!(bulk_value(&o, "7FE00010"), Ok(vec![1, 2, 3, 4]));
        assert!(bulk_value(&o, "00081115/1/00281201").is_err());
        assert!(bulk_value(&o, "../etc").is_err());
    }

    #[test]
    fn large_integers_stay_exact() {
        let o = obj(vec![DataElement::new(
            Tag(0x0009, 0x1001),
            VR::UV,
            PrimitiveValue::U64([1u64 << 60, 7][..].into()),
        )]);
        let j = to_dicom_json(&o, &JsonOptions::default());
        assert_eq!(j["00091001"]["Value"], json!(["1152921504606846976", 7]));
    }
}
