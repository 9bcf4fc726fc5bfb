//! Response hardening and request refusals that apply to every route:
//! security headers (also on errors and CORS preflights), `Content-Encoding`
//! refusal, JSON bodies for the errors that library layers produce, and the
//! CORS layer.

use std::time::Duration;

use axum::{
    extract::Request,
    http::{header, HeaderName, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::error::{error_body, ApiError};

/// The Content-Security-Policy: nothing inline or evaluated, anywhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The headers set (overriding) on every response.
pub fn security_headers() -> [(HeaderName, HeaderValue); 7] {
    [
        (
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        // Every API and DICOMweb response may carry patient data.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ]
}

/// Middleware: a request body with a `Content-Encoding` other than
/// `identity` is refused with 415 before it is read (a gzip bomb is never
/// inflated; DICOMweb clients send DICOM uncompressed).
pub async fn refuse_content_encoding(req: Request, next: Next) -> Response {
    let encoded = req
        .headers()
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return ApiError::UnsupportedMediaType(
            "request bodies with a Content-Encoding are not accepted".into(),
        )
        .into_response();
    }
    next.run(req).await
}

/// Middleware: an error response without a body of ours (from a library
/// layer: 413 from the body limit, 405 from the router…) gets the standard
/// `{"error", "status"}` body; its other headers are kept.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    // Ours carry a JSON (or DICOM JSON) body; the libraries' are empty or
    // text/plain.
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return response;
    }
    let (parts, _) = response.into_parts();
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "request body too large",
        StatusCode::REQUEST_TIMEOUT => "request body timeout",
        _ => status.canonical_reason().unwrap_or("error"),
    };
    let mut fresh = error_body(status, message);
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fresh.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fresh
}

/// The CORS layer for `origins` (none: no layer, CORS is off). Credentials
/// are allowed, so the allowed origin is echoed, never `*`.
pub fn cors(origins: &[String]) -> Option<CorsLayer> {
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
        .collect();
    if list.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(list))
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers([
                header::ACCEPT,
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("x-csrf-token"),
            ])
            .expose_headers([header::CONTENT_TYPE, header::RETRY_AFTER, header::WARNING])
            .allow_credentials(true)
            .max_age(Duration::from_secs(600)),
    )
}
