//! # bastion-detect: watching what happened
//!
//! - [`detect`]: the detection rules over the event stream (pure, windows in
//!   memory).
//! - [`alerts`]: the alert records in the security database and the live
//!   detector that raises them (and notifies, rate-limited).
//! - [`inventory`]: what each device's stored headers say (manufacturer,
//!   model, software versions…) with history, and unknown devices that
//!   tried to connect.
//!
//! Split out of `bastion-security` (issue 12) so that the archive, which
//! reports device headers to the inventory, does not pull in the account
//! and PKI machinery. Uses the security database (`bastion-secdb`) and the
//! event log (`bastion-audit`); no network front.

pub mod alerts;
pub mod detect;
pub mod inventory;

// The modules' paths of before the split (`crate::db`, `crate::events`).
pub(crate) use bastion_audit::events;
pub(crate) use bastion_secdb as db;

/// Errors of detection, alerts and the inventory. Messages never hold
/// patient data.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The security database failed.
    #[error("security database: {op}: {source}")]
    Db {
        /// What was being done.
        op: &'static str,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Which file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A value given by the operator (a rule, a setting) is invalid.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which setting.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// No alert with this id.
    #[error("no alert with id {0}; `bastion alerts --all` lists them")]
    NoSuchAlert(i64),
}

/// Shorthand for results of this crate.
pub type Result<T, E = DetectError> = std::result::Result<T, E>;

/// [`bastion_secdb::SecurityDb::with_conn`] with this crate's error type (so
/// that `?` inside the closure needs no annotation).
pub(crate) trait DbExt {
    /// Runs `f` with the connection held.
    fn with<T>(&self, f: impl FnOnce(&rusqlite::Connection) -> Result<T>) -> Result<T>;
}

impl DbExt for bastion_secdb::SecurityDb {
    fn with<T>(&self, f: impl FnOnce(&rusqlite::Connection) -> Result<T>) -> Result<T> {
        self.with_conn(f)
    }
}
