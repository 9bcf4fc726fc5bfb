-- PostgreSQL schema version 1 of the index (the engine's counterpart of the
-- SQLite schema versions 1-4, crates/index/src/schema.rs), in the schema
-- named by PgConnect::schema (search_path).
--
-- No plaintext patient data: identifying values live only inside the `pii`
-- columns (AES-256-GCM, see pg/crypt.rs); exact-match keys are HMAC-SHA256
-- of the value (`*_h`); Patient's Name prefixes are keyed hashes in
-- `patient_name_prefixes`. UIDs, dates used for range matching, modality,
-- numbers and the blob bookkeeping stay plain (docs/scale-out.md,
-- "Index on PostgreSQL", says what an observer learns).
-- `row_h` is a keyed hash of the whole row's values: an upsert that would
-- write the same values is skipped, so a study's hundreds of instances do
-- not rewrite its patient, study and series rows each time.

CREATE TABLE patients (
    id            BIGSERIAL PRIMARY KEY,
    -- HMAC of (PatientID, IssuerOfPatientID, key_name): the patient key of
    -- the SQLite engine, as a keyed hash.
    key_hash      BYTEA NOT NULL UNIQUE,
    patient_id_h  BYTEA NOT NULL,
    issuer_h      BYTEA NOT NULL,
    -- Patient's Name has several values or component groups: every name
    -- prefix filter keeps the row for the matcher (as the SQLite engine does).
    name_unsure   BOOLEAN NOT NULL,
    row_h         BYTEA NOT NULL,
    pii           BYTEA NOT NULL
);
CREATE INDEX patients_patient_id_h ON patients (patient_id_h);
CREATE INDEX patients_issuer_h     ON patients (issuer_h);
CREATE INDEX patients_name_unsure  ON patients (id) WHERE name_unsure;

CREATE TABLE patient_name_prefixes (
    h            BYTEA NOT NULL,
    patient_ref  BIGINT NOT NULL REFERENCES patients (id) ON DELETE CASCADE,
    PRIMARY KEY (h, patient_ref)
);
CREATE INDEX patient_name_prefixes_patient_ref ON patient_name_prefixes (patient_ref);

CREATE TABLE studies (
    id                  BIGSERIAL PRIMARY KEY,
    patient_ref         BIGINT NOT NULL REFERENCES patients (id),
    study_instance_uid  TEXT NOT NULL UNIQUE,
    study_date          TEXT COLLATE "C" NOT NULL,
    -- Not 8 digits (empty, ACR-NEMA dotted, padded): kept by every date
    -- range for the matcher. A column, not a regex in the query, so the
    -- planner has statistics for it (a regex is estimated at 90 %).
    date_noncanonical   BOOLEAN GENERATED ALWAYS AS (study_date !~ '^[0-9]{8}$') STORED,
    accession_h         BYTEA NOT NULL,
    study_id_h          BYTEA NOT NULL,
    row_h               BYTEA NOT NULL,
    pii                 BYTEA NOT NULL
);
CREATE INDEX studies_patient_ref  ON studies (patient_ref);
CREATE INDEX studies_study_date   ON studies (study_date);
CREATE INDEX studies_study_date_noncanonical ON studies (id) WHERE date_noncanonical;
CREATE INDEX studies_accession_h  ON studies (accession_h);
CREATE INDEX studies_study_id_h   ON studies (study_id_h);

CREATE TABLE series (
    id                   BIGSERIAL PRIMARY KEY,
    study_ref            BIGINT NOT NULL REFERENCES studies (id),
    series_instance_uid  TEXT NOT NULL UNIQUE,
    modality             TEXT NOT NULL,
    series_number        BIGINT,
    row_h                BYTEA NOT NULL,
    pii                  BYTEA NOT NULL
);
CREATE INDEX series_study_ref ON series (study_ref);
CREATE INDEX series_modality  ON series (modality);

CREATE TABLE instances (
    id                      BIGSERIAL PRIMARY KEY,
    series_ref              BIGINT NOT NULL REFERENCES series (id),
    sop_instance_uid        TEXT NOT NULL UNIQUE,
    sop_class_uid           TEXT NOT NULL,
    instance_number         BIGINT,
    transfer_syntax_uid     TEXT NOT NULL,
    "rows"                  BIGINT,
    "columns"               BIGINT,
    number_of_frames        BIGINT,
    specific_character_set  TEXT NOT NULL,
    blob_id                 TEXT NOT NULL,
    key_id                  TEXT NOT NULL,
    stored_size             BIGINT NOT NULL,
    stored_sha256           TEXT NOT NULL,
    content_sha256          TEXT NOT NULL,
    source_ae               TEXT NOT NULL,
    received_at             TEXT NOT NULL,
    acquisition_date_time   TEXT NOT NULL
);
CREATE INDEX instances_series_ref    ON instances (series_ref);
CREATE INDEX instances_sop_class_uid ON instances (sop_class_uid);
CREATE INDEX instances_blob_id       ON instances (blob_id);

CREATE TABLE replaced_instances (
    id                      BIGSERIAL PRIMARY KEY,
    sop_instance_uid        TEXT NOT NULL,
    study_instance_uid      TEXT NOT NULL,
    series_instance_uid     TEXT NOT NULL,
    sop_class_uid           TEXT NOT NULL,
    instance_number         BIGINT,
    transfer_syntax_uid     TEXT NOT NULL,
    "rows"                  BIGINT,
    "columns"               BIGINT,
    number_of_frames        BIGINT,
    specific_character_set  TEXT NOT NULL,
    blob_id                 TEXT NOT NULL,
    key_id                  TEXT NOT NULL,
    stored_size             BIGINT NOT NULL,
    stored_sha256           TEXT NOT NULL,
    content_sha256          TEXT NOT NULL,
    source_ae               TEXT NOT NULL,
    received_at             TEXT NOT NULL,
    acquisition_date_time   TEXT NOT NULL,
    replaced_at             TEXT NOT NULL
);
CREATE INDEX replaced_instances_sop_instance_uid ON replaced_instances (sop_instance_uid);
CREATE INDEX replaced_instances_blob_id          ON replaced_instances (blob_id);

-- One row: a keyed hash proving which index key wrote this database, so a
-- wrong key is refused at open (IndexError::WrongKey) instead of failing on
-- the first encrypted column.
CREATE TABLE key_check (
    one  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    mac  BYTEA NOT NULL
);
