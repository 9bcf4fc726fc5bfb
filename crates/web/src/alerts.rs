//! `GET /api/alerts` (the alerts of the detection rules, open first),
//! `GET /api/alerts/{id}` (one alert with its evidence), `POST
//! /api/alerts/{id}/ack` and `GET /metrics` (Prometheus text format), all
//! for callers with the audit permission (roles `admin` and `auditor`) on
//! the main HTTPS listener.

use axum::{
    extract::{Path, Query, Request, State},
    http::{header, HeaderValue},
    response::{IntoResponse, Response},
    Extension, Json,
};
use bastion_model::WebPermission;
use bastion_security::{alerts::Alert, events::Outcome};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    admin::{blocking, json_body, security_error},
    audit::Note,
    auth::Caller,
    error::ApiError,
    AppState,
};

/// Longest acknowledgement comment, characters.
pub const MAX_COMMENT_CHARS: usize = 1000;

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

/// The id in `/api/alerts/{id}`: a positive integer (anything else names no
/// alert: 404).
fn alert_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or(ApiError::NotFound)
}

/// `GET /api/alerts/{id}`: the alert object (as in `GET /api/alerts`) plus
/// `"evidence"`: the events that raised it, oldest first, each `{"ts",
/// "type", "outcome"}` with, where the event had them, `user`, `actor`,
/// `ae`, `peer`, `source`, `reason`, `action`, `status`
/// ([`bastion_security::detect::evidence`]; never a patient). Empty for
/// alerts raised before evidence was kept.
///
/// # Errors
/// 403 without the audit permission, 404 unknown alert.
pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    note.action("alerts.read");
    caller.require(WebPermission::Audit)?;
    let detection = state.alerts().ok_or(ApiError::NotFound)?;
    let id = alert_id(&id)?;
    let (alert, evidence) = blocking(move || {
        let store = detection.store();
        let Some(alert) = store.get(id)? else {
            return Err(bastion_security::SecurityError::NoSuchAlert(id));
        };
        Ok((alert, store.evidence(id)?))
    })
    .await?
    .map_err(security_error)?;
    let mut j = serde_json::to_value(&alert).map_err(|e| ApiError::internal("alert", e))?;
    j["evidence"] = Value::Array(evidence);
    Ok(Json(j))
}

/// `POST /api/alerts/{id}/ack` `{"comment": "why"}` (non-empty, at most
/// [`MAX_COMMENT_CHARS`] characters) → 200 the acknowledged alert, recorded
/// as `alert.acknowledged` with the web user as `actor`.
///
/// # Errors
/// 400 for a missing, empty or too long comment; 403 without the audit
/// permission; 404 unknown alert; 409 already acknowledged.
pub async fn ack(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Json<Alert>, ApiError> {
    note.action("alerts.ack");
    let (parts, body) = crate::admin::permitted(&caller, WebPermission::Audit, req).await?;
    let detection = state.alerts().ok_or(ApiError::NotFound)?;
    let id = alert_id(&id)?;
    let b: AckBody = json_body(&state, &parts, body).await?;
    let comment = b.comment.trim().to_owned();
    if comment.is_empty() {
        return Err(ApiError::BadRequest(
            "invalid comment: say why the alert is acknowledged".into(),
        ));
    }
    if comment.chars().count() > MAX_COMMENT_CHARS {
        return Err(ApiError::BadRequest(format!(
            "invalid comment: at most {MAX_COMMENT_CHARS} characters"
        )));
    }
    let by = caller.identity.username.clone();
    let text = comment.clone();
    let (alert, acknowledged) = blocking(move || {
        let store = detection.store();
        match store.get(id)? {
            None => Err(bastion_security::SecurityError::NoSuchAlert(id)),
            Some(a) if a.ack.is_some() => Ok((a, false)),
            Some(_) => store.acknowledge(id, &by, &text),
        }
    })
    .await?
    .map_err(security_error)?;
    if !acknowledged {
        return Err(ApiError::Conflict(format!(
            "alert {id} is already acknowledged"
        )));
    }
    state.archive().events().record(
        "alert.acknowledged",
        Outcome::Success,
        json!({"actor": caller.identity.username, "peer": caller.peer_field(), "alert_id": id, "rule": alert.rule,
               "comment": comment}),
    );
    Ok(Json(alert))
}

/// The body of `POST /api/alerts/{id}/ack`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    /// Why the alert is acknowledged.
    comment: String,
}
