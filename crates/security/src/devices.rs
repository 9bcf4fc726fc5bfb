//! The device allowlist: every remote application entity Bastion talks to.
//!
//! A device is an AE title plus the network it may connect from, the
//! transport it must use, the DIMSE services it may request and, for
//! retrieve destinations, where to reach it (DESIGN §2 "devices").

use crate::DbExt;
use std::net::IpAddr;

use bastion_model::{AeTitle, PermissionSet, Transport};
use ipnet::IpNet;
use rusqlite::{params, OptionalExtension, Row};

use crate::{db::SecurityDb, Result, SecurityError};

/// What to do when a device sends a different dataset under a SOP Instance
/// UID that is already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    /// Refuse with status 0x0111 and record a security event (default).
    Refuse,
    /// Keep the old version for recovery and store the new one.
    Replace,
}

impl std::str::FromStr for OnConflict {
    type Err = SecurityError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "refuse" => Ok(OnConflict::Refuse),
            "replace" => Ok(OnConflict::Replace),
            _ => Err(SecurityError::Invalid {
                what: "on-conflict",
                detail: format!("{s:?}: expected refuse or replace"),
            }),
        }
    }
}

impl OnConflict {
    fn name(self) -> &'static str {
        match self {
            OnConflict::Refuse => "refuse",
            OnConflict::Replace => "replace",
        }
    }
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its AE title (spaces trimmed).
    pub ae: AeTitle,
    /// The network its associations must come from.
    pub network: IpNet,
    /// The transport it must use.
    pub transport: Transport,
    /// The DIMSE services it may request.
    pub allow: PermissionSet,
    /// Pinned SHA-256 of its DER client certificate (64 lowercase hex).
    pub cert_sha256: Option<String>,
    /// Host for outbound associations (C-MOVE destination).
    pub host: Option<String>,
    /// Port for outbound associations.
    pub port: Option<u16>,
    /// Conflict policy for its C-STOREs.
    pub on_conflict: OnConflict,
    /// Other devices this device may name as C-MOVE destination (issue 3).
    /// A device may always move to itself when it has a host and port.
    pub move_destinations: Vec<AeTitle>,
}

impl Device {
    /// Whether `addr` is inside this device's network. IPv4-mapped IPv6
    /// addresses are compared as IPv4.
    pub fn network_contains(&self, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
            v4 => v4,
        };
        self.network.contains(&addr)
    }

    /// Whether this device may name `dest` as Move Destination: itself, or
    /// a device listed in [`Device::move_destinations`] (AE titles compare
    /// with spaces trimmed, as [`AeTitle`] stores them).
    pub fn may_move_to(&self, dest: &AeTitle) -> bool {
        &self.ae == dest || self.move_destinations.iter().any(|d| d == dest)
    }

    /// JSON form used by `bastion device list --json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ae": self.ae.as_str(),
            "network": self.network.to_string(),
            "transport": self.transport.name(),
            "allow": self.allow.iter().map(|p| p.name()).collect::<Vec<_>>(),
            "cert_sha256": self.cert_sha256,
            "host": self.host,
            "port": self.port,
            "on_conflict": self.on_conflict,
            "move_destinations": self.move_destinations.iter().map(AeTitle::as_str).collect::<Vec<_>>(),
        })
    }
}

/// A device's settings as an operator gives them: the flags of `bastion
/// device add|update` or the JSON body of `POST /api/devices` and `PUT
/// /api/devices/{ae}`. Each `None` means "not given": [`DeviceSettings::apply`]
/// keeps the current value. Both front ends parse and check through
/// [`DeviceSettings::create`] / [`DeviceSettings::apply`] and [`validate`],
/// so a device is refused or accepted alike whichever way it was entered.
///
/// Errors are [`SecurityError::Invalid`] whose `what` names the setting
/// (`network`, `transport`, `allow`, `cert_sha256`, `host`, `port`,
/// `on_conflict`, `move_destinations`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSettings {
    /// The network as CIDR (`10.1.2.0/24`, `127.0.0.1/32`); required for a
    /// new device.
    pub network: Option<String>,
    /// `tls`, `mtls` or `plain`; required for a new device.
    pub transport: Option<String>,
    /// Permission names (`echo`, `store`, `find`, `move`, `get`), at least
    /// one; required for a new device.
    pub allow: Option<Vec<String>>,
    /// Pinned SHA-256 of the device's DER certificate (hex; colons, spaces
    /// and case ignored); an empty string removes the pin.
    pub cert_sha256: Option<String>,
    /// Host for outbound associations; `Some(None)` (or an empty string)
    /// removes it. Goes with `port`.
    pub host: Option<Option<String>>,
    /// Port for outbound associations; `Some(None)` removes it.
    pub port: Option<Option<u16>>,
    /// `refuse` (default for a new device) or `replace`.
    pub on_conflict: Option<String>,
    /// AE titles this device may name as C-MOVE destination; empty clears.
    pub move_destinations: Option<Vec<String>>,
}

impl DeviceSettings {
    /// A new device `ae` with these settings (`network`, `transport` and
    /// `allow` required), checked by [`validate`]. Returns the device and
    /// the warnings [`validate`] gave.
    ///
    /// # Errors
    /// [`SecurityError::Invalid`] naming the missing or invalid setting
    /// (`ae` for the AE title).
    pub fn create(&self, ae: &str) -> Result<(Device, Vec<String>)> {
        let ae = AeTitle::parse(ae).map_err(|e| invalid("ae", e))?;
        let required = |what: &'static str| SecurityError::Invalid {
            what,
            detail: "required for a new device".into(),
        };
        let mut d = Device {
            ae,
            network: parse_network(self.network.as_deref().ok_or_else(|| required("network"))?)?,
            transport: parse_transport(
                self.transport
                    .as_deref()
                    .ok_or_else(|| required("transport"))?,
            )?,
            allow: parse_allow(self.allow.as_deref().ok_or_else(|| required("allow"))?)?,
            cert_sha256: None,
            host: None,
            port: None,
            on_conflict: OnConflict::Refuse,
            move_destinations: Vec::new(),
        };
        let rest = DeviceSettings {
            network: None,
            transport: None,
            allow: None,
            ..self.clone()
        };
        let warnings = rest.apply(&mut d)?;
        Ok((d, warnings))
    }

    /// Applies the given settings to `d` and checks the result with
    /// [`validate`]; `d` is left unchanged on error. Returns the warnings
    /// [`validate`] gave.
    ///
    /// # Errors
    /// [`SecurityError::Invalid`] naming the invalid setting.
    pub fn apply(&self, d: &mut Device) -> Result<Vec<String>> {
        let mut n = d.clone();
        if let Some(v) = &self.network {
            n.network = parse_network(v)?;
        }
        if let Some(v) = &self.transport {
            n.transport = parse_transport(v)?;
        }
        if let Some(v) = &self.allow {
            n.allow = parse_allow(v)?;
        }
        if let Some(v) = &self.cert_sha256 {
            n.cert_sha256 = if v.trim().is_empty() {
                None
            } else {
                Some(normalize_fingerprint(v).map_err(|e| reword(e, "cert_sha256"))?)
            };
        }
        if let Some(v) = &self.host {
            n.host = v
                .as_deref()
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(str::to_owned);
        }
        if let Some(v) = self.port {
            n.port = v;
        }
        if let Some(v) = &self.on_conflict {
            n.on_conflict = v.trim().parse().map_err(|e| reword(e, "on_conflict"))?;
        }
        if let Some(v) = &self.move_destinations {
            n.move_destinations =
                parse_ae_list(&v.join(",")).map_err(|e| reword(e, "move_destinations"))?;
        }
        let warnings = validate(&n)?;
        *d = n;
        Ok(warnings)
    }
}

fn invalid(what: &'static str, e: impl std::fmt::Display) -> SecurityError {
    SecurityError::Invalid {
        what,
        detail: e.to_string(),
    }
}

/// The same error under the setting's name.
fn reword(e: SecurityError, what: &'static str) -> SecurityError {
    match e {
        SecurityError::Invalid { detail, .. } => SecurityError::Invalid { what, detail },
        other => invalid(what, other),
    }
}

fn parse_network(s: &str) -> Result<IpNet> {
    s.trim().parse().map_err(|_| SecurityError::Invalid {
        what: "network",
        detail: format!(
            "{:?} is not a network in CIDR form such as 10.1.2.0/24 or 127.0.0.1/32",
            s.chars().take(64).collect::<String>()
        ),
    })
}

fn parse_transport(s: &str) -> Result<Transport> {
    s.parse().map_err(|e| invalid("transport", e))
}

fn parse_allow(items: &[String]) -> Result<PermissionSet> {
    if items.iter().any(|i| i.trim().is_empty()) {
        return Err(invalid("allow", "empty permission name"));
    }
    PermissionSet::parse_list(&items.join(",")).map_err(|e| invalid("allow", e))
}

/// Checks a device's settings together: host and port go together, port
/// not 0, host an IP address or a valid host name, network without host
/// bits and not an IPv4-mapped IPv6 range, no pinned certificate on a
/// plain device. Returns warnings for settings that are allowed but risky
/// (a network that admits any address).
///
/// # Errors
/// [`SecurityError::Invalid`] naming the setting (`host`, `port`,
/// `network`, `cert_sha256`).
pub fn validate(d: &Device) -> Result<Vec<String>> {
    let bad = |what, detail: String| Err(SecurityError::Invalid { what, detail });
    if d.host.is_some() != d.port.is_some() {
        return bad(
            if d.host.is_some() { "port" } else { "host" },
            "host and port go together: give both or neither".into(),
        );
    }
    if d.port == Some(0) {
        return bad("port", "0 is not a port a device can listen on".into());
    }
    if let Some(h) = &d.host {
        let hostname_ok = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if h.parse::<IpAddr>().is_err() && !hostname_ok {
            return bad(
                "host",
                format!(
                    "{:?} is neither an IP address nor a valid host name",
                    h.chars().take(64).collect::<String>()
                ),
            );
        }
    }
    if d.network != d.network.trunc() {
        return bad(
            "network",
            format!(
                "{} has host bits set; did you mean {}?",
                d.network,
                d.network.trunc()
            ),
        );
    }
    if let IpNet::V6(v6) = d.network {
        if v6.addr().to_ipv4_mapped().is_some() {
            return bad(
                "network",
                format!("{v6} is an IPv4-mapped range; give the IPv4 network instead (e.g. 127.0.0.1/32)"),
            );
        }
    }
    if d.transport == Transport::Plain && d.cert_sha256.is_some() {
        return bad(
            "cert_sha256",
            "a pinned certificate has no effect on a plain device; use transport mtls".into(),
        );
    }
    let mut warnings = Vec::new();
    if d.network.prefix_len() == 0 {
        warnings.push(format!(
            "network {} lets the device connect from any address",
            d.network
        ));
    }
    Ok(warnings)
}

/// Normalises a certificate fingerprint: colons and spaces removed, lower
/// case, exactly 64 hex digits.
///
/// # Errors
/// [`SecurityError::Invalid`] when the result is not 64 hex digits.
pub fn normalize_fingerprint(raw: &str) -> Result<String> {
    let fp: String = raw
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SecurityError::Invalid {
            what: "cert-sha256",
            detail: "expected the SHA-256 of the DER certificate as 64 hex digits".into(),
        });
    }
    Ok(fp)
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn row_to_device(r: &Row<'_>) -> rusqlite::Result<RawDevice> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

type RawDevice = (
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    String,
    String,
);

fn parse_raw(raw: RawDevice) -> Result<Device> {
    let (ae, network, transport, allow, cert_sha256, host, port, on_conflict, moves) = raw;
    let bad = |what, e: String| SecurityError::Invalid { what, detail: e };
    Ok(Device {
        ae: AeTitle::parse(&ae).map_err(|e| bad("stored ae", e.to_string()))?,
        network: network
            .parse()
            .map_err(|e: ipnet::AddrParseError| bad("stored network", e.to_string()))?,
        transport: transport
            .parse()
            .map_err(|e: bastion_model::ModelError| bad("stored transport", e.to_string()))?,
        allow: PermissionSet::parse_list(&allow).map_err(|e| bad("stored allow", e.to_string()))?,
        cert_sha256,
        host,
        port: port.and_then(|p| u16::try_from(p).ok()),
        on_conflict: on_conflict.parse()?,
        move_destinations: parse_ae_list(&moves)
            .map_err(|e| bad("stored move_destinations", e.to_string()))?,
    })
}

/// Parses a comma-separated list of AE titles (empty string: none). Spaces
/// around each title are not significant; duplicates are removed.
///
/// # Errors
/// [`SecurityError::Invalid`] naming the first invalid AE title.
pub fn parse_ae_list(raw: &str) -> Result<Vec<AeTitle>> {
    let mut out: Vec<AeTitle> = Vec::new();
    for part in raw.split(',') {
        if part.trim().is_empty() {
            continue;
        }
        let ae = AeTitle::parse(part).map_err(|e| SecurityError::Invalid {
            what: "move-destinations",
            detail: e.to_string(),
        })?;
        if !out.contains(&ae) {
            out.push(ae);
        }
    }
    Ok(out)
}

fn ae_list(list: &[AeTitle]) -> String {
    list.iter()
        .map(AeTitle::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

const COLUMNS: &str =
    "ae, network, transport, allow, cert_sha256, host, port, on_conflict, move_destinations";

/// The values of [`COLUMNS`] in order, then the timestamp: ?1..?10 of the
/// insert and update statements.
fn bind(d: &Device, ts: String) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value;
    let text = |s: &str| Value::Text(s.to_owned());
    let opt = |s: &Option<String>| s.clone().map_or(Value::Null, Value::Text);
    vec![
        text(d.ae.as_str()),
        Value::Text(d.network.to_string()),
        text(d.transport.name()),
        Value::Text(d.allow.to_string()),
        opt(&d.cert_sha256),
        opt(&d.host),
        d.port.map_or(Value::Null, |p| Value::Integer(i64::from(p))),
        text(d.on_conflict.name()),
        Value::Text(ae_list(&d.move_destinations)),
        Value::Text(ts),
    ]
}

/// The device registry over the [`SecurityDb`].
pub struct DeviceRegistry<'a> {
    db: &'a SecurityDb,
}

impl<'a> DeviceRegistry<'a> {
    /// Wraps the database.
    pub fn new(db: &'a SecurityDb) -> Self {
        DeviceRegistry { db }
    }

    /// Registers a new device.
    ///
    /// # Errors
    /// [`SecurityError::DeviceExists`] when the AE title is taken.
    pub fn add(&self, d: &Device) -> Result<()> {
        self.db.with(|c| {
            let ts = now();
            let n = c
                .execute(
                    &format!("INSERT OR IGNORE INTO devices ({COLUMNS}, created_at, updated_at) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?10)"),
                    rusqlite::params_from_iter(bind(d, ts)),
                )
                .map_err(|source| SecurityError::Db { op: "insert device", source })?;
            if n == 0 {
                return Err(SecurityError::DeviceExists(d.ae.to_string()));
            }
            Ok(())
        })
    }

    /// Replaces an existing device's settings.
    ///
    /// # Errors
    /// [`SecurityError::NoSuchDevice`] when it is not registered.
    pub fn update(&self, d: &Device) -> Result<()> {
        self.db.with(|c| {
            let n = c
                .execute(
                    "UPDATE devices SET network=?2, transport=?3, allow=?4, cert_sha256=?5, host=?6, port=?7, on_conflict=?8, move_destinations=?9, updated_at=?10 WHERE ae=?1",
                    rusqlite::params_from_iter(bind(d, now())),
                )
                .map_err(|source| SecurityError::Db { op: "update device", source })?;
            if n == 0 {
                return Err(SecurityError::NoSuchDevice(d.ae.to_string()));
            }
            Ok(())
        })
    }

    /// Removes a device, with its last refusal (a device registered again
    /// under the title starts without one; its inventory history stays).
    ///
    /// # Errors
    /// [`SecurityError::NoSuchDevice`] when it is not registered.
    pub fn remove(&self, ae: &AeTitle) -> Result<()> {
        self.db.with(|c| {
            let err = |op| move |source| SecurityError::Db { op, source };
            let tx =
                rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)
                    .map_err(err("begin"))?;
            let n = tx
                .execute("DELETE FROM devices WHERE ae=?1", params![ae.as_str()])
                .map_err(err("delete device"))?;
            if n == 0 {
                return Err(SecurityError::NoSuchDevice(ae.to_string()));
            }
            tx.execute(
                "DELETE FROM device_rejections WHERE ae=?1",
                params![ae.as_str()],
            )
            .map_err(err("delete device rejection"))?;
            tx.commit().map_err(err("commit"))
        })
    }

    /// Looks a device up by AE title (already trimmed by [`AeTitle`]).
    ///
    /// # Errors
    /// [`SecurityError::Db`] on database failure.
    pub fn get(&self, ae: &AeTitle) -> Result<Option<Device>> {
        let raw = self.db.with(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM devices WHERE ae=?1"),
                params![ae.as_str()],
                row_to_device,
            )
            .optional()
            .map_err(|source| SecurityError::Db {
                op: "read device",
                source,
            })
        })?;
        raw.map(parse_raw).transpose()
    }

    /// All devices ordered by AE title.
    ///
    /// # Errors
    /// [`SecurityError::Db`] on database failure.
    pub fn list(&self) -> Result<Vec<Device>> {
        let raws = self.db.with(|c| {
            let mut st = c
                .prepare(&format!("SELECT {COLUMNS} FROM devices ORDER BY ae"))
                .map_err(|source| SecurityError::Db {
                    op: "list devices",
                    source,
                })?;
            let rows = st
                .query_map([], row_to_device)
                .map_err(|source| SecurityError::Db {
                    op: "list devices",
                    source,
                })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(|source| SecurityError::Db {
                    op: "list devices",
                    source,
                })
        })?;
        raws.into_iter().map(parse_raw).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Removing a device forgets its last refusal (kept by the inventory,
    /// `bastion-detect`): a device registered again under the same AE title
    /// starts with no refusal of its previous life.
    #[test]
    fn removing_a_device_forgets_its_last_refusal() {
        let dir = tempfile::tempdir().expect("dir");
        let db = SecurityDb::open(&dir.path().join("s.db"), &[3u8; 32]).expect("db");
        let (Ok(ae), Ok(net), Ok(allow)) = (
            AeTitle::parse("CT1"),
            "127.0.0.0/8".parse::<IpNet>(),
            PermissionSet::parse_list("echo"),
        ) else {
            panic!("fixtures")
        };
        let reg = DeviceRegistry::new(&db);
        reg.add(&Device {
            ae: ae.clone(),
            network: net,
            transport: Transport::Tls,
            allow,
            cert_sha256: None,
            host: None,
            port: None,
            on_conflict: OnConflict::Refuse,
            move_destinations: vec![],
        })
        .expect("add");
        db.with(|c| {
            c.execute(
                "INSERT INTO device_rejections (ae, at_ms, reason, address) VALUES ('CT1', 1, 'permission_denied:find', '127.0.0.1')",
                [],
            )
            .map_err(|source| SecurityError::Db { op: "t", source })
        })
        .expect("refusal");
        assert_eq!(
            crate::inventory::last_rejections(&db).expect("read").len(),
            1
        );
        reg.remove(&ae).expect("remove");
        assert!(crate::inventory::last_rejections(&db)
            .expect("read")
            .is_empty());
    }

    #[test]
    fn move_destination_lists_trim_and_dedupe() {
        let Ok(list) = parse_ae_list(" STORE1 ,STORE2,,STORE1") else {
            panic!("parses")
        };
        assert_eq!(ae_list(&list), "STORE1,STORE2");
        assert_eq!(parse_ae_list("").ok(), Some(vec![]));
        assert!(parse_ae_list("A, ,THIS_TITLE_IS_WAY_TOO_LONG").is_err());
    }

    #[test]
    fn a_device_moves_to_itself_and_listed_devices_only() {
        let (Ok(me), Ok(other), Ok(third), Ok(net), Ok(allow)) = (
            AeTitle::parse("MOD1"),
            AeTitle::parse("STORE1"),
            AeTitle::parse("STORE2"),
            "127.0.0.0/8".parse::<IpNet>(),
            PermissionSet::parse_list("move"),
        ) else {
            panic!("fixtures")
        };
        let d = Device {
            ae: me.clone(),
            network: net,
            transport: Transport::Tls,
            allow,
            cert_sha256: None,
            host: None,
            port: None,
            on_conflict: OnConflict::Refuse,
            move_destinations: vec![other.clone()],
        };
        assert!(d.may_move_to(&me));
        let Ok(padded) = AeTitle::parse(" STORE1 ") else {
            panic!("AE")
        };
        assert!(d.may_move_to(&padded));
        assert!(d.may_move_to(&other));
        assert!(!d.may_move_to(&third));
    }

    fn settings(network: &str, transport: &str, allow: &[&str]) -> DeviceSettings {
        DeviceSettings {
            network: Some(network.into()),
            transport: Some(transport.into()),
            allow: Some(allow.iter().map(|s| (*s).to_owned()).collect()),
            ..DeviceSettings::default()
        }
    }

    fn refused(r: Result<impl std::fmt::Debug>) -> &'static str {
        match r {
            Err(SecurityError::Invalid { what, .. }) => what,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn settings_create_and_apply_with_the_same_checks() {
        let Ok((mut d, warnings)) =
            settings("10.1.2.0/24", "tls", &["echo", "store"]).create(" CT1 ")
        else {
            panic!("valid")
        };
        assert!(warnings.is_empty());
        assert_eq!(d.ae.as_str(), "CT1");
        assert_eq!(d.allow.to_string(), "echo,store");
        assert_eq!(d.on_conflict, OnConflict::Refuse);
        // required, and named
        assert_eq!(refused(DeviceSettings::default().create("CT1")), "network");
        assert_eq!(
            refused(settings("10.1.2.0/24", "tls", &["echo"]).create("")),
            "ae"
        );
        assert_eq!(
            refused(settings("10.1.2.3/24", "tls", &["echo"]).create("A")),
            "network"
        );
        assert_eq!(
            refused(settings("nonsense", "tls", &["echo"]).create("A")),
            "network"
        );
        assert_eq!(
            refused(settings("::ffff:127.0.0.1/128", "tls", &["echo"]).create("A")),
            "network"
        );
        assert_eq!(
            refused(settings("10.0.0.0/8", "ftp", &["echo"]).create("A")),
            "transport"
        );
        assert_eq!(
            refused(settings("10.0.0.0/8", "tls", &["echo", "fly"]).create("A")),
            "allow"
        );
        assert_eq!(
            refused(settings("10.0.0.0/8", "tls", &[]).create("A")),
            "allow"
        );
        let Ok((_, w)) = settings("0.0.0.0/0", "tls", &["echo"]).create("ANY") else {
            panic!("allowed with a warning")
        };
        assert_eq!(w.len(), 1, "{w:?}");
        // updates: only the given settings change; d is kept on error
        let before = d.clone();
        let host_only = DeviceSettings {
            host: Some(Some("pacs.example".into())),
            ..DeviceSettings::default()
        };
        assert_eq!(refused(host_only.apply(&mut d)), "port");
        assert_eq!(d, before);
        let both = DeviceSettings {
            port: Some(Some(0)),
            ..host_only.clone()
        };
        assert_eq!(refused(both.apply(&mut d)), "port");
        let bad_host = DeviceSettings {
            host: Some(Some("bad host!".into())),
            port: Some(Some(104)),
            ..DeviceSettings::default()
        };
        assert_eq!(refused(bad_host.apply(&mut d)), "host");
        let ok = DeviceSettings {
            port: Some(Some(11112)),
            on_conflict: Some("replace".into()),
            move_destinations: Some(vec!["STORE1".into(), " STORE1 ".into()]),
            cert_sha256: Some("AB:".repeat(32)),
            ..host_only
        };
        assert!(ok.apply(&mut d).is_ok());
        assert_eq!(d.host.as_deref(), Some("pacs.example"));
        assert_eq!(d.port, Some(11112));
        assert_eq!(d.on_conflict, OnConflict::Replace);
        assert_eq!(d.move_destinations.len(), 1);
        assert_eq!(d.cert_sha256.as_deref(), Some("ab".repeat(32).as_str()));
        assert_eq!(d.network, before.network);
        let plain = DeviceSettings {
            transport: Some("plain".into()),
            ..DeviceSettings::default()
        };
        assert_eq!(refused(plain.apply(&mut d)), "cert_sha256");
        let clear = DeviceSettings {
            transport: Some("plain".into()),
            cert_sha256: Some(String::new()),
            host: Some(None),
            port: Some(None),
            move_destinations: Some(vec![]),
            ..DeviceSettings::default()
        };
        assert!(clear.apply(&mut d).is_ok());
        assert_eq!(
            (d.host.as_deref(), d.port, d.cert_sha256.as_deref()),
            (None, None, None)
        );
        assert!(d.move_destinations.is_empty());
        let bad_on_conflict = DeviceSettings {
            on_conflict: Some("merge".into()),
            ..DeviceSettings::default()
        };
        assert_eq!(refused(bad_on_conflict.apply(&mut d)), "on_conflict");
        let bad_fp = DeviceSettings {
            cert_sha256: Some("abc".into()),
            transport: Some("mtls".into()),
            ..DeviceSettings::default()
        };
        assert_eq!(refused(bad_fp.apply(&mut d)), "cert_sha256");
    }
}
