//! Conversion between the uncompressed transfer syntaxes (PS3.5 §A.1–A.3,
//! plus Deflated Explicit VR Little Endian §A.5 as a source) for retrieval:
//! PS3.4 C.4.2.2 lets a C-MOVE/C-GET SCP send an instance in a transfer
//! syntax the destination accepts when it can produce it. Encapsulated
//! (compressed) pixel data is never decoded here: such instances go out as
//! stored or not at all.
//!
//! dicom-object does the decoding and encoding; stored datasets passed the
//! ingest bounds check ([`crate::scan`]) before they were stored.

use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::ArchiveError;

/// Implicit VR Little Endian.
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Explicit VR Little Endian.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// Explicit VR Big Endian (retired).
pub const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
/// Deflated Explicit VR Little Endian.
pub const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";

/// Targets offered as a fallback, in order of preference.
pub const FALLBACKS: [&str; 2] = [EXPLICIT_VR_LE, IMPLICIT_VR_LE];

/// Whether a dataset stored in `from` can be re-encoded in `to`.
pub fn can_transcode(from: &str, to: &str) -> bool {
    let uncompressed = |ts: &str| matches!(ts, IMPLICIT_VR_LE | EXPLICIT_VR_LE | EXPLICIT_VR_BE);
    from != to && (uncompressed(from) || from == DEFLATED_EXPLICIT_VR_LE) && uncompressed(to)
}

/// Re-encodes `dataset` (bytes in `from`) in `to`.
///
/// # Errors
/// [`ArchiveError::NotDicom`] when the pair is not supported or the dataset
/// cannot be decoded or encoded.
pub fn transcode(dataset: &[u8], from: &str, to: &str) -> Result<Vec<u8>, ArchiveError> {
    if !can_transcode(from, to) {
        return Err(ArchiveError::NotDicom(format!(
            "cannot convert {from} to {to}"
        )));
    }
    let lookup = |ts: &str| {
        TransferSyntaxRegistry
            .get(ts)
            .ok_or_else(|| ArchiveError::NotDicom(format!("unknown transfer syntax {ts}")))
    };
    let obj = InMemDicomObject::read_dataset_with_ts(dataset, lookup(from)?)
        .map_err(|e| ArchiveError::NotDicom(format!("stored dataset cannot be decoded: {e}")))?;
    let mut out = Vec::with_capacity(dataset.len() + 1024);
    obj.write_dataset_with_ts(&mut out, lookup(to)?)
        .map_err(|e| ArchiveError::NotDicom(format!("dataset cannot be encoded in {to}: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;

    #[test]
    fn explicit_to_implicit_and_back_keeps_the_values() {
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3\0"),
            ),
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^John")),
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(512_u16)),
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::from(vec![1u8, 2, 3, 4]),
            ),
        ]);
        let mut evr = Vec::new();
        let Some(ts) = TransferSyntaxRegistry.get(EXPLICIT_VR_LE) else {
            panic!("registry")
        };
        assert!(obj.write_dataset_with_ts(&mut evr, ts).is_ok());
        let ivr = transcode(&evr, EXPLICIT_VR_LE, IMPLICIT_VR_LE).unwrap_or_default();
        assert_ne!(ivr, evr);
        // implicit VR: the 4-byte length follows the tag directly
        assert_eq!(&ivr[..8], &[0x08, 0x00, 0x18, 0x00, 6, 0, 0, 0]);
        assert_eq!(
            transcode(&ivr, IMPLICIT_VR_LE, EXPLICIT_VR_LE).unwrap_or_default(),
            evr
        );
        assert!(!can_transcode("1.2.840.10008.1.2.4.50", EXPLICIT_VR_LE));
        assert!(transcode(&evr, EXPLICIT_VR_LE, EXPLICIT_VR_LE).is_err());
    }
}
