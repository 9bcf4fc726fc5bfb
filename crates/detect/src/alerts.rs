//! Alert records and the live detector.
//!
//! - [`AlertStore`]: alerts persisted in the security database (SQLCipher,
//!   table `alerts`): id (stable, never reused), time, rule, severity,
//!   summary, details (JSON), the evidence (summaries of the events that
//!   raised it, [`crate::detect::evidence`]), the count of findings grouped
//!   into it and the time of the latest, and the acknowledgement (who, when,
//!   comment), one at a time or in bulk ([`AlertStore::acknowledge_many`]).
//! - [`Detection`]: the [`EventObserver`] that feeds every event to the
//!   [`Rules`] on a thread of its own (a bounded queue: recording an event
//!   never waits for detection, the database or the network), stores each
//!   finding (a finding of the same rule and source as an open alert's
//!   latest, within the rules' quiet period, updates that alert's count
//!   instead of opening another: one burst, one alert), records it as a
//!   `security.alert` event, and tells the notifiers (the webhook) at most
//!   once per source per [`crate::detect::DetectConfig::notify_interval`]
//!   unless the severity rises; it also keeps the Prometheus counters
//!   ([`Detection::metrics_text`]).
//!
//! Alerts name accounts, AE titles, addresses and UIDs, never patients.

use crate::DbExt;
use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex, RwLock,
    },
    thread::JoinHandle,
};

use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use serde_json::{json, Map, Value};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use crate::{
    db::SecurityDb,
    detect::{source_of, Finding, PatientResolver, Rule, Rules, MAX_EVIDENCE},
    events::{EventLog, EventObserver, Outcome},
    DetectError, Result,
};

/// One alert record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// Stable id (1, 2, …).
    pub id: i64,
    /// When the triggering event happened (RFC 3339, UTC).
    pub ts: String,
    /// The rule's name ([`Rule::name`]).
    pub rule: String,
    /// `high`, `medium` or `low`.
    pub severity: String,
    /// One line for people.
    pub summary: String,
    /// Rule-specific fields: those of the first finding; for a group, also
    /// `"varied"`: each field whose value differed between the findings with
    /// its distinct values (at most [`MAX_VARIED_VALUES`] each).
    pub details: Value,
    /// Findings grouped into this alert (1 for a single one).
    pub count: i64,
    /// When the latest grouped finding happened (RFC 3339, UTC).
    pub last_ts: String,
    /// `open` or `acknowledged`.
    pub status: String,
    /// Acknowledgement, when acknowledged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack: Option<Ack>,
}

/// Who acknowledged an alert, when, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ack {
    /// RFC 3339, UTC.
    pub ts: String,
    /// The acting (OS or web) user.
    pub by: String,
    /// The operator's comment.
    pub comment: String,
}

/// Distinct values kept per varying detail field of a grouped alert.
pub const MAX_VARIED_VALUES: usize = 100;

/// Which open alerts a bulk acknowledgement covers: every condition given
/// must hold (none given: every open alert).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckFilter {
    /// Only these ids.
    pub ids: Option<Vec<i64>>,
    /// Only alerts of this rule ([`Rule::name`]).
    pub rule: Option<String>,
    /// Only alerts raised before this time.
    pub before: Option<OffsetDateTime>,
}

impl AckFilter {
    fn matches(&self, id: i64, rule: &str, ts: &str) -> bool {
        let ids_ok = self.ids.as_ref().is_none_or(|ids| ids.contains(&id));
        let rule_ok = self.rule.as_deref().is_none_or(|r| r == rule);
        let before_ok = self
            .before
            .is_none_or(|b| OffsetDateTime::parse(ts, &Rfc3339).is_ok_and(|t| t < b));
        ids_ok && rule_ok && before_ok
    }
}

/// The alert table of the security database.
#[derive(Clone)]
pub struct AlertStore {
    db: Arc<SecurityDb>,
}

impl AlertStore {
    /// The store over an open security database (migrated to the `alerts` table).
    pub fn new(db: Arc<SecurityDb>) -> AlertStore {
        AlertStore { db }
    }

    /// Stores a finding and returns its record.
    ///
    /// # Errors
    /// [`DetectError::Db`].
    pub fn insert(&self, f: &Finding) -> Result<Alert> {
        let ts = f.ts.format(&Rfc3339).unwrap_or_default();
        let details = Value::Object(f.details.clone()).to_string();
        let evidence = Value::Array(f.evidence.clone()).to_string();
        let id = self.db.with(|c| {
            c.execute(
                "INSERT INTO alerts (ts, rule, severity, summary, details, evidence, count, last_ts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?1)",
                params![
                    ts,
                    f.rule.name(),
                    f.rule.severity(),
                    f.summary,
                    details,
                    evidence
                ],
            )
            .map_err(db_err("insert alert"))?;
            Ok(c.last_insert_rowid())
        })?;
        Ok(Alert {
            id,
            ts: ts.clone(),
            rule: f.rule.name().into(),
            severity: f.rule.severity().into(),
            summary: f.summary.clone(),
            details: Value::Object(f.details.clone()),
            count: 1,
            last_ts: ts,
            status: "open".into(),
            ack: None,
        })
    }

    /// Adds finding `f` to open alert `id` (one more of the same burst): the
    /// count grows, `last_ts` moves to the finding's time, the evidence gets
    /// the finding's events not already there (oldest first, the last
    /// [`MAX_EVIDENCE`] kept) and the details'
    /// `"varied"` gets each value that differs from the first finding's.
    /// `None` when the alert is acknowledged or gone (open a new one).
    ///
    /// # Errors
    /// [`DetectError::Db`].
    pub fn group(&self, id: i64, f: &Finding) -> Result<Option<Alert>> {
        let ts = f.ts.format(&Rfc3339).unwrap_or_default();
        let updated = self.db.with(|c| {
            let row: Option<(String, String)> = c
                .query_row(
                    "SELECT details, evidence FROM alerts WHERE id = ?1 AND ack_ts IS NULL",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(db_err("read alert"))?;
            let Some((details, evidence)) = row else {
                return Ok(false);
            };
            let mut details = match serde_json::from_str(&details) {
                Ok(Value::Object(m)) => m,
                _ => Map::new(),
            };
            merge_varied(&mut details, &f.details);
            let mut evidence = match serde_json::from_str(&evidence) {
                Ok(Value::Array(v)) => v,
                _ => Vec::new(),
            };
            // Windowed rules hand the same events to successive findings:
            // each once, oldest first.
            for item in &f.evidence {
                if !evidence.contains(item) {
                    evidence.push(item.clone());
                }
            }
            evidence.sort_by(|a, b| a["ts"].as_str().cmp(&b["ts"].as_str()));
            let skip = evidence.len().saturating_sub(MAX_EVIDENCE);
            let evidence: Vec<Value> = evidence.into_iter().skip(skip).collect();
            c.execute(
                "UPDATE alerts SET count = count + 1, last_ts = ?2, details = ?3, evidence = ?4
                 WHERE id = ?1 AND ack_ts IS NULL",
                params![
                    id,
                    ts,
                    Value::Object(details).to_string(),
                    Value::Array(evidence).to_string()
                ],
            )
            .map(|n| n == 1)
            .map_err(db_err("group alert"))
        })?;
        if updated {
            self.get(id)
        } else {
            Ok(None)
        }
    }

    /// Alerts, open ones first, newest first within each group; acknowledged
    /// ones only when `all`. At most `limit`.
    ///
    /// # Errors
    /// [`DetectError::Db`].
    pub fn list(&self, all: bool, limit: usize) -> Result<Vec<Alert>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.db.with(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT id, ts, rule, severity, summary, details, ack_ts, ack_by, ack_comment,
                            count, last_ts
                     FROM alerts WHERE (?1 OR ack_ts IS NULL)
                     ORDER BY ack_ts IS NOT NULL, id DESC LIMIT ?2",
                )
                .map_err(db_err("list alerts"))?;
            let rows = stmt
                .query_map(params![all, limit], row_to_alert)
                .map_err(db_err("list alerts"))?;
            rows.collect::<std::result::Result<Vec<_>, _>>()
                .map_err(db_err("list alerts"))
        })
    }

    /// One alert.
    ///
    /// # Errors
    /// [`DetectError::Db`].
    pub fn get(&self, id: i64) -> Result<Option<Alert>> {
        self.db.with(|c| {
            c.query_row(
                "SELECT id, ts, rule, severity, summary, details, ack_ts, ack_by, ack_comment,
                        count, last_ts
                 FROM alerts WHERE id = ?1",
                [id],
                row_to_alert,
            )
            .optional()
            .map_err(db_err("read alert"))
        })
    }

    /// The evidence of alert `id`: summaries of the events that raised it
    /// ([`crate::detect::evidence`]), oldest first; empty for alerts
    /// raised before evidence was kept.
    ///
    /// # Errors
    /// [`DetectError::NoSuchAlert`], [`DetectError::Db`].
    pub fn evidence(&self, id: i64) -> Result<Vec<Value>> {
        let raw: Option<String> = self.db.with(|c| {
            c.query_row("SELECT evidence FROM alerts WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err("read alert evidence"))
        })?;
        let raw = raw.ok_or(DetectError::NoSuchAlert(id))?;
        Ok(match serde_json::from_str(&raw) {
            Ok(Value::Array(items)) => items,
            _ => Vec::new(),
        })
    }

    /// Acknowledges alert `id` (`by`: the acting user; `comment`: why).
    /// Acknowledging twice keeps the first acknowledgement.
    ///
    /// # Errors
    /// [`DetectError::NoSuchAlert`], [`DetectError::Invalid`] for an
    /// empty comment, [`DetectError::Db`].
    pub fn ack(&self, id: i64, by: &str, comment: &str) -> Result<Alert> {
        self.acknowledge(id, by, comment).map(|(a, _)| a)
    }

    /// As [`AlertStore::ack`], and whether this call acknowledged it
    /// (`false`: it was already acknowledged, and keeps the first
    /// acknowledgement).
    ///
    /// # Errors
    /// As [`AlertStore::ack`].
    pub fn acknowledge(&self, id: i64, by: &str, comment: &str) -> Result<(Alert, bool)> {
        let comment = comment.trim();
        if comment.is_empty() {
            return Err(DetectError::Invalid {
                what: "comment",
                detail: "say why the alert is acknowledged".into(),
            });
        }
        let ts = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        let n = self.db.with(|c| {
            c.execute(
                "UPDATE alerts SET ack_ts = ?2, ack_by = ?3, ack_comment = ?4 WHERE id = ?1 AND ack_ts IS NULL",
                params![id, ts, by, comment],
            )
            .map_err(db_err("acknowledge alert"))
        })?;
        match self.get(id)? {
            Some(a) if n == 1 || a.ack.is_some() => Ok((a, n == 1)),
            _ => Err(DetectError::NoSuchAlert(id)),
        }
    }

    /// Acknowledges every open alert `filter` covers, at once, with the
    /// same `by` and `comment`; returns their ids (ascending; empty when
    /// none matched).
    ///
    /// # Errors
    /// [`DetectError::Invalid`] for an empty comment, [`DetectError::Db`].
    pub fn acknowledge_many(
        &self,
        filter: &AckFilter,
        by: &str,
        comment: &str,
    ) -> Result<Vec<i64>> {
        let comment = comment.trim();
        if comment.is_empty() {
            return Err(DetectError::Invalid {
                what: "comment",
                detail: "say why the alerts are acknowledged".into(),
            });
        }
        let now = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        self.db.with(|c| {
            let tx =
                rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)
                    .map_err(db_err("acknowledge alerts"))?;
            let open: Vec<(i64, String, String)> = {
                let mut stmt = tx
                    .prepare("SELECT id, rule, ts FROM alerts WHERE ack_ts IS NULL ORDER BY id")
                    .map_err(db_err("acknowledge alerts"))?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .map_err(db_err("acknowledge alerts"))?;
                rows.collect::<std::result::Result<_, _>>()
                    .map_err(db_err("acknowledge alerts"))?
            };
            let mut done = Vec::new();
            for (id, rule, ts) in open {
                if !filter.matches(id, &rule, &ts) {
                    continue;
                }
                let n = tx
                    .execute(
                        "UPDATE alerts SET ack_ts = ?2, ack_by = ?3, ack_comment = ?4
                         WHERE id = ?1 AND ack_ts IS NULL",
                        params![id, now, by, comment],
                    )
                    .map_err(db_err("acknowledge alerts"))?;
                if n == 1 {
                    done.push(id);
                }
            }
            tx.commit().map_err(db_err("acknowledge alerts"))?;
            Ok(done)
        })
    }

    /// Open alerts per rule.
    ///
    /// # Errors
    /// [`DetectError::Db`].
    pub fn open_counts(&self) -> Result<BTreeMap<String, u64>> {
        self.db.with(|c| {
            let mut stmt = c
                .prepare("SELECT rule, count(*) FROM alerts WHERE ack_ts IS NULL GROUP BY rule")
                .map_err(db_err("count alerts"))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(db_err("count alerts"))?;
            let mut out = BTreeMap::new();
            for r in rows {
                let (rule, n) = r.map_err(db_err("count alerts"))?;
                out.insert(rule, u64::try_from(n).unwrap_or(0));
            }
            Ok(out)
        })
    }
}

fn row_to_alert(r: &rusqlite::Row<'_>) -> rusqlite::Result<Alert> {
    let details: String = r.get(5)?;
    let ack_ts: Option<String> = r.get(6)?;
    let ack = match ack_ts {
        Some(ts) => Some(Ack {
            ts,
            by: r.get::<_, Option<String>>(7)?.unwrap_or_default(),
            comment: r.get::<_, Option<String>>(8)?.unwrap_or_default(),
        }),
        None => None,
    };
    let ts: String = r.get(1)?;
    Ok(Alert {
        id: r.get(0)?,
        rule: r.get(2)?,
        severity: r.get(3)?,
        summary: r.get(4)?,
        details: serde_json::from_str(&details).unwrap_or(Value::Null),
        count: r.get(9)?,
        last_ts: r
            .get::<_, Option<String>>(10)?
            .unwrap_or_else(|| ts.clone()),
        ts,
        status: if ack.is_some() {
            "acknowledged"
        } else {
            "open"
        }
        .into(),
        ack,
    })
}

/// Records in `details["varied"]` each value of `new` that differs from the
/// first finding's (`details`), distinct, at most [`MAX_VARIED_VALUES`] per
/// field: the AE titles a scanner tried, the accounts a spray guessed.
fn merge_varied(details: &mut Map<String, Value>, new: &Map<String, Value>) {
    let mut varied = match details.remove("varied") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    for (k, v) in new {
        let first = details.get(k);
        if first == Some(v) || !(v.is_string() || v.is_number()) {
            continue;
        }
        let list = varied
            .entry(k.clone())
            .or_insert_with(|| Value::Array(first.cloned().into_iter().collect()));
        if let Value::Array(a) = list {
            if a.len() < MAX_VARIED_VALUES && !a.contains(v) {
                a.push(v.clone());
            }
        }
    }
    if !varied.is_empty() {
        details.insert("varied".into(), Value::Object(varied));
    }
}

fn db_err(op: &'static str) -> impl Fn(rusqlite::Error) -> DetectError {
    move |source| DetectError::Db { op, source }
}

/// Something told of every new alert (the webhook). Called on the detector's
/// thread: hand the alert over and return.
pub type Notifier = Box<dyn Fn(&Alert) + Send + Sync>;

/// Events waiting for the detector at most; more are dropped (and counted).
const QUEUE: usize = 65_536;
/// Distinct event types counted by name at most (others count as `other`).
const MAX_EVENT_TYPES: usize = 256;

enum Msg {
    Event(Box<Map<String, Value>>),
    Flush(mpsc::SyncSender<()>),
}

/// The live detector: an [`EventObserver`] to add to every [`EventLog`] of
/// the process. Dropping the last handle drains the queue and stops the
/// thread.
pub struct Detection {
    tx: Mutex<Option<mpsc::SyncSender<Msg>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
}

struct Shared {
    store: AlertStore,
    /// Where `security.alert` events are recorded.
    events: RwLock<Option<Arc<EventLog>>>,
    notifiers: RwLock<Vec<Notifier>>,
    counters: Mutex<Counters>,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Counters {
    events: BTreeMap<(String, String), u64>,
    alerts: BTreeMap<String, u64>,
    associations_rejected: u64,
    logins_failed: u64,
}

impl Detection {
    /// Starts the detector thread with `rules`, storing alerts in `store`.
    /// `patients` maps Study Instance UIDs to opaque patient keys (for
    /// `bulk_retrieval`); `None` counts studies only.
    ///
    /// # Errors
    /// [`DetectError::Io`] when the thread cannot be started.
    pub fn start(
        rules: Rules,
        store: AlertStore,
        patients: Option<Box<PatientResolver>>,
    ) -> Result<Arc<Detection>> {
        let shared = Arc::new(Shared {
            store,
            events: RwLock::new(None),
            notifiers: RwLock::new(Vec::new()),
            counters: Mutex::new(Counters::default()),
            dropped: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUE);
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("bastion-detect".into())
            .spawn(move || run(rules, rx, &s, patients.as_deref()))
            .map_err(|source| DetectError::Io {
                op: "start the detector thread",
                path: std::path::PathBuf::new(),
                source,
            })?;
        Ok(Arc::new(Detection {
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
            shared,
        }))
    }

    /// Records each alert as a `security.alert` event in `events` (which may
    /// be one of the logs this detector observes: it ignores its own alerts).
    pub fn record_alerts_to(&self, events: Arc<EventLog>) {
        *self
            .shared
            .events
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(events);
    }

    /// Adds a notifier told of every new alert.
    pub fn add_notifier(&self, n: Notifier) {
        self.shared
            .notifiers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(n);
    }

    /// The alert store.
    pub fn store(&self) -> &AlertStore {
        &self.shared.store
    }

    /// Waits until every event observed so far has been evaluated (tests,
    /// and short-lived CLI processes before they exit).
    pub fn flush(&self) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(tx) = tx {
            let (done, wait) = mpsc::sync_channel(1);
            if tx.send(Msg::Flush(done)).is_ok() {
                let _ = wait.recv();
            }
        }
    }

    /// Stops the thread after it has drained the queue.
    pub fn stop(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(w) = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }

    /// The counters in the Prometheus text exposition format (version
    /// 0.0.4): events by type and outcome, alerts raised by rule since start,
    /// open alerts by rule, rejected associations, failed logins, events the
    /// detector had to drop.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let c = self
            .shared
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP bastion_events_total Security events recorded since start, by type and outcome.\n# TYPE bastion_events_total counter"
        );
        for ((kind, outcome), n) in &c.events {
            let _ = writeln!(
                out,
                "bastion_events_total{{type=\"{}\",outcome=\"{}\"}} {n}",
                label(kind),
                label(outcome)
            );
        }
        let _ = writeln!(
            out,
            "# HELP bastion_alerts_total Alerts raised since start, by rule.\n# TYPE bastion_alerts_total counter"
        );
        for rule in Rule::ALL {
            let n = c.alerts.get(rule.name()).copied().unwrap_or(0);
            let _ = writeln!(out, "bastion_alerts_total{{rule=\"{}\"}} {n}", rule.name());
        }
        let _ = writeln!(
            out,
            "# HELP bastion_associations_rejected_total DICOM associations rejected since start.\n# TYPE bastion_associations_rejected_total counter\nbastion_associations_rejected_total {}",
            c.associations_rejected
        );
        let _ = writeln!(
            out,
            "# HELP bastion_logins_failed_total Failed web logins since start.\n# TYPE bastion_logins_failed_total counter\nbastion_logins_failed_total {}",
            c.logins_failed
        );
        let _ = writeln!(
            out,
            "# HELP bastion_detect_events_dropped_total Events the detector dropped (queue full).\n# TYPE bastion_detect_events_dropped_total counter\nbastion_detect_events_dropped_total {}",
            self.shared.dropped.load(Ordering::Relaxed)
        );
        drop(c);
        if let Ok(open) = self.shared.store.open_counts() {
            let _ = writeln!(
                out,
                "# HELP bastion_alerts_open Alerts not yet acknowledged, by rule.\n# TYPE bastion_alerts_open gauge"
            );
            for rule in Rule::ALL {
                let n = open.get(rule.name()).copied().unwrap_or(0);
                let _ = writeln!(out, "bastion_alerts_open{{rule=\"{}\"}} {n}", rule.name());
            }
        }
        out
    }
}

impl Drop for Detection {
    fn drop(&mut self) {
        self.stop();
    }
}

impl EventObserver for Detection {
    fn observe(&self, event: &Map<String, Value>) {
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        let outcome = event.get("outcome").and_then(Value::as_str).unwrap_or("");
        {
            let mut c = self
                .shared
                .counters
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let known = c.events.len() < MAX_EVENT_TYPES
                || c.events
                    .contains_key(&(kind.to_owned(), outcome.to_owned()));
            let key = if known {
                (kind.to_owned(), outcome.to_owned())
            } else {
                ("other".to_owned(), outcome.to_owned())
            };
            *c.events.entry(key).or_insert(0) += 1;
            match kind {
                "association.rejected" => c.associations_rejected += 1,
                "login.failure" => c.logins_failed += 1,
                _ => {}
            }
        }
        // Our own alerts are counted, never evaluated.
        if kind == "security.alert" || kind.starts_with("alert.") {
            return;
        }
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(tx) = tx {
            // The rules never see private fields (alerts are not encrypted).
            let mut event = event.clone();
            event.remove(crate::events::PRIVATE_KEY);
            if tx.try_send(Msg::Event(Box::new(event))).is_err() {
                let n = self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped = n + 1,
                        "detector queue full: events dropped from detection (still logged)"
                    );
                }
            }
        }
    }
}

/// Findings kept in memory while the security database cannot store them.
const MAX_UNSTORED: usize = 1000;

fn run(
    mut rules: Rules,
    rx: mpsc::Receiver<Msg>,
    shared: &Shared,
    patients: Option<&PatientResolver>,
) {
    // Findings the security database could not take (a full disk): stored
    // at the next message once it can, oldest first, so the alert that the
    // disk filled up is not lost (bounded: the newest are kept).
    let mut unstored: std::collections::VecDeque<crate::detect::Finding> =
        std::collections::VecDeque::new();
    let mut bursts = Bursts::new(rules.config().repeat, rules.config().notify_interval);
    for msg in rx {
        while let Some(f) = unstored.front() {
            match shared.store.insert(f) {
                Ok(a) => {
                    tracing::info!(alert = a.id, rule = %a.rule, "stored an alert that could not be stored before");
                    unstored.pop_front();
                }
                Err(_) => break,
            }
        }
        let event = match msg {
            Msg::Event(e) => e,
            Msg::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        for finding in rules.evaluate(&event, patients) {
            let source = source_of(&finding);
            let now = unix_ms(finding.ts);
            let grouped = bursts
                .open_alert(finding.rule, &source, now)
                .and_then(|id| match shared.store.group(id, &finding) {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::error!(error = %e, alert = id, "cannot update an alert");
                        None
                    }
                });
            let (alert, new) = match grouped {
                Some(a) => (a, false),
                None => (store_new(shared, &finding, &mut unstored), true),
            };
            bursts.seen(finding.rule, &source, alert.id, now);
            if new {
                tracing::warn!(alert = alert.id, rule = %alert.rule, "security alert: {}", alert.summary);
                *shared
                    .counters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .alerts
                    .entry(alert.rule.clone())
                    .or_insert(0) += 1;
            } else {
                tracing::info!(alert = alert.id, rule = %alert.rule, count = alert.count,
                    "security alert grouped: {}", finding.summary);
            }
            let events = shared
                .events
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(events) = events {
                // Every finding stays in the trail, grouped or not.
                events.record(
                    "security.alert",
                    Outcome::Alert,
                    json!({"alert_id": alert.id, "rule": alert.rule, "severity": alert.severity,
                           "summary": finding.summary, "details": finding.details,
                           "count": alert.count, "grouped": !new}),
                );
            }
            if bursts.may_notify(&source, finding.rule.severity_rank(), new, now) {
                for n in shared
                    .notifiers
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                {
                    n(&alert);
                }
            }
        }
    }
}

/// Stores a new alert for `finding` (on a database failure, an alert with id
/// 0 still goes to the log, the event and the notifiers).
fn store_new(
    shared: &Shared,
    finding: &Finding,
    unstored: &mut std::collections::VecDeque<Finding>,
) -> Alert {
    match shared.store.insert(finding) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, rule = finding.rule.name(), "cannot store an alert (kept to store later)");
            if unstored.len() >= MAX_UNSTORED {
                unstored.pop_front();
            }
            unstored.push_back(finding.clone());
            let ts = finding.ts.format(&Rfc3339).unwrap_or_default();
            Alert {
                id: 0,
                ts: ts.clone(),
                rule: finding.rule.name().into(),
                severity: finding.rule.severity().into(),
                summary: finding.summary.clone(),
                details: Value::Object(finding.details.clone()),
                count: 1,
                last_ts: ts,
                status: "open".into(),
                ack: None,
            }
        }
    }
}

/// Sources and bursts remembered at most (the least recently seen go first).
const MAX_BURSTS: usize = 10_000;

/// The detector's memory of bursts (rule + source → the open alert and the
/// time of its latest finding) and of notifications per source.
struct Bursts {
    /// A finding this close to the burst's latest joins it, ms.
    window: i64,
    /// Per source, at most one notification this often, ms.
    notify_every: i64,
    open: HashMap<(Rule, String), (i64, i64)>,
    /// Source → (time of the last notification, its severity rank).
    notified: HashMap<String, (i64, u8)>,
}

impl Bursts {
    fn new(window: std::time::Duration, notify_every: std::time::Duration) -> Bursts {
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Bursts {
            window: ms(window),
            notify_every: ms(notify_every),
            open: HashMap::new(),
            notified: HashMap::new(),
        }
    }

    /// The alert a finding of `rule` from `source` at `now` joins, if any.
    fn open_alert(&self, rule: Rule, source: &str, now: i64) -> Option<i64> {
        self.open
            .get(&(rule, source.to_owned()))
            .filter(|(id, last)| *id > 0 && now.saturating_sub(*last) < self.window)
            .map(|(id, _)| *id)
    }

    fn seen(&mut self, rule: Rule, source: &str, id: i64, now: i64) {
        if self.open.len() >= MAX_BURSTS {
            let window = self.window;
            self.open
                .retain(|_, (_, last)| now.saturating_sub(*last) < window);
            if let Some(k) = (self.open.len() >= MAX_BURSTS)
                .then(|| {
                    self.open
                        .iter()
                        .min_by_key(|(_, (_, l))| *l)
                        .map(|(k, _)| k.clone())
                })
                .flatten()
            {
                self.open.remove(&k);
            }
        }
        self.open.insert((rule, source.to_owned()), (id, now));
    }

    /// Whether to tell the notifiers: the first notification for `source`
    /// in `notify_every`, or a new alert more severe than the last one
    /// notified for it. A grouped finding is told again only after
    /// `notify_every` (with the alert's count so far).
    fn may_notify(&mut self, source: &str, rank: u8, new: bool, now: i64) -> bool {
        let allowed = match self.notified.get(source) {
            None => true,
            Some((at, last_rank)) => {
                now.saturating_sub(*at) >= self.notify_every || (new && rank > *last_rank)
            }
        };
        if allowed {
            if self.notified.len() >= MAX_BURSTS && !self.notified.contains_key(source) {
                let every = self.notify_every;
                self.notified
                    .retain(|_, (at, _)| now.saturating_sub(*at) < every);
                if let Some(k) = (self.notified.len() >= MAX_BURSTS)
                    .then(|| {
                        self.notified
                            .iter()
                            .min_by_key(|(_, (at, _))| *at)
                            .map(|(k, _)| k.clone())
                    })
                    .flatten()
                {
                    self.notified.remove(&k);
                }
            }
            self.notified.insert(source.to_owned(), (now, rank));
        }
        allowed
    }
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// A Prometheus label value, escaped.
fn label(s: &str) -> String {
    s.chars()
        .take(100)
        .flat_map(|c| match c {
            '\\' => vec!['\\', '\\'],
            '"' => vec!['\\', '"'],
            '\n' => vec!['\\', 'n'],
            c => vec![c],
        })
        .collect()
}

/// The name of the OS user running this process (`uid:N` when it has no
/// name), for acknowledgements made from the command line.
pub fn os_user() -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    };
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|p| {
        p.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id: u32 = f.nth(1)?.parse().ok()?;
            (id == uid).then(|| name.to_owned())
        })
    });
    name.unwrap_or_else(|| format!("uid:{uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::DetectConfig;

    fn setup() -> (tempfile::TempDir, Arc<EventLog>, Arc<Detection>) {
        setup_with(DetectConfig::default())
    }

    fn setup_with(config: DetectConfig) -> (tempfile::TempDir, Arc<EventLog>, Arc<Detection>) {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("tempdir")
        };
        let db = SecurityDb::open(&dir.path().join("security.db"), &[7u8; 32]);
        let Ok(db) = db else { panic!("open db") };
        let events = EventLog::open(&dir.path().join("events.log"));
        let Ok(events) = events else { panic!("events") };
        let events = Arc::new(events);
        let d = Detection::start(Rules::new(config), AlertStore::new(Arc::new(db)), None);
        let Ok(d) = d else { panic!("start") };
        d.record_alerts_to(events.clone());
        events.add_observer(d.clone());
        (dir, events, d)
    }

    #[test]
    fn events_raise_stored_alerts_and_alert_events_once() {
        let (_dir, events, d) = setup();
        for i in 0..12 {
            events.record(
                "association.rejected",
                Outcome::Refused,
                json!({"calling_ae": "EVIL", "called_ae": "BASTION",
                       "peer": format!("10.0.0.9:{}", 5000 + i), "reason": "unknown_calling_ae"}),
            );
        }
        events.record(
            "device.software_changed",
            Outcome::Alert,
            json!({"ae": "CT1", "field": "SoftwareVersions", "old": "1", "new": "2"}),
        );
        d.flush();
        let Ok(list) = d.store().list(false, 100) else {
            panic!("list")
        };
        let mut rules: Vec<_> = list.iter().map(|a| a.rule.as_str()).collect();
        rules.sort_unstable();
        assert_eq!(
            rules,
            ["association_scan", "device_changed", "unknown_device"]
        );
        let Ok(all) = events.read_all() else {
            panic!("read")
        };
        let alerts = all.iter().filter(|e| e["type"] == "security.alert").count();
        assert_eq!(alerts, 3);
        let m = d.metrics_text();
        assert!(m.contains("bastion_associations_rejected_total 12"), "{m}");
        assert!(
            m.contains("bastion_alerts_total{rule=\"association_scan\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("bastion_alerts_open{rule=\"unknown_device\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("bastion_events_total{type=\"security.alert\",outcome=\"alert\"} 3"),
            "{m}"
        );
        // Evidence: the rejections behind the scan, the event behind the
        // device change.
        let scan = list.iter().find(|a| a.rule == "association_scan");
        let Some(scan) = scan else {
            panic!("scan alert")
        };
        let Ok(ev) = d.store().evidence(scan.id) else {
            panic!("evidence")
        };
        assert_eq!(ev.len(), 10, "{ev:?}");
        assert!(ev
            .iter()
            .all(|e| e["type"] == "association.rejected" && e["ae"] == "EVIL"));
        assert_eq!(ev[9]["peer"], "10.0.0.9:5009");
        assert_eq!(ev[0]["reason"], "unknown_calling_ae");
        let changed = list.iter().find(|a| a.rule == "device_changed");
        let Some(changed) = changed else {
            panic!("change alert")
        };
        let Ok(ev) = d.store().evidence(changed.id) else {
            panic!("evidence")
        };
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0]["type"], "device.software_changed");
        assert_eq!(ev[0]["ae"], "CT1");
        assert!(matches!(
            d.store().evidence(999),
            Err(DetectError::NoSuchAlert(999))
        ));
        // Acknowledge: it moves behind the open ones and keeps its id.
        let first = list[list.len() - 1].id;
        let Ok(a) = d.store().ack(first, "tester", "known pentest") else {
            panic!("ack")
        };
        assert_eq!(a.status, "acknowledged");
        let Ok((again, new)) = d.store().acknowledge(first, "other", "again") else {
            panic!("ack twice")
        };
        assert!(!new);
        assert_eq!(again.ack.as_ref().map(|a| a.by.as_str()), Some("tester"));
        assert!(d.store().ack(first, "tester", " ").is_err());
        assert!(matches!(
            d.store().ack(999, "tester", "x"),
            Err(DetectError::NoSuchAlert(999))
        ));
        let Ok(open) = d.store().list(false, 100) else {
            panic!("list")
        };
        assert_eq!(open.len(), 2);
        let Ok(all) = d.store().list(true, 100) else {
            panic!("list")
        };
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].id, first);
        assert_eq!(all[2].ack.as_ref().map(|a| a.by.as_str()), Some("tester"));
    }

    #[test]
    fn notifiers_see_each_alert() {
        let (_dir, events, d) = setup();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        d.add_notifier(Box::new(move |a: &Alert| {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(a.rule.clone())
        }));
        events.record(
            "user.added",
            Outcome::Success,
            json!({"actor": "cli", "username": "zed", "role": "admin"}),
        );
        events.record("audit.verify", Outcome::Failure, json!({"first_broken": 3}));
        d.flush();
        assert_eq!(
            *seen.lock().unwrap_or_else(|p| p.into_inner()),
            ["security_change", "audit_verify_failed"]
        );
    }

    /// Counts the notifications `d` sends, by rule.
    fn notifications(d: &Detection) -> Arc<Mutex<Vec<(String, i64)>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        d.add_notifier(Box::new(move |a: &Alert| {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((a.rule.clone(), a.count))
        }));
        seen
    }

    fn rejected_at(events: &EventLog, ts: &str, calling: &str, peer: &str) {
        events.record(
            "association.rejected",
            Outcome::Refused,
            json!({"ts": ts, "calling_ae": calling, "called_ae": "BASTION", "peer": peer,
                   "reason": "unknown_calling_ae"}),
        );
    }

    fn scan_50(events: &EventLog, peer: &str) {
        for i in 0..50 {
            events.record(
                "association.rejected",
                Outcome::Refused,
                json!({"calling_ae": format!("SCAN{i:02}"), "called_ae": "BASTION",
                       "peer": format!("{peer}:{}", 7000 + i), "reason": "unknown_calling_ae"}),
            );
        }
    }

    #[test]
    fn fifty_unknown_ae_titles_from_one_address_are_one_alert_and_one_notification() {
        // The scan rule set above 50 so that only unknown_device speaks.
        let (_dir, events, d) = setup_with(DetectConfig {
            scan_rejections: 100,
            ..DetectConfig::default()
        });
        let seen = notifications(&d);
        scan_50(&events, "10.0.0.66");
        d.flush();
        let Ok(list) = d.store().list(true, 100) else {
            panic!("list")
        };
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0].rule, "unknown_device");
        assert_eq!(list[0].count, 50);
        let tried = list[0].details["varied"]["calling_ae"].as_array().cloned();
        assert_eq!(
            tried.as_ref().map(Vec::len),
            Some(50),
            "{:?}",
            list[0].details
        );
        assert_eq!(tried.and_then(|t| t.last().cloned()), Some(json!("SCAN49")));
        let Ok(ev) = d.store().evidence(list[0].id) else {
            panic!("evidence")
        };
        assert_eq!(ev.len(), crate::detect::MAX_EVIDENCE);
        assert_eq!(ev[ev.len() - 1]["ae"], "SCAN49");
        assert_eq!(
            *seen.lock().unwrap_or_else(|p| p.into_inner()),
            [("unknown_device".to_owned(), 1)]
        );
        // Every finding is still a security.alert event (the trail keeps them).
        let Ok(all) = events.read_all() else {
            panic!("read")
        };
        let alerts: Vec<_> = all
            .iter()
            .filter(|e| e["type"] == "security.alert")
            .collect();
        assert_eq!(alerts.len(), 50);
        assert!(alerts.iter().all(|e| e["alert_id"] == list[0].id));
        assert_eq!(alerts[49]["count"], 50);
        // Another address is another source: its own alert and notification.
        scan_50(&events, "10.0.0.67");
        d.flush();
        assert_eq!(d.store().list(true, 100).map(|l| l.len()).ok(), Some(2));
        assert_eq!(seen.lock().unwrap_or_else(|p| p.into_inner()).len(), 2);
    }

    #[test]
    fn a_scan_with_default_thresholds_is_two_alerts_not_fifty() {
        let (_dir, events, d) = setup();
        let seen = notifications(&d);
        scan_50(&events, "10.0.0.68");
        d.flush();
        let Ok(list) = d.store().list(true, 100) else {
            panic!("list")
        };
        let mut got: Vec<(String, i64)> = list.iter().map(|a| (a.rule.clone(), a.count)).collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("association_scan".to_owned(), 1),
                ("unknown_device".to_owned(), 50)
            ]
        );
        // The scan is more severe than the unknown device notified first:
        // told too; nothing else.
        assert_eq!(
            *seen.lock().unwrap_or_else(|p| p.into_inner()),
            [
                ("unknown_device".to_owned(), 1),
                ("association_scan".to_owned(), 1)
            ]
        );
    }

    #[test]
    fn bursts_end_with_the_quiet_period_or_an_acknowledgement() {
        let (_dir, events, d) = setup_with(DetectConfig {
            scan_rejections: 100,
            ..DetectConfig::default()
        });
        let seen = notifications(&d);
        rejected_at(&events, "2026-03-01T10:00:00Z", "A1", "10.0.0.5:1");
        rejected_at(&events, "2026-03-01T10:09:00Z", "A2", "10.0.0.5:2");
        // 9 min after the previous finding: same burst (sliding).
        rejected_at(&events, "2026-03-01T10:18:00Z", "A3", "10.0.0.5:3");
        d.flush();
        let Ok(list) = d.store().list(true, 100) else {
            panic!("list")
        };
        assert_eq!(list.iter().map(|a| a.count).collect::<Vec<_>>(), [3]);
        assert_eq!(list[0].last_ts, "2026-03-01T10:18:00Z");
        // 18 min after the first: the source may be told again (count 3).
        assert_eq!(
            *seen.lock().unwrap_or_else(|p| p.into_inner()),
            [
                ("unknown_device".to_owned(), 1),
                ("unknown_device".to_owned(), 3)
            ]
        );
        // Acknowledged: the next finding opens a new alert.
        assert!(d.store().ack(list[0].id, "tester", "seen").is_ok());
        rejected_at(&events, "2026-03-01T10:19:00Z", "A4", "10.0.0.5:4");
        // More than the quiet period after the last finding: a new burst.
        rejected_at(&events, "2026-03-01T10:40:00Z", "A5", "10.0.0.5:5");
        d.flush();
        let Ok(list) = d.store().list(true, 100) else {
            panic!("list")
        };
        let mut counts: Vec<(i64, String)> =
            list.iter().map(|a| (a.count, a.status.clone())).collect();
        counts.sort();
        assert_eq!(
            counts,
            [
                (1, "open".to_owned()),
                (1, "open".to_owned()),
                (3, "acknowledged".to_owned())
            ]
        );
    }

    #[test]
    fn bulk_acknowledgement_by_rule_time_and_ids() {
        let (_dir, _events, d) = setup();
        let store = d.store();
        let at = |t: &str| {
            let Ok(t) = OffsetDateTime::parse(t, &Rfc3339) else {
                panic!("time")
            };
            t
        };
        let f = |rule: Rule, ts: &str| Finding {
            rule,
            ts: at(ts),
            summary: rule.name().into(),
            details: Map::new(),
            evidence: Vec::new(),
        };
        let ids: Vec<i64> = [
            (Rule::UnknownDevice, "2026-01-01T00:00:00Z"),
            (Rule::UnknownDevice, "2026-02-01T00:00:00Z"),
            (Rule::SecurityChange, "2026-01-15T00:00:00Z"),
            (Rule::AssociationScan, "2026-03-01T00:00:00Z"),
        ]
        .iter()
        .map(|(r, t)| store.insert(&f(*r, t)).map(|a| a.id).unwrap_or(-1))
        .collect();
        assert!(store
            .acknowledge_many(&AckFilter::default(), "tester", " ")
            .is_err());
        let by_rule_before = AckFilter {
            rule: Some("unknown_device".into()),
            before: Some(at("2026-01-20T00:00:00Z")),
            ..AckFilter::default()
        };
        assert_eq!(
            store.acknowledge_many(&by_rule_before, "tester", "ok").ok(),
            Some(vec![ids[0]])
        );
        let by_ids = AckFilter {
            ids: Some(vec![ids[0], ids[2]]),
            ..AckFilter::default()
        };
        assert_eq!(
            store.acknowledge_many(&by_ids, "tester", "ok").ok(),
            Some(vec![ids[2]])
        );
        assert_eq!(
            store
                .acknowledge_many(&AckFilter::default(), "other", "rest")
                .ok(),
            Some(vec![ids[1], ids[3]])
        );
        let Ok(Some(first)) = store.get(ids[0]) else {
            panic!("get")
        };
        assert_eq!(first.ack.map(|a| a.comment), Some("ok".to_owned()));
        assert_eq!(store.list(false, 10).map(|l| l.len()).ok(), Some(0));
    }

    #[test]
    fn os_user_has_a_name() {
        assert!(!os_user().is_empty());
    }
}
