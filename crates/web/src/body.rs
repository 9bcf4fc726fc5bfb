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
