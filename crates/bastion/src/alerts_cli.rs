//! `bastion alerts`: list and acknowledge the alerts of the detection rules;
//! and the wiring of the live detector (`serve`, and CLI commands whose
//! events are security changes).

use std::{process::ExitCode, sync::Arc};

use anyhow::{Context, Result};
use bastion_archive::query::Level;
use bastion_archive::Archive;
use bastion_security::{
    alerts::{os_user, AckFilter, Alert, AlertStore, Detection},
    db::SecurityDb,
    detect::{PatientResolver, Rules},
    events::{EventLog, Outcome},
};
use clap::{Args, Subcommand};

use crate::{config::Config, datadir::DataDir};

/// `bastion alerts [--json] [--all]`, `bastion alerts ack ID --comment TEXT`,
/// `bastion alerts ack --all|--rule RULE|--before TIME --comment TEXT`.
#[derive(Debug, Args)]
pub struct AlertsArgs {
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Acknowledged alerts too (after the open ones).
    #[arg(long)]
    all: bool,
    /// At most this many alerts.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    #[command(subcommand)]
    command: Option<AlertsCommand>,
}

#[derive(Debug, Subcommand)]
enum AlertsCommand {
    /// Acknowledge an alert, or every open alert a filter selects (recorded
    /// with the acting OS user and the comment).
    Ack {
        /// The alert's id (first column of `bastion alerts`).
        #[arg(required_unless_present_any = ["all", "rule", "before"], conflicts_with_all = ["all", "rule", "before"])]
        id: Option<i64>,
        /// Every open alert.
        #[arg(long)]
        all: bool,
        /// Only open alerts of this rule (e.g. unknown_device).
        #[arg(long)]
        rule: Option<String>,
        /// Only open alerts raised before this time (RFC 3339, e.g.
        /// 2026-01-01T00:00:00Z).
        #[arg(long)]
        before: Option<String>,
        /// Why it is acknowledged (required).
        #[arg(long)]
        comment: String,
    },
}

/// Runs `bastion alerts …`.
pub fn alerts(dir: &DataDir, args: AlertsArgs) -> Result<ExitCode> {
    dir.require_initialised()?;
    dir.check_secret_permissions()?;
    let master = dir.load_master_key()?;
    let store = AlertStore::new(Arc::new(dir.open_security(&master)?));
    match args.command {
        Some(AlertsCommand::Ack {
            id: None,
            all: _,
            rule,
            before,
            comment,
        }) => {
            let before = before
                .map(|t| {
                    time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                        .with_context(|| {
                            format!(
                                "--before {t:?} is not an RFC 3339 time like 2026-01-01T00:00:00Z"
                            )
                        })
                })
                .transpose()?;
            let by = os_user();
            let filter = AckFilter {
                ids: None,
                rule: rule.clone(),
                before,
            };
            let ids = store.acknowledge_many(&filter, &by, &comment)?;
            EventLog::open(&dir.events())?.record(
                "alert.acknowledged",
                Outcome::Success,
                serde_json::json!({"actor": format!("cli:{by}"),
                                   "alert_ids": ids.iter().take(1000).collect::<Vec<_>>(),
                                   "count": ids.len(), "rule": rule, "bulk": true,
                                   "comment": comment.trim()}),
            );
            println!("{} alert(s) acknowledged by {by}", ids.len());
        }
        Some(AlertsCommand::Ack {
            id: Some(id),
            comment,
            ..
        }) => {
            let by = os_user();
            let alert = store.ack(id, &by, &comment)?;
            EventLog::open(&dir.events())?.record(
                "alert.acknowledged",
                Outcome::Success,
                serde_json::json!({"actor": format!("cli:{by}"), "alert_id": id,
                                   "rule": alert.rule, "comment": comment.trim()}),
            );
            println!("alert {id} acknowledged by {by}");
        }
        None => {
            let list = store.list(args.all, args.limit)?;
            if args.json {
                for a in &list {
                    println!("{}", serde_json::to_string(a)?);
                }
            } else {
                print_table(&list, args.all);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(list: &[Alert], all: bool) {
    if list.is_empty() {
        println!(
            "{}",
            if all {
                "no alerts"
            } else {
                "no open alerts (`--all` lists acknowledged ones too)"
            }
        );
        return;
    }
    println!(
        "{:>6}  {:<25}  {:<20}  {:<8}  {:<12}  SUMMARY",
        "ID", "TIME", "RULE", "SEVERITY", "STATUS"
    );
    for a in list {
        let times = if a.count > 1 {
            format!(" (×{}, last {})", a.count, a.last_ts)
        } else {
            String::new()
        };
        println!(
            "{:>6}  {:<25}  {:<20}  {:<8}  {:<12}  {}{times}",
            a.id, a.ts, a.rule, a.severity, a.status, a.summary
        );
        if let Some(ack) = &a.ack {
            println!(
                "{:>6}  acknowledged {} by {}: {}",
                "", ack.ts, ack.by, ack.comment
            );
        }
    }
}

/// The live detector of `bastion serve`: rules from `[detect]`, alerts in
/// the security database, patients counted by index row (never named), the
/// webhook when configured. Add it to every event log the server records to.
pub fn start_detection(
    config: &Config,
    archive: &Arc<Archive>,
    security: &Arc<SecurityDb>,
    alert_events: Arc<EventLog>,
) -> Result<Arc<Detection>> {
    let rules = Rules::new(config.detect.rules()?);
    let weak = Arc::downgrade(archive);
    // Study Instance UID → "p<patient row id>": an opaque key, so that the
    // bulk-retrieval rule counts patients without naming them. Weak: the
    // archive's event log holds the detector.
    let patients: Box<PatientResolver> = Box::new(move |uid: &str| {
        let archive = weak.upgrade()?;
        archive.patient_of(Level::Study, uid).map(|p| p.key)
    });
    let detection = Detection::start(rules, AlertStore::new(security.clone()), Some(patients))
        .context("cannot start the detector")?;
    detection.record_alerts_to(alert_events);
    let d = &config.detect;
    if !d.webhook_url.is_empty() {
        let hook = crate::webhook::Webhook::start(
            &d.webhook_url,
            (!d.webhook_ca_file.is_empty()).then_some(d.webhook_ca_file.as_str()),
            d.webhook_queue.max(1),
        )?;
        tracing::info!(url = %d.webhook_url, "alerts are POSTed to the webhook");
        detection.add_notifier(Box::new(move |a: &Alert| hook.send(a)));
    }
    Ok(detection)
}

/// The detector of a short-lived CLI command (device, user, token, audit
/// commands): raises the alerts of the rules that need no history (security
/// changes, audit verification failures) for the events `events` records.
/// The detector drains its queue when `events` is dropped. Failing to set
/// it up is reported, never fatal to the command.
pub fn attach(dir: &DataDir, events: &EventLog) {
    let run = || -> Result<()> {
        let config = Config::load(&dir.config())?;
        let master = dir.load_master_key()?;
        let db = Arc::new(dir.open_security(&master)?);
        let mut rules = Rules::new(config.detect.rules()?);
        if !config.detect.alert_host_changes {
            // An administrator's routine set-up on the host: recorded, no alert.
            rules = rules.routine_host_changes();
        }
        let detection = Detection::start(rules, AlertStore::new(db), None)?;
        // Alert events go through an event log of their own with the audit
        // trail attached (the command's log holds the detector: sharing it
        // would keep both alive forever), or without the trail when it is
        // what failed (a missing trail or key is itself worth an alert).
        let alert_events = match dir.open_events(&master, &config) {
            Ok((e, _trail)) => e,
            Err(_) => Arc::new(EventLog::open(&dir.events())?),
        };
        detection.record_alerts_to(alert_events);
        events.add_observer(detection);
        Ok(())
    };
    if let Err(e) = run() {
        tracing::warn!(error = %format!("{e:#}"), "detection rules are off for this command");
    }
}
