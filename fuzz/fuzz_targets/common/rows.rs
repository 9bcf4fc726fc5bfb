//! Index rows for the matcher targets: one with realistic values and one
//! whose every stored value (text, numbers, the sequence-item JSON) comes
//! from the fuzz input, so both the query side and the stored side of
//! `Query::row_matches` are explored.

use bastion_index::query::{EntityIds, EntityRow};
use bastion_index::{InstanceAttrs, PatientAttrs, SeriesAttrs, StudyAttrs};

/// A row like the ones ingest writes.
pub fn realistic() -> EntityRow {
    EntityRow {
        ids: EntityIds {
            patient: 1,
            study: Some(1),
            series: Some(1),
            instance: Some(1),
        },
        patient: PatientAttrs {
            patient_id: "FUZZ-1".into(),
            issuer_of_patient_id: String::new(),
            patient_name: "Doe^Jane^^Dr".into(),
            patient_birth_date: "19700101".into(),
            patient_sex: "F".into(),
        },
        study: StudyAttrs {
            study_instance_uid: "1.2.3.4".into(),
            study_date: "20240229".into(),
            study_time: "235959.123".into(),
            accession_number: "A1".into(),
            study_id: "S1".into(),
            study_description: "CT HEAD".into(),
            referring_physician_name: "Who^Ref".into(),
            sequences: r#"{"00081032":[{"00080100":"X1","00080102":"L"}]}"#.into(),
        },
        series: SeriesAttrs {
            series_instance_uid: "1.2.3.4.5".into(),
            modality: "CT".into(),
            series_number: Some(3),
            series_description: "AX".into(),
            body_part_examined: "HEAD".into(),
            sequences: String::new(),
        },
        instance: InstanceAttrs {
            sop_instance_uid: "1.2.3.4.5.6".into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            instance_number: Some(7),
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            rows: Some(512),
            columns: Some(512),
            number_of_frames: None,
            specific_character_set: "ISO_IR 192".into(),
            acquisition_date_time: "20240229235959.5+0100".into(),
        },
    }
}

/// A row whose every value is `v` (numbers: `v` parsed, if it parses).
pub fn from_input(v: &str) -> EntityRow {
    let n = v.trim().parse::<i64>().ok();
    let s = || v.to_owned();
    EntityRow {
        ids: EntityIds {
            patient: 2,
            study: Some(2),
            series: Some(2),
            instance: Some(2),
        },
        patient: PatientAttrs {
            patient_id: s(),
            issuer_of_patient_id: s(),
            patient_name: s(),
            patient_birth_date: s(),
            patient_sex: s(),
        },
        study: StudyAttrs {
            study_instance_uid: s(),
            study_date: s(),
            study_time: s(),
            accession_number: s(),
            study_id: s(),
            study_description: s(),
            referring_physician_name: s(),
            sequences: s(),
        },
        series: SeriesAttrs {
            series_instance_uid: s(),
            modality: s(),
            series_number: n,
            series_description: s(),
            body_part_examined: s(),
            sequences: s(),
        },
        instance: InstanceAttrs {
            sop_instance_uid: s(),
            sop_class_uid: s(),
            instance_number: n,
            transfer_syntax_uid: s(),
            rows: n,
            columns: n,
            number_of_frames: n,
            specific_character_set: s(),
            acquisition_date_time: s(),
        },
    }
}
