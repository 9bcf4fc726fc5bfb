//! The tamper-evident audit trail, `DIR/audit/` (DESIGN §2 "audit").
//!
//! Every event of the event stream ([`crate::events::EventLog`]) reaches
//! [`AuditTrail`] through [`crate::events::EventObserver`] and becomes one
//! *record*: the event, the patients and studies it concerns (looked up by
//! a [`PatientLookup`] the binary provides, since the event log itself never
//! names patients) and its DICOM audit messages ([`message`], PS3.15 A.5).
//!
//! ```text
//! DIR/audit/records       one record per line (JSON):
//!                         {"seq":N,"prev":"<SHA-256 of line N-1>","nonce":"<hex>","ct":"<base64>"}
//!                         ct = AES-256-GCM(key, nonce, aad = "bastion audit v1" | seq | prev, plaintext)
//! DIR/audit/checkpoints   one signed checkpoint per line (JSON):
//!                         {"n":K,"count":C,"head":"<hash of record C-1>","ts":..,"prev":"<SHA-256 of checkpoint line K-1>","sig":"<Ed25519>"}
//! DIR/audit/lock          flock(2) held around every append (serve and CLI processes)
//! ```
//!
//! The encryption key is derived from the master key (`bastion audit v1`),
//! the checkpoint key is `secrets/audit-signing.key` (Ed25519), kept apart
//! from the records. After each checkpoint a marker record
//! (`audit.checkpoint`, naming it) is appended, so a truncated checkpoints
//! file is detected by the records that name the lost checkpoints.
//! [`verify`] streams the records (memory independent of their number).

mod health;
pub mod message;
mod trail;

pub use health::{
    AuditGate, AuditHealth, RecordingChange, CHECKPOINT_RESERVE_BYTES, RESERVE_BYTES,
};

pub use message::{private_query, AuditIdentity};
pub use trail::{
    read, verify, AuditKeys, AuditReader, AuditTrail, Broken, CheckpointPolicy, Record,
    TrailCursor, VerifyReport,
};

use std::path::PathBuf;

/// A patient (and study) an event concerns; only in the encrypted trail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Subject {
    /// Patient ID (0010,0020).
    pub patient_id: String,
    /// Patient's Name (0010,0010).
    pub patient_name: String,
    /// Study Instance UID, when known.
    pub study_uid: Option<String>,
}

/// Finds the patients an event concerns (implemented by the binary over the
/// index). Called on the recording thread: must be quick and never block on
/// the network.
pub trait PatientLookup: Send + Sync {
    /// The subject of one stored instance.
    fn by_instance(&self, sop_instance_uid: &str) -> Option<Subject>;
    /// The subject of one study.
    fn by_study(&self, study_instance_uid: &str) -> Option<Subject>;
}

/// Errors of the audit trail.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Which file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The trail does not exist where it should.
    #[error("no audit trail at {0}: it is created by `bastion init`; if this data directory predates the audit trail, start one with `bastion audit init` (a missing trail is never re-created silently)")]
    Missing(PathBuf),
    /// A key is missing or unusable.
    #[error("audit key: {0}")]
    Key(String),
    /// The trail's last record cannot be read (so nothing can be chained to it).
    #[error("the audit trail's last record is unreadable ({0}); run `bastion audit verify`")]
    Head(String),
}

/// A search of the trail (`bastion audit search`, `GET /api/audit`). Empty
/// fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// User name (login, actor, web user).
    pub user: Option<String>,
    /// Device AE title (calling AE, C-MOVE destination).
    pub device: Option<String>,
    /// Patient ID.
    pub patient_id: Option<String>,
    /// Study Instance UID.
    pub study: Option<String>,
    /// Not before (inclusive).
    pub since: Option<time::OffsetDateTime>,
    /// Not after (inclusive).
    pub until: Option<time::OffsetDateTime>,
    /// An EventID name of [`EVENT_NAMES`] or an event type (`login.failure`).
    pub event: Option<String>,
}

/// The `--event` names (PS3.16 CID 400 EventIDs), as listed in `--help`.
pub const EVENT_NAMES: [&str; 10] = [
    "application-activity",
    "audit-log-used",
    "begin-transferring",
    "instances-accessed",
    "instances-transferred",
    "export",
    "import",
    "query",
    "security-alert",
    "user-authentication",
];

impl Filter {
    /// Whether a record matches.
    pub fn matches(&self, r: &Record) -> bool {
        let e = &r.event;
        let str_of = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("");
        if let Some(u) = &self.user {
            if !["username", "user", "actor"].iter().any(|k| str_of(k) == u) {
                return false;
            }
        }
        if let Some(d) = &self.device {
            let d = d.trim();
            if !["ae", "calling_ae", "destination"]
                .iter()
                .any(|k| str_of(k) == d)
            {
                return false;
            }
        }
        if let Some(p) = &self.patient_id {
            if !r.subjects.iter().any(|s| &s.patient_id == p) {
                return false;
            }
        }
        if let Some(st) = &self.study {
            let in_event = ["study_uids", "studies"].iter().any(|k| {
                e.get(*k)
                    .and_then(|v| v.as_array())
                    .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(st)))
            });
            let in_subjects = r
                .subjects
                .iter()
                .any(|s| s.study_uid.as_deref() == Some(st));
            if !in_event && !in_subjects {
                return false;
            }
        }
        if self.since.is_some() || self.until.is_some() {
            let Ok(ts) = time::OffsetDateTime::parse(
                str_of("ts"),
                &time::format_description::well_known::Rfc3339,
            ) else {
                return false;
            };
            if self.since.is_some_and(|s| ts < s) || self.until.is_some_and(|u| ts > u) {
                return false;
            }
        }
        if let Some(name) = &self.event {
            let by_id = message::event_id::ALL
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, c)| c.meaning);
            let ok = match by_id {
                Some(meaning) => r.event_ids.iter().any(|m| m == meaning),
                None => str_of("type") == name,
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

impl Record {
    /// The search view of a record (`bastion audit search --json`,
    /// `GET /api/audit`): sequence number, time, type, outcome, EventIDs,
    /// user, device, peer, patients, studies, the event and its messages.
    pub fn summary(&self) -> serde_json::Value {
        let e = &self.event;
        let first = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| e.get(*k).and_then(|v| v.as_str()).filter(|v| !v.is_empty()))
                .map(str::to_owned)
        };
        let mut studies: Vec<String> = self
            .subjects
            .iter()
            .filter_map(|s| s.study_uid.clone())
            .collect();
        for k in ["study_uids", "studies"] {
            if let Some(a) = e.get(k).and_then(|v| v.as_array()) {
                studies.extend(a.iter().filter_map(|v| v.as_str().map(str::to_owned)));
            }
        }
        studies.sort();
        studies.dedup();
        let mut patients: Vec<serde_json::Value> = Vec::new();
        for s in &self.subjects {
            let p = serde_json::json!({"patient_id": s.patient_id, "patient_name": s.patient_name});
            if !patients.contains(&p) {
                patients.push(p);
            }
        }
        serde_json::json!({
            "seq": self.seq,
            "ts": e.get("ts"),
            "type": e.get("type"),
            "outcome": e.get("outcome"),
            "event_ids": self.event_ids,
            "user": first(&["username", "user", "actor"]),
            "device": first(&["ae", "calling_ae"]),
            "peer": first(&["peer", "source"]),
            "patients": patients,
            "studies": studies,
            "event": e,
            "messages": self.messages,
        })
    }
}
