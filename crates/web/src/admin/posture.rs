//! `GET /api/posture` (admin permission): how exposed this installation
//! is, in one object for the web UI's security page:
//!
//! ```json
//! {"listeners": [{"name": "dicom-tls", "address": "127.0.0.1:2762",
//!                 "exposure": "loopback", "tls": true}, …],
//!  "server_certificate": {"subject": "CN=…", "not_after": "2028-…Z", "days_left": 824},
//!  "ca_certificate": {"subject": "CN=…", "not_after": "2036-…Z", "days_left": 3649},
//!  "plaintext_devices": ["OLDCT"],
//!  "admins_without_totp": ["admin"],
//!  "admin_requires_totp": true,
//!  "open_alerts": 2,
//!  "open_alerts_by_severity": {"high": 1, "medium": 0, "low": 1},
//!  "warnings": ["…one line per risky item…"]}
//! ```
//!
//! `exposure` is `loopback`, `private network` (RFC 1918, CGNAT, link-local,
//! IPv6 unique local), `all interfaces` (`0.0.0.0`, `::`) or `public`. A
//! certificate that cannot be read is `null` (and a warning).
//! `admins_without_totp` lists enabled admin accounts without a second
//! factor (a disabled account cannot log in). `open_alerts` counts every
//! unacknowledged alert, `open_alerts_by_severity` splits them by their
//! rule's severity; only high and medium ones make a warning (low ones are
//! mostly the record of administrators' own changes). Devices registered
//! with the plain transport while `serve` has no plain listener make a
//! warning too: they cannot connect. The master key, audit signing key or
//! CA key inside the data directory makes one warning each (the binary's
//! [`super::AdminContext::key_warnings`]).

use std::net::IpAddr;

use axum::{extract::State, Extension, Json};
use bastion_model::{Role, Transport, WebPermission};
use bastion_security::{alerts::AlertStore, detect::Rule, devices::DeviceRegistry, pki};
use serde_json::{json, Value};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use super::{blocking, context, security_error, ListenerInfo};
use crate::{audit::Note, auth::Caller, error::ApiError, AppState};

/// The server certificate is reported as expiring within this many days.
pub const SERVER_CERT_WARN_DAYS: i64 = 30;
/// The CA certificate is reported as expiring within this many days
/// (replacing it means re-issuing every device certificate).
pub const CA_CERT_WARN_DAYS: i64 = 90;

/// `GET /api/posture`: the object in the module documentation.
///
/// # Errors
/// 403 without the admin permission.
pub async fn posture(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
) -> Result<Json<Value>, ApiError> {
    note.action("posture.read");
    caller.require(WebPermission::Admin)?;
    let ctx = context(&state)?;
    let c = ctx.clone();
    let (devices, users, open) = blocking(move || {
        let devices = DeviceRegistry::new(&c.db).list()?;
        let users = c.accounts.list_users()?;
        let open = AlertStore::new(c.db.clone()).open_counts()?;
        Ok::<_, bastion_security::SecurityError>((devices, users, open))
    })
    .await?
    .map_err(security_error)?;
    let pki_paths = ctx.pki.clone();
    let (server, ca) = blocking(move || {
        (
            pki::certificate_info(&pki_paths.server_cert),
            pki::certificate_info(&pki_paths.ca_cert),
        )
    })
    .await?;
    let now = OffsetDateTime::now_utc();
    let mut warnings = Vec::new();

    let listeners: Vec<Value> = ctx
        .listeners
        .iter()
        .map(|l| {
            let exposure = exposure(l.address.ip());
            warnings.extend(listener_warning(l, exposure));
            json!({"name": l.name, "address": l.address.to_string(),
                   "exposure": exposure, "tls": l.tls})
        })
        .collect();

    let mut certificate =
        |what: &str, info: bastion_security::Result<pki::CertificateInfo>, warn_days: i64| {
            match info {
                Ok(i) => {
                    let days_left = (i.not_after - now).whole_days();
                    if i.not_after <= now {
                        warnings.push(format!("the {what} has expired"));
                    } else if days_left < warn_days {
                        warnings.push(format!("the {what} expires in {days_left} days"));
                    }
                    json!({"subject": i.subject,
                       "not_after": i.not_after.format(&Rfc3339).unwrap_or_default(),
                       "days_left": days_left})
                }
                Err(e) => {
                    tracing::error!(error = %e, "posture: cannot read the {what}");
                    warnings.push(format!("the {what} cannot be read"));
                    Value::Null
                }
            }
        };
    let server_certificate = certificate(
        "server certificate (renew with `bastion cert server`)",
        server,
        SERVER_CERT_WARN_DAYS,
    );
    let ca_certificate = certificate("CA certificate", ca, CA_CERT_WARN_DAYS);

    let plaintext: Vec<&str> = devices
        .iter()
        .filter(|d| d.transport == Transport::Plain)
        .map(|d| d.ae.as_str())
        .collect();
    for ae in &plaintext {
        warnings.push(format!(
            "device {ae} uses the plain transport: its associations are not encrypted"
        ));
    }
    let plain_listener = ctx.listeners.iter().any(|l| l.name == "dicom-plain");
    if !plaintext.is_empty() && !plain_listener {
        let (noun, verb) = if plaintext.len() == 1 {
            ("device", "uses")
        } else {
            ("devices", "use")
        };
        warnings.push(format!(
            "{noun} {} {verb} the plain transport but cannot connect: no plain listener \
             (start serve with --dicom-plain-addr, or register {} with transport tls)",
            plaintext.join(", "),
            if plaintext.len() == 1 { "it" } else { "them" }
        ));
    }
    for d in devices.iter().filter(|d| d.network.prefix_len() == 0) {
        warnings.push(format!(
            "device {} may connect from any address (network {})",
            d.ae, d.network
        ));
    }
    let admins_without_totp: Vec<&str> = users
        .iter()
        .filter(|u| u.role == Role::Admin && !u.disabled && !u.totp_enabled)
        .map(|u| u.username.as_str())
        .collect();
    for u in &admins_without_totp {
        warnings.push(format!("admin account {u} has no second factor (TOTP)"));
    }
    let admin_requires_totp = ctx.accounts.policy().admin_requires_totp;
    if !admin_requires_totp {
        warnings.push(
            "[accounts] admin_requires_totp = false: admins can log in with a password alone"
                .into(),
        );
    }
    warnings.extend(ctx.key_warnings.iter().cloned());
    let audit = audit_state(&state, &mut warnings);
    let by_severity = open_by_severity(&open);
    let open_total: u64 = by_severity.iter().map(|(_, n)| n).sum();
    let urgent = by_severity[0].1 + by_severity[1].1;
    if urgent > 0 {
        warnings.push(format!(
            "{urgent} open high/medium-severity alert{} to review",
            if urgent == 1 { "" } else { "s" }
        ));
    }
    Ok(Json(json!({
        "listeners": listeners,
        "server_certificate": server_certificate,
        "ca_certificate": ca_certificate,
        "plaintext_devices": plaintext,
        "admins_without_totp": admins_without_totp,
        "admin_requires_totp": admin_requires_totp,
        "open_alerts": open_total,
        "open_alerts_by_severity": by_severity
            .iter()
            .map(|(sev, n)| ((*sev).to_owned(), Value::from(*n)))
            .collect::<serde_json::Map<_, _>>(),
        "audit": audit,
        "warnings": warnings,
    })))
}

/// The audit trail's recording state (issue 10): `{"recording": bool,
/// "reason": text|null, "allow_unaudited_access": bool, "refusing": bool,
/// "syslog_export": {"exporting": bool, "reason": text|null}|null}`, and a
/// warning line for each risk. Read from the event log's gate, without
/// touching the trail, so it works while the disk is full.
fn audit_state(state: &AppState, warnings: &mut Vec<String>) -> Value {
    let Some(gate) = state.archive().events().audit_gate() else {
        return Value::Null;
    };
    let health = gate.health();
    let recording = health.recording();
    let reason = health.reason();
    if !recording {
        warnings.push(if gate.allows_unaudited() {
            format!(
                "the audit trail is not recording ({}): patient data is served WITHOUT audit records ([audit] allow_unaudited_access)",
                reason.as_deref().unwrap_or("unknown reason")
            )
        } else {
            format!(
                "the audit trail is not recording ({}): patient data is refused until it records again (free disk space)",
                reason.as_deref().unwrap_or("unknown reason")
            )
        });
    }
    if gate.allows_unaudited() {
        warnings.push(
            "[audit] allow_unaudited_access = true: patient data would be served even when the audit trail cannot record it"
                .into(),
        );
    }
    let export = gate.export_health().map(|h| {
        let exporting = h.recording();
        let reason = h.reason();
        if !exporting {
            warnings.push(format!(
                "syslog export of the audit trail stopped ({}): it resumes without gaps when the spool can be written",
                reason.as_deref().unwrap_or("unknown reason")
            ));
        }
        json!({"exporting": exporting, "reason": reason})
    });
    json!({
        "recording": recording,
        "reason": reason,
        "allow_unaudited_access": gate.allows_unaudited(),
        "refusing": gate.refuses(),
        "syslog_export": export,
    })
}

/// Open alerts per severity (`high`, `medium`, `low`, in this order) from
/// the open counts per rule name; a rule name this build does not know
/// counts as high (never hidden).
pub fn open_by_severity(
    per_rule: &std::collections::BTreeMap<String, u64>,
) -> [(&'static str, u64); 3] {
    let mut out = [("high", 0), ("medium", 0), ("low", 0)];
    for (name, n) in per_rule {
        let severity = Rule::ALL
            .into_iter()
            .find(|r| r.name() == name)
            .map_or("high", Rule::severity);
        if let Some(slot) = out.iter_mut().find(|(s, _)| *s == severity) {
            slot.1 += n;
        }
    }
    out
}

/// Who can reach an address: `loopback`, `private network`, `all
/// interfaces` or `public`.
pub fn exposure(ip: IpAddr) -> &'static str {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if ip.is_unspecified() {
        return "all interfaces";
    }
    if ip.is_loopback() {
        return "loopback";
    }
    let private = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private() || v4.is_link_local() || (o[0] == 100 && (o[1] & 0xC0) == 64)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments()[0];
            (s & 0xfe00) == 0xfc00 || (s & 0xffc0) == 0xfe80
        }
    };
    if private {
        "private network"
    } else {
        "public"
    }
}

/// The warning a listener deserves, if any.
fn listener_warning(l: &ListenerInfo, exposure: &str) -> Option<String> {
    if !l.tls {
        return Some(format!(
            "{} listener on {} accepts unencrypted connections ({exposure})",
            l.name, l.address
        ));
    }
    match exposure {
        "public" => Some(format!(
            "{} listener on {} is reachable from a public address",
            l.name, l.address
        )),
        "all interfaces" => Some(format!(
            "{} listener on {} listens on all interfaces; bind it to the address clients use",
            l.name, l.address
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_alerts_are_split_by_severity() {
        let counts: std::collections::BTreeMap<String, u64> = [
            ("login_brute_force", 2),
            ("association_scan", 1),
            ("unknown_device", 3),
            ("device_changed", 1),
            ("security_change", 30),
            ("off_hours_access", 2),
            ("some_future_rule", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(
            open_by_severity(&counts),
            [("high", 4), ("medium", 4), ("low", 32)]
        );
        assert_eq!(
            open_by_severity(&Default::default()),
            [("high", 0), ("medium", 0), ("low", 0)]
        );
    }

    #[test]
    fn exposures() {
        let e = |s: &str| exposure(s.parse().unwrap_or(IpAddr::from([9, 9, 9, 9])));
        assert_eq!(e("127.0.0.1"), "loopback");
        assert_eq!(e("::1"), "loopback");
        assert_eq!(e("::ffff:127.0.0.1"), "loopback");
        assert_eq!(e("0.0.0.0"), "all interfaces");
        assert_eq!(e("::"), "all interfaces");
        for p in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.1.1",
            "fd00::1",
            "fe80::1",
        ] {
            assert_eq!(e(p), "private network", "{p}");
        }
        for p in ["8.8.8.8", "172.32.0.1", "2001:db8::1"] {
            assert_eq!(e(p), "public", "{p}");
        }
    }
}
