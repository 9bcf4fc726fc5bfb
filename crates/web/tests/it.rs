//! The HTTPS front end through its public API: the router with
//! `tower::ServiceExt::oneshot` (no socket) on a real archive in a temporary
//! directory and a fake account service, and the TLS listener on loopback
//! for what only a socket shows (no plaintext, header and body timeouts).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{header, Method, Request, Response, StatusCode},
};
use bastion_archive::{Archive, Limits};
use bastion_index::Index;
use bastion_model::{Role, WebPermission};
use bastion_security::events::EventLog;
use bastion_store::{BlobStore, MasterKey};
use bastion_web::{
    accounts::{
        AccountService, Identity, LoginAttempt, LoginResult, PasswordChangeRequest,
        PasswordChangeResult, SessionView,
    },
    AppState, WebConfig,
};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{meta::FileMetaTableBuilder, InMemDicomObject};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

const STUDY: &str = "1.2.826.0.1.3680043.8.498.1";
const SERIES: &str = "1.2.826.0.1.3680043.8.498.2";
const SOP: &str = "1.2.826.0.1.3680043.8.498.3";
const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

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
    fn login(&self, a: &LoginAttempt) -> LoginResult {
        match (a.username.as_str(), a.password.as_str()) {
            ("alice", "right password") => LoginResult::Success {
                session_id: "sess-1".into(),
                csrf: "csrf-1".into(),
                identity: identity(Role::Technologist),
                max_age: Duration::from_secs(3600),
            },
            ("throttled", _) => LoginResult::Throttled {
                retry_after: Duration::from_millis(6500),
            },
            _ => LoginResult::Failed,
        }
    }
    fn session(&self, id: &str) -> Option<SessionView> {
        (id == "sess-1").then(|| SessionView {
            identity: identity(Role::Technologist),
            csrf: "csrf-1".into(),
        })
    }
    fn verify_token(&self, token: &str) -> Option<Identity> {
        let role = token.strip_prefix("tok-")?;
        Role::parse(role).ok().map(identity)
    }
    fn logout(&self, _id: &str) {}
    fn change_password(&self, r: &PasswordChangeRequest) -> PasswordChangeResult {
        if r.new_password.len() < 12 {
            PasswordChangeResult::Rejected("password refused: too short".into())
        } else {
            PasswordChangeResult::Failed
        }
    }
}

fn archive_with(dir: &Path, limits: Limits) -> Arc<Archive> {
    let master = MasterKey::from_bytes([7u8; 32]);
    let store = BlobStore::open(&dir.join("blobs"), master.clone()).expect("store");
    let index =
        Index::open(&dir.join("index.db"), &master.derive("bastion index v1")).expect("index");
    let events = EventLog::open(&dir.join("events/events.log")).expect("events");
    Arc::new(Archive::new(
        Arc::new(store),
        Arc::new(index),
        Arc::new(events),
        limits,
    ))
}

struct Fixture {
    _dir: tempfile::TempDir,
    archive: Arc<Archive>,
    app: axum::Router,
}

fn fixture(config: WebConfig) -> Fixture {
    fixture_with(config, Limits::default())
}

fn fixture_with(config: WebConfig, limits: Limits) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = archive_with(dir.path(), limits);
    let state = AppState::new(archive.clone(), Arc::new(FakeAccounts), config);
    Fixture {
        _dir: dir,
        archive,
        app: bastion_web::router(state),
    }
}

/// A small CT instance as a Part 10 file.
fn part10(study: &str, sop: &str) -> Vec<u8> {
    let mut obj = InMemDicomObject::new_empty();
    let put = |o: &mut InMemDicomObject, tag, vr, v: &str| {
        o.put(DataElement::new(tag, vr, PrimitiveValue::from(v)))
    };
    put(&mut obj, tags::SOP_CLASS_UID, VR::UI, CT);
    put(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, sop);
    put(&mut obj, tags::PATIENT_NAME, VR::PN, "Webtest^Patient");
    put(&mut obj, tags::PATIENT_ID, VR::LO, "WEB-1");
    put(&mut obj, tags::STUDY_INSTANCE_UID, VR::UI, study);
    put(&mut obj, tags::SERIES_INSTANCE_UID, VR::UI, SERIES);
    put(&mut obj, tags::MODALITY, VR::CS, "CT");
    let mut dataset = Vec::new();
    obj.write_dataset_with_ts(
        &mut dataset,
        &dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
    )
    .expect("encode");
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(CT)
        .media_storage_sop_instance_uid(sop)
        .transfer_syntax("1.2.840.10008.1.2.1")
        .build()
        .expect("meta");
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    meta.write(&mut out).expect("meta");
    out.extend_from_slice(&dataset);
    out
}

/// [`part10`] with `extra` more bytes (an Encapsulated Document OB value).
fn part10_sized(study: &str, sop: &str, extra: usize) -> Vec<u8> {
    let mut out = part10(study, sop);
    // (0042,0011) OB, explicit VR LE: tag, "OB", reserved, 4-byte length.
    out.extend_from_slice(&[0x42, 0x00, 0x11, 0x00, b'O', b'B', 0, 0]);
    out.extend_from_slice(&u32::try_from(extra).expect("fits").to_le_bytes());
    out.extend(std::iter::repeat_n(0x5Au8, extra));
    out
}

fn stow_body(parts: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    for p in parts {
        body.extend_from_slice(b"--BOUNDARY\r\nContent-Type: application/dicom\r\n\r\n");
        body.extend_from_slice(p);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--BOUNDARY--\r\n");
    body
}

fn request(method: Method, uri: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "pacs.test:8443")
        .extension(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))))
}

async fn send(app: &axum::Router, req: Request<Body>) -> (Response<Body>, Vec<u8>) {
    let r = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = r.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes().to_vec();
    (Response::from_parts(parts, Body::empty()), bytes)
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null)
}

fn assert_security_headers(r: &Response<Body>) {
    let h = r.headers();
    assert_eq!(h["strict-transport-security"], "max-age=31536000");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["cache-control"], "no-store");
    let csp = h["content-security-policy"].to_str().unwrap_or_default();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-"), "{csp}");
}

const ROUTES: &[(&str, &str)] = &[
    ("GET", "/dicomweb/studies"),
    ("POST", "/dicomweb/studies"),
    ("GET", "/dicomweb/series"),
    ("GET", "/dicomweb/instances"),
    ("GET", "/dicomweb/studies/1.2.3"),
    ("POST", "/dicomweb/studies/1.2.3"),
    ("GET", "/dicomweb/studies/1.2.3/metadata"),
    ("GET", "/dicomweb/studies/1.2.3/series"),
    ("GET", "/dicomweb/studies/1.2.3/instances"),
    ("GET", "/dicomweb/studies/1.2.3/series/1.2.4"),
    ("GET", "/dicomweb/studies/1.2.3/series/1.2.4/metadata"),
    ("GET", "/dicomweb/studies/1.2.3/series/1.2.4/instances"),
    (
        "GET",
        "/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5",
    ),
    (
        "GET",
        "/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5/metadata",
    ),
    (
        "GET",
        "/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5/frames/1",
    ),
    (
        "GET",
        "/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5/rendered",
    ),
    (
        "GET",
        "/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5/thumbnail",
    ),
    (
        "GET",
        "/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5/bulk/7FE00010",
    ),
    ("GET", "/api/me"),
    ("POST", "/api/logout"),
    ("GET", "/api/events"),
    ("GET", "/no/such/route"),
];

#[tokio::test]
async fn every_route_needs_credentials_and_errors_carry_the_security_headers() {
    let f = fixture(WebConfig::default());
    for (method, path) in ROUTES {
        let req = request(method.parse().expect("method"), path)
            .body(Body::empty())
            .expect("request");
        let (r, body) = send(&f.app, req).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"bastion\"");
        assert_security_headers(&r);
        assert_eq!(json(&body)["status"], 401, "{method} {path}");
        // An unknown token or cookie is no better.
        let req = request(method.parse().expect("method"), path)
            .header(header::AUTHORIZATION, "Bearer nonsense")
            .body(Body::empty())
            .expect("request");
        assert_eq!(send(&f.app, req).await.0.status(), StatusCode::UNAUTHORIZED);
        let req = request(method.parse().expect("method"), path)
            .header(header::COOKIE, "bastion_session=forged")
            .body(Body::empty())
            .expect("request");
        assert_eq!(send(&f.app, req).await.0.status(), StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn a_token_in_the_query_string_is_refused() {
    let f = fixture(WebConfig::default());
    for q in [
        "access_token=tok-admin",
        "token=tok-admin",
        "limit=1&access_token=x",
    ] {
        let req = request(Method::GET, &format!("/dicomweb/studies?{q}"))
            .body(Body::empty())
            .expect("request");
        let (r, _) = send(&f.app, req).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{q}");
        assert_security_headers(&r);
    }
}

#[tokio::test]
async fn roles_are_enforced() {
    let f = fixture(WebConfig::default());
    let cases = [
        ("clinician", "GET", "/dicomweb/studies", StatusCode::OK),
        (
            "clinician",
            "POST",
            "/dicomweb/studies",
            StatusCode::FORBIDDEN,
        ),
        ("clinician", "GET", "/api/events", StatusCode::FORBIDDEN),
        ("auditor", "GET", "/dicomweb/studies", StatusCode::FORBIDDEN),
        (
            "auditor",
            "GET",
            "/dicomweb/studies/1.2.3",
            StatusCode::FORBIDDEN,
        ),
        ("auditor", "GET", "/api/events", StatusCode::OK),
        (
            "researcher",
            "GET",
            "/dicomweb/studies",
            StatusCode::FORBIDDEN,
        ),
        (
            "researcher",
            "GET",
            "/dicomweb/studies/1.2.3/metadata",
            StatusCode::FORBIDDEN,
        ),
        (
            "researcher",
            "POST",
            "/dicomweb/studies",
            StatusCode::FORBIDDEN,
        ),
        ("researcher", "GET", "/api/events", StatusCode::FORBIDDEN),
        (
            "technologist",
            "GET",
            "/dicomweb/studies/1.2.3",
            StatusCode::NOT_FOUND,
        ),
    ];
    for (role, method, path, want) in cases {
        let req = request(method.parse().expect("method"), path)
            .header(header::AUTHORIZATION, format!("Bearer tok-{role}"))
            .header(
                header::CONTENT_TYPE,
                "multipart/related; type=\"application/dicom\"; boundary=B",
            )
            .body(Body::from("--B--\r\n"))
            .expect("request");
        let (r, body) = send(&f.app, req).await;
        assert_eq!(
            r.status(),
            want,
            "{role} {method} {path}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_security_headers(&r);
    }
    // The refusals were recorded with the user.
    let events = f.archive.events().read_all().expect("events");
    assert!(events.iter().any(|e| e["type"] == "http.request"
        && e["user"] == "researcher-user"
        && e["status"] == 403));
}

#[tokio::test]
async fn login_sets_a_strict_cookie_and_fails_alike() {
    let f = fixture(WebConfig::default());
    let login = |body: &str, origin: Option<&str>| {
        let mut b =
            request(Method::POST, "/api/login").header(header::CONTENT_TYPE, "application/json");
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        b.body(Body::from(body.to_owned())).expect("request")
    };
    let (r, body) = send(
        &f.app,
        login(r#"{"username":"alice","password":"right password"}"#, None),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = r.headers()["set-cookie"].to_str().expect("ascii");
    for flag in [
        "bastion_session=sess-1",
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/",
        "Max-Age=3600",
    ] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    let j = json(&body);
    assert_eq!(j["csrf"], "csrf-1");
    assert_eq!(j["role"], "technologist");
    assert_eq!(j["must_change_password"], false);
    // Same origin (https + Host) is fine, another origin is not.
    let ok = login(
        r#"{"username":"alice","password":"right password"}"#,
        Some("https://pacs.test:8443"),
    );
    assert_eq!(send(&f.app, ok).await.0.status(), StatusCode::OK);
    let evil = login(
        r#"{"username":"alice","password":"right password"}"#,
        Some("https://evil.example"),
    );
    assert_eq!(send(&f.app, evil).await.0.status(), StatusCode::FORBIDDEN);
    // Unknown user and wrong password: the same answer.
    let (a, ab) = send(
        &f.app,
        login(r#"{"username":"alice","password":"wrong"}"#, None),
    )
    .await;
    let (b, bb) = send(
        &f.app,
        login(r#"{"username":"nobody","password":"wrong"}"#, None),
    )
    .await;
    assert_eq!(a.status(), StatusCode::UNAUTHORIZED);
    assert_eq!((a.status(), ab), (b.status(), bb));
    // Throttled: 429 with Retry-After in whole seconds, rounded up.
    let (t, _) = send(
        &f.app,
        login(r#"{"username":"throttled","password":"x"}"#, None),
    )
    .await;
    assert_eq!(t.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(t.headers()["retry-after"], "7");
    // Malformed and oversized bodies.
    assert_eq!(
        send(&f.app, login("{", None)).await.0.status(),
        StatusCode::BAD_REQUEST
    );
    let big = format!(r#"{{"username":"{}","password":"x"}}"#, "a".repeat(100_000));
    assert_eq!(
        send(&f.app, login(&big, None)).await.0.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
}

#[tokio::test]
async fn cookie_requests_that_change_state_need_the_csrf_token() {
    let f = fixture(WebConfig::default());
    let logout = |csrf: Option<&str>| {
        let mut b =
            request(Method::POST, "/api/logout").header(header::COOKIE, "bastion_session=sess-1");
        if let Some(c) = csrf {
            b = b.header("x-csrf-token", c);
        }
        b.body(Body::empty()).expect("request")
    };
    assert_eq!(
        send(&f.app, logout(None)).await.0.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(&f.app, logout(Some("csrf-2"))).await.0.status(),
        StatusCode::FORBIDDEN
    );
    let (r, _) = send(&f.app, logout(Some("csrf-1"))).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap_or_default()
        .contains("Max-Age=0"));
    // GET needs no CSRF token; a bearer token never does.
    let me = request(Method::GET, "/api/me")
        .header(header::COOKIE, "bastion_session=sess-1")
        .body(Body::empty())
        .expect("request");
    let (r, body) = send(&f.app, me).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(json(&body)["method"], "session");
    let stow = request(Method::POST, "/dicomweb/studies")
        .header(header::COOKIE, "bastion_session=sess-1")
        .header(
            header::CONTENT_TYPE,
            "multipart/related; type=\"application/dicom\"; boundary=BOUNDARY",
        )
        .body(Body::from(stow_body(&[&part10(STUDY, SOP)])))
        .expect("request");
    assert_eq!(send(&f.app, stow).await.0.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn oversized_and_encoded_bodies_are_refused_before_reading() {
    let f = fixture(WebConfig {
        max_upload_bytes: 1 << 20,
        ..WebConfig::default()
    });
    let req = request(Method::POST, "/dicomweb/studies")
        .header(header::AUTHORIZATION, "Bearer tok-admin")
        .header(
            header::CONTENT_TYPE,
            "multipart/related; type=\"application/dicom\"; boundary=B",
        )
        .header(header::CONTENT_LENGTH, "4294967295")
        .body(Body::empty())
        .expect("request");
    let (r, body) = send(&f.app, req).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json(&body)["status"], 413);
    assert_security_headers(&r);
    // Unauthenticated too: the limit comes first.
    let req = request(Method::POST, "/dicomweb/studies")
        .header(header::CONTENT_LENGTH, "4294967295")
        .body(Body::empty())
        .expect("request");
    assert_eq!(
        send(&f.app, req).await.0.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // A chunked body over the limit (no Content-Length): one part that
    // never ends.
    let head = bytes::Bytes::from_static(b"--B\r\nContent-Type: application/dicom\r\n\r\n");
    let chunks = futures_util::stream::iter(
        std::iter::once(head)
            .chain((0..40).map(|_| bytes::Bytes::from(vec![b'x'; 64 << 10])))
            .map(Ok::<_, std::io::Error>),
    );
    let req = request(Method::POST, "/dicomweb/studies")
        .header(header::AUTHORIZATION, "Bearer tok-admin")
        .header(
            header::CONTENT_TYPE,
            "multipart/related; type=\"application/dicom\"; boundary=B",
        )
        .body(Body::from_stream(chunks))
        .expect("request");
    assert_eq!(
        send(&f.app, req).await.0.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let req = request(Method::POST, "/dicomweb/studies")
        .header(header::AUTHORIZATION, "Bearer tok-admin")
        .header(header::CONTENT_ENCODING, "gzip")
        .header(
            header::CONTENT_TYPE,
            "multipart/related; type=\"application/dicom\"; boundary=B",
        )
        .body(Body::from(vec![0x1f, 0x8b, 8, 0]))
        .expect("request");
    assert_eq!(
        send(&f.app, req).await.0.status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
}

#[tokio::test]
async fn cors_is_off_by_default_and_echoes_only_listed_origins() {
    let off = fixture(WebConfig::default());
    let req = request(Method::GET, "/dicomweb/studies")
        .header(header::ORIGIN, "http://localhost:3000")
        .body(Body::empty())
        .expect("request");
    let (r, _) = send(&off.app, req).await;
    assert!(r.headers().get("access-control-allow-origin").is_none());

    let on = fixture(WebConfig {
        cors_origins: vec!["http://localhost:3000".into()],
        ..WebConfig::default()
    });
    let preflight = request(
        Method::OPTIONS,
        "/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5/frames/1",
    )
    .header(header::ORIGIN, "http://localhost:3000")
    .header("access-control-request-method", "GET")
    .header("access-control-request-headers", "accept, authorization")
    .body(Body::empty())
    .expect("request");
    let (r, _) = send(&on.app, preflight).await;
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    let allowed = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    for h in ["accept", "authorization", "content-type", "x-csrf-token"] {
        assert!(allowed.contains(h), "{allowed}");
    }
    assert_security_headers(&r);
    // Error responses carry the CORS headers too.
    let req = request(Method::GET, "/dicomweb/studies/1.2.3")
        .header(header::ORIGIN, "http://localhost:3000")
        .header(header::AUTHORIZATION, "Bearer tok-clinician")
        .body(Body::empty())
        .expect("request");
    let (r, _) = send(&on.app, req).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let req = request(Method::GET, "/dicomweb/studies")
        .header(header::ORIGIN, "https://evil.example")
        .body(Body::empty())
        .expect("request");
    let (r, _) = send(&on.app, req).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn stow_qido_wado_round_trip() {
    let f = fixture(WebConfig::default());
    let file = part10(STUDY, SOP);
    let other = part10(
        "1.2.826.0.1.3680043.8.498.99",
        "1.2.826.0.1.3680043.8.498.100",
    );
    let stow = |uri: &str, body: Vec<u8>| {
        request(Method::POST, uri)
            .header(header::AUTHORIZATION, "Bearer tok-technologist")
            .header(
                header::CONTENT_TYPE,
                "multipart/related; type=\"application/dicom\"; boundary=BOUNDARY",
            )
            .body(Body::from(body))
            .expect("request")
    };
    // Into the study of the path: the other study's instance fails (0xA900).
    let (r, body) = send(
        &f.app,
        stow(
            &format!("/dicomweb/studies/{STUDY}"),
            stow_body(&[&file, &other]),
        ),
    )
    .await;
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let j = json(&body);
    assert_eq!(j["00081199"]["Value"][0]["00081155"]["Value"][0], SOP);
    assert_eq!(j["00081198"]["Value"][0]["00081197"]["Value"][0], 0xA900);
    // All failed: 409.
    let (r, body) = send(
        &f.app,
        stow("/dicomweb/studies", stow_body(&[b"not dicom"])),
    )
    .await;
    assert_eq!(
        r.status(),
        StatusCode::CONFLICT,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        json(&body)["00081198"]["Value"][0]["00081197"]["Value"][0],
        0xC000,
        "{}",
        String::from_utf8_lossy(&body)
    );
    // Not multipart/related: 415.
    let req = request(Method::POST, "/dicomweb/studies")
        .header(header::AUTHORIZATION, "Bearer tok-technologist")
        .header(header::CONTENT_TYPE, "application/dicom")
        .body(Body::from(file.clone()))
        .expect("request");
    assert_eq!(
        send(&f.app, req).await.0.status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );

    let get = |uri: &str, accept: Option<&str>| {
        let mut b = request(Method::GET, uri).header(header::AUTHORIZATION, "Bearer tok-clinician");
        if let Some(a) = accept {
            b = b.header(header::ACCEPT, a);
        }
        b.body(Body::empty()).expect("request")
    };
    // QIDO.
    let (r, body) = send(&f.app, get("/dicomweb/studies?PatientID=WEB-1", None)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/dicom+json");
    let j = json(&body);
    assert_eq!(j[0]["0020000D"]["Value"][0], STUDY);
    assert_eq!(
        j[0]["00081190"]["Value"][0],
        format!("https://pacs.test:8443/dicomweb/studies/{STUDY}")
    );
    let (r, body) = send(&f.app, get("/dicomweb/studies?PatientID=nobody", None)).await;
    assert_eq!((r.status(), body.as_slice()), (StatusCode::OK, &b"[]"[..]));
    let (r, _) = send(&f.app, get("/dicomweb/studies?NoSuchKeyword=1", None)).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let (r, body) = send(
        &f.app,
        get(
            &format!("/dicomweb/studies/{STUDY}/series/{SERIES}/instances?limit=1&offset=0"),
            None,
        ),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(json(&body)[0]["00080018"]["Value"][0], SOP);
    // WADO: the stored bytes with transfer-syntax=*.
    let (r, body) = send(
        &f.app,
        get(
            &format!("/dicomweb/studies/{STUDY}"),
            Some("multipart/related; type=\"application/dicom\"; transfer-syntax=*"),
        ),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        ct.starts_with("multipart/related; type=\"application/dicom\""),
        "{ct}"
    );
    let parts = bastion_dicomweb::parse_multipart_related(&ct, &body, &Default::default())
        .expect("multipart");
    assert_eq!(parts.len(), 1);
    let stored = f
        .archive
        .instance_part10(&bastion_model::Uid::parse(SOP).expect("uid"))
        .expect("stored");
    assert_eq!(parts[0].body, stored.as_slice());
    // An explicit transfer syntax that cannot be produced: 406.
    let (r, _) = send(
        &f.app,
        get(&format!("/dicomweb/studies/{STUDY}"), Some("multipart/related; type=\"application/dicom\"; transfer-syntax=1.2.840.10008.1.2.4.91")),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_ACCEPTABLE);
    let (r, _) = send(
        &f.app,
        get(
            &format!("/dicomweb/studies/{STUDY}"),
            Some("application/zip"),
        ),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_ACCEPTABLE);
    // Metadata.
    let (r, body) = send(
        &f.app,
        get(
            &format!("/dicomweb/studies/{STUDY}/series/{SERIES}/metadata"),
            None,
        ),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        json(&body)[0]["00100010"]["Value"][0]["Alphabetic"],
        "Webtest^Patient"
    );
    // The retrieval was recorded with the study, the event has no name.
    let events = f.archive.events().read_all().expect("events");
    let wado = events
        .iter()
        .find(|e| e["type"] == "http.request" && e["action"] == "wado.study" && e["status"] == 200)
        .expect("wado event");
    assert_eq!(wado["user"], "clinician-user");
    assert_eq!(wado["study_uids"][0], STUDY);
    assert_eq!(wado["peer"], "127.0.0.1:40000");
    let all = serde_json::to_string(&events).expect("json");
    assert!(!all.contains("Webtest"), "patient name in the event log");
    assert!(!all.contains("WEB-1"), "patient ID in the event log");
}

// ------------------------------------------------------------ real sockets

struct Live {
    addr: SocketAddr,
    ca: rustls::pki_types::CertificateDer<'static>,
    _stop: tokio::sync::watch::Sender<bool>,
    _f: Fixture,
}

async fn live(config: WebConfig, header_timeout: Duration) -> Live {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = fixture(config);
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("cert");
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let tls = bastion_web::server::tls_config(vec![der.clone()], key).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let limits = bastion_web::server::ConnectionLimits {
        header_timeout,
        ..Default::default()
    };
    tokio::spawn(bastion_web::server::serve(
        listener,
        tls,
        f.app.clone(),
        limits,
        rx,
    ));
    Live {
        addr,
        ca: der,
        _stop: tx,
        _f: f,
    }
}

async fn tls_connect(l: &Live) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(l.ca.clone()).expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(l.addr)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into());
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("handshake")
}

/// Reads until the peer closes or `limit` passes; returns what arrived.
async fn read_all(s: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_gets_only_an_https_hint_and_tls_works() {
    let l = live(WebConfig::default(), Duration::from_secs(5)).await;
    let mut plain = tokio::net::TcpStream::connect(l.addr)
        .await
        .expect("connect");
    plain
        .write_all(b"GET /dicomweb/studies HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let answer = read_all(&mut plain, Duration::from_secs(5)).await;
    // One fixed 400 with a text hint, then the connection closes: nothing
    // routed (no 401 of the API, no cookie).
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "plaintext HTTP answer: {answer:?}"
    );
    assert!(answer.ends_with("\r\n\r\nThis port speaks HTTPS: use https://x/\n"));
    assert!(!answer.to_ascii_lowercase().contains("set-cookie"));
    assert!(!answer.contains("401"));
    let mut s = tls_connect(&l).await;
    s.write_all(b"GET /dicomweb/studies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let answer = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_bodies_are_cut_off_and_the_server_stays_up() {
    let l = live(
        WebConfig {
            body_timeout: Duration::from_secs(1),
            max_upload_bytes: 1 << 20,
            ..WebConfig::default()
        },
        Duration::from_secs(1),
    )
    .await;
    // Slowloris: headers never finish; the connection is closed.
    let mut s = tls_connect(&l).await;
    s.write_all(b"GET /dicomweb/studies HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let _ = read_all(&mut s, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "slow headers kept the connection open"
    );
    // A declared 4 GiB body that never comes: 413 at once.
    let mut s = tls_connect(&l).await;
    s.write_all(b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-admin\r\nContent-Type: multipart/related; type=\"application/dicom\"; boundary=B\r\nContent-Length: 4294967295\r\n\r\n").await.expect("write");
    let answer = read_all(&mut s, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // A body that stalls: 408 at the body timeout.
    let mut s = tls_connect(&l).await;
    s.write_all(b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-admin\r\nContent-Type: multipart/related; type=\"application/dicom\"; boundary=B\r\nContent-Length: 1000\r\n\r\n--B\r\n").await.expect("write");
    let answer = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // An endless chunked body: 413 once over the limit.
    let mut s = tls_connect(&l).await;
    s.write_all(b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-admin\r\nContent-Type: multipart/related; type=\"application/dicom\"; boundary=B\r\nTransfer-Encoding: chunked\r\n\r\n").await.expect("write");
    // One part that never ends.
    let head = b"--B\r\nContent-Type: application/dicom\r\n\r\n";
    s.write_all(format!("{:x}\r\n", head.len()).as_bytes())
        .await
        .expect("write");
    s.write_all(head).await.expect("write");
    s.write_all(b"\r\n").await.expect("write");
    let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, "x".repeat(64 << 10));
    for _ in 0..40 {
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let answer = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Still up.
    let mut s = tls_connect(&l).await;
    s.write_all(b"GET /api/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-clinician\r\nConnection: close\r\n\r\n").await.expect("write");
    let answer = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn the_ui_assets_are_anonymous_typed_and_hardened() {
    let f = fixture(WebConfig::default());
    for (path, ty) in [
        ("/", "text/html; charset=utf-8"),
        ("/app.css", "text/css; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/favicon.svg", "image/svg+xml"),
    ] {
        let req = request(Method::GET, path)
            .body(Body::empty())
            .expect("request");
        let (r, body) = send(&f.app, req).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(r.headers()[header::CONTENT_TYPE], ty, "{path}");
        assert_security_headers(&r);
        assert!(!body.is_empty(), "{path}");
        // Only GET of the exact path is anonymous.
        let req = request(Method::POST, path)
            .body(Body::empty())
            .expect("request");
        assert_eq!(send(&f.app, req).await.0.status(), StatusCode::UNAUTHORIZED);
    }
    for path in ["/index.html", "/app.js.map", "/assets/app.js"] {
        let req = request(Method::GET, path)
            .body(Body::empty())
            .expect("request");
        assert_eq!(
            send(&f.app, req).await.0.status(),
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
}

/// A Part 10 file in Deflated Explicit VR Little Endian (PS3.5 Annex A.5)
/// whose dataset inflates to `zeros` bytes of Pixel Data: a deflate bomb.
fn deflate_bomb(sop: &str, zeros: u32) -> Vec<u8> {
    use std::io::Write;
    let plain = part10(STUDY, sop);
    let meta_end = 132 + {
        // (0002,0000) File Meta Information Group Length: its value + 12.
        let v = &plain[140..144];
        12 + u32::from_le_bytes([v[0], v[1], v[2], v[3]]) as usize
    };
    let mut ds = plain[meta_end..].to_vec();
    ds.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
    ds.extend_from_slice(&zeros.to_le_bytes());
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&ds).expect("deflate");
    z.write_all(&vec![0u8; zeros as usize]).expect("deflate");
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(CT)
        .media_storage_sop_instance_uid(sop)
        .transfer_syntax("1.2.840.10008.1.2.1.99")
        .build()
        .expect("meta");
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    meta.write(&mut out).expect("meta");
    out.extend_from_slice(&z.finish().expect("deflate"));
    out
}

fn stow_request(body: Body, length: Option<usize>) -> Request<Body> {
    let mut b = request(Method::POST, "/dicomweb/studies")
        .header(header::AUTHORIZATION, "Bearer tok-technologist")
        .header(
            header::CONTENT_TYPE,
            "multipart/related; type=\"application/dicom\"; boundary=BOUNDARY",
        );
    if let Some(n) = length {
        b = b.header(header::CONTENT_LENGTH, n.to_string());
    }
    b.body(body).expect("request")
}

/// STOW-RS under the memory budget (issue 10): a body over one request's
/// share, declared or streamed, is stored one part at a time, one instance
/// over the share fails alone with 0xA700 (413 stays for
/// `max_upload_bytes`); while the global budget is in use a request is 503
/// with Retry-After and succeeds once it is free; a deflate bomb among the
/// instances is one FailedSOPSequence item with FailureReason 0xA700 (202),
/// the other instance stored, nothing left reserved.
#[tokio::test]
async fn stow_bodies_and_bombs_stay_within_the_memory_budget() {
    let f = fixture_with(
        WebConfig {
            max_upload_bytes: 64 << 20,
            ..WebConfig::default()
        },
        Limits {
            memory_budget_bytes: 8 << 20,
            transfer_budget_bytes: 4 << 20,
            ..Limits::default()
        },
    );
    let busy = |r: &Response<Body>| {
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("5")
        );
    };
    // A body of four 2 MiB instances, twice one request's share: streamed
    // one part at a time, all stored (before issue 10's streaming: 503).
    let sops: Vec<String> = (0..4)
        .map(|i| format!("1.2.826.0.1.3680043.8.498.60{i}"))
        .collect();
    let parts: Vec<Vec<u8>> = sops
        .iter()
        .map(|sop| part10_sized(STUDY, sop, 2 << 20))
        .collect();
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let body = stow_body(&refs);
    let n = body.len();
    let (r, out) = send(&f.app, stow_request(Body::from(body.clone()), Some(n))).await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(
        json(&out)["00081199"]["Value"].as_array().map(Vec::len),
        Some(4)
    );
    assert_eq!(f.archive.budget().in_use(), 0);
    // The same streamed without a Content-Length, in 64 KiB pieces.
    let pieces: Vec<_> = body
        .chunks(64 << 10)
        .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let (r, _) = send(
        &f.app,
        stow_request(Body::from_stream(futures_util::stream::iter(pieces)), None),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    // One instance over the share fails alone (0xA700), the others stored.
    let big = part10_sized(STUDY, "1.2.826.0.1.3680043.8.498.610", 5 << 20);
    let small = part10_sized(STUDY, "1.2.826.0.1.3680043.8.498.611", 1 << 20);
    let body = stow_body(&[&big, &small]);
    let n = body.len();
    let (r, out) = send(&f.app, stow_request(Body::from(body), Some(n))).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let doc = json(&out);
    assert_eq!(doc["00081198"]["Value"][0]["00081197"]["Value"][0], 0xA700);
    assert_eq!(
        doc["00081199"]["Value"][0]["00081155"]["Value"][0],
        "1.2.826.0.1.3680043.8.498.611"
    );
    assert_eq!(f.archive.budget().in_use(), 0);
    // Over max_upload_bytes is still 413.
    let (r, _) = send(&f.app, stow_request(Body::empty(), Some(65 << 20))).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The global budget held by others: 503, then 200 once it is free.
    let body = stow_body(&[&part10(STUDY, SOP)]);
    let mut others = [f.archive.budget().transfer(), f.archive.budget().transfer()];
    others[0].grow(4 << 20).expect("room");
    others[1].grow(4 << 20).expect("room");
    let n = body.len();
    let (r, _) = send(&f.app, stow_request(Body::from(body.clone()), Some(n))).await;
    busy(&r);
    drop(others);
    let (r, _) = send(&f.app, stow_request(Body::from(body), Some(n))).await;
    assert_eq!(r.status(), StatusCode::OK);
    // A bomb (32 MiB of zeros in a few KiB) next to a normal instance.
    let bomb = deflate_bomb("1.2.826.0.1.3680043.8.498.77", 32 << 20);
    assert!(bomb.len() < 256 << 10, "{}", bomb.len());
    let other = "1.2.826.0.1.3680043.8.498.78";
    let body = stow_body(&[&bomb, &part10(STUDY, other)]);
    let n = body.len();
    let (r, out) = send(&f.app, stow_request(Body::from(body), Some(n))).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let doc = json(&out);
    assert_eq!(doc["00081198"]["Value"][0]["00081197"]["Value"][0], 0xA700);
    assert_eq!(doc["00081199"]["Value"][0]["00081155"]["Value"][0], other);
    assert_eq!(f.archive.budget().in_use(), 0);
    assert!(f
        .archive
        .find_instance("1.2.826.0.1.3680043.8.498.77")
        .expect("index")
        .is_none());
}

/// STOW-RS while the image store (an S3 endpoint on a closed port) is down:
/// 503 with `Retry-After: 10`, nothing stored and no index row (issue 12),
/// never a 200.
#[tokio::test]
async fn stow_with_the_image_store_down_is_503_with_retry_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let master = MasterKey::from_bytes([7u8; 32]);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let location = bastion_store::S3Location::parse(&format!(
        "s3://bastion-test?endpoint=http://127.0.0.1:{port}&region=garage"
    ))
    .expect("url");
    let creds = bastion_store::S3Credentials::new("GKtest", "not-a-secret").expect("creds");
    let store = BlobStore::open_s3(&location, creds, master.clone(), Vec::new()).expect("store");
    let index = Arc::new(
        Index::open(
            &dir.path().join("index.db"),
            &master.derive("bastion index v1"),
        )
        .expect("index"),
    );
    let events = EventLog::open(&dir.path().join("events/events.log")).expect("events");
    let archive = Arc::new(Archive::new(
        Arc::new(store),
        index.clone(),
        Arc::new(events),
        Limits::default(),
    ));
    let app = bastion_web::router(AppState::new(
        archive,
        Arc::new(FakeAccounts),
        WebConfig::default(),
    ));
    let body = stow_body(&[&part10(STUDY, SOP)]);
    let n = body.len();
    let (r, out) = send(&app, stow_request(Body::from(body), Some(n))).await;
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(
        r.headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()),
        Some("10")
    );
    assert!(!String::from_utf8_lossy(&out).contains("not-a-secret"));
    assert!(index.find_instance(SOP).expect("index").is_none());
}
