//! Middleware: while the audit trail cannot record, patient data is not
//! served (issue 10, finding 1; PS3.15 A.5: every access to patient data
//! leaves an audit record, so an access that cannot be recorded is refused).
//!
//! Runs after authentication (an unauthenticated caller still gets 401) and
//! inside the event record (each refusal is an `http.request` with status
//! 503, written into the trail's reserve). Answers 503 with `Retry-After`
//! ([`crate::error::ApiError::AuditUnavailable`]) to everything except what
//! an administrator needs to see and fix the situation and carries no
//! patient data: the web UI's assets, log-in/log-out/`/api/me`, the posture
//! page, the audit chain status, the alerts and `/metrics`. Service resumes
//! by itself when the trail records again.

use axum::{
    extract::{Request, State},
    http::Method,
    middleware::Next,
    response::{IntoResponse, Response},
};

use crate::{error::ApiError, ui, AppState};

/// Paths served while the trail is down (exact, or a prefix ending in `/`).
const EXEMPT: &[&str] = &[
    "/api/login",
    "/api/logout",
    "/api/me",
    "/api/posture",
    "/api/audit/chain",
    "/api/alerts",
    "/api/alerts/",
    "/metrics",
];

/// `true` when `method path` is served even while the trail is down.
pub fn exempt(method: &Method, path: &str) -> bool {
    if *method == Method::OPTIONS {
        return true;
    }
    if *method == Method::GET && ui::ASSETS.iter().any(|a| a.path == path) {
        return true;
    }
    // The OHIF viewer's program files: no patient data.
    if crate::ohif::is_viewer_path(method, path) {
        return true;
    }
    EXEMPT
        .iter()
        .any(|e| path == *e || (e.ends_with('/') && path.starts_with(e)))
}

/// The middleware (see the module docs).
pub async fn gate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.archive().events().refuses_unaudited() && !exempt(req.method(), req.uri().path()) {
        tracing::warn!(path = %req.uri().path(), "HTTP request refused (503): the audit trail is not recording");
        return ApiError::AuditUnavailable.into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_data_routes_are_not_exempt() {
        for p in [
            "/dicomweb/studies",
            "/dicomweb/studies/1.2/series",
            "/api/studies/1.2/export",
            "/api/audit",
            "/api/events",
            "/api/devices",
            "/api/users",
        ] {
            assert!(!exempt(&Method::GET, p), "{p}");
        }
        assert!(!exempt(&Method::POST, "/dicomweb/studies"));
        for p in [
            "/api/login",
            "/api/posture",
            "/api/audit/chain",
            "/api/alerts/7",
            "/",
        ] {
            let m = if p == "/api/login" {
                Method::POST
            } else {
                Method::GET
            };
            assert!(exempt(&m, p), "{p}");
        }
    }
}
