//! Attributes the index keeps, read from a parsed dataset, and the UID checks
//! of the ingest contract (PS3.5 §9.1; PS3.3 C.12.1 SOP Common, C.7.2.1
//! General Study, C.7.3.1 General Series).

use bastion_index::{InstanceAttrs, PatientAttrs, SeriesAttrs, StudyAttrs};
use bastion_model::Uid;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::ArchiveError;

/// The attributes of one instance for the index.
#[derive(Debug, Clone)]
pub struct Extracted {
    /// Patient level.
    pub patient: PatientAttrs,
    /// Study level.
    pub study: StudyAttrs,
    /// Series level.
    pub series: SeriesAttrs,
    /// Instance level.
    pub instance: InstanceAttrs,
}

/// The text of an attribute, trimmed of padding. Values encoded with VR UN
/// (e.g. by converters that lost the dictionary, as in the pydicom corpus'
/// `rtdose_rle.dcm`) are read as their raw characters.
fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    let Some(e) = obj.get(tag) else {
        return String::new();
    };
    let s = if e.vr() == VR::UN {
        e.to_bytes()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    } else {
        e.to_str().map(|s| s.into_owned()).unwrap_or_default()
    };
    s.trim_end_matches(['\0', ' ']).trim_start().to_owned()
}

fn int(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    let s = text(obj, tag);
    s.split('\\').next().and_then(|v| v.trim().parse().ok())
}

fn uid(obj: &InMemDicomObject, tag: Tag, name: &str) -> Result<String, ArchiveError> {
    let raw = text(obj, tag);
    if raw.is_empty() {
        return Err(ArchiveError::InvalidDataset(format!(
            "missing {name} {tag}"
        )));
    }
    Uid::parse(&raw)
        .map(|u| u.as_str().to_owned())
        .map_err(|e| ArchiveError::InvalidDataset(format!("{name} {tag}: {e}")))
}

/// Reads the indexed attributes and checks the four required UIDs.
///
/// # Errors
/// [`ArchiveError::InvalidDataset`] naming the missing or invalid UID.
pub fn extract(obj: &InMemDicomObject) -> Result<Extracted, ArchiveError> {
    // Multi-valued / ISO 2022 (0008,0005): text decoded with code extensions.
    let obj = &*crate::charset::normalize(obj);
    let sop_class_uid = uid(obj, tags::SOP_CLASS_UID, "SOP Class UID")?;
    let sop_instance_uid = uid(obj, tags::SOP_INSTANCE_UID, "SOP Instance UID")?;
    let study_instance_uid = uid(obj, tags::STUDY_INSTANCE_UID, "Study Instance UID")?;
    let series_instance_uid = uid(obj, tags::SERIES_INSTANCE_UID, "Series Instance UID")?;
    Ok(Extracted {
        patient: PatientAttrs {
            patient_id: text(obj, tags::PATIENT_ID),
            issuer_of_patient_id: text(obj, tags::ISSUER_OF_PATIENT_ID),
            patient_name: text(obj, tags::PATIENT_NAME),
            patient_birth_date: text(obj, tags::PATIENT_BIRTH_DATE),
            patient_sex: text(obj, tags::PATIENT_SEX),
        },
        study: StudyAttrs {
            study_instance_uid,
            study_date: text(obj, tags::STUDY_DATE),
            study_time: text(obj, tags::STUDY_TIME),
            accession_number: text(obj, tags::ACCESSION_NUMBER),
            study_id: text(obj, tags::STUDY_ID),
            study_description: text(obj, tags::STUDY_DESCRIPTION),
            referring_physician_name: text(obj, tags::REFERRING_PHYSICIAN_NAME),
            sequences: crate::query::sequences_json(obj, crate::query::Level::Study),
        },
        series: SeriesAttrs {
            series_instance_uid,
            modality: text(obj, tags::MODALITY),
            series_number: int(obj, tags::SERIES_NUMBER),
            series_description: text(obj, tags::SERIES_DESCRIPTION),
            body_part_examined: text(obj, tags::BODY_PART_EXAMINED),
            sequences: crate::query::sequences_json(obj, crate::query::Level::Series),
        },
        instance: InstanceAttrs {
            sop_instance_uid,
            sop_class_uid,
            instance_number: int(obj, tags::INSTANCE_NUMBER),
            transfer_syntax_uid: String::new(),
            rows: int(obj, tags::ROWS),
            columns: int(obj, tags::COLUMNS),
            number_of_frames: int(obj, tags::NUMBER_OF_FRAMES),
            specific_character_set: text(obj, tags::SPECIFIC_CHARACTER_SET),
            // DT is ASCII digits, `.`, `+`/`-`: no character set applies.
            acquisition_date_time: text(obj, tags::ACQUISITION_DATE_TIME),
        },
    })
}

/// The identifying attributes of the sending device (PS3.3 C.7.5.1 General
/// Equipment) for the device inventory.
pub fn device_headers(obj: &InMemDicomObject) -> bastion_detect::inventory::DeviceHeaders {
    bastion_detect::inventory::DeviceHeaders {
        manufacturer: text(obj, tags::MANUFACTURER),
        model: text(obj, tags::MANUFACTURER_MODEL_NAME),
        software_versions: text(obj, tags::SOFTWARE_VERSIONS),
        serial_number: text(obj, tags::DEVICE_SERIAL_NUMBER),
        station_name: text(obj, tags::STATION_NAME),
    }
}
