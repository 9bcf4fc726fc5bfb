//! `GET /api/audit`: search the tamper-evident audit trail (auditor and
//! admin: [`WebPermission::Audit`]). Each search is itself recorded
//! (`audit.read` → DICOM "Audit Log Used").

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    Extension, Json, Router,
};
use bastion_model::WebPermission;
use bastion_security::{
    audit::{AuditReader, Filter, EVENT_NAMES},
    events::Outcome,
};
use serde::Deserialize;
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use crate::{audit::Note, auth::Caller, error::ApiError, AppState};

/// Makes the trail searchable through `GET /api/audit` (without it the
/// route answers 503).
pub fn with_audit(router: Router, reader: Arc<AuditReader>) -> Router {
    router.layer(Extension(reader))
}

/// `GET /api/audit` parameters (all optional).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    user: Option<String>,
    device: Option<String>,
    patient_id: Option<String>,
    study: Option<String>,
    /// RFC 3339.
    since: Option<String>,
    /// RFC 3339.
    until: Option<String>,
    /// An EventID name (`query`, `security-alert`…) or an event type.
    event: Option<String>,
    /// The most recent `limit` matches (default 1000, at most 10,000).
    limit: Option<usize>,
}

fn time_param(name: &str, v: Option<&str>) -> Result<Option<OffsetDateTime>, ApiError> {
    v.map(|s| {
        OffsetDateTime::parse(s, &Rfc3339)
            .map_err(|_| ApiError::BadRequest(format!("{name} must be an RFC 3339 time")))
    })
    .transpose()
}

/// `GET /api/audit`: matching records, oldest first, as a JSON array of
/// record summaries (time, type, outcome, EventIDs, user, device, peer,
/// patients, studies, the event and its DICOM audit messages).
pub async fn search(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
    request_parts: axum::http::Extensions,
    reader: Option<Extension<Arc<AuditReader>>>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    note.action("audit.search");
    caller.require(WebPermission::Audit)?;
    let Query(q) = query.map_err(|_| {
        ApiError::BadRequest(
            "unknown or malformed parameter; expected user, device, patient_id, study, since, until, event, limit".into(),
        )
    })?;
    if let Some(e) = &q.event {
        if !EVENT_NAMES.contains(&e.as_str()) && !e.contains('.') && e != "logout" {
            return Err(ApiError::BadRequest(format!(
                "unknown event; expected one of {} or an event type",
                EVENT_NAMES.join(", ")
            )));
        }
    }
    let Some(Extension(reader)) = reader else {
        return Err(ApiError::internal(
            "audit search",
            "no audit trail configured",
        ));
    };
    let filter = Filter {
        user: q.user.clone(),
        device: q.device.clone(),
        patient_id: q.patient_id.clone(),
        study: q.study.clone(),
        since: time_param("since", q.since.as_deref())?,
        until: time_param("until", q.until.as_deref())?,
        event: q.event.clone(),
    };
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let (found, _unreadable) = tokio::task::spawn_blocking(move || reader.search(&filter, limit))
        .await
        .map_err(|e| ApiError::internal("audit search task", e))?
        .map_err(|e| ApiError::internal("audit search", e))?;
    state.archive().events().record(
        "audit.read",
        Outcome::Success,
        serde_json::json!({"user": caller.identity.username, "peer": crate::auth::peer(&request_parts).map(|a| a.to_string()), "via": "api",
            "matches": found.len(),
            "filter": {"user": q.user, "device": q.device, "patient_id": q.patient_id.is_some(),
                "study": q.study, "event": q.event, "since": q.since, "until": q.until}}),
    );
    note.audited();
    Ok(Json(found.iter().map(|r| r.summary()).collect()))
}
