//! Reliable syslog export of audit messages (IHE ITI-20 Record Audit Event:
//! RFC 5424 messages over TLS, RFC 5425).
//!
//! The [`SyslogExporter`] follows the audit trail itself
//! ([`SyslogExporter::follow`]): a thread reads every record appended after
//! the last one spooled, by serve or by any CLI process (device and user
//! changes, `bastion import`, `audit verify`), and appends its audit
//! messages to an encrypted on-disk [`spool::Spool`], made durable; it
//! looks at the trail every [`FOLLOW_INTERVAL`] and whenever serve's own
//! trail appends ([`AuditSink::appended`]). Each spooled message carries
//! its trail record number, so after a crash or a restart following
//! resumes at the first message not yet spooled: every record reaches the
//! spool exactly once, including records appended while serve was down.
//! A second background thread sends the spooled messages, in order, to the
//! collector. While the collector is
//! unreachable the messages wait in the spool (reconnect with exponential
//! back-off, 1 s to 60 s); after a restart of Bastion the thread resumes at
//! the first message not known to be delivered. Nothing is lost across a
//! collector outage or a restart.
//!
//! **Delivery is at-least-once.** TCP syslog has no acknowledgement: a
//! write succeeds once the bytes are in the local socket buffer. A message
//! counts as delivered only when the connection was still healthy
//! [`CONFIRM_AFTER`] after it was written; when the connection breaks, every
//! message not yet confirmed is sent again on the next connection. So a
//! collector may receive a message twice, never zero times; duplicates carry
//! the same `[meta sequenceId="N"]` (RFC 5424 §7.3.1) and can be dropped by
//! it.
//!
//! Wire format of one message (RFC 5425 §4.3 octet-counting framing):
//!
//! ```text
//! LEN SP <PRI>1 TIMESTAMP HOSTNAME bastion PROCID IHE+RFC-3881 [meta sequenceId="N"] BOM MSG
//! ```
//!
//! PRI = facility 10 (authpriv) × 8 + severity (from the audit message's
//! EventOutcomeIndicator: 0 → notice, 4 → warning, 8 → error, 12 → critical);
//! MSG is the PS3.15 A.5 XML, UTF-8 with a BOM (RFC 5424 §6.4).
//!
//! This crate opens no socket: the binary provides a [`Collector`] (TLS
//! with Bastion's certificate as client certificate, collector verified
//! against a CA).

pub mod spool;

use std::{
    collections::VecDeque,
    io,
    path::Path,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use crate::{
    audit::{AuditReader, TrailCursor},
    events::Outcome,
    Result,
};
use spool::{Spool, SpooledMessage};

/// A message counts as delivered when the connection is still healthy this
/// long after it was written.
pub const CONFIRM_AFTER: Duration = Duration::from_secs(1);

/// First reconnect delay; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);

/// Longest delay between reconnect attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// RFC 5424 MSGID of IHE audit messages (IHE ITI TF-2 3.20.7.1).
pub const MSGID: &str = "IHE+RFC-3881";

/// Facility 10: security/authorization messages (authpriv).
const FACILITY_AUTHPRIV: u8 = 10;

/// How often [`SyslogExporter::follow`] looks for records appended to the
/// trail by other processes.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

/// Told when the audit trail grew (implemented by [`SyslogExporter`], which
/// then reads the new records from the trail itself).
pub trait AuditSink: Send + Sync {
    /// The trail now holds `count` records. Must not block.
    fn appended(&self, count: u64);
}

/// A way to reach the collector (provided by the binary: TLS over TCP).
pub trait Collector: Send + Sync {
    /// Opens a new connection.
    ///
    /// # Errors
    /// Any I/O or TLS failure; the exporter retries with back-off.
    fn connect(&self) -> io::Result<Box<dyn CollectorConnection>>;

    /// The collector's address, for logs.
    fn describe(&self) -> String;
}

/// One connection to the collector.
pub trait CollectorConnection: Send {
    /// Writes `bytes` (whole frames) and flushes them to the socket.
    ///
    /// # Errors
    /// The connection is unusable.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()>;

    /// Checks, without blocking, that the collector has not closed or reset
    /// the connection.
    ///
    /// # Errors
    /// The connection is closed or broken.
    fn probe(&mut self) -> io::Result<()>;
}

/// The fixed fields of the RFC 5424 header.
#[derive(Debug, Clone)]
pub struct Header {
    /// HOSTNAME (printable ASCII, at most 255; `-` when unknown).
    pub hostname: String,
    /// APP-NAME (`bastion`).
    pub app_name: String,
    /// PROCID (our process id).
    pub procid: String,
}

impl Header {
    /// `bastion`, this process' id and `hostname`.
    pub fn new(hostname: &str) -> Header {
        Header {
            hostname: hostname.to_owned(),
            app_name: "bastion".into(),
            procid: std::process::id().to_string(),
        }
    }
}

/// The exporter: spool + delivery thread. `Send + Sync`; share with `Arc`.
pub struct SyslogExporter {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    follower: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl SyslogExporter {
    /// Opens the spool in `spool_dir` (key: `MasterKey::derive("bastion
    /// syslog spool v1")`) and starts delivering to `collector`, beginning
    /// with the first message not yet delivered.
    ///
    /// # Errors
    /// The spool cannot be opened ([`crate::LogError::Io`],
    /// [`crate::LogError::Invalid`] when it does not decrypt).
    pub fn start(
        spool_dir: &Path,
        key: &[u8; 32],
        header: Header,
        collector: Arc<dyn Collector>,
    ) -> Result<Arc<SyslogExporter>> {
        let spool = Spool::open(spool_dir, key)?;
        let delivered = spool.delivered()?;
        let shared = Arc::new(Shared {
            health: crate::audit::AuditHealth::new(),
            events: Mutex::new(None),
            spool,
            header: sanitize_header(header),
            collector,
            state: Mutex::new(State {
                stop: None,
                delivered,
            }),
            wake: Condvar::new(),
            follow: Mutex::new(FollowState::default()),
            follow_wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("syslog".into())
            .spawn(move || run(&s))
            .map_err(|e| crate::io_err("start thread for", spool_dir)(e))?;
        Ok(Arc::new(SyslogExporter {
            shared,
            thread: Mutex::new(Some(thread)),
            follower: Mutex::new(None),
        }))
    }

    /// Starts following the audit trail read by `trail`: spools, in trail
    /// order, the messages of every record after the last one spooled (from
    /// the first record for a new spool), whoever appended it, then looks
    /// for new records every [`FOLLOW_INTERVAL`] and after each
    /// [`AuditSink::appended`]. A record that does not decrypt is logged
    /// and passed over (`bastion audit verify` names it); a spool or trail
    /// error is logged and retried from the same message.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn follow(&self, trail: AuditReader) -> Result<()> {
        let resume = self.shared.spool.last_source().unwrap_or((0, 0));
        let s = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("syslog-trail".into())
            .spawn(move || follow_run(&s, &trail, resume))
            .map_err(|e| crate::LogError::Invalid {
                what: "syslog trail follower",
                detail: e.to_string(),
            })?;
        *self.follower.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
        Ok(())
    }

    /// Records `syslog.export_stopped` (a Security Alert, 110133) when the
    /// spool cannot be written, and `syslog.export_resumed` (110134) when
    /// it can again, in `events` (serve's event log, hence the trail).
    pub fn set_events(&self, events: Arc<crate::events::EventLog>) {
        *self.shared.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(events);
    }

    /// Whether the spool is being written (`recording`) or export is
    /// stopped, and why (the posture page shows it).
    pub fn health(&self) -> Arc<crate::audit::AuditHealth> {
        self.shared.health.clone()
    }

    /// Spools one message with an explicit severity and timestamp.
    ///
    /// # Errors
    /// The spool write failed.
    pub fn spool(
        &self,
        severity: u8,
        timestamp: time::OffsetDateTime,
        source_seq: u64,
        message: &str,
    ) -> Result<u64> {
        let us = i64::try_from(timestamp.unix_timestamp_nanos() / 1000).unwrap_or(0);
        let seq = self
            .shared
            .spool
            .append(severity.min(7), us, source_seq, message)?;
        self.shared.wake.notify_all();
        Ok(seq)
    }

    /// Messages spooled and not yet confirmed delivered.
    pub fn backlog(&self) -> u64 {
        let delivered = self
            .shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .delivered;
        self.shared.spool.last_synced().saturating_sub(delivered)
    }

    /// Stops the delivery thread, first giving it up to `grace` to deliver
    /// and confirm what is spooled (what is left is sent after the next
    /// start).
    pub fn shutdown(&self, grace: Duration) {
        // The follower first spools what the trail holds now (serve's last
        // records), then the delivery thread gets its grace.
        self.shared
            .follow
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop = true;
        self.shared.follow_wake.notify_all();
        if let Some(t) = self
            .follower
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = t.join();
        }
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop = Some(Instant::now() + grace);
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl AuditSink for SyslogExporter {
    fn appended(&self, _count: u64) {
        self.shared
            .follow
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .nudged = true;
        self.shared.follow_wake.notify_all();
    }
}

/// RFC 5424 severity of an event outcome: success → notice (5), refused →
/// warning (4), failure → error (3), security alert → alert (1).
pub fn severity_of_outcome(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Success => 5,
        Outcome::Refused => 4,
        Outcome::Failure => 3,
        Outcome::Alert => 1,
    }
}

/// RFC 5424 severity of a PS3.15 A.5 message from its EventOutcomeIndicator
/// (0 success → notice, 4 minor failure → warning, 8 serious failure →
/// error, 12 major failure → critical; absent → notice).
pub fn severity_of_xml(xml: &str) -> u8 {
    let value = xml
        .find("EventOutcomeIndicator=\"")
        .map(|i| &xml[i + "EventOutcomeIndicator=\"".len()..])
        .and_then(|rest| rest.split('"').next());
    match value {
        Some("4") => 4,
        Some("8") => 3,
        Some("12") => 2,
        _ => 5,
    }
}

/// One framed message: `LEN SP SYSLOG-MSG` (RFC 5425 §4.3).
pub fn frame(header: &Header, m: &SpooledMessage) -> Vec<u8> {
    let pri = u16::from(FACILITY_AUTHPRIV) * 8 + u16::from(m.severity.min(7));
    let ts = timestamp(m.timestamp_us);
    // RFC 5424 §7.3.1: sequenceId is 1..=2147483647 and wraps to 1.
    let seq_id = (m.seq.saturating_sub(1) % 2_147_483_647) + 1;
    let mut msg = format!(
        "<{pri}>1 {ts} {} {} {} {MSGID} [meta sequenceId=\"{seq_id}\"] ",
        header.hostname, header.app_name, header.procid
    )
    .into_bytes();
    msg.extend_from_slice(b"\xEF\xBB\xBF");
    msg.extend_from_slice(m.message.as_bytes());
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(&msg);
    out
}

// ---------------------------------------------------------------------------

struct Shared {
    /// Whether the spool can be written (PS3.15 110133/110134 semantics for
    /// the export path).
    health: Arc<crate::audit::AuditHealth>,
    /// Where the stopped/resumed events go (serve's event log).
    events: Mutex<Option<Arc<crate::events::EventLog>>>,
    spool: Spool,
    header: Header,
    collector: Arc<dyn Collector>,
    state: Mutex<State>,
    wake: Condvar,
    follow: Mutex<FollowState>,
    follow_wake: Condvar,
}

#[derive(Default)]
struct FollowState {
    /// Set by `shutdown`: one last pass over the trail, then stop.
    stop: bool,
    /// Set by [`AuditSink::appended`]: look at the trail now.
    nudged: bool,
}

/// Follows the trail from `resume` (record number, messages of it already
/// spooled) until `shutdown`.
fn follow_run(shared: &Shared, trail: &AuditReader, mut resume: (u64, u32)) {
    let mut cursor: Option<TrailCursor> = None;
    let mut failing = false;
    loop {
        let stop = {
            let mut f = shared.follow.lock().unwrap_or_else(|p| p.into_inner());
            f.nudged = false;
            f.stop
        };
        match follow_once(shared, trail, &mut cursor, &mut resume) {
            Ok(()) => {
                if failing {
                    tracing::info!("syslog export follows the audit trail again");
                }
                failing = false;
                shared.health.resumed();
            }
            Err(e) => {
                // Retried from the same message on the next pass.
                cursor = None;
                if !failing {
                    tracing::error!(error = %e, record = resume.0,
                        "cannot export audit records to the syslog spool; retrying");
                }
                failing = true;
                shared.health.stopped(e);
            }
        }
        report_changes(shared);
        if stop {
            return;
        }
        let f = shared.follow.lock().unwrap_or_else(|p| p.into_inner());
        let _ = shared
            .follow_wake
            .wait_timeout_while(f, FOLLOW_INTERVAL, |f| !f.nudged && !f.stop);
    }
}

/// Records the spool's stopped/resumed changes as events (outside every
/// lock of the exporter: recording appends to the trail, which nudges the
/// follower).
fn report_changes(shared: &Shared) {
    let changes = shared.health.take_changes();
    if changes.is_empty() {
        return;
    }
    let Some(events) = shared
        .events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    else {
        return;
    };
    for c in changes {
        match c {
            crate::audit::RecordingChange::Stopped { reason } => events.record(
                "syslog.export_stopped",
                crate::events::Outcome::Alert,
                serde_json::json!({"reason": reason, "backlog_from_record": shared.spool.last_source().map(|s| s.0)}),
            ),
            crate::audit::RecordingChange::Resumed { stopped_secs } => events.record(
                "syslog.export_resumed",
                crate::events::Outcome::Success,
                serde_json::json!({"stopped_secs": stopped_secs}),
            ),
        }
    }
}

/// Spools the messages of every complete record the trail holds past
/// `resume`, advancing `resume` after each message.
fn follow_once(
    shared: &Shared,
    trail: &AuditReader,
    cursor: &mut Option<TrailCursor>,
    resume: &mut (u64, u32),
) -> std::result::Result<(), String> {
    let c = match cursor {
        Some(c) => c,
        None => cursor.insert(trail.read_from(resume.0).map_err(|e| e.to_string())?),
    };
    let mut unsynced = 0usize;
    while let Some((seq, rec)) = c.next_record().map_err(|e| e.to_string())? {
        if seq < resume.0 {
            continue;
        }
        let skip = if seq == resume.0 { resume.1 } else { 0 };
        let Some(rec) = rec else {
            tracing::error!(record = seq,
                "audit record does not decrypt: not exported to syslog (run `bastion audit verify`)");
            *resume = (seq, u32::MAX);
            continue;
        };
        let ts = rec
            .event
            .get("ts")
            .and_then(serde_json::Value::as_str)
            .and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
            .unwrap_or_else(time::OffsetDateTime::now_utc);
        let us = i64::try_from(ts.unix_timestamp_nanos() / 1000).unwrap_or(0);
        *resume = (
            seq,
            skip.min(u32::try_from(rec.messages.len()).unwrap_or(u32::MAX)),
        );
        for xml in rec.messages.iter().skip(skip as usize) {
            if xml.len() > spool::MAX_MESSAGE_BYTES {
                tracing::error!(
                    record = seq,
                    bytes = xml.len(),
                    "audit message too large for syslog export; not exported"
                );
            } else {
                shared
                    .spool
                    .append_unsynced(severity_of_xml(xml).min(7), us, seq, xml)
                    .map_err(|e| e.to_string())?;
                unsynced += 1;
            }
            resume.1 += 1;
            if unsynced >= BATCH {
                sync(shared, &mut unsynced)?;
            }
        }
    }
    sync(shared, &mut unsynced)
}

/// One `fdatasync` for the messages spooled since the last one; the
/// delivery thread is woken.
fn sync(shared: &Shared, unsynced: &mut usize) -> std::result::Result<(), String> {
    if *unsynced > 0 {
        shared.spool.sync().map_err(|e| e.to_string())?;
        *unsynced = 0;
        shared.wake.notify_all();
    }
    Ok(())
}

struct State {
    /// Set by `shutdown`: stop at this instant at the latest.
    stop: Option<Instant>,
    /// Last sequence number confirmed delivered.
    delivered: u64,
}

/// Messages read per send.
const BATCH: usize = 256;

/// How often an idle connection is probed (and confirmations advance).
const TICK: Duration = Duration::from_millis(200);

fn run(shared: &Shared) {
    let name = shared.collector.describe();
    let mut conn: Option<Box<dyn CollectorConnection>> = None;
    let mut backoff = MIN_BACKOFF;
    let mut next_attempt = Instant::now();
    let mut failures: u32 = 0;
    // Sent but unconfirmed: (last seq of a write, when).
    let mut unconfirmed: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut confirmed = shared
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .delivered;
    let mut persisted = confirmed;
    let mut reader = shared.spool.reader(confirmed + 1);
    loop {
        let stop = shared.state.lock().unwrap_or_else(|p| p.into_inner()).stop;
        let now = Instant::now();
        let pending = shared.spool.last_synced() > confirmed;
        if stop.is_some_and(|s| now >= s || !pending) {
            break;
        }
        if conn.is_none() {
            if now < next_attempt {
                wait(shared, (next_attempt - now).min(TICK));
                continue;
            }
            match shared.collector.connect() {
                Ok(c) => {
                    if failures > 0 {
                        tracing::info!(collector = %name, "syslog collector reachable again; sending the spooled messages");
                    }
                    conn = Some(c);
                    failures = 0;
                    backoff = MIN_BACKOFF;
                    unconfirmed.clear();
                    reader = shared.spool.reader(confirmed + 1);
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(collector = %name, error = %e, attempts = failures,
                            backlog = shared.spool.last_synced().saturating_sub(confirmed),
                            "syslog collector unreachable; audit messages are spooled");
                    }
                    next_attempt = now + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        if let Err(e) = c.probe() {
            tracing::warn!(collector = %name, error = %e, "syslog connection lost; unconfirmed messages will be sent again");
            conn = None;
            next_attempt = now + MIN_BACKOFF;
            continue;
        }
        // The connection is healthy now: what was written long enough ago
        // reached the collector.
        while let Some(&(seq, at)) = unconfirmed.front() {
            if now.duration_since(at) < CONFIRM_AFTER {
                break;
            }
            confirmed = seq;
            unconfirmed.pop_front();
        }
        if confirmed > persisted {
            match shared.spool.set_delivered(confirmed) {
                Ok(()) => {
                    persisted = confirmed;
                    shared
                        .state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .delivered = confirmed;
                }
                Err(e) => tracing::error!(error = %e, "cannot record syslog delivery progress"),
            }
        }
        let mut out = Vec::new();
        let mut last = None;
        for _ in 0..BATCH {
            match reader.next_message() {
                Ok(Some(m)) => {
                    out.extend_from_slice(&frame(&shared.header, &m));
                    last = Some(m.seq);
                }
                Ok(None) => break,
                Err(e) => {
                    // Unreadable spool: stop sending rather than skip
                    // silently; the error repeats in the log.
                    tracing::error!(error = %e, "syslog spool unreadable; export paused");
                    conn = None;
                    next_attempt = now + MAX_BACKOFF;
                    break;
                }
            }
        }
        let Some(last) = last else {
            if conn.is_some() {
                wait(shared, TICK);
            }
            continue;
        };
        let Some(c) = conn.as_mut() else { continue };
        match c.send(&out) {
            Ok(()) => unconfirmed.push_back((last, Instant::now())),
            Err(e) => {
                tracing::warn!(collector = %name, error = %e, "syslog send failed; will reconnect and resend");
                conn = None;
                next_attempt = Instant::now() + MIN_BACKOFF;
            }
        }
    }
}

fn wait(shared: &Shared, d: Duration) {
    let st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    let _ = shared.wake.wait_timeout(st, d);
}

fn sanitize_header(h: Header) -> Header {
    let clean = |s: &str, max: usize| {
        let v: String = s
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(max)
            .collect();
        if v.is_empty() {
            "-".to_owned()
        } else {
            v
        }
    };
    Header {
        hostname: clean(&h.hostname, 255),
        app_name: clean(&h.app_name, 48),
        procid: clean(&h.procid, 128),
    }
}

/// RFC 5424 TIMESTAMP (RFC 3339, UTC, microseconds).
fn timestamp(us: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A collector that records what it received, can be switched off, and
    /// loses whatever was written in the last moment before going down.
    #[derive(Default)]
    struct Fake {
        up: AtomicBool,
        received: Mutex<Vec<u8>>,
        generation: Mutex<u64>,
    }

    struct FakeConn {
        fake: Arc<Fake>,
        generation: u64,
    }

    struct FakeCollector(Arc<Fake>);

    impl Collector for FakeCollector {
        fn connect(&self) -> io::Result<Box<dyn CollectorConnection>> {
            if !self.0.up.load(Ordering::SeqCst) {
                return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "down"));
            }
            let generation = *self.0.generation.lock().expect("lock");
            Ok(Box::new(FakeConn {
                fake: self.0.clone(),
                generation,
            }))
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    impl CollectorConnection for FakeConn {
        fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
            // like TCP: the write "succeeds" even when the peer is gone
            if self.fake.up.load(Ordering::SeqCst)
                && *self.fake.generation.lock().expect("lock") == self.generation
            {
                self.fake
                    .received
                    .lock()
                    .expect("lock")
                    .extend_from_slice(bytes);
            }
            Ok(())
        }
        fn probe(&mut self) -> io::Result<()> {
            if self.fake.up.load(Ordering::SeqCst)
                && *self.fake.generation.lock().expect("lock") == self.generation
            {
                Ok(())
            } else {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"))
            }
        }
    }

    fn sequence_ids(bytes: &[u8]) -> Vec<u64> {
        let text = String::from_utf8_lossy(bytes);
        text.match_indices("sequenceId=\"")
            .filter_map(|(i, m)| {
                text[i + m.len()..]
                    .split('"')
                    .next()
                    .and_then(|n| n.parse().ok())
            })
            .collect()
    }

    fn wait_for(mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn frame_is_rfc5424_with_octet_counting() {
        let h = Header {
            hostname: "pacs.example.org".into(),
            app_name: "bastion".into(),
            procid: "42".into(),
        };
        let m = SpooledMessage {
            seq: 7,
            severity: 4,
            timestamp_us: 1_700_000_000_123_456,
            source_seq: 0,
            message: "<AuditMessage/>".into(),
        };
        let f = frame(&h, &m);
        let text = String::from_utf8(f).expect("utf8");
        let (len, rest) = text.split_once(' ').expect("len");
        assert_eq!(len.parse::<usize>().expect("n"), rest.len());
        assert_eq!(
            rest,
            "<84>1 2023-11-14T22:13:20.123456Z pacs.example.org bastion 42 IHE+RFC-3881 [meta sequenceId=\"7\"] \u{feff}<AuditMessage/>"
        );
        assert_eq!(severity_of_xml(r#"<E EventOutcomeIndicator="8"/>"#), 3);
        assert_eq!(severity_of_xml("<E/>"), 5);
    }

    #[test]
    fn every_message_arrives_across_an_outage_and_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Fake::default());
        fake.up.store(true, Ordering::SeqCst);
        let key = [9u8; 32];
        let start = || {
            SyslogExporter::start(
                dir.path(),
                &key,
                Header::new("h"),
                Arc::new(FakeCollector(fake.clone())),
            )
            .expect("start")
        };
        let ex = start();
        for i in 1..=5 {
            ex.spool(
                5,
                time::OffsetDateTime::now_utc(),
                i,
                &format!("<m n=\"{i}\"/>"),
            )
            .expect("spool");
        }
        wait_for(|| sequence_ids(&fake.received.lock().expect("lock")).len() >= 5);
        // the collector goes away; the messages written just before are lost
        fake.up.store(false, Ordering::SeqCst);
        *fake.generation.lock().expect("lock") += 1;
        for i in 6..=10 {
            ex.spool(
                5,
                time::OffsetDateTime::now_utc(),
                i,
                &format!("<m n=\"{i}\"/>"),
            )
            .expect("spool");
        }
        ex.shutdown(Duration::from_millis(100));
        drop(ex);
        let ex = start();
        for i in 11..=15 {
            ex.spool(
                5,
                time::OffsetDateTime::now_utc(),
                i,
                &format!("<m n=\"{i}\"/>"),
            )
            .expect("spool");
        }
        std::thread::sleep(Duration::from_millis(300));
        fake.up.store(true, Ordering::SeqCst);
        wait_for(|| ex.backlog() == 0);
        let ids = sequence_ids(&fake.received.lock().expect("lock"));
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique, (1..=15).collect::<Vec<_>>(), "{ids:?}");
        // in order: each first occurrence follows the previous one
        let mut firsts = Vec::new();
        for id in &ids {
            if !firsts.contains(id) {
                firsts.push(*id);
            }
        }
        assert_eq!(firsts, unique);
        ex.shutdown(Duration::from_secs(2));
    }
    /// Records appended by another process (a second `AuditTrail` on the
    /// same directory, no sink), while the exporter runs and while it is
    /// stopped, all reach the collector; the spool holds each message once.
    #[test]
    fn records_from_any_process_are_exported_once_across_restarts() {
        use crate::audit::{AuditIdentity, AuditKeys, AuditReader, AuditTrail, CheckpointPolicy};
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = dir.path().join("audit");
        let keys = Arc::new(
            AuditKeys::new(
                &[3u8; 32],
                ed25519_dalek::SigningKey::from_bytes(&[4u8; 32]),
            )
            .expect("keys"),
        );
        let identity = AuditIdentity {
            ae_title: "BASTION".into(),
            source_id: "BASTION@test".into(),
        };
        let cli = |n: std::ops::Range<u32>| {
            let t = AuditTrail::open(
                &audit,
                keys.clone(),
                identity.clone(),
                CheckpointPolicy::default(),
            )
            .expect("open");
            for i in n {
                let mut e = serde_json::Map::new();
                e.insert("ts".into(), "2026-11-30T12:00:00Z".into());
                e.insert("type".into(), "device.added".into());
                e.insert("outcome".into(), "success".into());
                e.insert("ae".into(), format!("MARK{i:03}").into());
                t.append(&e).expect("append");
            }
        };
        drop(
            AuditTrail::create(
                &audit,
                keys.clone(),
                identity.clone(),
                CheckpointPolicy::default(),
            )
            .expect("create"),
        );
        cli(0..3);
        let fake = Arc::new(Fake::default());
        fake.up.store(true, Ordering::SeqCst);
        let spool = dir.path().join("spool");
        let start = || {
            let ex = SyslogExporter::start(
                &spool,
                &[9u8; 32],
                Header::new("h"),
                Arc::new(FakeCollector(fake.clone())),
            )
            .expect("start");
            ex.follow(AuditReader::new(&audit, keys.clone()))
                .expect("follow");
            ex
        };
        let received = |i: u32| {
            String::from_utf8_lossy(&fake.received.lock().expect("lock"))
                .contains(&format!("\"MARK{i:03}\""))
        };
        let ex = start();
        wait_for(|| received(2));
        cli(3..5); // while serve runs: found by polling the trail
        wait_for(|| received(4));
        ex.shutdown(Duration::from_secs(2));
        drop(ex);
        cli(5..8); // while serve is stopped
        let ex = start();
        wait_for(|| received(7));
        wait_for(|| ex.backlog() == 0);
        ex.shutdown(Duration::from_secs(2));
        let text = String::from_utf8_lossy(&fake.received.lock().expect("lock")).into_owned();
        for i in 0..8 {
            let mark = format!("\"MARK{i:03}\"");
            let messages = text
                .split("sequenceId=")
                .filter(|m| m.contains(&mark))
                .count();
            assert_eq!(messages, 1, "MARK{i:03} in {text}");
        }
        let ids = sequence_ids(text.as_bytes());
        assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    }
}
