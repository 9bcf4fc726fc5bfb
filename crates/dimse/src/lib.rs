//! # bastion-dimse: the DICOM network front end
//!
//! Association policy on top of dicom-ul, typed DIMSE messages
//! ([`command`]), statuses ([`status`]), the DICOM-TLS configuration
//! ([`tls`]), the C-ECHO / C-STORE / C-FIND / C-MOVE / C-GET service provider
//! ([`server`]) and the Storage SCU for C-MOVE sub-operations ([`scu`]).
//! [`pdata`] writes outgoing P-DATA-TF PDUs (public for the fuzz targets in
//! `fuzz/`).
//!
//! Invariant: a protocol adapter only. No SQL, no file paths: it calls
//! `bastion-archive` and `bastion-security`, and archive errors become DIMSE
//! statuses in exactly one function, [`status::for_ingest_error`].

pub mod command;
pub mod pdata;
mod retrieve;
pub mod scu;
pub mod server;
pub mod status;
pub mod tls;
pub mod unaudited;

pub use server::{Dimse, DimseConfig};

/// Errors of the DIMSE front end's set-up.
#[derive(Debug, thiserror::Error)]
pub enum DimseError {
    /// TLS identity or configuration problem.
    #[error("TLS: {0}")]
    Tls(String),
}
