//! What the HTTPS front end needs from the account service
//! (`bastion_security`'s `Accounts`): logins, sessions, tokens, password
//! changes. A trait so that the router can be unit-tested with a fake and so
//! that the front end sees only the decisions, never hashes or secrets.
//!
//! Every method may block (argon2id, database): call them from
//! `tokio::task::spawn_blocking`.

use std::{net::IpAddr, time::Duration};

use bastion_model::{Role, WebPermission};
use bastion_security::{
    accounts::{Accounts, LoginOutcome, LoginRequest, PasswordChange, Principal, TotpEnrolment},
    SecurityError,
};

/// An authenticated person, as the front end sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Account name (recorded in events).
    pub username: String,
    /// The account's role.
    pub role: Role,
    /// What this credential allows: the role's permissions, narrowed by a
    /// token's scope.
    pub permissions: Vec<WebPermission>,
    /// The account must change its (generated) password before anything
    /// else.
    pub must_change_password: bool,
}

impl Identity {
    /// Whether this credential grants `p`.
    pub fn may(&self, p: WebPermission) -> bool {
        self.permissions.contains(&p)
    }
}

/// A live session, looked up by its cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// Who.
    pub identity: Identity,
    /// The session's CSRF token (`X-CSRF-Token` must equal it).
    pub csrf: String,
}

/// A login attempt.
#[derive(Debug, Clone)]
pub struct LoginAttempt {
    /// Account name as typed.
    pub username: String,
    /// Password as typed.
    pub password: String,
    /// TOTP code, when given.
    pub totp: Option<String>,
    /// Source address (per-address throttling, events).
    pub source: IpAddr,
}

/// The outcome of [`AccountService::login`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginResult {
    /// A new session.
    Success {
        /// The new session id (cookie value).
        session_id: String,
        /// Its CSRF token.
        csrf: String,
        /// Who logged in.
        identity: Identity,
        /// Absolute session lifetime (cookie Max-Age).
        max_age: Duration,
    },
    /// Unknown user, wrong password, wrong or missing second factor,
    /// disabled account: one answer for all.
    Failed,
    /// Too many recent failures: try again after `retry_after`.
    Throttled {
        /// Back-off.
        retry_after: Duration,
    },
    /// The account is locked (an administrator must unlock it); the wait
    /// is a hint for `Retry-After`.
    Locked {
        /// Hint for `Retry-After`.
        retry_after: Duration,
    },
    /// The password is right, the TOTP code missing, wrong or replayed.
    TotpRequired,
    /// The password is right, but the account must have TOTP and has none
    /// (an administrator runs `bastion user totp-enable`).
    TotpSetupRequired,
    /// The password is right but the account is disabled.
    Disabled,
}

/// A password change request by the account holder: the current password,
/// and for an account with TOTP either a session of the same account or a
/// TOTP code.
#[derive(Debug, Clone)]
pub struct PasswordChangeRequest {
    /// Account name.
    pub username: String,
    /// Current password.
    pub old_password: String,
    /// New password.
    pub new_password: String,
    /// TOTP code, when given.
    pub totp: Option<String>,
    /// The request's session cookie value, when it carried one.
    pub session_id: Option<String>,
    /// Source address.
    pub source: IpAddr,
}

/// The outcome of [`AccountService::change_password`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordChangeResult {
    /// Changed; the account's sessions were ended.
    Changed,
    /// Changed; the account's sessions were ended and, the request having
    /// proven the second factor, a new session started for it (the holder
    /// stays logged in; no second TOTP code is needed).
    ChangedLoggedIn {
        /// The new session id (cookie value).
        session_id: String,
        /// Its CSRF token.
        csrf: String,
        /// Who is logged in.
        identity: Identity,
        /// Absolute session lifetime (cookie Max-Age).
        max_age: Duration,
    },
    /// Unknown user or wrong current password (same answer).
    Failed,
    /// The new password is refused (too short, too common…): the reason
    /// names the rule, never the password.
    Rejected(String),
    /// Too many attempts.
    Throttled {
        /// Back-off.
        retry_after: Duration,
    },
}

/// The outcome of [`AccountService::enrol_totp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TotpEnrolResult {
    /// Step 1: the secret to enter in an authenticator app (base32) and the
    /// same as an `otpauth://` URI (for a QR code).
    Secret {
        /// Base32 secret.
        secret: String,
        /// `otpauth://totp/…` URI.
        uri: String,
    },
    /// Step 2 (or a refusal of either step): as a login.
    Login(LoginResult),
}

/// The account service behind the HTTPS front end.
pub trait AccountService: Send + Sync + 'static {
    /// Verifies a login (throttled, recorded by the service) and opens a
    /// session on success.
    fn login(&self, attempt: &LoginAttempt) -> LoginResult;
    /// The live session with this id (idle and absolute timeouts applied),
    /// touching its idle timer.
    fn session(&self, session_id: &str) -> Option<SessionView>;
    /// The identity of a bearer token that is known, unexpired and not
    /// revoked.
    fn verify_token(&self, token: &str) -> Option<Identity>;
    /// Ends a session (no error if it is already gone).
    fn logout(&self, session_id: &str);
    /// Changes a password given the current one (and, for an account with
    /// TOTP, its own session or a TOTP code).
    fn change_password(&self, request: &PasswordChangeRequest) -> PasswordChangeResult;
    /// How long an unused session lives (for the UI's idle logout); `None`
    /// when the service does not say.
    fn session_idle(&self) -> Option<Duration> {
        None
    }
    /// Web TOTP enrolment of an admin who must have a second factor and has
    /// none (`bastion_security::accounts::Accounts::enrol_totp`): without
    /// `secret`, a new secret; with it and `attempt.totp`, stores it and
    /// logs in. The default refuses (services without enrolment).
    fn enrol_totp(&self, attempt: &LoginAttempt, secret: Option<&str>) -> TotpEnrolResult {
        let _ = (attempt, secret);
        TotpEnrolResult::Login(LoginResult::Failed)
    }
}

fn identity(p: &Principal) -> Identity {
    Identity {
        username: p.username.clone(),
        role: p.role,
        permissions: WebPermission::ALL
            .into_iter()
            .filter(|w| p.may(*w))
            .collect(),
        must_change_password: p.must_change_password,
    }
}

fn logged<T>(what: &str, r: Result<T, SecurityError>) -> Option<T> {
    r.map_err(|e| tracing::error!(error = %e, "account service: {what} failed"))
        .ok()
}

/// The web answer to a login outcome (a session is looked up again to get
/// the principal's permissions).
fn login_result(accounts: &Accounts, outcome: LoginOutcome) -> LoginResult {
    match outcome {
        LoginOutcome::Ok {
            session,
            must_change_password: _,
        } => match logged("session", Accounts::session(accounts, &session.id)).flatten() {
            Some((principal, _)) => LoginResult::Success {
                identity: identity(&principal),
                session_id: session.id.clone(),
                csrf: session.csrf.clone(),
                max_age: accounts.policy().session_absolute,
            },
            None => LoginResult::Failed,
        },
        LoginOutcome::Failed => LoginResult::Failed,
        LoginOutcome::TotpRequired => LoginResult::TotpRequired,
        LoginOutcome::TotpSetupRequired => LoginResult::TotpSetupRequired,
        LoginOutcome::Throttled { retry_after } => LoginResult::Throttled { retry_after },
        LoginOutcome::Locked => LoginResult::Locked {
            retry_after: accounts.policy().max_delay,
        },
        LoginOutcome::Disabled => LoginResult::Disabled,
    }
}

/// The real service: `bastion_security::accounts::Accounts`.
impl AccountService for Accounts {
    fn login(&self, a: &LoginAttempt) -> LoginResult {
        let req = LoginRequest {
            username: &a.username,
            password: &a.password,
            totp: a.totp.as_deref(),
            source: a.source,
        };
        let Some(outcome) = logged("login", Accounts::login(self, &req)) else {
            return LoginResult::Failed;
        };
        login_result(self, outcome)
    }

    fn enrol_totp(&self, a: &LoginAttempt, secret: Option<&str>) -> TotpEnrolResult {
        let req = LoginRequest {
            username: &a.username,
            password: &a.password,
            totp: a.totp.as_deref(),
            source: a.source,
        };
        match logged("TOTP enrolment", Accounts::enrol_totp(self, &req, secret)) {
            None => TotpEnrolResult::Login(LoginResult::Failed),
            Some(TotpEnrolment::Secret { secret, uri }) => TotpEnrolResult::Secret { secret, uri },
            Some(TotpEnrolment::LoggedIn {
                session,
                must_change_password,
            }) => TotpEnrolResult::Login(login_result(
                self,
                LoginOutcome::Ok {
                    session,
                    must_change_password,
                },
            )),
            Some(TotpEnrolment::Refused(outcome)) => {
                TotpEnrolResult::Login(login_result(self, outcome))
            }
        }
    }

    fn session(&self, session_id: &str) -> Option<SessionView> {
        logged("session", Accounts::session(self, session_id))
            .flatten()
            .map(|(p, csrf)| SessionView {
                identity: identity(&p),
                csrf,
            })
    }

    fn verify_token(&self, token: &str) -> Option<Identity> {
        logged("token", Accounts::verify_token(self, token))
            .flatten()
            .map(|p| identity(&p))
    }

    fn logout(&self, session_id: &str) {
        let _ = logged("logout", Accounts::logout(self, session_id));
    }

    fn session_idle(&self) -> Option<Duration> {
        Some(self.policy().session_idle)
    }

    fn change_password(&self, r: &PasswordChangeRequest) -> PasswordChangeResult {
        let change = PasswordChange {
            username: &r.username,
            old_password: &r.old_password,
            new_password: &r.new_password,
            totp: r.totp.as_deref(),
            session: r.session_id.as_deref(),
            source: r.source,
        };
        match Accounts::change_password_and_continue(self, &change) {
            Ok(None) => PasswordChangeResult::Changed,
            Ok(Some(session)) => {
                match logged("session", Accounts::session(self, &session.id)).flatten() {
                    Some((principal, _)) => PasswordChangeResult::ChangedLoggedIn {
                        identity: identity(&principal),
                        session_id: session.id.clone(),
                        csrf: session.csrf.clone(),
                        max_age: self.policy().session_absolute,
                    },
                    // Gone meanwhile (disabled): changed, log in again.
                    None => PasswordChangeResult::Changed,
                }
            }
            Err(SecurityError::WeakPassword(why)) => {
                PasswordChangeResult::Rejected(format!("password refused: {why}"))
            }
            Err(SecurityError::Throttled { retry_after }) => {
                PasswordChangeResult::Throttled { retry_after }
            }
            Err(SecurityError::AccountLocked) => PasswordChangeResult::Throttled {
                retry_after: self.policy().max_delay,
            },
            Err(SecurityError::BadCredentials | SecurityError::AccountDisabled) => {
                PasswordChangeResult::Failed
            }
            Err(e) => {
                tracing::error!(error = %e, "account service: password change failed");
                PasswordChangeResult::Failed
            }
        }
    }
}
