//! Detection rules over the security event stream (issue 5).
//!
//! [`Rules`] is a pure state machine: [`Rules::evaluate`] takes one event
//! (the JSON object of [`crate::events::EventLog::record`], with its `ts`)
//! and returns the [`Finding`]s it raises. Time is the event's own `ts`, so
//! tests feed synthetic events with chosen timestamps. Sliding windows live
//! in memory, bounded: at most [`DetectConfig::max_tracked_keys`] keys per
//! rule (the least recently seen key is evicted first), and every per-key
//! history is trimmed to its window.
//!
//! The rules ([`Rule`]):
//! 1. `login_brute_force`: ≥ N failed logins for one account or from one
//!    address within T;
//! 2. `association_scan`: ≥ N rejected associations from one address within T;
//! 3. `broad_query`: a universal C-FIND at PATIENT/STUDY level, or a QIDO-RS
//!    study search with no restrictive key and no `limit` ≤ the paging bound;
//! 4. `bulk_retrieval`: one user or device retrieving more than N studies or
//!    M patients within T (C-MOVE, C-GET, WADO-RS instances: copies that
//!    leave the archive), or *viewing* more than N' studies or M' patients
//!    within T (WADO-RS metadata, frames, rendered, thumbnails, bulk data:
//!    what a viewer such as OHIF or the built-in UI asks); the viewing
//!    thresholds are higher, so that a clinician reading a list of patients
//!    in a viewer is not a harvester, while a script pulling a hundred
//!    studies in the window is either way;
//! 5. `off_hours_access`: access outside the configured working hours (off
//!    unless configured);
//! 6. `unknown_device`: an association rejected for an unknown calling AE;
//! 7. `device_changed`: a known device reports another Manufacturer, model
//!    or software version (`device.software_changed`); keyed by the
//!    device, so whatever changed, one alert per device per quiet period;
//! 8. `security_change`: user, token, device, certificate or configuration
//!    changes;
//! 9. `audit_verify_failed`: `audit.verify` failed;
//! 10. `tls_peer_rejected`: Bastion as a TLS client (C-MOVE destination,
//!     syslog collector) refused the peer's certificate
//!     (`tls.peer_rejected`, with the exact verification failure); keyed by
//!     the peer;
//! 11. `blob_auth_failed`: a stored blob failed authentication on read
//!     (`blob.auth_failed`: tampering or corruption of patient data); keyed
//!     by the blob.
//!
//! A rule that fired for a key stays quiet for that key for
//! [`DetectConfig::repeat`] (one attack, one alert). Findings of one burst
//! (same rule, same [`source_of`], each within [`DetectConfig::repeat`] of
//! the previous) are grouped by [`crate::alerts::Detection`] into one alert
//! with a count, and notifications are rate-limited per source
//! ([`DetectConfig::notify_interval`]). Security changes made by CLI commands
//! on the host are routine ([`Rules::routine_host_changes`]): recorded, no
//! alert. Findings name accounts, AE titles, addresses and UIDs, never
//! patients: patients are counted by an opaque key the caller supplies.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use serde_json::{json, Map, Value};
use time::{format_description::well_known::Rfc3339, OffsetDateTime, UtcOffset};

use crate::{DetectError, Result};

/// Thresholds of the rules (`[detect]` in `bastion.toml`).
#[derive(Debug, Clone)]
pub struct DetectConfig {
    /// Failed logins (per account or per address) that raise `login_brute_force`.
    pub login_failures: usize,
    /// Window of `login_brute_force`.
    pub login_window: Duration,
    /// Rejected associations from one address that raise `association_scan`.
    pub scan_rejections: usize,
    /// Window of `association_scan`.
    pub scan_window: Duration,
    /// A QIDO-RS study search with `limit` at most this is a paged worklist,
    /// not a broad query.
    pub qido_max_limit: usize,
    /// More distinct studies than this within `bulk_window` raise `bulk_retrieval`.
    pub bulk_studies: usize,
    /// More distinct patients than this within `bulk_window` raise `bulk_retrieval`.
    pub bulk_patients: usize,
    /// More distinct studies than this *viewed* within `bulk_window` raise
    /// `bulk_retrieval`.
    pub view_studies: usize,
    /// More distinct patients than this viewed within `bulk_window` raise
    /// `bulk_retrieval`.
    pub view_patients: usize,
    /// Window of `bulk_retrieval`.
    pub bulk_window: Duration,
    /// Working hours; `None`: `off_hours_access` is off.
    pub working_hours: Option<WorkingHours>,
    /// After a rule fired for a key, it stays quiet for that key this long.
    pub repeat: Duration,
    /// Keys tracked per rule at most (least recently seen evicted first).
    pub max_tracked_keys: usize,
    /// A new alert notifies (webhook) at most once per this period per
    /// source ([`source_of`]), unless it is more severe than the last one
    /// notified for that source.
    pub notify_interval: Duration,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            login_failures: 5,
            login_window: Duration::from_secs(60),
            scan_rejections: 10,
            scan_window: Duration::from_secs(60),
            // OHIF's worklist asks limit=101, the built-in UI's 50.
            qido_max_limit: 200,
            bulk_studies: 20,
            bulk_patients: 10,
            view_studies: 60,
            view_patients: 40,
            bulk_window: Duration::from_secs(600),
            working_hours: None,
            repeat: Duration::from_secs(600),
            max_tracked_keys: 10_000,
            notify_interval: Duration::from_secs(600),
        }
    }
}

/// Working hours: a daily interval on some weekdays, at a fixed UTC offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingHours {
    /// Start, minutes after midnight (inclusive).
    start: u16,
    /// End, minutes after midnight (exclusive).
    end: u16,
    /// Monday first.
    days: [bool; 7],
    offset: UtcOffset,
}

impl WorkingHours {
    /// Parses `hours` (`"07:00-19:00"`), `days` (`["mon", "tue", …]` or
    /// ranges such as `"mon-fri"`) and `timezone` (`"UTC"`, `"+01:00"`,
    /// `"-05:30"`).
    ///
    /// # Errors
    /// [`DetectError::Invalid`] naming the malformed setting.
    pub fn parse(hours: &str, days: &[String], timezone: &str) -> Result<WorkingHours> {
        let bad = |what: &'static str, detail: String| DetectError::Invalid { what, detail };
        let (a, b) = hours.split_once('-').ok_or_else(|| {
            bad(
                "working_hours",
                format!("{hours:?} is not like \"07:00-19:00\""),
            )
        })?;
        let minutes = |s: &str| -> Option<u16> {
            let (h, m) = s.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
        };
        let (Some(start), Some(end)) = (minutes(a), minutes(b)) else {
            return Err(bad(
                "working_hours",
                format!("{hours:?} is not like \"07:00-19:00\""),
            ));
        };
        if start >= end {
            return Err(bad(
                "working_hours",
                format!("{hours:?}: the start must be before the end (no overnight ranges)"),
            ));
        }
        const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
        let day = |s: &str| {
            let s = s.trim().to_ascii_lowercase();
            NAMES.iter().position(|n| s.starts_with(n)).ok_or_else(|| {
                bad(
                    "working_days",
                    format!("{s:?} is not a weekday like \"mon\""),
                )
            })
        };
        let mut set = [false; 7];
        for d in days {
            match d.split_once('-') {
                Some((x, y)) => {
                    let (x, y) = (day(x)?, day(y)?);
                    if x > y {
                        return Err(bad("working_days", format!("{d:?}: range runs backwards")));
                    }
                    set[x..=y].iter_mut().for_each(|v| *v = true);
                }
                None => set[day(d)?] = true,
            }
        }
        let tz = timezone.trim();
        let offset = if tz.eq_ignore_ascii_case("utc") || tz == "Z" || tz.is_empty() {
            UtcOffset::UTC
        } else {
            let (sign, rest) = match tz.as_bytes().first() {
                Some(b'+') => (1i8, &tz[1..]),
                Some(b'-') => (-1i8, &tz[1..]),
                _ => {
                    return Err(bad(
                        "timezone",
                        format!("{tz:?} is not \"UTC\" or an offset like \"+01:00\""),
                    ))
                }
            };
            let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
            let (h, m): (i8, i8) = match (h.parse(), m.parse()) {
                (Ok(h), Ok(m)) => (h, m),
                _ => {
                    return Err(bad(
                        "timezone",
                        format!("{tz:?} is not \"UTC\" or an offset like \"+01:00\""),
                    ))
                }
            };
            UtcOffset::from_hms(sign * h, sign * m, 0)
                .map_err(|e| bad("timezone", format!("{tz:?}: {e}")))?
        };
        Ok(WorkingHours {
            start,
            end,
            days: set,
            offset,
        })
    }

    /// Whether `t` falls within working hours.
    pub fn contains(&self, t: OffsetDateTime) -> bool {
        let local = t.to_offset(self.offset);
        let day = usize::from(local.weekday().number_days_from_monday());
        let minute = u16::from(local.hour()) * 60 + u16::from(local.minute());
        self.days[day] && minute >= self.start && minute < self.end
    }
}

/// The detection rules. [`Rule::name`] is the `rule` field of alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// Repeated failed logins for an account or from an address.
    LoginBruteForce,
    /// A burst of rejected associations from one address.
    AssociationScan,
    /// A universal or very broad patient/study query.
    BroadQuery,
    /// One user or device retrieving many studies or patients.
    BulkRetrieval,
    /// Access outside working hours.
    OffHoursAccess,
    /// An unknown calling AE title tried to connect.
    UnknownDevice,
    /// A known device reports another manufacturer, model or software version.
    DeviceChanged,
    /// User, token, device, certificate or configuration change.
    SecurityChange,
    /// The audit trail failed verification.
    AuditVerifyFailed,
    /// The audit trail or the syslog export stopped recording (a full
    /// disk), started again, or the site allows unaudited access.
    AuditRecording,
    /// A peer Bastion connected to as a TLS client presented a certificate
    /// that failed verification.
    TlsPeerRejected,
    /// A stored blob failed authentication on read.
    BlobAuthFailed,
}

impl Rule {
    /// Every rule.
    pub const ALL: [Rule; 12] = [
        Rule::LoginBruteForce,
        Rule::AssociationScan,
        Rule::BroadQuery,
        Rule::BulkRetrieval,
        Rule::OffHoursAccess,
        Rule::UnknownDevice,
        Rule::DeviceChanged,
        Rule::SecurityChange,
        Rule::AuditVerifyFailed,
        Rule::AuditRecording,
        Rule::TlsPeerRejected,
        Rule::BlobAuthFailed,
    ];

    /// The rule's stable name.
    pub fn name(self) -> &'static str {
        match self {
            Rule::LoginBruteForce => "login_brute_force",
            Rule::AssociationScan => "association_scan",
            Rule::BroadQuery => "broad_query",
            Rule::BulkRetrieval => "bulk_retrieval",
            Rule::OffHoursAccess => "off_hours_access",
            Rule::UnknownDevice => "unknown_device",
            Rule::DeviceChanged => "device_changed",
            Rule::SecurityChange => "security_change",
            Rule::AuditVerifyFailed => "audit_verify_failed",
            Rule::AuditRecording => "audit_recording",
            Rule::TlsPeerRejected => "tls_peer_rejected",
            Rule::BlobAuthFailed => "blob_auth_failed",
        }
    }

    /// Severity as a rank for comparisons: `high` 3, `medium` 2, `low` 1.
    pub fn severity_rank(self) -> u8 {
        match self.severity() {
            "high" => 3,
            "medium" => 2,
            _ => 1,
        }
    }

    /// Severity for display and the webhook: `high`, `medium` or `low`.
    pub fn severity(self) -> &'static str {
        match self {
            Rule::LoginBruteForce
            | Rule::AssociationScan
            | Rule::BulkRetrieval
            | Rule::AuditVerifyFailed
            | Rule::AuditRecording
            | Rule::BlobAuthFailed => "high",
            Rule::BroadQuery
            | Rule::UnknownDevice
            | Rule::DeviceChanged
            | Rule::TlsPeerRejected => "medium",
            Rule::OffHoursAccess | Rule::SecurityChange => "low",
        }
    }
}

/// What a rule found: the alert to raise.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// Which rule.
    pub rule: Rule,
    /// When (the triggering event's time).
    pub ts: OffsetDateTime,
    /// One line for people.
    pub summary: String,
    /// Rule-specific fields (accounts, AE titles, addresses, UIDs, counts).
    pub details: Map<String, Value>,
    /// The events that raised it, oldest first, each summarised by
    /// [`evidence`]: the triggering event, or for the windowed rules
    /// (`login_brute_force`, `association_scan`, `bulk_retrieval`) the
    /// most recent [`MAX_EVIDENCE`] events of the window.
    pub evidence: Vec<Value>,
}

/// Most events kept as one finding's [`Finding::evidence`].
pub const MAX_EVIDENCE: usize = 20;

/// Who or where a finding comes from, for grouping a burst into one alert
/// and rate-limiting notifications: the one who acted when the rule names
/// them (`actor:…`, a device `ae:…` or a web user `user:…`), else the
/// address (`addr:…`: login guesses, rejected associations, unknown
/// devices), else the account (`user:…`), else `rule:…`.
pub fn source_of(f: &Finding) -> String {
    let field = |k: &str| {
        f.details
            .get(k)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
    };
    // Recording stopped and started again are two stories, each grouped
    // with its own repeats.
    if f.rule == Rule::AuditRecording {
        return format!("event:{}", field("event").unwrap_or_default());
    }
    if let Some(a) = field("actor") {
        return format!("actor:{a}");
    }
    if let Some(a) = field("ae") {
        return format!("ae:{a}");
    }
    if let Some(u) = field("user") {
        return format!("user:{u}");
    }
    if let Some(a) = field("peer").or_else(|| field("source")) {
        return format!("addr:{}", host_of(a));
    }
    if let Some(u) = field("username") {
        return format!("user:{u}");
    }
    format!("rule:{}", f.rule.name())
}

/// The summary of an event kept as an alert's evidence: `ts`, `type`,
/// `outcome` and, where the event has them, `user` (its `user` or
/// `username`), `actor`, `ae` (its `ae`, `calling_ae` or device's AE
/// title), `peer`, `source`, `reason`, `action` and `status`. Only these
/// fields, each string clipped to 128 characters: accounts, AE titles,
/// addresses and codes, never patients.
pub fn evidence(event: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    let text = |v: &str| Value::String(v.chars().take(128).collect());
    for key in ["ts", "type", "outcome"] {
        out.insert(key.into(), text(str_field(event, key)));
    }
    let first = |keys: &[&str]| {
        keys.iter()
            .map(|k| str_field(event, k))
            .find(|v| !v.is_empty())
    };
    let device_ae = event
        .get("device")
        .and_then(|d| d.get("ae"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let picks: [(&str, Option<&str>); 7] = [
        ("user", first(&["user", "username"])),
        ("actor", first(&["actor"])),
        (
            "ae",
            first(&["ae", "calling_ae"]).or((!device_ae.is_empty()).then_some(device_ae)),
        ),
        ("peer", first(&["peer"])),
        ("source", first(&["source"])),
        ("reason", first(&["reason"])),
        ("action", first(&["action"])),
    ];
    for (key, v) in picks {
        if let Some(v) = v {
            out.insert(key.into(), text(v));
        }
    }
    if let Some(status) = event.get("status").and_then(Value::as_u64) {
        out.insert("status".into(), status.into());
    }
    Value::Object(out)
}

/// Maps a Study Instance UID to an opaque patient key (never a patient ID
/// or name), for the patient count of `bulk_retrieval`.
pub type PatientResolver = dyn Fn(&str) -> Option<String> + Send + Sync;

/// The rules' state. Not `Sync`: one owner evaluates events in order.
pub struct Rules {
    config: DetectConfig,
    logins: Windows,
    scans: Windows,
    bulk: HashMap<String, Retrievals>,
    /// Quiet periods: (rule, key) → until (Unix ms).
    quiet: HashMap<(Rule, String), i64>,
    /// Whether `security_change` fires (false for CLI commands on the host).
    alert_security_changes: bool,
}

impl Rules {
    /// Empty state.
    pub fn new(config: DetectConfig) -> Rules {
        Rules {
            config,
            logins: Windows::default(),
            scans: Windows::default(),
            bulk: HashMap::new(),
            quiet: HashMap::new(),
            alert_security_changes: true,
        }
    }

    /// The rules of a CLI command run on the host: its user, token, device,
    /// certificate and configuration changes are an administrator's routine
    /// set-up, recorded (event log, audit trail) but raising no
    /// `security_change` alert. Only a process on the host with the master
    /// key can record such events, so no remote caller can pass for one.
    #[must_use]
    pub fn routine_host_changes(mut self) -> Rules {
        self.alert_security_changes = false;
        self
    }

    /// The thresholds in force.
    pub fn config(&self) -> &DetectConfig {
        &self.config
    }

    /// Evaluates one event and returns the findings it raises (usually none).
    /// `patients` maps Study Instance UIDs to opaque patient keys.
    pub fn evaluate(
        &mut self,
        event: &Map<String, Value>,
        patients: Option<&PatientResolver>,
    ) -> Vec<Finding> {
        let kind = str_field(event, "type");
        if kind == "security.alert" || kind.starts_with("alert.") {
            return Vec::new();
        }
        let ts = event
            .get("ts")
            .and_then(Value::as_str)
            .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
            .unwrap_or_else(OffsetDateTime::now_utc);
        let now = unix_ms(ts);
        let outcome = str_field(event, "outcome");
        let mut out = Vec::new();
        self.forget_quiet(now);
        let item = Arc::new(evidence(event));
        match kind {
            "login.failure" | "login.refused" => self.login(event, &item, ts, now, &mut out),
            "association.rejected" => self.rejected(event, &item, ts, now, &mut out),
            "security.universal_query" => {
                // DIMSE C-FIND (QIDO-RS searches are judged on their
                // `http.request`, which knows the `limit`).
                let ae = str_field(event, "ae");
                if !ae.starts_with("web:") {
                    let key = format!("ae:{ae}");
                    let mut d = Map::new();
                    d.insert("ae".into(), ae.into());
                    d.insert("peer".into(), str_field(event, "peer").into());
                    d.insert("model".into(), str_field(event, "model").into());
                    d.insert("level".into(), str_field(event, "level").into());
                    d.insert("via".into(), "C-FIND".into());
                    self.raise(
                        &mut out,
                        Rule::BroadQuery,
                        key,
                        ts,
                        now,
                        format!(
                            "universal C-FIND at {} level from device {ae}",
                            str_field(event, "level")
                        ),
                        d,
                        vec![(*item).clone()],
                    );
                }
            }
            "retrieve.move" | "retrieve.get" if outcome == "success" => {
                let ae = str_field(event, "ae");
                let studies = str_list(event, "studies");
                let via = if kind == "retrieve.move" {
                    "C-MOVE"
                } else {
                    "C-GET"
                };
                self.retrieved(
                    format!("ae:{ae}"),
                    studies,
                    via,
                    false,
                    &item,
                    ts,
                    now,
                    patients,
                    &mut out,
                );
            }
            "http.request" => self.http(event, &item, ts, now, patients, &mut out),
            "device.software_changed" => {
                let ae = str_field(event, "ae");
                let field = str_field(event, "field");
                let mut d = Map::new();
                for k in ["ae", "field", "old", "new", "peer"] {
                    if let Some(v) = event.get(k) {
                        d.insert(k.into(), v.clone());
                    }
                }
                // One alert per device per quiet period: a device that
                // sends a mix of studies (several models, versions…)
                // changes on every other instance, and each change is
                // still an event of its own.
                let key = format!("ae:{ae}");
                let what = if field.is_empty() {
                    "manufacturer, model or software version".to_owned()
                } else {
                    field.to_owned()
                };
                self.raise(
                    &mut out,
                    Rule::DeviceChanged,
                    key,
                    ts,
                    now,
                    format!("device {ae} reports another {what} than before"),
                    d,
                    vec![(*item).clone()],
                );
            }
            "tls.peer_rejected" | "blob.auth_failed" => {
                self.integrity(kind, event, &item, ts, now, &mut out)
            }
            "audit.verify" if outcome != "success" => {
                let mut d = Map::new();
                for k in ["result", "records", "reason", "first_broken", "actor"] {
                    if let Some(v) = event.get(k) {
                        d.insert(k.into(), v.clone());
                    }
                }
                out.push(Finding {
                    rule: Rule::AuditVerifyFailed,
                    ts,
                    summary: "the audit trail failed verification".into(),
                    details: d,
                    evidence: vec![(*item).clone()],
                });
            }
            "audit.recording_stopped"
            | "audit.recording_resumed"
            | "syslog.export_stopped"
            | "syslog.export_resumed"
            | "security.unaudited_access_allowed" => {
                let mut d = Map::new();
                d.insert("event".into(), kind.into());
                for k in ["reason", "stopped_secs", "refusing", "setting"] {
                    if let Some(v) = event.get(k) {
                        d.insert(k.into(), v.clone());
                    }
                }
                let summary = match kind {
                    "audit.recording_stopped" => {
                        "audit recording stopped (PS3.15 110133): patient data is refused until it records again"
                    }
                    "audit.recording_resumed" => "audit recording started again (PS3.15 110134)",
                    "syslog.export_stopped" => {
                        "syslog export of the audit trail stopped: the spool cannot be written (110133)"
                    }
                    "syslog.export_resumed" => "syslog export of the audit trail resumed (110134)",
                    _ => "[audit] allow_unaudited_access is set: patient data is served even when it cannot be audited",
                };
                out.push(Finding {
                    rule: Rule::AuditRecording,
                    ts,
                    summary: summary.into(),
                    details: d,
                    evidence: vec![(*item).clone()],
                });
            }
            k if self.alert_security_changes
                && is_security_change(k)
                && outcome != "refused"
                && outcome != "failure" =>
            {
                let mut d = Map::new();
                d.insert("event".into(), k.into());
                for key in [
                    "actor", "username", "role", "ae", "id", "token_id", "scope", "hosts",
                    "setting",
                ] {
                    if let Some(v) = event.get(key) {
                        d.insert(key.into(), v.clone());
                    }
                }
                if let Some(ae) = event
                    .get("device")
                    .and_then(|dv| dv.get("ae"))
                    .and_then(Value::as_str)
                {
                    d.insert("ae".into(), ae.into());
                }
                let actor = str_field(event, "actor");
                out.push(Finding {
                    rule: Rule::SecurityChange,
                    ts,
                    summary: format!(
                        "{k} by {}",
                        if actor.is_empty() { "unknown" } else { actor }
                    ),
                    details: d,
                    evidence: vec![(*item).clone()],
                });
            }
            _ => {}
        }
        if let Some(hours) = self.config.working_hours.clone() {
            if !hours.contains(ts) {
                if let Some((actor, what)) = access_actor(event) {
                    let mut d = Map::new();
                    d.insert("actor".into(), actor.clone().into());
                    d.insert("event".into(), kind.into());
                    d.insert("peer".into(), peer_of(event).into());
                    self.raise(
                        &mut out,
                        Rule::OffHoursAccess,
                        actor.clone(),
                        ts,
                        now,
                        format!("{what} by {actor} outside working hours"),
                        d,
                        vec![(*item).clone()],
                    );
                }
            }
        }
        out
    }

    fn login(
        &mut self,
        event: &Map<String, Value>,
        item: &Arc<Value>,
        ts: OffsetDateTime,
        now: i64,
        out: &mut Vec<Finding>,
    ) {
        let reason = str_field(event, "reason");
        // The first step of a two-step login and a disabled account with the
        // right password are not guesses.
        if matches!(
            reason,
            "totp_missing" | "disabled" | "totp_setup_required" | "concurrent_change"
        ) {
            return;
        }
        let user = str_field(event, "username").to_owned();
        let source = str_field(event, "source").to_owned();
        let window = ms(self.config.login_window);
        let cap = self.config.max_tracked_keys;
        let by_user = self
            .logins
            .hit(format!("user:{user}"), now, window, cap, item);
        let by_addr = self
            .logins
            .hit(format!("addr:{source}"), now, window, cap, item);
        let n = self.config.login_failures.max(1);
        let user_key = format!("user:{user}");
        let addr_key = format!("addr:{source}");
        let user_hot = by_user >= n && !self.is_quiet(Rule::LoginBruteForce, &user_key, now);
        let addr_hot = by_addr >= n && !self.is_quiet(Rule::LoginBruteForce, &addr_key, now);
        if !(user_hot || addr_hot) {
            return;
        }
        // The evidence of the key(s) that reached the threshold: another
        // account's failures from the same address are no evidence against
        // this account.
        let hot: Vec<&str> = [
            (by_user >= n, user_key.as_str()),
            (by_addr >= n, addr_key.as_str()),
        ]
        .into_iter()
        .filter_map(|(h, k)| h.then_some(k))
        .collect();
        let evidence = self.logins.evidence(&hot);
        // One alert for both keys when one burst trips both.
        if by_user >= n {
            self.set_quiet(Rule::LoginBruteForce, user_key, now);
        }
        if by_addr >= n {
            self.set_quiet(Rule::LoginBruteForce, addr_key, now);
        }
        let mut d = Map::new();
        d.insert("username".into(), user.clone().into());
        d.insert("source".into(), source.clone().into());
        d.insert("failures_for_account".into(), by_user.into());
        d.insert("failures_from_address".into(), by_addr.into());
        d.insert(
            "window_secs".into(),
            self.config.login_window.as_secs().into(),
        );
        let summary = if user_hot {
            format!(
                "{by_user} failed logins for account {user:?} within {} s (last from {source})",
                self.config.login_window.as_secs()
            )
        } else {
            format!(
                "{by_addr} failed logins from {source} within {} s",
                self.config.login_window.as_secs()
            )
        };
        out.push(Finding {
            rule: Rule::LoginBruteForce,
            ts,
            summary,
            details: d,
            evidence,
        });
    }

    /// `tls_peer_rejected` and `blob_auth_failed`: one alert per peer or
    /// blob per quiet period, with the exact reason.
    fn integrity(
        &mut self,
        kind: &str,
        event: &Map<String, Value>,
        item: &Arc<Value>,
        ts: OffsetDateTime,
        now: i64,
        out: &mut Vec<Finding>,
    ) {
        let reason = str_field(event, "reason");
        let mut d = Map::new();
        for k in [
            "purpose",
            "ae",
            "peer",
            "sop_instance_uid",
            "blob",
            "reason",
        ] {
            if let Some(v) = event.get(k) {
                d.insert(k.into(), v.clone());
            }
        }
        let (rule, key, summary) = if kind == "blob.auth_failed" {
            let blob = str_field(event, "blob");
            (
                Rule::BlobAuthFailed,
                format!("blob:{blob}"),
                format!(
                    "stored blob {blob} (instance {}) failed authentication: {reason}",
                    str_field(event, "sop_instance_uid")
                ),
            )
        } else {
            let peer = str_field(event, "peer");
            (
                Rule::TlsPeerRejected,
                format!("peer:{peer}"),
                format!(
                    "{} {peer} presented a certificate that failed verification: {reason}",
                    str_field(event, "purpose")
                ),
            )
        };
        self.raise(out, rule, key, ts, now, summary, d, vec![(**item).clone()]);
    }

    fn rejected(
        &mut self,
        event: &Map<String, Value>,
        item: &Arc<Value>,
        ts: OffsetDateTime,
        now: i64,
        out: &mut Vec<Finding>,
    ) {
        let addr = host_of(str_field(event, "peer")).to_owned();
        let calling = str_field(event, "calling_ae").to_owned();
        let n = self.scans.hit(
            addr.clone(),
            now,
            ms(self.config.scan_window),
            self.config.max_tracked_keys,
            item,
        );
        if n >= self.config.scan_rejections.max(1) {
            let mut d = Map::new();
            d.insert("peer".into(), addr.clone().into());
            d.insert("rejections".into(), n.into());
            d.insert("last_calling_ae".into(), calling.clone().into());
            d.insert(
                "window_secs".into(),
                self.config.scan_window.as_secs().into(),
            );
            let evidence = self.scans.evidence(&[&addr]);
            self.raise(
                out,
                Rule::AssociationScan,
                addr.clone(),
                ts,
                now,
                format!(
                    "{n} rejected associations from {addr} within {} s",
                    self.config.scan_window.as_secs()
                ),
                d,
                evidence,
            );
        }
        if str_field(event, "reason") == "unknown_calling_ae" {
            let mut d = Map::new();
            d.insert("calling_ae".into(), calling.clone().into());
            d.insert("called_ae".into(), str_field(event, "called_ae").into());
            d.insert("peer".into(), addr.clone().into());
            self.raise(
                out,
                Rule::UnknownDevice,
                format!("{calling}|{addr}"),
                ts,
                now,
                format!("unknown device {calling:?} tried to connect from {addr}"),
                d,
                vec![(**item).clone()],
            );
        }
    }

    fn http(
        &mut self,
        event: &Map<String, Value>,
        item: &Arc<Value>,
        ts: OffsetDateTime,
        now: i64,
        patients: Option<&PatientResolver>,
        out: &mut Vec<Finding>,
    ) {
        let status = event.get("status").and_then(Value::as_u64).unwrap_or(0);
        if !(200..300).contains(&status) {
            return;
        }
        let action = str_field(event, "action");
        let user = str_field(event, "user").to_owned();
        if let Some(q) = event.get("qido").and_then(Value::as_object) {
            let level = q.get("level").and_then(Value::as_str).unwrap_or_default();
            let universal = q.get("universal").and_then(Value::as_bool).unwrap_or(false);
            let limit = q.get("limit").and_then(Value::as_u64);
            let paged = limit.is_some_and(|l| l <= self.config.qido_max_limit as u64);
            if universal && matches!(level, "PATIENT" | "STUDY") && !paged {
                let mut d = Map::new();
                d.insert("user".into(), user.clone().into());
                d.insert("peer".into(), peer_of(event).into());
                d.insert("level".into(), level.into());
                d.insert("limit".into(), limit.into());
                d.insert("via".into(), "QIDO-RS".into());
                self.raise(
                    out,
                    Rule::BroadQuery,
                    format!("user:{user}"),
                    ts,
                    now,
                    format!(
                        "QIDO-RS search of all {} by {user:?} without a limit ≤ {}",
                        level.to_ascii_lowercase(),
                        self.config.qido_max_limit
                    ),
                    d,
                    vec![(**item).clone()],
                );
            }
        }
        if action.starts_with("wado.") {
            let studies = str_list(event, "study_uids");
            // Copies of whole instances, or what a viewer displays.
            let viewing = !matches!(action, "wado.study" | "wado.series" | "wado.instance");
            self.retrieved(
                format!("user:{user}"),
                studies,
                if viewing {
                    "WADO-RS (viewing)"
                } else {
                    "WADO-RS"
                },
                viewing,
                item,
                ts,
                now,
                patients,
                out,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn retrieved(
        &mut self,
        actor: String,
        studies: Vec<String>,
        via: &'static str,
        viewing: bool,
        item: &Arc<Value>,
        ts: OffsetDateTime,
        now: i64,
        patients: Option<&PatientResolver>,
        out: &mut Vec<Finding>,
    ) {
        if studies.is_empty() {
            return;
        }
        let window = ms(self.config.bulk_window);
        let (max_studies, max_patients) = if viewing {
            (self.config.view_studies, self.config.view_patients)
        } else {
            (self.config.bulk_studies, self.config.bulk_patients)
        };
        // Views and copies are counted apart, each against its thresholds.
        let actor = if viewing {
            format!("{actor} (viewing)")
        } else {
            actor
        };
        if !self.bulk.contains_key(&actor) && self.bulk.len() >= self.config.max_tracked_keys {
            if let Some(oldest) = self
                .bulk
                .iter()
                .min_by_key(|(_, r)| r.last)
                .map(|(k, _)| k.clone())
            {
                self.bulk.remove(&oldest);
            }
        }
        let r = self.bulk.entry(actor.clone()).or_default();
        r.last = now;
        // Bounded per actor: far more entries than any threshold needs.
        let per_actor_cap = (max_studies + max_patients + 1) * 8;
        for s in studies {
            let patient = patients.and_then(|f| f(&s));
            r.items.push_back((now, s, patient));
        }
        while r.items.front().is_some_and(|(t, _, _)| *t <= now - window)
            || r.items.len() > per_actor_cap
        {
            r.items.pop_front();
        }
        r.recent.push_back((now, item.clone()));
        trim_recent(&mut r.recent, now, window);
        let studies: HashSet<&str> = r.items.iter().map(|(_, s, _)| s.as_str()).collect();
        let patients: HashSet<&str> = r
            .items
            .iter()
            .filter_map(|(_, _, p)| p.as_deref())
            .collect();
        let (ns, np) = (studies.len(), patients.len());
        if ns > max_studies || np > max_patients {
            let mut uids: Vec<&str> = studies.into_iter().collect();
            uids.sort_unstable();
            uids.truncate(100);
            let mut d = Map::new();
            d.insert("actor".into(), actor.clone().into());
            d.insert("studies".into(), ns.into());
            d.insert("patients".into(), np.into());
            d.insert(
                "window_secs".into(),
                self.config.bulk_window.as_secs().into(),
            );
            d.insert("last_via".into(), via.into());
            d.insert("study_uids".into(), json!(uids));
            let evidence: Vec<Value> = r.recent.iter().map(|(_, v)| (**v).clone()).collect();
            self.raise(
                out,
                Rule::BulkRetrieval,
                actor.clone(),
                ts,
                now,
                format!(
                    "{actor} retrieved {ns} studies of {np} patients within {} s",
                    self.config.bulk_window.as_secs()
                ),
                d,
                evidence,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn raise(
        &mut self,
        out: &mut Vec<Finding>,
        rule: Rule,
        key: String,
        ts: OffsetDateTime,
        now: i64,
        summary: String,
        details: Map<String, Value>,
        evidence: Vec<Value>,
    ) {
        if self.is_quiet(rule, &key, now) {
            return;
        }
        self.set_quiet(rule, key, now);
        out.push(Finding {
            rule,
            ts,
            summary,
            details,
            evidence,
        });
    }

    fn is_quiet(&self, rule: Rule, key: &str, now: i64) -> bool {
        self.quiet
            .get(&(rule, key.to_owned()))
            .is_some_and(|until| now < *until)
    }

    fn set_quiet(&mut self, rule: Rule, key: String, now: i64) {
        let cap = self.config.max_tracked_keys.saturating_mul(Rule::ALL.len());
        if self.quiet.len() >= cap {
            if let Some(k) = self
                .quiet
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(k, _)| k.clone())
            {
                self.quiet.remove(&k);
            }
        }
        self.quiet
            .insert((rule, key), now.saturating_add(ms(self.config.repeat)));
    }

    fn forget_quiet(&mut self, now: i64) {
        if self.quiet.len() > 1024 {
            self.quiet.retain(|_, until| *until > now);
        }
    }
}

/// Sliding-window counters per key, at most `cap` keys, with the most
/// recent events' evidence (shared between keys: one event hits a user
/// and an address key).
#[derive(Default)]
struct Windows {
    map: HashMap<String, Window>,
}

#[derive(Default)]
struct Window {
    hits: VecDeque<i64>,
    /// At most [`MAX_EVIDENCE`], within the window.
    recent: VecDeque<(i64, Arc<Value>)>,
}

impl Windows {
    /// Adds a hit for `key` at `now` (with the event's evidence) and returns
    /// the hits within `window`.
    fn hit(&mut self, key: String, now: i64, window: i64, cap: usize, item: &Arc<Value>) -> usize {
        if !self.map.contains_key(&key) && self.map.len() >= cap.max(1) {
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, w)| w.hits.back().copied().unwrap_or(i64::MIN))
                .map(|(k, _)| k.clone())
            {
                self.map.remove(&oldest);
            }
        }
        let w = self.map.entry(key).or_default();
        w.hits.push_back(now);
        while w.hits.front().is_some_and(|t| *t <= now - window) {
            w.hits.pop_front();
        }
        // Never more entries than a threshold could need.
        while w.hits.len() > 10_000 {
            w.hits.pop_front();
        }
        w.recent.push_back((now, item.clone()));
        trim_recent(&mut w.recent, now, window);
        w.hits.len()
    }

    /// The evidence in the windows of `keys`, each event once, oldest
    /// first, at most [`MAX_EVIDENCE`] (the most recent).
    fn evidence(&self, keys: &[&str]) -> Vec<Value> {
        let mut all: Vec<&(i64, Arc<Value>)> = keys
            .iter()
            .filter_map(|k| self.map.get(*k))
            .flat_map(|w| w.recent.iter())
            .collect();
        all.sort_by_key(|(t, _)| *t);
        let mut out: Vec<&Arc<Value>> = Vec::new();
        for (_, v) in all {
            if !out.iter().any(|o| Arc::ptr_eq(o, v)) {
                out.push(v);
            }
        }
        let skip = out.len().saturating_sub(MAX_EVIDENCE);
        out.into_iter().skip(skip).map(|v| (**v).clone()).collect()
    }
}

/// Drops evidence older than the window and all but the last
/// [`MAX_EVIDENCE`].
fn trim_recent(recent: &mut VecDeque<(i64, Arc<Value>)>, now: i64, window: i64) {
    while recent.front().is_some_and(|(t, _)| *t <= now - window) || recent.len() > MAX_EVIDENCE {
        recent.pop_front();
    }
}

#[derive(Default)]
struct Retrievals {
    last: i64,
    items: VecDeque<(i64, String, Option<String>)>,
    /// The last [`MAX_EVIDENCE`] retrievals' evidence within the window.
    recent: VecDeque<(i64, Arc<Value>)>,
}

/// Event types that are a change of users, tokens, devices, certificates or
/// configuration by someone (not automatic state such as `user.locked`, a
/// consequence the brute-force rule reports, nor a user changing their own
/// password).
fn is_security_change(kind: &str) -> bool {
    let Some((subject, verb)) = kind.split_once('.') else {
        return false;
    };
    let subject_ok = matches!(
        subject,
        "user" | "token" | "device" | "cert" | "config" | "role"
    );
    let verb_ok = matches!(
        verb,
        "added"
            | "created"
            | "updated"
            | "changed"
            | "removed"
            | "deleted"
            | "disabled"
            | "enabled"
            | "unlocked"
            | "password_set"
            | "totp_enabled"
            | "totp_disabled"
            | "role_changed"
            | "revoked"
            | "issued"
            | "server_renewed"
    );
    subject_ok && verb_ok
}

/// Who accessed (for `off_hours_access`), and what they did.
fn access_actor(event: &Map<String, Value>) -> Option<(String, &'static str)> {
    let outcome = str_field(event, "outcome");
    if outcome != "success" {
        return None;
    }
    match str_field(event, "type") {
        "login.success" => Some((format!("user:{}", str_field(event, "username")), "login")),
        "association.accepted" => Some((format!("ae:{}", str_field(event, "ae")), "association")),
        "http.request" => {
            let user = str_field(event, "user");
            let action = str_field(event, "action");
            (!user.is_empty() && action != "login" && action != "logout")
                .then(|| (format!("user:{user}"), "web access"))
        }
        _ => None,
    }
}

fn str_field<'a>(event: &'a Map<String, Value>, key: &str) -> &'a str {
    event.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn str_list(event: &Map<String, Value>, key: &str) -> Vec<String> {
    event
        .get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn peer_of(event: &Map<String, Value>) -> String {
    let p = ["peer", "source"]
        .iter()
        .map(|k| str_field(event, k))
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    host_of(p).to_owned()
}

/// The address part of `ip:port`, `[v6]:port` or a bare address.
fn host_of(peer: &str) -> &str {
    if let Some(rest) = peer.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match peer.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => peer,
    }
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_780_000_000; // a Thursday

    fn ev(t: i64, kind: &str, outcome: &str, fields: Value) -> Map<String, Value> {
        let ts = OffsetDateTime::from_unix_timestamp(t)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default();
        let mut m = Map::new();
        m.insert("ts".into(), ts.into());
        m.insert("type".into(), kind.into());
        m.insert("outcome".into(), outcome.into());
        if let Value::Object(f) = fields {
            m.extend(f);
        }
        m
    }

    fn rules_of(findings: &[Finding]) -> Vec<&'static str> {
        findings.iter().map(|f| f.rule.name()).collect()
    }

    fn run(rules: &mut Rules, events: &[Map<String, Value>]) -> Vec<Finding> {
        events
            .iter()
            .flat_map(|e| rules.evaluate(e, None))
            .collect()
    }

    fn failure(t: i64, user: &str, source: &str) -> Map<String, Value> {
        ev(
            t,
            "login.failure",
            "failure",
            json!({"username": user, "source": source, "reason": "wrong_password"}),
        )
    }

    #[test]
    fn tls_peer_rejected_and_blob_auth_failed_alert_once_per_key() {
        let mut r = Rules::new(DetectConfig::default());
        let tls = |t, peer: &str| {
            ev(
                t,
                "tls.peer_rejected",
                "failure",
                json!({"purpose": "C-MOVE destination", "ae": "DEST", "peer": peer,
                       "reason": "invalid peer certificate: UnknownIssuer"}),
            )
        };
        let blob = |t, id: &str| {
            ev(
                t,
                "blob.auth_failed",
                "failure",
                json!({"sop_instance_uid": "1.2.3", "blob": id, "reason": "segment 0 failed authentication"}),
            )
        };
        let f = run(
            &mut r,
            &[
                tls(T0, "10.0.0.9:104"),
                tls(T0 + 1, "10.0.0.9:104"),
                tls(T0 + 2, "10.0.0.8:104"),
            ],
        );
        assert_eq!(rules_of(&f), ["tls_peer_rejected", "tls_peer_rejected"]);
        assert_eq!(f[0].details["peer"], "10.0.0.9:104");
        assert_eq!(
            f[0].details["reason"],
            "invalid peer certificate: UnknownIssuer"
        );
        assert!(f[0].summary.contains("UnknownIssuer"), "{}", f[0].summary);
        assert_eq!(Rule::TlsPeerRejected.severity(), "medium");
        let f = run(
            &mut r,
            &[blob(T0, "ab"), blob(T0 + 1, "ab"), blob(T0 + 2, "cd")],
        );
        assert_eq!(rules_of(&f), ["blob_auth_failed", "blob_auth_failed"]);
        assert_eq!(f[0].details["blob"], "ab");
        assert_eq!(f[0].details["sop_instance_uid"], "1.2.3");
        assert_eq!(f[0].rule.severity(), "high");
    }

    #[test]
    fn brute_force_per_account_fires_once_at_the_threshold() {
        let mut r = Rules::new(DetectConfig::default());
        let evs: Vec<_> = (0..6)
            .map(|i| failure(T0 + i, "alice", &format!("10.0.0.{i}")))
            .collect();
        let f = run(&mut r, &evs[..4]);
        assert!(f.is_empty());
        let f = run(&mut r, &evs[4..]);
        assert_eq!(rules_of(&f), ["login_brute_force"]);
        assert_eq!(f[0].details["username"], "alice");
        assert_eq!(f[0].details["failures_for_account"], 5);
        // The evidence: the five failures, oldest first, each once although
        // each counted for the account and for its address.
        let ev = &f[0].evidence;
        assert_eq!(ev.len(), 5, "{ev:?}");
        for (i, e) in ev.iter().enumerate() {
            assert_eq!(e["type"], "login.failure");
            assert_eq!(e["outcome"], "failure");
            assert_eq!(e["user"], "alice");
            assert_eq!(e["source"], format!("10.0.0.{i}"));
            assert_eq!(e["reason"], "wrong_password");
        }
    }

    #[test]
    fn evidence_keeps_listed_fields_only() {
        let e = ev(
            T0,
            "http.request",
            "success",
            json!({"user": "u1", "peer": "127.0.0.1:1", "action": "wado.study", "status": 200,
                   "path": "/dicomweb/studies/1.2.3", "study_uids": ["1.2.3"],
                   "qido": {"level": "STUDY"}}),
        );
        let v = evidence(&e);
        let mut keys: Vec<&String> = v
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        keys.sort();
        assert_eq!(
            keys,
            ["action", "outcome", "peer", "status", "ts", "type", "user"]
        );
        assert_eq!(v["status"], 200);
        let long = "x".repeat(500);
        let v = evidence(&ev(
            T0,
            "user.added",
            "success",
            json!({"actor": long, "device": {"ae": "CT9"}}),
        ));
        assert_eq!(v["actor"].as_str().map(str::len), Some(128));
        assert_eq!(v["ae"], "CT9");
    }

    #[test]
    fn brute_force_per_address_across_accounts() {
        let mut r = Rules::new(DetectConfig::default());
        let evs: Vec<_> = (0..5)
            .map(|i| failure(T0 + i, &format!("user{i}"), "192.0.2.7"))
            .collect();
        let f = run(&mut r, &evs);
        assert_eq!(rules_of(&f), ["login_brute_force"]);
        assert_eq!(f[0].details["failures_from_address"], 5);
        let users: Vec<&Value> = f[0].evidence.iter().map(|e| &e["user"]).collect();
        assert_eq!(users, ["user0", "user1", "user2", "user3", "user4"]);
    }

    #[test]
    fn brute_force_needs_the_failures_within_the_window() {
        let mut r = Rules::new(DetectConfig::default());
        let evs: Vec<_> = (0..10)
            .map(|i| failure(T0 + i * 20, "bob", "10.0.0.1"))
            .collect();
        assert!(run(&mut r, &evs).is_empty(), "3 per minute is below 5");
        let mut r = Rules::new(DetectConfig::default());
        let totp = ev(
            T0,
            "login.failure",
            "failure",
            json!({"username": "bob", "source": "10.0.0.1", "reason": "totp_missing"}),
        );
        assert!(run(&mut r, &vec![totp; 8]).is_empty());
    }

    fn rejected(t: i64, ae: &str, peer: &str, reason: &str) -> Map<String, Value> {
        ev(
            t,
            "association.rejected",
            "refused",
            json!({"calling_ae": ae, "called_ae": "BASTION", "peer": peer, "reason": reason}),
        )
    }

    #[test]
    fn association_scan_and_unknown_device() {
        let mut r = Rules::new(DetectConfig::default());
        let evs: Vec<_> = (0..12)
            .map(|i| {
                rejected(
                    T0 + i,
                    "INTRUDER",
                    &format!("10.9.9.9:{}", 40000 + i),
                    "unknown_calling_ae",
                )
            })
            .collect();
        let f = run(&mut r, &evs);
        let mut names = rules_of(&f);
        names.sort_unstable();
        assert_eq!(names, ["association_scan", "unknown_device"]);
        let scan = f.iter().find(|x| x.rule == Rule::AssociationScan);
        assert_eq!(
            scan.map(|s| s.details["peer"].clone()),
            Some(json!("10.9.9.9"))
        );
    }

    #[test]
    fn nine_rejections_of_a_known_device_raise_nothing() {
        let mut r = Rules::new(DetectConfig::default());
        let evs: Vec<_> = (0..9)
            .map(|i| rejected(T0 + i, "CT1", "10.1.1.1:5000", "address_outside_network"))
            .collect();
        assert!(run(&mut r, &evs).is_empty());
        // Spread over more than the window: still nothing.
        let evs: Vec<_> = (0..30)
            .map(|i| rejected(T0 + 100 + i * 10, "CT1", "10.1.1.1:5000", "wrong_transport"))
            .collect();
        assert!(run(&mut r, &evs).is_empty());
    }

    #[test]
    fn broad_query_dimse_and_qido() {
        let mut r = Rules::new(DetectConfig::default());
        let cfind = ev(
            T0,
            "security.universal_query",
            "alert",
            json!({"ae": "WS1", "peer": "10.0.0.5:4000", "model": "study_root", "level": "STUDY"}),
        );
        assert_eq!(rules_of(&r.evaluate(&cfind, None)), ["broad_query"]);
        let web_universal = ev(
            T0,
            "security.universal_query",
            "alert",
            json!({"ae": "web:carol", "level": "STUDY"}),
        );
        assert!(r.evaluate(&web_universal, None).is_empty());
        let qido = |t, limit: Option<u64>| {
            ev(
                t,
                "http.request",
                "success",
                json!({"user": "carol", "peer": "127.0.0.1:5555", "action": "qido.studies", "status": 200,
                       "qido": {"level": "STUDY", "universal": true, "limit": limit}}),
            )
        };
        assert!(r.evaluate(&qido(T0, Some(25)), None).is_empty());
        assert!(r.evaluate(&qido(T0, Some(100)), None).is_empty());
        assert_eq!(
            rules_of(&r.evaluate(&qido(T0 + 1, None), None)),
            ["broad_query"]
        );
        let mut r = Rules::new(DetectConfig::default());
        assert_eq!(
            rules_of(&r.evaluate(&qido(T0, Some(500)), None)),
            ["broad_query"]
        );
        let restricted = ev(
            T0,
            "http.request",
            "success",
            json!({"user": "dave", "action": "qido.studies", "status": 200,
                   "qido": {"level": "STUDY", "universal": false, "limit": null}}),
        );
        assert!(r.evaluate(&restricted, None).is_empty());
    }

    #[test]
    fn bulk_retrieval_by_studies_and_by_patients() {
        let mut r = Rules::new(DetectConfig::default());
        let mv = |t, uids: Vec<String>| {
            ev(
                t,
                "retrieve.move",
                "success",
                json!({"ae": "WS2", "peer": "10.0.0.6:1", "studies": uids}),
            )
        };
        let evs: Vec<_> = (0..20)
            .map(|i| mv(T0 + i, vec![format!("1.2.3.{i}")]))
            .collect();
        assert!(
            run(&mut r, &evs).is_empty(),
            "20 studies is not more than 20"
        );
        let f = r.evaluate(&mv(T0 + 30, vec!["1.2.3.99".into()]), None);
        assert_eq!(rules_of(&f), ["bulk_retrieval"]);
        assert_eq!(f[0].details["studies"], 21);
        // Patients: 11 studies of 11 patients over WADO-RS.
        let mut r = Rules::new(DetectConfig::default());
        let resolver: Box<PatientResolver> =
            Box::new(|uid: &str| Some(format!("p-{}", uid.rsplit('.').next().unwrap_or(""))));
        let wado = |t, uid: String| {
            ev(
                t,
                "http.request",
                "success",
                json!({"user": "eve", "action": "wado.study", "status": 200, "study_uids": [uid]}),
            )
        };
        let mut all = Vec::new();
        for i in 0..11 {
            all.extend(r.evaluate(&wado(T0 + i, format!("1.2.4.{i}")), Some(&*resolver)));
        }
        assert_eq!(rules_of(&all), ["bulk_retrieval"]);
        assert_eq!(all[0].details["patients"], 11);
        // Outside the window the count starts again.
        let mut r = Rules::new(DetectConfig::default());
        let evs: Vec<_> = (0..40)
            .map(|i| mv(T0 + i * 60, vec![format!("1.2.5.{i}")]))
            .collect();
        assert!(run(&mut r, &evs).is_empty(), "10 per 10 minutes");
    }

    /// What OHIF really sends when a clinician reads 30 studies of 30
    /// patients in 10 minutes: the worklist (limit=101), then per study
    /// metadata, frames, thumbnails. No alert. A script pulling 100 studies
    /// in the same time alerts, whether it copies instances or only reads
    /// metadata and frames.
    #[test]
    fn a_viewer_reading_a_worklist_is_not_a_harvester() {
        let resolver: Box<PatientResolver> =
            Box::new(|uid: &str| Some(format!("p-{}", uid.rsplit('.').next().unwrap_or(""))));
        let req = |t, user: &str, action: &str, uid: Option<String>, qido: Option<Value>| {
            let mut f = json!({"user": user, "peer": "127.0.0.1:5555", "action": action,
                               "status": 200, "study_uids": uid.into_iter().collect::<Vec<_>>()});
            if let Some(q) = qido {
                f["qido"] = q;
            }
            ev(t, "http.request", "success", f)
        };
        let worklist = json!({"level": "STUDY", "universal": true, "limit": 101});
        let mut r = Rules::new(DetectConfig::default());
        let mut found = Vec::new();
        for i in 0..30 {
            let t = T0 + i * 19; // 30 studies within 10 minutes
            found.extend(r.evaluate(
                &req(t, "doc", "qido.studies", None, Some(worklist.clone())),
                None,
            ));
            let uid = format!("1.2.7.{i}");
            for action in [
                "wado.metadata",
                "wado.thumbnail",
                "wado.frames",
                "wado.frames",
            ] {
                found.extend(r.evaluate(
                    &req(t + 1, "doc", action, Some(uid.clone()), None),
                    Some(&*resolver),
                ));
            }
        }
        assert!(found.is_empty(), "{:?}", rules_of(&found));

        for (user, actions) in [
            ("script", &["wado.study"][..]),
            ("scraper", &["wado.metadata", "wado.frames"][..]),
        ] {
            let mut r = Rules::new(DetectConfig::default());
            let mut found = Vec::new();
            for i in 0..100 {
                for action in actions {
                    let uid = format!("1.2.8.{i}");
                    found.extend(r.evaluate(
                        &req(T0 + i * 5, user, action, Some(uid), None),
                        Some(&*resolver),
                    ));
                }
            }
            assert_eq!(rules_of(&found), ["bulk_retrieval"], "{user}");
        }
        // A universal worklist with no limit, or a large one, is still broad.
        let mut r = Rules::new(DetectConfig::default());
        let all = json!({"level": "STUDY", "universal": true, "limit": null});
        assert_eq!(
            rules_of(&r.evaluate(&req(T0, "x", "qido.studies", None, Some(all)), None)),
            ["broad_query"]
        );
    }

    #[test]
    fn off_hours_only_when_configured() {
        let login = |t| {
            ev(
                t,
                "login.success",
                "success",
                json!({"username": "frank", "source": "10.0.0.8"}),
            )
        };
        // 2026-05-28 (Thursday) 20:26:40 UTC.
        let late = T0;
        let mut r = Rules::new(DetectConfig::default());
        assert!(r.evaluate(&login(late), None).is_empty());
        let hours = WorkingHours::parse("07:00-19:00", &["mon-fri".into()], "+01:00");
        let Ok(hours) = hours else {
            panic!("{hours:?}")
        };
        let mut r = Rules::new(DetectConfig {
            working_hours: Some(hours.clone()),
            ..DetectConfig::default()
        });
        assert_eq!(
            rules_of(&r.evaluate(&login(late), None)),
            ["off_hours_access"]
        );
        assert!(
            r.evaluate(&login(late + 60), None).is_empty(),
            "once per period"
        );
        // 10:00 local on the same Thursday.
        let morning = late - 11 * 3600;
        let mut r = Rules::new(DetectConfig {
            working_hours: Some(hours.clone()),
            ..DetectConfig::default()
        });
        assert!(r.evaluate(&login(morning), None).is_empty());
        // Saturday morning.
        assert_eq!(
            rules_of(&r.evaluate(&login(morning + 2 * 86400), None)),
            ["off_hours_access"]
        );
        assert!(WorkingHours::parse("19:00-07:00", &[], "UTC").is_err());
        assert!(WorkingHours::parse("07:00-19:00", &["xyz".into()], "UTC").is_err());
        assert!(WorkingHours::parse("07:00-19:00", &[], "Europe/Paris").is_err());
    }

    #[test]
    fn device_change_security_change_and_audit_failure() {
        let mut r = Rules::new(DetectConfig::default());
        let sw = ev(
            T0,
            "device.software_changed",
            "alert",
            json!({"ae": "CT1", "field": "SoftwareVersions", "old": "1.0", "new": "2.0"}),
        );
        let f = r.evaluate(&sw, None);
        assert_eq!(rules_of(&f), ["device_changed"]);
        assert_eq!(f[0].details["ae"], "CT1");
        assert_eq!(f[0].details["field"], "SoftwareVersions");
        assert!(r.evaluate(&sw, None).is_empty(), "the same change once");
        // Other changes of the same device within the quiet period: quiet
        // (a modality sending a mix of models and versions is one alert).
        for (field, new) in [
            ("SoftwareVersions", "1.0"),
            ("Manufacturer", "OTHER"),
            ("ManufacturerModelName", "X-9"),
        ] {
            let e = ev(
                T0 + 5,
                "device.software_changed",
                "alert",
                json!({"ae": "CT1", "field": field, "old": "a", "new": new}),
            );
            assert!(r.evaluate(&e, None).is_empty(), "{field}");
        }
        // Another device is not silenced by it.
        let other = ev(
            T0 + 6,
            "device.software_changed",
            "alert",
            json!({"ae": "MR1", "field": "SoftwareVersions", "old": "1", "new": "2"}),
        );
        assert_eq!(rules_of(&r.evaluate(&other, None)), ["device_changed"]);
        // After the quiet period the device alerts again.
        let later = ev(
            T0 + 601,
            "device.software_changed",
            "alert",
            json!({"ae": "CT1", "field": "SoftwareVersions", "old": "2.0", "new": "3.0"}),
        );
        assert_eq!(rules_of(&r.evaluate(&later, None)), ["device_changed"]);
        for kind in [
            "user.added",
            "user.removed",
            "user.password_set",
            "token.created",
            "token.revoked",
            "device.added",
            "device.updated",
            "device.removed",
            "cert.issued",
        ] {
            let e = ev(
                T0,
                kind,
                "success",
                json!({"actor": "cli", "username": "x"}),
            );
            assert_eq!(
                rules_of(&r.evaluate(&e, None)),
                ["security_change"],
                "{kind}"
            );
        }
        for kind in [
            "user.locked",
            "user.password_changed",
            "store.stored",
            "login.success",
        ] {
            let e = ev(T0, kind, "success", json!({"actor": "x"}));
            assert!(r.evaluate(&e, None).is_empty(), "{kind}");
        }
        let ok = ev(T0, "audit.verify", "success", json!({}));
        assert!(r.evaluate(&ok, None).is_empty());
        let bad = ev(T0, "audit.verify", "failure", json!({"first_broken": 17}));
        assert_eq!(rules_of(&r.evaluate(&bad, None)), ["audit_verify_failed"]);
    }

    #[test]
    fn host_commands_record_routine_changes_without_alerts() {
        let mut r = Rules::new(DetectConfig::default()).routine_host_changes();
        for kind in [
            "user.added",
            "user.password_set",
            "token.created",
            "device.added",
            "device.updated",
            "cert.issued",
        ] {
            let e = ev(
                T0,
                kind,
                "success",
                json!({"actor": "cli", "username": "x"}),
            );
            assert!(r.evaluate(&e, None).is_empty(), "{kind}");
        }
        // What is not a routine change still alerts from the host.
        let bad = ev(T0, "audit.verify", "failure", json!({"first_broken": 17}));
        assert_eq!(rules_of(&r.evaluate(&bad, None)), ["audit_verify_failed"]);
    }

    #[test]
    fn findings_name_their_source() {
        let mut r = Rules::new(DetectConfig::default());
        let f = run(
            &mut r,
            &[rejected(T0, "EVIL", "10.0.0.9:4000", "unknown_calling_ae")],
        );
        assert_eq!(
            f.iter().map(source_of).collect::<Vec<_>>(),
            ["addr:10.0.0.9"]
        );
        let e = ev(
            T0,
            "user.added",
            "success",
            json!({"actor": "alice", "username": "x"}),
        );
        let f = r.evaluate(&e, None);
        assert_eq!(f.iter().map(source_of).collect::<Vec<_>>(), ["actor:alice"]);
        let fails: Vec<_> = (0..5).map(|i| failure(T0 + i, "bob", "10.0.0.3")).collect();
        let f = run(&mut r, &fails);
        assert_eq!(
            f.iter().map(source_of).collect::<Vec<_>>(),
            ["addr:10.0.0.3"]
        );
    }

    #[test]
    fn own_alerts_never_retrigger() {
        let mut r = Rules::new(DetectConfig::default());
        let a = ev(
            T0,
            "security.alert",
            "alert",
            json!({"rule": "security_change", "event": "user.added"}),
        );
        assert!(run(&mut r, &vec![a; 20]).is_empty());
    }

    #[test]
    fn tracked_keys_are_bounded() {
        let mut r = Rules::new(DetectConfig {
            max_tracked_keys: 100,
            ..DetectConfig::default()
        });
        for i in 0..5000u32 {
            let peer = format!("10.{}.{}.{}:1", i >> 16, (i >> 8) & 255, i & 255);
            r.evaluate(
                &rejected(T0 + i64::from(i), "X", &peer, "wrong_transport"),
                None,
            );
            r.evaluate(&failure(T0 + i64::from(i), &format!("u{i}"), &peer), None);
        }
        assert!(r.scans.map.len() <= 100);
        assert!(r.logins.map.len() <= 100);
    }
}
