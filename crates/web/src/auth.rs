//! Authentication on every route, the account API (`/api/login`,
//! `/api/logout`, `/api/me`, `/api/password`) and the CSRF and Origin
//! checks.
//!
//! Credentials, in this order:
//! 1. `Authorization: Bearer <token>` ([`crate::accounts::AccountService::verify_token`]);
//!    no CSRF token needed (a browser never attaches it by itself);
//! 2. the `bastion_session` cookie ([`crate::accounts::AccountService::session`]); a
//!    state-changing request (anything but GET, HEAD, OPTIONS) must carry
//!    `X-CSRF-Token` equal to the session's token (compared in constant
//!    time), else 403.
//!
//! A token in the query string (`access_token`, `token`) is refused with 400
//! before anything else: URLs end up in logs, proxies and browser history.
//! Anonymous routes: `POST /api/login` (checks `Origin`: absent — not a
//! browser — or our own origin or an allowed CORS origin), `POST
//! /api/password` (needs the current password, and for an account with
//! TOTP the account's own session cookie or a TOTP code), CORS preflights (answered
//! by the CORS layer before this one) and `GET` of the web UI's static
//! assets (exact paths, [`crate::ui::ASSETS`]; no patient data).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{ConnectInfo, Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Extension, Json,
};
use bastion_model::WebPermission;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::{
    accounts::{
        Identity, LoginAttempt, LoginResult, PasswordChangeRequest, PasswordChangeResult,
        TotpEnrolResult,
    },
    audit::Note,
    error::ApiError,
    AppState,
};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "bastion_session";
/// The CSRF header a cookie-authenticated state-changing request carries.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// How the caller authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMethod {
    /// Bearer token.
    Token,
    /// Session cookie (with this session id).
    Session(String),
}

/// The authenticated caller, put in the request's extensions by
/// [`authenticate`].
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who.
    pub identity: Identity,
    /// How.
    pub method: AuthMethod,
    /// From where: the TCP peer of the request (the NetworkAccessPointID
    /// of the audit messages of what the caller changes).
    pub peer: Option<SocketAddr>,
}

impl Caller {
    /// The caller's address as the events record it (`peer`: `ip:port`).
    pub fn peer_field(&self) -> Option<String> {
        self.peer.map(|a| a.to_string())
    }

    /// `Ok` when the credential grants `p`, else 403.
    ///
    /// # Errors
    /// [`ApiError::Forbidden`].
    pub fn require(&self, p: WebPermission) -> Result<(), ApiError> {
        if self.identity.may(p) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(match p {
                WebPermission::Query => "searching needs the query permission",
                WebPermission::View => "retrieving needs the view permission",
                WebPermission::Upload => "storing needs the upload permission",
                WebPermission::Audit => "the event log needs the audit permission",
                WebPermission::Admin => "administration needs the admin permission",
                WebPermission::Export => "downloading a study needs the export permission",
            }))
        }
    }
}

/// The peer address of a request (from the connection; "unknown" in tests
/// that do not set it).
pub fn peer(req_ext: &axum::http::Extensions) -> Option<SocketAddr> {
    req_ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

fn is_public(method: &Method, path: &str) -> bool {
    (*method == Method::POST
        && (path == "/api/login" || path == "/api/password" || path == "/api/totp/enrol"))
        || crate::ui::is_asset(method, path)
        || crate::ohif::is_viewer_path(method, path)
}

fn state_changing(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Middleware: authenticates every request except the anonymous routes,
/// enforces CSRF and the first-login password change, and puts a [`Caller`]
/// in the extensions.
pub async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match identify(&state, &mut req).await {
        Ok(None) => Ok(next.run(req).await),
        Ok(Some(caller)) => {
            req.extensions_mut().insert(caller);
            Ok(next.run(req).await)
        }
        Err(e) => {
            let (parts, body) = req.into_parts();
            crate::body::drain(&parts.headers, body).await;
            Err(e)
        }
    }
}

/// The authenticated caller of `req`; `None` for an anonymous route.
async fn identify(state: &AppState, req: &mut Request) -> Result<Option<Caller>, ApiError> {
    if token_in_query(req.uri().query()) {
        return Err(ApiError::TokenInQuery);
    }
    let path = req.uri().path().to_owned();
    if is_public(req.method(), &path) {
        return Ok(None);
    }
    let accounts = state.accounts();
    let caller = if let Some(auth) = req.headers().get(header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| rest.trim().to_owned())
            })
            .filter(|t| !t.is_empty() && t.len() <= 512)
            .ok_or(ApiError::Unauthenticated)?;
        let identity = blocking(move || accounts.verify_token(&token))
            .await?
            .ok_or(ApiError::Unauthenticated)?;
        Caller {
            identity,
            method: AuthMethod::Token,
            peer: peer(req.extensions()),
        }
    } else if let Some(id) = session_cookie(req.headers()) {
        let lookup = id.clone();
        let session = blocking(move || accounts.session(&lookup))
            .await?
            .ok_or(ApiError::Unauthenticated)?;
        if state_changing(req.method()) {
            let sent = req
                .headers()
                .get(CSRF_HEADER)
                .map(HeaderValue::as_bytes)
                .unwrap_or_default();
            let ok: bool = sent.ct_eq(session.csrf.as_bytes()).into();
            if !ok || session.csrf.is_empty() {
                if let Some(note) = req.extensions().get::<Note>() {
                    note.set_user(&session.identity.username);
                }
                return Err(ApiError::Csrf);
            }
        }
        Caller {
            identity: session.identity,
            method: AuthMethod::Session(id),
            peer: peer(req.extensions()),
        }
    } else {
        return Err(ApiError::Unauthenticated);
    };
    if let Some(note) = req.extensions().get::<Note>() {
        note.set_user(&caller.identity.username);
    }
    if caller.identity.must_change_password && !(path == "/api/me" || path == "/api/logout") {
        return Err(ApiError::PasswordChangeRequired);
    }
    Ok(Some(caller))
}

/// Whether the query string carries a credential (`access_token=`, `token=`).
fn token_in_query(query: Option<&str>) -> bool {
    // Names are compared after percent-decoding (`access%5Ftoken` is the
    // same parameter to most frameworks and proxies).
    query.is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes()).any(|(name, _)| {
            name.eq_ignore_ascii_case("access_token") || name.eq_ignore_ascii_case("token")
        })
    })
}

/// The value of the `bastion_session` cookie, if any.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|v| !v.is_empty() && v.len() <= 256)
}

/// Runs blocking account work (argon2id, database) off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("account task", e))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: String,
    #[serde(default)]
    totp: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    username: String,
    old_password: String,
    new_password: String,
    #[serde(default)]
    totp: Option<String>,
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|_| ApiError::BadRequest("malformed JSON body for this request".into()))
}

fn source_ip(ext: &axum::http::Extensions) -> std::net::IpAddr {
    peer(ext)
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

/// Whether `Origin` (when present) is our own origin (`https://` + Host) or
/// an allowed CORS origin.
fn origin_allowed(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        // Not a browser: login CSRF needs a browser, and browsers send
        // Origin on every POST.
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let own = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| format!("https://{h}"));
    own.as_deref() == Some(origin)
        || state
            .config()
            .cors_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin))
}

/// The JSON body of an anonymous POST (login, first-login password change):
/// the `Origin` must be ours or a CORS origin (403), the Content-Type
/// `application/json` (415: a form or text/plain POST is what a cross-site
/// page can send without a CORS preflight), the body within the JSON limit.
async fn anonymous_json<T: serde::de::DeserializeOwned>(
    state: &AppState,
    parts: &axum::http::request::Parts,
    body: Body,
) -> Result<T, ApiError> {
    if !origin_allowed(state, &parts.headers) {
        crate::body::drain(&parts.headers, body).await;
        return Err(ApiError::Origin);
    }
    let bytes = crate::body::json_bytes(
        &parts.headers,
        body,
        state.config().max_json_bytes,
        state.config().body_timeout,
    )
    .await?;
    // A generic message: serde's could quote a value, and these bodies
    // carry passwords.
    parse_json(&bytes)
}

/// A login attempt from an anonymous body, its user name noted for the
/// request's event (clipped: it is peer-supplied).
fn attempt_of(
    note: &Note,
    parts: &axum::http::request::Parts,
    username: String,
    password: String,
    totp: Option<String>,
) -> LoginAttempt {
    note.set_user(&username.chars().take(64).collect::<String>());
    LoginAttempt {
        username,
        password,
        totp,
        source: source_ip(&parts.extensions),
    }
}

/// `POST /api/login`: `{"username", "password", "totp"?}` → 200
/// `{"username", "role", "csrf", "must_change_password"}` and the session
/// cookie; 401 (one answer for every failure), 429 with `Retry-After`.
pub async fn login(
    State(state): State<AppState>,
    Extension(note): Extension<Note>,
    req: Request,
) -> Result<Response, ApiError> {
    note.action("login");
    let (parts, body) = req.into_parts();
    let b: LoginBody = anonymous_json(&state, &parts, body).await?;
    let attempt = attempt_of(&note, &parts, b.username, b.password, b.totp);
    let accounts = state.accounts();
    match blocking(move || accounts.login(&attempt)).await? {
        LoginResult::Success {
            session_id,
            csrf,
            identity,
            max_age,
        } => session_response(&identity, &session_id, &csrf, max_age),
        // One answer for every failure but the enrolment case: a distinct
        // one for "second factor missing" or "disabled" would confirm a
        // guessed password. The accounts service records which it was in
        // the event log.
        other => Err(refusal(other)),
    }
}

/// The error for a login that did not succeed.
fn refusal(r: LoginResult) -> ApiError {
    match r {
        // The enrolment needs the right password: telling that much lets
        // the administrator set up the second factor from the browser.
        LoginResult::TotpSetupRequired => ApiError::TotpSetupRequired,
        LoginResult::Throttled { retry_after } | LoginResult::Locked { retry_after } => {
            ApiError::Throttled { retry_after }
        }
        LoginResult::Success { .. }
        | LoginResult::Failed
        | LoginResult::TotpRequired
        | LoginResult::Disabled => ApiError::LoginFailed,
    }
}

fn session_response(
    identity: &crate::accounts::Identity,
    session_id: &str,
    csrf: &str,
    max_age: Duration,
) -> Result<Response, ApiError> {
    let mut r = Json(serde_json::json!({
        "username": identity.username,
        "role": identity.role.as_str(),
        "csrf": csrf,
        "must_change_password": identity.must_change_password,
    }))
    .into_response();
    set_cookie(&mut r, session_id, max_age)?;
    Ok(r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrolBody {
    username: String,
    password: String,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    totp: Option<String>,
}

/// `POST /api/totp/enrol`: TOTP enrolment of an administrator who must have
/// a second factor and has none (login answered 403 "two-factor
/// authentication must be set up"). Anonymous, with the checks of a login
/// (Origin, JSON, throttle):
/// - `{"username", "password"}` → 200 `{"secret": base32, "uri":
///   "otpauth://…", "qr_svg": "<svg…>"}` (nothing stored yet);
/// - `{"username", "password", "secret", "totp"}` → the secret is stored
///   and a session starts: 200 as `POST /api/login`, with the cookie.
///
/// 401 for a wrong password, a wrong code or an account that needs no
/// enrolment (one answer); 429 with `Retry-After` when throttled.
pub async fn enrol_totp(
    State(state): State<AppState>,
    Extension(note): Extension<Note>,
    req: Request,
) -> Result<Response, ApiError> {
    note.action("totp.enrol");
    let (parts, body) = req.into_parts();
    let b: EnrolBody = anonymous_json(&state, &parts, body).await?;
    let attempt = attempt_of(&note, &parts, b.username, b.password, b.totp);
    let accounts = state.accounts();
    let secret = b.secret;
    match blocking(move || accounts.enrol_totp(&attempt, secret.as_deref())).await? {
        TotpEnrolResult::Secret { secret, uri } => {
            let qr_svg = qrcode::QrCode::new(uri.as_bytes())
                .map(|q| {
                    q.render::<qrcode::render::svg::Color>()
                        .min_dimensions(200, 200)
                        .quiet_zone(true)
                        .build()
                })
                .map_err(|e| ApiError::internal("QR code", e))?;
            Ok(
                Json(serde_json::json!({"secret": secret, "uri": uri, "qr_svg": qr_svg}))
                    .into_response(),
            )
        }
        TotpEnrolResult::Login(LoginResult::Success {
            session_id,
            csrf,
            identity,
            max_age,
        }) => session_response(&identity, &session_id, &csrf, max_age),
        TotpEnrolResult::Login(other) => Err(refusal(other)),
    }
}

fn set_cookie(r: &mut Response, value: &str, max_age: Duration) -> Result<(), ApiError> {
    let cookie = format!(
        "{SESSION_COOKIE}={value}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={}",
        max_age.as_secs()
    );
    let v = HeaderValue::from_str(&cookie).map_err(|e| ApiError::internal("session cookie", e))?;
    r.headers_mut().append(header::SET_COOKIE, v);
    Ok(())
}

/// `POST /api/logout`: ends the session (cookie) and clears the cookie; 204.
pub async fn logout(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
) -> Result<Response, ApiError> {
    note.action("logout");
    if let AuthMethod::Session(id) = caller.method {
        let accounts = state.accounts();
        blocking(move || accounts.logout(&id)).await?;
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    set_cookie(&mut r, "", Duration::ZERO)?;
    Ok(r)
}

/// `GET /api/me`: who is logged in, with which role and permissions:
/// `{"username", "role", "permissions": [...], "must_change_password",
/// "method": "session"|"token", "session_idle_secs"}`; `session_idle_secs`
/// (the account policy's idle timeout of a session, for the UI's idle
/// logout) is left out when the account service does not say.
pub async fn me(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
) -> Json<serde_json::Value> {
    note.action("me");
    let i = &caller.identity;
    let mut v = serde_json::json!({
        "username": i.username,
        "role": i.role.as_str(),
        "permissions": i.permissions.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "must_change_password": i.must_change_password,
        "method": match caller.method { AuthMethod::Token => "token", AuthMethod::Session(_) => "session" },
    });
    if let Some(idle) = state.accounts().session_idle() {
        v["session_idle_secs"] = idle.as_secs().into();
    }
    // Where the OHIF viewer is served (`[http] ohif_dir`), for the study
    // list's "Open in OHIF"; null without one.
    v["viewer"] = if state.ohif().is_some() {
        crate::ohif::PREFIX.into()
    } else {
        serde_json::Value::Null
    };
    Json(v)
}

/// `POST /api/password`: `{"username", "old_password", "new_password",
/// "totp"?}` → 204 (and the session cookie cleared: every session of the
/// account ends), or, for an account with TOTP (whose request proved it),
/// 200 with a new session as a login answers (every other session ends;
/// the holder stays logged in without a second code). Anonymous (the first-login change), so it checks `Origin`
/// as login does. An account with TOTP must also prove the second factor:
/// the request carries a session cookie of that same account (its login
/// passed TOTP), or `totp` is a valid, unused code; otherwise 401, the
/// answer of a wrong password (counted as a failure). 400 for a refused new
/// password, 429 with `Retry-After` when throttled.
pub async fn change_password(
    State(state): State<AppState>,
    Extension(note): Extension<Note>,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    note.action("password.change");
    let (parts, body) = req.into_parts();
    let b: PasswordBody = anonymous_json(&state, &parts, body).await?;
    note.set_user(&b.username.chars().take(64).collect::<String>());
    let request = PasswordChangeRequest {
        username: b.username,
        old_password: b.old_password,
        new_password: b.new_password,
        totp: b.totp,
        session_id: session_cookie(&parts.headers),
        source: source_ip(&parts.extensions),
    };
    let accounts: Arc<dyn crate::accounts::AccountService> = state.accounts();
    match blocking(move || accounts.change_password(&request)).await? {
        PasswordChangeResult::Changed => {
            let mut r = StatusCode::NO_CONTENT.into_response();
            set_cookie(&mut r, "", Duration::ZERO)?;
            Ok(r)
        }
        PasswordChangeResult::ChangedLoggedIn {
            session_id,
            csrf,
            identity,
            max_age,
        } => session_response(&identity, &session_id, &csrf, max_age),
        PasswordChangeResult::Failed => Err(ApiError::LoginFailed),
        PasswordChangeResult::Rejected(reason) => Err(ApiError::BadRequest(reason)),
        PasswordChangeResult::Throttled { retry_after } => Err(ApiError::Throttled { retry_after }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_in_query_strings_are_spotted() {
        assert!(token_in_query(Some("access_token=x")));
        assert!(token_in_query(Some("limit=1&TOKEN=x")));
        assert!(token_in_query(Some("access%5Ftoken=x")));
        assert!(token_in_query(Some("%74oken=x")));
        assert!(!token_in_query(Some("PatientID=token")));
        assert!(!token_in_query(None));
    }

    #[test]
    fn session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; bastion_session=abc123; c=d"),
        );
        assert_eq!(session_cookie(&h).as_deref(), Some("abc123"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("xbastion_session=1"),
        );
        assert_eq!(session_cookie(&h), None);
    }
}
