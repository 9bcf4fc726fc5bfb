//! `bastion doctor`: a read-only health check of an installation, for the
//! administrator who is not a security expert: one line per check (`ok`,
//! `warn`, `FAIL`) saying what was found and what to do. It keeps working
//! while the audit trail cannot record (a full disk: issue 10, finding 1):
//! it writes nothing but one best-effort `doctor.run` event, and a failure
//! to record that is itself reported.
//!
//! Checks: the configuration parses; the data directory and key files have
//! private modes; where the keys live; the master key unwraps; free space on
//! the data directory's file system; the security and index databases open
//! with their keys and pass SQLite's `quick_check`; the audit trail's hash
//! chain, encryption tags and signed checkpoints (as `bastion audit
//! verify`), and whether it can record; the server and CA certificates'
//! validity; risky settings (`allow_unaudited_access`, a plain listener,
//! admins without TOTP, open high/medium alerts).
//!
//! Exit status: 0 when nothing failed (warnings allowed), 1 when a check
//! failed, 2 when the data directory is not initialised.

use std::{path::Path, process::ExitCode, sync::Arc};

use anyhow::Result;
use bastion_index::Index;
use bastion_model::Role;
use bastion_security::{
    accounts::{AccountPolicy, Accounts},
    alerts::AlertStore,
    audit::AuditReader,
    events::{EventLog, Outcome},
    pki,
};
use serde_json::json;
use time::OffsetDateTime;

use crate::{config::Config, datadir::DataDir};

/// Free space under which the data directory's file system is a warning:
/// a day or two of a busy CT.
pub const FREE_WARN_BYTES: u64 = 2 << 30;
/// Free space under which it is a failure: the audit trail's reserve and a
/// few instances.
pub const FREE_FAIL_BYTES: u64 = 64 << 20;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Nothing to do.
    Ok,
    /// Works, but is a risk or will stop working: read the message.
    Warn,
    /// Broken: Bastion refuses service or loses protection until fixed.
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

/// One finding: the check's name and what it found.
#[derive(Debug, Clone)]
pub struct Finding {
    /// How it came out.
    pub level: Level,
    /// The check, e.g. `audit trail`.
    pub check: &'static str,
    /// What was found and, for warnings and failures, what to do.
    pub message: String,
}

/// Runs every check on `dir`; prints one line per finding (or JSON lines
/// with `json`).
///
/// # Errors
/// None of the checks' own failures (they become findings); only printing.
pub fn doctor(dir: &DataDir, json: bool) -> Result<ExitCode> {
    if !dir.is_initialised() {
        eprintln!(
            "no Bastion installation at {} (run `bastion init` first, or pass --data DIR)",
            dir.root.display()
        );
        return Ok(ExitCode::from(2));
    }
    let findings = run(dir);
    let worst = findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok);
    for f in &findings {
        if json {
            println!(
                "{}",
                json!({"level": f.level.label().to_ascii_lowercase(), "check": f.check, "message": f.message})
            );
        } else {
            println!("{:<4}  {:<20} {}", f.level.label(), f.check, f.message);
        }
    }
    if !json {
        let count = |l| findings.iter().filter(|f| f.level == l).count();
        println!(
            "{} checks: {} ok, {} warnings, {} failures",
            findings.len(),
            count(Level::Ok),
            count(Level::Warn),
            count(Level::Fail)
        );
    }
    Ok(if worst == Level::Fail {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Every check, in order; never stops early.
fn run(dir: &DataDir) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |level, check, message: String| {
        out.push(Finding {
            level,
            check,
            message,
        })
    };
    let config = match Config::load(&dir.config()) {
        Ok(c) => {
            add(
                Level::Ok,
                "configuration",
                format!("{} parses", dir.config().display()),
            );
            Some(c)
        }
        Err(e) => {
            add(
                Level::Fail,
                "configuration",
                format!("{e:#}: fix the file (`bastion serve` will not start)"),
            );
            None
        }
    };
    match dir.check_secret_permissions() {
        Ok(()) => add(
            Level::Ok,
            "permissions",
            "the key files are private (0600)".into(),
        ),
        Err(e) => add(Level::Fail, "permissions", format!("{e:#}")),
    }
    file_modes(dir, &mut add);
    let key_warnings = dir.keys().inside_data_dir_warnings(&dir.root);
    if key_warnings.is_empty() {
        add(
            Level::Ok,
            "key location",
            "the keys are kept outside the data directory".into(),
        );
    }
    for w in key_warnings {
        add(Level::Warn, "key location", w);
    }
    free_space(&dir.root, &mut add);
    let master = match dir.load_master_key() {
        Ok(m) => {
            add(Level::Ok, "master key", "loads and unwraps".into());
            Some(m)
        }
        Err(e) => {
            add(Level::Fail, "master key", format!("{e:#}"));
            None
        }
    };
    let Some(master) = master else {
        return out;
    };

    let security = match dir.open_security(&master) {
        Ok(db) => {
            match db.quick_check() {
                Ok(p) if p.is_empty() => add(
                    Level::Ok,
                    "security database",
                    "opens with its key; quick_check ok".into(),
                ),
                Ok(p) => add(
                    Level::Fail,
                    "security database",
                    format!(
                        "quick_check reports {} problem(s), first: {} (restore it from a backup)",
                        p.len(),
                        p[0]
                    ),
                ),
                Err(e) => add(Level::Fail, "security database", e.to_string()),
            }
            Some(Arc::new(db))
        }
        Err(e) => {
            add(Level::Fail, "security database", format!("{e:#}"));
            None
        }
    };
    let key = master.derive("bastion index v1");
    // Opening a missing or empty file would create a fresh, empty index
    // (and report "0 studies"): never from a read-only check.
    let index_len = std::fs::metadata(dir.index_db())
        .map(|m| m.len())
        .unwrap_or(0);
    let pg_url = config.as_ref().and_then(|c| c.index.url.clone());
    let index_name = pg_url
        .clone()
        .unwrap_or_else(|| dir.index_db().display().to_string());
    let index: Result<Index, String> = if let (Some(c), Some(_)) = (&config, &pg_url) {
        dir.open_index(&master, c).map_err(|e| format!("{e:#}"))
    } else if index_len == 0 {
        Err(bastion_index::IndexError::Io {
            op: "read",
            path: dir.index_db(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "missing or empty: every stored image is unreachable until it is restored",
            ),
        }
        .to_string())
    } else {
        Index::open(&dir.index_db(), &key).map_err(|e| e.to_string())
    };
    match index {
        Ok(index) => match (index.quick_check(), index.counts()) {
            (Ok(p), Ok(c)) if p.is_empty() => add(
                Level::Ok,
                "index database",
                format!(
                    "opens with its key; quick_check ok; {} studies, {} series, {} instances",
                    c.studies, c.series, c.instances
                ),
            ),
            (Ok(p), _) if !p.is_empty() => add(
                Level::Fail,
                "index database",
                format!(
                    "quick_check reports {} problem(s), first: {} (rebuild or restore it)",
                    p.len(),
                    p[0]
                ),
            ),
            (Err(e), _) | (_, Err(e)) => add(
                Level::Fail,
                "index database",
                format!("{index_name}: {e} (restore it from a backup)"),
            ),
            _ => {}
        },
        Err(e) => add(
            Level::Fail,
            "index database",
            format!("{index_name}: {e} (restore it from a backup)"),
        ),
    }

    // The trail: first read (verify), then whether it can record.
    match dir
        .audit_keys(&master)
        .and_then(|k| Ok(AuditReader::new(&dir.audit_dir(), k).verify()?))
    {
        Ok(r) => match r.broken {
            None => add(
                Level::Ok,
                "audit trail",
                format!(
                    "intact: {} records, {} signed checkpoints",
                    r.records, r.checkpoints
                ),
            ),
            Some(b) => add(
                Level::Fail,
                "audit trail",
                format!("BROKEN at {b}: the trail was altered or damaged; keep a copy for investigation"),
            ),
        },
        Err(e) => add(Level::Fail, "audit trail", format!("cannot be verified: {e:#}")),
    }
    if let Some(config) = &config {
        match dir.open_events(&master, config) {
            Ok((events, trail)) => {
                events.record("doctor.run", Outcome::Success, json!({"actor": "cli"}));
                let health = trail.health();
                if health.recording() {
                    add(Level::Ok, "audit recording", "records".into());
                } else {
                    add(
                        Level::Fail,
                        "audit recording",
                        format!(
                            "stopped ({}): Bastion refuses patient data until it records again; free space on {}",
                            health.reason().unwrap_or_default(),
                            dir.root.display()
                        ),
                    );
                }
            }
            Err(e) => add(
                Level::Fail,
                "audit recording",
                format!("the trail cannot be opened for recording: {e:#}"),
            ),
        }
        settings(config, &mut add);
    }
    certificates(dir, &mut add);
    if let Some(db) = security {
        accounts_and_alerts(db, dir, &mut add);
    }
    out
}

type Add<'a> = dyn FnMut(Level, &'static str, String) + 'a;

/// Modes of the data directory and the files that are not keys: the
/// directory and the databases readable only by Bastion's account,
/// `bastion.toml` writable only by it (it names the OHIF directory, the
/// listeners, the keys' directory).
fn file_modes(dir: &DataDir, add: &mut Add<'_>) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| m.permissions().mode() & 0o777)
    };
    let mut loose = Vec::new();
    let mut fail = false;
    if let Some(m) = mode(&dir.root) {
        if m & 0o077 != 0 {
            loose.push(format!("{} is {m:o} (want 700)", dir.root.display()));
        }
    }
    if let Some(m) = mode(&dir.config()) {
        if m & 0o022 != 0 {
            fail = true;
            loose.push(format!(
                "{} is {m:o}: others may change the configuration (want 600)",
                dir.config().display()
            ));
        }
    }
    for p in [
        dir.index_db(),
        dir.security_db(),
        dir.blobs(),
        dir.audit_dir(),
        dir.events(),
    ] {
        if let Some(m) = mode(&p) {
            if m & 0o077 != 0 {
                loose.push(format!("{} is {m:o} (want 600/700)", p.display()));
            }
        }
    }
    if loose.is_empty() {
        add(
            Level::Ok,
            "file modes",
            "the data directory, its databases and bastion.toml are private".into(),
        );
    } else {
        add(
            if fail { Level::Fail } else { Level::Warn },
            "file modes",
            format!("{} (chmod them back)", loose.join("; ")),
        );
    }
}

fn free_space(root: &Path, add: &mut Add<'_>) {
    match rustix::fs::statvfs(root) {
        Ok(s) => {
            let free = s.f_bavail.saturating_mul(s.f_frsize);
            let gib = free as f64 / f64::from(1u32 << 30);
            let (level, what) = if free < FREE_FAIL_BYTES {
                (
                    Level::Fail,
                    "nearly full: new instances and audit records are refused; free space now",
                )
            } else if free < FREE_WARN_BYTES {
                (
                    Level::Warn,
                    "running out: free space or move the data directory",
                )
            } else {
                (Level::Ok, "free")
            };
            add(
                level,
                "disk space",
                format!("{gib:.1} GiB available on {}: {what}", root.display()),
            );
        }
        Err(e) => add(
            Level::Warn,
            "disk space",
            format!("cannot read free space on {}: {e}", root.display()),
        ),
    }
}

fn settings(config: &Config, add: &mut Add<'_>) {
    if config.audit.allow_unaudited_access {
        add(
            Level::Warn,
            "settings",
            "[audit] allow_unaudited_access = true: patient data is served even when it cannot be audited".into(),
        );
    }
    if let Some(a) = config.dicom.plain_addr {
        add(
            Level::Warn,
            "settings",
            format!("[dicom] plain_addr = {a}: a plaintext DICOM listener is configured (only for devices that cannot do TLS)"),
        );
    }
    if !config.accounts.admin_requires_totp {
        add(
            Level::Warn,
            "settings",
            "[accounts] admin_requires_totp = false: admins can log in with a password alone"
                .into(),
        );
    }
}

fn certificates(dir: &DataDir, add: &mut Add<'_>) {
    let p = dir.pki();
    let now = OffsetDateTime::now_utc();
    for (what, path, warn_days, renew) in [
        (
            "server certificate",
            p.server_cert,
            bastion_web::admin::posture::SERVER_CERT_WARN_DAYS,
            "renew it with `bastion cert server`",
        ),
        (
            "CA certificate",
            p.ca_cert,
            bastion_web::admin::posture::CA_CERT_WARN_DAYS,
            "plan a new CA and re-issue the device certificates",
        ),
    ] {
        match pki::certificate_info(&path) {
            Ok(i) => {
                let days = (i.not_after - now).whole_days();
                if i.not_after <= now {
                    add(
                        Level::Fail,
                        "certificates",
                        format!("the {what} has expired: {renew}"),
                    );
                } else if days < warn_days {
                    add(
                        Level::Warn,
                        "certificates",
                        format!("the {what} expires in {days} days: {renew}"),
                    );
                } else {
                    add(
                        Level::Ok,
                        "certificates",
                        format!("the {what} is valid for {days} more days"),
                    );
                }
            }
            Err(e) => add(Level::Fail, "certificates", format!("the {what}: {e}")),
        }
    }
}

fn accounts_and_alerts(
    db: Arc<bastion_security::db::SecurityDb>,
    dir: &DataDir,
    add: &mut Add<'_>,
) {
    // Reading users records nothing; the log only satisfies the type.
    match EventLog::open(&dir.events()) {
        Ok(events) => {
            let accounts = Accounts::new(db.clone(), Arc::new(events), AccountPolicy::default());
            match accounts.list_users() {
                Ok(users) => {
                    let admins: Vec<_> = users
                        .iter()
                        .filter(|u| u.role == Role::Admin && !u.disabled)
                        .collect();
                    if admins.is_empty() {
                        add(
                            Level::Warn,
                            "accounts",
                            "no enabled admin account: `bastion user add --role admin`".into(),
                        );
                    }
                    let no_totp: Vec<&str> = admins
                        .iter()
                        .filter(|u| !u.totp_enabled)
                        .map(|u| u.username.as_str())
                        .collect();
                    if no_totp.is_empty() {
                        add(
                            Level::Ok,
                            "accounts",
                            format!(
                                "{} accounts, {} admins, every admin has TOTP",
                                users.len(),
                                admins.len()
                            ),
                        );
                    } else {
                        add(
                            Level::Warn,
                            "accounts",
                            format!(
                                "admin accounts without a second factor (TOTP): {}",
                                no_totp.join(", ")
                            ),
                        );
                    }
                }
                Err(e) => add(Level::Fail, "accounts", e.to_string()),
            }
        }
        Err(e) => add(Level::Warn, "accounts", format!("not checked: {e}")),
    }
    match AlertStore::new(db).open_counts() {
        Ok(per_rule) => {
            // The posture page's split: high and medium need a look.
            let by_severity = bastion_web::admin::posture::open_by_severity(&per_rule);
            let urgent = by_severity[0].1 + by_severity[1].1;
            if urgent > 0 {
                add(
                    Level::Warn,
                    "alerts",
                    format!(
                        "{urgent} open high/medium-severity alerts: review them (`bastion alerts`)"
                    ),
                );
            } else {
                add(
                    Level::Ok,
                    "alerts",
                    "no open high/medium-severity alert".into(),
                );
            }
        }
        Err(e) => add(Level::Fail, "alerts", e.to_string()),
    }
}
