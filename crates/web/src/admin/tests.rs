//! The admin API, alert evidence and acknowledgement through the router
//! (`tower::ServiceExt::oneshot`, no socket): a real archive, security
//! database, account service, PKI and detector in a temporary directory;
//! callers authenticated by a fake account service (`tok-<role>` bearer
//! tokens, an admin session cookie with a CSRF token).

use std::{net::SocketAddr, sync::Arc};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{header, Method, Request, StatusCode},
};
use bastion_archive::{Archive, Limits};
use bastion_index::Index;
use bastion_model::{Role, WebPermission};
use bastion_security::{
    accounts::{AccountPolicy, Accounts, PasswordChoice},
    alerts::{AlertStore, Detection},
    db::SecurityDb,
    detect::{DetectConfig, Finding, Rule, Rules},
    events::{EventLog, Outcome},
    inventory::Inventory,
    pki::{self, PkiPaths},
};
use bastion_store::{BlobStore, MasterKey};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{AdminContext, ListenerInfo};
use crate::{
    accounts::{
        AccountService, Identity, LoginAttempt, LoginResult, PasswordChangeRequest,
        PasswordChangeResult, SessionView,
    },
    AppState, WebConfig,
};

struct FakeAccounts;

fn identity(role: Role) -> Identity {
    Identity {
        username: format!("{role}-user"),
        role,
        permissions: WebPermission::ALL
            .into_iter()
            .filter(|p| role.allows(*p))
            .collect(),
        must_change_password: false,
    }
}

impl AccountService for FakeAccounts {
    fn login(&self, _a: &LoginAttempt) -> LoginResult {
        LoginResult::Failed
    }
    fn session(&self, id: &str) -> Option<SessionView> {
        (id == "sess-admin").then(|| SessionView {
            identity: identity(Role::Admin),
            csrf: "csrf-admin".into(),
        })
    }
    fn verify_token(&self, token: &str) -> Option<Identity> {
        Role::parse(token.strip_prefix("tok-")?).ok().map(identity)
    }
    fn logout(&self, _id: &str) {}
    fn change_password(&self, _r: &PasswordChangeRequest) -> PasswordChangeResult {
        PasswordChangeResult::Failed
    }
    fn session_idle(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(900))
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    app: axum::Router,
    events: Arc<EventLog>,
    accounts: Arc<Accounts>,
    detection: Arc<Detection>,
    inventory: Arc<Inventory>,
}

fn fixture() -> Fixture {
    fixture_with(vec![
        ListenerInfo {
            name: "dicom-tls".into(),
            address: SocketAddr::from(([127, 0, 0, 1], 2762)),
            tls: true,
        },
        ListenerInfo {
            name: "dicom-plain".into(),
            address: SocketAddr::from(([0, 0, 0, 0], 104)),
            tls: false,
        },
        ListenerInfo {
            name: "https".into(),
            address: SocketAddr::from(([10, 1, 2, 3], 8443)),
            tls: true,
        },
    ])
}

fn fixture_with(listeners: Vec<ListenerInfo>) -> Fixture {
    fixture_with_keys(listeners, Vec::new())
}

/// A fixture whose binary reported `key_warnings` (keys inside the data
/// directory).
fn fixture_with_keys(listeners: Vec<ListenerInfo>, key_warnings: Vec<String>) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let master = MasterKey::from_bytes([7u8; 32]);
    let store = BlobStore::open(&d.join("blobs"), master.clone()).expect("store");
    let index =
        Index::open(&d.join("index.db"), &master.derive("bastion index v1")).expect("index");
    let events = Arc::new(EventLog::open(&d.join("events/events.log")).expect("events"));
    let archive = Arc::new(Archive::new(
        Arc::new(store),
        Arc::new(index),
        events.clone(),
        Limits::default(),
    ));
    let db = Arc::new(SecurityDb::open(&d.join("security.db"), &[9u8; 32]).expect("db"));
    let accounts = Arc::new(Accounts::new(
        db.clone(),
        events.clone(),
        AccountPolicy::default(),
    ));
    // One enabled admin in the database ("root"), as after `bastion init`.
    accounts
        .add_user("test", "root", Role::Admin, PasswordChoice::Generate)
        .expect("root");
    let inventory = Inventory::start(db.clone());
    events.add_observer(inventory.clone());
    let detection = Detection::start(
        Rules::new(DetectConfig::default()),
        AlertStore::new(db.clone()),
        None,
    )
    .expect("detection");
    let paths = PkiPaths::new(d);
    pki::generate(&paths, &[]).expect("pki");
    let state = AppState::new(archive, Arc::new(FakeAccounts), WebConfig::default())
        .with_alerts(detection.clone())
        .with_admin(AdminContext {
            db: db.clone(),
            accounts: accounts.clone(),
            pki: paths,
            listeners,
            key_warnings,
        });
    Fixture {
        _dir: dir,
        app: crate::router(state),
        events,
        accounts,
        detection,
        inventory,
    }
}

/// A request from 127.0.0.1; `auth` is a bearer token (`tok-admin`…), the
/// admin session (`sess-admin`, with its CSRF token unless `"sess-nocsrf"`)
/// or nothing (`""`).
fn req(method: Method, uri: &str, auth: &str, body: Option<Value>) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "pacs.test:8443")
        .extension(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    match auth {
        "" => {}
        "sess-admin" => {
            b = b
                .header(header::COOKIE, "bastion_session=sess-admin")
                .header("x-csrf-token", "csrf-admin");
        }
        "sess-nocsrf" => b = b.header(header::COOKIE, "bastion_session=sess-admin"),
        token => b = b.header(header::AUTHORIZATION, format!("Bearer {token}")),
    }
    match body {
        Some(v) => b
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(v.to_string())),
        None => b.body(Body::empty()),
    }
    .expect("request")
}

async fn call(f: &Fixture, r: Request<Body>) -> (StatusCode, Value) {
    let resp = f.app.clone().oneshot(r).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn of_type(events: &EventLog, kind: &str) -> Vec<Value> {
    events
        .read_all()
        .expect("events")
        .into_iter()
        .filter(|e| e["type"] == kind)
        .collect()
}

/// Every new route with the body it would take.
fn routes() -> Vec<(Method, &'static str, Option<Value>, WebPermission)> {
    let device =
        json!({"ae": "X1", "network": "127.0.0.1/32", "transport": "tls", "allow": ["echo"]});
    vec![
        (Method::GET, "/api/devices", None, WebPermission::Admin),
        (
            Method::GET,
            "/api/devices/unknown",
            None,
            WebPermission::Admin,
        ),
        (
            Method::POST,
            "/api/devices",
            Some(device),
            WebPermission::Admin,
        ),
        (
            Method::PUT,
            "/api/devices/X1",
            Some(json!({"allow": ["store"]})),
            WebPermission::Admin,
        ),
        (
            Method::DELETE,
            "/api/devices/X1",
            None,
            WebPermission::Admin,
        ),
        (Method::GET, "/api/users", None, WebPermission::Admin),
        (
            Method::POST,
            "/api/users",
            Some(json!({"username": "u9", "role": "auditor"})),
            WebPermission::Admin,
        ),
        (
            Method::POST,
            "/api/users/root/disable",
            None,
            WebPermission::Admin,
        ),
        (
            Method::POST,
            "/api/users/root/enable",
            None,
            WebPermission::Admin,
        ),
        (
            Method::POST,
            "/api/users/root/unlock",
            None,
            WebPermission::Admin,
        ),
        (
            Method::POST,
            "/api/users/root/password",
            None,
            WebPermission::Admin,
        ),
        (Method::GET, "/api/posture", None, WebPermission::Admin),
        (Method::GET, "/api/alerts/1", None, WebPermission::Audit),
        (
            Method::POST,
            "/api/alerts/1/ack",
            Some(json!({"comment": "x"})),
            WebPermission::Audit,
        ),
        (
            Method::POST,
            "/api/alerts/ack",
            Some(json!({"comment": "x", "all": true})),
            WebPermission::Audit,
        ),
        (Method::GET, "/api/audit/chain", None, WebPermission::Audit),
    ]
}

#[tokio::test]
async fn every_route_needs_the_right_credentials_and_csrf() {
    let f = fixture();
    for (method, uri, body, needs) in routes() {
        let (s, _) = call(&f, req(method.clone(), uri, "", body.clone())).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {uri} anonymous");
        for role in ["clinician", "technologist", "researcher", "auditor"] {
            let allowed = Role::parse(role).is_ok_and(|r| r.allows(needs));
            let (s, v) = call(
                &f,
                req(method.clone(), uri, &format!("tok-{role}"), body.clone()),
            )
            .await;
            if allowed {
                assert_ne!(s, StatusCode::FORBIDDEN, "{method} {uri} as {role}: {v}");
            } else {
                assert_eq!(s, StatusCode::FORBIDDEN, "{method} {uri} as {role}: {v}");
            }
        }
        if method != Method::GET {
            let (s, v) = call(&f, req(method.clone(), uri, "sess-nocsrf", body.clone())).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{method} {uri} without CSRF");
            assert!(
                v["error"].as_str().is_some_and(|e| e.contains("CSRF")),
                "{v}"
            );
        }
    }
    // Refusals change nothing.
    assert!(of_type(&f.events, "device.added").is_empty());
    assert!(of_type(&f.events, "user.disabled").is_empty());
}

#[tokio::test]
async fn devices_are_added_changed_listed_and_removed() {
    let f = fixture();
    let body = json!({"ae": "CT1", "network": "127.0.0.1/32", "transport": "plain",
                      "allow": ["echo", "store"], "host": "127.0.0.1", "port": 11112});
    let (s, v) = call(
        &f,
        req(
            Method::POST,
            "/api/devices",
            "sess-admin",
            Some(body.clone()),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["ae"], "CT1");
    assert_eq!(v["transport"], "plain");
    assert_eq!(v["allow"], json!(["echo", "store"]));
    assert_eq!(v["plaintext"], true);
    assert_eq!(v["on_conflict"], "refuse");
    assert_eq!(v["port"], 11112);
    assert_eq!(v["inventory"], Value::Null);
    assert_eq!(v["last_rejected"], Value::Null);
    let added = of_type(&f.events, "device.added");
    assert_eq!(added.len(), 1);
    assert_eq!(added[0]["actor"], "admin-user");
    assert_eq!(added[0]["device"]["ae"], "CT1");
    // the same AE title again: 409
    let (s, v) = call(
        &f,
        req(Method::POST, "/api/devices", "tok-admin", Some(body)),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("CT1")),
        "{v}"
    );
    // bad fields: 400 naming them
    for (bad, field) in [
        (
            json!({"ae": "CT2", "network": "10.0.0.1/8", "transport": "tls", "allow": ["echo"]}),
            "network",
        ),
        (
            json!({"ae": "CT2", "network": "10.0.0.0/8", "transport": "ftp", "allow": ["echo"]}),
            "transport",
        ),
        (
            json!({"ae": "CT2", "network": "10.0.0.0/8", "transport": "tls", "allow": ["fly"]}),
            "allow",
        ),
        (
            json!({"ae": "CT2", "network": "10.0.0.0/8", "transport": "tls", "allow": ["echo"], "port": 104}),
            "host",
        ),
        (
            json!({"ae": "CT2", "network": "10.0.0.0/8", "transport": "tls"}),
            "allow",
        ),
        (
            json!({"network": "10.0.0.0/8", "transport": "tls", "allow": ["echo"]}),
            "ae",
        ),
        (
            json!({"ae": "THIS_AE_TITLE_IS_TOO_LONG", "network": "10.0.0.0/8", "transport": "tls", "allow": ["echo"]}),
            "ae",
        ),
        (
            json!({"ae": "CT2", "network": "10.0.0.0/8", "transport": "tls", "allow": ["echo"], "colour": "red"}),
            "colour",
        ),
        (
            json!({"ae": "CT2", "network": "10.0.0.0/8", "transport": "tls", "allow": ["echo"], "port": "x"}),
            "expected",
        ),
    ] {
        let (s, v) = call(
            &f,
            req(Method::POST, "/api/devices", "tok-admin", Some(bad.clone())),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(field), "{bad}: {msg}");
    }
    // a non-JSON body: 415
    let r = Request::builder()
        .method(Method::POST)
        .uri("/api/devices")
        .header(header::AUTHORIZATION, "Bearer tok-admin")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("ae=CT2"))
        .expect("request");
    assert_eq!(call(&f, r).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // update: only the given fields change; null clears host and port
    let (s, v) = call(
        &f,
        req(
            Method::PUT,
            "/api/devices/CT1",
            "tok-admin",
            Some(json!({"transport": "tls", "allow": ["echo"], "host": null, "port": null})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["transport"], "tls");
    assert_eq!(v["plaintext"], false);
    assert_eq!(v["allow"], json!(["echo"]));
    assert_eq!(v["host"], Value::Null);
    assert_eq!(v["network"], "127.0.0.1/32");
    let updated = of_type(&f.events, "device.updated");
    assert_eq!(updated.len(), 1);
    assert_eq!(updated[0]["device"]["transport"], "tls");
    for (uri, body, want) in [
        (
            "/api/devices/NOPE",
            json!({"allow": ["echo"]}),
            StatusCode::NOT_FOUND,
        ),
        (
            "/api/devices/CT1",
            json!({"ae": "CT9"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/devices/CT1",
            json!({"network": "bad"}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (s, v) = call(&f, req(Method::PUT, uri, "tok-admin", Some(body))).await;
        assert_eq!(s, want, "{uri}: {v}");
    }
    // refusals of a registered device show as last_rejected; inventory too
    f.events.record(
        "association.rejected",
        Outcome::Refused,
        json!({"calling_ae": "CT1", "called_ae": "BASTION", "peer": "10.9.9.9", "reason": "address_outside_network"}),
    );
    f.events.record(
        "association.accepted",
        Outcome::Success,
        json!({"ae": "CT1", "peer": "127.0.0.1:5000", "listener": "tls"}),
    );
    f.inventory.flush();
    let (s, v) = call(&f, req(Method::GET, "/api/devices", "tok-admin", None)).await;
    assert_eq!(s, StatusCode::OK);
    let list = v.as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0]["last_rejected"]["reason"],
        "address_outside_network"
    );
    assert_eq!(list[0]["last_rejected"]["address"], "10.9.9.9");
    assert!(list[0]["last_rejected"]["at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(list[0]["inventory"]["transport"], "tls");
    assert_eq!(list[0]["inventory"]["manufacturer"], "");
    assert!(list[0]["inventory"]["first_seen"].is_string());
    // unknown devices
    f.events.record(
        "association.rejected",
        Outcome::Refused,
        json!({"calling_ae": "EVIL", "called_ae": "BASTION", "peer": "10.0.0.66", "reason": "unknown_calling_ae"}),
    );
    f.inventory.flush();
    let (s, v) = call(
        &f,
        req(Method::GET, "/api/devices/unknown", "tok-admin", None),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["address"], "10.0.0.66");
    assert_eq!(v[0]["ae_titles"], json!(["EVIL"]));
    assert_eq!(v[0]["attempts"], 1);
    // remove
    let (s, _) = call(
        &f,
        req(Method::DELETE, "/api/devices/CT1", "sess-admin", None),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = call(
        &f,
        req(Method::DELETE, "/api/devices/CT1", "tok-admin", None),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let removed = of_type(&f.events, "device.removed");
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0]["ae"], "CT1");
    assert_eq!(removed[0]["actor"], "admin-user");
    let (_, v) = call(&f, req(Method::GET, "/api/devices", "tok-admin", None)).await;
    assert_eq!(v, json!([]));
}

#[tokio::test]
async fn users_are_added_disabled_enabled_unlocked_and_reset() {
    let f = fixture();
    let (s, v) = call(
        &f,
        req(
            Method::POST,
            "/api/users",
            "sess-admin",
            Some(json!({"username": "dora", "role": "auditor"})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["username"], "dora");
    assert_eq!(v["role"], "auditor");
    let password = v["password"].as_str().unwrap_or_default().to_owned();
    assert!(password.len() >= 12, "{v}");
    let added = of_type(&f.events, "user.added");
    assert_eq!(
        added.last().map(|e| e["actor"].clone()),
        Some(json!("admin-user"))
    );
    let log = std::fs::read_to_string(f._dir.path().join("events/events.log")).expect("log");
    assert!(
        !log.contains(&password),
        "a generated password reached the event log"
    );
    for (body, want) in [
        (
            json!({"username": "dora", "role": "auditor"}),
            StatusCode::CONFLICT,
        ),
        (
            json!({"username": "eve", "role": "root"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"username": "bad name", "role": "auditor"}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"username": "eve"}), StatusCode::BAD_REQUEST),
        (
            json!({"username": "Dora", "role": "auditor"}),
            StatusCode::CONFLICT,
        ),
    ] {
        let (s, v) = call(
            &f,
            req(Method::POST, "/api/users", "tok-admin", Some(body.clone())),
        )
        .await;
        assert_eq!(s, want, "{body}: {v}");
    }
    // A name equal to an existing one but for letter case: 409, saying so.
    let (s, v) = call(
        &f,
        req(
            Method::POST,
            "/api/users",
            "tok-admin",
            Some(json!({"username": "DORA", "role": "clinician"})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(
        v["error"],
        "user name DORA differs from the existing user dora only in letter case; \
         user names must differ by more than case"
    );
    let (s, v) = call(&f, req(Method::GET, "/api/users", "tok-admin", None)).await;
    assert_eq!(s, StatusCode::OK);
    let text = v.to_string();
    assert!(!text.contains("argon2") && !text.contains("secret") && !text.contains(&password));
    let dora = v
        .as_array()
        .and_then(|l| l.iter().find(|u| u["username"] == "dora"))
        .cloned();
    let dora = dora.expect("dora listed");
    assert_eq!(dora["totp"], false);
    assert_eq!(dora["must_change_password"], true);
    assert_eq!(dora["disabled"], false);
    // disable / enable / unlock answer the user object
    let (s, v) = call(
        &f,
        req(Method::POST, "/api/users/dora/disable", "tok-admin", None),
    )
    .await;
    assert_eq!(
        (s, v["disabled"].clone()),
        (StatusCode::OK, json!(true)),
        "{v}"
    );
    let (s, v) = call(
        &f,
        req(Method::POST, "/api/users/dora/enable", "tok-admin", None),
    )
    .await;
    assert_eq!(
        (s, v["disabled"].clone()),
        (StatusCode::OK, json!(false)),
        "{v}"
    );
    let (s, v) = call(
        &f,
        req(Method::POST, "/api/users/dora/unlock", "tok-admin", None),
    )
    .await;
    assert_eq!(
        (s, v["locked"].clone()),
        (StatusCode::OK, json!(false)),
        "{v}"
    );
    for kind in ["user.disabled", "user.enabled", "user.unlocked"] {
        let e = of_type(&f.events, kind);
        assert_eq!(e.len(), 1, "{kind}");
        assert_eq!(e[0]["actor"], "admin-user");
        assert_eq!(e[0]["username"], "dora");
    }
    // the last enabled admin cannot be disabled; nor can one's own account
    let (s, v) = call(
        &f,
        req(Method::POST, "/api/users/root/disable", "tok-admin", None),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("last enabled admin")),
        "{v}"
    );
    f.accounts
        .add_user("test", "admin-user", Role::Admin, PasswordChoice::Generate)
        .expect("add");
    let (s, v) = call(
        &f,
        req(
            Method::POST,
            "/api/users/admin-user/disable",
            "tok-admin",
            None,
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("own account")),
        "{v}"
    );
    // password reset: a new generated password, to be changed at next login
    let (s, v) = call(
        &f,
        req(Method::POST, "/api/users/dora/password", "tok-admin", None),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let new = v["password"].as_str().unwrap_or_default();
    assert!(new.len() >= 12 && new != password, "{v}");
    let set = of_type(&f.events, "user.password_set");
    assert_eq!(set.len(), 1);
    assert_eq!(set[0]["generated_password"], true);
    let (s, _) = call(
        &f,
        req(
            Method::POST,
            "/api/users/admin-user/password",
            "tok-admin",
            None,
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    for verb in ["disable", "enable", "unlock", "password"] {
        let (s, _) = call(
            &f,
            req(
                Method::POST,
                &format!("/api/users/nobody/{verb}"),
                "tok-admin",
                None,
            ),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{verb}");
    }
}

#[tokio::test]
async fn alerts_show_their_evidence_and_are_acknowledged_once() {
    let f = fixture();
    let store = f.detection.store();
    let finding = Finding {
        rule: Rule::AssociationScan,
        ts: time::OffsetDateTime::now_utc(),
        summary: "10 rejected associations from 10.0.0.9 within 60 s".into(),
        details: serde_json::Map::new(),
        evidence: (0..3)
            .map(|i| {
                json!({"ts": "2026-01-01T00:00:00Z", "type": "association.rejected",
                            "outcome": "refused", "ae": "EVIL", "peer": format!("10.0.0.9:{i}")})
            })
            .collect(),
    };
    let alert = store.insert(&finding).expect("insert");
    let uri = format!("/api/alerts/{}", alert.id);
    let (s, v) = call(&f, req(Method::GET, &uri, "tok-auditor", None)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rule"], "association_scan");
    assert_eq!(v["status"], "open");
    assert_eq!(v["evidence"].as_array().map(Vec::len), Some(3));
    assert_eq!(v["evidence"][2]["peer"], "10.0.0.9:2");
    for (path, want) in [
        ("/api/alerts/999", StatusCode::NOT_FOUND),
        ("/api/alerts/abc", StatusCode::NOT_FOUND),
    ] {
        assert_eq!(
            call(&f, req(Method::GET, path, "tok-admin", None)).await.0,
            want
        );
    }
    // Live detection stores evidence too: ten rejected associations from
    // one address raise association_scan.
    f.events.add_observer(f.detection.clone());
    for i in 0..10 {
        f.events.record(
            "association.rejected",
            Outcome::Refused,
            json!({"calling_ae": "SCAN", "called_ae": "BASTION",
                   "peer": format!("10.0.0.77:{}", 6000 + i), "reason": "unknown_calling_ae"}),
        );
    }
    f.detection.flush();
    let scan = store
        .list(false, 100)
        .expect("list")
        .into_iter()
        .find(|a| a.rule == "association_scan" && a.details["peer"] == "10.0.0.77")
        .expect("scan alert");
    let (_, v) = call(
        &f,
        req(
            Method::GET,
            &format!("/api/alerts/{}", scan.id),
            "tok-admin",
            None,
        ),
    )
    .await;
    let ev = v["evidence"].as_array().cloned().unwrap_or_default();
    assert_eq!(ev.len(), 10, "{v}");
    assert!(ev
        .iter()
        .all(|e| e["ae"] == "SCAN" && e["type"] == "association.rejected"));
    // acknowledge
    let ack = format!("{uri}/ack");
    for (body, want) in [
        (json!({"comment": "  "}), StatusCode::BAD_REQUEST),
        (
            json!({"comment": "x".repeat(1001)}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({}), StatusCode::BAD_REQUEST),
        (
            json!({"comment": "ok", "extra": 1}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (s, v) = call(
            &f,
            req(Method::POST, &ack, "tok-auditor", Some(body.clone())),
        )
        .await;
        assert_eq!(s, want, "{body}: {v}");
    }
    let (s, v) = call(
        &f,
        req(
            Method::POST,
            &ack,
            "tok-auditor",
            Some(json!({"comment": "known pentest"})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "acknowledged");
    assert_eq!(v["ack"]["by"], "auditor-user");
    assert_eq!(v["ack"]["comment"], "known pentest");
    let (s, v) = call(
        &f,
        req(
            Method::POST,
            &ack,
            "tok-admin",
            Some(json!({"comment": "again"})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, _) = call(
        &f,
        req(
            Method::POST,
            "/api/alerts/999/ack",
            "tok-admin",
            Some(json!({"comment": "x"})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let acks = of_type(&f.events, "alert.acknowledged");
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0]["actor"], "auditor-user");
    assert_eq!(acks[0]["alert_id"], alert.id);
    assert_eq!(acks[0]["comment"], "known pentest");
}

#[tokio::test]
async fn alerts_are_acknowledged_in_bulk_by_ids_or_filter() {
    let f = fixture();
    let store = f.detection.store();
    let finding = |rule: Rule, peer: &str| Finding {
        rule,
        ts: time::OffsetDateTime::now_utc(),
        summary: format!("{} from {peer}", rule.name()),
        details: json!({"peer": peer})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        evidence: Vec::new(),
    };
    let a1 = store
        .insert(&finding(Rule::UnknownDevice, "10.0.0.1"))
        .expect("1");
    let a2 = store
        .insert(&finding(Rule::UnknownDevice, "10.0.0.2"))
        .expect("2");
    let a3 = store
        .insert(&finding(Rule::AssociationScan, "10.0.0.3"))
        .expect("3");
    let a4 = store
        .insert(&finding(Rule::SecurityChange, "10.0.0.4"))
        .expect("4");
    let bulk = "/api/alerts/ack";
    // Refusals: no selection, an empty id list, a bad time, no comment; and
    // roles without the audit permission (also in every_route_needs_…).
    for (body, want) in [
        (json!({"comment": "x"}), StatusCode::BAD_REQUEST),
        (
            json!({"comment": "x", "all": false}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"comment": "x", "ids": []}), StatusCode::BAD_REQUEST),
        (
            json!({"comment": "x", "before": "yesterday"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"comment": " ", "all": true}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"all": true}), StatusCode::BAD_REQUEST),
    ] {
        let (s, v) = call(
            &f,
            req(Method::POST, bulk, "tok-auditor", Some(body.clone())),
        )
        .await;
        assert_eq!(s, want, "{body}: {v}");
    }
    for who in ["tok-clinician", "tok-technologist", "tok-researcher"] {
        let (s, _) = call(
            &f,
            req(
                Method::POST,
                bulk,
                who,
                Some(json!({"comment": "x", "all": true})),
            ),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{who}");
    }
    assert_eq!(
        store.list(false, 100).expect("list").len(),
        4,
        "nothing acknowledged yet"
    );
    // By rule.
    let (s, v) = call(
        &f,
        req(
            Method::POST,
            bulk,
            "tok-auditor",
            Some(json!({"comment": "scanner test", "rule": "unknown_device"})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["acknowledged"], json!([a1.id, a2.id]));
    assert_eq!(v["count"], 2);
    // By ids (an already acknowledged one is skipped).
    let (s, v) = call(
        &f,
        req(
            Method::POST,
            bulk,
            "sess-admin",
            Some(json!({"comment": "seen", "ids": [a1.id, a3.id]})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["acknowledged"], json!([a3.id]));
    // Everything before a time in the past: none; then all.
    let (_, v) = call(
        &f,
        req(
            Method::POST,
            bulk,
            "tok-admin",
            Some(json!({"comment": "old", "before": "2000-01-01T00:00:00Z"})),
        ),
    )
    .await;
    assert_eq!(v["count"], 0, "{v}");
    let (_, v) = call(
        &f,
        req(
            Method::POST,
            bulk,
            "tok-admin",
            Some(json!({"comment": "all reviewed", "all": true})),
        ),
    )
    .await;
    assert_eq!(v["acknowledged"], json!([a4.id]), "{v}");
    assert!(store.list(false, 100).expect("list").is_empty());
    let got = store.get(a2.id).expect("get").expect("a2");
    let ack = got.ack.expect("acknowledged");
    assert_eq!(
        (ack.by.as_str(), ack.comment.as_str()),
        ("auditor-user", "scanner test")
    );
    let acks = of_type(&f.events, "alert.acknowledged");
    assert_eq!(acks.len(), 4);
    assert_eq!(acks[0]["actor"], "auditor-user");
    assert_eq!(acks[0]["alert_ids"], json!([a1.id, a2.id]));
    assert_eq!(acks[0]["count"], 2);
    assert_eq!(acks[1]["actor"], "admin-user");
}

#[tokio::test]
async fn posture_names_each_risk() {
    let f = fixture();
    let plain =
        json!({"ae": "OLDCT", "network": "0.0.0.0/0", "transport": "plain", "allow": ["store"]});
    assert_eq!(
        call(
            &f,
            req(Method::POST, "/api/devices", "tok-admin", Some(plain))
        )
        .await
        .0,
        StatusCode::CREATED
    );
    let (s, v) = call(&f, req(Method::GET, "/api/posture", "tok-admin", None)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["listeners"],
        json!([
            {"name": "dicom-tls", "address": "127.0.0.1:2762", "exposure": "loopback", "tls": true},
            {"name": "dicom-plain", "address": "0.0.0.0:104", "exposure": "all interfaces", "tls": false},
            {"name": "https", "address": "10.1.2.3:8443", "exposure": "private network", "tls": true},
        ])
    );
    assert_eq!(v["plaintext_devices"], json!(["OLDCT"]));
    assert_eq!(v["admins_without_totp"], json!(["root"]));
    assert_eq!(v["admin_requires_totp"], true);
    assert_eq!(v["open_alerts"], 0);
    let days = v["server_certificate"]["days_left"]
        .as_i64()
        .unwrap_or_default();
    assert!((800..=825).contains(&days), "{v}");
    assert!(v["ca_certificate"]["subject"]
        .as_str()
        .is_some_and(|s| s.contains("CN=")));
    assert!(v["ca_certificate"]["not_after"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z')));
    let warnings: Vec<String> = serde_json::from_value(v["warnings"].clone()).unwrap_or_default();
    for needle in [
        "dicom-plain listener on 0.0.0.0:104",
        "device OLDCT uses the plain transport",
        "device OLDCT may connect from any address",
        "admin account root",
    ] {
        assert!(
            warnings.iter().any(|w| w.contains(needle)),
            "{needle}: {warnings:?}"
        );
    }
    assert_eq!(warnings.len(), 4, "{warnings:?}");
    // An enrolled second factor and an open alert change the picture.
    f.accounts.enable_totp("test", "root").expect("totp");
    f.detection
        .store()
        .insert(&Finding {
            rule: Rule::SecurityChange,
            ts: time::OffsetDateTime::now_utc(),
            summary: "x".into(),
            details: serde_json::Map::new(),
            evidence: vec![],
        })
        .expect("alert");
    let (_, v) = call(&f, req(Method::GET, "/api/posture", "tok-admin", None)).await;
    assert_eq!(v["admins_without_totp"], json!([]));
    assert_eq!(v["open_alerts"], 1);
    assert_eq!(
        v["open_alerts_by_severity"],
        json!({"high": 0, "medium": 0, "low": 1})
    );
    // A low-severity alert (an administrator's own change) is no warning.
    let warnings: Vec<String> = serde_json::from_value(v["warnings"].clone()).unwrap_or_default();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(
        !warnings.iter().any(|w| w.contains("alert")),
        "{warnings:?}"
    );
    // High and medium ones are, counted together.
    for rule in [
        Rule::LoginBruteForce,
        Rule::DeviceChanged,
        Rule::UnknownDevice,
    ] {
        f.detection
            .store()
            .insert(&Finding {
                rule,
                ts: time::OffsetDateTime::now_utc(),
                summary: "x".into(),
                details: serde_json::Map::new(),
                evidence: vec![],
            })
            .expect("alert");
    }
    let (_, v) = call(&f, req(Method::GET, "/api/posture", "tok-admin", None)).await;
    assert_eq!(v["open_alerts"], 4);
    assert_eq!(
        v["open_alerts_by_severity"],
        json!({"high": 1, "medium": 2, "low": 1})
    );
    let warnings: Vec<String> = serde_json::from_value(v["warnings"].clone()).unwrap_or_default();
    assert!(
        warnings.contains(&"3 open high/medium-severity alerts to review".to_owned()),
        "{warnings:?}"
    );
    assert_eq!(warnings.len(), 4, "{warnings:?}");
}

#[tokio::test]
async fn posture_lists_keys_inside_the_data_directory() {
    let line =
        "the master key (/d/secrets/master.key) is inside the data directory: keep keys outside it";
    let f = fixture_with_keys(Vec::new(), vec![line.to_owned()]);
    let (s, v) = call(&f, req(Method::GET, "/api/posture", "tok-admin", None)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let warnings: Vec<String> = serde_json::from_value(v["warnings"].clone()).unwrap_or_default();
    assert!(warnings.contains(&line.to_owned()), "{warnings:?}");
    // Without such lines, no key warning (the other fixtures).
    let f = fixture_with(Vec::new());
    let (_, v) = call(&f, req(Method::GET, "/api/posture", "tok-admin", None)).await;
    let warnings: Vec<String> = serde_json::from_value(v["warnings"].clone()).unwrap_or_default();
    assert!(
        !warnings.iter().any(|w| w.contains("data directory")),
        "{warnings:?}"
    );
}

#[tokio::test]
async fn posture_warns_of_plain_devices_without_a_plain_listener() {
    let f = fixture_with(vec![ListenerInfo {
        name: "dicom-tls".into(),
        address: SocketAddr::from(([127, 0, 0, 1], 2762)),
        tls: true,
    }]);
    let (_, v) = call(&f, req(Method::GET, "/api/posture", "tok-admin", None)).await;
    let warnings: Vec<String> = serde_json::from_value(v["warnings"].clone()).unwrap_or_default();
    assert!(
        !warnings.iter().any(|w| w.contains("no plain listener")),
        "{warnings:?}"
    );
    for ae in ["OLDCT", "OLDMR"] {
        let plain =
            json!({"ae": ae, "network": "10.0.0.0/24", "transport": "plain", "allow": ["store"]});
        let (s, _) = call(
            &f,
            req(Method::POST, "/api/devices", "tok-admin", Some(plain)),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let (_, v) = call(&f, req(Method::GET, "/api/posture", "tok-admin", None)).await;
    let warnings: Vec<String> = serde_json::from_value(v["warnings"].clone()).unwrap_or_default();
    let missing: Vec<&String> = warnings
        .iter()
        .filter(|w| w.contains("no plain listener"))
        .collect();
    assert_eq!(
        missing,
        [
            &"devices OLDCT, OLDMR use the plain transport but cannot connect: no plain \
           listener (start serve with --dicom-plain-addr, or register them with transport tls)"
                .to_owned()
        ],
        "{warnings:?}"
    );
}

#[tokio::test]
async fn me_gives_the_session_idle_timeout() {
    let f = fixture();
    for auth in ["sess-admin", "tok-clinician"] {
        let (s, v) = call(&f, req(Method::GET, "/api/me", auth, None)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["session_idle_secs"], 900, "{auth}: {v}");
    }
    let (_, v) = call(&f, req(Method::GET, "/api/me", "sess-admin", None)).await;
    assert_eq!(v["username"], "admin-user");
    assert_eq!(v["method"], "session");
}
