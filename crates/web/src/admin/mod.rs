//! The administration API the web UI's admin pages use (issue 6), for
//! callers with [`WebPermission::Admin`](bastion_model::WebPermission):
//!
//! - [`devices`]: `GET/POST /api/devices`, `GET /api/devices/unknown`,
//!   `PUT/DELETE /api/devices/{ae}` (the device allowlist, with what each
//!   device's stored instances say and its last refusal);
//! - [`users`]: `GET/POST /api/users`, `POST
//!   /api/users/{name}/disable|enable|unlock|password`;
//! - [`posture`]: `GET /api/posture` (listeners and their exposure,
//!   certificates, plaintext devices, admins without a second factor, open
//!   alerts, one warning per risky item).
//!
//! The security handles come from the binary in an [`AdminContext`]
//! ([`crate::AppState::with_admin`]); without one these routes answer 404.
//! Every change is recorded in the event log with the same event types and
//! fields as the CLI (`device.added`, `user.disabled`…), the acting web
//! user as `actor`, so the audit trail maps both to the same DICOM audit
//! messages. Database work runs on blocking threads.
//!
//! Errors: 400 names the bad field, 404 an unknown device or user, 409 an
//! existing AE title or user name, the last enabled admin, or an admin
//! acting on their own account where that would lock them out.

pub mod devices;
pub mod posture;
pub mod users;

#[cfg(test)]
mod tests;

use std::{net::SocketAddr, sync::Arc};

use axum::{body::Body, http::request::Parts};
use bastion_security::{accounts::Accounts, db::SecurityDb, pki::PkiPaths, SecurityError};
use serde::de::DeserializeOwned;

use crate::{error::ApiError, AppState};

/// What the admin API needs from the security layer, handed over by the
/// binary (which opened the database and knows the listeners).
pub struct AdminContext {
    /// The security database `bastion serve` uses (devices, inventory,
    /// alerts): the DIMSE listeners read devices from it at each
    /// association, so a change applies to the next one.
    pub db: Arc<SecurityDb>,
    /// The account service over the same database and event log.
    pub accounts: Arc<Accounts>,
    /// Where the CA and server certificates are (read for their subject and
    /// expiry only).
    pub pki: PkiPaths,
    /// The listeners `serve` binds, as configured.
    pub listeners: Vec<ListenerInfo>,
    /// Warning lines about where the keys are kept, made by the binary at
    /// start (one per key inside the data directory); shown among the
    /// posture's warnings.
    pub key_warnings: Vec<String>,
}

/// One listener, for [`posture`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    /// `dicom-tls`, `dicom-plain` or `https`.
    pub name: String,
    /// The address it is bound to.
    pub address: SocketAddr,
    /// Whether connections are encrypted (TLS).
    pub tls: bool,
}

/// The admin context, or 404 when the binary gave none.
fn context(state: &AppState) -> Result<Arc<AdminContext>, ApiError> {
    state.admin().ok_or(ApiError::NotFound)
}

/// Runs blocking work (SQLCipher, argon2id) off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("admin task", e))
}

/// Maps a security-layer error to its HTTP answer: unknown records 404,
/// existing ones and the last admin 409, invalid input 400 (the message
/// names the setting), anything else 500.
pub(crate) fn security_error(e: SecurityError) -> ApiError {
    match e {
        SecurityError::NoSuchDevice(_)
        | SecurityError::NoSuchUser(_)
        | SecurityError::NoSuchAlert(_)
        | SecurityError::NoSuchToken(_) => ApiError::NotFound,
        SecurityError::DeviceExists(ae) => {
            ApiError::Conflict(format!("a device with AE title {ae} already exists"))
        }
        SecurityError::UserExists(u) => ApiError::Conflict(format!("user {u} already exists")),
        e @ (SecurityError::LastAdmin(_) | SecurityError::UserNameCaseClash { .. }) => {
            ApiError::Conflict(e.to_string())
        }
        e @ (SecurityError::Invalid { .. }
        | SecurityError::Model(_)
        | SecurityError::WeakPassword(_)) => ApiError::BadRequest(e.to_string()),
        other => ApiError::internal("security", other),
    }
}

/// The parts and body of a request whose handler needs `permission`: the
/// one authorisation check ([`crate::auth::Caller::require`]) made before the body is
/// read; a refused caller's body is drained so that it sees the 403 rather
/// than a reset connection.
///
/// # Errors
/// [`ApiError::Forbidden`] without the permission.
pub(crate) async fn permitted(
    caller: &crate::auth::Caller,
    permission: bastion_model::WebPermission,
    req: axum::extract::Request,
) -> Result<(Parts, Body), ApiError> {
    let (parts, body) = req.into_parts();
    if let Err(e) = caller.require(permission) {
        crate::body::drain(&parts.headers, body).await;
        return Err(e);
    }
    Ok((parts, body))
}

/// Reads a JSON request body (Content-Type `application/json`, at most
/// `max_json_bytes`, within the body timeout) and parses it into `T`
/// (whose fields are `deny_unknown_fields`).
///
/// # Errors
/// 415 for another content type, 413/408 from [`crate::body::read_body`], 400 for
/// malformed JSON or a field that is unknown, missing or of the wrong type
/// (named when serde names it).
pub(crate) async fn json_body<T: DeserializeOwned>(
    state: &AppState,
    parts: &Parts,
    body: Body,
) -> Result<T, ApiError> {
    let bytes = crate::body::json_bytes(
        &parts.headers,
        body,
        state.config().max_json_bytes,
        state.config().body_timeout,
    )
    .await?;
    serde_json::from_slice(&bytes).map_err(json_error)
}

/// A JSON parse error as a 400 that names the field (serde's "unknown
/// field `x`", "missing field `y`") but never echoes a value.
fn json_error(e: serde_json::Error) -> ApiError {
    let full = e.to_string();
    let msg = full.split(" at line ").next().unwrap_or_default();
    let text = if !e.is_data() {
        "malformed JSON body".to_owned()
    } else if msg.starts_with("unknown field")
        || msg.starts_with("missing field")
        || msg.starts_with("duplicate field")
    {
        msg.to_owned()
    } else {
        match msg.split_once(", expected ") {
            Some((_, expected)) => {
                format!("a field has the wrong type or value; expected {expected}")
            }
            None => "a field has the wrong type or value".to_owned(),
        }
    };
    ApiError::BadRequest(text)
}

/// Deserializes a field that may be absent (outer `None`), `null` (inner
/// `None`: clear the setting) or a value.
pub(crate) fn nullable<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}
