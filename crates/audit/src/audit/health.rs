//! Whether the audit trail is recording, and the gate the network fronts
//! consult before serving patient data (issue 10, finding 1).
//!
//! The trail keeps [`RESERVE_BYTES`] allocated past the end of its records
//! file (`fallocate(2)` with `FALLOC_FL_KEEP_SIZE`: the file's length does
//! not change, the blocks are its own). While the reserve can be topped up
//! the trail is *recording*. When it cannot (the file system is full) or an
//! append fails, the trail is *stopped*: records still go into the reserve
//! (the refusals themselves and the PS3.15 Security Alert "Audit Recording
//! Stopped", EventTypeCode 110133), and [`AuditGate::refuses`] tells the
//! DIMSE and HTTP fronts to refuse every operation on patient data with the
//! protocol's "out of resources" until the reserve can be topped up again
//! (then 110134 "Audit Recording Started"). A site may choose availability
//! over accountability with `[audit] allow_unaudited_access = true`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes kept allocated past the end of `DIR/audit/records` (about 2,000
/// records of 1.7 KB): room for the refusals and the stopped/started
/// alerts on a full disk.
pub const RESERVE_BYTES: u64 = 4 << 20;

/// Bytes kept allocated past the end of `DIR/audit/checkpoints`.
pub const CHECKPOINT_RESERVE_BYTES: u64 = 64 << 10;

/// A change of the recording state, reported once by
/// [`AuditHealth::take_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordingChange {
    /// Recording stopped (110133): why, e.g. "no space left on device".
    Stopped {
        /// What failed (an OS error and the file; never patient data).
        reason: String,
    },
    /// Recording works again (110134) after `stopped_secs` seconds.
    Resumed {
        /// How long recording was stopped, seconds.
        stopped_secs: u64,
    },
}

/// The recording state of one trail (or of the syslog spool), shared by the
/// writer and the readers of the state. Cheap to read (one atomic load).
#[derive(Debug)]
pub struct AuditHealth {
    recording: AtomicBool,
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    since: Option<std::time::Instant>,
    reason: Option<String>,
    changes: Vec<RecordingChange>,
}

impl Default for AuditHealth {
    fn default() -> Self {
        AuditHealth {
            recording: AtomicBool::new(true),
            state: Mutex::new(HealthState::default()),
        }
    }
}

impl AuditHealth {
    /// A new state: recording.
    pub fn new() -> Arc<AuditHealth> {
        Arc::new(AuditHealth::default())
    }

    /// `true` while records are written with room to spare.
    pub fn recording(&self) -> bool {
        self.recording.load(Ordering::Acquire)
    }

    /// Why recording stopped, while it is stopped.
    pub fn reason(&self) -> Option<String> {
        if self.recording() {
            return None;
        }
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reason
            .clone()
    }

    /// Marks recording stopped (a change is queued only on the transition).
    pub fn stopped(&self, reason: impl Into<String>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.recording.swap(false, Ordering::AcqRel) {
            let reason = reason.into();
            tracing::error!(%reason, "audit recording stopped");
            st.since = Some(std::time::Instant::now());
            st.reason = Some(reason.clone());
            st.changes.push(RecordingChange::Stopped { reason });
        }
    }

    /// Marks recording working (a change is queued only on the transition).
    pub fn resumed(&self) {
        if self.recording() {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !self.recording.swap(true, Ordering::AcqRel) {
            let stopped_secs = st.since.take().map_or(0, |s| s.elapsed().as_secs());
            st.reason = None;
            tracing::warn!(stopped_secs, "audit recording resumed");
            st.changes.push(RecordingChange::Resumed { stopped_secs });
        }
    }

    /// The changes since the last call, oldest first (serve records each as
    /// an event: `audit.recording_stopped` / `audit.recording_resumed`).
    pub fn take_changes(&self) -> Vec<RecordingChange> {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()).changes)
    }
}

/// What the network fronts ask before an operation that produces an audit
/// record: refuse it while the trail cannot record, unless the site set
/// `[audit] allow_unaudited_access = true`.
#[derive(Debug, Clone)]
pub struct AuditGate {
    health: Arc<AuditHealth>,
    allow_unaudited: bool,
    export: Option<Arc<AuditHealth>>,
}

impl AuditGate {
    /// A gate over `health`; `allow_unaudited` is the site's
    /// `[audit] allow_unaudited_access`.
    pub fn new(health: Arc<AuditHealth>, allow_unaudited: bool) -> AuditGate {
        AuditGate {
            health,
            allow_unaudited,
            export: None,
        }
    }

    /// The same gate, also reporting the syslog export's state (which
    /// never refuses service: the spool catches up without gaps).
    pub fn with_export(mut self, export: Arc<AuditHealth>) -> AuditGate {
        self.export = Some(export);
        self
    }

    /// The syslog export's state, when export is configured.
    pub fn export_health(&self) -> Option<&Arc<AuditHealth>> {
        self.export.as_ref()
    }

    /// `true` when patient data must not be served now: the trail is not
    /// recording and unaudited access is not allowed. DIMSE answers
    /// A-ASSOCIATE-RJ 2/1/1 (transient) to new associations and 0xA700 /
    /// 0xA701 / 0xA702 to requests; HTTP answers 503 with `Retry-After`.
    pub fn refuses(&self) -> bool {
        !self.allow_unaudited && !self.health.recording()
    }

    /// The recording state behind the gate.
    pub fn health(&self) -> &Arc<AuditHealth> {
        &self.health
    }

    /// Whether the site allows unaudited access.
    pub fn allows_unaudited(&self) -> bool {
        self.allow_unaudited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_are_reported_once_and_the_gate_follows_them() {
        let h = AuditHealth::new();
        let gate = AuditGate::new(h.clone(), false);
        let lenient = AuditGate::new(h.clone(), true);
        assert!(!gate.refuses());
        h.stopped("no space left on device");
        h.stopped("again");
        assert!(gate.refuses());
        assert!(!lenient.refuses());
        assert_eq!(h.reason().as_deref(), Some("no space left on device"));
        h.resumed();
        h.resumed();
        assert!(!gate.refuses());
        let changes = h.take_changes();
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(
            matches!(&changes[0], RecordingChange::Stopped { reason } if reason == "no space left on device")
        );
        assert!(matches!(changes[1], RecordingChange::Resumed { .. }));
        assert!(h.take_changes().is_empty());
    }
}
