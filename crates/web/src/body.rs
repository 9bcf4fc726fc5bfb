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

use bastion_archive::budget::Reservation;

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

/// [`read_body`] under a memory budget (the STOW-RS body, PS3.18 §10.5):
/// `reservation` grows before the buffer does, so a request that would hold
/// more than its share of the server's memory budget is refused at once,
/// with 503 and `Retry-After`, however its bytes arrive. 413 stays for a
/// declared or streamed length over `limit` (`max_upload_bytes`).
///
/// # Errors
/// [`ApiError::Busy`] when the budget cannot grow (also for a declared
/// length over the per-request cap), and those of [`read_body`].
pub async fn read_body_reserved(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    deadline: Duration,
    reservation: &mut Reservation,
) -> Result<Bytes, ApiError> {
    let declared = declared_length(headers)?;
    if let Some(len) = declared {
        if len > limit as u64 {
            return Err(ApiError::TooLarge);
        }
        if len > reservation.cap() {
            return Err(ApiError::Busy);
        }
    }
    let read = async {
        let mut body = Limited::new(body, limit);
        let mut buf = Vec::new();
        // A declared length is reserved (and allocated) at once.
        if let Some(len) = declared.and_then(|l| usize::try_from(l).ok()) {
            reservation.grow(len as u64).map_err(|_| ApiError::Busy)?;
            buf.reserve_exact(len);
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| classify(e.as_ref()))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() <= buf.capacity() {
                    buf.extend_from_slice(&data);
                } else {
                    reservation
                        .extend(&mut buf, &data)
                        .map_err(|_| ApiError::Busy)?;
                }
            }
        }
        Ok(Bytes::from(buf))
    };
    match tokio::time::timeout(deadline, read).await {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(r) => r,
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
