//! Schema migrations. Each entry of [`MIGRATIONS`] brings the schema from version
//! `index` to `index + 1`; the applied version is kept in `schema_version`.

/// Schema version 1: the patient / study / series / instance hierarchy.
///
/// Attributes are stored exactly as received ("" when absent, NULL for absent numbers);
/// the only derived column is `patients.key_name`, the technical patient key (see
/// `Index::commit_batch`). Columns that C-FIND/QIDO match on are indexed.
const V1: &str = r#"
CREATE TABLE patients (
    id                    INTEGER PRIMARY KEY,
    patient_id            TEXT NOT NULL,
    issuer_of_patient_id  TEXT NOT NULL,
    -- patient_name when patient_id is empty, else '': part of the patient key only.
    key_name              TEXT NOT NULL,
    patient_name          TEXT NOT NULL,
    patient_birth_date    TEXT NOT NULL,
    patient_sex           TEXT NOT NULL,
    UNIQUE (patient_id, issuer_of_patient_id, key_name)
);
CREATE INDEX patients_patient_id   ON patients (patient_id);
CREATE INDEX patients_patient_name ON patients (patient_name);

CREATE TABLE studies (
    id                        INTEGER PRIMARY KEY,
    patient_ref               INTEGER NOT NULL REFERENCES patients (id),
    study_instance_uid        TEXT NOT NULL UNIQUE,
    study_date                TEXT NOT NULL,
    study_time                TEXT NOT NULL,
    accession_number          TEXT NOT NULL,
    study_id                  TEXT NOT NULL,
    study_description         TEXT NOT NULL,
    referring_physician_name  TEXT NOT NULL
);
CREATE INDEX studies_patient_ref      ON studies (patient_ref);
CREATE INDEX studies_study_date       ON studies (study_date);
CREATE INDEX studies_accession_number ON studies (accession_number);

CREATE TABLE series (
    id                   INTEGER PRIMARY KEY,
    study_ref            INTEGER NOT NULL REFERENCES studies (id),
    series_instance_uid  TEXT NOT NULL UNIQUE,
    modality             TEXT NOT NULL,
    series_number        INTEGER,
    series_description   TEXT NOT NULL,
    body_part_examined   TEXT NOT NULL
);
CREATE INDEX series_study_ref ON series (study_ref);
CREATE INDEX series_modality  ON series (modality);

CREATE TABLE instances (
    id                      INTEGER PRIMARY KEY,
    series_ref              INTEGER NOT NULL REFERENCES series (id),
    sop_instance_uid        TEXT NOT NULL UNIQUE,
    sop_class_uid           TEXT NOT NULL,
    instance_number         INTEGER,
    transfer_syntax_uid     TEXT NOT NULL,
    "rows"                  INTEGER,
    "columns"               INTEGER,
    number_of_frames        INTEGER,
    specific_character_set  TEXT NOT NULL,
    blob_id                 TEXT NOT NULL,
    key_id                  TEXT NOT NULL,
    stored_size             INTEGER NOT NULL,
    stored_sha256           TEXT NOT NULL,
    content_sha256          TEXT NOT NULL,
    source_ae               TEXT NOT NULL,
    received_at             TEXT NOT NULL
);
CREATE INDEX instances_series_ref    ON instances (series_ref);
CREATE INDEX instances_sop_class_uid ON instances (sop_class_uid);
CREATE INDEX instances_blob_id       ON instances (blob_id);

-- Instance rows superseded by OnConflict::Replace, kept for recovery. The hierarchy is
-- recorded by UID (not by reference) so the old patient/study/series rows may go.
CREATE TABLE replaced_instances (
    id                      INTEGER PRIMARY KEY,
    sop_instance_uid        TEXT NOT NULL,
    study_instance_uid      TEXT NOT NULL,
    series_instance_uid     TEXT NOT NULL,
    sop_class_uid           TEXT NOT NULL,
    instance_number         INTEGER,
    transfer_syntax_uid     TEXT NOT NULL,
    "rows"                  INTEGER,
    "columns"               INTEGER,
    number_of_frames        INTEGER,
    specific_character_set  TEXT NOT NULL,
    blob_id                 TEXT NOT NULL,
    key_id                  TEXT NOT NULL,
    stored_size             INTEGER NOT NULL,
    stored_sha256           TEXT NOT NULL,
    content_sha256          TEXT NOT NULL,
    source_ae               TEXT NOT NULL,
    received_at             TEXT NOT NULL,
    replaced_at             TEXT NOT NULL
);
CREATE INDEX replaced_instances_sop_instance_uid ON replaced_instances (sop_instance_uid);
CREATE INDEX replaced_instances_blob_id          ON replaced_instances (blob_id);
"#;

/// Schema version 2: matchable sequences for C-FIND/QIDO (PS3.4 §C.2.2.2.6).
///
/// `sequences` holds the indexed sequence attributes of a study or series as opaque
/// text written by the archive layer (JSON: `{"00081032": [{"00080100": "X"}]}`);
/// the index neither parses nor interprets it. Rows indexed before version 2 hold `''`
/// (no sequence known) until their instances are re-indexed.
const V2: &str = r#"
ALTER TABLE studies ADD COLUMN sequences TEXT NOT NULL DEFAULT '';
ALTER TABLE series  ADD COLUMN sequences TEXT NOT NULL DEFAULT '';
"#;

/// Schema version 3: StudyDate range matching through an index.
///
/// A range on `studies.study_date` is answered as "canonical values in range
/// (`studies_study_date`) or any non-canonical value (this partial index, which
/// holds only the rare values that are not 8 digits: empty, ACR-NEMA dotted,
/// padded)"; the archive's matcher then decides those. The WHERE clause here
/// must stay identical to [`crate::query`]'s `NONCANONICAL_DATE` for SQLite to
/// use the index.
const V3: &str = r#"
CREATE INDEX studies_study_date_noncanonical ON studies (study_date)
    WHERE length(study_date) != 8 OR study_date GLOB '*[^0-9]*';
"#;

/// Schema version 4: Acquisition DateTime (0008,002A, DT) at instance level, the
/// first DT attribute C-FIND/QIDO can match (PS3.4 §C.2.2.2.5), stored as
/// received like every other attribute (`''` when absent).
///
/// Instances indexed before version 4 (older data directories) hold `''` until
/// they are re-indexed from their blobs: until then they match only universal
/// Acquisition DateTime keys, and are returned with a zero-length value.
/// `replaced_instances` mirrors the instance columns, so it gets the column too.
const V4: &str = r#"
ALTER TABLE instances          ADD COLUMN acquisition_date_time TEXT NOT NULL DEFAULT '';
ALTER TABLE replaced_instances ADD COLUMN acquisition_date_time TEXT NOT NULL DEFAULT '';
"#;

/// All migrations in order; the schema version after applying `MIGRATIONS[..n]` is `n`.
pub(crate) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4];
