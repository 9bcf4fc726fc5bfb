//! Every request is recorded in the security event log (`http.request`:
//! user, source address, method, path, action, status, outcome, Study
//! Instance UIDs touched; never a query string, which may hold patient
//! names), and `GET /api/events` lets auditors read it.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{Query, Request, State},
    middleware::Next,
    response::Response,
    Extension, Json,
};
use bastion_model::WebPermission;
use bastion_security::events::Outcome;
use serde::Deserialize;

use crate::{auth::Caller, error::ApiError, AppState};

/// What the handlers learnt about a request, for its event record. Cloned
/// into the request's extensions by [`record`]; the handlers fill it in.
#[derive(Debug, Clone, Default)]
pub struct Note(Arc<Mutex<NoteInner>>);

#[derive(Debug, Default)]
struct NoteInner {
    user: Option<String>,
    action: Option<&'static str>,
    studies: BTreeSet<String>,
    qido: Option<serde_json::Value>,
    /// The QIDO-RS query string: names patients, so it goes to the audit
    /// trail only (`EventLog::record_private`), never to the event log.
    query: Option<Vec<u8>>,
    /// The handler recorded its own event for this access (`audit.read`,
    /// `audit.verify`), which is then the audit trail's one message for it.
    audited: bool,
    /// A successful read of a public program file (the OHIF viewer's):
    /// not recorded.
    quiet: bool,
}

impl Note {
    fn with<T>(&self, f: impl FnOnce(&mut NoteInner) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The account name the request claimed or authenticated as.
    pub fn set_user(&self, user: &str) {
        self.with(|n| n.user = Some(printable(user, 64)));
    }

    /// The action name (`qido.studies`, `wado.instance`, `login`…).
    pub fn action(&self, action: &'static str) {
        self.with(|n| n.action = Some(action));
    }

    /// What a QIDO-RS search asked for (query level, whether any key
    /// restricts it, `limit`), for the broad-query detection rule.
    pub fn qido(&self, level: &str, universal: bool, limit: Option<usize>) {
        self.with(|n| {
            n.qido =
                Some(serde_json::json!({"level": level, "universal": universal, "limit": limit}))
        });
    }

    /// The raw query string of a QIDO-RS search, for the audit trail's
    /// Query message only (never written to the event log).
    pub fn query(&self, raw: &[u8]) {
        self.with(|n| n.query = Some(raw.to_vec()));
    }

    /// The handler recorded its own event for this request, whose DICOM
    /// audit message stands for the request (the `http.request` event is
    /// still recorded, marked `"audited": true`, and maps to no message).
    pub fn audited(&self) {
        self.with(|n| n.audited = true);
    }

    /// The request reads a public program file (no patient data, no access
    /// decision): when it succeeds it is not recorded (an OHIF page load
    /// reads about 60 files). Refusals and errors are still recorded.
    pub fn quiet(&self) {
        self.with(|n| n.quiet = true);
    }

    /// A Study Instance UID the request touched.
    pub fn study(&self, uid: &str) {
        self.with(|n| {
            if n.studies.len() < 1000 {
                n.studies.insert(printable(uid, 64));
            }
        });
    }
}

/// Peer-supplied text clipped to printable ASCII.
fn printable(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// Middleware: records one `http.request` event per request, after the
/// response is known.
pub async fn record(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let note = Note::default();
    req.extensions_mut().insert(note.clone());
    let method = req.method().to_string();
    let path = printable(req.uri().path(), 256);
    let peer = crate::auth::peer(req.extensions())
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    let response = next.run(req).await;
    let status = response.status();
    let outcome = if status.is_success() || status.is_redirection() {
        Outcome::Success
    } else if status.is_server_error() {
        Outcome::Failure
    } else {
        Outcome::Refused
    };
    if status.is_success() && note.with(|n| n.quiet) {
        return response;
    }
    let (user, action, studies, qido, query, audited) = note.with(|n| {
        (
            n.user.take(),
            n.action,
            std::mem::take(&mut n.studies),
            n.qido.take(),
            n.query.take(),
            n.audited,
        )
    });
    let mut fields = serde_json::json!({
        "user": user,
        "peer": peer,
        "method": method,
        "path": path,
        "action": action,
        "status": status.as_u16(),
        "study_uids": studies.into_iter().collect::<Vec<_>>(),
    });
    if let Some(m) = fields.as_object_mut() {
        if let Some(q) = qido {
            m.insert("qido".into(), q);
        }
        if audited {
            m.insert("audited".into(), true.into());
        }
    }
    let private = query.map_or(serde_json::Value::Null, |q| {
        bastion_security::audit::private_query(&q, None)
    });
    state
        .archive()
        .events()
        .record_private("http.request", outcome, fields, private);
    response
}

/// `GET /api/events` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// The last `limit` events (default 1000, at most 10,000).
    limit: Option<usize>,
}

/// `GET /api/events`: the most recent events of the security event log, as
/// a JSON array (audit permission).
pub async fn events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    note.action("events.read");
    caller.require(WebPermission::Audit)?;
    let Query(q) = query.map_err(|_| {
        ApiError::BadRequest("unknown or malformed parameter; expected limit".into())
    })?;
    let limit = q.limit.unwrap_or(1000).min(10_000);
    let archive = state.archive();
    let all = tokio::task::spawn_blocking(move || archive.events().read_all())
        .await
        .map_err(|e| ApiError::internal("event log task", e))?
        .map_err(|e| ApiError::internal("event log", e))?;
    let skip = all.len().saturating_sub(limit);
    Ok(Json(all.into_iter().skip(skip).collect()))
}
