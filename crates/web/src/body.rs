//! Reading a request body within the limits: the declared length is checked
//! before anything is read (413 at once), the bytes read are capped (413 as
//! soon as a chunked body goes over), and the whole body must arrive within
//! the body timeout (408). The only place handlers read bodies.

use std::time::Duration;

use axum::{
    body::Body,
    http::{header, HeaderMap},
};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};

use crate::error::ApiError;

/// Reads `body` (at most `limit` bytes, within `deadline`).
///
/// # Errors
/// [`ApiError::TooLarge`] (declared or actual length over `limit`),
/// [`ApiError::BodyTimeout`], [`ApiError::BadRequest`] (a malformed
/// Content-Length or a broken connection).
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, ApiError> {
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ApiError::BadRequest("malformed Content-Length".into()))?;
        if len > limit as u64 {
            return Err(ApiError::TooLarge);
        }
    }
    let collected = tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await;
    match collected {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) => Err(classify(e.as_ref())),
    }
}

/// A request body read piece by piece (the STOW-RS body, PS3.18 §10.5),
/// so that a handler can hold one part at a time whatever the size of the
/// request: 413 for a declared or streamed length over the limit
/// (`max_upload_bytes`), 408 when the time spent *waiting* for the body
/// (not the time the handler spends on what it read) exceeds the body
/// timeout.
#[derive(Debug)]
pub struct BodyFrames {
    body: Limited<Body>,
    waiting_left: Duration,
    /// Longest wait for one frame (an idle upload is cut off).
    idle: Duration,
}

impl BodyFrames {
    /// Checks the declared length against `limit` (413 at once) and starts
    /// reading: the whole body within `deadline`, no wait for one frame
    /// longer than `idle` (both [`ApiError::BodyTimeout`], 408).
    ///
    /// # Errors
    /// [`ApiError::TooLarge`], [`ApiError::BadRequest`] for a malformed
    /// Content-Length.
    pub fn new(
        headers: &HeaderMap,
        body: Body,
        limit: usize,
        deadline: Duration,
        idle: Duration,
    ) -> Result<BodyFrames, ApiError> {
        if declared_length(headers)?.is_some_and(|len| len > limit as u64) {
            return Err(ApiError::TooLarge);
        }
        Ok(BodyFrames {
            body: Limited::new(body, limit),
            waiting_left: deadline,
            idle,
        })
    }

    /// The next piece of the body, `None` at its end.
    ///
    /// # Errors
    /// [`ApiError::TooLarge`] as soon as the bytes read exceed the limit,
    /// [`ApiError::BodyTimeout`], [`ApiError::BadRequest`] for a broken
    /// connection.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ApiError> {
        loop {
            let started = tokio::time::Instant::now();
            let frame =
                tokio::time::timeout(self.waiting_left.min(self.idle), self.body.frame()).await;
            self.waiting_left = self.waiting_left.saturating_sub(started.elapsed());
            match frame {
                Err(_) => return Err(ApiError::BodyTimeout),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(classify(e.as_ref())),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                    // Trailers: nothing to hand out.
                }
            }
        }
    }
}

/// The `Content-Length` header, if any.
fn declared_length(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|len| {
            len.to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ApiError::BadRequest("malformed Content-Length".into()))
        })
        .transpose()
}

/// Maps a body error (ours, tower-http's limit or idle timeout, hyper's)
/// to its status.
fn classify(e: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return ApiError::TooLarge;
        }
        if err.is::<tower_http::timeout::TimeoutError>() {
            return ApiError::BodyTimeout;
        }
        if let Some(ax) = err.downcast_ref::<axum::Error>() {
            if let Some(inner) = std::error::Error::source(ax) {
                return classify(inner);
            }
        }
        cur = err.source();
    }
    ApiError::BadRequest("the request body could not be read".into())
}

/// Most bytes of a refused request's body read (and dropped) before the
/// refusal is sent.
pub const DRAIN_LIMIT: usize = 1 << 20;

/// The bytes of a JSON request body: `Content-Type: application/json`
/// (else 415, the body drained: a form or `text/plain` POST is what a
/// cross-site page can send without a CORS preflight), then
/// [`read_body`] within `limit` and `deadline`.
///
/// # Errors
/// [`ApiError::UnsupportedMediaType`], and those of [`read_body`].
pub async fn json_bytes(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        drain(headers, body).await;
        return Err(ApiError::UnsupportedMediaType(
            "send a JSON body with Content-Type: application/json".into(),
        ));
    }
    read_body(headers, body, limit, deadline).await
}

/// Reads and drops a small request body (at most [`DRAIN_LIMIT`] bytes,
/// within 5 s) before an early refusal (401/403/415…) is answered: a server
/// that closes with unread bytes makes the kernel reset the connection, and
/// the client may then never see the refusal. Larger or slower bodies are
/// left unread (the connection is closed as before).
pub async fn drain(headers: &HeaderMap, body: Body) {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT as u64) {
        return;
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        Limited::new(body, DRAIN_LIMIT).collect(),
    )
    .await;
}
