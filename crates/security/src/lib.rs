//! # bastion-security: who may connect, what they may do, and what happened
//!
//! - [`secrets`]: writing and checking secret files (mode 0600, refused when
//!   readable by others); wrapping a key with a passphrase (argon2id +
//!   AES-256-GCM).
//! - [`pki`]: the private CA, the server certificate and device client
//!   certificates (rcgen), certificate fingerprints.
//! - [`certs`]: the record of issued device certificates and their
//!   revocation list, and the cached view the TLS handshake checks.
//! - [`db`]: the encrypted security database (SQLCipher) holding devices and
//!   users.
//! - [`devices`]: the device allowlist (AE title + network + transport +
//!   permissions), DESIGN §2.
//! - [`policy`]: the pure association decision of PS3.8 §9.3.4 over a device.
//! - [`users`]: password hashing (argon2id, OWASP parameters) and the
//!   password policy (length, zxcvbn strength).
//! - [`accounts`]: user accounts, roles, web sessions, API tokens, TOTP and
//!   login throttling: the service the web front end and the CLI call.
//! - [`events`]: the append-only security event log (no patient data).
//! - [`audit`]: the tamper-evident audit trail (DICOM audit messages,
//!   hash chain, signed checkpoints, encrypted at rest).
//! - [`detect`]: the detection rules over the event stream (pure, windows
//!   in memory); [`alerts`]: the alert records and the live detector.
//! - [`inventory`]: what each device's stored headers say (manufacturer,
//!   model, software versions…) with history, and unknown devices that
//!   tried to connect.
//! - [`admission`]: per-address and total caps on a listener's sockets,
//!   evicting the oldest unproven socket rather than refusing a newcomer.
//! - [`syslog`]: reliable export of audit messages to a syslog collector
//!   (RFC 5424 over TLS, RFC 5425), through an encrypted on-disk spool.
//!
//! Invariant: this crate knows no network front (no dicom-ul, no HTTP), and
//! [`policy::decide`] is a pure function with an exhaustive `match`.

pub mod accounts;
pub mod admission;
pub mod certs;
pub mod devices;
pub mod pki;
pub mod policy;
pub mod secrets;
pub mod users;

// Split out (issue 12), re-exported under their old paths: the audit trail
// and its export, detection/alerts/inventory, and the database they share.
pub use bastion_audit::LogError;
pub use bastion_audit::{audit, events, syslog};
pub use bastion_detect::DetectError;
pub use bastion_detect::{alerts, detect, inventory};
pub use bastion_secdb as db;
pub use bastion_secdb::DbError;

use std::path::PathBuf;

/// Errors of the security layer. Messages name the file or the record and
/// never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
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
    /// A secret file grants permissions to group or others.
    #[error("{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The security database failed.
    #[error("security database: {op}: {source}")]
    Db {
        /// What was being done.
        op: &'static str,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The security database could not be opened with the derived key.
    #[error("security database {0} cannot be decrypted with this master key")]
    WrongKey(PathBuf),
    /// A device with this AE title already exists.
    #[error("a device with AE title {0} already exists; use `bastion device update`")]
    DeviceExists(String),
    /// No device with this AE title.
    #[error("no device with AE title {0}")]
    NoSuchDevice(String),
    /// A user with this name already exists.
    #[error("user {0} already exists")]
    UserExists(String),
    /// A user whose name differs from the new one only in ASCII letter
    /// case exists (two such names would be easy to confuse in the event
    /// log and the audit trail).
    #[error(
        "user name {name} differs from the existing user {existing} only in letter case; \
         user names must differ by more than case"
    )]
    UserNameCaseClash {
        /// The name asked for.
        name: String,
        /// The existing account.
        existing: String,
    },
    /// A value given by the operator is invalid.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which setting.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// Password hashing failed.
    #[error("password hashing: {0}")]
    PasswordHash(String),
    /// A value of the shared vocabulary (e.g. a role name) is invalid.
    #[error(transparent)]
    Model(#[from] bastion_model::ModelError),
    /// No user with this name.
    #[error("no user named {0:?}")]
    NoSuchUser(String),
    /// No API token with this id.
    #[error("no token with id {0:?}; `bastion token list` shows them")]
    NoSuchToken(String),
    /// A new password does not meet the policy. The message says why and
    /// never contains the password.
    #[error("password refused: {0}")]
    WeakPassword(String),
    /// The user name or the (old) password is wrong. Deliberately the same
    /// for both.
    #[error("wrong user name or password")]
    BadCredentials,
    /// Too many recent failures: try again after `retry_after`.
    #[error("too many failed attempts; retry in {} s", retry_after.as_secs().max(1))]
    Throttled {
        /// How long to wait.
        retry_after: std::time::Duration,
    },
    /// The account is locked after repeated failures.
    #[error("account locked after repeated failures; an administrator lifts it with `bastion user unlock`")]
    AccountLocked,
    /// The account is disabled.
    #[error("account disabled")]
    AccountDisabled,
    /// The operation would leave no enabled admin account.
    #[error("refusing to {0} the last enabled admin account; add another admin first")]
    LastAdmin(&'static str),
    /// No alert with this id.
    #[error("no alert with id {0}; `bastion alerts --all` lists them")]
    NoSuchAlert(i64),
    /// The passphrase does not unwrap the key (or the wrapped key file was
    /// altered: AES-GCM cannot tell the two apart).
    #[error("{0}: wrong passphrase (or the wrapped key file was altered); nothing was changed")]
    WrongPassphrase(PathBuf),
    /// A wrapped key file is not in the format [`secrets::wrap_key`] writes.
    #[error("{path} is not a Bastion wrapped key file: {detail}")]
    InvalidWrappedKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = SecurityError> = std::result::Result<T, E>;

impl From<bastion_secdb::DbError> for SecurityError {
    fn from(e: bastion_secdb::DbError) -> Self {
        match e {
            bastion_secdb::DbError::Io { op, path, source } => {
                SecurityError::Io { op, path, source }
            }
            bastion_secdb::DbError::Db { op, source } => SecurityError::Db { op, source },
            bastion_secdb::DbError::WrongKey(p) => SecurityError::WrongKey(p),
        }
    }
}

impl From<bastion_audit::LogError> for SecurityError {
    fn from(e: bastion_audit::LogError) -> Self {
        match e {
            bastion_audit::LogError::Io { op, path, source } => {
                SecurityError::Io { op, path, source }
            }
            bastion_audit::LogError::Invalid { what, detail } => {
                SecurityError::Invalid { what, detail }
            }
        }
    }
}

impl From<bastion_detect::DetectError> for SecurityError {
    fn from(e: bastion_detect::DetectError) -> Self {
        match e {
            bastion_detect::DetectError::Db { op, source } => SecurityError::Db { op, source },
            bastion_detect::DetectError::Io { op, path, source } => {
                SecurityError::Io { op, path, source }
            }
            bastion_detect::DetectError::Invalid { what, detail } => {
                SecurityError::Invalid { what, detail }
            }
            bastion_detect::DetectError::NoSuchAlert(id) => SecurityError::NoSuchAlert(id),
        }
    }
}

fn io_err(
    op: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> SecurityError {
    let path = path.to_path_buf();
    move |source| SecurityError::Io { op, path, source }
}

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
