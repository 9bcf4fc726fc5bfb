//! # bastion-model: the vocabulary of Bastion
//!
//! Small value types shared by every layer: DICOM unique identifiers ([`Uid`]),
//! application entity titles ([`AeTitle`]), what a remote device may do
//! ([`Permission`]) and how it must connect ([`Transport`]), and what a
//! person may do over the web front end ([`Role`], [`WebPermission`]).
//!
//! Invariant: this crate does no I/O, has no async code and depends on no
//! other Bastion crate. Types here are *parsed*, not merely validated: a
//! [`Uid`] can never hold `../x`, an [`AeTitle`] is never blank.
//!
//! ```
//! use bastion_model::{AeTitle, Uid};
//! let ae = AeTitle::parse("  MODALITY1 ").unwrap();
//! assert_eq!(ae.as_str(), "MODALITY1");
//! assert!(Uid::parse("1.2.840.10008.1.1").is_ok());
//! assert!(Uid::parse("../../x").is_err());
//! ```

mod ae;
mod lo;
mod permission;
mod role;
mod uid;

pub use ae::AeTitle;
pub use lo::{cut_lo, LO_MAX};
pub use permission::{Permission, PermissionSet, Transport};
pub use role::{Role, WebPermission};
pub use uid::Uid;

/// Why a value could not be parsed into one of this crate's types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The text is not a valid DICOM UID (PS3.5 §9.1). The value itself is
    /// not kept: a malformed "UID" may hold patient data (a name pasted into
    /// the wrong field), and this message reaches logs and the event log.
    #[error("invalid UID ({len} characters): {reason}")]
    InvalidUid {
        /// Length of the offending value in characters.
        len: usize,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// The text is not a valid AE title (PS3.5 §6.2, VR AE).
    #[error("invalid AE title {value:?}: {reason}")]
    InvalidAeTitle {
        /// The offending value, truncated to 80 characters.
        value: String,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// A permission name outside `echo,store,find,move,get`.
    #[error(
        "unknown permission {0:?}: expected a comma-separated subset of echo,store,find,move,get"
    )]
    UnknownPermission(String),
    /// A transport name outside `tls`, `mtls`, `plain`.
    #[error("unknown transport {0:?}: expected tls, mtls or plain")]
    UnknownTransport(String),
    /// A role name outside `admin`, `clinician`, `technologist`, `auditor`,
    /// `researcher`.
    #[error("unknown role {0:?}: expected admin, clinician, technologist, auditor or researcher")]
    UnknownRole(String),
}

/// Truncates a peer-supplied value for inclusion in an error message.
fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}
