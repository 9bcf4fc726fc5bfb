//! Events → DICOM audit messages (PS3.15 §A.5.1, RFC 3881 lineage).
//!
//! [`messages`] maps one event of the event stream (see
//! [`crate::events`]) to zero, one or two `<AuditMessage>` documents with
//! the codes of PS3.16 CID 400 (EventID), CID 401 (EventTypeCode), CID 402
//! (RoleIDCode) and CID 404 (ParticipantObjectIDTypeCode). The XML is
//! written with quick-xml's writer (escaping is the library's), never by
//! string concatenation. The schema copy in `schemas/dicom-audit-message.rnc`
//! is what the interop tests validate against.

use std::io::Cursor;

use base64::Engine;
use quick_xml::{events::BytesText, Writer};
use serde_json::{Map, Value};

use super::Subject;

/// A coded value (csd-code, codeSystemName, originalText).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    /// The code value.
    pub code: &'static str,
    /// The coding scheme (`DCM`, `RFC-3881`).
    pub system: &'static str,
    /// The code meaning.
    pub meaning: &'static str,
}

const fn dcm(code: &'static str, meaning: &'static str) -> Code {
    Code {
        code,
        system: "DCM",
        meaning,
    }
}

/// PS3.16 CID 400 Audit Event ID.
pub mod event_id {
    use super::{dcm, Code};
    /// (110100, DCM, "Application Activity").
    pub const APPLICATION_ACTIVITY: Code = dcm("110100", "Application Activity");
    /// (110101, DCM, "Audit Log Used").
    pub const AUDIT_LOG_USED: Code = dcm("110101", "Audit Log Used");
    /// (110102, DCM, "Begin Transferring DICOM Instances").
    pub const BEGIN_TRANSFERRING: Code = dcm("110102", "Begin Transferring DICOM Instances");
    /// (110103, DCM, "DICOM Instances Accessed").
    pub const INSTANCES_ACCESSED: Code = dcm("110103", "DICOM Instances Accessed");
    /// (110104, DCM, "DICOM Instances Transferred").
    pub const INSTANCES_TRANSFERRED: Code = dcm("110104", "DICOM Instances Transferred");
    /// (110106, DCM, "Export").
    pub const EXPORT: Code = dcm("110106", "Export");
    /// (110107, DCM, "Import").
    pub const IMPORT: Code = dcm("110107", "Import");
    /// (110112, DCM, "Query").
    pub const QUERY: Code = dcm("110112", "Query");
    /// (110113, DCM, "Security Alert").
    pub const SECURITY_ALERT: Code = dcm("110113", "Security Alert");
    /// (110114, DCM, "User Authentication").
    pub const USER_AUTHENTICATION: Code = dcm("110114", "User Authentication");

    /// Every EventID Bastion writes, with its `--event` name.
    pub const ALL: [(&str, Code); 10] = [
        ("application-activity", APPLICATION_ACTIVITY),
        ("audit-log-used", AUDIT_LOG_USED),
        ("begin-transferring", BEGIN_TRANSFERRING),
        ("instances-accessed", INSTANCES_ACCESSED),
        ("instances-transferred", INSTANCES_TRANSFERRED),
        ("export", EXPORT),
        ("import", IMPORT),
        ("query", QUERY),
        ("security-alert", SECURITY_ALERT),
        ("user-authentication", USER_AUTHENTICATION),
    ];
}

/// PS3.16 CID 401 Audit Event Type Code.
mod type_code {
    use super::{dcm, Code};
    pub const APPLICATION_START: Code = dcm("110120", "Application Start");
    pub const APPLICATION_STOP: Code = dcm("110121", "Application Stop");
    pub const LOGIN: Code = dcm("110122", "Login");
    pub const LOGOUT: Code = dcm("110123", "Logout");
    pub const NODE_AUTHENTICATION: Code = dcm("110126", "Node Authentication");
    pub const SECURITY_CONFIGURATION: Code = dcm("110129", "Security Configuration");
    pub const RESTRICTED_FUNCTION: Code = dcm("110132", "Use of Restricted Function");
    pub const AUDIT_STOPPED: Code = dcm("110133", "Audit Recording Stopped");
    pub const AUDIT_STARTED: Code = dcm("110134", "Audit Recording Started");
    pub const OBJECT_SECURITY_CHANGED: Code = dcm("110135", "Object Security Attributes Changed");
    pub const ROLES_CHANGED: Code = dcm("110136", "Security Roles Changed");
    pub const USER_SECURITY_CHANGED: Code = dcm("110137", "User security Attributes Changed");
}

/// PS3.16 CID 402 Audit Active Participant Role ID Code.
mod role {
    use super::{dcm, Code};
    pub const APPLICATION: Code = dcm("110150", "Application");
    pub const DESTINATION: Code = dcm("110152", "Destination Role ID");
    pub const SOURCE: Code = dcm("110153", "Source Role ID");
}

/// ParticipantObjectIDTypeCode values (RFC 3881 and PS3.16 CID 404).
mod object_type {
    use super::{dcm, Code};
    pub const PATIENT: Code = Code {
        code: "2",
        system: "RFC-3881",
        meaning: "Patient Number",
    };
    pub const USER: Code = Code {
        code: "11",
        system: "RFC-3881",
        meaning: "User Identifier",
    };
    pub const URI: Code = Code {
        code: "12",
        system: "RFC-3881",
        meaning: "URI",
    };
    pub const STUDY: Code = dcm("110180", "Study Instance UID");
    pub const SOP_CLASS: Code = dcm("110181", "SOP Class UID");
    pub const NODE: Code = dcm("110182", "Node ID");
}

/// The FindOptions `ae` prefix of the web front end's searches
/// (`web:<user>`, set by `bastion-web` for QIDO-RS).
const WEB_AE_PREFIX: &str = "web:";

/// Who we are in audit messages.
#[derive(Debug, Clone)]
pub struct AuditIdentity {
    /// Our AE title (the application participant's UserID).
    pub ae_title: String,
    /// AuditSourceID (e.g. `BASTION@hostname`).
    pub source_id: String,
}

/// The audit messages of one event: each message's EventID and its XML.
pub fn messages(
    event: &Map<String, Value>,
    subjects: &[Subject],
    me: &AuditIdentity,
) -> Vec<(Code, String)> {
    plans(event)
        .into_iter()
        .map(|p| (p.id, render(&p, event, subjects, me)))
        .collect()
}

/// The private part of a query event ([`crate::events::EventLog::record_private`]):
/// the query as the client sent it (a C-FIND identifier dataset with its
/// transfer syntax UID, or a QIDO-RS query string without one), which the
/// Query message carries as ParticipantObjectQuery (PS3.15 A.5.3).
pub fn private_query(query: &[u8], transfer_syntax: Option<&str>) -> Value {
    let mut m = Map::new();
    m.insert(
        "query".into(),
        base64::engine::general_purpose::STANDARD
            .encode(query)
            .into(),
    );
    if let Some(ts) = transfer_syntax {
        m.insert("transfer_syntax".into(), ts.into());
    }
    Value::Object(m)
}

/// What one message says, before participants and objects are filled in.
struct Plan {
    id: Code,
    action: &'static str,
    types: Vec<Code>,
    /// Who acts: true when the remote user or device requested the action.
    remote_is_source: Option<bool>,
    objects: Objects,
    /// The EventOutcomeIndicator of an unsuccessful outcome when the event
    /// type, not the outcome, decides it.
    indicator: Option<&'static str>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Objects {
    /// Patients and studies of the event.
    Data,
    /// The query (plus patients and studies).
    Query,
    /// The user named by the event.
    User,
    /// The device named by the event.
    Device,
    /// The audit trail.
    Trail,
    /// None.
    None,
}

fn s<'a>(e: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    e.get(k).and_then(Value::as_str).filter(|v| !v.is_empty())
}

fn plan(id: Code, action: &'static str, types: Vec<Code>, objects: Objects) -> Plan {
    Plan {
        id,
        action,
        types,
        remote_is_source: None,
        objects,
        indicator: None,
    }
}

/// The mapping from event types to PS3.15 A.5.3 messages.
fn plans(e: &Map<String, Value>) -> Vec<Plan> {
    use event_id as id;
    let kind = s(e, "type").unwrap_or("");
    let outcome = s(e, "outcome").unwrap_or("success");
    match kind {
        "application.start" => vec![plan(
            id::APPLICATION_ACTIVITY,
            "E",
            vec![type_code::APPLICATION_START],
            Objects::None,
        )],
        "application.stop" => vec![plan(
            id::APPLICATION_ACTIVITY,
            "E",
            vec![type_code::APPLICATION_STOP],
            Objects::None,
        )],
        "login.success" => vec![plan(
            id::USER_AUTHENTICATION,
            "E",
            vec![type_code::LOGIN],
            Objects::None,
        )],
        // A refused login (wrong name, password or TOTP code, locked or
        // disabled account, throttled) is one User Authentication message
        // with outcome 4 (minor failure, PS3.15 A.5.3.7), never a Security
        // Alert as well: the request refused was the authentication.
        "login.failure" | "login.refused" => {
            let mut p = plan(
                id::USER_AUTHENTICATION,
                "E",
                vec![type_code::LOGIN],
                Objects::None,
            );
            p.indicator = Some("4");
            vec![p]
        }
        "logout" => vec![plan(
            id::USER_AUTHENTICATION,
            "E",
            vec![type_code::LOGOUT],
            Objects::None,
        )],
        "store.stored" | "store.duplicate" | "store.refused" => {
            let import = s(e, "ae") == Some("IMPORT");
            let mut p = plan(
                if import {
                    id::IMPORT
                } else {
                    id::INSTANCES_TRANSFERRED
                },
                "C",
                vec![],
                Objects::Data,
            );
            p.remote_is_source = Some(true);
            vec![p]
        }
        // A QIDO-RS search is audited once, by its `http.request` (which
        // knows the authenticated user, the status and the query string,
        // and exists also when the search is refused before the archive is
        // asked); the archive's `query.find` for it (FindOptions `ae`
        // `web:<user>`, set by the web crate) adds no second message.
        "query.find" if s(e, "ae").is_some_and(|ae| ae.starts_with(WEB_AE_PREFIX)) => vec![],
        "query.find" => vec![plan(id::QUERY, "E", vec![], Objects::Query)],
        "retrieve.move" | "retrieve.get" => {
            let mut begin = plan(id::BEGIN_TRANSFERRING, "E", vec![], Objects::Data);
            begin.remote_is_source = Some(false);
            let mut done = plan(id::INSTANCES_TRANSFERRED, "R", vec![], Objects::Data);
            done.remote_is_source = Some(false);
            vec![begin, done]
        }
        "instance.exported" => vec![plan(id::EXPORT, "R", vec![], Objects::Data)],
        "http.request" => http_plans(e, outcome),
        "association.rejected" | "association.failed" => vec![plan(
            id::SECURITY_ALERT,
            "E",
            vec![type_code::NODE_AUTHENTICATION],
            Objects::None,
        )],
        // An accepted association is no security alert (PS3.15 A.5.3.11
        // Security Alert is for a detected security event): what the device
        // then does (store, query, retrieve) has its own messages. The event
        // stays in the event log and the trail for the inventory and search.
        "association.accepted" => vec![],
        "dimse.not_authorized" => vec![plan(
            id::SECURITY_ALERT,
            "E",
            vec![type_code::RESTRICTED_FUNCTION],
            Objects::None,
        )],
        "audit.started" => vec![plan(
            id::SECURITY_ALERT,
            "E",
            vec![type_code::AUDIT_STARTED],
            Objects::Trail,
        )],
        "audit.stopped" => vec![plan(
            id::SECURITY_ALERT,
            "E",
            vec![type_code::AUDIT_STOPPED],
            Objects::Trail,
        )],
        // The trail or the syslog export stopped recording (a full disk)
        // and started again (issue 10): Security Alerts 110133 / 110134.
        "audit.recording_stopped" | "syslog.export_stopped" => vec![plan(
            id::SECURITY_ALERT,
            "E",
            vec![type_code::AUDIT_STOPPED],
            Objects::Trail,
        )],
        "audit.recording_resumed" | "syslog.export_resumed" => vec![plan(
            id::SECURITY_ALERT,
            "E",
            vec![type_code::AUDIT_STARTED],
            Objects::Trail,
        )],
        // A request refused because it could not be audited.
        "association.refused_unaudited" | "dimse.refused_unaudited" => vec![plan(
            id::SECURITY_ALERT,
            "E",
            vec![type_code::AUDIT_STOPPED],
            Objects::None,
        )],
        "audit.verify" | "audit.search" | "audit.read" => {
            vec![plan(id::AUDIT_LOG_USED, "R", vec![], Objects::Trail)]
        }
        // Internal marker records (checkpoints) carry no message.
        "audit.checkpoint" => vec![],
        k if k.starts_with("user.") || k.starts_with("token.") => {
            let t = if k.contains("role") {
                type_code::ROLES_CHANGED
            } else {
                type_code::USER_SECURITY_CHANGED
            };
            vec![plan(id::SECURITY_ALERT, "E", vec![t], Objects::User)]
        }
        k if k.starts_with("device.") => vec![plan(
            id::SECURITY_ALERT,
            "E",
            vec![type_code::SECURITY_CONFIGURATION],
            Objects::Device,
        )],
        k if k.starts_with("cert.") || k.starts_with("config.") => vec![plan(
            id::SECURITY_ALERT,
            "E",
            vec![type_code::SECURITY_CONFIGURATION],
            Objects::None,
        )],
        "security.instance_replaced" | "security.instance_conflict" => vec![plan(
            id::SECURITY_ALERT,
            "E",
            vec![type_code::OBJECT_SECURITY_CHANGED],
            Objects::Data,
        )],
        k if k.starts_with("security.") || k.starts_with("alert") => {
            vec![plan(id::SECURITY_ALERT, "E", vec![], Objects::Data)]
        }
        // Anything else: a refusal or alert is a Security Alert; the rest is
        // application activity (the event type is in EventOutcomeDescription).
        _ if outcome != "success" => vec![plan(id::SECURITY_ALERT, "E", vec![], Objects::None)],
        _ => vec![plan(id::APPLICATION_ACTIVITY, "E", vec![], Objects::None)],
    }
}

fn http_plans(e: &Map<String, Value>, outcome: &str) -> Vec<Plan> {
    use event_id as id;
    let action = s(e, "action").unwrap_or("");
    match action {
        a if a.starts_with("qido.") => vec![plan(id::QUERY, "E", vec![], Objects::Query)],
        "wado.study" | "wado.series" | "wado.instance" => {
            let mut begin = plan(id::BEGIN_TRANSFERRING, "E", vec![], Objects::Data);
            begin.remote_is_source = Some(false);
            let mut done = plan(id::INSTANCES_TRANSFERRED, "R", vec![], Objects::Data);
            done.remote_is_source = Some(false);
            vec![begin, done]
        }
        a if a.starts_with("wado.") => {
            vec![plan(id::INSTANCES_ACCESSED, "R", vec![], Objects::Data)]
        }
        // The web UI's study download (zip of Part 10 files): data leaving
        // the archive for the user's machine, PS3.15 A.5.3.6.
        "export.study" => vec![plan(id::EXPORT, "R", vec![], Objects::Data)],
        "stow" => {
            let mut p = plan(id::INSTANCES_TRANSFERRED, "C", vec![], Objects::Data);
            p.remote_is_source = Some(true);
            vec![p]
        }
        // A trail read whose handler recorded its own event (`audit.read`
        // for GET /api/audit, `audit.verify` for GET /api/audit/chain,
        // marked `audited` by the handler) has that event's message only.
        a if (a.starts_with("audit") || a == "events.read")
            && e.get("audited").and_then(Value::as_bool) == Some(true) =>
        {
            vec![]
        }
        a if a.starts_with("audit") || a == "events.read" => {
            vec![plan(id::AUDIT_LOG_USED, "R", vec![], Objects::Trail)]
        }
        // Login, logout, password change, TOTP enrolment: the account
        // service's events (`login.*`, `logout`, `user.*`) are the messages,
        // also for a refused attempt (a wrong password is one User
        // Authentication message with outcome 4, not a Security Alert too).
        "login" | "logout" | "password.change" | "totp.enrol" => vec![],
        // Any other refused request (401/403) is a Security Alert.
        _ if outcome != "success" => vec![plan(
            id::SECURITY_ALERT,
            "E",
            vec![type_code::RESTRICTED_FUNCTION],
            Objects::None,
        )],
        _ => vec![],
    }
}

/// PS3.15 A.5.2: 0 success, 4 minor failure, 8 serious failure.
fn outcome_indicator(outcome: &str) -> &'static str {
    match outcome {
        "success" => "0",
        "refused" | "alert" => "4",
        _ => "8",
    }
}

/// Removes characters XML 1.0 cannot carry (control characters).
fn clean(v: &str) -> String {
    v.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

/// The IP address of `host:port` (or the value as given).
fn address(peer: &str) -> String {
    peer.parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| peer.to_owned())
}

fn studies(e: &Map<String, Value>, subjects: &[Subject]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for key in ["study_uids", "studies"] {
        if let Some(Value::Array(a)) = e.get(key) {
            out.extend(a.iter().filter_map(Value::as_str).map(str::to_owned));
        }
    }
    for s in subjects {
        if let Some(st) = &s.study_uid {
            out.push(st.clone());
        }
    }
    out.sort();
    out.dedup();
    out
}

type W = Writer<Cursor<Vec<u8>>>;

fn coded(w: &mut W, name: &str, c: Code) -> std::io::Result<()> {
    w.create_element(name)
        .with_attribute(("csd-code", c.code))
        .with_attribute(("codeSystemName", c.system))
        .with_attribute(("originalText", c.meaning))
        .write_empty()?;
    Ok(())
}

struct Participant {
    user_id: String,
    alternative: Option<String>,
    requestor: bool,
    address: Option<String>,
    role: Option<Code>,
}

fn participant(w: &mut W, p: &Participant) -> std::io::Result<()> {
    let mut el = w
        .create_element("ActiveParticipant")
        .with_attribute(("UserID", clean(&p.user_id).as_str()));
    let alt;
    if let Some(a) = &p.alternative {
        alt = clean(a);
        el = el.with_attribute(("AlternativeUserID", alt.as_str()));
    }
    el = el.with_attribute((
        "UserIsRequestor",
        if p.requestor { "true" } else { "false" },
    ));
    let addr;
    if let Some(a) = &p.address {
        addr = clean(a);
        el = el
            .with_attribute(("NetworkAccessPointID", addr.as_str()))
            .with_attribute(("NetworkAccessPointTypeCode", "2"));
    }
    match p.role {
        Some(r) => {
            el.write_inner_content(|w| coded(w, "RoleIDCode", r))?;
        }
        None => {
            el.write_empty()?;
        }
    }
    Ok(())
}

struct Object<'a> {
    id: String,
    id_type: Code,
    type_code: &'a str,
    role: &'a str,
    name: Option<String>,
    query: Option<Vec<u8>>,
    /// ParticipantObjectDetail type/value pairs (the value is base64-encoded here).
    details: Vec<(&'static str, String)>,
    life_cycle: Option<&'a str>,
}

fn object(w: &mut W, o: &Object<'_>) -> std::io::Result<()> {
    let id = clean(&o.id);
    let mut el = w
        .create_element("ParticipantObjectIdentification")
        .with_attribute(("ParticipantObjectID", id.as_str()))
        .with_attribute(("ParticipantObjectTypeCode", o.type_code))
        .with_attribute(("ParticipantObjectTypeCodeRole", o.role));
    if let Some(l) = o.life_cycle {
        el = el.with_attribute(("ParticipantObjectDataLifeCycle", l));
    }
    el.write_inner_content(|w| {
        coded(w, "ParticipantObjectIDTypeCode", o.id_type)?;
        if let Some(q) = &o.query {
            let b64 = base64::engine::general_purpose::STANDARD.encode(q);
            w.create_element("ParticipantObjectQuery")
                .write_text_content(BytesText::new(&b64))?;
        } else {
            let name = clean(o.name.as_deref().unwrap_or(&o.id));
            w.create_element("ParticipantObjectName")
                .write_text_content(BytesText::new(&name))?;
        }
        for (kind, value) in &o.details {
            let b64 = base64::engine::general_purpose::STANDARD.encode(value);
            w.create_element("ParticipantObjectDetail")
                .with_attribute(("type", *kind))
                .with_attribute(("value", b64.as_str()))
                .write_empty()?;
        }
        Ok(())
    })?;
    Ok(())
}

/// The SOP Class UID of a C-FIND information model (PS3.4 Annex C.6).
fn find_sop_class(model: &str) -> &'static str {
    match model {
        "patient_root" => "1.2.840.10008.5.1.4.1.2.1.1",
        _ => "1.2.840.10008.5.1.4.1.2.2.1",
    }
}

fn render(p: &Plan, e: &Map<String, Value>, subjects: &[Subject], me: &AuditIdentity) -> String {
    let mut w = Writer::new(Cursor::new(Vec::new()));
    // Writing into a Vec cannot fail; an error here is a bug, and the
    // message is then left empty rather than panicking on the recording thread.
    if write_message(&mut w, p, e, subjects, me).is_err() {
        return String::new();
    }
    String::from_utf8(w.into_inner().into_inner()).unwrap_or_default()
}

fn write_message(
    w: &mut W,
    p: &Plan,
    e: &Map<String, Value>,
    subjects: &[Subject],
    me: &AuditIdentity,
) -> std::io::Result<()> {
    let kind = s(e, "type").unwrap_or("event");
    let outcome = s(e, "outcome").unwrap_or("success");
    let ts = s(e, "ts").unwrap_or("1970-01-01T00:00:00Z").to_owned();
    w.create_element("AuditMessage").write_inner_content(|w| {
        // EventIdentification
        let mut description = kind.to_owned();
        for k in ["reason", "detail", "action", "status"] {
            if let Some(v) = e.get(k).filter(|v| !v.is_null()) {
                let v = v
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string());
                description.push_str(&format!("; {k}: {v}"));
            }
        }
        w.create_element("EventIdentification")
            .with_attribute(("EventActionCode", p.action))
            .with_attribute(("EventDateTime", ts.as_str()))
            .with_attribute((
                "EventOutcomeIndicator",
                match (p.indicator, outcome) {
                    (_, "success") => "0",
                    (Some(i), _) => i,
                    (None, o) => outcome_indicator(o),
                },
            ))
            .write_inner_content(|w| {
                coded(w, "EventID", p.id)?;
                for t in &p.types {
                    coded(w, "EventTypeCode", *t)?;
                }
                w.create_element("EventOutcomeDescription")
                    .write_text_content(BytesText::new(&clean(&description)))?;
                Ok(())
            })?;

        // ActiveParticipants: the remote user or device, then us.
        let peer = s(e, "peer")
            .or_else(|| s(e, "source"))
            .filter(|p| *p != "file" && *p != "unknown")
            .map(address);
        // An event with an `actor` (an account, device or alert change from
        // the CLI or the admin API) was requested by that actor, with the
        // caller's address as `peer` when it came over the network; the
        // user or device it names is the participant object, not a
        // participant.
        let actor = s(e, "actor");
        let user = match actor {
            Some(a) => Some(a).filter(|a| *a != "cli"),
            None => s(e, "username").or_else(|| s(e, "user")),
        };
        let device = s(e, "ae")
            .or_else(|| s(e, "calling_ae"))
            .filter(|_| actor.is_none());
        let cli = actor == Some("cli") || device == Some("IMPORT");
        let remote_role =
            p.remote_is_source
                .map(|src| if src { role::SOURCE } else { role::DESTINATION });
        let mut any_remote = false;
        if let Some(u) = user {
            participant(
                w,
                &Participant {
                    user_id: u.to_owned(),
                    alternative: None,
                    requestor: true,
                    address: peer.clone(),
                    role: if device.is_none() { remote_role } else { None },
                },
            )?;
            any_remote = true;
        }
        if let Some(d) = device.filter(|d| *d != "IMPORT") {
            participant(
                w,
                &Participant {
                    user_id: d.to_owned(),
                    alternative: None,
                    requestor: user.is_none(),
                    address: peer.clone(),
                    role: remote_role,
                },
            )?;
            any_remote = true;
        }
        if let Some(dest) = s(e, "destination") {
            participant(
                w,
                &Participant {
                    user_id: dest.to_owned(),
                    alternative: None,
                    requestor: false,
                    address: None,
                    role: Some(role::DESTINATION),
                },
            )?;
        }
        if !any_remote && cli {
            participant(
                w,
                &Participant {
                    user_id: "bastion-cli".into(),
                    alternative: Some(format!("user={}", os_user())),
                    requestor: true,
                    address: None,
                    role: None,
                },
            )?;
            any_remote = true;
        } else if !any_remote {
            if let Some(a) = peer.clone() {
                participant(
                    w,
                    &Participant {
                        user_id: a.clone(),
                        alternative: None,
                        requestor: true,
                        address: Some(a),
                        role: None,
                    },
                )?;
                any_remote = true;
            }
        }
        let our_role = match p.remote_is_source {
            Some(true) => Some(role::DESTINATION),
            Some(false) => Some(role::SOURCE),
            None => Some(role::APPLICATION),
        };
        participant(
            w,
            &Participant {
                user_id: me.ae_title.clone(),
                alternative: Some(format!("pid={}", std::process::id())),
                requestor: !any_remote,
                address: None,
                role: our_role,
            },
        )?;

        // AuditSourceIdentification (type 4: application server process).
        w.create_element("AuditSourceIdentification")
            .with_attribute(("AuditSourceID", clean(&me.source_id).as_str()))
            .write_inner_content(|w| {
                w.create_element("AuditSourceTypeCode")
                    .with_attribute(("csd-code", "4"))
                    .write_empty()?;
                Ok(())
            })?;

        // ParticipantObjects.
        match p.objects {
            Objects::Query => {
                // PS3.15 A.5.3 "Query": the SOP Class UID, and the query
                // itself (the C-FIND identifier dataset, or the QIDO-RS
                // query string) from the event's private part, which only
                // the encrypted trail holds. Without it (an older record, a
                // refusal before the identifier was read) a summary stands in.
                let private = e.get(crate::events::PRIVATE_KEY);
                let raw = private
                    .and_then(|p| p.get("query"))
                    .and_then(Value::as_str)
                    .and_then(|q| base64::engine::general_purpose::STANDARD.decode(q).ok());
                let query = raw.unwrap_or_else(|| {
                    serde_json::json!({
                        "model": e.get("model"), "level": e.get("level"),
                        "path": e.get("path"), "method": e.get("method"),
                        "matches": e.get("matches"),
                    })
                    .to_string()
                    .into_bytes()
                });
                let mut details = Vec::new();
                if let Some(ts) = private
                    .and_then(|p| p.get("transfer_syntax"))
                    .and_then(Value::as_str)
                {
                    details.push(("TransferSyntax", ts.to_owned()));
                }
                // QIDO-RS searches the Study Root information model.
                let model = if kind == "http.request" {
                    "study_root"
                } else {
                    s(e, "model").unwrap_or("")
                };
                object(
                    w,
                    &Object {
                        id: find_sop_class(model).to_owned(),
                        id_type: object_type::SOP_CLASS,
                        type_code: "2",
                        role: "24",
                        name: None,
                        query: Some(query),
                        details,
                        life_cycle: None,
                    },
                )?;
                data_objects(w, e, subjects)?;
            }
            Objects::Data => data_objects(w, e, subjects)?,
            Objects::User => {
                if let Some(u) = s(e, "username") {
                    object(
                        w,
                        &Object {
                            id: u.to_owned(),
                            id_type: object_type::USER,
                            type_code: "1",
                            role: "11",
                            name: None,
                            query: None,
                            details: Vec::new(),
                            life_cycle: None,
                        },
                    )?;
                }
            }
            Objects::Device => {
                let ae = s(e, "ae").map(str::to_owned).or_else(|| {
                    e.get("device")
                        .and_then(|d| d.get("ae"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                });
                if let Some(ae) = ae {
                    object(
                        w,
                        &Object {
                            id: ae,
                            id_type: object_type::NODE,
                            type_code: "2",
                            role: "13",
                            name: None,
                            query: None,
                            details: Vec::new(),
                            life_cycle: None,
                        },
                    )?;
                }
            }
            Objects::Trail => object(
                w,
                &Object {
                    id: "audit/records".into(),
                    id_type: object_type::URI,
                    type_code: "2",
                    role: "13",
                    name: Some("Bastion audit trail".into()),
                    query: None,
                    details: Vec::new(),
                    life_cycle: None,
                },
            )?,
            Objects::None => {}
        }
        Ok(())
    })?;
    Ok(())
}

fn data_objects(w: &mut W, e: &Map<String, Value>, subjects: &[Subject]) -> std::io::Result<()> {
    for st in studies(e, subjects) {
        object(
            w,
            &Object {
                id: st.clone(),
                id_type: object_type::STUDY,
                type_code: "2",
                role: "3",
                name: None,
                query: None,
                details: Vec::new(),
                life_cycle: None,
            },
        )?;
    }
    let mut seen = std::collections::BTreeSet::new();
    for s in subjects {
        if !seen.insert((s.patient_id.clone(), s.patient_name.clone())) {
            continue;
        }
        object(
            w,
            &Object {
                id: s.patient_id.clone(),
                id_type: object_type::PATIENT,
                type_code: "1",
                role: "1",
                name: Some(s.patient_name.clone()),
                query: None,
                details: Vec::new(),
                life_cycle: None,
            },
        )?;
    }
    Ok(())
}

/// The operating-system account running a CLI command (informative only).
fn os_user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quick_xml::{events::Event, Reader};
    use serde_json::json;

    fn me() -> AuditIdentity {
        AuditIdentity {
            ae_title: "BASTION".into(),
            source_id: "BASTION@test".into(),
        }
    }

    /// The messages of one event (with a timestamp added).
    fn of(event: Value) -> Vec<(Code, String)> {
        let mut m = event.as_object().cloned().expect("object");
        m.insert("ts".into(), "2026-12-01T10:00:00.000001Z".into());
        messages(&m, &[], &me())
    }

    /// The values of attribute `attr` on every `element` of `xml`, parsed
    /// with quick-xml's reader (not by searching the text).
    fn attrs(xml: &str, element: &str, attr: &str) -> Vec<String> {
        let mut r = Reader::from_str(xml);
        let mut out = Vec::new();
        loop {
            match r.read_event().expect("well-formed XML") {
                Event::Start(t) | Event::Empty(t) if t.name().as_ref() == element.as_bytes() => {
                    for a in t.attributes() {
                        let a = a.expect("attribute");
                        if a.key.as_ref() == attr.as_bytes() {
                            out.push(
                                a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                    .expect("value")
                                    .into_owned(),
                            );
                        }
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        out
    }

    fn indicator(xml: &str) -> String {
        attrs(xml, "EventIdentification", "EventOutcomeIndicator")
            .pop()
            .expect("EventOutcomeIndicator")
    }

    fn ids(msgs: &[(Code, String)]) -> Vec<&'static str> {
        msgs.iter().map(|(c, _)| c.code).collect()
    }

    #[test]
    fn qido_search_is_one_query_message() {
        // One QIDO-RS search records an `http.request` and the archive's
        // `query.find` (ae `web:<user>`): one Query message in all.
        let http = of(
            json!({"type": "http.request", "outcome": "success", "user": "doc",
            "peer": "127.0.0.1:6000", "action": "qido.studies", "status": 200, "study_uids": [],
            "private": private_query(b"StudyInstanceUID=1.2.3", None)}),
        );
        let find = of(
            json!({"type": "query.find", "outcome": "success", "ae": "web:doc",
            "peer": "127.0.0.1:6000", "model": "study_root", "level": "STUDY", "matches": 1,
            "private": private_query(b"StudyInstanceUID=1.2.3", None)}),
        );
        assert_eq!(ids(&http), ["110112"]);
        assert!(find.is_empty(), "{find:?}");
        let xml = &http[0].1;
        assert_eq!(indicator(xml), "0");
        assert_eq!(
            attrs(xml, "ActiveParticipant", "UserID"),
            ["doc", "BASTION"],
            "{xml}"
        );
        assert_eq!(
            attrs(xml, "ActiveParticipant", "NetworkAccessPointID"),
            ["127.0.0.1"]
        );
        // A refused search (never reached the archive) is still one Query
        // message, outcome 4.
        let refused = of(
            json!({"type": "http.request", "outcome": "refused", "user": "doc",
            "peer": "127.0.0.1:6000", "action": "qido.studies", "status": 403}),
        );
        assert_eq!(ids(&refused), ["110112"]);
        assert_eq!(indicator(&refused[0].1), "4");
        // A DIMSE C-FIND keeps its Query message.
        let dimse = of(
            json!({"type": "query.find", "outcome": "success", "ae": "CT1",
            "peer": "10.0.0.1:104", "model": "study_root", "level": "STUDY", "matches": 0}),
        );
        assert_eq!(ids(&dimse), ["110112"]);
    }

    #[test]
    fn audit_log_read_is_one_message() {
        let read = of(
            json!({"type": "audit.read", "outcome": "success", "user": "aud",
            "peer": "127.0.0.1:7000", "via": "api", "matches": 3}),
        );
        assert_eq!(ids(&read), ["110101"]);
        assert_eq!(
            attrs(&read[0].1, "ActiveParticipant", "NetworkAccessPointID"),
            ["127.0.0.1"]
        );
        // The request the handler audited itself adds nothing.
        for action in ["audit.search", "audit.chain"] {
            let http = of(
                json!({"type": "http.request", "outcome": "success", "user": "aud",
                "peer": "127.0.0.1:7000", "action": action, "status": 200, "audited": true}),
            );
            assert!(http.is_empty(), "{action}: {http:?}");
        }
        // A refused read (the handler recorded nothing) is one Audit Log
        // Used message, outcome 4.
        let refused = of(
            json!({"type": "http.request", "outcome": "refused", "user": "clin",
            "peer": "127.0.0.1:7000", "action": "audit.search", "status": 403}),
        );
        assert_eq!(ids(&refused), ["110101"]);
        assert_eq!(indicator(&refused[0].1), "4");
        // GET /api/events (no event of its own) keeps its message.
        let events = of(
            json!({"type": "http.request", "outcome": "success", "user": "aud",
            "peer": "127.0.0.1:7000", "action": "events.read", "status": 200}),
        );
        assert_eq!(ids(&events), ["110101"]);
    }

    #[test]
    fn failed_login_is_one_user_authentication_with_outcome_4() {
        // As the account service records it today (refused), and as older
        // records had it (failure): outcome 4 either way.
        for outcome in ["refused", "failure"] {
            let m = of(
                json!({"type": "login.failure", "outcome": outcome, "username": "doc",
                "source": "127.0.0.1", "reason": "wrong_password"}),
            );
            assert_eq!(ids(&m), ["110114"], "{outcome}");
            let xml = &m[0].1;
            assert_eq!(indicator(xml), "4", "{xml}");
            assert_eq!(attrs(xml, "EventTypeCode", "csd-code"), ["110122"]);
            assert_eq!(
                attrs(xml, "ActiveParticipant", "NetworkAccessPointID"),
                ["127.0.0.1"]
            );
        }
        let locked = of(
            json!({"type": "login.refused", "outcome": "refused", "username": "doc",
            "source": "127.0.0.1", "reason": "locked"}),
        );
        assert_eq!(ids(&locked), ["110114"]);
        assert_eq!(indicator(&locked[0].1), "4");
        // The 401 answer adds no Security Alert (110132).
        for action in ["login", "logout", "password.change", "totp.enrol"] {
            let http = of(
                json!({"type": "http.request", "outcome": "refused", "user": "doc",
                "peer": "127.0.0.1:6000", "action": action, "status": 401}),
            );
            assert!(http.is_empty(), "{action}: {http:?}");
        }
        let ok = of(
            json!({"type": "login.success", "outcome": "success", "username": "doc",
            "source": "127.0.0.1"}),
        );
        assert_eq!(ids(&ok), ["110114"]);
        assert_eq!(indicator(&ok[0].1), "0");
        // Other refused requests stay Security Alerts (Use of Restricted Function).
        let other = of(
            json!({"type": "http.request", "outcome": "refused", "user": "doc",
            "peer": "127.0.0.1:6000", "action": "users.list", "status": 403}),
        );
        assert_eq!(ids(&other), ["110113"]);
        assert_eq!(attrs(&other[0].1, "EventTypeCode", "csd-code"), ["110132"]);
    }

    #[test]
    fn admin_changes_name_the_caller_and_its_address() {
        let cases = [
            json!({"type": "user.disabled", "outcome": "success", "actor": "root",
                "peer": "127.0.0.9:5555", "username": "bob", "sessions_ended": 1}),
            json!({"type": "user.added", "outcome": "success", "actor": "root",
                "peer": "127.0.0.9:5555", "username": "bob", "role": "auditor"}),
            json!({"type": "device.added", "outcome": "success", "actor": "root",
                "peer": "127.0.0.9:5555", "device": {"ae": "CT1"}}),
            json!({"type": "device.removed", "outcome": "success", "actor": "root",
                "peer": "127.0.0.9:5555", "ae": "CT1"}),
            json!({"type": "alert.acknowledged", "outcome": "success", "actor": "root",
                "peer": "127.0.0.9:5555", "alert_id": 4, "rule": "login_brute_force"}),
        ];
        for e in cases {
            let m = of(e.clone());
            assert_eq!(ids(&m), ["110113"], "{e}");
            let xml = &m[0].1;
            // The acting admin is the requestor, from its address; the user
            // or device changed is the object, not a participant.
            assert_eq!(
                attrs(xml, "ActiveParticipant", "UserID"),
                ["root", "BASTION"],
                "{xml}"
            );
            assert_eq!(
                attrs(xml, "ActiveParticipant", "NetworkAccessPointID"),
                ["127.0.0.9"],
                "{xml}"
            );
            assert_eq!(
                attrs(xml, "ActiveParticipant", "UserIsRequestor"),
                ["true", "false"]
            );
        }
        let removed = of(
            json!({"type": "device.removed", "outcome": "success", "actor": "root",
            "peer": "127.0.0.9:5555", "ae": "CT1"}),
        );
        assert_eq!(
            attrs(
                &removed[0].1,
                "ParticipantObjectIdentification",
                "ParticipantObjectID"
            ),
            ["CT1"]
        );
        let disabled = of(
            json!({"type": "user.disabled", "outcome": "success", "actor": "root",
            "peer": "127.0.0.9:5555", "username": "bob"}),
        );
        assert_eq!(
            attrs(
                &disabled[0].1,
                "ParticipantObjectIdentification",
                "ParticipantObjectID"
            ),
            ["bob"]
        );
        // The CLI: no address, the bastion-cli participant.
        let cli = of(
            json!({"type": "user.disabled", "outcome": "success", "actor": "cli",
            "username": "bob"}),
        );
        let xml = &cli[0].1;
        assert_eq!(
            attrs(xml, "ActiveParticipant", "UserID"),
            ["bastion-cli", "BASTION"]
        );
        assert!(attrs(xml, "ActiveParticipant", "NetworkAccessPointID").is_empty());
    }

    #[test]
    fn accepted_association_is_no_security_alert() {
        let accepted = of(json!({"type": "association.accepted", "outcome": "success",
            "ae": "CT1", "peer": "10.0.0.1:104", "listener": "dicom-tls"}));
        assert!(accepted.is_empty(), "{accepted:?}");
        for kind in ["association.rejected", "association.failed"] {
            let m = of(
                json!({"type": kind, "outcome": "refused", "calling_ae": "EVIL",
                "peer": "10.0.0.1:104", "reason": "1/1/3"}),
            );
            assert_eq!(ids(&m), ["110113"], "{kind}");
            assert_eq!(attrs(&m[0].1, "EventTypeCode", "csd-code"), ["110126"]);
            assert_eq!(indicator(&m[0].1), "4");
        }
    }

    #[test]
    fn plain_listener_is_a_security_alert() {
        let m = of(json!({"type": "config.plain_listener", "outcome": "alert",
            "listener": "dicom-plain", "address": "127.0.0.1:11112",
            "detail": "plain (unencrypted) DICOM listener enabled"}));
        assert_eq!(ids(&m), ["110113"]);
        let xml = &m[0].1;
        assert_eq!(attrs(xml, "EventTypeCode", "csd-code"), ["110129"]);
        assert_eq!(indicator(xml), "4");
    }
}
