//! The append-only security event log, `DIR/events/events.log`.
//!
//! One JSON object per line: `ts` (RFC 3339 UTC), `type` (e.g.
//! `association.rejected`), `outcome` (`success`, `refused`, `failure`,
//! `alert`), then event fields. Fields hold AE titles, addresses, UIDs,
//! statuses and reasons, never patient names or IDs. The shape follows the
//! DICOM audit message (PS3.15 A.5: who, what, outcome, objects) so a later
//! audit trail can convert each record.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use crate::{io_err, Result};

/// Outcome of an event (PS3.15 A.5 EventOutcomeIndicator lineage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The action succeeded.
    Success,
    /// A policy refused it.
    Refused,
    /// It failed for a technical reason.
    Failure,
    /// A security alert (suspicious input or behaviour).
    Alert,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Refused => "refused",
            Outcome::Failure => "failure",
            Outcome::Alert => "alert",
        }
    }
}

/// The reserved event key under which [`EventLog::record_private`] hands
/// observers what must never reach `events.log` (a query's identifier, which
/// names patients). The log writer always strips it; the audit trail keeps
/// it, encrypted.
pub const PRIVATE_KEY: &str = "private";

/// Something that sees every event as it is recorded (the audit trail, the
/// detection rules), in the order of [`EventLog::record`] calls. Called on
/// the recording thread: keep it short and never block on the network.
pub trait EventObserver: Send + Sync {
    /// One event: the same object as the log line (`ts`, `type`, `outcome`,
    /// then the event's fields), plus [`PRIVATE_KEY`] when the event was
    /// recorded with [`EventLog::record_private`].
    fn observe(&self, event: &serde_json::Map<String, serde_json::Value>);
}

/// The event log. `Send + Sync`; each record is one `write` on an
/// `O_APPEND` file, so concurrent processes (serve and the CLI) interleave
/// whole lines.
pub struct EventLog {
    path: PathBuf,
    file: Mutex<File>,
    observers: RwLock<Vec<Arc<dyn EventObserver>>>,
    gate: RwLock<Option<crate::audit::AuditGate>>,
    failing: std::sync::atomic::AtomicBool,
}

impl EventLog {
    /// Opens (creating, mode 0600) the log file.
    ///
    /// # Errors
    /// [`crate::LogError::Io`] when the file cannot be opened.
    pub fn open(path: &Path) -> Result<EventLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err("open", path))?;
        terminate_torn_line(&mut file, path);
        Ok(EventLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            observers: RwLock::new(Vec::new()),
            gate: RwLock::new(None),
            failing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Sets the audit gate the network fronts consult
    /// ([`EventLog::refuses_unaudited`]); serve sets it from its trail.
    pub fn set_audit_gate(&self, gate: crate::audit::AuditGate) {
        *self.gate.write().unwrap_or_else(|p| p.into_inner()) = Some(gate);
    }

    /// The audit gate, when one is set.
    pub fn audit_gate(&self) -> Option<crate::audit::AuditGate> {
        self.gate.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `true` while operations that would produce an audit record must be
    /// refused: the audit trail cannot record and the site did not set
    /// `[audit] allow_unaudited_access` (see [`crate::audit::AuditGate`]).
    /// Always `false` without a gate (CLI processes, tests).
    pub fn refuses_unaudited(&self) -> bool {
        self.gate
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(crate::audit::AuditGate::refuses)
    }

    /// Adds an observer: every later event is passed to it after it is
    /// written to the log.
    pub fn add_observer(&self, observer: Arc<dyn EventObserver>) {
        self.observers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(observer);
    }

    /// Appends one event. `fields` must be a JSON object; it must not hold
    /// patient data. A write failure is reported through `tracing` and does
    /// not fail the caller's operation (the event is also in the log stream).
    pub fn record(&self, kind: &str, outcome: Outcome, fields: serde_json::Value) {
        self.record_private(kind, outcome, fields, serde_json::Value::Null);
    }

    /// Appends one event as [`EventLog::record`], and hands `private` (when
    /// not `null`) to the observers only, under [`PRIVATE_KEY`]: it is never
    /// written to the log. A [`PRIVATE_KEY`] field in `fields` is treated the
    /// same way (stripped from the line, replaced by `private` when given).
    pub fn record_private(
        &self,
        kind: &str,
        outcome: Outcome,
        fields: serde_json::Value,
        private: serde_json::Value,
    ) {
        let ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut obj = serde_json::Map::new();
        obj.insert("ts".into(), ts.into());
        obj.insert("type".into(), kind.into());
        obj.insert("outcome".into(), outcome.name().into());
        if let serde_json::Value::Object(m) = fields {
            obj.extend(m);
        }
        let mut hidden = obj.remove(PRIVATE_KEY);
        if !private.is_null() {
            hidden = Some(private);
        }
        let mut line = serde_json::to_string(&obj).unwrap_or_default();
        line.push('\n');
        {
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = f.write_all(line.as_bytes()) {
                // Once per failure streak (a full disk fails every event).
                if !self
                    .failing
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::error!(path = %self.path.display(), error = %e, "cannot append to the event log (further failures are not logged until it works again)");
                }
                // A partial line (a full disk) is ended here so the next
                // event starts on a line of its own; readers skip the torn one.
                let _ = f.write_all(b"\n");
            } else if self
                .failing
                .swap(false, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(path = %self.path.display(), "the event log is written again");
            }
        }
        if let Some(h) = hidden {
            obj.insert(PRIVATE_KEY.into(), h);
        }
        for o in self
            .observers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            o.observe(&obj);
        }
    }

    /// Reads every event (for tests and `bastion events`); lines that are
    /// not whole JSON objects (a write interrupted by a crash or a full
    /// disk) are skipped.
    ///
    /// # Errors
    /// [`crate::LogError::Io`] when the file cannot be read.
    pub fn read_all(&self) -> Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(&self.path).map_err(io_err("read", &self.path))?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

/// Ends a last line left without its newline (a write interrupted by a crash
/// or a full disk), so the next event is a line of its own. Other processes
/// may append concurrently, so nothing is cut: the torn line stays, and
/// readers skip it.
fn terminate_torn_line(file: &mut File, path: &Path) {
    use std::os::unix::fs::FileExt;
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return;
    };
    if len == 0 {
        return;
    }
    let mut last = [0u8; 1];
    if file.read_exact_at(&mut last, len - 1).is_ok() && last[0] != b'\n' {
        tracing::warn!(path = %path.display(), "event log: ended a line whose write was interrupted");
        if let Err(e) = file.write_all(b"\n") {
            tracing::error!(path = %path.display(), error = %e, "cannot end the event log's torn line");
        }
    }
}
