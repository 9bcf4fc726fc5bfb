//! # bastion-web: the HTTPS front end
//!
//! DICOMweb (PS3.18: QIDO-RS, WADO-RS, STOW-RS) under `/dicomweb` and the
//! account API under `/api`, served over TLS only (rustls with aws-lc-rs,
//! TLS 1.3 and 1.2, the server certificate DICOM-TLS uses). A protocol
//! adapter: the archive stores and finds, `bastion-dicomweb` turns datasets
//! into DICOM JSON and multipart bodies, the account service
//! ([`accounts::AccountService`]) decides logins; this crate routes,
//! authenticates, authorises, negotiates and records.
//!
//! Main items: [`router`] builds the whole application from an [`AppState`]
//! (testable with `tower::ServiceExt::oneshot`, no socket), [`server::serve`]
//! accepts TLS connections on a listener the binary bound, and
//! [`server::tls_config`] is the TLS policy.
//!
//! ```no_run
//! # async fn demo(state: bastion_web::AppState, tls: std::sync::Arc<rustls::ServerConfig>) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
//! let (_stop, stop_rx) = tokio::sync::watch::channel(false);
//! let limits = bastion_web::server::ConnectionLimits::default();
//! bastion_web::server::serve(listener, tls, bastion_web::router(state), limits, stop_rx).await;
//! # Ok(()) }
//! ```
//!
//! Invariants:
//! - every route is authenticated except `POST /api/login`, `POST
//!   /api/password`, `POST /api/totp/enrol`, CORS preflights and `GET` of the web UI's static
//!   assets ([`ui`]: `/`, `/app.css`, `/app.js`, `/admin.js`, `/favicon.svg`); authorisation is one
//!   [`auth::Caller::require`] call per handler, by [`bastion_model::WebPermission`];
//! - every response carries the security headers ([`protect`]), errors
//!   included; errors map to HTTP statuses in one place ([`error::ApiError`])
//!   and never carry internal details;
//! - bodies are read only through [`body::read_body`]: declared length
//!   checked before reading, bytes capped, whole body within a deadline;
//! - every request is recorded in the event log ([`audit`]) with user,
//!   address, action, status and Study Instance UIDs, never patient names.

pub mod accounts;
pub mod admin;
pub mod alerts;
pub mod audit;
pub mod audit_api;
pub mod audit_chain;
pub mod audit_gate;
pub mod auth;
pub mod body;
pub mod dicomweb;
pub mod error;
pub mod export;
mod negotiate;
pub mod ohif;
mod peek;
pub mod protect;
pub mod server;
pub mod ui;

pub use axum::Router;

use std::{sync::Arc, time::Duration};

use axum::{
    middleware::{from_fn, from_fn_with_state},
    routing::{get, post, put},
};
use bastion_archive::Archive;
use tower_http::{
    limit::RequestBodyLimitLayer, set_header::SetResponseHeaderLayer,
    timeout::RequestBodyTimeoutLayer,
};

use crate::{accounts::AccountService, error::ApiError};

/// Settings of the HTTPS front end (`[http]` in `bastion.toml`).
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// Origins allowed by CORS (empty: CORS off).
    pub cors_origins: Vec<String>,
    /// Largest STOW-RS request body, bytes.
    pub max_upload_bytes: usize,
    /// Largest JSON request body (login, password), bytes.
    pub max_json_bytes: usize,
    /// A request body must arrive completely within this time.
    pub body_timeout: Duration,
    /// A streamed (STOW-RS) body that sends nothing for this long is cut
    /// off (408), releasing what it holds of the memory and spool budgets.
    pub body_idle_timeout: Duration,
    /// QIDO-RS: more matches than this are refused (400, "refine the query").
    pub max_matches: usize,
    /// Our AE title (Retrieve AE Title in QIDO-RS results).
    pub ae_title: String,
    /// Values larger than this are BulkDataURIs in metadata, bytes.
    pub bulk_threshold: usize,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            cors_origins: Vec::new(),
            max_upload_bytes: 2 << 30,
            max_json_bytes: 64 << 10,
            body_timeout: Duration::from_secs(300),
            body_idle_timeout: Duration::from_secs(60),
            max_matches: bastion_archive::query::DEFAULT_MAX_MATCHES,
            ae_title: "BASTION".into(),
            bulk_threshold: 1024,
        }
    }
}

/// What the handlers share: the archive, the account service, the settings.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

#[derive(Clone)]
struct Inner {
    archive: Arc<Archive>,
    accounts: Arc<dyn AccountService>,
    config: WebConfig,
    alerts: Option<Arc<bastion_security::alerts::Detection>>,
    admin: Option<Arc<admin::AdminContext>>,
    chain: audit_chain::ChainCache,
    ohif: Option<Arc<ohif::Ohif>>,
}

impl AppState {
    /// Assembles the state.
    pub fn new(
        archive: Arc<Archive>,
        accounts: Arc<dyn AccountService>,
        config: WebConfig,
    ) -> AppState {
        AppState(Arc::new(Inner {
            archive,
            accounts,
            config,
            alerts: None,
            admin: None,
            chain: audit_chain::ChainCache::default(),
            ohif: None,
        }))
    }

    /// Serves `GET /api/alerts`, `GET /api/alerts/{id}`, `POST
    /// /api/alerts/{id}/ack`, `POST /api/alerts/ack` and `GET /metrics` from
    /// this detector.
    pub fn with_alerts(self, detection: Arc<bastion_security::alerts::Detection>) -> AppState {
        let mut inner = Arc::unwrap_or_clone(self.0);
        inner.alerts = Some(detection);
        AppState(Arc::new(inner))
    }

    /// Serves the admin API ([`admin`]: `/api/devices`, `/api/users`,
    /// `/api/posture`) with these security handles; without them those
    /// routes answer 404.
    pub fn with_admin(self, admin: admin::AdminContext) -> AppState {
        let mut inner = Arc::unwrap_or_clone(self.0);
        inner.admin = Some(Arc::new(admin));
        AppState(Arc::new(inner))
    }

    /// Serves the OHIF viewer at `/viewer/` ([`ohif`]).
    pub fn with_ohif(self, viewer: ohif::Ohif) -> AppState {
        let mut inner = Arc::unwrap_or_clone(self.0);
        inner.ohif = Some(Arc::new(viewer));
        AppState(Arc::new(inner))
    }

    /// The OHIF viewer, when `[http] ohif_dir` is set.
    pub fn ohif(&self) -> Option<Arc<ohif::Ohif>> {
        self.0.ohif.clone()
    }

    /// The admin context, when the admin API is served.
    pub fn admin(&self) -> Option<Arc<admin::AdminContext>> {
        self.0.admin.clone()
    }

    /// The cached audit chain verification ([`audit_chain`]).
    pub(crate) fn chain_cache(&self) -> &audit_chain::ChainCache {
        &self.0.chain
    }

    /// The detector, when alerts are served.
    pub fn alerts(&self) -> Option<Arc<bastion_security::alerts::Detection>> {
        self.0.alerts.clone()
    }

    /// The archive.
    pub fn archive(&self) -> Arc<Archive> {
        self.0.archive.clone()
    }

    /// The account service.
    pub fn accounts(&self) -> Arc<dyn AccountService> {
        self.0.accounts.clone()
    }

    /// The settings.
    pub fn config(&self) -> &WebConfig {
        &self.0.config
    }
}

/// The whole application. Layers, outermost first: security headers, CORS
/// (when configured), JSON error bodies, event record, body size limit
/// (declared length checked before the handler runs), body idle timeout,
/// `Content-Encoding` refusal, authentication; then the routes.
pub fn router(state: AppState) -> Router {
    let config = state.config().clone();
    let api = Router::new()
        .route("/api/login", post(auth::login))
        .route("/api/password", post(auth::change_password))
        .route("/api/totp/enrol", post(auth::enrol_totp))
        .route("/api/logout", post(auth::logout))
        .route("/api/me", get(auth::me))
        .route("/api/studies/{study}/export", get(export::study))
        .route("/api/events", get(audit::events))
        .route("/api/audit", get(audit_api::search))
        .route("/api/alerts", get(alerts::list))
        .route("/api/alerts/{id}", get(alerts::get))
        .route("/api/alerts/ack", post(alerts::ack_many))
        .route("/api/alerts/{id}/ack", post(alerts::ack))
        .route("/api/audit/chain", get(audit_chain::status))
        .route(
            "/api/devices",
            get(admin::devices::list).post(admin::devices::create),
        )
        .route("/api/devices/unknown", get(admin::devices::unknown))
        .route(
            "/api/devices/{ae}",
            put(admin::devices::update).delete(admin::devices::remove),
        )
        .route(
            "/api/users",
            get(admin::users::list).post(admin::users::create),
        )
        .route("/api/users/{name}/disable", post(admin::users::disable))
        .route("/api/users/{name}/enable", post(admin::users::enable))
        .route("/api/users/{name}/unlock", post(admin::users::unlock))
        .route(
            "/api/users/{name}/password",
            post(admin::users::reset_password),
        )
        .route("/api/posture", get(admin::posture::posture))
        .route("/metrics", get(alerts::metrics));
    let ui = ui::ASSETS
        .iter()
        .fold(Router::new(), |r, a| r.route(a.path, get(ui::asset)));
    let app = Router::new()
        .merge(api)
        .merge(ui)
        .nest("/dicomweb", dicomweb::routes())
        .route("/viewer", get(ohif::serve))
        .route("/viewer/", get(ohif::serve))
        .route("/viewer/{*path}", get(ohif::serve))
        .fallback(|| async { ApiError::NotFound })
        .layer(from_fn_with_state(state.clone(), audit_gate::gate))
        .layer(from_fn_with_state(state.clone(), auth::authenticate))
        .layer(from_fn(protect::refuse_content_encoding))
        .layer(RequestBodyTimeoutLayer::new(config.body_timeout))
        .layer(RequestBodyLimitLayer::new(config.max_upload_bytes))
        .layer(from_fn_with_state(state.clone(), audit::record))
        .layer(from_fn(protect::json_errors))
        .with_state(state);
    let app = match protect::cors(&config.cors_origins) {
        Some(cors) => app.layer(cors),
        None => app,
    };
    protect::security_headers()
        .into_iter()
        .fold(app, |app, (name, value)| {
            // Only the OHIF viewer's files set their own policy (its inline
            // scripts by hash, WebAssembly, workers: `ohif::Ohif::csp`);
            // every other response gets the strict one.
            // The OHIF viewer's program files also set their own
            // Cache-Control (they hold no patient data); every other
            // response is no-store.
            if name == axum::http::header::CONTENT_SECURITY_POLICY
                || name == axum::http::header::CACHE_CONTROL
            {
                app.layer(SetResponseHeaderLayer::if_not_present(name, value))
            } else {
                app.layer(SetResponseHeaderLayer::overriding(name, value))
            }
        })
}
