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
        "login.success" | "login.failure" | "login.refused" => vec![plan(
            id::USER_AUTHENTICATION,
            "E",
            vec![type_code::LOGIN],
            Objects::None,
        )],
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
        "association.rejected" | "association.failed" | "association.accepted" => {
            vec![plan(
                id::SECURITY_ALERT,
                "E",
                vec![type_code::NODE_AUTHENTICATION],
                Objects::None,
            )]
        }
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
        a if a.starts_with("audit") || a == "events.read" => {
            vec![plan(id::AUDIT_LOG_USED, "R", vec![], Objects::Trail)]
        }
        // Login, logout, password: the account events are the messages; a
        // refused request (401/403) is a Security Alert.
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
            .with_attribute(("EventOutcomeIndicator", outcome_indicator(outcome)))
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
        let user = s(e, "username")
            .or_else(|| s(e, "user"))
            .or_else(|| s(e, "actor").filter(|a| *a != "cli"));
        let device = s(e, "ae").or_else(|| s(e, "calling_ae"));
        let cli = s(e, "actor") == Some("cli") || device == Some("IMPORT");
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
