//! [`ApiError`]: every failure the HTTPS front end answers, mapped to an
//! HTTP status in one place ([`ApiError::status`]).
//!
//! The client sees `{"error": "<message>", "status": N}` with a message
//! that names no internal detail: archive, database and I/O failures are
//! logged here (tracing, warn/error, no patient data) and answered as a bare
//! "internal error".

use std::time::Duration;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use bastion_archive::ArchiveError;
use bastion_dicomweb::DicomWebError;

/// A request that cannot be answered normally.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No credentials, or credentials that are not valid (401 with
    /// `WWW-Authenticate: Bearer`).
    #[error("authentication required")]
    Unauthenticated,
    /// A login that failed: unknown user, wrong password, missing or wrong
    /// second factor, an admin without TOTP enrolled, a disabled account
    /// (401; one message for all, so that a guessed password is never
    /// confirmed; the event log records which it was).
    #[error("invalid username, password or second factor (TOTP code as \"totp\" where the account has one)")]
    LoginFailed,
    /// Authenticated, but the role or token scope lacks the permission
    /// (403).
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    /// A state-changing request authenticated by the session cookie without
    /// the session's `X-CSRF-Token` (403).
    #[error("missing or invalid X-CSRF-Token")]
    Csrf,
    /// A login whose `Origin` is neither ours nor an allowed CORS origin (403).
    #[error("origin not allowed")]
    Origin,
    /// The password is right, but this administrator account must set up a
    /// second factor before it may log in (403): the web UI then runs the
    /// enrolment (`POST /api/totp/enrol`). Only said after a right
    /// password, under the login throttle.
    #[error("two-factor authentication must be set up for this account: POST /api/totp/enrol")]
    TotpSetupRequired,
    /// The account must change its password first (403).
    #[error("password change required: POST /api/password")]
    PasswordChangeRequired,
    /// A token in the query string (400): tokens travel in `Authorization`
    /// only, never in URLs that end up in logs and browser history.
    #[error("access tokens are accepted in the Authorization header only")]
    TokenInQuery,
    /// Too many attempts (429 with `Retry-After`).
    #[error("too many attempts; retry later")]
    Throttled {
        /// Seconds until the next attempt may succeed.
        retry_after: Duration,
    },
    /// Malformed request (400); the message names what, never a value.
    #[error("{0}")]
    BadRequest(String),
    /// No such resource (404).
    #[error("not found")]
    NotFound,
    /// The request conflicts with the current state (409): the AE title or
    /// user name exists, the last enabled admin, an alert already
    /// acknowledged. The message says which.
    #[error("{0}")]
    Conflict(String),
    /// The representation asked for in `Accept` cannot be produced (406).
    #[error("not acceptable: {0}")]
    NotAcceptable(String),
    /// The body exceeds the configured limit (413).
    #[error("request body too large")]
    TooLarge,
    /// The body did not arrive within the body timeout (408).
    #[error("request body timeout")]
    BodyTimeout,
    /// Unsupported request media type or content coding (415).
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    /// A request the archive refused as unprocessable (422).
    #[error("{0}")]
    Unprocessable(String),
    /// Out of resources (503), e.g. the disk is full.
    #[error("service unavailable")]
    Unavailable,
    /// The audit trail cannot record (a full disk) and the site does not
    /// allow unaudited access: patient data is not served (503 with
    /// `Retry-After`, [`AUDIT_RETRY_AFTER_SECS`]); service resumes by itself.
    #[error(
        "the audit trail is not recording: patient data is not served until it is; retry later"
    )]
    AuditUnavailable,
    /// The memory budget has no room for this request now (503 with
    /// `Retry-After`: [`BUSY_RETRY_AFTER_SECS`]).
    #[error("server busy: its memory budget is in use; retry later")]
    Busy,
    /// The blob store (an object store) is unreachable or failing: nothing was
    /// stored (503 with `Retry-After`: [`STORE_RETRY_AFTER_SECS`]); the detail
    /// went to the operator log.
    #[error("the image store is unavailable; retry later")]
    StoreUnavailable,
    /// Anything else (500); the detail is logged, never sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The one mapping of errors to HTTP statuses.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated | ApiError::LoginFailed => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_)
            | ApiError::Csrf
            | ApiError::Origin
            | ApiError::TotpSetupRequired
            | ApiError::PasswordChangeRequired => StatusCode::FORBIDDEN,
            ApiError::TokenInQuery | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable
            | ApiError::AuditUnavailable
            | ApiError::Busy
            | ApiError::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// An internal failure: logged now, answered as "internal error".
    pub fn internal(context: &str, e: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(format!("{context}: {e}"))
    }
}

/// `Retry-After` of [`ApiError::StoreUnavailable`], seconds.
pub const STORE_RETRY_AFTER_SECS: u64 = 10;

/// `Retry-After` of [`ApiError::AuditUnavailable`], seconds.
pub const AUDIT_RETRY_AFTER_SECS: u64 = 30;
/// `Retry-After` (seconds) of a request refused because the memory budget
/// is in use: long enough for the transfers holding it to finish.
pub const BUSY_RETRY_AFTER_SECS: u64 = 5;

/// The JSON error body `{"error": message, "status": code}`.
pub fn error_body(status: StatusCode, message: &str) -> Response {
    let mut r = (
        status,
        Json(serde_json::json!({"error": message, "status": status.as_u16()})),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"bastion\""),
        );
    }
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(detail = %detail, "HTTP request failed");
        }
        let mut r = error_body(status, &self.to_string());
        if let ApiError::AuditUnavailable = self {
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(AUDIT_RETRY_AFTER_SECS),
            );
        }
        if let ApiError::StoreUnavailable = self {
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(STORE_RETRY_AFTER_SECS),
            );
        }
        if let ApiError::Busy = self {
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(BUSY_RETRY_AFTER_SECS),
            );
        }
        if let ApiError::Throttled { retry_after } = self {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

impl From<ArchiveError> for ApiError {
    fn from(e: ArchiveError) -> ApiError {
        match e {
            ArchiveError::NotFound(_) => ApiError::NotFound,
            ArchiveError::InvalidQuery { comment, .. } => ApiError::BadRequest(comment),
            ArchiveError::TooManyMatches { limit } => {
                ApiError::BadRequest(format!("more than {limit} matches: refine the query"))
            }
            ArchiveError::TooLarge { .. } | ArchiveError::AttributesTooLarge { .. } => {
                ApiError::TooLarge
            }
            ArchiveError::Busy { .. } | ArchiveError::SpoolFull { .. } => ApiError::Busy,
            ArchiveError::NoSpace => {
                tracing::error!("out of storage space");
                ApiError::Unavailable
            }
            e @ (ArchiveError::NotDicom(_)
            | ArchiveError::InvalidDataset(_)
            | ArchiveError::Conflict { .. }) => ApiError::Unprocessable(e.to_string()),
            ArchiveError::Internal(d) => ApiError::Internal(format!("archive: {d}")),
            // Logged where it happened (the archive), with the store's detail.
            ArchiveError::StoreUnavailable(_) => ApiError::StoreUnavailable,
        }
    }
}

impl From<DicomWebError> for ApiError {
    fn from(e: DicomWebError) -> ApiError {
        let msg = e.to_string();
        match e {
            DicomWebError::UnknownAttribute { .. }
            | DicomWebError::InvalidParameter { .. }
            | DicomWebError::InvalidQuery(_)
            | DicomWebError::BadMultipart(_) => ApiError::BadRequest(msg),
            DicomWebError::FrameNotFound { .. } | DicomWebError::NoPixelData => ApiError::NotFound,
            DicomWebError::Unsupported(m) => ApiError::NotAcceptable(m),
            // 413 is kept for `max_upload_bytes`; a limit of the framing
            // (parts, part headers, one part) is named in a 400.
            DicomWebError::MultipartTooLarge { .. } => ApiError::BadRequest(msg),
            DicomWebError::UnsupportedMediaType(m) => ApiError::UnsupportedMediaType(m),
            DicomWebError::InvalidImage(m) => ApiError::Unprocessable(m),
            DicomWebError::InvalidDataset(m) => ApiError::Internal(format!("stored dataset: {m}")),
            DicomWebError::Budget(_) => ApiError::Busy,
        }
    }
}

/// The Error Comment (0000,0902) of a STOW-RS instance the archive refused:
/// why, in words, for the client (PS3.18 §10.5.3 lets a FailedSOPSequence
/// item carry it, as a C-STORE-RSP does, PS3.7 §C.4). Never patient data:
/// the archive's refusals name attributes and positions, not values; a
/// conflict's SOP Instance UID is in the item's (0008,1155) already;
/// internal failures say only where to look. At most 64 characters (LO).
pub fn failure_comment(e: &ArchiveError) -> String {
    let text = match e {
        // 0xC000 says "not DICOM" already: the reason is the useful part.
        ArchiveError::NotDicom(reason) => reason.clone(),
        ArchiveError::Conflict { .. } => {
            "already stored with different content; refused".to_owned()
        }
        ArchiveError::Internal(_) | ArchiveError::NotFound(_) => {
            "internal error; see the server log".to_owned()
        }
        ArchiveError::StoreUnavailable(_) => "image store unavailable; retry later".to_owned(),
        other => other.to_string(),
    };
    error_comment(&text)
}

/// `text` as an Error Comment value (VR LO, PS3.5 §6.2): printable ASCII
/// without backslash, at most 64 characters (a longer text is cut at a
/// word and ends with `...`).
pub fn error_comment(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_control() {
                c
            } else {
                ' '
            }
        })
        .filter(|c| *c != '\\')
        .collect();
    bastion_model::cut_lo(clean.trim())
}

/// The Failure Reason (0008,1197) of a STOW-RS instance the archive refused
/// (PS3.18 §10.5.3, PS3.4 Annex B.2.3 statuses), the same codes C-STORE
/// answers: 0xC000 cannot understand, 0xA900 data set does not match SOP
/// class, 0x0111 duplicate SOP instance (conflicting re-send), 0xA700 out of
/// resources.
pub fn failure_reason(e: &ArchiveError) -> u16 {
    match e {
        ArchiveError::NotDicom(_) => 0xC000,
        ArchiveError::InvalidDataset(_) | ArchiveError::InvalidQuery { .. } => 0xA900,
        ArchiveError::Conflict { .. } => 0x0111,
        ArchiveError::TooLarge { .. }
        | ArchiveError::Busy { .. }
        | ArchiveError::SpoolFull { .. }
        | ArchiveError::AttributesTooLarge { .. }
        | ArchiveError::NoSpace
        | ArchiveError::NotFound(_)
        | ArchiveError::TooManyMatches { .. }
        | ArchiveError::StoreUnavailable(_)
        | ArchiveError::Internal(_) => 0xA700,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_comment_is_an_lo_value_with_the_reason() {
        let e =
            ArchiveError::NotDicom("no DICM prefix at byte 128: not a DICOM Part 10 file".into());
        assert_eq!(
            failure_comment(&e),
            "no DICM prefix at byte 128: not a DICOM Part 10 file"
        );
        let internal = ArchiveError::Internal("/var/lib/x: Doe^John".into());
        assert_eq!(
            failure_comment(&internal),
            "internal error; see the server log"
        );
        let long = error_comment(&format!("{}\\x\u{e9}\n", "word ".repeat(30)));
        assert!(
            long.len() <= 64 && long.ends_with("...") && long.is_ascii(),
            "{long}"
        );
        assert!(!long.contains('\\'));
        assert_eq!(error_comment(" a\\b\u{1}c "), "ab c");
    }
}
