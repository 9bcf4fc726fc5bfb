//! C-MOVE and C-GET service providers (PS3.4 §C.4.2, §C.4.3): the state of a
//! running retrieval, the producers that resolve and load the instances, and
//! the C-MOVE sub-operation task (a Storage SCU towards the destination).
//!
//! The association loop in [`crate::server`] owns a [`RunningRetrieve`] and
//! receives [`RetrieveMsg`]s from its producer over a bounded channel:
//!
//! - **C-MOVE**: a spawned task resolves the identifier, associates with the
//!   destination over its registered transport ([`crate::scu::StoreScu`]) and
//!   performs one C-STORE per instance, reporting each result; the loop sends
//!   a pending C-MOVE-RSP per result. The cancel flag is checked before each
//!   sub-operation, so a C-CANCEL-RQ stops new C-STOREs; the final response
//!   is sent when the task has ended, so no C-STORE follows it.
//! - **C-GET**: a blocking thread resolves and decrypts the instances one at a
//!   time; the loop itself sends each C-STORE-RQ on the requestor's
//!   association (only on a context with the instance's SOP class, its stored
//!   transfer syntax and the SCP role accepted, PS3.7 §D.3.3.4) and waits for
//!   its C-STORE-RSP before taking the next one.
//!
//! Final status (both): 0x0000 when every sub-operation completed, 0xB000
//! when some failed or had warnings, 0xA702 when all failed, 0xFE00 when a
//! cancel stopped it with sub-operations remaining; all but 0x0000 carry the
//! Failed SOP Instance UID List.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bastion_archive::{query::Query, transcode, Archive, ArchiveError};
use bastion_model::{AeTitle, Uid};
use tokio::sync::mpsc;

use crate::{
    command::SubOperations,
    scu::{Destination, ScuError, StoreRequest, StoreScu},
    status::{self, Status},
};

/// Messages buffered between a retrieval's producer and the association.
pub(crate) const RETRIEVE_CHANNEL: usize = 4;

/// Which retrieval runs.
#[derive(Debug, Clone)]
pub(crate) enum RetrieveKind {
    /// C-MOVE to this registered destination.
    Move {
        /// The destination device's AE title.
        destination: AeTitle,
    },
    /// C-GET on the requestor's association.
    Get,
}

/// Result of one sub-operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubOpOutcome {
    Completed,
    Warning,
    Failed,
}

impl SubOpOutcome {
    /// Classifies a C-STORE-RSP status (PS3.4 B.2.3): 0x0000 completed,
    /// 0x0001 and 0xBxxx warnings, anything else failed.
    pub(crate) fn of_store_status(code: u16) -> SubOpOutcome {
        match code {
            0x0000 => SubOpOutcome::Completed,
            0x0001 | 0xB000..=0xBFFF => SubOpOutcome::Warning,
            _ => SubOpOutcome::Failed,
        }
    }
}

/// What a retrieval's producer reports to the association loop.
pub(crate) enum RetrieveMsg {
    /// The identifier was resolved to these instances (in sub-operation
    /// order) in these studies. Always the first message unless `Refused`.
    Resolved {
        uids: Vec<String>,
        studies: Vec<String>,
    },
    /// The identifier could not be resolved: the final status, Error Comment
    /// and Offending Elements (no sub-operation was attempted).
    Refused(Status, String, Vec<dicom_core::Tag>),
    /// C-GET: the next instance to send, or why it cannot be read.
    Instance(Result<LoadedInstance, (String, String)>),
    /// C-MOVE: one sub-operation finished.
    SubOp { uid: String, outcome: SubOpOutcome },
    /// C-MOVE: the task stops early for this reason; sub-operations not
    /// reported are counted as failed (unless cancelled).
    Stopped(String),
}

/// An instance ready for a C-GET sub-operation.
pub(crate) struct LoadedInstance {
    pub sop_class: String,
    pub sop_instance: String,
    pub transfer_syntax: String,
    /// Dataset bytes as received (no preamble, no meta).
    pub dataset: Dataset,
}

/// A C-MOVE or C-GET in progress on one association.
pub(crate) struct RunningRetrieve {
    pub kind: RetrieveKind,
    pub message_id: u16,
    pub pc_id: u8,
    pub sop_class: String,
    /// Transfer syntax of the request's presentation context (for the Failed
    /// SOP Instance UID List identifier).
    pub transfer_syntax: String,
    pub model: &'static str,
    pub level: &'static str,
    /// Raised by a C-CANCEL-RQ or the end of the association.
    pub cancel: Arc<AtomicBool>,
    pub rx: mpsc::Receiver<RetrieveMsg>,
    /// Instances to send, once resolved.
    pub uids: Option<Vec<String>>,
    pub studies: Vec<String>,
    pub completed: usize,
    pub failed: usize,
    pub warning: usize,
    pub failed_uids: Vec<String>,
    /// Sub-operations whose result is known.
    pub done: BTreeSet<String>,
    /// C-GET: our C-STORE-RQ awaiting its C-STORE-RSP (Message ID, SOP
    /// Instance UID).
    pub awaiting: Option<(u16, String)>,
    /// Why the producer stopped early, if it did.
    pub stopped: Option<String>,
}

impl RunningRetrieve {
    /// A retrieval whose producer reports on `rx`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        kind: RetrieveKind,
        message_id: u16,
        pc_id: u8,
        sop_class: String,
        transfer_syntax: String,
        model: &'static str,
        level: &'static str,
        cancel: Arc<AtomicBool>,
        rx: mpsc::Receiver<RetrieveMsg>,
    ) -> RunningRetrieve {
        RunningRetrieve {
            kind,
            message_id,
            pc_id,
            sop_class,
            transfer_syntax,
            model,
            level,
            cancel,
            rx,
            uids: None,
            studies: Vec::new(),
            completed: 0,
            failed: 0,
            warning: 0,
            failed_uids: Vec::new(),
            done: BTreeSet::new(),
            awaiting: None,
            stopped: None,
        }
    }

    /// Whether this is a C-GET.
    pub(crate) fn is_get(&self) -> bool {
        matches!(self.kind, RetrieveKind::Get)
    }

    /// Sub-operations not finished.
    pub(crate) fn remaining(&self) -> usize {
        self.uids
            .as_ref()
            .map_or(0, |u| u.len().saturating_sub(self.done.len()))
    }

    /// Records the result of the sub-operation for `uid`.
    pub(crate) fn record(&mut self, uid: &str, outcome: SubOpOutcome) {
        if !self.done.insert(uid.to_owned()) {
            return;
        }
        match outcome {
            SubOpOutcome::Completed => self.completed += 1,
            SubOpOutcome::Warning => self.warning += 1,
            SubOpOutcome::Failed => {
                self.failed += 1;
                self.failed_uids.push(uid.to_owned());
            }
        }
    }

    /// Counts for a response; Remaining only when `with_remaining`.
    pub(crate) fn counts(&self, with_remaining: bool) -> SubOperations {
        let c = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
        SubOperations {
            remaining: with_remaining.then(|| c(self.remaining())),
            completed: c(self.completed),
            failed: c(self.failed),
            warning: c(self.warning),
        }
    }

    /// The producer has ended: decides the final status. Sub-operations never
    /// reported count as failed unless a cancel stopped them (they are then
    /// the Remaining of the 0xFE00 response). Returns the status and whether
    /// Remaining goes in the response.
    pub(crate) fn finish(&mut self) -> (Status, bool) {
        let cancelled = self.cancel.load(Ordering::Relaxed);
        if cancelled && self.remaining() > 0 {
            return (Status::CANCEL, true);
        }
        let unreported: Vec<String> = self
            .uids
            .iter()
            .flatten()
            .filter(|u| !self.done.contains(*u))
            .cloned()
            .collect();
        for u in unreported {
            self.record(&u, SubOpOutcome::Failed);
        }
        let total = self.uids.as_ref().map_or(0, Vec::len);
        let st = if total > 0 && self.failed == total {
            Status::UNABLE_TO_PERFORM_SUBOPERATIONS
        } else if self.failed > 0 || self.warning > 0 {
            Status::SUBOPERATIONS_WARNING
        } else {
            Status::SUCCESS
        };
        (st, false)
    }
}

/// The next message of the running retrieval; `None` when its producer has
/// ended (or, for a C-GET, when a cancel stops it before its next
/// sub-operation). Never ready while a C-GET awaits a C-STORE-RSP, nor when
/// no retrieval runs.
pub(crate) async fn next_message(r: &mut Option<RunningRetrieve>) -> Option<RetrieveMsg> {
    match r {
        Some(r) if r.awaiting.is_none() => {
            if r.is_get() && r.uids.is_some() && r.cancel.load(Ordering::Relaxed) {
                return None;
            }
            r.rx.recv().await
        }
        _ => std::future::pending().await,
    }
}

/// Resolves the identifier; sends `Resolved` or `Refused`.
fn resolve(
    archive: &Archive,
    query: &Query,
    max_matches: usize,
) -> Result<Vec<bastion_archive::InstanceRef>, RetrieveMsg> {
    archive.resolve_instances(query, max_matches).map_err(|e| {
        if !matches!(e, ArchiveError::TooManyMatches { .. }) {
            tracing::error!(error = %e, "cannot resolve a retrieve identifier");
        }
        let (st, comment, offending) = status::for_query_error(&e);
        RetrieveMsg::Refused(st, comment, offending)
    })
}

fn resolved_msg(instances: &[bastion_archive::InstanceRef]) -> RetrieveMsg {
    let studies: BTreeSet<String> = instances
        .iter()
        .map(|i| i.study_instance_uid.clone())
        .collect();
    RetrieveMsg::Resolved {
        uids: instances
            .iter()
            .map(|i| i.sop_instance_uid.clone())
            .collect(),
        studies: studies.into_iter().collect(),
    }
}

/// The dataset of a retrieved instance: in memory, or (an instance over
/// [`STREAM_ABOVE`]) streamed from the blob store in pieces, so a C-GET or
/// C-MOVE of a 1 GiB instance holds a few MiB, never the instance.
#[derive(Debug)]
pub(crate) enum Dataset {
    /// A dataset's bytes inside a buffer (a decrypted Part 10 file, kept
    /// whole so that a 500 KiB instance is not copied once more just to drop
    /// its meta).
    Whole { bytes: Vec<u8>, start: usize },
    /// `len` dataset bytes arriving as pieces of about [`STREAM_PIECE`]
    /// bytes from a blocking task reading the blob ([`pump`]); an `Err`
    /// piece ends it (a segment failed authentication: the alert is raised).
    Streamed {
        len: u64,
        rx: mpsc::Receiver<Result<Vec<u8>, String>>,
    },
}

impl Default for Dataset {
    fn default() -> Self {
        Dataset::whole(Vec::new())
    }
}

/// Instances larger than this (Part 10 bytes) are streamed.
pub(crate) const STREAM_ABOVE: u64 = 8 << 20;
/// Bytes per piece of a streamed dataset.
const STREAM_PIECE: usize = 1 << 20;

impl Dataset {
    /// A dataset that is the whole of `bytes`.
    pub(crate) fn whole(bytes: Vec<u8>) -> Dataset {
        Dataset::Whole { bytes, start: 0 }
    }

    /// The dataset in memory: a streamed one is gathered first (for a
    /// conversion, which needs it whole).
    ///
    /// # Errors
    /// Why a streamed dataset could not be read.
    pub(crate) async fn into_whole(self) -> Result<Dataset, String> {
        match self {
            whole @ Dataset::Whole { .. } => Ok(whole),
            Dataset::Streamed { len, mut rx } => {
                let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
                while (bytes.len() as u64) < len {
                    match rx.recv().await {
                        Some(Ok(piece)) => bytes.extend_from_slice(&piece),
                        Some(Err(e)) => return Err(e),
                        None => return Err("the stored instance ended early".into()),
                    }
                }
                if bytes.len() as u64 != len {
                    return Err("the stored instance is longer than recorded".into());
                }
                Ok(Dataset::whole(bytes))
            }
        }
    }

    /// The dataset bytes of an in-memory dataset (empty for a streamed one:
    /// use [`Dataset::into_whole`] first).
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Dataset::Whole { bytes, start } => bytes.get(*start..).unwrap_or_default(),
            Dataset::Streamed { .. } => &[],
        }
    }
}

/// Decrypts one stored instance and returns its dataset bytes: whole, or
/// for an instance over [`STREAM_ABOVE`], streamed by a blocking task that
/// reads it one authenticated segment at a time ([`pump`]). Call it from a
/// blocking thread inside the runtime.
fn load_dataset(archive: &Archive, uid: &str) -> Result<Dataset, String> {
    let parsed = Uid::parse(uid).map_err(|e| e.to_string())?;
    let mut stream = archive.open_instance(&parsed).map_err(|e| e.to_string())?;
    let large = stream.len() > STREAM_ABOVE;
    let mut head = Vec::with_capacity(if large {
        2 * STREAM_PIECE
    } else {
        usize::try_from(stream.len()).unwrap_or(0)
    });
    // Whole, or (large) the first 64 KiB or more: enough for the meta.
    let ended = loop {
        match stream.next_chunk().map_err(|e| e.to_string())? {
            Some(chunk) => head.extend_from_slice(chunk),
            None => break true,
        }
        if large && head.len() >= 64 << 10 {
            break false;
        }
    };
    let start = bastion_archive::part10::dataset_offset(&head)
        .ok_or_else(|| "stored object is not a Part 10 file".to_owned())?;
    if ended {
        return Ok(Dataset::Whole { bytes: head, start });
    }
    let len = stream.len().saturating_sub(start as u64);
    let (tx, rx) = mpsc::channel(2);
    let first = head.split_off(start);
    tokio::task::spawn_blocking(move || pump(first, stream, &tx));
    Ok(Dataset::Streamed { len, rx })
}

/// Reads the rest of a stored instance in [`STREAM_PIECE`] pieces into
/// `tx` (at most two ahead of the sender), starting with `first`; stops
/// when the receiver is gone.
fn pump(
    first: Vec<u8>,
    mut stream: bastion_archive::InstanceStream,
    tx: &mpsc::Sender<Result<Vec<u8>, String>>,
) {
    let mut piece = first;
    loop {
        match stream.next_chunk() {
            Ok(Some(chunk)) => {
                piece.extend_from_slice(chunk);
                if piece.len() >= STREAM_PIECE {
                    let full = std::mem::replace(
                        &mut piece,
                        Vec::with_capacity(STREAM_PIECE + (64 << 10)),
                    );
                    if tx.blocking_send(Ok(full)).is_err() {
                        return;
                    }
                }
            }
            Ok(None) => {
                if !piece.is_empty() {
                    let _ = tx.blocking_send(Ok(piece));
                }
                return;
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e.to_string()));
                return;
            }
        }
    }
}

/// C-GET producer: resolves `query` and loads each instance in turn on a
/// blocking thread, at most [`RETRIEVE_CHANNEL`] ahead of the association;
/// stops at a cancel.
pub(crate) fn spawn_get_producer(
    archive: Arc<Archive>,
    query: Query,
    max_matches: usize,
    cancel: Arc<AtomicBool>,
    tx: mpsc::Sender<RetrieveMsg>,
) {
    tokio::task::spawn_blocking(move || {
        let instances = match resolve(&archive, &query, max_matches) {
            Ok(i) => i,
            Err(msg) => {
                let _ = tx.blocking_send(msg);
                return;
            }
        };
        if tx.blocking_send(resolved_msg(&instances)).is_err() {
            return;
        }
        for inst in instances {
            if cancel.load(Ordering::Relaxed) {
                return;
            }
            let msg = match load_dataset(&archive, &inst.sop_instance_uid) {
                Ok(dataset) => Ok(LoadedInstance {
                    sop_class: inst.sop_class_uid,
                    sop_instance: inst.sop_instance_uid,
                    transfer_syntax: inst.transfer_syntax_uid,
                    dataset,
                }),
                Err(reason) => Err((inst.sop_instance_uid, reason)),
            };
            if tx.blocking_send(RetrieveMsg::Instance(msg)).is_err() {
                return;
            }
        }
    });
}

/// Everything the C-MOVE task needs.
pub(crate) struct MoveJob {
    pub archive: Arc<Archive>,
    pub query: Query,
    pub max_matches: usize,
    pub our_ae: AeTitle,
    pub destination: Destination,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Where the TLS client configuration's verifier leaves the reason it
    /// refused the destination's certificate.
    pub tls_reject: crate::tls::ServerReject,
    /// Move Originator AE Title and Message ID for the C-STORE-RQs.
    pub originator: (String, u16),
    pub timeout: Duration,
    pub cancel: Arc<AtomicBool>,
    pub tx: mpsc::Sender<RetrieveMsg>,
}

/// C-MOVE task: resolves, associates with the destination and performs the
/// sub-operations one by one, checking the cancel flag before each.
pub(crate) async fn run_move(job: MoveJob) {
    let MoveJob {
        archive,
        query,
        max_matches,
        our_ae,
        destination,
        tls,
        tls_reject,
        originator,
        timeout,
        cancel,
        tx,
    } = job;
    let a = archive.clone();
    let resolved = tokio::task::spawn_blocking(move || resolve(&a, &query, max_matches))
        .await
        .unwrap_or_else(|e| {
            Err(RetrieveMsg::Refused(
                Status::CANNOT_UNDERSTAND,
                format!("retrieve task failed: {e}"),
                Vec::new(),
            ))
        });
    let instances = match resolved {
        Ok(i) => i,
        Err(msg) => {
            let _ = tx.send(msg).await;
            return;
        }
    };
    if tx.send(resolved_msg(&instances)).await.is_err()
        || instances.is_empty()
        || cancel.load(Ordering::Relaxed)
    {
        return;
    }
    let mut contexts: Vec<(String, String)> = Vec::new();
    for i in &instances {
        // The stored transfer syntax first, then the uncompressed ones we can
        // produce from it (PS3.4 C.4.2.2).
        let fallbacks = transcode::FALLBACKS
            .iter()
            .filter(|fb| transcode::can_transcode(&i.transfer_syntax_uid, fb))
            .map(|fb| (*fb).to_owned());
        for ts in std::iter::once(i.transfer_syntax_uid.clone()).chain(fallbacks) {
            let pair = (i.sop_class_uid.clone(), ts);
            if !contexts.contains(&pair) {
                contexts.push(pair);
            }
        }
    }
    let mut scu = match StoreScu::connect(&our_ae, &destination, &contexts, tls, timeout).await {
        Ok(s) => s,
        Err(e) => {
            let refused = tls_reject.lock().unwrap_or_else(|p| p.into_inner()).take();
            match refused {
                Some(reason) => {
                    // Bastion as a TLS client refused the destination's
                    // certificate: log the exact failure and raise an alert.
                    tracing::warn!(
                        destination = %destination.ae, host = %destination.host, port = destination.port,
                        reason = %reason, "C-MOVE destination certificate refused"
                    );
                    archive.events().record(
                        "tls.peer_rejected",
                        bastion_security::events::Outcome::Failure,
                        serde_json::json!({
                            "role": "client", "purpose": "C-MOVE destination",
                            "ae": destination.ae.as_str(), "peer": format!("{}:{}", destination.host, destination.port),
                            "reason": reason,
                        }),
                    );
                }
                None => tracing::warn!(error = %e, "C-MOVE destination unreachable"),
            }
            let _ = tx.send(RetrieveMsg::Stopped(e.to_string())).await;
            return;
        }
    };
    // The next instance is decrypted while the current one is on the wire.
    let load = |uid: String| {
        let a = archive.clone();
        tokio::task::spawn_blocking(move || load_dataset(&a, &uid))
    };
    let mut prefetch = instances.first().map(|i| load(i.sop_instance_uid.clone()));
    for (n, inst) in instances.iter().cloned().enumerate() {
        let Some(current) = prefetch.take() else {
            break;
        };
        if cancel.load(Ordering::Relaxed) {
            current.abort();
            break;
        }
        let loaded = current
            .await
            .unwrap_or_else(|e| Err(format!("load task failed: {e}")));
        prefetch = instances
            .get(n + 1)
            .map(|i| load(i.sop_instance_uid.clone()));
        let loaded = match loaded {
            Ok(dataset) if !scu.accepts(&inst.sop_class_uid, &inst.transfer_syntax_uid) => {
                match transcode::FALLBACKS.iter().find(|fb| {
                    transcode::can_transcode(&inst.transfer_syntax_uid, fb)
                        && scu.accepts(&inst.sop_class_uid, fb)
                }) {
                    Some(fb) => match dataset.into_whole().await {
                        Ok(dataset) => {
                            let (from, to) = (inst.transfer_syntax_uid.clone(), (*fb).to_owned());
                            let target = to.clone();
                            tokio::task::spawn_blocking(move || {
                                transcode::transcode(dataset.as_slice(), &from, &target)
                            })
                            .await
                            .map_err(|e| format!("transcode task failed: {e}"))
                            .and_then(|r| r.map_err(|e| e.to_string()))
                            .map(|bytes| (Dataset::whole(bytes), to))
                        }
                        Err(e) => Err(e),
                    },
                    None => Ok((dataset, inst.transfer_syntax_uid.clone())),
                }
            }
            Ok(dataset) => Ok((dataset, inst.transfer_syntax_uid.clone())),
            Err(e) => Err(e),
        };
        let outcome = match loaded {
            Ok((mut dataset, ts_out)) => {
                let originator = Some((originator.0.as_str(), originator.1));
                let stored = match &mut dataset {
                    Dataset::Streamed { len, rx } => {
                        let req = StoreRequest {
                            sop_class: &inst.sop_class_uid,
                            sop_instance: &inst.sop_instance_uid,
                            transfer_syntax: &ts_out,
                            dataset: &[],
                            move_originator: originator,
                        };
                        scu.store_streamed(req, *len, rx).await
                    }
                    whole => {
                        let req = StoreRequest {
                            sop_class: &inst.sop_class_uid,
                            sop_instance: &inst.sop_instance_uid,
                            transfer_syntax: &ts_out,
                            dataset: whole.as_slice(),
                            move_originator: originator,
                        };
                        scu.store(req).await
                    }
                };
                match stored {
                    Ok(code) => SubOpOutcome::of_store_status(code),
                    Err(e @ ScuError::NoContext { .. }) => {
                        tracing::warn!(error = %e, "C-MOVE sub-operation failed");
                        SubOpOutcome::Failed
                    }
                    Err(e) => {
                        // The association is unusable: the rest fail too.
                        tracing::warn!(error = %e, "C-MOVE destination association failed");
                        let _ = tx
                            .send(RetrieveMsg::SubOp {
                                uid: inst.sop_instance_uid,
                                outcome: SubOpOutcome::Failed,
                            })
                            .await;
                        let _ = tx.send(RetrieveMsg::Stopped(e.to_string())).await;
                        return;
                    }
                }
            }
            Err(reason) => {
                tracing::error!(reason, "cannot read a stored instance for C-MOVE");
                SubOpOutcome::Failed
            }
        };
        if tx
            .send(RetrieveMsg::SubOp {
                uid: inst.sop_instance_uid,
                outcome,
            })
            .await
            .is_err()
        {
            break;
        }
    }
    scu.release().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_status_rules() {
        let (_tx, rx) = mpsc::channel(1);
        let cancel = Arc::new(AtomicBool::new(false));
        let mut r = RunningRetrieve::new(
            RetrieveKind::Get,
            1,
            1,
            String::new(),
            String::new(),
            "study_root",
            "STUDY",
            cancel.clone(),
            rx,
        );
        r.uids = Some(vec!["1".into(), "2".into(), "3".into()]);
        r.record("1", SubOpOutcome::Completed);
        assert_eq!(r.remaining(), 2);
        assert_eq!(r.counts(true).remaining, Some(2));
        cancel.store(true, Ordering::Relaxed);
        assert_eq!(r.finish(), (Status::CANCEL, true));
        cancel.store(false, Ordering::Relaxed);
        r.record("2", SubOpOutcome::Warning);
        // "3" never reported: failed.
        assert_eq!(r.finish(), (Status::SUBOPERATIONS_WARNING, false));
        assert_eq!(r.failed_uids, vec!["3".to_owned()]);
        assert_eq!(SubOpOutcome::of_store_status(0xB007), SubOpOutcome::Warning);
        assert_eq!(SubOpOutcome::of_store_status(0xA700), SubOpOutcome::Failed);
    }
}
