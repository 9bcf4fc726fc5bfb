//! User accounts for the web front end (DESIGN §2 "users"): login with
//! throttling and TOTP, server-side sessions, API tokens, and the account
//! management the CLI (and later an admin API) performs.
//!
//! Everything here is synchronous and may block (argon2 takes tens of
//! milliseconds, the database fsyncs): async callers run it on a blocking
//! thread (`tokio::task::spawn_blocking`).
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use bastion_security::{accounts::*, db::SecurityDb, events::EventLog};
//! # fn f(db: Arc<SecurityDb>, events: Arc<EventLog>) -> bastion_security::Result<()> {
//! let accounts = Accounts::new(db, events, AccountPolicy::default());
//! let req = LoginRequest {
//!     username: "alice",
//!     password: "correct horse battery staple",
//!     totp: None,
//!     source: "192.0.2.7".parse().unwrap(),
//! };
//! if let LoginOutcome::Ok { session, .. } = accounts.login(&req)? {
//!     // Set-Cookie: session.id; send session.csrf to the page.
//!     let (principal, _csrf) = accounts.session(&session.id)?.expect("fresh session");
//!     let _may_search = principal.may(bastion_model::WebPermission::Query);
//! }
//! # Ok(()) }
//! ```
//!
//! # Decisions
//!
//! - **Sessions** live in the security database, keyed by the SHA-256 of the
//!   cookie value (the value itself is never stored), so that `bastion user
//!   passwd`/`disable`/`remove`, run in another process, end them at once.
//!   They survive a restart of `serve`. `last_seen` is written at most every
//!   [`AccountPolicy::session_idle`]` / 10` (capped at one minute) so that a
//!   busy viewer does not cost one fsync per request.
//! - **Throttling per account** (in the database, so that it survives
//!   restarts and `bastion user unlock` clears it; names that are not
//!   accounts get the same state and the same database work in
//!   `unknown_logins`, keyed by the SHA-256 of the name, so that an unknown
//!   name is answered exactly like a known one with a wrong password): after `k` consecutive failures the next attempt
//!   is refused with [`LoginOutcome::Throttled`] until
//!   `base_delay · 2^(k−1)` (at most `max_delay`) has passed since the last
//!   one; after `lock_after_failures` the account is locked
//!   ([`LoginOutcome::Locked`], event `user.locked`) until `bastion user
//!   unlock` or a password change by an administrator. An attempt counts as
//!   a failure *before* the password is checked (and is given back when it
//!   succeeds), so parallel guesses cannot slip through one back-off window.
//! - **Throttling per source address** (in memory; IPv6 grouped by /64):
//!   delays only, never a lock, so one noisy address behind a shared NAT
//!   cannot lock everyone out. The first [`ADDRESS_FREE_FAILURES`] failures
//!   are free; after `k ≥ free` failures, `base_delay · 2^(k−free)`, at most
//!   `per_address_max_delay` (30 s by default). A right password only
//!   takes back its own attempt (logging in to one account must not reset
//!   an address that sprays guesses at others): its count, and the
//!   address's last-attempt time as it was before it, unless another
//!   attempt came in between (so a correct login does not re-arm the delay
//!   for the next request, e.g. the TOTP enrolment that follows it); an
//!   address's failures are forgotten [`ADDRESS_MEMORY`] (15 min) after
//!   its last one.
//! - **Same answer, same timing**: an unknown user and a wrong password both
//!   give [`LoginOutcome::Failed`] after exactly one argon2 verification
//!   (against a fixed dummy hash for unknown names). `Throttled` and
//!   `Locked` are answered without any verification, for known and unknown
//!   names alike.
//! - **TOTP** (RFC 6238: SHA-1, 6 digits, 30 s steps, ±1 step, 160-bit
//!   secret stored in the encrypted database): a code is accepted once (a
//!   replayed code of an already used step is refused). `admin` accounts
//!   without TOTP cannot log in while [`AccountPolicy::admin_requires_totp`]
//!   holds: [`LoginOutcome::TotpSetupRequired`]. API tokens made with the CLI
//!   are not subject to TOTP.
//! - **Password change by the holder** ([`Accounts::change_password`]):
//!   the old password, under the same throttles as a login, and for an
//!   account with TOTP the second factor: a live session of the account
//!   (the forced first-login change, "change my password" in the UI) or a
//!   fresh TOTP code, else the answer of a wrong password. With
//!   [`Accounts::change_password_and_continue`] (the web API) an account
//!   with TOTP then stays logged in: its sessions end and one new session
//!   starts in the same transaction, so the first login (code, then the
//!   forced change) needs no second code, and no code is used twice.
//! - **Must change password**: an account whose password was generated
//!   (`bastion user add` / `user passwd` without `--password-stdin`, the
//!   initial `admin`) logs in, but its [`Principal::may`] is `false` for
//!   everything until [`Accounts::change_password`] succeeds.
//! - **Tokens**: `bst_<16 hex id>_<43 base64url>` (64 characters, 256 random
//!   bits); stored as SHA-256 only, looked up by id, compared in constant
//!   time.

mod admin;

use crate::DbExt;
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use bastion_model::{Role, WebPermission};
use rand::{rngs::OsRng, RngCore};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use admin::{Actor, PasswordChoice, TokenInfo, UserInfo, MAX_TOKEN_LIFETIME};

use crate::{
    db::SecurityDb,
    events::{EventLog, Outcome},
    users, Result, SecurityError,
};

/// Failures per source address that cost no delay (a few typos from a
/// shared NAT address are normal).
pub const ADDRESS_FREE_FAILURES: u32 = 5;
/// How long (ms) a name that is not an account is remembered after its last
/// failure, unless it reached the lock threshold.
const UNKNOWN_NAME_MEMORY_MS: i64 = 24 * 3600 * 1000;
/// How long an address's failures are remembered after its last one.
pub const ADDRESS_MEMORY: Duration = Duration::from_secs(15 * 60);
/// TOTP step in seconds (RFC 6238 §4: 30 s recommended).
pub const TOTP_STEP_SECS: u64 = 30;
/// TOTP digits.
pub const TOTP_DIGITS: usize = 6;
/// TOTP secret length in bytes (160 bits, RFC 4226 §4 recommendation).
pub const TOTP_SECRET_BYTES: usize = 20;
/// TOTP issuer shown by authenticator apps.
pub const TOTP_ISSUER: &str = "Bastion";
/// Entries kept in the in-memory per-address table; older entries are
/// dropped beyond it.
const MAX_TRACKED: usize = 100_000;

/// What a credential may be used for, on top of what the user's role allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Everything the role allows (sessions; the default for tokens).
    Full,
    /// Read only: query, view, and the event log ([`WebPermission::Query`],
    /// [`WebPermission::View`], [`WebPermission::Audit`]).
    Read,
    /// Upload only ([`WebPermission::Upload`]), e.g. for a STOW-RS sender.
    Upload,
}

impl Scope {
    /// Parses `full`, `read` or `upload`.
    ///
    /// # Errors
    /// [`SecurityError::Invalid`] for anything else.
    pub fn parse(s: &str) -> Result<Scope> {
        match s {
            "full" => Ok(Scope::Full),
            "read" => Ok(Scope::Read),
            "upload" => Ok(Scope::Upload),
            _ => Err(SecurityError::Invalid {
                what: "scope",
                detail: format!(
                    "{:?}: expected read or upload (or full, the default)",
                    clip(s)
                ),
            }),
        }
    }

    /// The storage / CLI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Full => "full",
            Scope::Read => "read",
            Scope::Upload => "upload",
        }
    }

    /// Whether the scope admits `p` (the role must allow it too).
    pub fn allows(self, p: WebPermission) -> bool {
        use WebPermission as P;
        match (self, p) {
            (Scope::Full, _) => true,
            (Scope::Read, P::Query | P::View | P::Audit) => true,
            // A read token feeds a viewer; a study download is the UI's.
            (Scope::Read, P::Upload | P::Admin | P::Export) => false,
            (Scope::Upload, P::Upload) => true,
            (Scope::Upload, P::Query | P::View | P::Audit | P::Admin | P::Export) => false,
        }
    }
}

/// How a request was authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMethod {
    /// A session cookie; `id_hash` is the hex SHA-256 of the cookie value
    /// (safe to log, useless to replay).
    Session {
        /// Hex SHA-256 of the session id.
        id_hash: String,
    },
    /// A bearer token; `id` is its public id (as in `bastion token list`).
    Token {
        /// The token id.
        id: String,
    },
}

/// An authenticated person. Made only by [`Accounts::session`] and
/// [`Accounts::verify_token`] (authentication; `#[non_exhaustive]` keeps
/// other crates from building one); authorisation asks [`Principal::may`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Principal {
    /// The account name.
    pub username: String,
    /// The account's role at the time of the request.
    pub role: Role,
    /// The credential's scope ([`Scope::Full`] for sessions).
    pub scope: Scope,
    /// Session or token.
    pub method: AuthMethod,
    /// The account must change its (generated) password first: while set,
    /// [`Principal::may`] refuses everything.
    pub must_change_password: bool,
}

impl Principal {
    /// Whether this principal may do `p`: the role allows it, the
    /// credential's scope admits it, and no password change is pending.
    pub fn may(&self, p: WebPermission) -> bool {
        !self.must_change_password && self.role.allows(p) && self.scope.allows(p)
    }
}

/// One login attempt.
#[derive(Debug, Clone, Copy)]
pub struct LoginRequest<'a> {
    /// The user name as typed.
    pub username: &'a str,
    /// The password as typed.
    pub password: &'a str,
    /// The TOTP code, when the client sent one.
    pub totp: Option<&'a str>,
    /// The peer's address (throttling per address, events).
    pub source: IpAddr,
}

/// A password change by the account holder ([`Accounts::change_password`],
/// `POST /api/password`).
#[derive(Clone, Copy)]
pub struct PasswordChange<'a> {
    /// The user name as typed.
    pub username: &'a str,
    /// The current password.
    pub old_password: &'a str,
    /// The new password.
    pub new_password: &'a str,
    /// A TOTP code, for an account with TOTP when no session of it is
    /// given.
    pub totp: Option<&'a str>,
    /// The session cookie value sent with the request, if any: a live
    /// session of this account stands for the second factor.
    pub session: Option<&'a str>,
    /// The peer's address (throttling per address, events).
    pub source: IpAddr,
}

impl std::fmt::Debug for PasswordChange<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordChange")
            .field("username", &self.username)
            .field("totp", &self.totp.map(|_| ".."))
            .field("session", &self.session.map(|_| ".."))
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The answer to a login attempt. Suggested HTTP mapping for the web layer:
/// `Ok` → 200 + cookie; `Failed` → 401; `TotpRequired` → 401 with a body
/// asking for the code; `TotpSetupRequired` → 403 saying that an
/// administrator must run `bastion user totp-enable`; `Throttled` → 429 with
/// `Retry-After: retry_after`; `Locked` → 429 with `Retry-After:
/// max_delay` (the lock itself lasts until an administrator lifts it);
/// `Disabled` → 403.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    /// Logged in: a new session (never a client-chosen id).
    Ok {
        /// Cookie value and CSRF token.
        session: NewSession,
        /// The account must change its password before anything else
        /// ([`Principal::may`] refuses everything until then).
        must_change_password: bool,
    },
    /// Wrong user name or password: the same answer and the same work for
    /// both.
    Failed,
    /// The password is right but the TOTP code is missing, wrong or
    /// replayed (counted as a failure).
    TotpRequired,
    /// The password is right, but the account is an `admin` without TOTP
    /// while the policy requires it: `bastion user totp-enable NAME` first.
    TotpSetupRequired,
    /// Too many recent failures for this account or from this address.
    Throttled {
        /// When to try again.
        retry_after: Duration,
    },
    /// The account is locked after repeated failures.
    Locked,
    /// The password is right but the account is disabled.
    Disabled,
}

/// The answer to [`Accounts::enrol_totp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TotpEnrolment {
    /// Step 1: a new secret for the authenticator app (not stored yet).
    Secret {
        /// RFC 4648 base32, no padding (32 characters).
        secret: String,
        /// `otpauth://totp/Bastion:NAME?secret=…&issuer=Bastion`.
        uri: String,
    },
    /// Step 2: the secret is stored and a session started.
    LoggedIn {
        /// Cookie value and CSRF token.
        session: NewSession,
        /// The account must still change its (generated) password.
        must_change_password: bool,
    },
    /// Refused; never [`LoginOutcome::Ok`].
    Refused(LoginOutcome),
}

/// A freshly created session.
#[derive(Clone, PartialEq, Eq)]
pub struct NewSession {
    /// The cookie value: 256 random bits, base64url without padding (43
    /// characters).
    pub id: String,
    /// The CSRF token to echo in state-changing requests: 256 random bits,
    /// base64url.
    pub csrf: String,
}

impl std::fmt::Debug for NewSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewSession { .. }")
    }
}

/// Login throttling and session lifetimes (numbers in docs/defaults.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountPolicy {
    /// Consecutive failures that lock an account (default 10).
    pub lock_after_failures: u32,
    /// Delay after the first failure; doubles with each consecutive one
    /// (default 1 s).
    pub base_delay: Duration,
    /// Largest per-account delay (default 15 min).
    pub max_delay: Duration,
    /// Largest per-address delay (default 30 s); addresses are never locked.
    pub per_address_max_delay: Duration,
    /// A session unused for this long ends (default 30 min).
    pub session_idle: Duration,
    /// A session ends this long after login whatever its use (default 12 h).
    pub session_absolute: Duration,
    /// `admin` accounts must have TOTP to log in (default true; turning it
    /// off is for the configuration to log loudly).
    pub admin_requires_totp: bool,
}

impl Default for AccountPolicy {
    fn default() -> Self {
        AccountPolicy {
            lock_after_failures: 10,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(15 * 60),
            per_address_max_delay: Duration::from_secs(30),
            session_idle: Duration::from_secs(30 * 60),
            session_absolute: Duration::from_secs(12 * 3600),
            admin_requires_totp: true,
        }
    }
}

/// The wall clock, replaceable in tests.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// [`Clock`] reading [`SystemTime::now`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The account service. `Send + Sync`; share it in an `Arc`.
pub struct Accounts {
    db: Arc<SecurityDb>,
    events: Arc<EventLog>,
    policy: AccountPolicy,
    clock: Arc<dyn Clock>,
    /// argon2 hash verified for unknown names (same cost as a real one).
    dummy_hash: OnceLock<String>,
    /// Throttle state per source address (IPv6 per /64).
    addresses: Mutex<HashMap<IpAddr, Backoff>>,
    /// Numbers the attempts counted per address (see [`AddressTicket`]).
    address_attempts: AtomicU64,
}

/// Consecutive failures and the time of the last one.
#[derive(Debug, Clone, Copy, Default)]
struct Backoff {
    failures: u32,
    last_ms: i64,
    /// The number of the attempt that set `last_ms` (per-address table
    /// only).
    last_attempt: u64,
}

/// An attempt counted against a source address, to give back when its
/// password proves right: the count is taken back, and the address's
/// last-attempt time is put back as it was before this attempt unless
/// another attempt from the address came in between (a right password must
/// not re-arm the address's delay, or every correct login behind a noisy
/// NAT would wait again).
#[derive(Debug, Clone, Copy)]
struct AddressTicket {
    key: IpAddr,
    attempt: u64,
    previous_last_ms: i64,
}

/// The account row as needed by a login.
struct UserRow {
    role: Role,
    hash: String,
    disabled: bool,
    must_change_password: bool,
    totp_secret: Option<Vec<u8>>,
    totp_last_step: i64,
}

/// Result of reserving an attempt on an account.
enum Reservation {
    Locked,
    Wait(Duration),
    /// Go ahead; the attempt has been counted. `None`: no such account.
    Go(Option<UserRow>),
}

impl Accounts {
    /// The service over `db` and `events` with the wall clock.
    pub fn new(db: Arc<SecurityDb>, events: Arc<EventLog>, policy: AccountPolicy) -> Accounts {
        Accounts::with_clock(db, events, policy, Arc::new(SystemClock))
    }

    /// The service with another [`Clock`] (tests). A `lock_after_failures`
    /// of 0 is taken as 1.
    pub fn with_clock(
        db: Arc<SecurityDb>,
        events: Arc<EventLog>,
        mut policy: AccountPolicy,
        clock: Arc<dyn Clock>,
    ) -> Accounts {
        policy.lock_after_failures = policy.lock_after_failures.max(1);
        Accounts {
            db,
            events,
            policy,
            clock,
            dummy_hash: OnceLock::new(),
            addresses: Mutex::new(HashMap::new()),
            address_attempts: AtomicU64::new(0),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &AccountPolicy {
        &self.policy
    }

    /// One login attempt; see the module documentation for the rules. Blocks
    /// for one argon2 verification unless throttled.
    ///
    /// # Errors
    /// [`SecurityError::Db`] and [`SecurityError::PasswordHash`] only: every
    /// refusal is an [`LoginOutcome`].
    pub fn login(&self, req: &LoginRequest) -> Result<LoginOutcome> {
        let now = self.now_ms();
        let source = req.source.to_string();
        let (user, ticket) = match self.check_password(req, now, &source)? {
            Ok(checked) => checked,
            Err(outcome) => return Ok(outcome),
        };
        let step = match &user.totp_secret {
            None if user.role == Role::Admin && self.policy.admin_requires_totp => {
                self.give_back(req.username, &ticket)?;
                return self.refuse(req, "totp_setup_required", LoginOutcome::TotpSetupRequired);
            }
            None => None,
            Some(secret) => {
                let found = req
                    .totp
                    .and_then(|code| totp_match(secret, code, now, user.totp_last_step));
                match found {
                    Some(step) => Some(step),
                    None => {
                        let reason = if req.totp.is_some() {
                            "totp_wrong"
                        } else {
                            // The first step of a two-step login: counts
                            // for the account, not for the address.
                            self.give_back_address(&ticket);
                            "totp_missing"
                        };
                        self.after_failure(req.username, true, &source, reason)?;
                        return Ok(LoginOutcome::TotpRequired);
                    }
                }
            }
        };
        let Some(session) = self.succeed(req.username, &ticket, step, now)? else {
            self.after_failure(req.username, true, &source, "concurrent_change")?;
            return Ok(if step.is_some() {
                LoginOutcome::TotpRequired
            } else {
                LoginOutcome::Failed
            });
        };
        self.events.record(
            "login.success",
            Outcome::Success,
            json!({"username": req.username, "source": source, "role": user.role.as_str(),
                   "totp": step.is_some(), "session": sha256_hex(session.id.as_bytes())}),
        );
        Ok(LoginOutcome::Ok {
            session,
            must_change_password: user.must_change_password,
        })
    }

    /// Records a refused login (`login.refused`) and returns `outcome`.
    fn refuse(
        &self,
        req: &LoginRequest,
        reason: &str,
        outcome: LoginOutcome,
    ) -> Result<LoginOutcome> {
        self.events.record(
            "login.refused",
            Outcome::Refused,
            json!({"username": clip(req.username), "source": req.source.to_string(), "reason": reason}),
        );
        Ok(outcome)
    }

    /// The password phase of a login: throttling per address and account,
    /// the argon2id check (same work for unknown names), the disabled
    /// flag. `Ok(Err(outcome))` is a refusal, already counted and recorded;
    /// `Ok(Ok(_))` comes with the address's counted attempt, to give back
    /// if the attempt ends well.
    fn check_password(
        &self,
        req: &LoginRequest,
        now: i64,
        source: &str,
    ) -> Result<std::result::Result<(UserRow, AddressTicket), LoginOutcome>> {
        // Per address: delays only.
        let ticket = match self.reserve_address(req.source, now) {
            Ok(ticket) => ticket,
            Err(wait) => {
                return self
                    .refuse(
                        req,
                        "throttled_address",
                        LoginOutcome::Throttled { retry_after: wait },
                    )
                    .map(Err)
            }
        };
        // Per account (reserving counts the attempt as a failure).
        let user = match self.reserve_account(req.username, now)? {
            Reservation::Locked => {
                return self.refuse(req, "locked", LoginOutcome::Locked).map(Err)
            }
            Reservation::Wait(wait) => {
                return self
                    .refuse(
                        req,
                        "throttled_account",
                        LoginOutcome::Throttled { retry_after: wait },
                    )
                    .map(Err)
            }
            Reservation::Go(user) => user,
        };
        let dummy = self.dummy_hash()?;
        let Some(user) = user else {
            let _ = users::verify_hash(dummy, dummy, req.password);
            self.after_failure(req.username, false, source, "unknown_user")?;
            return Ok(Err(LoginOutcome::Failed));
        };
        if !users::verify_hash(&user.hash, dummy, req.password) {
            self.after_failure(req.username, true, source, "wrong_password")?;
            return Ok(Err(LoginOutcome::Failed));
        }
        // The password is right from here on.
        if user.disabled {
            self.give_back(req.username, &ticket)?;
            return self
                .refuse(req, "disabled", LoginOutcome::Disabled)
                .map(Err);
        }
        Ok(Ok((user, ticket)))
    }

    /// TOTP enrolment from the web UI, for an `admin` account that must have
    /// a second factor ([`AccountPolicy::admin_requires_totp`]) and has none
    /// yet (the [`LoginOutcome::TotpSetupRequired`] case). Both steps prove
    /// the password again, under the login throttle:
    ///
    /// 1. `secret: None` → [`TotpEnrolment::Secret`]: a fresh 160-bit secret
    ///    (base32, and as an `otpauth://` URI) for the user's authenticator
    ///    app. Nothing is stored: the client sends it back in step 2.
    /// 2. `secret: Some(base32)` and `req.totp` = the app's current code →
    ///    the secret is stored (only if the account still has none), the
    ///    code's time step is used up, and a session starts:
    ///    [`TotpEnrolment::LoggedIn`]. Recorded as `user.totp_enabled`
    ///    (actor = the user, `via: "web"`) and `login.success`.
    ///
    /// Any other account, or a wrong password, is [`TotpEnrolment::Refused`]
    /// with the login outcome (`Failed` for an account that needs no
    /// enrolment, so that the answer says nothing more than a login would);
    /// a wrong code is `Refused(TotpRequired)` and counts as a failure.
    ///
    /// # Errors
    /// [`SecurityError::Db`] and [`SecurityError::PasswordHash`] only.
    pub fn enrol_totp(&self, req: &LoginRequest, secret: Option<&str>) -> Result<TotpEnrolment> {
        let now = self.now_ms();
        let source = req.source.to_string();
        let (user, ticket) = match self.check_password(req, now, &source)? {
            Ok(checked) => checked,
            Err(outcome) => return Ok(TotpEnrolment::Refused(outcome)),
        };
        let needs = user.totp_secret.is_none()
            && user.role == Role::Admin
            && self.policy.admin_requires_totp;
        if !needs {
            self.give_back(req.username, &ticket)?;
            self.refuse(req, "totp_enrolment_not_needed", LoginOutcome::Failed)?;
            return Ok(TotpEnrolment::Refused(LoginOutcome::Failed));
        }
        let Some(secret) = secret else {
            self.give_back(req.username, &ticket)?;
            let mut raw = vec![0u8; TOTP_SECRET_BYTES];
            OsRng.fill_bytes(&mut raw);
            let totp = totp_for(&raw, req.username)?;
            let out = TotpEnrolment::Secret {
                secret: totp.get_secret_base32(),
                uri: totp.get_url(),
            };
            zeroize::Zeroize::zeroize(&mut raw);
            return Ok(out);
        };
        let raw = totp_rs::Secret::Encoded(secret.trim().to_ascii_uppercase())
            .to_bytes()
            .ok()
            .filter(|b| b.len() == TOTP_SECRET_BYTES);
        let step = match (raw.as_deref(), req.totp) {
            (Some(raw), Some(code)) => totp_match(raw, code, now, 0),
            _ => None,
        };
        let (Some(raw), Some(step)) = (raw, step) else {
            self.after_failure(req.username, true, &source, "totp_enrolment_wrong_code")?;
            return Ok(TotpEnrolment::Refused(LoginOutcome::TotpRequired));
        };
        let stored = self.db.with(|c| {
            c.execute(
                "UPDATE users SET totp_secret = ?2, totp_last_step = 0
                 WHERE username = ?1 AND totp_secret IS NULL",
                params![req.username, raw],
            )
            .map_err(db_err("store TOTP secret"))
        })?;
        if stored == 0 {
            // Enrolled meanwhile (another tab, the CLI): log in normally.
            self.after_failure(req.username, true, &source, "totp_enrolment_raced")?;
            return Ok(TotpEnrolment::Refused(LoginOutcome::TotpRequired));
        }
        self.events.record(
            "user.totp_enabled",
            Outcome::Success,
            json!({"actor": req.username, "username": req.username, "replaced": false, "via": "web",
                   "source": source}),
        );
        let Some(session) = self.succeed(req.username, &ticket, Some(step), now)? else {
            self.after_failure(req.username, true, &source, "concurrent_change")?;
            return Ok(TotpEnrolment::Refused(LoginOutcome::TotpRequired));
        };
        self.events.record(
            "login.success",
            Outcome::Success,
            json!({"username": req.username, "source": source, "role": user.role.as_str(),
                   "totp": true, "session": sha256_hex(session.id.as_bytes())}),
        );
        Ok(TotpEnrolment::LoggedIn {
            session,
            must_change_password: user.must_change_password,
        })
    }

    /// Looks a session cookie up: `None` when unknown, expired (idle or
    /// absolute timeout; the row is then deleted) or when the account is
    /// disabled or gone. Otherwise the principal and the session's CSRF
    /// token; the session's last use is updated.
    ///
    /// # Errors
    /// [`SecurityError::Db`].
    pub fn session(&self, cookie_value: &str) -> Result<Option<(Principal, String)>> {
        if !is_credential_text(cookie_value, 128) {
            return Ok(None);
        }
        let now = self.now_ms();
        let id_hash = sha256_hex(cookie_value.as_bytes());
        let idle = millis(self.policy.session_idle);
        let absolute = millis(self.policy.session_absolute);
        let touch_every = (idle / 10).min(60_000);
        self.db.with(|c| {
            let row = c
                .query_row(
                    "SELECT s.username, s.csrf, s.created_ms, s.last_seen_ms, u.role, u.disabled, u.must_change_password
                     FROM sessions s JOIN users u ON u.username = s.username WHERE s.id_hash = ?1",
                    params![id_hash],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, bool>(5)?,
                            r.get::<_, bool>(6)?,
                        ))
                    },
                )
                .optional()
                .map_err(db_err("read session"))?;
            let Some((username, csrf, created, last_seen, role, disabled, must_change)) = row
            else {
                return Ok(None);
            };
            let expired = now.saturating_sub(last_seen) >= idle
                || now.saturating_sub(created) >= absolute;
            let role = Role::parse(&role);
            if expired || disabled || role.is_err() {
                c.execute("DELETE FROM sessions WHERE id_hash = ?1", params![id_hash])
                    .map_err(db_err("delete session"))?;
                return Ok(None);
            }
            if now.saturating_sub(last_seen) >= touch_every {
                c.execute(
                    "UPDATE sessions SET last_seen_ms = ?2 WHERE id_hash = ?1",
                    params![id_hash, now],
                )
                .map_err(db_err("touch session"))?;
            }
            let role = role?;
            Ok(Some((
                Principal {
                    username,
                    role,
                    scope: Scope::Full,
                    method: AuthMethod::Session { id_hash },
                    must_change_password: must_change,
                },
                csrf,
            )))
        })
    }

    /// Ends a session (unknown values are ignored).
    ///
    /// # Errors
    /// [`SecurityError::Db`].
    pub fn logout(&self, cookie_value: &str) -> Result<()> {
        if !is_credential_text(cookie_value, 128) {
            return Ok(());
        }
        let id_hash = sha256_hex(cookie_value.as_bytes());
        let user: Option<String> = self.db.with(|c| {
            let user = c
                .query_row(
                    "SELECT username FROM sessions WHERE id_hash = ?1",
                    params![id_hash],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err("read session"))?;
            c.execute("DELETE FROM sessions WHERE id_hash = ?1", params![id_hash])
                .map_err(db_err("delete session"))?;
            Ok(user)
        })?;
        if let Some(u) = user {
            self.events.record(
                "logout",
                Outcome::Success,
                json!({"username": u, "session": id_hash}),
            );
        }
        Ok(())
    }

    /// Changes a password knowing the old one (the first-login change, or a
    /// user's own change). The new password must pass
    /// [`users::check_password_policy`] and differ from the old one.
    ///
    /// An account with TOTP must prove its second factor too, or a phished
    /// password would be enough to take the account over: either
    /// `req.session` is a live session of this same account (its login
    /// passed the second factor), or `req.totp` is a valid code not used
    /// before (its time step is then used up, as at a login). Otherwise the
    /// answer is [`SecurityError::BadCredentials`], exactly as for a wrong
    /// password, and the attempt counts as a failure.
    ///
    /// Throttled and locked exactly like [`Accounts::login`], per account
    /// and per source address (a locked account cannot use this to get
    /// around the lock). On success every session of the user ends and the
    /// must-change flag and failure count are cleared; recorded as
    /// `user.password_changed` with `second_factor`: `session`, `totp` or
    /// `none` (an account without TOTP).
    ///
    /// # Errors
    /// [`SecurityError::WeakPassword`], [`SecurityError::BadCredentials`]
    /// (unknown user, wrong old password, missing, wrong or replayed TOTP
    /// code: one answer), [`SecurityError::Throttled`],
    /// [`SecurityError::AccountLocked`], [`SecurityError::AccountDisabled`],
    /// [`SecurityError::Db`].
    pub fn change_password(&self, req: &PasswordChange) -> Result<()> {
        self.change_own_password(req, false).map(drop)
    }

    /// [`Accounts::change_password`], after which the holder of an account
    /// with TOTP stays logged in: every session of the account still ends,
    /// and in the same transaction one new session (new cookie value and
    /// CSRF token) starts for this request, which has just proven the
    /// password and the second factor (its own live session, or a fresh
    /// code now used up). So the first-login flow (TOTP, then the forced
    /// password change) needs no second code, and no code is ever accepted
    /// twice. Recorded as `user.password_changed` with `session_started`,
    /// and `login.success` (`via: "password_change"`). `None` for an
    /// account without TOTP: the caller logs in with the new password (an
    /// `admin` without TOTP must enrol first).
    ///
    /// # Errors
    /// As [`Accounts::change_password`].
    pub fn change_password_and_continue(&self, req: &PasswordChange) -> Result<Option<NewSession>> {
        self.change_own_password(req, true)
    }

    fn change_own_password(
        &self,
        req: &PasswordChange,
        continue_session: bool,
    ) -> Result<Option<NewSession>> {
        let (username, old, new) = (req.username, req.old_password, req.new_password);
        users::check_password_policy(username, new)?;
        let now = self.now_ms();
        let source = req.source.to_string();
        let ticket = self
            .reserve_address(req.source, now)
            .map_err(|retry_after| SecurityError::Throttled { retry_after })?;
        let user = match self.reserve_account(username, now)? {
            Reservation::Locked => return Err(SecurityError::AccountLocked),
            Reservation::Wait(retry_after) => return Err(SecurityError::Throttled { retry_after }),
            Reservation::Go(user) => user,
        };
        let dummy = self.dummy_hash()?;
        let Some(user) = user else {
            let _ = users::verify_hash(dummy, dummy, old);
            self.after_failure(username, false, &source, "unknown_user_on_change")?;
            return Err(SecurityError::BadCredentials);
        };
        if !users::verify_hash(&user.hash, dummy, old) {
            self.after_failure(username, true, &source, "wrong_password_on_change")?;
            return Err(SecurityError::BadCredentials);
        }
        if user.disabled {
            self.give_back(username, &ticket)?;
            return Err(SecurityError::AccountDisabled);
        }
        if old == new {
            self.give_back(username, &ticket)?;
            return Err(SecurityError::WeakPassword(
                "the new password must differ from the current one".into(),
            ));
        }
        let (second_factor, step) = match &user.totp_secret {
            None => ("none", None),
            Some(secret) => {
                let own_session = match req.session {
                    Some(cookie) => self
                        .session(cookie)?
                        .is_some_and(|(p, _)| p.username == username),
                    None => false,
                };
                if own_session {
                    ("session", None)
                } else {
                    let found = req
                        .totp
                        .and_then(|code| totp_match(secret, code, now, user.totp_last_step));
                    let Some(step) = found else {
                        let reason = if req.totp.is_some() {
                            "totp_wrong_on_change"
                        } else {
                            "totp_missing_on_change"
                        };
                        self.after_failure(username, true, &source, reason)?;
                        return Err(SecurityError::BadCredentials);
                    };
                    ("totp", Some(step))
                }
            }
        };
        let hash = users::hash_password(new)?;
        let session = (continue_session && user.totp_secret.is_some()).then(|| NewSession {
            id: random_b64(32),
            csrf: random_b64(32),
        });
        let Some(ended) = self.store_own_password(username, &hash, step, session.as_ref(), now)?
        else {
            // The code's step was used meanwhile (a concurrent login).
            self.after_failure(username, true, &source, "totp_wrong_on_change")?;
            return Err(SecurityError::BadCredentials);
        };
        self.give_back_address(&ticket);
        self.events.record(
            "user.password_changed",
            Outcome::Success,
            json!({"actor": username, "username": username, "source": source,
                   "second_factor": second_factor, "sessions_ended": ended,
                   "session_started": session.is_some()}),
        );
        if let Some(session) = &session {
            self.events.record(
                "login.success",
                Outcome::Success,
                json!({"username": username, "source": source, "role": user.role.as_str(),
                       "totp": true, "via": "password_change",
                       "session": sha256_hex(session.id.as_bytes())}),
            );
        }
        Ok(session)
    }

    /// Verifies an `Authorization: Bearer` token: `None` when malformed,
    /// unknown, revoked, expired, or when its account is disabled or gone.
    /// The hash comparison is constant-time. Locks, must-change flags and
    /// TOTP do not apply to tokens (they are made on the host by an
    /// administrator).
    ///
    /// # Errors
    /// [`SecurityError::Db`].
    pub fn verify_token(&self, bearer: &str) -> Result<Option<Principal>> {
        let Some(id) = token_id(bearer) else {
            return Ok(None);
        };
        let now = self.now_ms();
        let presented = Sha256::digest(bearer.as_bytes());
        self.db.with(|c| {
            let row = c
                .query_row(
                    "SELECT t.hash, t.scope, t.expires_ms, t.revoked_ms, t.last_used_ms, t.username, u.role, u.disabled
                     FROM tokens t JOIN users u ON u.username = t.username WHERE t.id = ?1",
                    params![id],
                    |r| {
                        Ok((
                            r.get::<_, Vec<u8>>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, Option<i64>>(3)?,
                            r.get::<_, Option<i64>>(4)?,
                            r.get::<_, String>(5)?,
                            r.get::<_, String>(6)?,
                            r.get::<_, bool>(7)?,
                        ))
                    },
                )
                .optional()
                .map_err(db_err("read token"))?;
            let Some((hash, scope, expires, revoked, last_used, username, role, disabled)) = row
            else {
                // Same work as a known id.
                let _ = presented.as_slice().ct_eq(&[0u8; 32]);
                return Ok(None);
            };
            let hash_ok: bool = presented.as_slice().ct_eq(&hash).into();
            if !hash_ok || revoked.is_some() || now >= expires || disabled {
                return Ok(None);
            }
            let (Ok(role), Ok(scope)) = (Role::parse(&role), Scope::parse(&scope)) else {
                return Ok(None);
            };
            if last_used.is_none_or(|t| now.saturating_sub(t) >= 60_000) {
                c.execute(
                    "UPDATE tokens SET last_used_ms = ?2 WHERE id = ?1",
                    params![id, now],
                )
                .map_err(db_err("touch token"))?;
            }
            Ok(Some(Principal {
                username,
                role,
                scope,
                method: AuthMethod::Token { id: id.to_owned() },
                must_change_password: false,
            }))
        })
    }

    // ---- throttling -----------------------------------------------------

    /// Checks the per-address delay; when free, counts the attempt and
    /// returns its ticket, else the wait left.
    fn reserve_address(
        &self,
        source: IpAddr,
        now: i64,
    ) -> std::result::Result<AddressTicket, Duration> {
        let key = address_key(source);
        let mut map = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut map, now, millis(ADDRESS_MEMORY));
        let b = map.entry(key).or_default();
        if now.saturating_sub(b.last_ms) >= millis(ADDRESS_MEMORY) {
            *b = Backoff::default();
        }
        // After the free failures, the next attempt waits `base_delay`.
        let counted = b
            .failures
            .saturating_add(1)
            .saturating_sub(ADDRESS_FREE_FAILURES);
        let wait = remaining(
            *b,
            counted,
            self.policy.base_delay,
            self.policy.per_address_max_delay,
            now,
        );
        if let Some(wait) = wait {
            return Err(wait);
        }
        let ticket = AddressTicket {
            key,
            attempt: self.address_attempts.fetch_add(1, Ordering::Relaxed) + 1,
            previous_last_ms: b.last_ms,
        };
        b.failures = b.failures.saturating_add(1);
        b.last_ms = now;
        b.last_attempt = ticket.attempt;
        Ok(ticket)
    }

    /// Checks lock and back-off of an account (known or not); when free,
    /// counts the attempt as a failure and returns the account row.
    fn reserve_account(&self, username: &str, now: i64) -> Result<Reservation> {
        self.db.with(|c| {
            let tx = rusqlite::Transaction::new_unchecked(c, TransactionBehavior::Immediate)
                .map_err(db_err("begin"))?;
            let row = tx
                .query_row(
                    "SELECT role, password_hash, disabled, must_change_password, totp_secret, totp_last_step,
                            locked, failed_logins, last_failure_ms
                     FROM users WHERE username = ?1",
                    params![username],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, bool>(2)?,
                            r.get::<_, bool>(3)?,
                            r.get::<_, Option<Vec<u8>>>(4)?,
                            r.get::<_, i64>(5)?,
                            r.get::<_, bool>(6)?,
                            r.get::<_, i64>(7)?,
                            r.get::<_, i64>(8)?,
                        ))
                    },
                )
                .optional()
                .map_err(db_err("read user"))?;
            let Some((role, hash, disabled, must_change, totp_secret, totp_last_step, locked, failures, last)) =
                row
            else {
                return self.reserve_unknown(tx, username, now);
            };
            if locked {
                return Ok(Reservation::Locked);
            }
            let b = Backoff {
                failures: u32::try_from(failures.max(0)).unwrap_or(u32::MAX),
                last_ms: last,
                ..Backoff::default()
            };
            if let Some(wait) =
                remaining(b, b.failures, self.policy.base_delay, self.policy.max_delay, now)
            {
                return Ok(Reservation::Wait(wait));
            }
            tx.execute(
                "UPDATE users SET failed_logins = failed_logins + 1, last_failure_ms = ?2 WHERE username = ?1",
                params![username, now],
            )
            .map_err(db_err("count attempt"))?;
            tx.commit().map_err(db_err("commit"))?;
            // An unparsable stored role is treated as a wrong password.
            let role = Role::parse(&role).unwrap_or(Role::Researcher);
            Ok(Reservation::Go(Some(UserRow {
                role,
                hash,
                disabled,
                must_change_password: must_change,
                totp_secret,
                totp_last_step,
            })))
        })
    }

    /// [`Accounts::reserve_account`] for a name that is not an account: the
    /// same rules and the same database work (read, counted write, commit),
    /// in `unknown_logins` keyed by the SHA-256 of the name, so that neither
    /// the answers nor the timing tell which names exist.
    fn reserve_unknown(
        &self,
        tx: rusqlite::Transaction,
        username: &str,
        now: i64,
    ) -> Result<Reservation> {
        let key = sha256_hex(username.as_bytes());
        let (failures, last): (i64, i64) = tx
            .query_row(
                "SELECT failures, last_failure_ms FROM unknown_logins WHERE name_hash = ?1",
                params![key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db_err("read unknown name"))?
            .unwrap_or((0, 0));
        let b = Backoff {
            failures: u32::try_from(failures.max(0)).unwrap_or(u32::MAX),
            last_ms: last,
            ..Backoff::default()
        };
        if b.failures >= self.policy.lock_after_failures {
            return Ok(Reservation::Locked);
        }
        if let Some(wait) = remaining(
            b,
            b.failures,
            self.policy.base_delay,
            self.policy.max_delay,
            now,
        ) {
            return Ok(Reservation::Wait(wait));
        }
        tx.execute(
            "INSERT INTO unknown_logins (name_hash, failures, last_failure_ms) VALUES (?1, 1, ?2)
             ON CONFLICT(name_hash) DO UPDATE SET failures = failures + 1, last_failure_ms = ?2",
            params![key, now],
        )
        .map_err(db_err("count attempt"))?;
        // Forget names that stopped failing a day ago, unless "locked".
        tx.execute(
            "DELETE FROM unknown_logins WHERE last_failure_ms < ?1 AND failures < ?2",
            params![
                now.saturating_sub(UNKNOWN_NAME_MEMORY_MS),
                i64::from(self.policy.lock_after_failures)
            ],
        )
        .map_err(db_err("prune unknown names"))?;
        tx.commit().map_err(db_err("commit"))?;
        Ok(Reservation::Go(None))
    }

    /// After a counted failure: lock a known account at the threshold (an
    /// unknown name is "locked" by its count alone, with the same read).
    fn after_failure(&self, username: &str, known: bool, source: &str, reason: &str) -> Result<()> {
        let limit = i64::from(self.policy.lock_after_failures);
        let (failures, locked_now) = self.db.with(|c| {
            let failures: i64 = if known {
                c.query_row(
                    "SELECT failed_logins FROM users WHERE username = ?1",
                    params![username],
                    |r| r.get(0),
                )
            } else {
                c.query_row(
                    "SELECT failures FROM unknown_logins WHERE name_hash = ?1",
                    params![sha256_hex(username.as_bytes())],
                    |r| r.get(0),
                )
            }
            .optional()
            .map_err(db_err("read failures"))?
            .unwrap_or(0);
            let n = if known && failures >= limit {
                c.execute(
                    "UPDATE users SET locked = 1 WHERE username = ?1 AND locked = 0",
                    params![username],
                )
                .map_err(db_err("lock user"))?
            } else {
                0
            };
            Ok((failures, n > 0))
        })?;
        let username = if known {
            username.to_owned()
        } else {
            clip(username)
        };
        // A wrong credential is a refusal (the audit trail's User
        // Authentication message, outcome 4), not a technical failure.
        self.events.record(
            "login.failure",
            Outcome::Refused,
            json!({"username": username, "source": source, "reason": reason, "consecutive_failures": failures}),
        );
        if locked_now {
            self.events.record(
                "user.locked",
                Outcome::Alert,
                json!({"username": username, "source": source, "consecutive_failures": failures}),
            );
        }
        Ok(())
    }

    /// Undoes the counting of an attempt whose password was right but that
    /// did not log in (disabled, TOTP setup needed).
    fn give_back(&self, username: &str, ticket: &AddressTicket) -> Result<()> {
        self.give_back_address(ticket);
        self.give_back_account(username)
    }

    /// Takes back the per-address count of an attempt with the right
    /// password (the address is not guessing), and its last-attempt time
    /// when no other attempt came since (so that the address's back-off is
    /// as it was before this attempt).
    fn give_back_address(&self, ticket: &AddressTicket) {
        let mut map = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get_mut(&ticket.key) {
            b.failures = b.failures.saturating_sub(1);
            if b.last_attempt == ticket.attempt {
                b.last_ms = ticket.previous_last_ms;
            }
        }
    }

    fn give_back_account(&self, username: &str) -> Result<()> {
        self.db.with(|c| {
            c.execute(
                "UPDATE users SET failed_logins = max(failed_logins - 1, 0) WHERE username = ?1",
                params![username],
            )
            .map_err(db_err("uncount attempt"))?;
            Ok(())
        })
    }

    /// A successful login: clears the counters, records the TOTP step,
    /// creates the session and drops expired ones.
    fn succeed(
        &self,
        username: &str,
        ticket: &AddressTicket,
        totp_step: Option<i64>,
        now: i64,
    ) -> Result<Option<NewSession>> {
        let session = NewSession {
            id: random_b64(32),
            csrf: random_b64(32),
        };
        let idle = millis(self.policy.session_idle);
        let absolute = millis(self.policy.session_absolute);
        let logged_in = self.db.with(|c| {
            let tx = rusqlite::Transaction::new_unchecked(c, TransactionBehavior::Immediate)
                .map_err(db_err("begin"))?;
            // Conditional: a concurrent login with the same TOTP code, a
            // lock or a disable since the reservation wins.
            let n = tx
                .execute(
                    "UPDATE users SET failed_logins = 0, totp_last_step = coalesce(?2, totp_last_step)
                     WHERE username = ?1 AND locked = 0 AND disabled = 0
                       AND (?2 IS NULL OR totp_last_step < ?2)",
                    params![username, totp_step],
                )
                .map_err(db_err("reset failures"))?;
            if n == 0 {
                return Ok(false);
            }
            tx.execute(
                "DELETE FROM sessions WHERE last_seen_ms <= ?1 OR created_ms <= ?2",
                params![now.saturating_sub(idle), now.saturating_sub(absolute)],
            )
            .map_err(db_err("expire sessions"))?;
            tx.execute(
                "INSERT INTO sessions (id_hash, username, csrf, created_ms, last_seen_ms) VALUES (?1,?2,?3,?4,?4)",
                params![sha256_hex(session.id.as_bytes()), username, session.csrf, now],
            )
            .map_err(db_err("insert session"))?;
            tx.commit().map_err(db_err("commit"))?;
            Ok(true)
        })?;
        if !logged_in {
            return Ok(None);
        }
        // A success only takes back its own attempt: logging in to one
        // account must not reset an address spraying guesses at others.
        self.give_back_address(ticket);
        Ok(Some(session))
    }

    /// Stores a new password hash; clears lock, failures and sessions.
    /// Returns the number of sessions ended.
    fn store_password(&self, username: &str, hash: &str, must_change: bool) -> Result<usize> {
        self.db.with(|c| {
            let tx = rusqlite::Transaction::new_unchecked(c, TransactionBehavior::Immediate)
                .map_err(db_err("begin"))?;
            let n = tx
                .execute(
                    "UPDATE users SET password_hash = ?2, must_change_password = ?3, locked = 0,
                            failed_logins = 0, last_failure_ms = 0 WHERE username = ?1",
                    params![username, hash, must_change],
                )
                .map_err(db_err("update password"))?;
            if n == 0 {
                return Err(SecurityError::NoSuchUser(username.to_owned()));
            }
            let ended = end_sessions(&tx, username)?;
            tx.commit().map_err(db_err("commit"))?;
            Ok(ended)
        })
    }

    /// [`Accounts::store_password`] for the holder's own change: clears
    /// the must-change flag and uses up the TOTP step that proved the
    /// second factor, if any; after ending the account's sessions, starts
    /// `session` when given. `None` (nothing stored) when that step is no
    /// longer unused, or the account was locked or disabled meanwhile.
    fn store_own_password(
        &self,
        username: &str,
        hash: &str,
        totp_step: Option<i64>,
        session: Option<&NewSession>,
        now: i64,
    ) -> Result<Option<usize>> {
        self.db.with(|c| {
            let tx = rusqlite::Transaction::new_unchecked(c, TransactionBehavior::Immediate)
                .map_err(db_err("begin"))?;
            let n = tx
                .execute(
                    "UPDATE users SET password_hash = ?2, must_change_password = 0, locked = 0,
                            failed_logins = 0, last_failure_ms = 0,
                            totp_last_step = coalesce(?3, totp_last_step)
                     WHERE username = ?1 AND locked = 0 AND disabled = 0
                       AND (?3 IS NULL OR totp_last_step < ?3)",
                    params![username, hash, totp_step],
                )
                .map_err(db_err("update password"))?;
            if n == 0 {
                return Ok(None);
            }
            let ended = end_sessions(&tx, username)?;
            if let Some(session) = session {
                tx.execute(
                    "INSERT INTO sessions (id_hash, username, csrf, created_ms, last_seen_ms) VALUES (?1,?2,?3,?4,?4)",
                    params![sha256_hex(session.id.as_bytes()), username, session.csrf, now],
                )
                .map_err(db_err("insert session"))?;
            }
            tx.commit().map_err(db_err("commit"))?;
            Ok(Some(ended))
        })
    }

    fn dummy_hash(&self) -> Result<&str> {
        if let Some(h) = self.dummy_hash.get() {
            return Ok(h);
        }
        let h = users::hash_password(&random_b64(16))?;
        Ok(self.dummy_hash.get_or_init(|| h))
    }

    fn now_ms(&self) -> i64 {
        unix_ms(self.clock.now())
    }
}

/// Deletes every session of `username`; returns how many there were.
fn end_sessions(c: &Connection, username: &str) -> Result<usize> {
    c.execute(
        "DELETE FROM sessions WHERE username = ?1",
        params![username],
    )
    .map_err(db_err("end sessions"))
}

/// The wait left before the next attempt, if any: `failures` (already
/// reduced by any free allowance) set the delay.
fn remaining(
    b: Backoff,
    failures: u32,
    base: Duration,
    max: Duration,
    now: i64,
) -> Option<Duration> {
    if failures == 0 {
        return None;
    }
    let delay = base
        .checked_mul(1u32.checked_shl(failures - 1).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let until = b.last_ms.saturating_add(millis(delay));
    if now < until {
        let left = u64::try_from(until - now).unwrap_or(0);
        Some(Duration::from_millis(left))
    } else {
        None
    }
}

/// Drops stale entries of an in-memory throttle table when it is full.
fn prune<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Backoff>, now: i64, max_delay_ms: i64) {
    if map.len() < MAX_TRACKED {
        return;
    }
    map.retain(|_, b| now.saturating_sub(b.last_ms) < max_delay_ms);
    if map.len() >= MAX_TRACKED {
        map.clear();
    }
}

/// IPv4 as is (IPv4-mapped IPv6 unmapped); IPv6 by its /64 (one host
/// usually has a whole /64).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(s.into())
            }
        },
    }
}

/// The TOTP step matched by `code` at `now` (±1 step), if any and later
/// than `last_step` (a used code is not accepted twice).
fn totp_match(secret: &[u8], code: &str, now_ms: i64, last_step: i64) -> Option<i64> {
    let code = code.trim();
    if code.len() != TOTP_DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let totp = totp_for(secret, "-").ok()?;
    let now = u64::try_from(now_ms / 1000).ok()?;
    let current = now / TOTP_STEP_SECS;
    let mut found = None;
    for step in [current.saturating_sub(1), current, current + 1] {
        let expected = totp.generate(step * TOTP_STEP_SECS);
        let ok: bool = expected.as_bytes().ct_eq(code.as_bytes()).into();
        let step = i64::try_from(step).ok()?;
        if ok && step > last_step && found.is_none() {
            found = Some(step);
        }
    }
    found
}

/// The RFC 6238 generator for a secret (SHA-1, 6 digits, 30 s).
pub(crate) fn totp_for(secret: &[u8], account: &str) -> Result<totp_rs::TOTP> {
    totp_rs::TOTP::new(
        totp_rs::Algorithm::SHA1,
        TOTP_DIGITS,
        1,
        TOTP_STEP_SECS,
        secret.to_vec(),
        Some(TOTP_ISSUER.to_owned()),
        account.to_owned(),
    )
    .map_err(|e| SecurityError::Invalid {
        what: "TOTP",
        detail: e.to_string(),
    })
}

/// The id of a well-formed token `bst_<16 hex>_<43 base64url>`.
fn token_id(bearer: &str) -> Option<&str> {
    let rest = bearer.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = (rest.get(..16)?, rest.get(16..)?);
    let secret = secret.strip_prefix('_')?;
    let hex_ok = id
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    (hex_ok && secret.len() == 43 && is_credential_text(secret, 43)).then_some(id)
}

/// Tokens start with this (recognisable by secret scanners).
pub(crate) const TOKEN_PREFIX: &str = "bst_";

/// Base64url characters only, 1..=max bytes.
fn is_credential_text(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `n` random bytes, base64url without padding.
pub(crate) fn random_b64(n: usize) -> String {
    let mut buf = vec![0u8; n];
    OsRng.fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(&buf)
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// RFC 3339 UTC text for Unix milliseconds.
pub(crate) fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

pub(crate) fn db_err(op: &'static str) -> impl FnOnce(rusqlite::Error) -> SecurityError {
    move |source| SecurityError::Db { op, source }
}

/// Clips text from a client for events and messages (64 printable ASCII
/// characters).
pub(crate) fn clip(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}
