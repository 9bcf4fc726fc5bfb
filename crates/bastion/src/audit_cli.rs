//! `bastion audit verify|search|init`: reading the tamper-evident audit
//! trail (`DIR/audit/`, see `bastion_security::audit`). Every read is
//! itself recorded (Audit Log Used).

use std::{
    process::ExitCode,
    sync::{Arc, Weak},
};

use anyhow::{bail, Context, Result};
use bastion_archive::query::Level;
use bastion_archive::Archive;
use bastion_security::{
    audit::{
        AuditReader, AuditTrail, CheckpointPolicy, Filter, PatientLookup, Subject, EVENT_NAMES,
    },
    events::Outcome,
};
use clap::{Args, Subcommand};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use crate::{config::Config, datadir::DataDir};

/// `bastion audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the trail: hash chain, encryption tags, signed checkpoints.
    /// Exit 0 when intact, 1 naming the first broken record, 2 on error
    /// (no trail, no signing key).
    Verify,
    /// Search the trail; prints one line per record (oldest first).
    Search(SearchArgs),
    /// Start a trail on a data directory that predates the audit trail
    /// (refused when one exists; recorded as a Security Alert).
    Init,
    /// Append N synthetic records (benchmarks only).
    #[command(hide = true)]
    Generate {
        /// Number of records.
        #[arg(long)]
        records: u64,
    },
}

/// Search filters (all optional; they combine with AND).
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// User name (login, actor or web user).
    #[arg(long)]
    user: Option<String>,
    /// Device AE title (calling AE or C-MOVE destination).
    #[arg(long)]
    device: Option<String>,
    /// Patient ID.
    #[arg(long)]
    patient_id: Option<String>,
    /// Study Instance UID.
    #[arg(long)]
    study: Option<String>,
    /// Not before this time (RFC 3339, e.g. 2026-01-31T08:00:00Z).
    #[arg(long, value_parser = rfc3339)]
    since: Option<OffsetDateTime>,
    /// Not after this time (RFC 3339).
    #[arg(long, value_parser = rfc3339)]
    until: Option<OffsetDateTime>,
    /// Audit event (PS3.15 EventID): application-activity, audit-log-used,
    /// begin-transferring, instances-accessed, instances-transferred,
    /// export, import, query, security-alert, user-authentication; or an
    /// event type such as login.failure.
    #[arg(long)]
    event: Option<String>,
    /// At most this many records (the most recent matches).
    #[arg(long, default_value_t = 10_000)]
    limit: usize,
    /// One JSON object per line (with the audit messages' XML).
    #[arg(long)]
    json: bool,
}

fn rfc3339(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time (e.g. 2026-01-31T08:00:00Z): {e}"))
}

/// Runs one `bastion audit` command.
pub fn audit(dir: &DataDir, cmd: AuditCommand) -> Result<ExitCode> {
    dir.require_initialised()?;
    dir.check_secret_permissions()?;
    let config = Config::load(&dir.config())?;
    let master = dir.load_master_key()?;
    match cmd {
        AuditCommand::Verify => {
            let keys = dir.audit_keys(&master)?;
            let report = AuditReader::new(&dir.audit_dir(), keys).verify()?;
            let (events, _trail) = dir.open_events(&master, &config)?;
            crate::alerts_cli::attach(dir, &events);
            let (outcome, result) = match &report.broken {
                None => (Outcome::Success, "intact".to_owned()),
                Some(b) => (Outcome::Alert, b.to_string()),
            };
            events.record(
                "audit.verify",
                outcome,
                serde_json::json!({"actor": "cli", "records": report.records,
                    "checkpoints": report.checkpoints, "result": result}),
            );
            match report.broken {
                None => {
                    println!(
                        "audit trail intact: {} records, {} signed checkpoints ({} records covered by the last one)",
                        report.records, report.checkpoints, report.covered
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Some(b) => {
                    println!("audit trail BROKEN at {b}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        AuditCommand::Search(a) => {
            if let Some(e) = &a.event {
                if !EVENT_NAMES.contains(&e.as_str()) && !e.contains('.') && e != "logout" {
                    bail!(
                        "unknown --event {e:?}: use one of {} or an event type such as login.failure",
                        EVENT_NAMES.join(", ")
                    );
                }
            }
            let filter = Filter {
                user: a.user.clone(),
                device: a.device.clone(),
                patient_id: a.patient_id.clone(),
                study: a.study.clone(),
                since: a.since,
                until: a.until,
                event: a.event.clone(),
            };
            let keys = dir.audit_keys(&master)?;
            let (found, unreadable) =
                AuditReader::new(&dir.audit_dir(), keys).search(&filter, a.limit.max(1))?;
            let (events, _trail) = dir.open_events(&master, &config)?;
            events.record(
                "audit.search",
                Outcome::Success,
                serde_json::json!({"actor": "cli", "matches": found.len(),
                    "filter": {"user": a.user, "device": a.device, "patient_id": a.patient_id.is_some(),
                        "study": a.study, "event": a.event}}),
            );
            for r in &found {
                let s = r.summary();
                if a.json {
                    println!("{s}");
                } else {
                    let str_of = |k: &str| s[k].as_str().unwrap_or("-").to_owned();
                    let ids = s["event_ids"]
                        .as_array()
                        .map(|v| {
                            v.iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join("+")
                        })
                        .unwrap_or_default();
                    let patients = s["patients"]
                        .as_array()
                        .map(|v| {
                            v.iter()
                                .filter_map(|p| p["patient_id"].as_str())
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    println!(
                        "{:>8} {} {:<34} {:<24} {:<8} user={} device={} peer={} patients={} studies={}",
                        r.seq,
                        str_of("ts"),
                        if ids.is_empty() { "-".into() } else { ids },
                        str_of("type"),
                        str_of("outcome"),
                        str_of("user"),
                        str_of("device"),
                        str_of("peer"),
                        if patients.is_empty() { "-".into() } else { patients },
                        s["studies"].as_array().map_or(0, Vec::len),
                    );
                }
            }
            if unreadable > 0 {
                eprintln!("warning: {unreadable} records could not be decrypted; run `bastion audit verify`");
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Init => {
            if dir.audit_dir().join("records").exists() {
                bail!(
                    "{} already holds an audit trail; refusing to start another",
                    dir.audit_dir().display()
                );
            }
            drop(AuditTrail::create(
                &dir.audit_dir(),
                dir.audit_keys(&master)?,
                crate::datadir::audit_identity(&config),
                CheckpointPolicy::default(),
            )?);
            let (events, _trail) = dir.open_events(&master, &config)?;
            events.record(
                "audit.started",
                Outcome::Alert,
                serde_json::json!({"actor": "cli",
                    "detail": "a new audit trail was started with `bastion audit init`"}),
            );
            println!("started an audit trail in {}", dir.audit_dir().display());
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Generate { records } => {
            let (_events, trail) = dir.open_events(&master, &config)?;
            let start = std::time::Instant::now();
            for i in 0..records {
                let mut e = serde_json::Map::new();
                let ts = OffsetDateTime::now_utc()
                    .format(&Rfc3339)
                    .unwrap_or_default();
                e.insert("ts".into(), ts.into());
                e.insert("type".into(), "store.stored".into());
                e.insert("outcome".into(), "success".into());
                e.insert("ae".into(), "BENCH".into());
                e.insert("peer".into(), "127.0.0.1:11112".into());
                e.insert(
                    "sop_instance_uid".into(),
                    format!("1.2.826.0.1.3680043.10.1.{i}").into(),
                );
                trail.append(&e).context("append")?;
            }
            trail.checkpoint()?;
            println!(
                "appended {records} records in {:.1} s",
                start.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Patients of instances and studies, from the index (the event log never
/// names them; the encrypted trail does). Weak: the archive's event log
/// holds the trail, which holds this.
struct IndexLookup(Weak<Archive>);

impl IndexLookup {
    fn one(&self, level: Level, uid: &str) -> Option<Subject> {
        let p = self.0.upgrade()?.patient_of(level, uid)?;
        Some(Subject {
            patient_id: p.patient_id,
            patient_name: p.patient_name,
            study_uid: Some(p.study_instance_uid).filter(|s| !s.is_empty()),
        })
    }
}

impl PatientLookup for IndexLookup {
    fn by_instance(&self, sop_instance_uid: &str) -> Option<Subject> {
        self.one(Level::Instance, sop_instance_uid)
    }
    fn by_study(&self, study_instance_uid: &str) -> Option<Subject> {
        self.one(Level::Study, study_instance_uid)
    }
}

/// Lets the trail name the patients of `archive`'s instances and studies.
pub fn attach_lookup(trail: &Arc<AuditTrail>, archive: &Arc<Archive>) {
    trail.set_lookup(Arc::new(IndexLookup(Arc::downgrade(archive))));
}
