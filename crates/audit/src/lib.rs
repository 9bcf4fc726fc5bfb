//! # bastion-audit: what happened, recorded so that it cannot be denied
//!
//! - [`events`]: the append-only security event log (no patient data), the
//!   stream every access decision is written to and the detector watches.
//! - [`audit`]: the tamper-evident audit trail (DICOM audit messages of
//!   PS3.15 Annex A.5, hash chain, signed checkpoints, encrypted at rest,
//!   torn tails repaired, a reserve for a full disk).
//! - [`syslog`]: reliable export of the trail's audit messages to a syslog
//!   collector (RFC 5424 over TLS, RFC 5425), through an encrypted on-disk
//!   spool.
//!
//! Split out of `bastion-security` (issue 12) so that the archive, which
//! records events, does not pull in the account and PKI machinery (argon2,
//! zxcvbn, TOTP, rcgen). Invariant: no network front, no SQL.

pub mod audit;
pub mod events;
pub mod syslog;

use std::path::PathBuf;

/// Errors of the event log and the syslog spool (the trail has its own,
/// [`audit::AuditError`]). Messages name the file, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
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
    /// A value (a setting, a spooled record) is invalid.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which value.
        what: &'static str,
        /// Why.
        detail: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = LogError> = std::result::Result<T, E>;

fn io_err(op: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError::Io { op, path, source }
}
