//! `GET /api/alerts` (the alerts of the detection rules, open first),
//! `GET /api/alerts/{id}` (one alert with its evidence), `POST
//! /api/alerts/{id}/ack`, `POST /api/alerts/ack` (bulk acknowledgement by
//! ids or filter) and `GET /metrics` (Prometheus text format), all for
//! callers with the audit permission (roles `admin` and `auditor`) on the
//! main HTTPS listener.

use axum::{
    extract::{Path, Query, Request, State},
    http::{header, HeaderValue},
    response::{IntoResponse, Response},
    Extension, Json,
};
use bastion_model::WebPermission;
use bastion_security::{
    alerts::{AckFilter, Alert},
    events::Outcome,
};
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
    let comment = checked_comment(&b.comment)?;
    let by = caller.identity.username.clone();
    let text = comment.clone();
    let (alert, acknowledged) = blocking(move || {
        let store = detection.store();
        match store.get(id)? {
            None => Err(bastion_security::DetectError::NoSuchAlert(id)),
            Some(a) if a.ack.is_some() => Ok((a, false)),
            Some(_) => store.acknowledge(id, &by, &text),
        }
    })
    .await?
    .map_err(|e| security_error(e.into()))?;
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

/// Most ids named in one `alert.acknowledged` event of a bulk
/// acknowledgement (the count is always complete).
const MAX_IDS_IN_EVENT: usize = 1000;

/// `POST /api/alerts/ack` `{"comment": "why", "ids": [1, 2]}` or with a
/// filter instead of ids: `"rule": "unknown_device"`, `"before":
/// "2026-01-01T00:00:00Z"` (RFC 3339), or `"all": true` for every open
/// alert; conditions given together must all hold. → 200 `{"acknowledged":
/// [ids], "count": n}` (already acknowledged alerts are skipped, not an
/// error), recorded as one `alert.acknowledged` with the web user as
/// `actor`, the ids and the count.
///
/// # Errors
/// 400 for a missing, empty or too long comment, no ids and no filter (say
/// `"all": true`), an empty id list, or a malformed `before`; 403 without
/// the audit permission.
pub async fn ack_many(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
    req: Request,
) -> Result<Json<Value>, ApiError> {
    note.action("alerts.ack");
    let (parts, body) = crate::admin::permitted(&caller, WebPermission::Audit, req).await?;
    let detection = state.alerts().ok_or(ApiError::NotFound)?;
    let b: AckManyBody = json_body(&state, &parts, body).await?;
    let comment = checked_comment(&b.comment)?;
    if b.ids.as_ref().is_some_and(Vec::is_empty) {
        return Err(ApiError::BadRequest(
            "invalid ids: the list is empty".into(),
        ));
    }
    let before = match b.before.as_deref() {
        None => None,
        Some(t) => Some(
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map_err(|_| {
                    ApiError::BadRequest(
                        "invalid before: an RFC 3339 time like 2026-01-01T00:00:00Z".into(),
                    )
                })?,
        ),
    };
    let filter = AckFilter {
        ids: b.ids,
        rule: b.rule,
        before,
    };
    if filter == AckFilter::default() && b.all != Some(true) {
        return Err(ApiError::BadRequest(
            "say which alerts: ids, rule, before, or \"all\": true".into(),
        ));
    }
    let by = caller.identity.username.clone();
    let text = comment.clone();
    let f = filter.clone();
    let ids = blocking(move || detection.store().acknowledge_many(&f, &by, &text))
        .await?
        .map_err(|e| security_error(e.into()))?;
    state.archive().events().record(
        "alert.acknowledged",
        Outcome::Success,
        json!({"actor": caller.identity.username,
               "alert_ids": ids.iter().take(MAX_IDS_IN_EVENT).collect::<Vec<_>>(),
               "count": ids.len(), "rule": filter.rule, "bulk": true, "comment": comment}),
    );
    Ok(Json(json!({"acknowledged": ids, "count": ids.len()})))
}

/// A trimmed, non-empty comment of at most [`MAX_COMMENT_CHARS`] characters.
fn checked_comment(raw: &str) -> Result<String, ApiError> {
    let comment = raw.trim().to_owned();
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
    Ok(comment)
}

/// The body of `POST /api/alerts/ack`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckManyBody {
    /// Why the alerts are acknowledged.
    comment: String,
    /// Only these alerts.
    ids: Option<Vec<i64>>,
    /// Only alerts of this rule.
    rule: Option<String>,
    /// Only alerts raised before this time (RFC 3339).
    before: Option<String>,
    /// `true`: every open alert (required when no other condition is given).
    all: Option<bool>,
}

/// The body of `POST /api/alerts/{id}/ack`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    /// Why the alert is acknowledged.
    comment: String,
}
