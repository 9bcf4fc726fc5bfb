//! The device allowlist over HTTPS (admin permission): the same settings,
//! checks ([`DeviceSettings`]) and events (`device.added`,
//! `device.updated`, `device.removed` with the web user as `actor`) as
//! `bastion device add|update|remove|list`.
//!
//! A device object is `bastion device list --json`'s — `ae`, `network`,
//! `transport`, `allow` (names), `cert_sha256`, `host`, `port`,
//! `on_conflict`, `move_destinations`, `inventory` (null before the device
//! was seen) — plus `plaintext` (transport `plain`) and `last_rejected`
//! (`{"at", "reason", "address"}` of its most recent refusal, or null; see
//! [`bastion_security::inventory::Rejection`]). The `inventory` object
//! carries the identifying headers both flattened (`manufacturer`,
//! `model`, `software_versions`, `serial_number`, `station_name`) and, as
//! in the CLI, under `headers`, with `transport`, `first_seen`,
//! `last_seen` and `history`.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Path, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Extension, Json,
};
use bastion_model::{AeTitle, Transport, WebPermission};
use bastion_security::{
    db::SecurityDb,
    devices::{Device, DeviceRegistry, DeviceSettings},
    events::Outcome,
    inventory::{self, DeviceRecord, Rejection},
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, context, json_body, nullable, security_error};
use crate::{audit::Note, auth::Caller, error::ApiError, AppState};

/// The body of `POST /api/devices` (`ae`, `network`, `transport`, `allow`
/// required) and `PUT /api/devices/{ae}` (all optional: only the fields
/// given change). `null` clears `cert_sha256`, `host` and `port`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceBody {
    /// AE title (POST; in a PUT it may repeat the path's, never change it).
    ae: Option<String>,
    /// CIDR network, e.g. `10.1.2.0/24`.
    network: Option<String>,
    /// `tls`, `mtls` or `plain`.
    transport: Option<String>,
    /// Subset of `echo`, `store`, `find`, `move`, `get`.
    allow: Option<Vec<String>>,
    /// Pinned SHA-256 of the device's DER certificate (hex).
    #[serde(default, deserialize_with = "nullable")]
    cert_sha256: Option<Option<String>>,
    /// Host for outbound associations (with `port`).
    #[serde(default, deserialize_with = "nullable")]
    host: Option<Option<String>>,
    /// Port for outbound associations (with `host`).
    #[serde(default, deserialize_with = "nullable")]
    port: Option<Option<u16>>,
    /// `refuse` (default) or `replace`.
    on_conflict: Option<String>,
    /// AE titles this device may name as C-MOVE destination.
    move_destinations: Option<Vec<String>>,
}

impl DeviceBody {
    fn settings(&self) -> DeviceSettings {
        DeviceSettings {
            network: self.network.clone(),
            transport: self.transport.clone(),
            allow: self.allow.clone(),
            cert_sha256: self.cert_sha256.clone().map(Option::unwrap_or_default),
            host: self.host.clone(),
            port: self.port,
            on_conflict: self.on_conflict.clone(),
            move_destinations: self.move_destinations.clone(),
        }
    }
}

/// `GET /api/devices`: every registered device as a device object, in AE
/// title order.
///
/// # Errors
/// 403 without the admin permission.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
) -> Result<Json<Vec<Value>>, ApiError> {
    note.action("devices.list");
    caller.require(WebPermission::Admin)?;
    let ctx = context(&state)?;
    let db = ctx.db.clone();
    let list = blocking(move || device_objects(&db, None))
        .await?
        .map_err(security_error)?;
    Ok(Json(list))
}

/// `GET /api/devices/unknown`: the addresses from which unregistered AE
/// titles tried to connect, most recent first: `[{"address", "ae_titles",
/// "attempts", "first_attempt", "last_attempt"}]` (as `bastion device list
/// --unknown --json`).
///
/// # Errors
/// 403 without the admin permission.
pub async fn unknown(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
) -> Result<Json<Vec<inventory::UnknownDevice>>, ApiError> {
    note.action("devices.unknown");
    caller.require(WebPermission::Admin)?;
    let ctx = context(&state)?;
    let db = ctx.db.clone();
    let list = blocking(move || inventory::list_unknown(&db))
        .await?
        .map_err(|e| security_error(e.into()))?;
    Ok(Json(list))
}

/// `POST /api/devices`: registers a device → 201 with its device object.
///
/// # Errors
/// 400 naming the missing or invalid field, 409 when the AE title is
/// registered, 415 for a non-JSON body.
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
    req: Request,
) -> Result<Response, ApiError> {
    note.action("devices.add");
    let (parts, body) = super::permitted(&caller, WebPermission::Admin, req).await?;
    let ctx = context(&state)?;
    let b: DeviceBody = json_body(&state, &parts, body).await?;
    let Some(ae) = b.ae.clone() else {
        return Err(ApiError::BadRequest("invalid ae: required".into()));
    };
    let (device, warnings) = b.settings().create(&ae).map_err(security_error)?;
    log_warnings(&device, &warnings);
    let db = ctx.db.clone();
    let d = device.clone();
    blocking(move || DeviceRegistry::new(&db).add(&d))
        .await?
        .map_err(security_error)?;
    state.archive().events().record(
        "device.added",
        Outcome::Success,
        json!({"actor": caller.identity.username, "peer": caller.peer_field(), "device": device.to_json()}),
    );
    let object = one(&ctx.db, device.ae).await?;
    Ok((StatusCode::CREATED, Json(object)).into_response())
}

/// `PUT /api/devices/{ae}`: changes the fields given → 200 with the device
/// object.
///
/// # Errors
/// 404 for an unknown AE title, 400 naming the invalid field (or an `ae`
/// that differs from the path's: remove and add instead), 415 for a
/// non-JSON body.
pub async fn update(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
    Path(ae): Path<String>,
    req: Request,
) -> Result<Json<Value>, ApiError> {
    note.action("devices.update");
    let (parts, body) = super::permitted(&caller, WebPermission::Admin, req).await?;
    let ctx = context(&state)?;
    let ae = path_ae(&ae)?;
    let b: DeviceBody = json_body(&state, &parts, body).await?;
    if let Some(other) = &b.ae {
        if AeTitle::parse(other).ok().as_ref() != Some(&ae) {
            return Err(ApiError::BadRequest(
                "invalid ae: an AE title cannot be changed; remove the device and add it again"
                    .into(),
            ));
        }
    }
    let settings = b.settings();
    let db = ctx.db.clone();
    let key = ae.clone();
    let (device, warnings) = blocking(move || {
        let reg = DeviceRegistry::new(&db);
        let Some(mut d) = reg.get(&key)? else {
            return Err(bastion_security::SecurityError::NoSuchDevice(
                key.to_string(),
            ));
        };
        let warnings = settings.apply(&mut d)?;
        reg.update(&d)?;
        Ok((d, warnings))
    })
    .await?
    .map_err(security_error)?;
    log_warnings(&device, &warnings);
    state.archive().events().record(
        "device.updated",
        Outcome::Success,
        json!({"actor": caller.identity.username, "peer": caller.peer_field(), "device": device.to_json()}),
    );
    Ok(Json(one(&ctx.db, ae).await?))
}

/// `DELETE /api/devices/{ae}`: removes a device → 204.
///
/// # Errors
/// 404 for an unknown AE title.
pub async fn remove(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
    Path(ae): Path<String>,
) -> Result<StatusCode, ApiError> {
    note.action("devices.remove");
    caller.require(WebPermission::Admin)?;
    let ctx = context(&state)?;
    let ae = path_ae(&ae)?;
    let db = ctx.db.clone();
    let key = ae.clone();
    blocking(move || DeviceRegistry::new(&db).remove(&key))
        .await?
        .map_err(security_error)?;
    state.archive().events().record(
        "device.removed",
        Outcome::Success,
        json!({"actor": caller.identity.username, "peer": caller.peer_field(), "ae": ae.as_str()}),
    );
    Ok(StatusCode::NO_CONTENT)
}

/// The AE title of a path (`/api/devices/{ae}`); an invalid one cannot be
/// registered, so it is a 404.
fn path_ae(raw: &str) -> Result<AeTitle, ApiError> {
    AeTitle::parse(raw).map_err(|_| ApiError::NotFound)
}

fn log_warnings(d: &Device, warnings: &[String]) {
    for w in warnings {
        tracing::warn!(ae = %d.ae, "device settings: {w}");
    }
}

/// The device object of `ae` (just written).
async fn one(db: &Arc<SecurityDb>, ae: AeTitle) -> Result<Value, ApiError> {
    let db = db.clone();
    blocking(move || device_objects(&db, Some(&ae)))
        .await?
        .map_err(security_error)?
        .into_iter()
        .next()
        .ok_or(ApiError::NotFound)
}

/// The device objects of every registered device, or of `only` that one.
pub(crate) fn device_objects(
    db: &SecurityDb,
    only: Option<&AeTitle>,
) -> bastion_security::Result<Vec<Value>> {
    let devices = match only {
        Some(ae) => DeviceRegistry::new(db).get(ae)?.into_iter().collect(),
        None => DeviceRegistry::new(db).list()?,
    };
    let mut records: HashMap<String, DeviceRecord> = inventory::list_devices(db)?
        .into_iter()
        .map(|r| (r.ae.clone(), r))
        .collect();
    let mut rejections = inventory::last_rejections(db)?;
    Ok(devices
        .iter()
        .map(|d| {
            device_object(
                d,
                records.remove(d.ae.as_str()),
                rejections.remove(d.ae.as_str()),
            )
        })
        .collect())
}

/// One device object (see the module documentation).
pub(crate) fn device_object(
    d: &Device,
    record: Option<DeviceRecord>,
    rejection: Option<Rejection>,
) -> Value {
    let mut j = d.to_json();
    j["inventory"] = record.map_or(Value::Null, |r| {
        let mut inv = serde_json::to_value(&r).unwrap_or(Value::Null);
        if let (Some(obj), Value::Object(headers)) = (
            inv.as_object_mut(),
            serde_json::to_value(&r.headers).unwrap_or(Value::Null),
        ) {
            obj.extend(headers);
        }
        inv
    });
    j["plaintext"] = Value::Bool(d.transport == Transport::Plain);
    j["last_rejected"] = rejection.map_or(
        Value::Null,
        |r| json!({"at": r.at, "reason": r.reason, "address": r.address}),
    );
    j
}
