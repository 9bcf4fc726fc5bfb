//! The account service: throttling, locks, sessions, tokens, TOTP.

use std::{
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bastion_model::{Role, WebPermission};
use bastion_security::{
    accounts::{
        AccountPolicy, Accounts, AuthMethod, Clock, LoginOutcome, LoginRequest, NewSession,
        PasswordChange, PasswordChoice, Scope, TotpEnrolment,
    },
    db::SecurityDb,
    events::EventLog,
    SecurityError,
};

const GOOD: &str = "correct horse battery staple";
const OTHER: &str = "violet tractor umbrella sonnet";

/// A clock the test moves by hand.
struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    fn advance(&self, d: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t += d;
    }
    fn unix_secs(&self) -> u64 {
        let t = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    db: Arc<SecurityDb>,
    accounts: Accounts,
    clock: Arc<ManualClock>,
    events: Arc<EventLog>,
    events_path: std::path::PathBuf,
}

fn fixture(policy: AccountPolicy) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(SecurityDb::open(&dir.path().join("security.db"), &[3u8; 32]).expect("db"));
    let events_path = dir.path().join("events/events.log");
    let events = Arc::new(EventLog::open(&events_path).expect("events"));
    // A fixed, realistic start (TOTP steps need a real epoch offset).
    let clock = Arc::new(ManualClock(Mutex::new(
        UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    )));
    let accounts = Accounts::with_clock(db.clone(), events.clone(), policy, clock.clone());
    Fixture {
        _dir: dir,
        db,
        accounts,
        clock,
        events,
        events_path,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn req<'a>(user: &'a str, pw: &'a str, totp: Option<&'a str>, source: &str) -> LoginRequest<'a> {
    LoginRequest {
        username: user,
        password: pw,
        totp,
        source: ip(source),
    }
}

/// A holder's password change without a second factor, from 192.0.2.250.
fn change<'a>(user: &'a str, old: &'a str, new: &'a str) -> PasswordChange<'a> {
    PasswordChange {
        username: user,
        old_password: old,
        new_password: new,
        totp: None,
        session: None,
        source: ip("192.0.2.250"),
    }
}

fn add(f: &Fixture, name: &str, role: Role) {
    f.accounts
        .add_user("test", name, role, PasswordChoice::Given(GOOD))
        .expect("add user");
}

fn session_of(outcome: LoginOutcome) -> NewSession {
    match outcome {
        LoginOutcome::Ok { session, .. } => session,
        other => panic!("expected a session, got {other:?}"),
    }
}

fn events_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn unknown_user_and_wrong_password_get_the_same_answers() {
    let f = fixture(AccountPolicy::default());
    add(&f, "alice", Role::Clinician);
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    // Distinct sources so that only the per-account rules apply.
    for i in 0..24u32 {
        let t = Instant::now();
        let a = f
            .accounts
            .login(&req(
                "alice",
                "wrong password!",
                None,
                &format!("10.0.0.{i}"),
            ))
            .expect("login");
        let ta = t.elapsed();
        let t = Instant::now();
        let b = f
            .accounts
            .login(&req(
                "mallory",
                "wrong password!",
                None,
                &format!("10.0.1.{i}"),
            ))
            .expect("login");
        let tb = t.elapsed();
        if a == LoginOutcome::Failed {
            // both did one argon2 verification
            assert!(
                ta > Duration::from_millis(3) && tb > Duration::from_millis(3),
                "{ta:?} {tb:?}"
            );
        }
        known.push(a);
        unknown.push(b);
        // Wait out the back-off half the time, so both paths are exercised.
        if i % 2 == 1 {
            f.clock.advance(Duration::from_secs(3600));
        }
    }
    assert_eq!(known, unknown);
    assert!(known.contains(&LoginOutcome::Failed));
    assert!(known
        .iter()
        .any(|o| matches!(o, LoginOutcome::Throttled { .. })));
    assert_eq!(known.last(), Some(&LoginOutcome::Locked));
    // Both states outlive the service (a restart of `serve`).
    let again = Accounts::with_clock(
        f.db.clone(),
        f.events.clone(),
        AccountPolicy::default(),
        f.clock.clone(),
    );
    f.clock.advance(Duration::from_secs(48 * 3600));
    for name in ["alice", "mallory"] {
        let o = again
            .login(&req(name, GOOD, None, "10.0.2.1"))
            .expect("login");
        assert_eq!(o, LoginOutcome::Locked, "{name}");
    }
    // The event log tells the administrator which attempts named no account.
    let log = events_text(&f.events_path);
    assert!(log.contains("\"reason\":\"unknown_user\""));
}

#[test]
fn account_back_off_doubles_then_locks_until_unlock() {
    let f = fixture(AccountPolicy::default());
    add(&f, "bob", Role::Technologist);
    let mut expected_delay = Duration::from_secs(1);
    for n in 1..=10u32 {
        let src = format!("192.0.2.{n}");
        assert_eq!(
            f.accounts
                .login(&req("bob", "not his password", None, &src))
                .expect("login"),
            LoginOutcome::Failed,
            "attempt {n}"
        );
        if n == 10 {
            break;
        }
        // Immediately again: throttled, even with the right password.
        match f
            .accounts
            .login(&req("bob", GOOD, None, &src))
            .expect("login")
        {
            LoginOutcome::Throttled { retry_after } => {
                assert_eq!(retry_after, expected_delay, "after {n} failures")
            }
            other => panic!("after {n} failures: {other:?}"),
        }
        f.clock.advance(expected_delay);
        expected_delay *= 2;
    }
    // Locked after 10: the right password does not help, neither does time.
    f.clock.advance(Duration::from_secs(24 * 3600));
    assert_eq!(
        f.accounts
            .login(&req("bob", GOOD, None, "192.0.2.200"))
            .expect("login"),
        LoginOutcome::Locked
    );
    assert!(matches!(
        f.accounts.change_password(&change("bob", GOOD, OTHER)),
        Err(SecurityError::AccountLocked)
    ));
    let users = f.accounts.list_users().expect("list");
    let bob = users.iter().find(|u| u.username == "bob").expect("bob");
    assert!(bob.locked);
    assert_eq!(bob.failed_logins, 10);
    let log = events_text(&f.events_path);
    assert!(log.contains("\"type\":\"user.locked\""), "{log}");
    assert!(!log.contains("not his password") && !log.contains(GOOD));

    f.accounts.unlock("test", "bob").expect("unlock");
    let s = session_of(
        f.accounts
            .login(&req("bob", GOOD, None, "192.0.2.201"))
            .expect("login"),
    );
    assert!(f.accounts.session(&s.id).expect("session").is_some());
}

#[test]
fn an_administrator_password_reset_lifts_the_lock() {
    let policy = AccountPolicy {
        lock_after_failures: 2,
        ..AccountPolicy::default()
    };
    let f = fixture(policy);
    add(&f, "carol", Role::Clinician);
    for _ in 0..2 {
        f.accounts
            .login(&req("carol", "nope nope nope", None, "192.0.2.1"))
            .expect("login");
        f.clock.advance(Duration::from_secs(60));
    }
    assert_eq!(
        f.accounts
            .login(&req("carol", GOOD, None, "192.0.2.1"))
            .expect("login"),
        LoginOutcome::Locked
    );
    f.accounts
        .set_password("test", "carol", PasswordChoice::Given(OTHER))
        .expect("passwd");
    assert!(matches!(
        f.accounts
            .login(&req("carol", OTHER, None, "192.0.2.1"))
            .expect("login"),
        LoginOutcome::Ok {
            must_change_password: false,
            ..
        }
    ));
}

#[test]
fn per_address_throttling_delays_but_never_locks() {
    let f = fixture(AccountPolicy::default());
    add(&f, "dave", Role::Clinician);
    let noisy = "203.0.113.9";
    let mut throttled = None;
    for i in 0..40u32 {
        match f
            .accounts
            .login(&req(&format!("user{i}"), "guess guess guess", None, noisy))
            .expect("login")
        {
            LoginOutcome::Failed => {}
            LoginOutcome::Throttled { retry_after } => {
                assert!(retry_after <= Duration::from_secs(30), "{retry_after:?}");
                throttled.get_or_insert(i);
                f.clock.advance(retry_after);
            }
            other => panic!("{other:?}"),
        }
    }
    // The first 5 failures are free, the 6th attempt waits.
    assert_eq!(throttled, Some(5));
    // Another address is not affected, and the noisy one is only delayed.
    let s = f
        .accounts
        .login(&req("dave", GOOD, None, "198.51.100.1"))
        .expect("login");
    assert!(matches!(s, LoginOutcome::Ok { .. }));
    f.clock.advance(Duration::from_secs(30));
    let s = f
        .accounts
        .login(&req("dave", GOOD, None, noisy))
        .expect("login");
    assert!(matches!(s, LoginOutcome::Ok { .. }), "{s:?}");
    // A success takes back only its own attempt: a valid account does not
    // reset an address's budget for guesses at others.
    let sprayer = "203.0.113.77";
    for i in 0..4u32 {
        let o = f.accounts.login(&req(
            &format!("spray{i}"),
            "guess guess guess",
            None,
            sprayer,
        ));
        assert_eq!(o.expect("login"), LoginOutcome::Failed);
    }
    let o = f
        .accounts
        .login(&req("dave", GOOD, None, sprayer))
        .expect("login");
    assert!(matches!(o, LoginOutcome::Ok { .. }), "{o:?}");
    let o = f
        .accounts
        .login(&req("spray9", "guess guess guess", None, sprayer));
    assert_eq!(o.expect("login"), LoginOutcome::Failed);
    let o = f
        .accounts
        .login(&req("spray10", "guess guess guess", None, sprayer));
    assert!(matches!(o.expect("login"), LoginOutcome::Throttled { .. }));
    // Failures are forgotten 15 min after the last one: the free allowance
    // is back.
    f.clock.advance(Duration::from_secs(15 * 60));
    for i in 0..5u32 {
        let o = f
            .accounts
            .login(&req(&format!("again{i}"), "guess guess guess", None, noisy));
        assert_eq!(o.expect("login"), LoginOutcome::Failed, "{i}");
    }
    // IPv6 neighbours in one /64 share a budget.
    for i in 0..6u32 {
        let src = format!("2001:db8::{i:x}");
        let name = format!("nobody{i}");
        let o = f
            .accounts
            .login(&req(&name, "x", None, &src))
            .expect("login");
        if i < 5 {
            assert_eq!(o, LoginOutcome::Failed, "{i}");
        } else {
            assert!(matches!(o, LoginOutcome::Throttled { .. }), "{o:?}");
        }
    }
}

#[test]
fn admins_need_totp_and_codes_work_once() {
    let f = fixture(AccountPolicy::default());
    add(&f, "root1", Role::Admin);
    add(&f, "eve", Role::Clinician);
    assert_eq!(
        f.accounts
            .login(&req("root1", GOOD, None, "10.1.1.1"))
            .expect("login"),
        LoginOutcome::TotpSetupRequired
    );
    // A wrong password does not reveal the TOTP state.
    assert_eq!(
        f.accounts
            .login(&req("root1", "bad bad bad bad", None, "10.1.1.2"))
            .expect("login"),
        LoginOutcome::Failed
    );
    f.clock.advance(Duration::from_secs(10));
    let (uri, replaced) = f.accounts.enable_totp("test", "root1").expect("totp");
    assert!(!replaced);
    assert!(uri.starts_with("otpauth://totp/Bastion:root1?"), "{uri}");
    let totp = totp_rs::TOTP::from_url(&uri).expect("uri parses");
    assert_eq!(totp.algorithm, totp_rs::Algorithm::SHA1);
    assert_eq!((totp.digits, totp.step), (6, 30));
    assert!(totp.secret.len() * 8 >= 160);
    assert!(!events_text(&f.events_path).contains(&totp.get_secret_base32()));

    assert_eq!(
        f.accounts
            .login(&req("root1", GOOD, None, "10.1.1.3"))
            .expect("login"),
        LoginOutcome::TotpRequired
    );
    f.clock.advance(Duration::from_secs(30));
    let wrong = if totp.generate(f.clock.unix_secs()) == "000000" {
        "111111"
    } else {
        "000000"
    };
    assert_eq!(
        f.accounts
            .login(&req("root1", GOOD, Some(wrong), "10.1.1.4"))
            .expect("login"),
        LoginOutcome::TotpRequired
    );
    f.clock.advance(Duration::from_secs(60));
    let code = totp.generate(f.clock.unix_secs());
    let s = session_of(
        f.accounts
            .login(&req("root1", GOOD, Some(&code), "10.1.1.5"))
            .expect("login"),
    );
    let (p, _) = f.accounts.session(&s.id).expect("session").expect("valid");
    assert!(p.may(WebPermission::Admin));
    // The same code again (same step) is refused: no replay.
    assert_eq!(
        f.accounts
            .login(&req("root1", GOOD, Some(&code), "10.1.1.6"))
            .expect("login"),
        LoginOutcome::TotpRequired
    );
    // Non-admins without TOTP log in with the password alone.
    assert!(matches!(
        f.accounts
            .login(&req("eve", GOOD, None, "10.1.1.7"))
            .expect("login"),
        LoginOutcome::Ok { .. }
    ));
    // With the requirement off, an admin without TOTP logs in.
    let g = fixture(AccountPolicy {
        admin_requires_totp: false,
        ..AccountPolicy::default()
    });
    add(&g, "root2", Role::Admin);
    assert!(matches!(
        g.accounts
            .login(&req("root2", GOOD, None, "10.1.1.8"))
            .expect("login"),
        LoginOutcome::Ok { .. }
    ));
}

#[test]
fn web_totp_enrolment_only_for_admins_who_need_it() {
    let f = fixture(AccountPolicy::default());
    add(&f, "root1", Role::Admin);
    add(&f, "eve", Role::Clinician);
    // A wrong password: refused as a login, nothing offered.
    assert_eq!(
        f.accounts
            .enrol_totp(&req("root1", "bad bad bad bad", None, "10.2.0.1"), None)
            .expect("enrol"),
        TotpEnrolment::Refused(LoginOutcome::Failed)
    );
    f.clock.advance(Duration::from_secs(60));
    // A clinician needs no enrolment: the same answer as a failure.
    assert_eq!(
        f.accounts
            .enrol_totp(&req("eve", GOOD, None, "10.2.0.2"), None)
            .expect("enrol"),
        TotpEnrolment::Refused(LoginOutcome::Failed)
    );
    // Step 1: a secret, nothing stored (the login still asks for setup).
    let TotpEnrolment::Secret { secret, uri } = f
        .accounts
        .enrol_totp(&req("root1", GOOD, None, "10.2.0.3"), None)
        .expect("enrol")
    else {
        panic!("expected a secret")
    };
    assert_eq!(secret.len(), 32);
    assert!(uri.starts_with("otpauth://totp/Bastion:root1?") && uri.contains(&secret));
    f.clock.advance(Duration::from_secs(5));
    assert_eq!(
        f.accounts
            .login(&req("root1", GOOD, None, "10.2.0.4"))
            .expect("login"),
        LoginOutcome::TotpSetupRequired
    );
    let totp = totp_rs::TOTP::from_url(&uri).expect("uri");
    // Step 2 with a wrong code: refused, counted, still not stored.
    f.clock.advance(Duration::from_secs(30));
    let code = totp.generate(f.clock.unix_secs());
    let wrong = if code == "000000" { "111111" } else { "000000" };
    assert_eq!(
        f.accounts
            .enrol_totp(&req("root1", GOOD, Some(wrong), "10.2.0.5"), Some(&secret))
            .expect("enrol"),
        TotpEnrolment::Refused(LoginOutcome::TotpRequired)
    );
    // A tampered secret never matches.
    f.clock.advance(Duration::from_secs(30));
    let code = totp.generate(f.clock.unix_secs());
    assert_eq!(
        f.accounts
            .enrol_totp(&req("root1", GOOD, Some(&code), "10.2.0.6"), Some("AAAA"))
            .expect("enrol"),
        TotpEnrolment::Refused(LoginOutcome::TotpRequired)
    );
    f.clock.advance(Duration::from_secs(60));
    let code = totp.generate(f.clock.unix_secs());
    let TotpEnrolment::LoggedIn { session, .. } = f
        .accounts
        .enrol_totp(&req("root1", GOOD, Some(&code), "10.2.0.7"), Some(&secret))
        .expect("enrol")
    else {
        panic!("expected a session")
    };
    let (p, _) = f
        .accounts
        .session(&session.id)
        .expect("session")
        .expect("valid");
    assert!(p.may(WebPermission::Admin));
    // The code is used up; a password alone no longer works; enrolling
    // again is refused.
    assert_eq!(
        f.accounts
            .login(&req("root1", GOOD, Some(&code), "10.2.0.8"))
            .expect("login"),
        LoginOutcome::TotpRequired
    );
    f.clock.advance(Duration::from_secs(60));
    assert_eq!(
        f.accounts
            .enrol_totp(&req("root1", GOOD, None, "10.2.0.9"), None)
            .expect("enrol"),
        TotpEnrolment::Refused(LoginOutcome::Failed)
    );
    f.clock.advance(Duration::from_secs(30));
    let next = totp.generate(f.clock.unix_secs());
    assert!(matches!(
        f.accounts
            .login(&req("root1", GOOD, Some(&next), "10.2.0.10"))
            .expect("login"),
        LoginOutcome::Ok { .. }
    ));
    assert!(!events_text(&f.events_path).contains(&secret));
    assert!(events_text(&f.events_path).contains("\"via\":\"web\""));
}

#[test]
fn sessions_expire_idle_and_absolute_and_end_on_logout_and_password_change() {
    let policy = AccountPolicy {
        session_idle: Duration::from_secs(600),
        session_absolute: Duration::from_secs(3600),
        ..AccountPolicy::default()
    };
    let f = fixture(policy);
    add(&f, "frank", Role::Technologist);
    let login = |src: &str| {
        session_of(
            f.accounts
                .login(&req("frank", GOOD, None, src))
                .expect("login"),
        )
    };

    // Idle timeout.
    let s = login("10.2.0.1");
    assert!(s.id.len() >= 22 && s.id != s.csrf);
    let (p, csrf) = f.accounts.session(&s.id).expect("session").expect("valid");
    assert_eq!(csrf, s.csrf);
    assert_eq!(p.username, "frank");
    assert_eq!(p.scope, Scope::Full);
    assert!(matches!(p.method, AuthMethod::Session { .. }));
    assert!(p.may(WebPermission::Upload) && !p.may(WebPermission::Audit));
    f.clock.advance(Duration::from_secs(599));
    assert!(f.accounts.session(&s.id).expect("session").is_some());
    f.clock.advance(Duration::from_secs(599));
    assert!(
        f.accounts.session(&s.id).expect("session").is_some(),
        "use resets the idle timer"
    );
    f.clock.advance(Duration::from_secs(601));
    assert!(f.accounts.session(&s.id).expect("session").is_none());

    // Absolute timeout, however active.
    let s = login("10.2.0.2");
    for _ in 0..7 {
        f.clock.advance(Duration::from_secs(500));
        assert!(f.accounts.session(&s.id).expect("session").is_some());
    }
    f.clock.advance(Duration::from_secs(100));
    assert!(f.accounts.session(&s.id).expect("session").is_none());

    // Logout; unknown and malformed values.
    let s = login("10.2.0.3");
    f.accounts.logout(&s.id).expect("logout");
    assert!(f.accounts.session(&s.id).expect("session").is_none());
    assert!(f.accounts.session("nonsense").expect("session").is_none());
    assert!(f.accounts.session("").expect("session").is_none());
    assert!(f.accounts.session("a;b=c").expect("session").is_none());

    // Password change ends every session; disabling too.
    let a = login("10.2.0.4");
    let b = login("10.2.0.5");
    f.accounts
        .change_password(&change("frank", GOOD, OTHER))
        .expect("change");
    assert!(f.accounts.session(&a.id).expect("session").is_none());
    assert!(f.accounts.session(&b.id).expect("session").is_none());
    let c = session_of(
        f.accounts
            .login(&req("frank", OTHER, None, "10.2.0.6"))
            .expect("login"),
    );
    f.accounts
        .set_disabled("test", "frank", true)
        .expect("disable");
    assert!(f.accounts.session(&c.id).expect("session").is_none());
    assert_eq!(
        f.accounts
            .login(&req("frank", OTHER, None, "10.2.0.7"))
            .expect("login"),
        LoginOutcome::Disabled
    );
    // Nothing secret in the event log.
    let log = events_text(&f.events_path);
    for secret in [GOOD, OTHER, &a.id, &a.csrf, &c.id] {
        assert!(!log.contains(secret), "event log holds a secret");
    }
}

#[test]
fn generated_password_must_be_changed_first() {
    let f = fixture(AccountPolicy::default());
    let pw = f
        .accounts
        .add_user("test", "gina", Role::Clinician, PasswordChoice::Generate)
        .expect("add")
        .expect("a generated password");
    assert!(pw.len() >= 12);
    let o = f
        .accounts
        .login(&req("gina", &pw, None, "10.3.0.1"))
        .expect("login");
    let LoginOutcome::Ok {
        session,
        must_change_password: true,
    } = o
    else {
        panic!("{o:?}")
    };
    let (p, _) = f
        .accounts
        .session(&session.id)
        .expect("session")
        .expect("valid");
    assert!(p.must_change_password);
    assert!(WebPermission::ALL.iter().all(|w| !p.may(*w)));
    // The policy applies to the new password; the old one must be right.
    assert!(matches!(
        f.accounts.change_password(&change("gina", &pw, "short")),
        Err(SecurityError::WeakPassword(_))
    ));
    assert!(matches!(
        f.accounts
            .change_password(&change("gina", &pw, "password1234")),
        Err(SecurityError::WeakPassword(_))
    ));
    assert!(matches!(
        f.accounts.change_password(&change("gina", &pw, &pw)),
        Err(SecurityError::WeakPassword(_))
    ));
    f.clock.advance(Duration::from_secs(60));
    assert!(matches!(
        f.accounts
            .change_password(&change("gina", "wrong old password", GOOD)),
        Err(SecurityError::BadCredentials)
    ));
    assert!(matches!(
        f.accounts
            .change_password(&change("nobody", "wrong old password", GOOD)),
        Err(SecurityError::BadCredentials)
    ));
    f.clock.advance(Duration::from_secs(60));
    f.accounts
        .change_password(&change("gina", &pw, GOOD))
        .expect("change");
    let o = f
        .accounts
        .login(&req("gina", GOOD, None, "10.3.0.2"))
        .expect("login");
    let LoginOutcome::Ok {
        session,
        must_change_password: false,
    } = o
    else {
        panic!("{o:?}")
    };
    let (p, _) = f
        .accounts
        .session(&session.id)
        .expect("session")
        .expect("valid");
    assert!(p.may(WebPermission::View) && !p.may(WebPermission::Upload));
    assert!(!events_text(&f.events_path).contains(&pw));
}

#[test]
fn tokens_verify_scope_revoke_and_expire() {
    let f = fixture(AccountPolicy::default());
    add(&f, "tech", Role::Technologist);
    add(&f, "aud", Role::Auditor);
    add(&f, "res", Role::Researcher);
    let day = Duration::from_secs(86_400);

    let (info, token) = f
        .accounts
        .create_token("test", "tech", 30 * day, Scope::Full)
        .expect("create");
    assert!(token.len() >= 32);
    assert!(token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    assert!(token.contains(&info.id));
    let p = f
        .accounts
        .verify_token(&token)
        .expect("verify")
        .expect("valid");
    assert_eq!(p.username, "tech");
    assert_eq!(p.role, Role::Technologist);
    assert_eq!(
        p.method,
        AuthMethod::Token {
            id: info.id.clone()
        }
    );
    assert!(
        p.may(WebPermission::Query) && p.may(WebPermission::Upload) && !p.may(WebPermission::Audit)
    );

    let (_, read) = f
        .accounts
        .create_token("test", "tech", day, Scope::Read)
        .expect("create");
    let p = f
        .accounts
        .verify_token(&read)
        .expect("verify")
        .expect("valid");
    assert!(p.may(WebPermission::View) && !p.may(WebPermission::Upload));
    let (_, up) = f
        .accounts
        .create_token("test", "tech", day, Scope::Upload)
        .expect("create");
    let p = f
        .accounts
        .verify_token(&up)
        .expect("verify")
        .expect("valid");
    assert!(p.may(WebPermission::Upload) && !p.may(WebPermission::View));

    // An auditor's default token reaches the event log and nothing else.
    let (_, a) = f
        .accounts
        .create_token("test", "aud", day, Scope::Full)
        .expect("create");
    let p = f.accounts.verify_token(&a).expect("verify").expect("valid");
    assert!(p.may(WebPermission::Audit) && !p.may(WebPermission::Query));
    // Useless tokens are refused at creation.
    assert!(matches!(
        f.accounts.create_token("test", "aud", day, Scope::Upload),
        Err(SecurityError::Invalid { .. })
    ));
    assert!(matches!(
        f.accounts.create_token("test", "res", day, Scope::Full),
        Err(SecurityError::Invalid { .. })
    ));
    assert!(matches!(
        f.accounts.create_token("test", "nobody", day, Scope::Full),
        Err(SecurityError::NoSuchUser(_))
    ));
    assert!(f
        .accounts
        .create_token("test", "tech", 400 * day, Scope::Full)
        .is_err());

    // Tampered, truncated, malformed.
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    for bad in [
        tampered.as_str(),
        &token[..token.len() - 1],
        "",
        "Bearer x",
        "bst_",
        &token.to_uppercase(),
    ] {
        assert!(
            f.accounts.verify_token(bad).expect("verify").is_none(),
            "{bad}"
        );
    }

    // Revoked.
    f.accounts.revoke_token("test", &info.id).expect("revoke");
    assert!(f.accounts.verify_token(&token).expect("verify").is_none());
    assert!(matches!(
        f.accounts.revoke_token("test", "0000000000000000"),
        Err(SecurityError::NoSuchToken(_))
    ));
    // Expired.
    f.clock.advance(day);
    assert!(f.accounts.verify_token(&read).expect("verify").is_none());
    // Disabled account.
    let (_, t2) = f
        .accounts
        .create_token("test", "tech", 30 * day, Scope::Full)
        .expect("create");
    assert!(f.accounts.verify_token(&t2).expect("verify").is_some());
    f.accounts
        .set_disabled("test", "tech", true)
        .expect("disable");
    assert!(f.accounts.verify_token(&t2).expect("verify").is_none());
    f.accounts
        .set_disabled("test", "tech", false)
        .expect("enable");
    assert!(f.accounts.verify_token(&t2).expect("verify").is_some());
    // Removed account: its tokens go with it.
    f.accounts.remove_user("test", "tech").expect("remove");
    assert!(f.accounts.verify_token(&t2).expect("verify").is_none());
    assert!(f
        .accounts
        .list_tokens(Some("tech"))
        .expect("list")
        .is_empty());

    let list = f.accounts.list_tokens(None).expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].username, "aud");
    let log = events_text(&f.events_path);
    for t in [&token, &read, &up, &a, &t2] {
        assert!(!log.contains(t.as_str()), "event log holds a token");
    }
    let _ = &f.events;
}

#[test]
fn the_last_enabled_admin_stays() {
    let f = fixture(AccountPolicy::default());
    add(&f, "a1", Role::Admin);
    assert!(matches!(
        f.accounts.remove_user("test", "a1"),
        Err(SecurityError::LastAdmin(_))
    ));
    assert!(matches!(
        f.accounts.set_disabled("test", "a1", true),
        Err(SecurityError::LastAdmin(_))
    ));
    add(&f, "a2", Role::Admin);
    f.accounts
        .set_disabled("test", "a2", true)
        .expect("disable a2");
    assert!(matches!(
        f.accounts.remove_user("test", "a1"),
        Err(SecurityError::LastAdmin(_))
    ));
    f.accounts
        .set_disabled("test", "a2", false)
        .expect("enable a2");
    f.accounts.remove_user("test", "a1").expect("remove a1");
    assert!(matches!(
        f.accounts.remove_user("test", "a1"),
        Err(SecurityError::NoSuchUser(_))
    ));
    assert!(matches!(
        f.accounts
            .add_user("test", "a2", Role::Clinician, PasswordChoice::Given(GOOD)),
        Err(SecurityError::UserExists(_))
    ));
    assert!(matches!(
        f.accounts
            .add_user("test", "x y", Role::Clinician, PasswordChoice::Given(GOOD)),
        Err(SecurityError::Invalid { .. })
    ));
}

#[test]
fn a_version_1_database_is_migrated_and_keeps_its_users() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("security.db");
    let key = [9u8; 32];
    {
        // The schema as released before accounts (migration 1 only).
        let c = rusqlite::Connection::open(&path).expect("open");
        c.execute_batch(&format!("PRAGMA key = \"x'{}'\";", hex::encode(key)))
            .expect("key");
        c.execute_batch(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);
             CREATE TABLE devices (ae TEXT PRIMARY KEY NOT NULL, network TEXT NOT NULL, transport TEXT NOT NULL,
                 allow TEXT NOT NULL, cert_sha256 TEXT, host TEXT, port INTEGER,
                 on_conflict TEXT NOT NULL DEFAULT 'refuse', move_destinations TEXT NOT NULL DEFAULT '',
                 created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
             CREATE TABLE users (username TEXT PRIMARY KEY NOT NULL, password_hash TEXT NOT NULL,
                 role TEXT NOT NULL, must_change_password INTEGER NOT NULL DEFAULT 1, created_at TEXT NOT NULL);
             INSERT INTO schema_version VALUES (1);",
        )
        .expect("v1 schema");
        // A user as the previous release made it (argon2 defaults).
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let hash = argon2::Argon2::default()
            .hash_password(GOOD.as_bytes(), &salt)
            .expect("hash")
            .to_string();
        c.execute(
            "INSERT INTO users (username, password_hash, role, created_at) VALUES ('admin', ?1, 'admin', '2026-01-01T00:00:00Z')",
            [hash],
        )
        .expect("v1 user");
    }
    let db = Arc::new(SecurityDb::open(&path, &key).expect("migrate"));
    drop(SecurityDb::open(&path, &key).expect("reopen is a no-op"));
    let events = Arc::new(EventLog::open(&dir.path().join("e.log")).expect("events"));
    let accounts = Accounts::new(db.clone(), events, AccountPolicy::default());
    let users = accounts.list_users().expect("list");
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].username, "admin");
    assert!(users[0].must_change_password && !users[0].disabled && !users[0].totp_enabled);
    assert!(bastion_security::users::verify_password(&db, "admin", GOOD).expect("verify"));
}

#[test]
fn parallel_attempts_do_not_slip_through_one_window() {
    let f = fixture(AccountPolicy::default());
    add(&f, "root3", Role::Admin);
    let (uri, _) = f.accounts.enable_totp("test", "root3").expect("totp");
    let totp = totp_rs::TOTP::from_url(&uri).expect("uri");
    let code = totp.generate(f.clock.unix_secs());
    // The same valid code eight times at once: one session at most.
    let outcomes: Vec<LoginOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (accounts, code) = (&f.accounts, &code);
                s.spawn(move || {
                    accounts
                        .login(&req("root3", GOOD, Some(code), &format!("10.9.0.{i}")))
                        .expect("login")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let ok = outcomes
        .iter()
        .filter(|o| matches!(o, LoginOutcome::Ok { .. }))
        .count();
    assert!(ok <= 1, "{outcomes:?}");
    // Eight wrong guesses at once: one is checked, the others wait.
    f.clock.advance(Duration::from_secs(3600));
    add(&f, "kim", Role::Clinician);
    let outcomes: Vec<LoginOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let accounts = &f.accounts;
                s.spawn(move || {
                    accounts
                        .login(&req(
                            "kim",
                            "guess guess guess",
                            None,
                            &format!("10.9.1.{i}"),
                        ))
                        .expect("login")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let checked = outcomes
        .iter()
        .filter(|o| **o == LoginOutcome::Failed)
        .count();
    assert_eq!(checked, 1, "{outcomes:?}");
}

#[test]
fn password_change_of_a_totp_account_needs_the_second_factor() {
    let f = fixture(AccountPolicy::default());
    add(&f, "tess", Role::Admin);
    add(&f, "ursula", Role::Clinician);
    let (uri, _) = f.accounts.enable_totp("test", "tess").expect("totp");
    let totp = totp_rs::TOTP::from_url(&uri).expect("uri");
    let failures = |f: &Fixture| {
        f.accounts
            .list_users()
            .expect("list")
            .into_iter()
            .find(|u| u.username == "tess")
            .map(|u| u.failed_logins)
    };
    let with = |totp: Option<&'static str>, session: Option<&'static str>| PasswordChange {
        totp,
        session,
        ..change("tess", GOOD, OTHER)
    };

    // The old password alone is not enough: the answer of a wrong
    // password, counted as a failure.
    assert!(matches!(
        f.accounts.change_password(&change("tess", GOOD, OTHER)),
        Err(SecurityError::BadCredentials)
    ));
    assert_eq!(failures(&f), Some(1));
    f.clock.advance(Duration::from_secs(1));
    // A wrong code neither.
    let now = totp.generate(f.clock.unix_secs());
    let wrong = if now == "000000" { "111111" } else { "000000" };
    assert!(matches!(
        f.accounts.change_password(&with(Some(wrong), None)),
        Err(SecurityError::BadCredentials)
    ));
    assert_eq!(failures(&f), Some(2));
    let log = events_text(&f.events_path);
    assert!(
        log.contains("\"reason\":\"totp_missing_on_change\""),
        "{log}"
    );
    assert!(log.contains("\"reason\":\"totp_wrong_on_change\""), "{log}");
    f.clock.advance(Duration::from_secs(2));
    // Another account's session does not stand for this one's factor.
    let theirs = session_of(
        f.accounts
            .login(&req("ursula", GOOD, None, "10.4.0.1"))
            .expect("login"),
    );
    let theirs: &'static str = Box::leak(theirs.id.into_boxed_str());
    assert!(matches!(
        f.accounts.change_password(&with(None, Some(theirs))),
        Err(SecurityError::BadCredentials)
    ));
    assert_eq!(failures(&f), Some(3));
    f.clock.advance(Duration::from_secs(4));
    // The right code: changed, the code used up (not for a login, not for
    // another change).
    let code: &'static str = Box::leak(totp.generate(f.clock.unix_secs()).into_boxed_str());
    f.accounts
        .change_password(&with(Some(code), None))
        .expect("change with the code");
    assert_eq!(failures(&f), Some(0));
    let changed = |f: &Fixture| -> Vec<serde_json::Value> {
        events_text(&f.events_path)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["type"] == "user.password_changed")
            .collect()
    };
    let last = changed(&f).pop().expect("event");
    assert_eq!(last["username"], "tess");
    assert_eq!(last["second_factor"], "totp");
    assert_eq!(last["source"], "192.0.2.250");
    assert_eq!(
        f.accounts
            .login(&req("tess", OTHER, Some(code), "10.4.0.2"))
            .expect("login"),
        LoginOutcome::TotpRequired
    );
    f.clock.advance(Duration::from_secs(1));
    assert!(matches!(
        f.accounts.change_password(&PasswordChange {
            totp: Some(code),
            ..change("tess", OTHER, GOOD)
        }),
        Err(SecurityError::BadCredentials)
    ));
    // Logged in fully (TOTP included): the session stands for the second
    // factor, the old password is still needed, and the change ends it.
    f.clock.advance(Duration::from_secs(60));
    let fresh = totp.generate(f.clock.unix_secs());
    let own = session_of(
        f.accounts
            .login(&req("tess", OTHER, Some(&fresh), "10.4.0.3"))
            .expect("login"),
    );
    assert!(matches!(
        f.accounts.change_password(&PasswordChange {
            session: Some(&own.id),
            ..change("tess", "not the password", GOOD)
        }),
        Err(SecurityError::BadCredentials)
    ));
    f.clock.advance(Duration::from_secs(1));
    f.accounts
        .change_password(&PasswordChange {
            session: Some(&own.id),
            ..change("tess", OTHER, GOOD)
        })
        .expect("change with the own session");
    assert_eq!(
        changed(&f).pop().expect("event")["second_factor"],
        "session"
    );
    assert!(f.accounts.session(&own.id).expect("session").is_none());
    // An account without TOTP needs no code.
    f.accounts
        .change_password(&change("ursula", GOOD, OTHER))
        .expect("change without TOTP");
    let last = changed(&f).pop().expect("event");
    assert_eq!(
        (last["username"].as_str(), last["second_factor"].as_str()),
        (Some("ursula"), Some("none"))
    );
    let log = events_text(&f.events_path);
    assert!(!log.contains(code) && !log.contains(&fresh) && !log.contains(&own.id));
}

#[test]
fn a_right_password_does_not_rearm_the_address_delay() {
    let f = fixture(AccountPolicy::default());
    add(&f, "root4", Role::Admin);
    add(&f, "pat", Role::Clinician);
    // A hospital NAT address with eight failed logins (other people's
    // typos, or an attacker behind it).
    let nat = "198.51.100.77";
    let mut failed = 0;
    let mut i = 0;
    while failed < 8 {
        i += 1;
        match f
            .accounts
            .login(&req(&format!("typo{i}"), "guess guess guess", None, nat))
            .expect("login")
        {
            LoginOutcome::Failed => failed += 1,
            LoginOutcome::Throttled { retry_after } => f.clock.advance(retry_after),
            other => panic!("{other:?}"),
        }
    }
    // The address's delay (at most 30 s) has passed.
    f.clock.advance(Duration::from_secs(30));
    // A new admin logs in (TOTP setup needed) and enrols at once; a
    // clinician logs in twice in a row: nothing waits.
    assert_eq!(
        f.accounts
            .login(&req("root4", GOOD, None, nat))
            .expect("login"),
        LoginOutcome::TotpSetupRequired
    );
    let enrol = f
        .accounts
        .enrol_totp(&req("root4", GOOD, None, nat), None)
        .expect("enrol");
    assert!(matches!(enrol, TotpEnrolment::Secret { .. }), "{enrol:?}");
    for n in 0..2 {
        let o = f
            .accounts
            .login(&req("pat", GOOD, None, nat))
            .expect("login");
        assert!(matches!(o, LoginOutcome::Ok { .. }), "login {n}: {o:?}");
    }
    f.accounts
        .change_password(&PasswordChange {
            source: ip(nat),
            ..change("pat", GOOD, OTHER)
        })
        .expect("change");
    let o = f
        .accounts
        .login(&req("pat", OTHER, None, nat))
        .expect("login");
    assert!(matches!(o, LoginOutcome::Ok { .. }), "{o:?}");
    // The address's failures are still counted: one more guess is
    // checked (its delay has passed), the next one waits.
    assert_eq!(
        f.accounts
            .login(&req("typo-x", "guess guess guess", None, nat))
            .expect("login"),
        LoginOutcome::Failed
    );
    assert!(matches!(
        f.accounts
            .login(&req("typo-y", "guess guess guess", None, nat))
            .expect("login"),
        LoginOutcome::Throttled { .. }
    ));
    // Parallel guesses from one address still do not slip through one
    // window: the five free ones are checked, the others wait.
    let outcomes: Vec<LoginOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let accounts = &f.accounts;
                s.spawn(move || {
                    accounts
                        .login(&req(
                            &format!("par{i}"),
                            "guess guess guess",
                            None,
                            "198.51.100.99",
                        ))
                        .expect("login")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let checked = outcomes
        .iter()
        .filter(|o| **o == LoginOutcome::Failed)
        .count();
    assert_eq!(checked, 5, "{outcomes:?}");
}

#[test]
fn user_names_differing_only_in_case_are_refused() {
    let f = fixture(AccountPolicy::default());
    add(&f, "alice", Role::Clinician);
    for name in ["Alice", "ALICE", "aLiCe"] {
        match f
            .accounts
            .add_user("test", name, Role::Admin, PasswordChoice::Given(GOOD))
        {
            Err(e @ SecurityError::UserNameCaseClash { .. }) => assert_eq!(
                e.to_string(),
                format!(
                    "user name {name} differs from the existing user alice only in letter case; \
                     user names must differ by more than case"
                )
            ),
            other => panic!("{name}: {other:?}"),
        }
    }
    assert!(matches!(
        f.accounts.add_user(
            "test",
            "alice",
            Role::Clinician,
            PasswordChoice::Given(GOOD)
        ),
        Err(SecurityError::UserExists(_))
    ));
    assert!(matches!(
        bastion_security::users::create_user(&f.db, "ALICE", GOOD, "admin"),
        Err(SecurityError::UserNameCaseClash { .. })
    ));
    // Other names are fine, and nothing was added.
    add(&f, "alice2", Role::Clinician);
    let names: Vec<String> = f
        .accounts
        .list_users()
        .expect("list")
        .into_iter()
        .map(|u| u.username)
        .collect();
    assert_eq!(names, ["alice", "alice2"]);
    assert_eq!(
        events_text(&f.events_path)
            .matches("\"type\":\"user.added\"")
            .count(),
        2
    );
}

/// The first login of an admin (TOTP enrolment, then the forced password
/// change) needs no second code: the change, proven by the flow's own
/// session, starts a new session in the same 30-second step. The code
/// stays single-use for any other login.
#[test]
fn first_login_totp_then_password_change_needs_no_second_code() {
    let f = fixture(AccountPolicy::default());
    add(&f, "vera", Role::Admin);
    add(&f, "walt", Role::Clinician);
    let TotpEnrolment::Secret { secret, uri } = f
        .accounts
        .enrol_totp(&req("vera", GOOD, None, "10.9.0.1"), None)
        .expect("enrol")
    else {
        panic!("expected a secret")
    };
    let totp = totp_rs::TOTP::from_url(&uri).expect("uri");
    let code = totp.generate(f.clock.unix_secs());
    let TotpEnrolment::LoggedIn { session, .. } = f
        .accounts
        .enrol_totp(&req("vera", GOOD, Some(&code), "10.9.0.1"), Some(&secret))
        .expect("enrol")
    else {
        panic!("expected a session")
    };
    // A second before the step ends at the latest: the same code is
    // the current one throughout.
    f.clock.advance(Duration::from_secs(1));
    let flow: &'static str = Box::leak(session.id.clone().into_boxed_str());
    let new = f
        .accounts
        .change_password_and_continue(&PasswordChange {
            session: Some(flow),
            source: ip("10.9.0.1"),
            ..change("vera", GOOD, OTHER)
        })
        .expect("change")
        .expect("a new session: still logged in");
    assert_ne!(new.id, session.id);
    assert_ne!(new.csrf, session.csrf);
    // The flow's session ended (every session of the account does); the
    // new one is vera's, with her permissions (no must-change any more).
    assert!(f.accounts.session(&session.id).expect("lookup").is_none());
    let (p, csrf) = f
        .accounts
        .session(&new.id)
        .expect("lookup")
        .expect("the new session is live");
    assert_eq!(p.username, "vera");
    assert_eq!(csrf, new.csrf);
    assert!(p.may(WebPermission::Admin));
    // The enrolment code is still used up: a new login with it, in the
    // same step and with the new password, is refused.
    assert_eq!(
        f.accounts
            .login(&req("vera", OTHER, Some(&code), "10.9.0.2"))
            .expect("login"),
        LoginOutcome::TotpRequired
    );
    // The old password is gone.
    f.clock.advance(Duration::from_secs(30));
    let next = totp.generate(f.clock.unix_secs());
    assert_eq!(
        f.accounts
            .login(&req("vera", GOOD, Some(&next), "10.9.0.3"))
            .expect("login"),
        LoginOutcome::Failed
    );
    let events: Vec<serde_json::Value> = events_text(&f.events_path)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let changed = events
        .iter()
        .rfind(|e| e["type"] == "user.password_changed")
        .expect("password_changed");
    assert_eq!(changed["second_factor"], "session");
    assert_eq!(changed["session_started"], true);
    assert!(events
        .iter()
        .any(|e| e["type"] == "login.success" && e["via"] == "password_change"));
    // An account without TOTP: changed, but no session started (the
    // client logs in with the new password).
    assert!(matches!(
        f.accounts.change_password_and_continue(&PasswordChange {
            session: Some(Box::leak(new.id.clone().into_boxed_str())),
            ..change("walt", GOOD, OTHER)
        }),
        Ok(None)
    ));
    assert!(matches!(
        f.accounts
            .login(&req("walt", OTHER, None, "10.9.0.4"))
            .expect("login"),
        LoginOutcome::Ok { .. }
    ));
}
