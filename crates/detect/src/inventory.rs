//! The device inventory: what each registered device says it is, and which
//! unknown devices tried to connect.
//!
//! For every registered device the inventory keeps the identifying
//! attributes of the instances it stores — Manufacturer (0008,0070),
//! Manufacturer's Model Name (0008,1090), Software Versions (0018,1020),
//! Device Serial Number (0018,1000), Station Name (0008,1010) — with first
//! and last seen times, the transport its last association used (`tls`,
//! `mtls` when it presented a client certificate, `plain`) and the history
//! of every distinct set of values. When a known device reports a different
//! Manufacturer, model or Software Versions than before, the event
//! `device.software_changed` `{ae, field, old, new}` is recorded (a firmware
//! update, or someone impersonating the device).
//!
//! Unknown devices are listed by source address with the AE titles they
//! tried, the number of attempts and the last attempt, from the
//! `association.rejected` events (the inventory is an
//! [`EventObserver`]). For registered devices the most recent refusal is
//! kept ([`last_rejections`]): an association refused by the policy (wrong
//! network, transport, certificate or called AE title) or a DIMSE request
//! refused for a missing permission (`dimse.not_authorized`).
//!
//! Off the ingest hot path: [`Inventory::report_store`] compares in memory
//! and queues a database write only when a value changed or the device's
//! last-seen time is more than a minute old; one background thread writes
//! queued updates in one transaction (so a burst of rejected associations
//! costs one write, not one per attempt).
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use bastion_secdb::SecurityDb;
//! # use bastion_audit::events::EventLog;
//! # use bastion_detect::inventory::*;
//! # fn f(db: Arc<SecurityDb>, events: Arc<EventLog>) -> bastion_detect::Result<()> {
//! let inventory = Inventory::start(db.clone());
//! events.add_observer(inventory.clone());
//! let headers = DeviceHeaders { manufacturer: "ACME".into(), ..Default::default() };
//! inventory.report_store(&events, "CT1", &headers);
//! inventory.flush();
//! for d in list_devices(&db)? {
//!     println!("{} {} {}", d.ae, d.headers.manufacturer, d.history.len());
//! }
//! # Ok(()) }
//! ```

use crate::DbExt;
use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use rusqlite::{params, OptionalExtension};

use crate::{
    db::SecurityDb,
    events::{EventLog, EventObserver, Outcome},
    DetectError, Result,
};

/// A device's last-seen time is refreshed in the database at most this
/// often when nothing else changed.
pub const LAST_SEEN_RESOLUTION: Duration = Duration::from_secs(60);

/// Most source addresses kept in the unknown-device list; the oldest are
/// dropped beyond (a scan from a whole network must not fill the disk).
pub const MAX_UNKNOWN_ADDRESSES: usize = 10_000;

/// Most distinct AE titles kept per unknown address.
pub const MAX_AE_TITLES_PER_ADDRESS: usize = 32;

/// The identifying attributes of one stored instance (empty: absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceHeaders {
    /// Manufacturer (0008,0070).
    pub manufacturer: String,
    /// Manufacturer's Model Name (0008,1090).
    pub model: String,
    /// Software Versions (0018,1020), values joined by `\`.
    pub software_versions: String,
    /// Device Serial Number (0018,1000).
    pub serial_number: String,
    /// Station Name (0008,1010).
    pub station_name: String,
}

impl DeviceHeaders {
    /// The headers with every value clipped to 64 characters (LO) without
    /// control characters: they are peer-supplied text.
    pub fn sanitized(&self) -> DeviceHeaders {
        DeviceHeaders {
            manufacturer: clip(&self.manufacturer),
            model: clip(&self.model),
            software_versions: clip(&self.software_versions),
            serial_number: clip(&self.serial_number),
            station_name: clip(&self.station_name),
        }
    }

    /// Every field as (DICOM keyword, value), in a fixed order.
    fn fields(&self) -> [(&'static str, &str); 5] {
        [
            ("Manufacturer", &self.manufacturer),
            ("ManufacturerModelName", &self.model),
            ("SoftwareVersions", &self.software_versions),
            ("DeviceSerialNumber", &self.serial_number),
            ("StationName", &self.station_name),
        ]
    }

    fn fields_mut(&mut self) -> [&mut String; 5] {
        [
            &mut self.manufacturer,
            &mut self.model,
            &mut self.software_versions,
            &mut self.serial_number,
            &mut self.station_name,
        ]
    }

    fn is_empty(&self) -> bool {
        self.fields().iter().all(|(_, v)| v.is_empty())
    }
}

/// One registered device's inventory entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceRecord {
    /// AE title.
    pub ae: String,
    /// The latest known values (a value absent from later instances is kept).
    pub headers: DeviceHeaders,
    /// Transport of the last accepted association: `tls`, `mtls`, `plain`.
    pub transport: Option<String>,
    /// First time the device was seen (association or stored instance), RFC 3339.
    pub first_seen: String,
    /// Last time it was seen (at most [`LAST_SEEN_RESOLUTION`] old while it is active), RFC 3339.
    pub last_seen: String,
    /// Every distinct set of values reported, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// One entry of a device's history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryEntry {
    /// When these values were first reported, RFC 3339.
    pub at: String,
    /// The values.
    #[serde(flatten)]
    pub headers: DeviceHeaders,
}

/// An address from which an unregistered AE title tried to associate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnknownDevice {
    /// Source IP address.
    pub address: String,
    /// Calling AE titles tried (at most [`MAX_AE_TITLES_PER_ADDRESS`]).
    pub ae_titles: Vec<String>,
    /// Number of rejected attempts.
    pub attempts: u64,
    /// First attempt, RFC 3339.
    pub first_attempt: String,
    /// Last attempt, RFC 3339.
    pub last_attempt: String,
}

/// A registered device's most recent refusal ([`last_rejections`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    /// When, RFC 3339.
    pub at: String,
    /// Why: the policy's refusal code (`address_outside_network`,
    /// `wrong_transport`, `certificate_required`, `certificate_not_trusted`,
    /// `certificate_for_another_device`, `called_ae_not_ours`), or
    /// `permission_denied:<permission>` for a DIMSE request the device may
    /// not make (e.g. `permission_denied:store`).
    pub reason: String,
    /// The source IP address.
    pub address: String,
}

/// The live inventory: an in-memory view of each device plus a writer
/// thread. `Send + Sync`; share with `Arc`. Stops its thread when dropped
/// (after writing what was queued); while it observes an [`EventLog`] it is
/// never dropped, so call [`Inventory::flush`] before exiting.
pub struct Inventory {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Inventory {
    /// Starts the inventory over `db`. Register it with
    /// [`EventLog::add_observer`] to see associations (transport, unknown
    /// devices).
    pub fn start(db: Arc<SecurityDb>) -> Arc<Inventory> {
        let shared = Arc::new(Shared {
            db,
            cache: Mutex::new(HashMap::new()),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            done: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("inventory".into())
            .spawn(move || writer(&s))
            .map_err(|e| tracing::error!(error = %e, "cannot start the inventory thread"))
            .ok();
        Arc::new(Inventory {
            shared,
            thread: Mutex::new(thread),
        })
    }

    /// Reports the headers of an instance `ae` stored. Unregistered AE titles
    /// (e.g. `IMPORT`, `DICOMWEB`) are ignored. Empty values are "not
    /// reported" and never replace a known value. A changed Manufacturer,
    /// model or Software Versions is recorded in `events` as
    /// `device.software_changed`.
    pub fn report_store(&self, events: &EventLog, ae: &str, headers: &DeviceHeaders) {
        let headers = headers.sanitized();
        if headers.is_empty() {
            self.touch(ae, None);
            return;
        }
        let now = Instant::now();
        let mut changes: Vec<(&'static str, String, String)> = Vec::new();
        {
            let mut cache = self.shared.cache.lock().unwrap_or_else(|p| p.into_inner());
            let Some(entry) = self.shared.cached(&mut cache, ae, now) else {
                return;
            };
            let mut merged = entry.headers.clone();
            for ((name, new), slot) in headers.fields().into_iter().zip(merged.fields_mut()) {
                if !new.is_empty() && new != slot.as_str() {
                    changes.push((name, slot.clone(), new.to_owned()));
                    *slot = new.to_owned();
                }
            }
            let stale = entry
                .written
                .is_none_or(|w| now.duration_since(w) >= LAST_SEEN_RESOLUTION);
            if changes.is_empty() && !stale {
                return;
            }
            entry.headers = merged.clone();
            entry.written = Some(now);
            self.shared.push(Op::Seen {
                ae: ae.to_owned(),
                at_ms: now_ms(),
                headers: Some(merged),
                new_values: !changes.is_empty(),
                transport: None,
            });
        }
        for (field, old, new) in changes {
            let watched = matches!(
                field,
                "Manufacturer" | "ManufacturerModelName" | "SoftwareVersions"
            );
            if watched && !old.is_empty() {
                tracing::warn!(ae, field, old = %old, new = %new, "a device reports different identifying headers than before");
                events.record(
                    "device.software_changed",
                    Outcome::Alert,
                    serde_json::json!({"ae": ae, "field": field, "old": old, "new": new}),
                );
            }
        }
    }

    /// Waits (at most 5 s) until every update queued so far is written.
    pub fn flush(&self) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        let target = q.queued;
        self.shared.wake.notify_one();
        let deadline = Instant::now() + Duration::from_secs(5);
        while q.written < target {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                tracing::warn!("inventory updates still queued after 5 s");
                return;
            };
            q = self
                .shared
                .done
                .wait_timeout(q, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// An accepted association: refreshes last-seen and the transport.
    fn touch(&self, ae: &str, transport: Option<&str>) {
        let now = Instant::now();
        let mut cache = self.shared.cache.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = self.shared.cached(&mut cache, ae, now) else {
            return;
        };
        let transport_changed = transport.is_some_and(|t| entry.transport.as_deref() != Some(t));
        let stale = entry
            .written
            .is_none_or(|w| now.duration_since(w) >= LAST_SEEN_RESOLUTION);
        if !transport_changed && !stale {
            return;
        }
        if let Some(t) = transport {
            entry.transport = Some(t.to_owned());
        }
        entry.written = Some(now);
        self.shared.push(Op::Seen {
            ae: ae.to_owned(),
            at_ms: now_ms(),
            headers: None,
            new_values: false,
            transport: transport.map(str::to_owned),
        });
    }
}

impl Drop for Inventory {
    fn drop(&mut self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl EventObserver for Inventory {
    fn observe(&self, event: &serde_json::Map<String, serde_json::Value>) {
        let s = |k: &str| event.get(k).and_then(serde_json::Value::as_str);
        match s("type") {
            Some("association.accepted") => {
                let Some(ae) = s("ae") else { return };
                let transport = match (s("listener"), event.get("certificate_sha256")) {
                    (Some("plain"), _) => "plain",
                    (_, Some(serde_json::Value::String(_))) => "mtls",
                    _ => "tls",
                };
                self.touch(ae, Some(transport));
            }
            Some("association.rejected") => {
                let (Some(ae), Some(peer), Some(reason)) =
                    (s("calling_ae"), s("peer"), s("reason"))
                else {
                    return;
                };
                let at_ms = now_ms();
                // Any refusal but an unknown calling AE may concern a
                // registered device: the writer keeps it for registered
                // ones only.
                if reason != "unknown_calling_ae" {
                    self.shared.push(Op::Rejected {
                        ae: ae.to_owned(),
                        at_ms,
                        reason: reason.to_owned(),
                        address: host_of(peer).to_owned(),
                    });
                }
                // `called_ae_not_ours` is decided before the calling AE is
                // looked up: the writer checks the registry for those.
                let check = match reason {
                    "unknown_calling_ae" => false,
                    "called_ae_not_ours" => true,
                    _ => return,
                };
                self.shared.push(Op::Unknown {
                    address: peer.to_owned(),
                    ae: ae.to_owned(),
                    at_ms,
                    check_registered: check,
                });
            }
            Some("dimse.not_authorized") => {
                let (Some(ae), Some(peer), Some(permission)) =
                    (s("ae"), s("peer"), s("permission"))
                else {
                    return;
                };
                self.shared.push(Op::Rejected {
                    ae: ae.to_owned(),
                    at_ms: now_ms(),
                    reason: format!("permission_denied:{permission}"),
                    address: host_of(peer).to_owned(),
                });
            }
            _ => {}
        }
    }
}

/// Every registered device with its inventory entry (`None` before it was
/// seen), in AE title order.
///
/// # Errors
/// [`DetectError::Db`].
pub fn list_devices(db: &SecurityDb) -> Result<Vec<DeviceRecord>> {
    db.with(|c| {
        let dberr = |op| move |source| DetectError::Db { op, source };
        let mut stmt = c
            .prepare(
                "SELECT ae, manufacturer, model, software_versions, serial_number, station_name,
                        transport, first_seen_ms, last_seen_ms
                 FROM device_inventory ORDER BY ae",
            )
            .map_err(dberr("read inventory"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(DeviceRecord {
                    ae: r.get(0)?,
                    headers: DeviceHeaders {
                        manufacturer: r.get(1)?,
                        model: r.get(2)?,
                        software_versions: r.get(3)?,
                        serial_number: r.get(4)?,
                        station_name: r.get(5)?,
                    },
                    transport: r.get(6)?,
                    first_seen: rfc3339(r.get(7)?),
                    last_seen: rfc3339(r.get(8)?),
                    history: Vec::new(),
                })
            })
            .map_err(dberr("read inventory"))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(dberr("read inventory"))?;
        let mut hist = c
            .prepare(
                "SELECT at_ms, manufacturer, model, software_versions, serial_number, station_name
                 FROM device_inventory_history WHERE ae = ?1 ORDER BY id",
            )
            .map_err(dberr("read inventory history"))?;
        let mut out = Vec::with_capacity(rows.len());
        for mut d in rows {
            d.history = hist
                .query_map([&d.ae], |r| {
                    Ok(HistoryEntry {
                        at: rfc3339(r.get(0)?),
                        headers: DeviceHeaders {
                            manufacturer: r.get(1)?,
                            model: r.get(2)?,
                            software_versions: r.get(3)?,
                            serial_number: r.get(4)?,
                            station_name: r.get(5)?,
                        },
                    })
                })
                .map_err(dberr("read inventory history"))?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(dberr("read inventory history"))?;
            out.push(d);
        }
        Ok(out)
    })
}

/// Addresses from which unregistered AE titles tried to connect, most
/// recent first.
///
/// # Errors
/// [`DetectError::Db`].
pub fn list_unknown(db: &SecurityDb) -> Result<Vec<UnknownDevice>> {
    db.with(|c| {
        let dberr = |source| DetectError::Db {
            op: "read unknown devices",
            source,
        };
        let mut stmt = c
            .prepare(
                "SELECT address, ae_titles, attempts, first_ms, last_ms FROM unknown_devices
                 ORDER BY last_ms DESC, address",
            )
            .map_err(dberr)?;
        let rows = stmt
            .query_map([], |r| {
                let aes: String = r.get(1)?;
                Ok(UnknownDevice {
                    address: r.get(0)?,
                    ae_titles: split_aes(&aes),
                    attempts: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                    first_attempt: rfc3339(r.get(3)?),
                    last_attempt: rfc3339(r.get(4)?),
                })
            })
            .map_err(dberr)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(dberr)?;
        Ok(rows)
    })
}

/// The most recent refusal of each registered device that had one, by AE
/// title (one indexed read of a table with at most one row per device).
///
/// # Errors
/// [`DetectError::Db`].
pub fn last_rejections(db: &SecurityDb) -> Result<HashMap<String, Rejection>> {
    db.with(|c| {
        let dberr = |source| DetectError::Db {
            op: "read device rejections",
            source,
        };
        let mut stmt = c
            .prepare(
                "SELECT r.ae, r.at_ms, r.reason, r.address FROM device_rejections r
                 JOIN devices d ON d.ae = r.ae",
            )
            .map_err(dberr)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Rejection {
                        at: rfc3339(r.get(1)?),
                        reason: r.get(2)?,
                        address: r.get(3)?,
                    },
                ))
            })
            .map_err(dberr)?
            .collect::<rusqlite::Result<HashMap<_, _>>>()
            .map_err(dberr)?;
        Ok(rows)
    })
}

// ---------------------------------------------------------------------------

struct Shared {
    db: Arc<SecurityDb>,
    cache: Mutex<HashMap<String, CacheEntry>>,
    queue: Mutex<Queue>,
    wake: Condvar,
    done: Condvar,
}

/// What the process knows of one AE title.
struct CacheEntry {
    /// Whether the AE title is a registered device (rechecked every
    /// [`LAST_SEEN_RESOLUTION`] when not).
    registered: bool,
    loaded: Instant,
    headers: DeviceHeaders,
    transport: Option<String>,
    /// When a database write was last queued for it.
    written: Option<Instant>,
}

#[derive(Default)]
struct Queue {
    ops: Vec<Op>,
    /// Unknown attempts coalesced per address: (AE titles, attempts, first, last).
    unknown: HashMap<String, Attempts>,
    /// The latest refusal per calling AE title (at most
    /// [`MAX_UNKNOWN_ADDRESSES`] titles per write): (time, reason, address).
    rejected: HashMap<String, (i64, String, String)>,
    queued: u64,
    written: u64,
    stop: bool,
    dropped: u64,
}

struct Attempts {
    aes: BTreeSet<String>,
    check: BTreeSet<String>,
    count: u64,
    first_ms: i64,
    last_ms: i64,
}

enum Op {
    Seen {
        ae: String,
        at_ms: i64,
        headers: Option<DeviceHeaders>,
        new_values: bool,
        transport: Option<String>,
    },
    Unknown {
        address: String,
        ae: String,
        at_ms: i64,
        check_registered: bool,
    },
    Rejected {
        ae: String,
        at_ms: i64,
        reason: String,
        address: String,
    },
}

impl Shared {
    /// The cache entry of a registered `ae`, loading it from the database on
    /// first use; `None` for an unregistered AE title.
    fn cached<'a>(
        &self,
        cache: &'a mut HashMap<String, CacheEntry>,
        ae: &str,
        now: Instant,
    ) -> Option<&'a mut CacheEntry> {
        let fresh = cache
            .get(ae)
            .is_some_and(|e| e.registered || now.duration_since(e.loaded) < LAST_SEEN_RESOLUTION);
        if !fresh {
            let entry = match self.load(ae) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the device inventory");
                    return None;
                }
            };
            if cache.len() > 4 * MAX_UNKNOWN_ADDRESSES {
                cache.retain(|_, e| e.registered);
            }
            cache.insert(ae.to_owned(), entry);
        }
        cache.get_mut(ae).filter(|e| e.registered)
    }

    fn load(&self, ae: &str) -> Result<CacheEntry> {
        self.db.with(|c| {
            let dberr = |source| DetectError::Db {
                op: "read inventory",
                source,
            };
            let registered = c
                .query_row("SELECT 1 FROM devices WHERE ae = ?1", [ae], |_| Ok(()))
                .optional()
                .map_err(dberr)?
                .is_some();
            let row = c
                .query_row(
                    "SELECT manufacturer, model, software_versions, serial_number, station_name, transport
                     FROM device_inventory WHERE ae = ?1",
                    [ae],
                    |r| {
                        Ok((
                            DeviceHeaders {
                                manufacturer: r.get(0)?,
                                model: r.get(1)?,
                                software_versions: r.get(2)?,
                                serial_number: r.get(3)?,
                                station_name: r.get(4)?,
                            },
                            r.get::<_, Option<String>>(5)?,
                        ))
                    },
                )
                .optional()
                .map_err(dberr)?;
            let (headers, transport) = row.unwrap_or_default();
            Ok(CacheEntry {
                registered,
                loaded: Instant::now(),
                headers,
                transport,
                written: None,
            })
        })
    }

    fn push(&self, op: Op) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.queued += 1;
        match op {
            Op::Unknown {
                address,
                ae,
                at_ms,
                check_registered,
            } => {
                if !q.unknown.contains_key(&address) && q.unknown.len() >= MAX_UNKNOWN_ADDRESSES {
                    q.dropped += 1;
                } else {
                    let a = q.unknown.entry(address).or_insert_with(|| Attempts {
                        aes: BTreeSet::new(),
                        check: BTreeSet::new(),
                        count: 0,
                        first_ms: at_ms,
                        last_ms: at_ms,
                    });
                    a.count += 1;
                    a.last_ms = at_ms;
                    if a.aes.len() < MAX_AE_TITLES_PER_ADDRESS {
                        if check_registered {
                            a.check.insert(ae.clone());
                        }
                        a.aes.insert(ae);
                    }
                }
            }
            Op::Rejected {
                ae,
                at_ms,
                reason,
                address,
            } => {
                if !q.rejected.contains_key(&ae) && q.rejected.len() >= MAX_UNKNOWN_ADDRESSES {
                    q.dropped += 1;
                } else {
                    q.rejected.insert(ae, (at_ms, reason, address));
                }
            }
            seen => q.ops.push(seen),
        }
        drop(q);
        self.wake.notify_one();
    }
}

fn writer(shared: &Shared) {
    loop {
        let (ops, unknown, rejected, upto, stop) = {
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            while q.ops.is_empty()
                && q.unknown.is_empty()
                && q.rejected.is_empty()
                && q.written == q.queued
                && !q.stop
            {
                q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.dropped > 0 {
                tracing::warn!(
                    dropped = q.dropped,
                    "unknown-device attempts from too many addresses at once; some were not listed"
                );
                q.dropped = 0;
            }
            (
                std::mem::take(&mut q.ops),
                std::mem::take(&mut q.unknown),
                std::mem::take(&mut q.rejected),
                q.queued,
                q.stop,
            )
        };
        if !ops.is_empty() || !unknown.is_empty() || !rejected.is_empty() {
            if let Err(e) = write(&shared.db, ops, unknown, rejected) {
                tracing::error!(error = %e, "cannot update the device inventory");
            }
        }
        {
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.written = upto;
            shared.done.notify_all();
            if stop && q.ops.is_empty() && q.unknown.is_empty() && q.rejected.is_empty() {
                return;
            }
        }
    }
}

fn write(
    db: &SecurityDb,
    ops: Vec<Op>,
    unknown: HashMap<String, Attempts>,
    rejected: HashMap<String, (i64, String, String)>,
) -> Result<()> {
    db.with(|c| {
        let dberr = |op| move |source| DetectError::Db { op, source };
        let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)
            .map_err(dberr("begin inventory update"))?;
        for op in ops {
            let Op::Seen {
                ae,
                at_ms,
                headers,
                new_values,
                transport,
            } = op
            else {
                continue;
            };
            tx.execute(
                "INSERT INTO device_inventory (ae, first_seen_ms, last_seen_ms) VALUES (?1, ?2, ?2)
                 ON CONFLICT(ae) DO UPDATE SET last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
                params![ae, at_ms],
            )
            .map_err(dberr("update inventory"))?;
            if let Some(t) = transport {
                tx.execute(
                    "UPDATE device_inventory SET transport = ?2 WHERE ae = ?1",
                    params![ae, t],
                )
                .map_err(dberr("update inventory"))?;
            }
            if let Some(h) = headers {
                tx.execute(
                    "UPDATE device_inventory SET manufacturer = ?2, model = ?3, software_versions = ?4,
                            serial_number = ?5, station_name = ?6 WHERE ae = ?1",
                    params![
                        ae,
                        h.manufacturer,
                        h.model,
                        h.software_versions,
                        h.serial_number,
                        h.station_name
                    ],
                )
                .map_err(dberr("update inventory"))?;
                if new_values {
                    tx.execute(
                        "INSERT INTO device_inventory_history
                            (ae, at_ms, manufacturer, model, software_versions, serial_number, station_name)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        params![
                            ae,
                            at_ms,
                            h.manufacturer,
                            h.model,
                            h.software_versions,
                            h.serial_number,
                            h.station_name
                        ],
                    )
                    .map_err(dberr("update inventory history"))?;
                }
            }
        }
        for (address, a) in unknown {
            let mut aes = a.aes;
            for ae in &a.check {
                let registered = tx
                    .query_row("SELECT 1 FROM devices WHERE ae = ?1", [ae], |_| Ok(()))
                    .optional()
                    .map_err(dberr("read devices"))?
                    .is_some();
                if registered {
                    aes.remove(ae);
                }
            }
            if aes.is_empty() {
                continue;
            }
            let old: Option<String> = tx
                .query_row(
                    "SELECT ae_titles FROM unknown_devices WHERE address = ?1",
                    [&address],
                    |r| r.get(0),
                )
                .optional()
                .map_err(dberr("read unknown devices"))?;
            let mut all: BTreeSet<String> = old.as_deref().map(split_aes).unwrap_or_default().into_iter().collect();
            for ae in aes {
                if all.len() >= MAX_AE_TITLES_PER_ADDRESS {
                    break;
                }
                all.insert(ae);
            }
            let joined = all.into_iter().collect::<Vec<_>>().join("\n");
            tx.execute(
                "INSERT INTO unknown_devices (address, ae_titles, attempts, first_ms, last_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(address) DO UPDATE SET ae_titles = excluded.ae_titles,
                     attempts = attempts + excluded.attempts, last_ms = max(last_ms, excluded.last_ms)",
                params![
                    address,
                    joined,
                    i64::try_from(a.count).unwrap_or(i64::MAX),
                    a.first_ms,
                    a.last_ms
                ],
            )
            .map_err(dberr("update unknown devices"))?;
        }
        for (ae, (at_ms, reason, address)) in rejected {
            tx.execute(
                "INSERT INTO device_rejections (ae, at_ms, reason, address)
                 SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM devices WHERE ae = ?1)
                 ON CONFLICT(ae) DO UPDATE SET at_ms = excluded.at_ms, reason = excluded.reason,
                     address = excluded.address WHERE excluded.at_ms >= at_ms",
                params![ae, at_ms, reason, address],
            )
            .map_err(dberr("update device rejections"))?;
        }
        tx.execute(
            "DELETE FROM unknown_devices WHERE address IN (
                SELECT address FROM unknown_devices ORDER BY last_ms DESC LIMIT -1 OFFSET ?1)",
            [i64::try_from(MAX_UNKNOWN_ADDRESSES).unwrap_or(i64::MAX)],
        )
        .map_err(dberr("prune unknown devices"))?;
        tx.commit().map_err(dberr("commit inventory update"))
    })
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

fn split_aes(s: &str) -> Vec<String> {
    s.split('\n')
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

/// At most 64 characters, no control characters.
fn clip(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect::<String>()
        .trim()
        .to_owned()
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX)
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (
        tempfile::TempDir,
        Arc<SecurityDb>,
        Arc<EventLog>,
        Arc<Inventory>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(SecurityDb::open(&dir.path().join("s.db"), &[7; 32]).expect("db"));
        db.with(|c| {
            c.execute(
                "INSERT INTO devices (ae, network, transport, allow, created_at, updated_at)
                 VALUES ('CT1', '127.0.0.1/32', 'tls', 'store', 'x', 'x')",
                [],
            )
            .map_err(|source| DetectError::Db { op: "t", source })
        })
        .expect("insert");
        let events = Arc::new(EventLog::open(&dir.path().join("e.log")).expect("log"));
        let inv = Inventory::start(db.clone());
        events.add_observer(inv.clone());
        (dir, db, events, inv)
    }

    fn headers(sw: &str) -> DeviceHeaders {
        DeviceHeaders {
            manufacturer: "ACME".into(),
            model: "Scan 9000".into(),
            software_versions: sw.into(),
            serial_number: "SN1".into(),
            station_name: "CT_ROOM_1".into(),
        }
    }

    fn changed_events(events: &EventLog) -> Vec<serde_json::Value> {
        events
            .read_all()
            .expect("read")
            .into_iter()
            .filter(|e| e["type"] == "device.software_changed")
            .collect()
    }

    #[test]
    fn software_change_is_recorded_with_history() {
        let (_d, db, events, inv) = setup();
        inv.report_store(&events, "CT1", &headers("1.0"));
        inv.report_store(&events, "CT1", &headers("1.0"));
        inv.report_store(
            &events,
            "CT1",
            &DeviceHeaders {
                software_versions: String::new(),
                ..headers("")
            },
        );
        assert!(changed_events(&events).is_empty());
        inv.report_store(&events, "CT1", &headers("2.0"));
        inv.flush();
        let list = list_devices(&db).expect("list");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].headers.software_versions, "2.0");
        assert_eq!(list[0].history.len(), 2);
        assert_eq!(list[0].history[0].headers.software_versions, "1.0");
        let ev = changed_events(&events);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0]["ae"], "CT1");
        assert_eq!(ev[0]["field"], "SoftwareVersions");
        assert_eq!(ev[0]["old"], "1.0");
        assert_eq!(ev[0]["new"], "2.0");
    }

    #[test]
    fn a_restart_still_sees_the_change() {
        let (_d, db, events, inv) = setup();
        inv.report_store(&events, "CT1", &headers("1.0"));
        inv.flush();
        drop(inv);
        let inv = Inventory::start(db.clone());
        inv.report_store(
            &events,
            "CT1",
            &DeviceHeaders {
                manufacturer: "Other".into(),
                ..headers("1.0")
            },
        );
        inv.flush();
        let ev = changed_events(&events);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0]["field"], "Manufacturer");
        assert_eq!(list_devices(&db).expect("list")[0].history.len(), 2);
    }

    #[test]
    fn unregistered_ae_titles_are_not_inventoried() {
        let (_d, db, events, inv) = setup();
        inv.report_store(&events, "IMPORT", &headers("1.0"));
        inv.flush();
        assert!(list_devices(&db).expect("list").is_empty());
    }

    #[test]
    fn unknown_devices_are_counted_per_address() {
        let (_d, db, events, inv) = setup();
        for ae in ["EVIL", "EVIL", "SCAN2"] {
            events.record(
                "association.rejected",
                Outcome::Refused,
                serde_json::json!({"calling_ae": ae, "called_ae": "BASTION", "peer": "10.0.0.9", "reason": "unknown_calling_ae"}),
            );
        }
        // a registered device calling the wrong AE title is not "unknown"
        events.record(
            "association.rejected",
            Outcome::Refused,
            serde_json::json!({"calling_ae": "CT1", "called_ae": "X", "peer": "10.0.0.8", "reason": "called_ae_not_ours"}),
        );
        events.record(
            "association.accepted",
            Outcome::Success,
            serde_json::json!({"ae": "CT1", "peer": "127.0.0.1:5", "listener": "tls", "certificate_sha256": "ab"}),
        );
        inv.flush();
        let unknown = list_unknown(&db).expect("unknown");
        assert_eq!(unknown.len(), 1, "{unknown:?}");
        assert_eq!(unknown[0].address, "10.0.0.9");
        assert_eq!(unknown[0].attempts, 3);
        assert_eq!(unknown[0].ae_titles, ["EVIL", "SCAN2"]);
        let devices = list_devices(&db).expect("list");
        assert_eq!(devices[0].transport.as_deref(), Some("mtls"));
    }

    #[test]
    fn a_registered_devices_last_refusal_is_kept() {
        let (_d, db, events, inv) = setup();
        let rejected = |ae: &str, peer: &str, reason: &str| {
            events.record(
                "association.rejected",
                Outcome::Refused,
                serde_json::json!({"calling_ae": ae, "called_ae": "BASTION", "peer": peer, "reason": reason}),
            );
        };
        rejected("CT1", "10.0.0.7", "address_outside_network");
        // unknown or unregistered callers are not devices' refusals
        rejected("EVIL", "10.0.0.9", "unknown_calling_ae");
        rejected("NOPE", "10.0.0.9", "wrong_transport");
        inv.flush();
        let r = last_rejections(&db).expect("read");
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r["CT1"].reason, "address_outside_network");
        assert_eq!(r["CT1"].address, "10.0.0.7");
        events.record(
            "dimse.not_authorized",
            Outcome::Refused,
            serde_json::json!({"ae": "CT1", "peer": "127.0.0.1:4000", "permission": "find"}),
        );
        inv.flush();
        let r = last_rejections(&db).expect("read");
        assert_eq!(r["CT1"].reason, "permission_denied:find");
        assert_eq!(r["CT1"].address, "127.0.0.1");
        assert!(r["CT1"].at.ends_with('Z'), "{}", r["CT1"].at);
        // (removing the device clears it: bastion-security's devices tests)
    }
}
