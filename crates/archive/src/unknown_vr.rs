//! Standard attributes whose values arrived with VR UN, read with their data
//! dictionary VR.
//!
//! Converters that lost the data dictionary write known attributes as UN in
//! explicit VR transfer syntaxes (the corpus' `explicit_VR-UN.dcm` has Study
//! Date, Modality, Patient's Name, Pixel Spacing… as UN). PS3.5 §6.2.2
//! says a UN value holds the bytes the attribute would have in Implicit VR
//! Little Endian, so the value is decoded by handing exactly that encoding —
//! the tag, the length, the bytes — to dicom-rs's implicit VR reader, which
//! takes the VR from the dictionary (text, numbers, AT, and sequences
//! alike). Private attributes (odd groups), attributes the dictionary does
//! not know and values that do not decode stay UN.
//!
//! The stored instance is never changed (it stays as received, byte for
//! byte): this is applied where Bastion *reads* a dataset for a client —
//! DICOMweb metadata and rendering — so that they show what QIDO-RS and
//! C-FIND (which read the same values from the index) show.

use dicom_core::{
    dictionary::{DataDictionary, DataDictionaryEntry},
    header::Header,
    value::{DataSetSequence, Value},
    DataElement, Length, VR,
};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries;

/// Most bytes of one UN value decoded (larger ones, e.g. a mis-labelled
/// pixel data, stay UN).
pub const MAX_UN_VALUE: usize = 16 << 20;

/// `obj` with every standard attribute encoded as UN read with its
/// dictionary VR, in nested sequence items too; `None` when there is none
/// (the common case: no copy).
pub fn resolve_unknown_vrs(obj: &InMemDicomObject) -> Option<InMemDicomObject> {
    if !has_unknown(obj) {
        return None;
    }
    Some(resolve(obj))
}

fn has_unknown(obj: &InMemDicomObject) -> bool {
    obj.iter().any(|e| {
        e.vr() == VR::UN && e.tag().group() % 2 == 0
            || match e.value() {
                Value::Sequence(s) => s.items().iter().any(has_unknown),
                _ => false,
            }
    })
}

fn resolve(obj: &InMemDicomObject) -> InMemDicomObject {
    let mut out = InMemDicomObject::new_empty();
    for e in obj.iter() {
        let resolved = match e.value() {
            Value::Sequence(s) => {
                let items: Vec<InMemDicomObject> = s.items().iter().map(resolve).collect();
                let vr = if e.vr() == VR::UN { VR::SQ } else { e.vr() };
                DataElement::new(
                    e.tag(),
                    vr,
                    Value::Sequence(DataSetSequence::new(items, Length::UNDEFINED)),
                )
            }
            _ if e.vr() == VR::UN => decode(e).unwrap_or_else(|| e.clone()),
            _ => e.clone(),
        };
        out.put(resolved);
    }
    out
}

/// One UN element read as Implicit VR Little Endian (PS3.5 §6.2.2).
fn decode(e: &DataElement<InMemDicomObject>) -> Option<DataElement<InMemDicomObject>> {
    let tag = e.tag();
    if tag.group() % 2 == 1 {
        return None;
    }
    let entry = StandardDataDictionary.by_tag(tag)?;
    if entry.vr().relaxed() == VR::UN {
        return None;
    }
    let bytes = e.to_bytes().ok()?;
    if bytes.len() > MAX_UN_VALUE {
        return None;
    }
    let len = u32::try_from(bytes.len()).ok()?;
    let mut buf = Vec::with_capacity(bytes.len() + 8);
    buf.extend_from_slice(&tag.group().to_le_bytes());
    buf.extend_from_slice(&tag.element().to_le_bytes());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&bytes);
    let ts = entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let parsed = InMemDicomObject::read_dataset_with_ts(&buf[..], &ts).ok()?;
    let out = parsed.get(tag)?.clone();
    (out.vr() != VR::UN).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{PrimitiveValue, Tag};
    use dicom_dictionary_std::tags;

    fn un(tag: Tag, bytes: &[u8]) -> DataElement<InMemDicomObject> {
        DataElement::new(tag, VR::UN, PrimitiveValue::from(bytes.to_vec()))
    }

    #[test]
    fn text_numbers_and_multi_values_get_the_dictionary_vr() {
        let mut obj = InMemDicomObject::new_empty();
        obj.put(un(tags::MODALITY, b"CT"));
        obj.put(un(tags::PATIENT_NAME, b"PANCREAS_0001 "));
        obj.put(un(tags::PIXEL_SPACING, b"0.859375\\0.859375 "));
        obj.put(un(tags::ROWS, &512u16.to_le_bytes()));
        obj.put(un(Tag(0x0013, 0x1010), b"private"));
        obj.put(DataElement::new(
            tags::COLUMNS,
            VR::US,
            PrimitiveValue::from(256u16),
        ));
        let out = resolve_unknown_vrs(&obj).expect("has UN");
        let get = |t| out.get(t).expect("present");
        assert_eq!(get(tags::MODALITY).vr(), VR::CS);
        assert_eq!(get(tags::MODALITY).to_str().expect("text"), "CT");
        assert_eq!(get(tags::PATIENT_NAME).vr(), VR::PN);
        assert_eq!(get(tags::PIXEL_SPACING).vr(), VR::DS);
        assert_eq!(
            get(tags::PIXEL_SPACING).to_multi_float64().expect("DS"),
            vec![0.859375, 0.859375]
        );
        assert_eq!(get(tags::ROWS).vr(), VR::US);
        assert_eq!(get(tags::ROWS).to_int::<u16>().expect("US"), 512);
        assert_eq!(get(Tag(0x0013, 0x1010)).vr(), VR::UN, "private stays UN");
        assert_eq!(get(tags::COLUMNS).to_int::<u16>().expect("US"), 256);
    }

    #[test]
    fn nothing_to_resolve_means_no_copy() {
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(tags::MODALITY, VR::CS, "MR"));
        assert!(resolve_unknown_vrs(&obj).is_none());
    }

    #[test]
    fn a_sequence_inside_un_bytes_is_read_as_sq() {
        // Referenced Series Sequence, one item holding Series Instance UID,
        // both in implicit VR LE with explicit lengths.
        let uid = b"1.2.3.4\0";
        let mut item = Vec::new();
        item.extend_from_slice(&0x0020u16.to_le_bytes());
        item.extend_from_slice(&0x000Eu16.to_le_bytes());
        item.extend_from_slice(&(uid.len() as u32).to_le_bytes());
        item.extend_from_slice(uid);
        let mut seq = Vec::new();
        seq.extend_from_slice(&0xFFFEu16.to_le_bytes());
        seq.extend_from_slice(&0xE000u16.to_le_bytes());
        seq.extend_from_slice(&(item.len() as u32).to_le_bytes());
        seq.extend_from_slice(&item);
        let mut obj = InMemDicomObject::new_empty();
        obj.put(un(tags::REFERENCED_SERIES_SEQUENCE, &seq));
        let out = resolve_unknown_vrs(&obj).expect("has UN");
        let e = out.get(tags::REFERENCED_SERIES_SEQUENCE).expect("present");
        assert_eq!(e.vr(), VR::SQ);
        let items = e.items().expect("items");
        assert_eq!(items.len(), 1);
        assert_eq!(
            items[0]
                .get(tags::SERIES_INSTANCE_UID)
                .expect("uid")
                .to_str()
                .expect("text")
                .trim_end_matches('\0'),
            "1.2.3.4"
        );
    }
}
