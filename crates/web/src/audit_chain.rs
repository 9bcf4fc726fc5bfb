//! `GET /api/audit/chain` (audit permission): whether the tamper-evident
//! audit trail verifies — every record's hash link and authentication tag,
//! every checkpoint's signature — as
//!
//! ```json
//! {"ok": true, "records": 1234, "checkpoints": 21,
//!  "last_checkpoint": "2026-11-30T15:00:00Z", "problems": [],
//!  "checked_at": "2026-11-30T15:00:07Z"}
//! ```
//!
//! `problems` names the first break found (`record 17: …`), or a missing
//! trail. The result is cached for [`CACHE_FOR`] (a page load must not
//! re-read a large trail each time); each real verification is recorded as
//! `audit.verify` with the web user as `actor`, as `bastion audit verify`
//! records it (a failure raises the `audit_verify_failed` alert).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{extract::State, Extension, Json};
use bastion_model::WebPermission;
use bastion_security::{
    audit::{AuditError, AuditReader},
    events::Outcome,
};
use serde_json::{json, Value};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use crate::{audit::Note, auth::Caller, error::ApiError, AppState};

/// How long a verification result is answered from the cache.
pub const CACHE_FOR: Duration = Duration::from_secs(60);

/// The last verification result and when it was made. One verification at
/// a time: concurrent requests wait for it rather than start another.
#[derive(Clone, Default)]
pub struct ChainCache(Arc<tokio::sync::Mutex<Option<(Instant, Value)>>>);

/// `GET /api/audit/chain`: the object in the module documentation.
///
/// # Errors
/// 403 without the audit permission; 500 when no trail reader is
/// configured or the trail cannot be read.
pub async fn status(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
    reader: Option<Extension<Arc<AuditReader>>>,
) -> Result<Json<Value>, ApiError> {
    note.action("audit.chain");
    caller.require(WebPermission::Audit)?;
    let Some(Extension(reader)) = reader else {
        return Err(ApiError::internal(
            "audit chain",
            "no audit trail configured",
        ));
    };
    let mut cached = state.chain_cache().0.lock().await;
    if let Some((at, v)) = cached.as_ref() {
        if at.elapsed() < CACHE_FOR {
            return Ok(Json(v.clone()));
        }
    }
    let report = tokio::task::spawn_blocking(move || reader.verify())
        .await
        .map_err(|e| ApiError::internal("audit chain task", e))?;
    let (records, checkpoints, last, problems) = match report {
        Ok(r) => (
            r.records,
            r.checkpoints,
            r.last_checkpoint,
            r.broken.map(|b| b.to_string()).into_iter().collect(),
        ),
        Err(AuditError::Missing(_)) => (0, 0, None, vec!["the audit trail is missing".to_owned()]),
        Err(e) => return Err(ApiError::internal("audit chain", e)),
    };
    let problems: Vec<String> = problems;
    let ok = problems.is_empty();
    state.archive().events().record(
        "audit.verify",
        if ok { Outcome::Success } else { Outcome::Alert },
        json!({"actor": caller.identity.username, "peer": caller.peer_field(), "records": records, "checkpoints": checkpoints,
               "result": problems.first().map_or("intact", String::as_str)}),
    );
    note.audited();
    let v = json!({
        "ok": ok,
        "records": records,
        "checkpoints": checkpoints,
        "last_checkpoint": last,
        "problems": problems,
        "checked_at": OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default(),
    });
    *cached = Some((Instant::now(), v.clone()));
    Ok(Json(v))
}
