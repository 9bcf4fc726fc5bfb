//! `GET /api/alerts` (the alerts of the detection rules, open first) and
//! `GET /metrics` (Prometheus text format), both for callers with the audit
//! permission (roles `admin` and `auditor`) on the main HTTPS listener.

use axum::{
    extract::{Query, State},
    http::{header, HeaderValue},
    response::{IntoResponse, Response},
    Extension, Json,
};
use bastion_model::WebPermission;
use bastion_security::alerts::Alert;
use serde::Deserialize;

use crate::{audit::Note, auth::Caller, error::ApiError, AppState};

/// `GET /api/alerts` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    /// `true`: acknowledged alerts too (after the open ones).
    all: Option<bool>,
    /// At most this many (default 1000, at most 10,000).
    limit: Option<usize>,
}

/// `GET /api/alerts[?all=true][&limit=N]`: a JSON array of alerts, open
/// ones first, newest first (audit permission).
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
    query: Result<Query<AlertsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Alert>>, ApiError> {
    note.action("alerts.read");
    caller.require(WebPermission::Audit)?;
    let Query(q) = query.map_err(|_| {
        ApiError::BadRequest("unknown or malformed parameter; expected all, limit".into())
    })?;
    let detection = state.alerts().ok_or(ApiError::NotFound)?;
    let (all, limit) = (q.all.unwrap_or(false), q.limit.unwrap_or(1000).min(10_000));
    let list = tokio::task::spawn_blocking(move || detection.store().list(all, limit))
        .await
        .map_err(|e| ApiError::internal("alerts task", e))?
        .map_err(|e| ApiError::internal("alerts", e))?;
    Ok(Json(list))
}

/// `GET /metrics`: the detector's counters in the Prometheus text
/// exposition format 0.0.4 (audit permission).
pub async fn metrics(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
) -> Result<Response, ApiError> {
    note.action("metrics.read");
    caller.require(WebPermission::Audit)?;
    let detection = state.alerts().ok_or(ApiError::NotFound)?;
    let text = tokio::task::spawn_blocking(move || detection.metrics_text())
        .await
        .map_err(|e| ApiError::internal("metrics task", e))?;
    let mut r = text.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(r)
}
