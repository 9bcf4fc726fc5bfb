//! `DIR/bastion.toml`: every setting, with its default, commented.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// DICOM network settings.
    pub dicom: DicomSection,
    /// Ingest limits.
    pub limits: LimitsSection,
    /// Query (C-FIND) limits.
    pub query: QuerySection,
    /// HTTPS (DICOMweb and account API) settings.
    pub http: HttpSection,
    /// Login throttling, lock and session settings.
    pub accounts: AccountsSection,
    /// Detection rules and alerts.
    pub detect: DetectSection,
    /// Audit trail export.
    pub audit: AuditSection,
    /// Where the keys are.
    pub secrets: SecretsSection,
    /// Where the encrypted instance blobs are.
    pub store: StoreSection,
    /// Where the metadata index is (embedded SQLite, or PostgreSQL).
    pub index: IndexSection,
}

/// `[store]`: where the encrypted instance blobs are (docs/scale-out.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// An S3-compatible bucket,
    /// `s3://BUCKET?endpoint=http://HOST:PORT&region=REGION` (`bastion init
    /// --store-url`); credentials from `AWS_ACCESS_KEY_ID` /
    /// `AWS_SECRET_ACCESS_KEY` or the secrets file `store-credentials`.
    /// Absent: the local directory `DIR/blobs` (the embedded default).
    pub url: Option<String>,
}

/// `[index]`: the metadata index engine (docs/scale-out.md). Absent `url`:
/// the SQLCipher file `index.db` in the data directory (the default).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexSection {
    /// `postgres://USER@HOST:PORT/DB`: the index in PostgreSQL (schema
    /// `bastion_index`). Never a password: that comes from `PGPASSWORD` or
    /// the 0600 file `index-password` in the secrets directory.
    pub url: Option<String>,
    /// PEM file of the CA(s) that sign the database server's certificate:
    /// TLS with chain and host-name verification (verify-full). Absent:
    /// plaintext, accepted only to loopback or a unix socket.
    pub ca: Option<PathBuf>,
    /// The PostgreSQL schema of the index (default `bastion_index`): another
    /// name lets several installations (e.g. test servers) share one database.
    pub schema: Option<String>,
}

/// `url` fit for a message: a password in its user part
/// (`scheme://user:PASSWORD@host`) or in a `password=` query parameter is
/// replaced by `***`. For every message that names `[index] url` or
/// `--to-index`, which an administrator may have written a password into
/// (it is refused, but must not be echoed either).
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some(p) => p,
        None => ("", url),
    };
    let (authority_path, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority_path = match authority_path.split_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority_path.to_owned(),
        },
        None => authority_path.to_owned(),
    };
    let query = query.map(|q| {
        q.split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    let mut out = String::new();
    if !scheme.is_empty() {
        out.push_str(scheme);
        out.push_str("://");
    }
    out.push_str(&authority_path);
    if let Some(q) = query {
        out.push('?');
        out.push_str(&q);
    }
    out
}

/// The secrets-directory file holding the PostgreSQL index password.
pub const INDEX_PASSWORD_FILE: &str = "index-password";

/// `[secrets]`: where the master key, the audit-signing key and the CA key
/// live ([`crate::keys`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsSection {
    /// An absolute directory outside the data directory, or
    /// `"$CREDENTIALS_DIRECTORY"` (systemd credentials, read-only); absent:
    /// inside the data directory (`secrets/`, `tls/ca.key`).
    pub dir: Option<String>,
}

/// `[audit]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// `[audit.syslog]`: forward every audit message to a syslog collector;
    /// off when absent.
    pub syslog: Option<SyslogSection>,
    /// Serve patient data even while the audit trail cannot record (a full
    /// disk). Off by default: Bastion then refuses every operation that
    /// would produce an audit record (DIMSE "out of resources", HTTP 503)
    /// until recording works again. A site that chooses availability over
    /// accountability sets it; `serve` warns at every start and the posture
    /// page shows it.
    #[serde(default)]
    pub allow_unaudited_access: bool,
}

/// `[audit.syslog]`: IHE ATNA Record Audit Event export (RFC 5424 messages
/// over TLS, RFC 5425), spooled on disk while the collector is unreachable.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogSection {
    /// `tls://HOST:PORT` (IANA port 6514). Nothing else: audit messages name
    /// patients and are never sent in clear.
    pub url: String,
    /// PEM file of the CA(s) that sign the collector's certificate; default
    /// Bastion's own CA (`tls/ca.crt`).
    #[serde(default)]
    pub ca: Option<std::path::PathBuf>,
    /// HOSTNAME of the messages; default the system host name.
    #[serde(default)]
    pub hostname: Option<String>,
}

impl SyslogSection {
    /// The collector's host and port.
    ///
    /// # Errors
    /// Not `tls://HOST:PORT`.
    pub fn target(&self) -> Result<(String, u16)> {
        let Some(rest) = self.url.strip_prefix("tls://") else {
            anyhow::bail!(
                "[audit.syslog] url {:?} must be tls://HOST:PORT (RFC 5425; audit messages are never sent in clear)",
                self.url
            );
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .with_context(|| format!("[audit.syslog] url {:?} has no :PORT", self.url))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("[audit.syslog] url {:?}: invalid port", self.url))?;
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            anyhow::bail!("[audit.syslog] url {:?}: invalid host", self.url);
        }
        Ok((host.to_owned(), port))
    }
}

/// `[detect]`: thresholds of the detection rules and the alert webhook (see
/// `bastion_security::detect`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectSection {
    /// Failed logins per account or per address that raise `login_brute_force`.
    pub login_failures: usize,
    /// Window of `login_brute_force`, seconds.
    pub login_window_secs: u64,
    /// Rejected associations from one address that raise `association_scan`.
    pub scan_rejections: usize,
    /// Window of `association_scan`, seconds.
    pub scan_window_secs: u64,
    /// A QIDO-RS study search with `limit` at most this is not broad.
    pub qido_max_limit: usize,
    /// More distinct studies than this per user or device raise `bulk_retrieval`.
    pub bulk_studies: usize,
    /// More distinct patients than this per user or device raise `bulk_retrieval`.
    pub bulk_patients: usize,
    /// More distinct studies than this *viewed* (WADO-RS metadata, frames,
    /// rendered, thumbnails: a viewer's requests) raise `bulk_retrieval`.
    pub view_studies: usize,
    /// More distinct patients than this viewed raise `bulk_retrieval`.
    pub view_patients: usize,
    /// Window of `bulk_retrieval`, seconds.
    pub bulk_window_secs: u64,
    /// Working hours like "07:00-19:00"; empty: `off_hours_access` is off.
    pub working_hours: String,
    /// Working days, e.g. ["mon-fri"] (default when working_hours is set).
    pub working_days: Vec<String>,
    /// Time zone of the working hours: "UTC" or a fixed offset like "+01:00".
    pub timezone: String,
    /// After a rule fired for a key, it stays quiet for that key this long, seconds.
    pub repeat_secs: u64,
    /// Keys (accounts, addresses, devices) tracked per rule at most.
    pub max_tracked_keys: usize,
    /// A new alert is sent to the webhook at most once per this many seconds
    /// per source (address, account, device, actor), unless more severe.
    pub notify_secs: u64,
    /// Whether user, token, device and certificate changes made by CLI
    /// commands on the host open `security_change` alerts (default: no, they
    /// are routine set-up, still recorded in the event log and audit trail).
    pub alert_host_changes: bool,
    /// HTTPS URL each new alert is POSTed to as JSON; empty: no webhook.
    pub webhook_url: String,
    /// PEM file of the CA(s) that sign the webhook server's certificate;
    /// empty: the system's trusted roots.
    pub webhook_ca_file: String,
    /// Alerts waiting for the webhook at most (older ones are dropped first).
    pub webhook_queue: usize,
}

impl Default for DetectSection {
    fn default() -> Self {
        DetectSection {
            login_failures: 5,
            login_window_secs: 60,
            scan_rejections: 10,
            scan_window_secs: 60,
            qido_max_limit: 200,
            bulk_studies: 20,
            bulk_patients: 10,
            view_studies: 60,
            view_patients: 40,
            bulk_window_secs: 600,
            working_hours: String::new(),
            working_days: Vec::new(),
            timezone: "UTC".into(),
            repeat_secs: 600,
            max_tracked_keys: 10_000,
            notify_secs: 600,
            alert_host_changes: false,
            webhook_url: String::new(),
            webhook_ca_file: String::new(),
            webhook_queue: 1000,
        }
    }
}

impl DetectSection {
    /// The rules' thresholds.
    ///
    /// # Errors
    /// Malformed working hours, days or time zone; a threshold of 0; a
    /// webhook URL that is not `https://`.
    pub fn rules(&self) -> Result<bastion_security::detect::DetectConfig> {
        use std::time::Duration;
        if self.login_failures == 0 || self.scan_rejections == 0 {
            anyhow::bail!("[detect] login_failures and scan_rejections must be at least 1");
        }
        if !self.webhook_url.is_empty() && !self.webhook_url.starts_with("https://") {
            anyhow::bail!(
                "[detect] webhook_url {:?} must be an https:// URL (alerts are never sent in clear)",
                self.webhook_url
            );
        }
        let working_hours = if self.working_hours.trim().is_empty() {
            None
        } else {
            let days = if self.working_days.is_empty() {
                vec!["mon-fri".to_owned()]
            } else {
                self.working_days.clone()
            };
            Some(
                bastion_security::detect::WorkingHours::parse(
                    &self.working_hours,
                    &days,
                    &self.timezone,
                )
                .context("[detect] working hours")?,
            )
        };
        Ok(bastion_security::detect::DetectConfig {
            login_failures: self.login_failures,
            login_window: Duration::from_secs(self.login_window_secs.max(1)),
            scan_rejections: self.scan_rejections,
            scan_window: Duration::from_secs(self.scan_window_secs.max(1)),
            qido_max_limit: self.qido_max_limit,
            bulk_studies: self.bulk_studies,
            bulk_patients: self.bulk_patients,
            view_studies: self.view_studies,
            view_patients: self.view_patients,
            bulk_window: Duration::from_secs(self.bulk_window_secs.max(1)),
            working_hours,
            repeat: Duration::from_secs(self.repeat_secs),
            max_tracked_keys: self.max_tracked_keys.max(1),
            notify_interval: Duration::from_secs(self.notify_secs),
        })
    }
}

/// `[accounts]`: the login policy (see `bastion_security::accounts::AccountPolicy`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountsSection {
    /// Consecutive failed logins that lock an account (lifted by `user unlock`
    /// or a password change).
    pub lock_after_failures: u32,
    /// Delay after an account's first failed login, milliseconds; doubles with
    /// each consecutive failure.
    pub base_delay_ms: u64,
    /// Largest delay per account, seconds.
    pub max_delay_secs: u64,
    /// Largest delay per source address, seconds (addresses are never locked).
    pub per_address_max_delay_secs: u64,
    /// A session unused this long ends, seconds.
    pub session_idle_secs: u64,
    /// A session ends this long after login, seconds.
    pub session_absolute_secs: u64,
    /// `admin` accounts need a second factor (TOTP) to log in. Turning this
    /// off is logged as a warning at every start.
    pub admin_requires_totp: bool,
}

impl Default for AccountsSection {
    fn default() -> Self {
        AccountsSection {
            lock_after_failures: 10,
            base_delay_ms: 1000,
            max_delay_secs: 15 * 60,
            per_address_max_delay_secs: 30,
            session_idle_secs: 30 * 60,
            session_absolute_secs: 12 * 3600,
            admin_requires_totp: true,
        }
    }
}

/// `[http]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// HTTPS listener address, or `off`.
    pub addr: String,
    /// Origins allowed to call the API from a browser (CORS); empty: CORS off.
    pub cors_origins: Vec<String>,
    /// Largest STOW-RS request body, bytes.
    pub max_upload_bytes: u64,
    /// Largest JSON request body (login, password change), bytes.
    pub max_json_bytes: u64,
    /// Seconds allowed for the TLS handshake.
    pub handshake_timeout_secs: u64,
    /// Seconds allowed for a request's headers (slowloris bound).
    pub header_timeout_secs: u64,
    /// Seconds allowed for a whole request body.
    pub body_timeout_secs: u64,
    /// Seconds a STOW-RS body may send nothing before it is cut off (408):
    /// a stalled upload must not hold its memory or spool budget for the
    /// whole `body_timeout_secs`.
    pub body_idle_timeout_secs: u64,
    /// HTTPS connections held at once.
    pub max_connections: usize,
    /// HTTPS connections held at once from one source address (IPv6: /64).
    pub max_connections_per_address: usize,
    /// HTTPS connections from one source address not yet past the TLS
    /// handshake and a first request's headers; a newer one evicts the
    /// oldest.
    pub max_unproven_per_address: usize,
    /// An unpacked OHIF Viewer (npm `@ohif/app`: the package directory or
    /// its `dist/`), served at `/viewer/` on the same origin; unset: no
    /// viewer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ohif_dir: Option<PathBuf>,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            addr: "127.0.0.1:8443".into(),
            cors_origins: Vec::new(),
            max_upload_bytes: 2 << 30,
            max_json_bytes: 64 << 10,
            handshake_timeout_secs: 10,
            header_timeout_secs: 10,
            body_timeout_secs: 300,
            body_idle_timeout_secs: 60,
            max_connections: 256,
            max_connections_per_address: 64,
            max_unproven_per_address: 16,
            ohif_dir: None,
        }
    }
}

impl HttpSection {
    /// The listener address; `None` when `off`.
    ///
    /// # Errors
    /// Neither `off` nor `HOST:PORT` with an IP address; a CORS origin that
    /// is not `scheme://host[:port]` (or is `*`).
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>> {
        for o in &self.cors_origins {
            let ok = (o.starts_with("https://") || o.starts_with("http://"))
                && !o.contains('*')
                && o.split("://")
                    .nth(1)
                    .is_some_and(|h| !h.is_empty() && !h.contains('/'));
            if !ok {
                anyhow::bail!("[http] cors_origins: {o:?} is not an origin like \"https://viewer.example.org\" (no path, no wildcard)");
            }
        }
        if self.addr.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        self.addr
            .parse()
            .map(Some)
            .with_context(|| format!("[http] addr {:?} is neither \"off\" nor IP:PORT", self.addr))
    }
}

/// `[query]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuerySection {
    /// A query matching more entities than this is refused (0xA700) with no match.
    pub max_matches: usize,
}

impl Default for QuerySection {
    fn default() -> Self {
        QuerySection {
            max_matches: bastion_archive::query::DEFAULT_MAX_MATCHES,
        }
    }
}

/// `[dicom]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DicomSection {
    /// Our AE title.
    pub ae_title: String,
    /// DICOM-TLS listener address.
    pub tls_addr: SocketAddr,
    /// Plain DICOM listener address; off when absent.
    pub plain_addr: Option<SocketAddr>,
    /// Maximum PDU length announced and accepted, bytes.
    pub max_pdu_length: u32,
    /// Concurrent associations.
    pub max_associations: usize,
    /// Unfinished handshakes per source address (a newer one evicts the
    /// oldest).
    pub max_pending_per_address: usize,
    /// Unfinished handshakes over all addresses (a newer one evicts the
    /// oldest of the address holding the most).
    pub max_pending: usize,
    /// Idle association timeout, seconds.
    pub idle_timeout_secs: u64,
    /// TLS handshake + A-ASSOCIATE-RQ timeout, seconds.
    pub handshake_timeout_secs: u64,
}

/// `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest dataset accepted, bytes.
    pub max_dataset_bytes: u64,
    /// Largest single element value, bytes.
    pub max_element_bytes: u64,
    /// Largest inflated size of a deflated dataset, bytes.
    pub max_inflated_bytes: u64,
    /// Deepest sequence nesting.
    pub max_sequence_depth: u32,
    /// Datasets parsed at once.
    pub max_concurrent_parses: usize,
    /// Global memory budget, MiB: received datasets, STOW-RS bodies and
    /// inflated datasets together.
    pub memory_budget_mib: u64,
    /// The most one association, STOW-RS request or ingest may hold of the
    /// memory budget, MiB.
    pub transfer_budget_mib: u64,
    /// Disk budget, MiB, for datasets and STOW-RS parts larger than one
    /// transfer's memory share, spilled to encrypted anonymous files in
    /// `DIR/spool/ingest` (all spills at once; one holds at most
    /// `max_dataset_bytes`).
    pub spool_budget_mib: u64,
}

impl Default for DicomSection {
    fn default() -> Self {
        DicomSection {
            ae_title: "BASTION".into(),
            tls_addr: SocketAddr::from(([127, 0, 0, 1], 2762)),
            plain_addr: None,
            max_pdu_length: 131_072,
            max_associations: 64,
            max_pending_per_address: 64,
            max_pending: 512,
            idle_timeout_secs: 60,
            handshake_timeout_secs: 10,
        }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_dataset_bytes: 1 << 30,
            max_element_bytes: 1 << 30,
            max_inflated_bytes: 1 << 30,
            max_sequence_depth: 16,
            max_concurrent_parses: 4,
            memory_budget_mib: 384,
            transfer_budget_mib: 256,
            spool_budget_mib: 4096,
        }
    }
}

impl Config {
    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("invalid configuration in {}", path.display()))
    }

    /// The commented file written by `bastion init`.
    pub fn render(&self) -> String {
        let d = &self.dicom;
        let l = &self.limits;
        let cors = self
            .http
            .cors_origins
            .iter()
            .map(|o| format!("{o:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let cors = format!("[{cors}]");
        let ohif = match &self.http.ohif_dir {
            Some(p) => format!("ohif_dir = {:?}", p.display().to_string()),
            None => "# ohif_dir = \"/opt/ohif/package\"".into(),
        };
        let plain = match d.plain_addr {
            Some(a) => format!("plain_addr = \"{a}\""),
            None => "# plain_addr = \"127.0.0.1:11112\"".into(),
        };
        format!(
            r#"# Bastion PACS configuration. Command-line flags override these values.
# Secrets are not in this file: the keys live where [secrets] says (mode 0600).

[dicom]
# Our Application Entity title (PS3.8 Called AE Title). Associations that
# call another AE title are rejected (A-ASSOCIATE-RJ 1/1/7).
ae_title = "{ae}"
# DICOM over TLS listener (IANA port 2762). Binds to loopback until you
# change it: set the address modalities reach, e.g. "10.1.2.3:2762", then run
# `bastion cert server` so the server certificate names that address.
tls_addr = "{tls}"
# Unencrypted DICOM listener for legacy devices registered with
# `--transport plain`. Off unless set. Prefer TLS.
{plain}
# Maximum PDU length announced and accepted, bytes (PS3.8 D.1).
max_pdu_length = {pdu}
# Associations served at once (counted after the device is authenticated);
# more are rejected (A-ASSOCIATE-RJ 1/1/1).
max_associations = {assoc}
# Connections from one address still in the TLS handshake or before their
# A-ASSOCIATE-RQ; a newer one closes the oldest, so a socket flood cannot lock
# out a device, not even one at the flooding address.
max_pending_per_address = {pending}
# The same over all addresses; a newer one closes the oldest of the address
# holding the most.
max_pending = {pending_all}
# An association silent for this many seconds is aborted.
idle_timeout_secs = {idle}
# Seconds allowed for the TLS handshake and the A-ASSOCIATE-RQ.
handshake_timeout_secs = {hs}

[limits]
# Largest dataset accepted in one C-STORE or file, bytes (larger: 0xA700).
max_dataset_bytes = {mds}
# Largest declared length of a single element, bytes.
max_element_bytes = {meb}
# Largest inflated size of a Deflated Explicit VR Little Endian dataset.
max_inflated_bytes = {mib}
# Deepest sequence nesting accepted.
max_sequence_depth = {msd}
# Datasets parsed at once (bounds memory under load).
max_concurrent_parses = {mcp}
# Memory budget, MiB, for everything peers make the server hold: datasets
# being received (DICOM), STOW-RS bodies and inflated deflated datasets. When
# it is in use, a C-STORE gets 0xA700 and a STOW-RS request 503 + Retry-After.
memory_budget_mib = {mbm}
# The most one association or STOW-RS request may hold of it, MiB. A larger
# dataset or STOW-RS part is spilled to disk, encrypted (below).
transfer_budget_mib = {tbm}
# Disk budget, MiB, for those spilled datasets (all at once): anonymous files
# in DIR/spool/ingest, AES-256-GCM under a key that exists only in memory.
# When it is in use, a C-STORE gets 0xA700 and a STOW-RS part 0xA700.
spool_budget_mib = {sbm}

[query]
# A C-FIND matching more than this many entities is refused with 0xA700
# (Refused: Out of Resources) and an Error Comment asking to refine it, and
# returns no match: listing a whole archive is how PACS are harvested.
max_matches = {mm}

[http]
# HTTPS listener for DICOMweb (/dicomweb) and the account API (/api), with
# the DICOM-TLS server certificate; "off" disables it. There is no plain
# HTTP listener. Loopback until you change it (then `bastion cert server`).
addr = "{http_addr}"
# Browser origins allowed to call the API (CORS), e.g. an OHIF viewer at
# ["https://viewer.example.org"]. Empty: CORS off. Never "*".
cors_origins = {cors}
# An unpacked OHIF Viewer (npm @ohif/app: `npm pack @ohif/app@3.13.2`, then
# tar -xzf; the package directory or its dist/) to serve at /viewer/, on this
# origin with the user's session: no CORS, no token in JavaScript.
{ohif}
# Largest STOW-RS request body, bytes (held in memory while it is stored).
max_upload_bytes = {mub}
# Largest JSON request body (login, password change), bytes.
max_json_bytes = {mjb}
# Seconds allowed for the TLS handshake, for a request's headers, and for a
# whole request body (slow clients are cut off: 408).
handshake_timeout_secs = {hts}
header_timeout_secs = {hdt}
body_timeout_secs = {bdt}
# Seconds a STOW-RS upload may send nothing before it is cut off (408): a
# stalled upload does not hold its memory or spool budget for long.
body_idle_timeout_secs = {bit}
# HTTPS connections held at once, and from one address (IPv6: per /64). A
# connection is "unproven" until its TLS handshake and a first request's
# headers are done; a newcomer closes the oldest unproven one of its own
# address (beyond max_unproven_per_address or max_connections_per_address),
# else of the address holding the most when max_connections is reached; it is
# refused only when every connection in its way is proven.
max_connections = {mc}
max_connections_per_address = {mcpa}
max_unproven_per_address = {mupa}

[accounts]
# Consecutive failed logins that lock an account (recorded; lifted by
# `bastion user unlock NAME` or a password change).
lock_after_failures = {laf}
# Delay after an account's first failed login, milliseconds; it doubles with
# each consecutive failure, up to max_delay_secs. Attempts during a delay are
# answered 429 with Retry-After and not checked.
base_delay_ms = {bdm}
max_delay_secs = {mds2}
# Per source address: delays only, never a lock, at most this many seconds
# (one noisy address behind a shared NAT cannot lock everyone out).
per_address_max_delay_secs = {pam}
# Sessions end after this many seconds unused, and this long after login.
session_idle_secs = {sis}
session_absolute_secs = {sas}
# `admin` accounts must use a second factor (`bastion user totp-enable NAME`).
# Setting this to false is logged as a warning at every start.
admin_requires_totp = {art}

[detect]
# Detection rules over the event stream; each raises an alert (`bastion
# alerts`, GET /api/alerts) and a security.alert event. Failed logins per
# account or per source address within the window: login_brute_force.
login_failures = {dlf}
login_window_secs = {dlw}
# Rejected associations from one address within the window: association_scan.
scan_rejections = {dsr}
scan_window_secs = {dsw}
# A QIDO-RS study search with no restrictive key is broad unless it asks for
# limit <= this (a paged worklist: OHIF asks 101, the web UI 50). A universal
# C-FIND is always broad.
qido_max_limit = {dql}
# One user or device copying (C-MOVE, C-GET, WADO-RS instances) more than
# this many studies, or studies of more than this many patients, within the
# window: bulk_retrieval.
bulk_studies = {dbs}
bulk_patients = {dbp}
# The same for studies viewed (WADO-RS metadata, frames, rendered images,
# thumbnails: what OHIF and the web UI ask), higher: a clinician reading
# through a worklist is not a harvester.
view_studies = {dvs}
view_patients = {dvp}
bulk_window_secs = {dbw}
# Access outside working hours raises off_hours_access; off while empty.
# working_hours = "07:00-19:00"
# working_days = ["mon-fri"]
# timezone = "+01:00"
working_hours = {dwh:?}
timezone = {dtz:?}
# A rule that fired for an account, address or device stays quiet for it
# this many seconds (one attack, one alert).
repeat_secs = {drs}
# Accounts, addresses and devices tracked per rule (memory bound; the least
# recently seen is forgotten first).
max_tracked_keys = {dmk}
# Findings of one burst (same rule and source, each within repeat_secs of the
# previous) update one open alert with a count. A new alert is POSTed to the
# webhook at most once per this many seconds per source (address, account,
# device), unless it is more severe than the last one sent for that source.
notify_secs = {dns}
# User, token, device and certificate changes made with CLI commands on this
# host are routine set-up: recorded in the event log and audit trail, no
# alert. true: they open security_change alerts as web admin changes do.
alert_host_changes = {dahc}
# POST each new alert as JSON to this https:// URL (retried with back-off;
# the server certificate is verified against webhook_ca_file, else the
# system roots). Empty: off.
webhook_url = {dwu:?}
webhook_ca_file = {dwc:?}
webhook_queue = {dwq}

[audit]
# Forward every audit message (PS3.15 A.5 XML) to a syslog collector: IHE
# ATNA Record Audit Event, RFC 5424 over TLS (RFC 5425), Bastion's server
# certificate as client certificate, the collector's certificate verified
# against `ca` (default Bastion's CA). Messages wait in an encrypted spool
# (spool/syslog) while the collector is unreachable. Off unless set:
# [audit.syslog]
# url = "tls://collector.example.org:6514"
# ca = "/etc/bastion/collector-ca.pem"

[secrets]
# Where the master key, the audit signing key and the CA key are: an
# absolute directory outside this data directory (set by `bastion init
# --secrets-dir DIR`), or "$CREDENTIALS_DIRECTORY" for systemd credentials
# (read-only). Commented out: inside the data directory (secrets/ and
# tls/ca.key), which `serve` and the posture page warn about: a copy of the
# directory then decrypts everything.
{secrets_dir}

[store]
# Where the encrypted instance blobs are. Commented out: the local directory
# blobs/ (the embedded default). An S3-compatible bucket (Garage, AWS S3, ...;
# `bastion init --store-url`): only ciphertext under random names reaches it.
# Credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, else the file
# store-credentials in the secrets directory (two lines: access key id,
# secret; mode 0600). See docs/scale-out.md.
{store_url}

[index]
# The metadata index. Commented out: the encrypted SQLite file index.db in
# this data directory. A PostgreSQL URL (no password in it: PGPASSWORD or the
# 0600 file index-password in the secrets directory) puts it in PostgreSQL,
# identifying values encrypted (docs/scale-out.md, set by `bastion init
# --index-url`). `ca`: the CA file for TLS (verify-full); without it only
# loopback or a unix socket, in plaintext.
{index_url}
{index_ca}
{index_schema}
"#,
            store_url = match &self.store.url {
                Some(u) => format!("url = {}", toml::Value::String(u.clone())),
                None => {
                    "# url = \"s3://BUCKET?endpoint=http://127.0.0.1:3900&region=garage\"".into()
                }
            },
            index_url = match &self.index.url {
                Some(u) => format!("url = {}", toml::Value::String(u.clone())),
                None => "# url = \"postgres://bastion@db.example:5432/bastion\"".into(),
            },
            index_schema = match &self.index.schema {
                Some(s) => format!("schema = {}", toml::Value::String(s.clone())),
                None => "# schema = \"bastion_index\"".into(),
            },
            index_ca = match &self.index.ca {
                Some(c) => format!("ca = {}", toml::Value::String(c.display().to_string())),
                None => "# ca = \"/etc/bastion/db-ca.pem\"".into(),
            },
            secrets_dir = match &self.secrets.dir {
                Some(d) => format!("dir = {}", toml::Value::String(d.clone())),
                None => "# dir = \"/etc/bastion/secrets\"".into(),
            },
            ae = d.ae_title,
            tls = d.tls_addr,
            pdu = d.max_pdu_length,
            assoc = d.max_associations,
            pending = d.max_pending_per_address,
            pending_all = d.max_pending,
            idle = d.idle_timeout_secs,
            hs = d.handshake_timeout_secs,
            mds = l.max_dataset_bytes,
            meb = l.max_element_bytes,
            mib = l.max_inflated_bytes,
            msd = l.max_sequence_depth,
            mcp = l.max_concurrent_parses,
            mbm = l.memory_budget_mib,
            tbm = l.transfer_budget_mib,
            sbm = l.spool_budget_mib,
            mm = self.query.max_matches,
            http_addr = self.http.addr,
            cors = cors,
            ohif = ohif,
            mub = self.http.max_upload_bytes,
            mjb = self.http.max_json_bytes,
            hts = self.http.handshake_timeout_secs,
            hdt = self.http.header_timeout_secs,
            bdt = self.http.body_timeout_secs,
            bit = self.http.body_idle_timeout_secs,
            mc = self.http.max_connections,
            mcpa = self.http.max_connections_per_address,
            mupa = self.http.max_unproven_per_address,
            laf = self.accounts.lock_after_failures,
            bdm = self.accounts.base_delay_ms,
            mds2 = self.accounts.max_delay_secs,
            pam = self.accounts.per_address_max_delay_secs,
            sis = self.accounts.session_idle_secs,
            sas = self.accounts.session_absolute_secs,
            art = self.accounts.admin_requires_totp,
            dlf = self.detect.login_failures,
            dlw = self.detect.login_window_secs,
            dsr = self.detect.scan_rejections,
            dsw = self.detect.scan_window_secs,
            dql = self.detect.qido_max_limit,
            dbs = self.detect.bulk_studies,
            dbp = self.detect.bulk_patients,
            dvs = self.detect.view_studies,
            dvp = self.detect.view_patients,
            dbw = self.detect.bulk_window_secs,
            dwh = self.detect.working_hours,
            dtz = self.detect.timezone,
            drs = self.detect.repeat_secs,
            dmk = self.detect.max_tracked_keys,
            dns = self.detect.notify_secs,
            dahc = self.detect.alert_host_changes,
            dwu = self.detect.webhook_url,
            dwc = self.detect.webhook_ca_file,
            dwq = self.detect.webhook_queue,
        )
    }
}

/// `text` (a `bastion.toml`) with `[secrets] dir = "DIR"`, comments and
/// everything else kept: the commented `# dir = …` line `init` writes is
/// replaced, else the line goes right under `[secrets]`, else a `[secrets]`
/// table is appended (files written before the section existed). The result
/// is parsed back and must name `dir`.
///
/// # Errors
/// `[secrets] dir` is already set, or the result does not parse.
pub fn with_secrets_dir(text: &str, dir: &str) -> Result<String> {
    let current: Config = toml::from_str(text).context("invalid bastion.toml")?;
    if current.secrets.dir.is_some() {
        anyhow::bail!("bastion.toml already sets [secrets] dir");
    }
    let line = format!("dir = {}", toml::Value::String(dir.to_owned()));
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let header = lines.iter().position(|l| l.trim() == "[secrets]");
    match header {
        Some(h) => {
            let end = lines[h + 1..]
                .iter()
                .position(|l| l.trim_start().starts_with('['))
                .map_or(lines.len(), |i| h + 1 + i);
            match (h + 1..end).find(|&i| lines[i].trim_start().starts_with("# dir =")) {
                Some(i) => lines[i] = line,
                None => lines.insert(h + 1, line),
            }
        }
        None => {
            lines.push(String::new());
            lines.push("[secrets]".into());
            lines.push("# Where the keys are (`bastion secrets move`).".into());
            lines.push(line);
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    let parsed: Config = toml::from_str(&out).context("bastion.toml with [secrets] dir")?;
    if parsed.secrets.dir.as_deref() != Some(dir) {
        anyhow::bail!("cannot record [secrets] dir in bastion.toml");
    }
    Ok(out)
}

impl AccountsSection {
    /// The security layer's policy; refuses values that would disable the
    /// protection (no lock, sessions that never end).
    pub fn policy(&self) -> Result<bastion_security::accounts::AccountPolicy> {
        use std::time::Duration;
        if self.lock_after_failures == 0 {
            anyhow::bail!("[accounts] lock_after_failures must be at least 1");
        }
        if self.session_idle_secs == 0 || self.session_absolute_secs == 0 {
            anyhow::bail!("[accounts] session timeouts must be at least 1 second");
        }
        Ok(bastion_security::accounts::AccountPolicy {
            lock_after_failures: self.lock_after_failures,
            base_delay: Duration::from_millis(self.base_delay_ms.max(1)),
            max_delay: Duration::from_secs(self.max_delay_secs.max(1)),
            per_address_max_delay: Duration::from_secs(self.per_address_max_delay_secs),
            session_idle: Duration::from_secs(self.session_idle_secs),
            session_absolute: Duration::from_secs(self.session_absolute_secs),
            admin_requires_totp: self.admin_requires_totp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_a_message() {
        for (url, shown) in [
            ("postgres://u:S3CRET@h:5432/d", "postgres://u:***@h:5432/d"),
            (
                "postgres://u@h/d?password=S3CRET&sslmode=verify-full",
                "postgres://u@h/d?password=***&sslmode=verify-full",
            ),
            ("postgres://u@h:5432/d", "postgres://u@h:5432/d"),
        ] {
            assert_eq!(redact_url(url), shown);
            assert!(!redact_url(url).contains("S3CRET"));
        }
    }

    /// `bastion init --index-url` writes `[index] url` (and schema); the
    /// rendered file reads back the same values; without it, no URL.
    #[test]
    fn index_section_round_trips() {
        let mut c = Config::default();
        let parsed: Config = match toml::from_str(&c.render()) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(parsed.index.url, None);
        c.index.url = Some("postgres://bastion@db.example:5432/bastion".into());
        c.index.schema = Some("site_a".into());
        c.index.ca = Some(PathBuf::from("/etc/bastion/db-ca.pem"));
        let parsed: Config = match toml::from_str(&c.render()) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            parsed.index.url.as_deref(),
            Some("postgres://bastion@db.example:5432/bastion")
        );
        assert_eq!(parsed.index.schema.as_deref(), Some("site_a"));
        assert_eq!(
            parsed.index.ca,
            Some(PathBuf::from("/etc/bastion/db-ca.pem"))
        );
    }

    #[test]
    fn store_url_is_rendered_and_read_back() {
        let c = Config::default();
        let parsed: Config = toml::from_str(&c.render()).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            parsed.store.url.is_none(),
            "the embedded default: DIR/blobs"
        );
        let mut s3 = Config::default();
        let url = "s3://bastion?endpoint=http://127.0.0.1:3900&region=garage";
        s3.store.url = Some(url.into());
        let back: Config = toml::from_str(&s3.render()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.store.url.as_deref(), Some(url));
        assert!(toml::from_str::<Config>("[store]\nbucket = \"x\"\n").is_err());
    }

    #[test]
    fn rendered_file_parses_back_to_the_defaults() {
        let c = Config::default();
        let parsed: Result<Config, _> = toml::from_str(&c.render());
        let Ok(parsed) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(parsed.dicom.tls_addr, c.dicom.tls_addr);
        assert_eq!(parsed.limits.max_dataset_bytes, c.limits.max_dataset_bytes);
        assert_eq!(parsed.query.max_matches, 1000);
        assert_eq!(parsed.detect.login_failures, 5);
        assert!(parsed
            .detect
            .rules()
            .is_ok_and(|r| r.working_hours.is_none()));
        let mut d = parsed.detect.clone();
        d.working_hours = "07:00-19:00".into();
        d.timezone = "+01:00".into();
        assert!(d.rules().is_ok_and(|r| r.working_hours.is_some()));
        d.webhook_url = "http://example.org/hook".into();
        assert!(d.rules().is_err());
        assert!(toml::from_str::<Config>("[dicom]\nbogus = 1\n").is_err());
        assert!(parsed.audit.syslog.is_none());
        assert!(parsed.secrets.dir.is_none());
        let mut keyed = Config::default();
        keyed.secrets.dir = Some("/etc/bastion/secrets \"x\"".into());
        let back: Config = toml::from_str(&keyed.render()).unwrap_or_else(|e| panic!("{e}"));
        // `secrets move`: the rendered file, and one without a [secrets] table.
        let moved =
            with_secrets_dir(&c.render(), "/etc/bastion/secrets").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            moved.contains("\ndir = \"/etc/bastion/secrets\"\n"),
            "{moved}"
        );
        assert!(!moved.contains("# dir ="), "{moved}");
        assert!(moved.contains("[audit]"), "{moved}");
        assert!(with_secrets_dir(&moved, "/x").is_err());
        let old = "[dicom]\nae_title = \"OLD\"\n";
        let moved = with_secrets_dir(old, "/k").unwrap_or_else(|e| panic!("{e}"));
        let parsed: Config = toml::from_str(&moved).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.dicom.ae_title, "OLD");
        assert_eq!(parsed.secrets.dir.as_deref(), Some("/k"));
        assert_eq!(
            back.secrets.dir.as_deref(),
            Some("/etc/bastion/secrets \"x\"")
        );
        let with: Config = toml::from_str("[audit.syslog]\nurl = \"tls://10.0.0.5:6514\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let sys = with.audit.syslog.unwrap_or_else(|| panic!("no syslog"));
        assert_eq!(sys.target().ok(), Some(("10.0.0.5".to_owned(), 6514)));
        let udp = SyslogSection {
            url: "udp://10.0.0.5:514".into(),
            ca: None,
            hostname: None,
        };
        assert!(udp.target().is_err());
        assert_eq!(
            parsed.http.listen_addr().ok().flatten(),
            Some(SocketAddr::from(([127, 0, 0, 1], 8443)))
        );
        let mut off = parsed.http.clone();
        off.addr = "off".into();
        assert_eq!(off.listen_addr().ok(), Some(None));
        off.cors_origins = vec!["*".into()];
        assert!(off.listen_addr().is_err());
    }
}
