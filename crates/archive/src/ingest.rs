//! The one ingest pipeline for C-STORE and `bastion import` (DESIGN §4):
//! bound → parse → validate → sanitise → encrypt → durable blob → index
//! commit (grouped) → event. The caller acknowledges only after
//! [`Archive::ingest`] returned `Ok`.

use std::{
    io::Read,
    sync::{mpsc, Arc, Condvar, Mutex, OnceLock},
    time::Duration,
};

use bastion_audit::events::{EventLog, Outcome};
use bastion_detect::inventory::Inventory;
use bastion_index::{CommitOutcome, Index, NewInstance};
use bastion_model::Uid;
use bastion_store::{BlobId, BlobStore, Spooled, StoreError};

use crate::spill::{Spill, SpooledData};
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::Endianness;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{meta::FileMetaTableBuilder, InMemDicomObject};
use dicom_transfer_syntax_registry::{entries, TransferSyntaxRegistry};
use sha2::{Digest, Sha256};

use crate::{
    budget::{BudgetError, MemoryBudget, Reservation},
    scan::{self, Encoding, ScanLimits},
    ArchiveError, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME,
};

/// Configurable bounds of the pipeline (all sizes in bytes).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest dataset accepted (as received, before inflation).
    pub max_dataset_bytes: u64,
    /// Largest single element value.
    pub max_element_bytes: u64,
    /// Largest inflated size of a deflated dataset (deflate-bomb cap).
    pub max_inflated_bytes: u64,
    /// Deepest sequence nesting.
    pub max_sequence_depth: u32,
    /// Parses running at once (each holds one dataset's attributes).
    pub max_concurrent_parses: usize,
    /// Global memory budget for received datasets, request bodies and
    /// inflated datasets ([`crate::budget`]).
    pub memory_budget_bytes: u64,
    /// The most one association, request or ingest may hold of it.
    pub transfer_budget_bytes: u64,
    /// Disk budget for transfers spilled to the encrypted spool
    /// ([`crate::spill`]), all at once; one spill holds at most
    /// `max_dataset_bytes` of it.
    pub spool_budget_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_dataset_bytes: 1 << 30,
            max_element_bytes: 1 << 30,
            max_inflated_bytes: 1 << 30,
            max_sequence_depth: 16,
            max_concurrent_parses: 4,
            memory_budget_bytes: 384 << 20,
            transfer_budget_bytes: 256 << 20,
            spool_budget_bytes: 4 << 30,
        }
    }
}

/// What arrived.
#[derive(Debug)]
pub enum Received {
    /// A dataset from a C-STORE-RQ (PS3.7 §9.1.1): the bytes as received in
    /// the presentation context's transfer syntax, and the command's
    /// Affected SOP Class / Instance UIDs.
    Network {
        /// Dataset bytes, no preamble or meta.
        dataset: Vec<u8>,
        /// Negotiated transfer syntax UID.
        transfer_syntax: String,
        /// (0000,0002) Affected SOP Class UID.
        affected_sop_class: String,
        /// (0000,1000) Affected SOP Instance UID.
        affected_sop_instance: String,
    },
    /// A PS3.10 file (128-byte preamble, `DICM`, meta, dataset); a file that
    /// starts directly with `DICM` is accepted too.
    File(Vec<u8>),
    /// As [`Received::Network`], for a dataset too large for its share of
    /// the memory budget: it was spooled to disk, encrypted
    /// ([`bastion_store::Spool`]), and ingest reads it from there, holding
    /// only the attributes before Pixel Data and one spool segment in
    /// memory. A deflated transfer syntax cannot be spooled
    /// ([`ArchiveError::TooLarge`]).
    SpooledNetwork {
        /// Dataset bytes, no preamble or meta.
        dataset: SpooledData,
        /// Negotiated transfer syntax UID.
        transfer_syntax: String,
        /// (0000,0002) Affected SOP Class UID.
        affected_sop_class: String,
        /// (0000,1000) Affected SOP Instance UID.
        affected_sop_instance: String,
    },
    /// As [`Received::File`], spooled to disk (a large STOW-RS part).
    SpooledFile(SpooledData),
}

/// What to do when a different dataset arrives under a stored SOP Instance
/// UID (the sending device's registered policy; DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnConflict {
    /// Keep the stored instance; the new one is refused (C-STORE 0xA900,
    /// STOW-RS 409) and a `security.instance_conflict` alert raised.
    #[default]
    Refuse,
    /// Store the new one; the old one is kept for recovery and a
    /// `security.instance_replaced` alert raised.
    Replace,
}

impl From<OnConflict> for bastion_index::OnConflict {
    fn from(o: OnConflict) -> Self {
        match o {
            OnConflict::Refuse => bastion_index::OnConflict::Refuse,
            OnConflict::Replace => bastion_index::OnConflict::Replace,
        }
    }
}

/// Who sent it, for the index, the meta header and the event log.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Calling AE title, or `IMPORT` for the CLI.
    pub ae: String,
    /// Peer address or file path (never logged above debug for files).
    pub peer: String,
    /// What to do on a conflicting re-send.
    pub on_conflict: OnConflict,
}

/// A successful ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// A new instance was stored.
    Stored {
        /// Its SOP Instance UID.
        sop_instance_uid: Uid,
    },
    /// The identical dataset was stored before; nothing was written.
    Duplicate {
        /// Its SOP Instance UID.
        sop_instance_uid: Uid,
    },
    /// A different dataset replaced the stored one, which was kept for
    /// recovery (`--on-conflict replace`).
    Replaced {
        /// Its SOP Instance UID.
        sop_instance_uid: Uid,
    },
}

/// Counting semaphore bounding concurrent parses (std has none; tokio's
/// cannot be acquired from a blocking thread without a runtime handle).
struct Slots {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Slots {
    fn acquire(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.cv.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        SlotGuard(self)
    }
}

struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += 1;
        self.0.cv.notify_one();
    }
}

type CommitReply = mpsc::SyncSender<Result<CommitOutcome, ArchiveError>>;

/// The archive: blob store + index + event log behind one API. `Send +
/// Sync`; share it with `Arc`. Methods block (disk and CPU): call them from
/// `spawn_blocking` in async code.
pub struct Archive {
    store: Arc<BlobStore>,
    index: Arc<Index>,
    events: Arc<EventLog>,
    limits: Limits,
    budget: MemoryBudget,
    parses: Slots,
    /// `None` once the archive is being dropped (closes the channel so the
    /// group-commit thread ends).
    committer: Mutex<Option<mpsc::Sender<(NewInstance, CommitReply)>>>,
    /// Joined on drop: the thread holds a clone of the index, and a process
    /// that exits while that thread is still closing the SQLCipher
    /// connection races the C library's exit handlers (OpenSSL cleanup) —
    /// seen as "double free or corruption" at the end of `bastion import`.
    commit_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    inventory: OnceLock<Arc<Inventory>>,
    /// Where transfers too large for memory are spilled ([`crate::spill`]);
    /// unset: they are refused instead.
    spool_dir: OnceLock<std::path::PathBuf>,
    /// Disk budget of the spills (`spool_budget_bytes`, at most
    /// `max_dataset_bytes` each).
    spool_budget: MemoryBudget,
}

impl Archive {
    /// Assembles the archive and starts its group-commit thread.
    pub fn new(
        store: Arc<BlobStore>,
        index: Arc<Index>,
        events: Arc<EventLog>,
        limits: Limits,
    ) -> Archive {
        let (tx, rx) = mpsc::channel::<(NewInstance, CommitReply)>();
        let idx = index.clone();
        let commit_thread = std::thread::Builder::new()
            .name("index-commit".into())
            .spawn(move || group_commit(&idx, &rx))
            .ok();
        Archive {
            store,
            index,
            events,
            parses: Slots {
                free: Mutex::new(limits.max_concurrent_parses.max(1)),
                cv: Condvar::new(),
            },
            budget: MemoryBudget::new(limits.memory_budget_bytes, limits.transfer_budget_bytes),
            limits,
            committer: Mutex::new(Some(tx)),
            commit_thread: Mutex::new(commit_thread),
            inventory: OnceLock::new(),
            spool_dir: OnceLock::new(),
            spool_budget: MemoryBudget::new(limits.spool_budget_bytes, limits.max_dataset_bytes),
        }
    }

    /// Lets transfers that outgrow their memory share spill to encrypted,
    /// anonymous spool files in `dir` (set once, by `serve`; `DIR/spool/ingest`).
    pub fn set_spool_dir(&self, dir: std::path::PathBuf) {
        let _ = self.spool_dir.set(dir);
    }

    /// A new [`Spill`] for a transfer that no longer fits in memory, or
    /// `None` when spilling is not configured ([`Archive::set_spool_dir`])
    /// or its budget is 0 (`spool_budget_mib = 0` turns it off).
    ///
    /// # Errors
    /// [`ArchiveError::NoSpace`] or [`ArchiveError::Internal`] when the
    /// spool file cannot be created.
    pub fn spill(&self) -> Result<Option<Spill>, ArchiveError> {
        let Some(dir) = self.spool_dir.get() else {
            return Ok(None);
        };
        if self.spool_budget.total() == 0 {
            return Ok(None);
        }
        let spool = bastion_store::Spool::create(dir).map_err(|e| match e {
            StoreError::NoSpace { .. } => ArchiveError::NoSpace,
            other => ArchiveError::Internal(format!("ingest spool: {other}")),
        })?;
        Ok(Some(Spill::new(spool, self.spool_budget.transfer())))
    }

    /// Reports the device headers of every stored instance to `inventory`
    /// (set once, by `serve`).
    pub fn set_inventory(&self, inventory: Arc<Inventory>) {
        let _ = self.inventory.set(inventory);
    }

    /// The index, for the archive's own modules: the front ends and the
    /// CLI see only the archive's API, never an index type.
    pub(crate) fn index(&self) -> &Index {
        &self.index
    }

    /// The event log.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// The configured limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The global memory budget: front ends take one [`Reservation`] per
    /// association or request from it and grow it as they buffer.
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// Runs the pipeline. Returns only after the instance is durable and
    /// indexed (or known to be a duplicate).
    ///
    /// # Errors
    /// [`ArchiveError::NotDicom`] (unparseable), [`ArchiveError::InvalidDataset`]
    /// (missing or invalid UIDs), [`ArchiveError::Conflict`],
    /// [`ArchiveError::TooLarge`], [`ArchiveError::NoSpace`],
    /// [`ArchiveError::Internal`]. Nothing is visible after an error.
    pub fn ingest(&self, received: Received, origin: &Origin) -> Result<Ingested, ArchiveError> {
        self.ingest_reserved(received, origin, &mut self.budget.transfer())
    }

    /// [`Archive::ingest`] for a dataset whose bytes `reservation` already
    /// covers (the front end's association or request): the inflated form
    /// of a deflated dataset is reserved from it too, and inflation stops as
    /// soon as it cannot grow (deflate bomb: [`ArchiveError::TooLarge`] or
    /// [`ArchiveError::Busy`], nothing stored). The caller gives back what
    /// it reserved for the dataset; inflation gives back its own share.
    ///
    /// # Errors
    /// As [`Archive::ingest`], and [`ArchiveError::Busy`].
    pub fn ingest_reserved(
        &self,
        received: Received,
        origin: &Origin,
        reservation: &mut Reservation,
    ) -> Result<Ingested, ArchiveError> {
        let result = self.ingest_inner(received, origin, reservation);
        match &result {
            Ok(Ingested::Stored { sop_instance_uid }) => self.events.record(
                "store.stored",
                Outcome::Success,
                serde_json::json!({"ae": origin.ae, "peer": peer_for_log(origin), "sop_instance_uid": sop_instance_uid}),
            ),
            Ok(Ingested::Duplicate { sop_instance_uid }) => self.events.record(
                "store.duplicate",
                Outcome::Success,
                serde_json::json!({"ae": origin.ae, "peer": peer_for_log(origin), "sop_instance_uid": sop_instance_uid}),
            ),
            Ok(Ingested::Replaced { sop_instance_uid }) => self.events.record(
                "security.instance_replaced",
                Outcome::Alert,
                serde_json::json!({"ae": origin.ae, "peer": peer_for_log(origin), "sop_instance_uid": sop_instance_uid}),
            ),
            Err(ArchiveError::Conflict { sop_instance_uid }) => self.events.record(
                "security.instance_conflict",
                Outcome::Alert,
                serde_json::json!({"ae": origin.ae, "peer": peer_for_log(origin), "sop_instance_uid": sop_instance_uid,
                    "detail": "a different dataset was sent under a stored SOP Instance UID; refused"}),
            ),
            Err(e) => self.events.record(
                "store.refused",
                Outcome::Refused,
                serde_json::json!({"ae": origin.ae, "peer": peer_for_log(origin), "reason": e.to_string()}),
            ),
        }
        result
    }

    fn ingest_inner(
        &self,
        received: Received,
        origin: &Origin,
        reservation: &mut Reservation,
    ) -> Result<Ingested, ArchiveError> {
        let _slot = self.parses.acquire();
        let (dataset, ts_uid, affected, preamble_alert) = match received {
            Received::Network {
                dataset,
                transfer_syntax,
                affected_sop_class,
                affected_sop_instance,
            } => (
                DatasetBytes::Owned(dataset),
                transfer_syntax,
                Some((affected_sop_class, affected_sop_instance)),
                None,
            ),
            Received::File(bytes) => {
                let (offset, ts, alert) = Self::split_part10(&bytes)?;
                (DatasetBytes::Tail(bytes, offset), ts, None, alert)
            }
            Received::SpooledNetwork {
                dataset,
                transfer_syntax,
                affected_sop_class,
                affected_sop_instance,
            } => (
                DatasetBytes::Spooled(dataset, 0),
                transfer_syntax,
                Some((affected_sop_class, affected_sop_instance)),
                None,
            ),
            Received::SpooledFile(spooled) => {
                let (offset, ts, alert) = Self::split_spooled_part10(&spooled)?;
                (DatasetBytes::Spooled(spooled, offset), ts, None, alert)
            }
        };
        if dataset.len() > self.limits.max_dataset_bytes {
            return Err(ArchiveError::TooLarge {
                limit: self.limits.max_dataset_bytes,
            });
        }
        let ts_uid = ts_uid.trim_end_matches(['\0', ' ']).to_owned();
        let held_before = reservation.held();
        let parsed = match &dataset {
            DatasetBytes::Spooled(spooled, offset) => {
                Self::parse_spooled(&self.limits, spooled, *offset, &ts_uid, reservation)
            }
            other => Self::parse(&self.limits, other.as_slice(), &ts_uid, reservation),
        };
        // The inflated copy is gone: give its share back.
        reservation.shrink(reservation.held().saturating_sub(held_before));
        let (parsed, content_sha256) = parsed?;
        let attrs = crate::extract::extract(&parsed)?;
        let device = self
            .inventory
            .get()
            .map(|_| crate::extract::device_headers(&parsed));
        if let Some((class, instance)) = &affected {
            check_affected(class, instance, &attrs)?;
        }
        let sop = Uid::parse(&attrs.instance.sop_instance_uid)
            .map_err(|e| ArchiveError::InvalidDataset(e.to_string()))?;
        if let Some(kind) = preamble_alert {
            self.events.record(
                "security.preamble_executable",
                Outcome::Alert,
                serde_json::json!({"ae": origin.ae, "sop_instance_uid": sop, "header": kind,
                    "detail": "the 128-byte preamble held an executable header (CVE-2019-11687); it was zeroed"}),
            );
            tracing::warn!(ae = %origin.ae, sop_instance_uid = %sop, header = kind, "executable header in the Part 10 preamble zeroed (CVE-2019-11687)");
        }

        // Fast path: an identical re-send writes nothing; a refused conflict
        // costs no blob either. The commit below re-checks under the index
        // transaction, so concurrent senders cannot race past this.
        if let Some(existing) = self.index.find_instance(sop.as_str()).map_err(index_err)? {
            if existing.content_sha256 == content_sha256 {
                return Ok(Ingested::Duplicate {
                    sop_instance_uid: sop,
                });
            }
            if origin.on_conflict == OnConflict::Refuse {
                return Err(ArchiveError::Conflict {
                    sop_instance_uid: sop,
                });
            }
        }

        // The Part 10 header (zero preamble, DICM, regenerated meta) and the
        // dataset bytes are streamed into the store without concatenating.
        let header = part10_header(
            &ts_uid,
            &attrs.instance.sop_class_uid,
            sop.as_str(),
            &origin.ae,
        )?;
        let blob = match &dataset {
            DatasetBytes::Spooled(spooled, offset) => self
                .store
                .put_reader(&mut (&header[..]).chain(spooled.reader(*offset))),
            other => self
                .store
                .put_reader(&mut (&header[..]).chain(other.as_slice())),
        }
        .map_err(store_err)?;
        drop(dataset);
        let mut attrs = attrs;
        attrs.instance.transfer_syntax_uid = ts_uid;
        let record = NewInstance {
            patient: attrs.patient,
            study: attrs.study,
            series: attrs.series,
            instance: attrs.instance,
            blob_id: blob.id.as_str().to_owned(),
            key_id: blob.key_id.clone(),
            stored_size: blob.plaintext_len,
            stored_sha256: hex::encode(blob.sha256),
            content_sha256,
            source_ae: origin.ae.clone(),
            received_at: now(),
            on_conflict: origin.on_conflict.into(),
        };
        let outcome = self.commit(record);
        if let (
            Some(inventory),
            Some(device),
            Ok(CommitOutcome::Stored | CommitOutcome::Replaced { .. }),
        ) = (self.inventory.get(), &device, &outcome)
        {
            inventory.report_store(&self.events, &origin.ae, device);
        }
        match outcome {
            Ok(CommitOutcome::Stored) => Ok(Ingested::Stored {
                sop_instance_uid: sop,
            }),
            Ok(CommitOutcome::Replaced { .. }) => Ok(Ingested::Replaced {
                sop_instance_uid: sop,
            }),
            Ok(CommitOutcome::Duplicate { .. }) => {
                self.discard(&blob.id);
                Ok(Ingested::Duplicate {
                    sop_instance_uid: sop,
                })
            }
            Ok(CommitOutcome::HierarchyMismatch { reason }) => {
                self.discard(&blob.id);
                self.events.record(
                    "security.hierarchy_mismatch",
                    Outcome::Alert,
                    serde_json::json!({"ae": origin.ae, "peer": peer_for_log(origin), "sop_instance_uid": sop,
                        "detail": format!("{reason}; refused (it would move stored images under another study or patient)")}),
                );
                Err(ArchiveError::InvalidDataset(reason))
            }
            Ok(CommitOutcome::Conflict { .. }) => {
                self.discard(&blob.id);
                Err(ArchiveError::Conflict {
                    sop_instance_uid: sop,
                })
            }
            // The index database went away during the commit: its outcome
            // is unknown (the COMMIT may have been applied before the
            // connection broke), so the blob stays; the orphan sweep removes
            // it if no row references it. Deleting it could leave a committed
            // row without its blob.
            Err(e @ ArchiveError::StoreUnavailable(_)) => {
                tracing::warn!(blob = %blob.id.as_str(), "index commit outcome unknown: the blob is kept for the orphan sweep");
                Err(e)
            }
            Err(e) => {
                self.discard(&blob.id);
                Err(e)
            }
        }
    }

    fn discard(&self, id: &BlobId) {
        if let Err(e) = self.store.delete(id) {
            tracing::warn!(blob = %id.as_str(), error = %e, "could not delete an unreferenced blob; the orphan sweep will retry");
        }
    }

    fn commit(&self, record: NewInstance) -> Result<CommitOutcome, ArchiveError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.committer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .ok_or_else(|| ArchiveError::Internal("the index commit thread has stopped".into()))?
            .send((record, tx))
            .map_err(|_| ArchiveError::Internal("the index commit thread has stopped".into()))?;
        rx.recv()
            .map_err(|_| ArchiveError::Internal("the index commit thread has stopped".into()))?
    }

    /// The parse stage of [`Archive::ingest`] alone, with no store, index or
    /// event log: the Part 10 split (file meta, PS3.10 §7.1) of a
    /// [`Received::File`], the size limit, the bounds scan
    /// ([`crate::scan`]), inflation of a deflated dataset, the parse of the
    /// attributes before Pixel Data, the extraction of the indexed
    /// attributes and, for [`Received::Network`], the check against the
    /// C-STORE Affected SOP Class / Instance UIDs. Public for the
    /// `ingest_parse` fuzz target (`fuzz/`); ingest runs the same functions.
    ///
    /// # Errors
    /// As [`Archive::ingest`] for bad input: [`ArchiveError::NotDicom`],
    /// [`ArchiveError::InvalidDataset`], [`ArchiveError::TooLarge`].
    pub fn parse_received(
        received: &Received,
        limits: &Limits,
    ) -> Result<crate::extract::Extracted, ArchiveError> {
        // A budget of its own, as large as one transfer's share, bounds the
        // inflation as ingest's would.
        let budget = crate::budget::MemoryBudget::new(
            limits.transfer_budget_bytes,
            limits.transfer_budget_bytes,
        );
        let mut reservation = budget.transfer();
        let too_large = |len: u64| {
            if len > limits.max_dataset_bytes {
                Err(ArchiveError::TooLarge {
                    limit: limits.max_dataset_bytes,
                })
            } else {
                Ok(())
            }
        };
        let (parsed, affected) = match received {
            Received::Network {
                dataset,
                transfer_syntax,
                affected_sop_class,
                affected_sop_instance,
            } => {
                too_large(dataset.len() as u64)?;
                let ts = transfer_syntax.trim_end_matches(['\0', ' ']);
                let (parsed, _) = Self::parse(limits, dataset, ts, &mut reservation)?;
                (parsed, Some((affected_sop_class, affected_sop_instance)))
            }
            Received::File(bytes) => {
                let (offset, ts, _) = Self::split_part10(bytes)?;
                let raw = bytes.get(offset..).unwrap_or_default();
                too_large(raw.len() as u64)?;
                let ts = ts.trim_end_matches(['\0', ' ']);
                (Self::parse(limits, raw, ts, &mut reservation)?.0, None)
            }
            Received::SpooledNetwork {
                dataset,
                transfer_syntax,
                affected_sop_class,
                affected_sop_instance,
            } => {
                too_large(dataset.len())?;
                let ts = transfer_syntax.trim_end_matches(['\0', ' ']);
                let (parsed, _) = Self::parse_spooled(limits, dataset, 0, ts, &mut reservation)?;
                (parsed, Some((affected_sop_class, affected_sop_instance)))
            }
            Received::SpooledFile(spooled) => {
                let (offset, ts, _) = Self::split_spooled_part10(spooled)?;
                too_large(spooled.len().saturating_sub(offset))?;
                let ts = ts.trim_end_matches(['\0', ' ']);
                let parsed = Self::parse_spooled(limits, spooled, offset, ts, &mut reservation)?;
                (parsed.0, None)
            }
        };
        let attrs = crate::extract::extract(&parsed)?;
        if let Some((class, instance)) = affected {
            check_affected(class, instance, &attrs)?;
        }
        Ok(attrs)
    }

    /// Finds the meta header of a Part 10 file. Returns the dataset offset,
    /// the transfer syntax and, when the preamble held an executable header,
    /// its kind.
    fn split_part10(bytes: &[u8]) -> Result<(usize, String, Option<&'static str>), ArchiveError> {
        let dicm = if bytes.get(128..132) == Some(b"DICM") {
            128
        } else if bytes.get(0..4) == Some(b"DICM") {
            0
        } else {
            return Err(ArchiveError::NotDicom(
                "no DICM prefix at byte 128: not a DICOM Part 10 file".into(),
            ));
        };
        let alert = if dicm == 128 {
            executable_header(&bytes[..128])
        } else {
            None
        };
        let meta_start = dicm + 4;
        let meta_bytes = bytes.get(meta_start..).unwrap_or_default();
        let report = scan::scan(
            meta_bytes,
            Encoding {
                explicit_vr: true,
                little_endian: true,
            },
            ScanLimits {
                max_element_len: 64 * 1024,
                max_depth: 1,
            },
            Some(0x0002),
        )
        .map_err(|e| ArchiveError::NotDicom(format!("file meta information: {e}")))?;
        let meta_end = meta_start + report.end;
        let meta = dicom_object::meta::FileMetaTable::from_reader(&bytes[dicm..meta_end])
            .map_err(|e| ArchiveError::NotDicom(format!("file meta information: {e}")))?;
        Ok((meta_end, meta.transfer_syntax().to_owned(), alert))
    }

    /// [`Self::split_part10`] for a spooled file: the meta header is read
    /// from the first bytes (at most 1 MiB) of the spool.
    fn split_spooled_part10(
        spooled: &Spooled,
    ) -> Result<(u64, String, Option<&'static str>), ArchiveError> {
        let head_len = spooled.len().min(SPOOLED_HEAD_BYTES);
        let mut head = vec![0u8; head_len as usize];
        spooled.read_at(0, &mut head).map_err(|e| {
            ArchiveError::Internal(format!("the spooled dataset cannot be read: {e}"))
        })?;
        let (offset, ts, alert) = Self::split_part10(&head)?;
        Ok((offset as u64, ts, alert))
    }

    /// [`Self::parse`] for a spooled dataset: the same bounds scan, walked
    /// over the spool a header at a time; the attributes before Pixel Data
    /// read into memory under `reservation`; the content hash computed as
    /// the dataset streams through. Deflated transfer syntaxes are inflated
    /// in memory and so are refused here (one transfer's share is the most
    /// a deflated dataset may take).
    fn parse_spooled(
        limits: &Limits,
        spooled: &Spooled,
        base: u64,
        ts_uid: &str,
        reservation: &mut Reservation,
    ) -> Result<(InMemDicomObject, String), ArchiveError> {
        let ts = TransferSyntaxRegistry.get(ts_uid).ok_or_else(|| {
            ArchiveError::NotDicom(format!("unsupported transfer syntax {ts_uid}"))
        })?;
        if matches!(ts_uid, "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.4.95") {
            return Err(ArchiveError::TooLarge {
                limit: limits.transfer_budget_bytes,
            });
        }
        let enc = Encoding {
            explicit_vr: ts_uid != "1.2.840.10008.1.2",
            little_endian: ts.endianness() == Endianness::Little,
        };
        let unreadable = |e: std::io::Error| {
            ArchiveError::Internal(format!("the spooled dataset cannot be read: {e}"))
        };
        let len = usize::try_from(spooled.len().saturating_sub(base)).map_err(|_| {
            ArchiveError::TooLarge {
                limit: limits.max_dataset_bytes,
            }
        })?;
        let view = SpoolView {
            spooled,
            base,
            len,
            failure: std::cell::RefCell::new(None),
        };
        let report = scan::scan_source(
            &view,
            enc,
            ScanLimits {
                max_element_len: limits.max_element_bytes,
                max_depth: limits.max_sequence_depth,
            },
            None,
        );
        if let Some(e) = view.failure.borrow_mut().take() {
            return Err(unreadable(e));
        }
        let report =
            report.map_err(|e| ArchiveError::NotDicom(format!("malformed dataset: {e}")))?;
        let prefix_len = report.pixel_data_offset.unwrap_or(len);
        reservation.grow(prefix_len as u64).map_err(|e| match e {
            BudgetError::TransferLimit { limit } => ArchiveError::AttributesTooLarge { limit },
            BudgetError::Exhausted { limit } => ArchiveError::Busy { limit },
        })?;
        let parsed = (|| {
            let mut prefix = vec![0u8; prefix_len];
            spooled.read_at(base, &mut prefix).map_err(unreadable)?;
            let parse_ts = match (enc.explicit_vr, enc.little_endian) {
                (false, _) => entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
                (true, true) => entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
                (true, false) => entries::EXPLICIT_VR_BIG_ENDIAN.erased(),
            };
            InMemDicomObject::read_dataset_with_ts(&prefix[..], &parse_ts)
                .map_err(|e| ArchiveError::NotDicom(format!("dataset cannot be parsed: {e}")))
        })();
        reservation.shrink(prefix_len as u64);
        let obj = parsed?;
        // The content hash, as in `parse`: everything but the non-content
        // ranges, streamed a segment at a time.
        let mut hasher = Sha256::new();
        let mut reader = spooled.reader(base);
        let mut at = 0usize;
        let mut chunk = vec![0u8; bastion_store::spool::SPOOL_SEGMENT];
        let mut copy = |reader: &mut bastion_store::spool::SpoolReader<'_>,
                        n: usize,
                        keep: bool|
         -> Result<(), ArchiveError> {
            let mut left = n;
            while left > 0 {
                let take = left.min(chunk.len());
                reader.read_exact(&mut chunk[..take]).map_err(unreadable)?;
                if keep {
                    hasher.update(&chunk[..take]);
                }
                left -= take;
            }
            Ok(())
        };
        for &(start, end) in &report.non_content {
            copy(&mut reader, start.saturating_sub(at), true)?;
            copy(&mut reader, end.saturating_sub(start), false)?;
            at = end;
        }
        copy(&mut reader, len.saturating_sub(at), true)?;
        Ok((obj, hex::encode(hasher.finalize())))
    }

    /// Bounds-checks then parses the attributes before Pixel Data. Also
    /// returns the content hash used to tell an identical re-send from a
    /// conflicting one: SHA-256 of the (inflated) dataset bytes without
    /// group lengths and trailing padding, which senders drop or add freely.
    fn parse(
        limits: &Limits,
        raw: &[u8],
        ts_uid: &str,
        reservation: &mut Reservation,
    ) -> Result<(InMemDicomObject, String), ArchiveError> {
        let ts = TransferSyntaxRegistry.get(ts_uid).ok_or_else(|| {
            ArchiveError::NotDicom(format!("unsupported transfer syntax {ts_uid}"))
        })?;
        let deflated = matches!(ts_uid, "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.4.95");
        let inflated;
        let (buf, enc) = if deflated {
            // PS3.5 Annex A.5: the dataset is raw deflate of explicit VR LE.
            inflated = inflate(raw, limits.max_inflated_bytes, reservation)?;
            (
                &inflated[..],
                Encoding {
                    explicit_vr: true,
                    little_endian: true,
                },
            )
        } else {
            let enc = Encoding {
                explicit_vr: ts_uid != "1.2.840.10008.1.2",
                little_endian: ts.endianness() == Endianness::Little,
            };
            (raw, enc)
        };
        let report = scan::scan(
            buf,
            enc,
            ScanLimits {
                max_element_len: limits.max_element_bytes,
                max_depth: limits.max_sequence_depth,
            },
            None,
        )
        .map_err(|e| ArchiveError::NotDicom(format!("malformed dataset: {e}")))?;
        let prefix = &buf[..report.pixel_data_offset.unwrap_or(buf.len())];
        let parse_ts = match (enc.explicit_vr, enc.little_endian) {
            (false, _) => entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
            (true, true) => entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
            (true, false) => entries::EXPLICIT_VR_BIG_ENDIAN.erased(),
        };
        let obj = InMemDicomObject::read_dataset_with_ts(prefix, &parse_ts)
            .map_err(|e| ArchiveError::NotDicom(format!("dataset cannot be parsed: {e}")))?;
        let mut hasher = Sha256::new();
        let mut at = 0;
        for &(start, end) in &report.non_content {
            hasher.update(&buf[at..start]);
            at = end;
        }
        hasher.update(&buf[at..]);
        Ok((obj, hex::encode(hasher.finalize())))
    }

    /// Decrypts a stored instance as a Part 10 file (zero preamble, `DICM`,
    /// regenerated meta, the dataset bytes as received).
    ///
    /// # Errors
    /// [`ArchiveError::NotFound`] for an unknown UID; store errors otherwise.
    pub fn instance_part10(&self, sop_instance_uid: &Uid) -> Result<Vec<u8>, ArchiveError> {
        let mut stream = self.open_instance(sop_instance_uid)?;
        let mut bytes =
            Vec::with_capacity(usize::try_from(stream.len()).unwrap_or(0).min(MAX_PREALLOC));
        while let Some(chunk) = stream.next_chunk()? {
            bytes.extend_from_slice(chunk);
        }
        Ok(bytes)
    }

    /// Opens a stored instance for reading as a stream of its Part 10 bytes
    /// ([`InstanceStream::next_chunk`]), one decrypted blob segment at a
    /// time: a retrieval of any size holds one segment (64 KiB), never the
    /// whole instance. Every segment is authenticated before it is handed
    /// out; one that fails is tampering or corruption of patient data and
    /// raises the `security.blob_auth_failed` alert.
    ///
    /// # Errors
    /// [`ArchiveError::NotFound`] for an unknown UID; store errors otherwise.
    pub fn open_instance(&self, sop_instance_uid: &Uid) -> Result<InstanceStream, ArchiveError> {
        let found = self
            .index
            .find_instance(sop_instance_uid.as_str())
            .map_err(index_err)?
            .ok_or_else(|| ArchiveError::NotFound(sop_instance_uid.to_string()))?;
        let id = BlobId::parse(&found.blob_id).map_err(store_err)?;
        let reader = match self.store.open_blob(&id) {
            Ok(r) => r,
            Err(e) => {
                if let StoreError::Corrupt { reason, .. } = &e {
                    self.blob_auth_failed(sop_instance_uid, &id, reason);
                }
                return Err(store_err(e));
            }
        };
        // A blob bound to its id (store format 2) is exactly what was stored
        // under the id this (authenticated, SQLCipher) index row names, so the
        // SHA-256 recheck, a quarter of the CPU of a retrieval, is only needed
        // for format 1 blobs, which a swapped file could otherwise pass.
        let hasher = (!reader.bound_to_id()).then(Sha256::new);
        Ok(InstanceStream {
            events: self.events.clone(),
            uid: sop_instance_uid.clone(),
            id,
            reader,
            hasher,
            expected_sha256: found.stored_sha256,
            len: found.stored_size,
        })
    }

    /// Logs and records (`blob.auth_failed`) a stored blob that failed
    /// authentication on read; the detection rules raise a high-severity
    /// alert from the event.
    fn blob_auth_failed(&self, sop_instance_uid: &Uid, id: &BlobId, reason: &str) {
        blob_auth_failed(&self.events, sop_instance_uid, id, reason);
    }

    /// Deletes published blobs that no index row references and that are
    /// older than `min_age` (a crash between blob publish and index commit
    /// leaves one; the age guard protects an ingest in flight in another
    /// process). Also clears stale temporary files. Returns how many blobs
    /// were removed.
    ///
    /// # Errors
    /// Store or index failures.
    pub fn sweep_orphans(&self, min_age: Duration) -> Result<usize, ArchiveError> {
        self.store.sweep_tmp(min_age).map_err(store_err)?;
        let referenced = self.index.blob_ids().map_err(index_err)?;
        let now = std::time::SystemTime::now();
        let mut removed = 0;
        for (id, mtime) in self.store.list().map_err(store_err)? {
            let old = now
                .duration_since(mtime)
                .map(|age| age >= min_age)
                .unwrap_or(false);
            if old && !referenced.contains(id.as_str()) {
                self.store.delete(&id).map_err(store_err)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

enum DatasetBytes {
    Owned(Vec<u8>),
    Tail(Vec<u8>, usize),
    /// A spooled dataset from this byte offset on (after a file's meta).
    Spooled(SpooledData, u64),
}

impl DatasetBytes {
    /// The bytes in memory; empty for a spooled dataset (read it through
    /// the spool instead).
    fn as_slice(&self) -> &[u8] {
        match self {
            DatasetBytes::Owned(v) => v,
            DatasetBytes::Tail(v, off) => v.get(*off..).unwrap_or_default(),
            DatasetBytes::Spooled(..) => &[],
        }
    }

    fn len(&self) -> u64 {
        match self {
            DatasetBytes::Spooled(s, off) => s.len().saturating_sub(*off),
            other => other.as_slice().len() as u64,
        }
    }
}

/// A spooled dataset seen by [`scan::scan_source`]: header bytes read one
/// by one from the spool; the first read failure is kept for the caller.
struct SpoolView<'a> {
    spooled: &'a Spooled,
    base: u64,
    len: usize,
    failure: std::cell::RefCell<Option<std::io::Error>>,
}

impl scan::ScanSource for SpoolView<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn read_at(&self, at: usize, out: &mut [u8]) -> bool {
        if at.saturating_add(out.len()) > self.len {
            return false;
        }
        match self.spooled.read_at(self.base + at as u64, out) {
            Ok(()) => true,
            Err(e) => {
                self.failure.borrow_mut().get_or_insert(e);
                false
            }
        }
    }
}

impl Drop for Archive {
    /// Closes the commit channel and waits for the group-commit thread to
    /// finish its last batch and release its index handle.
    fn drop(&mut self) {
        drop(
            self.committer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(t) = self
            .commit_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = t.join();
        }
    }
}

/// A stored instance being read ([`Archive::open_instance`]): its Part 10
/// bytes (zero preamble, `DICM`, meta, the dataset as received), one
/// authenticated, decrypted segment at a time.
pub struct InstanceStream {
    events: Arc<EventLog>,
    uid: Uid,
    id: BlobId,
    reader: bastion_store::BlobReader,
    /// For format-1 blobs only: the SHA-256 of what was handed out so far.
    hasher: Option<Sha256>,
    expected_sha256: String,
    len: u64,
}

impl InstanceStream {
    /// The instance's size in bytes, as recorded when it was stored.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the recorded size is 0 (never, for a stored instance).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next piece of the Part 10 bytes, `None` after the last.
    ///
    /// # Errors
    /// [`ArchiveError::Internal`] when a segment fails authentication (the
    /// `security.blob_auth_failed` alert is raised; nothing of that segment
    /// is handed out) or the blob cannot be read; the stream is over then.
    pub fn next_chunk(&mut self) -> Result<Option<&[u8]>, ArchiveError> {
        let segment = match self.reader.next_segment() {
            Ok(s) => s,
            Err(e) => {
                if let StoreError::Corrupt { reason, .. } = &e {
                    blob_auth_failed(&self.events, &self.uid, &self.id, reason);
                }
                return Err(store_err(e));
            }
        };
        match (segment, self.hasher.as_mut()) {
            (Some(bytes), Some(h)) => {
                h.update(bytes);
                Ok(Some(bytes))
            }
            (Some(bytes), None) => Ok(Some(bytes)),
            (None, Some(_)) => {
                let digest = self.hasher.take().map(|h| hex::encode(h.finalize()));
                if digest.as_deref() != Some(self.expected_sha256.as_str()) {
                    blob_auth_failed(
                        &self.events,
                        &self.uid,
                        &self.id,
                        "decrypted bytes do not match their recorded SHA-256",
                    );
                    return Err(ArchiveError::Internal(format!(
                        "instance {}: stored bytes do not match their recorded SHA-256",
                        self.uid
                    )));
                }
                Ok(None)
            }
            (None, None) => Ok(None),
        }
    }
}

/// Records a blob that failed authentication on read (tampering or
/// corruption of patient data): an error line and a `blob.auth_failed`
/// event, which the detector turns into an alert.
fn blob_auth_failed(events: &EventLog, sop_instance_uid: &Uid, id: &BlobId, reason: &str) {
    tracing::error!(
        sop_instance_uid = %sop_instance_uid, blob = id.as_str(), reason,
        "stored blob failed authentication: tampering or corruption; not served"
    );
    events.record(
        "blob.auth_failed",
        Outcome::Failure,
        serde_json::json!({
            "sop_instance_uid": sop_instance_uid.as_str(), "blob": id.as_str(), "reason": reason,
        }),
    );
}

fn group_commit(index: &Index, rx: &mpsc::Receiver<(NewInstance, CommitReply)>) {
    const MAX_BATCH: usize = 256;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (records, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        match index.commit_batch(&records) {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                let err = index_err(e);
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// PS3.10 §7.1: 128-byte zero preamble, `DICM`, File Meta Information
/// (group 0002, explicit VR LE). The dataset as received follows it.
pub(crate) fn part10_header(
    ts: &str,
    sop_class: &str,
    sop_instance: &str,
    source_ae: &str,
) -> Result<Vec<u8>, ArchiveError> {
    let mut builder = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_instance)
        .transfer_syntax(ts)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME);
    if !source_ae.is_empty() {
        builder = builder.source_application_entity_title(source_ae);
    }
    let meta = builder
        .build()
        .map_err(|e| ArchiveError::Internal(format!("file meta: {e}")))?;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&[0u8; 128]);
    out.extend_from_slice(b"DICM");
    meta.write(&mut out)
        .map_err(|e| ArchiveError::Internal(format!("file meta: {e}")))?;
    Ok(out)
}

/// Refuses a dataset whose SOP Class / Instance UIDs differ from the C-STORE
/// command's Affected SOP Class / Instance UIDs (PS3.7 §9.1.1; padding trimmed).
fn check_affected(
    class: &str,
    instance: &str,
    attrs: &crate::extract::Extracted,
) -> Result<(), ArchiveError> {
    if class.trim_end_matches(['\0', ' ']) != attrs.instance.sop_class_uid {
        return Err(ArchiveError::InvalidDataset(format!(
            "SOP Class UID in the dataset ({}) differs from the C-STORE Affected SOP Class UID",
            attrs.instance.sop_class_uid
        )));
    }
    if instance.trim_end_matches(['\0', ' ']) != attrs.instance.sop_instance_uid {
        return Err(ArchiveError::InvalidDataset(format!(
            "SOP Instance UID in the dataset ({}) differs from the C-STORE Affected SOP Instance UID",
            attrs.instance.sop_instance_uid
        )));
    }
    Ok(())
}

/// CVE-2019-11687: a preamble may hold a PE, ELF or Mach-O header, making
/// the file also an executable.
fn executable_header(preamble: &[u8]) -> Option<&'static str> {
    match preamble.get(0..4)? {
        [b'M', b'Z', ..] => Some("MZ (PE/DOS)"),
        [0x7F, b'E', b'L', b'F'] => Some("ELF"),
        [0xFE, 0xED, 0xFA, 0xCE | 0xCF]
        | [0xCE | 0xCF, 0xFA, 0xED, 0xFE]
        | [0xCA, 0xFE, 0xBA, 0xBE] => Some("Mach-O"),
        _ => None,
    }
}

fn peer_for_log(origin: &Origin) -> &str {
    if origin.ae == crate::IMPORT_AE {
        "file"
    } else {
        &origin.peer
    }
}

fn store_err(e: StoreError) -> ArchiveError {
    match e {
        StoreError::NoSpace { .. } => ArchiveError::NoSpace,
        e @ (StoreError::Unavailable { .. } | StoreError::Denied { .. }) => {
            tracing::error!(error = %e, "blob store unavailable: the operation failed, nothing acknowledged");
            ArchiveError::StoreUnavailable(e.to_string())
        }
        other => ArchiveError::Internal(other.to_string()),
    }
}

/// An index error as an archive error. An index database that cannot be
/// reached (PostgreSQL stopped, restarting, unreachable) is reported like an
/// unavailable blob store: nothing was acknowledged and retrying later may
/// succeed (C-STORE 0xA700, STOW-RS 503 with `Retry-After`), with an
/// operator log line naming the index database.
pub(crate) fn index_err(e: bastion_index::IndexError) -> ArchiveError {
    match e {
        bastion_index::IndexError::NoSpace => ArchiveError::NoSpace,
        e if e.is_unavailable() => {
            tracing::error!(error = %e, "index database unavailable: the operation failed, nothing acknowledged; retrying later may succeed");
            ArchiveError::StoreUnavailable(format!("index database: {e}"))
        }
        other => ArchiveError::Internal(other.to_string()),
    }
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[allow(dead_code)]
const _PIXEL: Tag = tags::PIXEL_DATA;

/// Inflates a raw-deflate stream (PS3.5 Annex A.5) chunk by chunk, growing
/// `reservation` before the output grows: a deflate bomb is stopped at
/// `max_inflated` bytes or as soon as the memory budget has no room, having
/// held at most that much, never its full inflated size.
///
/// # Errors
/// [`ArchiveError::NotDicom`] for a corrupt stream, [`ArchiveError::TooLarge`]
/// over `max_inflated` or the per-transfer budget, [`ArchiveError::Busy`]
/// when the global budget is in use.
pub fn inflate(
    deflated: &[u8],
    max_inflated: u64,
    reservation: &mut Reservation,
) -> Result<Vec<u8>, ArchiveError> {
    let mut decoder = flate2::read::DeflateDecoder::new(deflated);
    let mut out = Vec::new();
    let mut chunk = vec![0u8; INFLATE_CHUNK];
    loop {
        let n = match decoder.read(&mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(ArchiveError::NotDicom(format!(
                    "deflated dataset cannot be inflated: {e}"
                )))
            }
        };
        if (out.len() + n) as u64 > max_inflated {
            return Err(ArchiveError::TooLarge {
                limit: max_inflated,
            });
        }
        reservation
            .extend(&mut out, &chunk[..n])
            .map_err(budget_err)?;
    }
}

/// Bytes inflated per step.
const INFLATE_CHUNK: usize = 64 * 1024;

/// Most bytes of a spooled file read to find its meta header.
const SPOOLED_HEAD_BYTES: u64 = 1 << 20;

/// A reservation that could not grow, as an ingest error.
pub fn budget_err(e: BudgetError) -> ArchiveError {
    match e {
        BudgetError::TransferLimit { limit } => ArchiveError::TooLarge { limit },
        BudgetError::Exhausted { limit } => ArchiveError::Busy { limit },
    }
}

/// Most bytes reserved up front for a retrieved instance (its recorded size is
/// trusted only up to this; larger ones grow as they are decrypted).
const MAX_PREALLOC: usize = 256 << 20;
