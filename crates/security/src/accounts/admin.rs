//! Account management: what `bastion user …` and `bastion token …` do.
//! Every change is recorded in the event log with the acting party
//! (`actor`), never with a password, hash, secret or token.

use crate::DbExt;
use std::time::Duration;

use bastion_model::{Role, WebPermission};
use rand::{rngs::OsRng, RngCore};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{
    db_err, end_sessions, random_b64, rfc3339_ms, totp_for, Accounts, Scope, TOKEN_PREFIX,
    TOTP_SECRET_BYTES,
};
use crate::{events::Outcome, users, Result, SecurityError};

/// Longest lifetime of an API token (366 days): a token is a long-lived
/// credential, so it must expire.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// Who asks for an account change: the events' `actor` (`cli`, or the web
/// user's name) and, for a change over the network, `peer`, the caller's
/// address (`ip:port`), which the audit trail's messages carry as the
/// actor's NetworkAccessPointID (PS3.15 A.5.1 ActiveParticipant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor<'a> {
    /// `cli`, or the acting web user's name.
    pub name: &'a str,
    /// The caller's address, when the change came over the network.
    pub peer: Option<&'a str>,
}

impl<'a> Actor<'a> {
    /// A web user acting from `peer`.
    pub fn remote(name: &'a str, peer: Option<&'a str>) -> Self {
        Self { name, peer }
    }

    /// The event's fields with `actor` (and `peer`, when known) added.
    fn stamp(self, mut fields: serde_json::Value) -> serde_json::Value {
        if let Some(m) = fields.as_object_mut() {
            m.insert("actor".into(), self.name.into());
            if let Some(p) = self.peer {
                m.insert("peer".into(), p.into());
            }
        }
        fields
    }
}

impl<'a> From<&'a str> for Actor<'a> {
    /// A local actor (`"cli"`, or a name without an address).
    fn from(name: &'a str) -> Self {
        Self { name, peer: None }
    }
}

impl<'a> From<&'a String> for Actor<'a> {
    fn from(name: &'a String) -> Self {
        Self::from(name.as_str())
    }
}

/// How a new password is chosen.
#[derive(Clone, Copy)]
pub enum PasswordChoice<'a> {
    /// Given by the operator (checked against the policy; no change needed
    /// at first login).
    Given(&'a str),
    /// Generated ([`users::generate_password`]): returned once, and the
    /// account must change it at first login.
    Generate,
}

impl std::fmt::Debug for PasswordChoice<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PasswordChoice::Given(_) => "Given(..)",
            PasswordChoice::Generate => "Generate",
        })
    }
}

/// An account as listed (never its hash or TOTP secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    /// Name.
    pub username: String,
    /// Role.
    pub role: Role,
    /// Disabled by an administrator.
    pub disabled: bool,
    /// Locked after repeated failures.
    pub locked: bool,
    /// Consecutive failed logins.
    pub failed_logins: u32,
    /// Must change its password at the next login.
    pub must_change_password: bool,
    /// TOTP is set up.
    pub totp_enabled: bool,
    /// Creation time, RFC 3339.
    pub created: String,
}

impl UserInfo {
    /// The JSON of `bastion user list --json`.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "username": self.username,
            "role": self.role.as_str(),
            "disabled": self.disabled,
            "locked": self.locked,
            "failed_logins": self.failed_logins,
            "must_change_password": self.must_change_password,
            "totp_enabled": self.totp_enabled,
            "created": self.created,
        })
    }
}

/// An API token as listed (never the token or its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// Public id (16 hex digits, part of the token).
    pub id: String,
    /// The account it acts for.
    pub username: String,
    /// Its scope.
    pub scope: Scope,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// Expiry, Unix milliseconds.
    pub expires_ms: i64,
    /// Revocation time, if revoked.
    pub revoked_ms: Option<i64>,
    /// Last successful use (updated at most once a minute).
    pub last_used_ms: Option<i64>,
}

impl TokenInfo {
    /// The JSON of `bastion token list --json` (times in RFC 3339).
    pub fn to_json(&self, now_ms: i64) -> serde_json::Value {
        json!({
            "id": self.id,
            "username": self.username,
            "scope": self.scope.as_str(),
            "created": rfc3339_ms(self.created_ms),
            "expires": rfc3339_ms(self.expires_ms),
            "expired": now_ms >= self.expires_ms,
            "revoked": self.revoked_ms.map(rfc3339_ms),
            "last_used": self.last_used_ms.map(rfc3339_ms),
        })
    }
}

impl Accounts {
    /// Creates an account. Returns the generated password for
    /// [`PasswordChoice::Generate`] (show it once).
    ///
    /// # Errors
    /// [`SecurityError::Invalid`] (user name), [`SecurityError::WeakPassword`],
    /// [`SecurityError::UserExists`], [`SecurityError::UserNameCaseClash`]
    /// (the name equals an existing one but for ASCII letter case),
    /// [`SecurityError::Db`].
    pub fn add_user<'a>(
        &self,
        actor: impl Into<Actor<'a>>,
        username: &str,
        role: Role,
        password: PasswordChoice,
    ) -> Result<Option<String>> {
        let actor: Actor<'a> = actor.into();
        users::validate_username(username)?;
        let (pw, generated) = chosen(username, password)?;
        let hash = users::hash_password(&pw)?;
        users::insert_user(&self.db, username, &hash, role, generated)?;
        self.db.with(|c| {
            c.execute(
                "DELETE FROM unknown_logins WHERE name_hash = ?1",
                params![super::sha256_hex(username.as_bytes())],
            )
            .map_err(db_err("forget unknown name"))?;
            Ok(())
        })?;
        self.events.record(
            "user.added",
            Outcome::Success,
            actor.stamp(json!({"username": username, "role": role.as_str(),
                   "generated_password": generated})),
        );
        Ok(generated.then_some(pw))
    }

    /// Every account, by name.
    ///
    /// # Errors
    /// [`SecurityError::Db`].
    pub fn list_users(&self) -> Result<Vec<UserInfo>> {
        self.db.with(|c| {
            let mut st = c
                .prepare(
                    "SELECT username, role, disabled, locked, failed_logins, must_change_password,
                            totp_secret IS NOT NULL, created_at FROM users ORDER BY username",
                )
                .map_err(db_err("list users"))?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, bool>(2)?,
                        r.get::<_, bool>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, bool>(5)?,
                        r.get::<_, bool>(6)?,
                        r.get::<_, String>(7)?,
                    ))
                })
                .map_err(db_err("list users"))?;
            let mut out = Vec::new();
            for row in rows {
                let (username, role, disabled, locked, failed, must_change, totp, created) =
                    row.map_err(db_err("list users"))?;
                out.push(UserInfo {
                    username,
                    role: Role::parse(&role)?,
                    disabled,
                    locked,
                    failed_logins: u32::try_from(failed.max(0)).unwrap_or(u32::MAX),
                    must_change_password: must_change,
                    totp_enabled: totp,
                    created,
                });
            }
            Ok(out)
        })
    }

    /// Disables (`true`) or re-enables an account. Disabling ends its
    /// sessions; its tokens stop working while it is disabled. The last
    /// enabled admin cannot be disabled.
    ///
    /// # Errors
    /// [`SecurityError::NoSuchUser`], [`SecurityError::LastAdmin`],
    /// [`SecurityError::Db`].
    pub fn set_disabled<'a>(
        &self,
        actor: impl Into<Actor<'a>>,
        username: &str,
        disabled: bool,
    ) -> Result<()> {
        let actor: Actor<'a> = actor.into();
        let ended = self.db.with(|c| {
            let tx = rusqlite::Transaction::new_unchecked(c, TransactionBehavior::Immediate)
                .map_err(db_err("begin"))?;
            if disabled && is_last_enabled_admin(&tx, username)? {
                return Err(SecurityError::LastAdmin("disable"));
            }
            let n = tx
                .execute(
                    "UPDATE users SET disabled = ?2 WHERE username = ?1",
                    params![username, disabled],
                )
                .map_err(db_err("disable user"))?;
            if n == 0 {
                return Err(SecurityError::NoSuchUser(username.to_owned()));
            }
            let ended = if disabled {
                end_sessions(&tx, username)?
            } else {
                0
            };
            tx.commit().map_err(db_err("commit"))?;
            Ok(ended)
        })?;
        self.events.record(
            if disabled {
                "user.disabled"
            } else {
                "user.enabled"
            },
            Outcome::Success,
            actor.stamp(json!({"username": username, "sessions_ended": ended})),
        );
        Ok(())
    }

    /// Lifts a lock and clears the failure count.
    ///
    /// # Errors
    /// [`SecurityError::NoSuchUser`], [`SecurityError::Db`].
    pub fn unlock<'a>(&self, actor: impl Into<Actor<'a>>, username: &str) -> Result<()> {
        let actor: Actor<'a> = actor.into();
        let was_locked = self.db.with(|c| {
            let locked: Option<bool> = c
                .query_row(
                    "SELECT locked FROM users WHERE username = ?1",
                    params![username],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err("read user"))?;
            let Some(locked) = locked else {
                return Err(SecurityError::NoSuchUser(username.to_owned()));
            };
            c.execute(
                "UPDATE users SET locked = 0, failed_logins = 0, last_failure_ms = 0 WHERE username = ?1",
                params![username],
            )
            .map_err(db_err("unlock user"))?;
            Ok(locked)
        })?;
        self.events.record(
            "user.unlocked",
            Outcome::Success,
            actor.stamp(json!({"username": username, "was_locked": was_locked})),
        );
        Ok(())
    }

    /// Sets a new password (administrator reset): clears the lock and the
    /// failure count and ends every session of the account. Returns the
    /// generated password for [`PasswordChoice::Generate`] (which must be
    /// changed at first login).
    ///
    /// # Errors
    /// [`SecurityError::WeakPassword`], [`SecurityError::NoSuchUser`],
    /// [`SecurityError::Db`].
    pub fn set_password<'a>(
        &self,
        actor: impl Into<Actor<'a>>,
        username: &str,
        password: PasswordChoice,
    ) -> Result<Option<String>> {
        let actor: Actor<'a> = actor.into();
        self.user_exists(username)?;
        let (pw, generated) = chosen(username, password)?;
        let hash = users::hash_password(&pw)?;
        let ended = self.store_password(username, &hash, generated)?;
        self.events.record(
            "user.password_set",
            Outcome::Success,
            actor.stamp(
                json!({"username": username, "generated_password": generated,
                   "sessions_ended": ended}),
            ),
        );
        Ok(generated.then_some(pw))
    }

    /// Removes an account with its sessions and tokens. The last enabled
    /// admin cannot be removed.
    ///
    /// # Errors
    /// [`SecurityError::NoSuchUser`], [`SecurityError::LastAdmin`],
    /// [`SecurityError::Db`].
    pub fn remove_user<'a>(&self, actor: impl Into<Actor<'a>>, username: &str) -> Result<()> {
        let actor: Actor<'a> = actor.into();
        let (sessions, tokens) = self.db.with(|c| {
            let tx = rusqlite::Transaction::new_unchecked(c, TransactionBehavior::Immediate)
                .map_err(db_err("begin"))?;
            if is_last_enabled_admin(&tx, username)? {
                return Err(SecurityError::LastAdmin("remove"));
            }
            let n = tx
                .execute("DELETE FROM users WHERE username = ?1", params![username])
                .map_err(db_err("remove user"))?;
            if n == 0 {
                return Err(SecurityError::NoSuchUser(username.to_owned()));
            }
            let sessions = end_sessions(&tx, username)?;
            let tokens = tx
                .execute("DELETE FROM tokens WHERE username = ?1", params![username])
                .map_err(db_err("remove tokens"))?;
            tx.commit().map_err(db_err("commit"))?;
            Ok((sessions, tokens))
        })?;
        self.events.record(
            "user.removed",
            Outcome::Success,
            actor.stamp(json!({"username": username, "sessions_ended": sessions,
                   "tokens_removed": tokens})),
        );
        Ok(())
    }

    /// Sets up (or replaces) the account's TOTP secret: 160 random bits,
    /// stored in the encrypted database. Returns the `otpauth://totp/…` URI
    /// for an authenticator app (show it once) and whether a previous secret
    /// was replaced.
    ///
    /// # Errors
    /// [`SecurityError::NoSuchUser`], [`SecurityError::Db`].
    pub fn enable_totp<'a>(
        &self,
        actor: impl Into<Actor<'a>>,
        username: &str,
    ) -> Result<(String, bool)> {
        let actor: Actor<'a> = actor.into();
        let mut secret = vec![0u8; TOTP_SECRET_BYTES];
        OsRng.fill_bytes(&mut secret);
        let uri = totp_for(&secret, username)?.get_url();
        let replaced = self.db.with(|c| {
            let old: Option<bool> = c
                .query_row(
                    "SELECT totp_secret IS NOT NULL FROM users WHERE username = ?1",
                    params![username],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err("read user"))?;
            let Some(old) = old else {
                return Err(SecurityError::NoSuchUser(username.to_owned()));
            };
            c.execute(
                "UPDATE users SET totp_secret = ?2, totp_last_step = 0 WHERE username = ?1",
                params![username, secret],
            )
            .map_err(db_err("store TOTP secret"))?;
            Ok(old)
        })?;
        zeroize::Zeroize::zeroize(&mut secret);
        self.events.record(
            "user.totp_enabled",
            Outcome::Success,
            actor.stamp(json!({"username": username, "replaced": replaced})),
        );
        Ok((uri, replaced))
    }

    /// Creates an API token for an enabled account, valid for `lifetime`
    /// (at most [`MAX_TOKEN_LIFETIME`]). Returns its description and the
    /// token itself (shown once; only its SHA-256 is stored).
    ///
    /// # Errors
    /// [`SecurityError::NoSuchUser`], [`SecurityError::AccountDisabled`],
    /// [`SecurityError::Invalid`] (lifetime, or a scope that leaves the role
    /// nothing), [`SecurityError::Db`].
    pub fn create_token<'a>(
        &self,
        actor: impl Into<Actor<'a>>,
        username: &str,
        lifetime: Duration,
        scope: Scope,
    ) -> Result<(TokenInfo, String)> {
        let actor: Actor<'a> = actor.into();
        if lifetime.is_zero() || lifetime > MAX_TOKEN_LIFETIME {
            return Err(SecurityError::Invalid {
                what: "token lifetime",
                detail: "must be between 1 second and 366 days".into(),
            });
        }
        let (role, disabled) = self.db.with(|c| {
            c.query_row(
                "SELECT role, disabled FROM users WHERE username = ?1",
                params![username],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)),
            )
            .optional()
            .map_err(db_err("read user"))?
            .ok_or_else(|| SecurityError::NoSuchUser(username.to_owned()))
        })?;
        let role = Role::parse(&role)?;
        if disabled {
            return Err(SecurityError::AccountDisabled);
        }
        if !WebPermission::ALL
            .into_iter()
            .any(|p| role.allows(p) && scope.allows(p))
        {
            return Err(SecurityError::Invalid {
                what: "token scope",
                detail: format!(
                    "role {role} allows nothing with scope {}; a token would be useless",
                    scope.as_str()
                ),
            });
        }
        let mut id_bytes = [0u8; 8];
        OsRng.fill_bytes(&mut id_bytes);
        let id = hex::encode(id_bytes);
        let token = format!("{TOKEN_PREFIX}{id}_{}", random_b64(32));
        let hash = Sha256::digest(token.as_bytes()).to_vec();
        let now = self.now_ms();
        let expires = now.saturating_add(super::millis(lifetime));
        self.db.with(|c| {
            c.execute(
                "INSERT INTO tokens (id, username, hash, scope, created_ms, expires_ms) VALUES (?1,?2,?3,?4,?5,?6)",
                params![id, username, hash, scope.as_str(), now, expires],
            )
            .map_err(db_err("insert token"))?;
            Ok(())
        })?;
        self.events.record(
            "token.created",
            Outcome::Success,
            actor.stamp(
                json!({"username": username, "token_id": id, "scope": scope.as_str(),
                   "expires": rfc3339_ms(expires)}),
            ),
        );
        let info = TokenInfo {
            id,
            username: username.to_owned(),
            scope,
            created_ms: now,
            expires_ms: expires,
            revoked_ms: None,
            last_used_ms: None,
        };
        Ok((info, token))
    }

    /// Revokes a token by id (revoking twice is not an error).
    ///
    /// # Errors
    /// [`SecurityError::NoSuchToken`], [`SecurityError::Db`].
    pub fn revoke_token<'a>(&self, actor: impl Into<Actor<'a>>, id: &str) -> Result<()> {
        let actor: Actor<'a> = actor.into();
        let now = self.now_ms();
        let username: String = self.db.with(|c| {
            let user = c
                .query_row(
                    "SELECT username FROM tokens WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err("read token"))?
                .ok_or_else(|| SecurityError::NoSuchToken(super::clip(id)))?;
            c.execute(
                "UPDATE tokens SET revoked_ms = coalesce(revoked_ms, ?2) WHERE id = ?1",
                params![id, now],
            )
            .map_err(db_err("revoke token"))?;
            Ok(user)
        })?;
        self.events.record(
            "token.revoked",
            Outcome::Success,
            actor.stamp(json!({"username": username, "token_id": id})),
        );
        Ok(())
    }

    /// Tokens, optionally of one account, newest first.
    ///
    /// # Errors
    /// [`SecurityError::Db`].
    pub fn list_tokens(&self, username: Option<&str>) -> Result<Vec<TokenInfo>> {
        self.db.with(|c| {
            let mut st = c
                .prepare(
                    "SELECT id, username, scope, created_ms, expires_ms, revoked_ms, last_used_ms
                     FROM tokens WHERE ?1 IS NULL OR username = ?1 ORDER BY created_ms DESC, id",
                )
                .map_err(db_err("list tokens"))?;
            let rows = st
                .query_map(params![username], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, Option<i64>>(5)?,
                        r.get::<_, Option<i64>>(6)?,
                    ))
                })
                .map_err(db_err("list tokens"))?;
            let mut out = Vec::new();
            for row in rows {
                let (id, username, scope, created_ms, expires_ms, revoked_ms, last_used_ms) =
                    row.map_err(db_err("list tokens"))?;
                out.push(TokenInfo {
                    id,
                    username,
                    scope: Scope::parse(&scope)?,
                    created_ms,
                    expires_ms,
                    revoked_ms,
                    last_used_ms,
                });
            }
            Ok(out)
        })
    }

    /// The current time in Unix milliseconds on this service's clock.
    pub fn now_unix_ms(&self) -> i64 {
        self.now_ms()
    }

    fn user_exists(&self, username: &str) -> Result<()> {
        self.db.with(|c| {
            c.query_row(
                "SELECT 1 FROM users WHERE username = ?1",
                params![username],
                |_| Ok(()),
            )
            .optional()
            .map_err(db_err("read user"))?
            .ok_or_else(|| SecurityError::NoSuchUser(username.to_owned()))
        })
    }
}

/// The password to store and whether it was generated.
fn chosen(username: &str, password: PasswordChoice) -> Result<(String, bool)> {
    match password {
        PasswordChoice::Given(pw) => {
            users::check_password_policy(username, pw)?;
            Ok((pw.to_owned(), false))
        }
        PasswordChoice::Generate => Ok((users::generate_password(), true)),
    }
}

/// Whether `username` is an enabled admin and the only one.
fn is_last_enabled_admin(c: &Connection, username: &str) -> Result<bool> {
    let (target, others): (bool, i64) = c
        .query_row(
            "SELECT
               coalesce((SELECT role = 'admin' AND disabled = 0 FROM users WHERE username = ?1), 0),
               (SELECT count(*) FROM users WHERE role = 'admin' AND disabled = 0 AND username <> ?1)",
            params![username],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db_err("count admins"))?;
    Ok(target && others == 0)
}
