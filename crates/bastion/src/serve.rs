//! `bastion serve`: listeners, periodic orphan sweep, clean shutdown on
//! SIGTERM / SIGINT; the web UI's address in the log and the removal of the
//! initial admin password file once it is stale ([`crate::onboarding`]).

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use bastion_dimse::{tls::TlsIdentity, Dimse, DimseConfig};
use bastion_model::AeTitle;
use bastion_security::accounts::Accounts;
use bastion_security::audit::AuditReader;
use bastion_security::events::{EventLog, Outcome};
use bastion_security::policy::Listener;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::{net::TcpListener, sync::watch};

use crate::{cli::ListenArgs, config::Config, datadir::DataDir};

/// Blobs younger than this are never swept (an ingest in another process
/// may be between blob publish and index commit).
const ORPHAN_MIN_AGE: Duration = Duration::from_secs(60);

/// Runs the server until a signal.
pub fn serve(dir: &DataDir, listen: &ListenArgs) -> Result<ExitCode> {
    let initialised;
    let dir = if dir.is_initialised() {
        dir
    } else {
        initialised = dir.init(&listen.apply(Config::default())?)?;
        &initialised
    };
    dir.check_secret_permissions()?;
    // Before anything is written (the lock file, events): a wrong
    // passphrase stops here.
    let master = dir.load_master_key()?;
    for w in dir.keys().inside_data_dir_warnings(&dir.root) {
        tracing::warn!("{w}");
    }
    // One `serve` per data directory: a second one would sweep orphans and
    // group-commit behind the first one's back. The lock is released when
    // the process exits, however it exits.
    let Some(lock) = dir.lock_serve()? else {
        anyhow::bail!(
            "another `bastion serve` is already running on {}",
            dir.root.display()
        );
    };
    let config = listen.apply(Config::load(&dir.config())?)?;
    // Every socket the connection caps admit needs a descriptor (two for an
    // unfinished DICOM one): raise the soft limit as far as the hard limit
    // allows, so the caps, not EMFILE, decide who gets in.
    match rlimit::increase_nofile_limit(65_536) {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
    // One event log for the archive, DIMSE and the web front end, so that
    // every observer (audit trail, detection) sees every event.
    let (events, trail) = dir.open_events(&master, &config)?;
    // While the trail cannot record (a full disk), patient data is not
    // served: the DIMSE and HTTP fronts ask this gate (issue 10).
    events.set_audit_gate(bastion_security::audit::AuditGate::new(
        trail.health(),
        config.audit.allow_unaudited_access,
    ));
    if config.audit.allow_unaudited_access {
        tracing::warn!(
            "[audit] allow_unaudited_access = true: patient data is served even while the audit trail cannot record (a full disk); accesses during such a time leave no audit record"
        );
    }
    let archive = dir.open_archive_with(&master, &config, events.clone())?;
    crate::audit_cli::attach_lookup(&trail, &archive);
    let audit_reader = Arc::new(AuditReader::new(&dir.audit_dir(), dir.audit_keys(&master)?));
    let security = Arc::new(dir.open_security(&master)?);
    // The initial admin password file goes once that password is changed.
    crate::onboarding::remove_if_stale(dir, &security);
    crate::onboarding::watch(dir, &events);
    let detection =
        crate::alerts_cli::start_detection(&config, &archive, &security, events.clone())?;
    archive.events().add_observer(detection.clone());
    let inventory = bastion_security::inventory::Inventory::start(security.clone());
    archive.events().add_observer(inventory.clone());
    archive.set_inventory(inventory.clone());
    // JPEG 2000 is decoded (for /rendered and the decompressed fallback)
    // only in a sandboxed child process of this binary.
    match std::env::current_exe() {
        Ok(exe) => {
            bastion_archive::isolated::set_isolated_decoder(Arc::new(
                crate::decoder_sandbox::ChildDecoder::new(exe),
            ));
        }
        Err(e) => {
            tracing::warn!(error = %e, "JPEG 2000 decoding off: this binary's path is unknown")
        }
    }
    let syslog = crate::syslog_client::start(dir, &config, &master, &trail, &events)?;
    if let Some(s) = &syslog {
        events.set_audit_gate(
            bastion_security::audit::AuditGate::new(
                trail.health(),
                config.audit.allow_unaudited_access,
            )
            .with_export(s.health()),
        );
    }
    let p = dir.pki();
    let tls = TlsIdentity::load(&p.server_cert, &p.server_key, &p.ca_cert)?;
    let d = &config.dicom;
    let dimse_config = DimseConfig {
        ae_title: AeTitle::parse(&d.ae_title)?,
        max_pdu_length: d.max_pdu_length,
        max_associations: d.max_associations,
        max_pending_per_address: d.max_pending_per_address.max(1),
        max_pending: d.max_pending.max(1),
        idle_timeout: Duration::from_secs(d.idle_timeout_secs),
        handshake_timeout: Duration::from_secs(d.handshake_timeout_secs),
        max_dataset_bytes: config.limits.max_dataset_bytes,
        max_matches: config.query.max_matches.max(1),
    };
    let http = match config.http.listen_addr()? {
        Some(addr) => Some((
            addr,
            web_app(
                dir,
                &config,
                &archive,
                &security,
                &detection,
                &events,
                audit_reader,
            )?,
        )),
        None => None,
    };
    let first_run = dir.admin_password().exists();
    let totp_required = config.accounts.admin_requires_totp;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // SIGTERM is handled from before the first listener is bound: a
        // stop that arrives during start-up is a clean shutdown too.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let dimse = Arc::new(Dimse::new(archive.clone(), security, dimse_config.clone(), Some(tls)));
        let (tx, rx) = watch::channel(false);
        let mut servers = Vec::new();
        let tls_listener = TcpListener::bind(d.tls_addr).await.with_context(|| format!("cannot listen on {}", d.tls_addr))?;
        tracing::info!("DICOM-TLS listening on {} as AE {}", tls_listener.local_addr()?, dimse_config.ae_title);
        servers.push(tokio::spawn(dimse.clone().serve(tls_listener, Listener::Tls, rx.clone())));
        let mut plain_bound = None;
        if let Some(addr) = d.plain_addr {
            let l = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            plain_bound = Some(l.local_addr()?);
            tracing::warn!(
                "plain DICOM listening on {} as AE {} (unencrypted; only devices registered with --transport plain may use it)",
                l.local_addr()?,
                dimse_config.ae_title
            );
            servers.push(tokio::spawn(dimse.clone().serve(l, Listener::Plain, rx.clone())));
        }
        if let Some((addr, (tls, app, limits))) = http {
            let l = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            tracing::info!("HTTPS (DICOMweb, account API) listening on {}", l.local_addr()?);
            tracing::info!("{}", crate::onboarding::web_ui_line(l.local_addr()?, first_run, totp_required));
            servers.push(tokio::spawn(bastion_web::server::serve(l, tls, app, limits, rx.clone())));
        } else {
            tracing::info!("HTTPS listener off (--http-addr off)");
        }
        let sweeper = {
            let archive = archive.clone();
            tokio::spawn(async move {
                loop {
                    let a = archive.clone();
                    match tokio::task::spawn_blocking(move || a.sweep_orphans(ORPHAN_MIN_AGE)).await {
                        Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "removed orphan blobs left by an interrupted ingest"),
                        Ok(Err(e)) => tracing::warn!(error = %e, "orphan sweep failed"),
                        _ => {}
                    }
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            })
        };
        // Audit: start records, and a signed checkpoint at least every
        // minute while records are appended (and every 1000 records).
        events.record("application.start", Outcome::Success, serde_json::json!({"ae": dimse_config.ae_title.as_str(), "pid": std::process::id()}));
        events.record("audit.started", Outcome::Success, serde_json::json!({"detail": "audit recording started with serve"}));
        if config.audit.allow_unaudited_access {
            events.record("security.unaudited_access_allowed", Outcome::Alert, serde_json::json!({"setting": "[audit] allow_unaudited_access", "detail": "patient data is served even while the audit trail cannot record"}));
        }
        // An unencrypted listener is a security-relevant configuration: a
        // Security Alert in the audit trail at every start (PS3.15 A.5.3.11,
        // Security Configuration), not only a log line.
        if let Some(addr) = plain_bound {
            events.record(
                "config.plain_listener",
                Outcome::Alert,
                serde_json::json!({"listener": "dicom-plain", "address": addr.to_string(),
                    "detail": "plain (unencrypted) DICOM listener enabled; only devices registered with --transport plain may use it"}),
            );
        }
        // Every second: a checkpoint when one is due, and while recording is
        // stopped a probe of the reserve, so service resumes by itself once
        // space is back; each change is recorded (110133 / 110134).
        let ticker = {
            let trail = trail.clone();
            let events = events.clone();
            tokio::spawn(async move {
                loop {
                    record_recording_changes(&events, &trail);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let t = trail.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || t.tick()).await {
                        tracing::error!(error = %e, "cannot write to the audit trail");
                    }
                }
            })
        };
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        }
        let _ = tx.send(true);
        sweeper.abort();
        for s in servers {
            let _ = s.await;
        }
        inventory.flush();
        detection.flush();
        ticker.abort();
        events.record("application.stop", Outcome::Success, serde_json::json!({"ae": dimse_config.ae_title.as_str(), "pid": std::process::id()}));
        events.record("audit.stopped", Outcome::Success, serde_json::json!({"detail": "audit recording stopped with serve"}));
        if let Err(e) = trail.checkpoint() {
            tracing::error!(error = %e, "cannot write the final audit checkpoint");
        }
        if let Some(s) = &syslog {
            s.shutdown(Duration::from_secs(3));
        }
        tracing::info!("stopped");
        drop(lock);
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Records each change of the trail's recording state as an event:
/// `audit.recording_stopped` (a PS3.15 Security Alert with EventTypeCode
/// 110133 "Audit Recording Stopped", and an alert) and
/// `audit.recording_resumed` (110134). While stopped, the records go into
/// the trail's reserve.
fn record_recording_changes(events: &EventLog, trail: &bastion_security::audit::AuditTrail) {
    use bastion_security::audit::RecordingChange;
    for c in trail.health().take_changes() {
        match c {
            RecordingChange::Stopped { reason } => events.record(
                "audit.recording_stopped",
                Outcome::Alert,
                serde_json::json!({"reason": reason, "refusing": events.refuses_unaudited()}),
            ),
            RecordingChange::Resumed { stopped_secs } => events.record(
                "audit.recording_resumed",
                Outcome::Success,
                serde_json::json!({"stopped_secs": stopped_secs}),
            ),
        }
    }
}

/// The HTTPS application: TLS configuration (the DICOM-TLS server
/// certificate and key), router, connection limits.
fn web_app(
    dir: &DataDir,
    config: &Config,
    archive: &Arc<bastion_archive::Archive>,
    security: &Arc<bastion_security::db::SecurityDb>,
    detection: &Arc<bastion_security::alerts::Detection>,
    events: &Arc<EventLog>,
    audit_reader: Arc<AuditReader>,
) -> Result<(
    Arc<rustls::ServerConfig>,
    bastion_web::Router,
    bastion_web::server::ConnectionLimits,
)> {
    let p = dir.pki();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&p.server_cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .with_context(|| format!("cannot read {}", p.server_cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&p.server_key)
        .with_context(|| format!("cannot read {}", p.server_key.display()))?;
    let tls = bastion_web::server::tls_config(chain, key)
        .with_context(|| format!("cannot use {} for HTTPS", p.server_cert.display()))?;
    // The shared log: the detector already observes it.
    let events = events.clone();
    let account_policy = config.accounts.policy()?;
    if !account_policy.admin_requires_totp {
        tracing::warn!(
            "[accounts] admin_requires_totp = false: admin accounts can log in with a password alone"
        );
    }
    let accounts = Arc::new(Accounts::new(security.clone(), events, account_policy));
    // The admin API: the same database the DIMSE listeners read devices
    // from at each association, so changes apply to the next one.
    let mut listeners = vec![bastion_web::admin::ListenerInfo {
        name: "dicom-tls".into(),
        address: config.dicom.tls_addr,
        tls: true,
    }];
    if let Some(addr) = config.dicom.plain_addr {
        listeners.push(bastion_web::admin::ListenerInfo {
            name: "dicom-plain".into(),
            address: addr,
            tls: false,
        });
    }
    if let Some(addr) = config.http.listen_addr()? {
        listeners.push(bastion_web::admin::ListenerInfo {
            name: "https".into(),
            address: addr,
            tls: true,
        });
    }
    let admin = bastion_web::admin::AdminContext {
        db: security.clone(),
        accounts: accounts.clone(),
        pki: dir.pki(),
        listeners,
        key_warnings: dir.keys().inside_data_dir_warnings(&dir.root),
    };
    let h = &config.http;
    if !h.cors_origins.is_empty() {
        tracing::warn!(origins = ?h.cors_origins, "CORS enabled: these browser origins may call the API with users' credentials");
    }
    let web = bastion_web::WebConfig {
        cors_origins: h.cors_origins.clone(),
        max_upload_bytes: usize::try_from(h.max_upload_bytes).unwrap_or(usize::MAX),
        max_json_bytes: usize::try_from(h.max_json_bytes).unwrap_or(usize::MAX),
        body_timeout: Duration::from_secs(h.body_timeout_secs),
        body_idle_timeout: Duration::from_secs(h.body_idle_timeout_secs.max(1)),
        max_matches: config.query.max_matches.max(1),
        ae_title: config.dicom.ae_title.clone(),
        ..bastion_web::WebConfig::default()
    };
    let mut state = bastion_web::AppState::new(archive.clone(), accounts, web)
        .with_alerts(detection.clone())
        .with_admin(admin);
    if let Some(d) = &h.ohif_dir {
        // The viewer's files are served without a session: the directory
        // must hold nothing else of Bastion's.
        for (what, other) in [
            ("data directory", &dir.root),
            ("key directory", &dir.keys().dir),
        ] {
            let (o, v) = (crate::keys::resolved(other), crate::keys::resolved(d));
            if v.starts_with(&o) || o.starts_with(&v) {
                anyhow::bail!(
                    "refusing [http] ohif_dir {}: it overlaps the {what} {}, whose files would be served without a session; unpack OHIF in a directory of its own (e.g. /opt/ohif)",
                    d.display(),
                    other.display()
                );
            }
        }
        let viewer = bastion_web::ohif::Ohif::open(d).context("[http] ohif_dir")?;
        tracing::info!(dir = %viewer.root().display(), "OHIF viewer served at /viewer/");
        state = state.with_ohif(viewer);
    }
    let limits = bastion_web::server::ConnectionLimits {
        max_connections: h.max_connections.max(1),
        max_connections_per_address: h.max_connections_per_address.max(1),
        max_unproven_per_address: h.max_unproven_per_address.max(1),
        handshake_timeout: Duration::from_secs(h.handshake_timeout_secs),
        header_timeout: Duration::from_secs(h.header_timeout_secs),
        ..bastion_web::server::ConnectionLimits::default()
    };
    let app = bastion_web::audit_api::with_audit(bastion_web::router(state), audit_reader);
    Ok((tls, app, limits))
}
