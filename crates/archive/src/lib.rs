//! # bastion-archive: the one place that stores and finds
//!
//! [`Archive`] runs the ingest pipeline shared by C-STORE and
//! `bastion import` (DESIGN §4): bound the encoding ([`scan`]), parse the
//! attributes before Pixel Data with dicom-object, validate the UIDs
//! ([`extract`]), zero the Part 10 preamble, encrypt into the blob store
//! (durable), commit the index row (group commit), record the event.
//!
//! Invariants:
//! - an instance is visible (indexed) only after its blob is durable;
//! - an acknowledged instance is never overwritten silently: a different
//!   dataset under a stored SOP Instance UID is [`ArchiveError::Conflict`]
//!   unless the device's policy is replace, which keeps the old version;
//! - the query engine ([`query`]) implements PS3.4 §C.2.2.2 matching once, for
//!   C-FIND, QIDO-RS and retrieve resolution; it never logs patient data and
//!   records every query in the event log;
//! - nothing here knows dicom-ul, HTTP or SQL: errors are [`ArchiveError`],
//!   mapped to DIMSE statuses by `bastion-dimse` in one function.

pub mod budget;
pub mod charset;
pub mod extract;
pub mod ingest;
pub mod isolated;
pub mod part10;
pub mod query;
pub mod scan;
pub mod spill;
pub mod transcode;
pub mod unknown_vr;

pub use ingest::{Archive, Ingested, InstanceStream, Limits, OnConflict, Origin, Received};
pub use query::{InstanceRef, PatientOf};

/// Bastion's Implementation Class UID (PS3.7 §D.3.3.2), a UUID-derived UID
/// under the `2.25` root (PS3.5 §B.2).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.217307463911476283307014052718592140379";
/// Bastion's Implementation Version Name (≤ 16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = "BASTION_0_1";
/// The AE title recorded for instances that `bastion import` stored.
pub const IMPORT_AE: &str = "IMPORT";

/// Why an ingest or a read failed. Each variant maps to one DIMSE status
/// (see `bastion_dimse::status`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ArchiveError {
    /// The bytes are not a parseable dataset or Part 10 file (0xC000).
    #[error("not a valid DICOM dataset: {0}")]
    NotDicom(String),
    /// A required UID is missing or invalid, or the dataset contradicts the
    /// command (0xA900).
    #[error("{0}")]
    InvalidDataset(String),
    /// A different dataset under a stored SOP Instance UID (0x0111).
    #[error(
        "SOP Instance UID {sop_instance_uid} is already stored with different content; refused"
    )]
    Conflict {
        /// The UID.
        sop_instance_uid: bastion_model::Uid,
    },
    /// Over a configured size limit (0xA700).
    #[error("dataset exceeds the configured limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The global memory budget has no room now (0xA700; STOW-RS 503 with
    /// `Retry-After` for a whole request): retrying later may succeed.
    #[error("the server's memory budget of {limit} bytes is in use; retry later")]
    Busy {
        /// The global budget in bytes.
        limit: u64,
    },
    /// The ingest spool's disk budget (`spool_budget_mib`) has no room now
    /// for a dataset too large for memory (0xA700): retrying later may
    /// succeed.
    #[error(
        "the ingest spool's disk budget of {limit} bytes (spool_budget_mib) is in use; retry later"
    )]
    SpoolFull {
        /// The spool budget in bytes.
        limit: u64,
    },
    /// A spilled dataset's attributes before Pixel Data (all of it, when it
    /// has none: an encapsulated PDF, a large RT Structure Set) are parsed in
    /// memory and exceed one transfer's share (0xA700).
    #[error("attributes before Pixel Data exceed the memory share of {limit} bytes (transfer_budget_mib)")]
    AttributesTooLarge {
        /// The share in bytes.
        limit: u64,
    },
    /// The disk is full (0xA700).
    #[error("out of storage space")]
    NoSpace,
    /// The blob store (an object store) is unreachable, failing or refusing the
    /// credentials, or the index database (PostgreSQL) cannot be reached:
    /// nothing was acknowledged (C-STORE 0xA700 Refused: Out of Resources,
    /// PS3.4 §B.2.3; STOW-RS 503 with `Retry-After`, PS3.18 §10.5.3; C-FIND
    /// 0xC000). The detail names the store or the index database and the
    /// operation, never credentials; it goes to the operator log only.
    #[error("image store unavailable: {0}")]
    StoreUnavailable(String),
    /// No such instance.
    #[error("no instance with SOP Instance UID {0}")]
    NotFound(String),
    /// A query identifier the engine refuses (0xA900 Identifier does not match SOP
    /// Class, with Offending Element (0000,0901); PS3.4 §C.4.1.1.4).
    #[error("{comment}")]
    InvalidQuery {
        /// Why, naming the attribute by tag, never its value.
        comment: String,
        /// The attribute(s) at fault.
        offending: Vec<dicom_core::Tag>,
    },
    /// A query matched more than the configured `max_matches` (0xA700 Refused: Out
    /// of Resources, and no match is returned).
    #[error("more than {limit} matches: refine the query")]
    TooManyMatches {
        /// The configured limit.
        limit: usize,
    },
    /// Anything else (0xA700 on the wire; details in the operator log).
    #[error("internal error: {0}")]
    Internal(String),
}
