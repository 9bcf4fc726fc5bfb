//! User accounts over HTTPS (admin permission), through the same
//! [`Accounts`](bastion_security::accounts::Accounts) calls as `bastion
//! user …`: the events (`user.added`, `user.disabled`, `user.enabled`,
//! `user.unlocked`, `user.password_set`) are recorded by the account
//! service with the web user as `actor` and the caller's address as `peer`.
//!
//! A user object is `bastion user list --json`'s — `username`, `role`,
//! `disabled`, `locked`, `failed_logins`, `must_change_password`,
//! `totp_enabled`, `created` — plus `totp` (the same as `totp_enabled`).
//! Never a password hash or TOTP secret; a generated password is in the
//! one answer that created it, never in a listing or the event log.

use axum::{
    extract::{Path, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Extension, Json,
};
use bastion_model::{Role, WebPermission};
use bastion_security::accounts::{Actor, PasswordChoice, UserInfo};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, context, json_body, security_error};
use crate::{audit::Note, auth::Caller, error::ApiError, AppState};

/// The body of `POST /api/users`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// Letters, digits, `.`, `_`, `@`, `-`; at most 64.
    username: String,
    /// `admin`, `clinician`, `technologist`, `auditor` or `researcher`.
    role: String,
}

/// The user object of one account (see the module documentation).
pub fn user_object(u: &UserInfo) -> Value {
    let mut j = u.to_json();
    j["totp"] = Value::Bool(u.totp_enabled);
    j
}

/// `GET /api/users`: every account, by name, as user objects.
///
/// # Errors
/// 403 without the admin permission.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
) -> Result<Json<Vec<Value>>, ApiError> {
    note.action("users.list");
    caller.require(WebPermission::Admin)?;
    let accounts = context(&state)?.accounts.clone();
    let list = blocking(move || accounts.list_users())
        .await?
        .map_err(security_error)?;
    Ok(Json(list.iter().map(user_object).collect()))
}

/// `POST /api/users` `{"username", "role"}` → 201 `{"username", "role",
/// "password"}`: the account gets a generated password, shown this once,
/// which must be changed at the first login.
///
/// # Errors
/// 400 for an invalid user name or role, 409 when the name exists (or one
/// equal to it but for ASCII letter case), 415 for a non-JSON body.
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
    req: Request,
) -> Result<Response, ApiError> {
    note.action("users.add");
    let (parts, body) = super::permitted(&caller, WebPermission::Admin, req).await?;
    let accounts = context(&state)?.accounts.clone();
    let b: NewUser = json_body(&state, &parts, body).await?;
    let role =
        Role::parse(&b.role).map_err(|e| ApiError::BadRequest(format!("invalid role: {e}")))?;
    let actor = caller.identity.username.clone();
    let peer = caller.peer_field();
    let name = b.username.clone();
    let password = blocking(move || {
        accounts.add_user(
            Actor::remote(&actor, peer.as_deref()),
            &name,
            role,
            PasswordChoice::Generate,
        )
    })
    .await?
    .map_err(security_error)?
    .ok_or_else(|| ApiError::internal("user add", "no generated password"))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"username": b.username, "role": role.as_str(), "password": password})),
    )
        .into_response())
}

/// What a `POST /api/users/{name}/…` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Disable,
    Enable,
    Unlock,
}

/// `POST /api/users/{name}/disable` → 200 user object: the account's
/// sessions end and its tokens stop working.
///
/// # Errors
/// 404 unknown user; 409 for the last enabled admin, or for the caller's
/// own account.
pub async fn disable(
    state: State<AppState>,
    caller: Extension<Caller>,
    note: Extension<Note>,
    name: Path<String>,
) -> Result<Json<Value>, ApiError> {
    note.action("users.disable");
    change(state, caller, name, Change::Disable).await
}

/// `POST /api/users/{name}/enable` → 200 user object.
///
/// # Errors
/// 404 unknown user.
pub async fn enable(
    state: State<AppState>,
    caller: Extension<Caller>,
    note: Extension<Note>,
    name: Path<String>,
) -> Result<Json<Value>, ApiError> {
    note.action("users.enable");
    change(state, caller, name, Change::Enable).await
}

/// `POST /api/users/{name}/unlock` → 200 user object: lifts the lock set
/// after repeated failed logins and clears the failure count.
///
/// # Errors
/// 404 unknown user.
pub async fn unlock(
    state: State<AppState>,
    caller: Extension<Caller>,
    note: Extension<Note>,
    name: Path<String>,
) -> Result<Json<Value>, ApiError> {
    note.action("users.unlock");
    change(state, caller, name, Change::Unlock).await
}

async fn change(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    what: Change,
) -> Result<Json<Value>, ApiError> {
    caller.require(WebPermission::Admin)?;
    let accounts = context(&state)?.accounts.clone();
    let actor = caller.identity.username.clone();
    let peer = caller.peer_field();
    if what == Change::Disable && name == actor {
        return Err(ApiError::Conflict(
            "you cannot disable your own account; another admin can".into(),
        ));
    }
    let user = blocking(move || {
        let by = Actor::remote(&actor, peer.as_deref());
        match what {
            Change::Disable => accounts.set_disabled(by, &name, true)?,
            Change::Enable => accounts.set_disabled(by, &name, false)?,
            Change::Unlock => accounts.unlock(by, &name)?,
        }
        find(&accounts, &name)
    })
    .await?
    .map_err(security_error)?;
    Ok(Json(user_object(&user)))
}

/// `POST /api/users/{name}/password` → 200 `{"password"}`: a new generated
/// password (shown this once) that must be changed at the next login; the
/// lock is lifted and the account's sessions end.
///
/// # Errors
/// 404 unknown user; 409 for the caller's own account (which changes its
/// password with `POST /api/password`).
pub async fn reset_password(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    note.action("users.password_reset");
    caller.require(WebPermission::Admin)?;
    let accounts = context(&state)?.accounts.clone();
    let actor = caller.identity.username.clone();
    if name == actor {
        return Err(ApiError::Conflict(
            "change your own password with POST /api/password".into(),
        ));
    }
    let peer = caller.peer_field();
    let password = blocking(move || {
        accounts.set_password(
            Actor::remote(&actor, peer.as_deref()),
            &name,
            PasswordChoice::Generate,
        )
    })
    .await?
    .map_err(security_error)?
    .ok_or_else(|| ApiError::internal("password reset", "no generated password"))?;
    Ok(Json(json!({"password": password})))
}

/// The listing entry of `name`.
fn find(
    accounts: &bastion_security::accounts::Accounts,
    name: &str,
) -> bastion_security::Result<UserInfo> {
    accounts
        .list_users()?
        .into_iter()
        .find(|u| u.username == name)
        .ok_or_else(|| bastion_security::SecurityError::NoSuchUser(name.to_owned()))
}
