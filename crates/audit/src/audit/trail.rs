//! Writing, verifying and reading `DIR/audit/` (format in the module docs).

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::health::{AuditHealth, CHECKPOINT_RESERVE_BYTES, RESERVE_BYTES};
use super::{message, AuditError, AuditIdentity, PatientLookup, Subject};
use crate::events::EventObserver;

const AAD_PREFIX: &[u8] = b"bastion audit v1";
const RECORDS: &str = "records";
const CHECKPOINTS: &str = "checkpoints";
const LOCK: &str = "lock";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

type Result<T> = std::result::Result<T, AuditError>;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The trail's keys: AES-256-GCM (derived from the master key by the
/// caller, purpose `bastion audit v1`) and the Ed25519 checkpoint key.
pub struct AuditKeys {
    aead: LessSafeKey,
    signing: SigningKey,
}

impl AuditKeys {
    /// Keys from their bytes.
    ///
    /// # Errors
    /// [`AuditError::Key`] when the AES key is refused.
    pub fn new(aead_key: &[u8; 32], signing: SigningKey) -> Result<AuditKeys> {
        let unbound = UnboundKey::new(&AES_256_GCM, aead_key)
            .map_err(|_| AuditError::Key("AES-256-GCM key refused".into()))?;
        Ok(AuditKeys {
            aead: LessSafeKey::new(unbound),
            signing,
        })
    }

    /// Loads the signing key from its PKCS#8 PEM file (`secrets/audit-signing.key`).
    ///
    /// # Errors
    /// [`AuditError::Key`] when the file is missing or not an Ed25519 key
    /// (never re-created: checkpoints signed by the lost key could no longer
    /// be verified).
    pub fn load(aead_key: &[u8; 32], signing_key: &Path) -> Result<AuditKeys> {
        let pem = std::fs::read_to_string(signing_key).map_err(|e| {
            AuditError::Key(format!(
                "cannot read the audit signing key {}: {e}; it is created once by `bastion init` and never re-created (restore it from backup)",
                signing_key.display()
            ))
        })?;
        let signing = <SigningKey as ed25519_dalek::pkcs8::DecodePrivateKey>::from_pkcs8_pem(&pem)
            .map_err(|e| {
                AuditError::Key(format!(
                    "{} is not an Ed25519 PKCS#8 key: {e}",
                    signing_key.display()
                ))
            })?;
        AuditKeys::new(aead_key, signing)
    }

    fn verifying(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    fn seal(&self, seq: u64, prev: &[u8; 32], plaintext: &[u8]) -> Result<([u8; 12], Vec<u8>)> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut buf = plaintext.to_vec();
        self.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(seq, prev)),
                &mut buf,
            )
            .map_err(|_| AuditError::Key("AES-256-GCM seal failed".into()))?;
        Ok((nonce, buf))
    }

    fn open(&self, seq: u64, prev: &[u8; 32], nonce: &[u8], ct: &mut [u8]) -> Option<usize> {
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let pt = self
            .aead
            .open_in_place(nonce, Aad::from(aad(seq, prev)), ct)
            .ok()?;
        Some(pt.len())
    }
}

fn aad(seq: u64, prev: &[u8; 32]) -> Vec<u8> {
    let mut a = Vec::with_capacity(AAD_PREFIX.len() + 40);
    a.extend_from_slice(AAD_PREFIX);
    a.extend_from_slice(&seq.to_be_bytes());
    a.extend_from_slice(prev);
    a
}

/// When checkpoints are written (besides shutdown).
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// After this many records.
    pub every_records: u64,
    /// After this long, when records were appended since the last one
    /// ([`AuditTrail::tick`]).
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            every_records: 1000,
            every: Duration::from_secs(60),
        }
    }
}

/// One decrypted record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Sequence number (0-based line number).
    #[serde(skip)]
    pub seq: u64,
    /// The event as recorded (`ts`, `type`, `outcome`, fields).
    pub event: Map<String, Value>,
    /// Patients and studies the event concerns.
    #[serde(default)]
    pub subjects: Vec<Subject>,
    /// The EventID meanings of its audit messages (e.g. `Query`).
    #[serde(default)]
    pub event_ids: Vec<String>,
    /// Its DICOM audit messages (PS3.15 A.5.1 XML).
    #[serde(default)]
    pub messages: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    seq: u64,
    prev: String,
    nonce: String,
    ct: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Checkpoint {
    n: u64,
    count: u64,
    head: String,
    ts: String,
    prev: String,
    sig: String,
}

fn signed_bytes(n: u64, count: u64, head: &str, ts: &str, prev: &str) -> Vec<u8> {
    format!("bastion audit checkpoint v1\n{n}\n{count}\n{head}\n{ts}\n{prev}\n").into_bytes()
}

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

#[derive(Clone, Copy)]
struct Head {
    len: u64,
    count: u64,
    hash: [u8; 32],
}

struct Writer {
    records: File,
    checkpoints: File,
    lock: File,
    head: Option<Head>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// Records file offset up to which blocks are allocated (the reserve).
    reserved_to: u64,
    /// The same for the checkpoints file.
    checkpoints_reserved_to: u64,
    /// Bytes of a torn last record cut off by [`AuditTrail::head`], to be
    /// recorded as `audit.tail_repaired` once the head is sound again.
    repaired: Option<u64>,
}

/// The trail writer; also the [`EventObserver`] that appends every event.
/// Appends from several processes are serialised by `flock` on
/// `DIR/audit/lock`, the chain head re-read under the lock.
pub struct AuditTrail {
    dir: PathBuf,
    keys: Arc<AuditKeys>,
    identity: AuditIdentity,
    policy: CheckpointPolicy,
    lookup: RwLock<Option<Arc<dyn PatientLookup>>>,
    sink: RwLock<Option<Arc<dyn crate::syslog::AuditSink>>>,
    writer: Mutex<Writer>,
    health: Arc<AuditHealth>,
}

fn open_append(path: &Path, create_new: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    o.append(true).read(true).mode(0o600);
    if create_new {
        o.create_new(true);
    }
    o.open(path).map_err(io("open", path))
}

impl AuditTrail {
    /// Creates a new, empty trail in `dir` (refused when one exists).
    ///
    /// # Errors
    /// [`AuditError::Io`] (also when `dir/records` already exists).
    pub fn create(
        dir: &Path,
        keys: Arc<AuditKeys>,
        identity: AuditIdentity,
        policy: CheckpointPolicy,
    ) -> Result<AuditTrail> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create", dir))?;
        open_append(&dir.join(RECORDS), true)?;
        open_append(&dir.join(CHECKPOINTS), true)?;
        AuditTrail::open(dir, keys, identity, policy)
    }

    /// Opens an existing trail.
    ///
    /// # Errors
    /// [`AuditError::Missing`] when `dir/records` or `dir/checkpoints` does
    /// not exist (never re-created here), [`AuditError::Io`].
    pub fn open(
        dir: &Path,
        keys: Arc<AuditKeys>,
        identity: AuditIdentity,
        policy: CheckpointPolicy,
    ) -> Result<AuditTrail> {
        if !dir.join(RECORDS).is_file() || !dir.join(CHECKPOINTS).is_file() {
            return Err(AuditError::Missing(dir.to_path_buf()));
        }
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        let trail = AuditTrail {
            dir: dir.to_path_buf(),
            keys,
            identity,
            policy,
            lookup: RwLock::new(None),
            sink: RwLock::new(None),
            writer: Mutex::new(Writer {
                records: open_append(&dir.join(RECORDS), false)?,
                checkpoints: open_append(&dir.join(CHECKPOINTS), false)?,
                lock,
                head: None,
                since_checkpoint: 0,
                last_checkpoint: Instant::now(),
                reserved_to: 0,
                checkpoints_reserved_to: 0,
                repaired: None,
            }),
            health: AuditHealth::new(),
        };
        // A torn last record (a crash or a full disk during its write) is cut
        // off now, so that neither serve nor a CLI command starts on a chain
        // that cannot grow; the reserve is allocated (or recording is marked
        // stopped when the file system is full).
        trail.probe()?;
        Ok(trail)
    }

    /// The recording state of this trail (shared: the network fronts read
    /// it through [`super::AuditGate`]).
    pub fn health(&self) -> Arc<AuditHealth> {
        self.health.clone()
    }

    /// Re-reads the head (cutting off a torn last record), tops the reserve
    /// up, and so notices both a full file system and its end: call it
    /// periodically while recording is stopped (serve does, every second).
    ///
    /// # Errors
    /// [`AuditError::Io`] when the lock cannot be taken,
    /// [`AuditError::Head`] when the last whole record is unreadable.
    pub fn probe(&self) -> Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.dir.join(LOCK);
        w.lock.lock().map_err(io("lock", &path))?;
        let r = self.head(&mut w).and_then(|_| self.after_append(&mut w));
        let _ = w.lock.unlock();
        r
    }

    /// Sets the patient lookup used for later events.
    pub fn set_lookup(&self, lookup: Arc<dyn PatientLookup>) {
        *self.lookup.write().unwrap_or_else(|p| p.into_inner()) = Some(lookup);
    }

    /// Sets who is told, after each append, that the trail grew (the
    /// syslog exporter, which then reads the new records from the file, as
    /// it does for records appended by other processes).
    pub fn set_sink(&self, sink: Arc<dyn crate::syslog::AuditSink>) {
        *self.sink.write().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// Appends one event (what [`EventObserver::observe`] does).
    ///
    /// # Errors
    /// [`AuditError::Io`], [`AuditError::Head`].
    pub fn append(&self, event: &Map<String, Value>) -> Result<()> {
        let subjects = self.subjects(event);
        let msgs = message::messages(event, &subjects, &self.identity);
        let record = Record {
            seq: 0,
            event: event.clone(),
            subjects,
            event_ids: msgs.iter().map(|(c, _)| c.meaning.to_owned()).collect(),
            messages: msgs.into_iter().map(|(_, x)| x).collect(),
        };
        let plaintext = serde_json::to_vec(&record).unwrap_or_default();
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.dir.join(LOCK);
        w.lock.lock().map_err(io("lock", &path))?;
        let r = self
            .append_locked(&mut w, &plaintext)
            .and_then(|()| {
                if w.since_checkpoint >= self.policy.every_records {
                    self.checkpoint_locked(&mut w)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| self.after_append(&mut w));
        if let Err(e) = &r {
            self.health.stopped(e.to_string());
        }
        let _ = w.lock.unlock();
        let count = w.head.as_ref().map_or(0, |h| h.count);
        drop(w);
        if r.is_ok() {
            if let Some(sink) = self.sink.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
                sink.appended(count);
            }
        }
        r
    }

    /// Writes a checkpoint when records were appended since the last one
    /// and the policy's interval has passed (call it periodically).
    ///
    /// # Errors
    /// As [`AuditTrail::checkpoint`].
    pub fn tick(&self) -> Result<()> {
        if !self.health.recording() {
            self.probe()?;
        }
        let due = {
            let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.since_checkpoint > 0 && w.last_checkpoint.elapsed() >= self.policy.every
        };
        if due {
            self.checkpoint()
        } else {
            Ok(())
        }
    }

    /// Writes a signed checkpoint now (at shutdown), unless no record was
    /// appended since the last one.
    ///
    /// # Errors
    /// [`AuditError::Io`], [`AuditError::Head`].
    pub fn checkpoint(&self) -> Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.dir.join(LOCK);
        w.lock.lock().map_err(io("lock", &path))?;
        let r = self.checkpoint_locked(&mut w);
        if let Err(e) = &r {
            self.health.stopped(e.to_string());
        }
        let _ = w.lock.unlock();
        r
    }

    /// After an append (under the lock): records a torn tail that
    /// [`AuditTrail::head`] cut off, then keeps [`RESERVE_BYTES`] allocated
    /// past the end of the records file (and [`CHECKPOINT_RESERVE_BYTES`]
    /// past the checkpoints), marking recording stopped when the file system
    /// cannot give them and resumed when it can again.
    fn after_append(&self, w: &mut Writer) -> Result<()> {
        if let Some(bytes) = w.repaired.take() {
            let mut event = Map::new();
            event.insert("ts".into(), now_rfc3339().into());
            event.insert("type".into(), "audit.tail_repaired".into());
            event.insert("outcome".into(), "success".into());
            event.insert("bytes".into(), bytes.into());
            event.insert(
                "detail".into(),
                "a record whose write was interrupted (crash or full disk) was cut off".into(),
            );
            let record = Record {
                seq: 0,
                event,
                subjects: vec![],
                event_ids: vec![],
                messages: vec![],
            };
            self.append_locked(w, &serde_json::to_vec(&record).unwrap_or_default())?;
        }
        // The head `append_locked` just set (no stat on the ingest path);
        // the reserves are looked at only once TOP_UP_SLACK of the records'
        // reserve is used, or while recording is stopped.
        let head = match w.head {
            Some(h) => h,
            None => self.head(w)?,
        };
        if self.health.recording()
            && head.len + RESERVE_BYTES.saturating_sub(TOP_UP_SLACK) <= w.reserved_to
        {
            return Ok(());
        }
        let cpath = self.dir.join(CHECKPOINTS);
        let clen = w.checkpoints.metadata().map_err(io("stat", &cpath))?.len();
        let records_ok = top_up(&w.records, head.len, &mut w.reserved_to, RESERVE_BYTES);
        let checkpoints_ok = top_up(
            &w.checkpoints,
            clen,
            &mut w.checkpoints_reserved_to,
            CHECKPOINT_RESERVE_BYTES,
        );
        match records_ok.and(checkpoints_ok) {
            Ok(()) => self.health.resumed(),
            Err(e) => self.health.stopped(format!(
                "cannot keep the audit reserve in {}: {e}",
                self.dir.display()
            )),
        }
        Ok(())
    }

    fn subjects(&self, e: &Map<String, Value>) -> Vec<Subject> {
        let Some(lookup) = self
            .lookup
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Some(sop) = e.get("sop_instance_uid").and_then(Value::as_str) {
            out.extend(lookup.by_instance(sop));
        }
        for key in ["study_uids", "studies"] {
            if let Some(Value::Array(a)) = e.get(key) {
                for st in a.iter().filter_map(Value::as_str).take(100) {
                    out.extend(lookup.by_study(st));
                }
            }
        }
        out.sort_by(|a, b| (&a.patient_id, &a.study_uid).cmp(&(&b.patient_id, &b.study_uid)));
        out.dedup();
        out
    }

    /// The chain head, re-read from the file when another process appended.
    fn head(&self, w: &mut Writer) -> Result<Head> {
        let path = self.dir.join(RECORDS);
        let len = w.records.metadata().map_err(io("stat", &path))?.len();
        if let Some(h) = w.head.filter(|h| h.len == len) {
            return Ok(h);
        }
        // Every record ends with a newline: bytes after the last one are a
        // record whose write was interrupted (a crash, a full disk). It was
        // never acknowledged; cut it off (under the lock, so no other
        // writer is inside an append) instead of letting it poison the chain.
        let len = match cut_torn_tail(&w.records, len).map_err(io("truncate", &path))? {
            Some((kept, cut)) => {
                tracing::warn!(path = %path.display(), bytes = cut,
                    "audit trail: cut off a record whose write was interrupted");
                w.repaired = Some(w.repaired.unwrap_or(0) + cut);
                kept
            }
            None => len,
        };
        let h = match last_line(&w.records, len).map_err(io("read", &path))? {
            None => Head {
                len,
                count: 0,
                hash: [0; 32],
            },
            Some(line) => {
                let parsed: Line = serde_json::from_slice(&line)
                    .map_err(|e| AuditError::Head(format!("record at end of file: {e}")))?;
                Head {
                    len,
                    count: parsed.seq + 1,
                    hash: sha(&line),
                }
            }
        };
        w.head = Some(h);
        Ok(h)
    }

    fn append_locked(&self, w: &mut Writer, plaintext: &[u8]) -> Result<()> {
        let head = self.head(w)?;
        let (nonce, ct) = self.keys.seal(head.count, &head.hash, plaintext)?;
        let line = Line {
            seq: head.count,
            prev: hex::encode(head.hash),
            nonce: hex::encode(nonce),
            ct: B64.encode(ct),
        };
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        let hash = sha(&bytes);
        bytes.push(b'\n');
        let path = self.dir.join(RECORDS);
        if let Err(e) = w.records.write_all(&bytes) {
            // A partial write (ENOSPC) must not stay: cut the file back to
            // the last whole record. When even that fails, the next
            // `head()` finds the torn tail and cuts it.
            if let Err(t) = w.records.set_len(head.len) {
                tracing::error!(path = %path.display(), error = %t, "cannot cut off a partial audit record; it will be cut at the next append");
            }
            return Err(io("append", &path)(e));
        }
        w.head = Some(Head {
            len: head.len + bytes.len() as u64,
            count: head.count + 1,
            hash,
        });
        w.since_checkpoint += 1;
        Ok(())
    }

    fn checkpoint_locked(&self, w: &mut Writer) -> Result<()> {
        let head = self.head(w)?;
        let cpath = self.dir.join(CHECKPOINTS);
        let clen = w.checkpoints.metadata().map_err(io("stat", &cpath))?.len();
        let (n, prev) = match last_line(&w.checkpoints, clen).map_err(io("read", &cpath))? {
            None => (1, hex::encode([0u8; 32])),
            Some(l) => {
                let c: Checkpoint = serde_json::from_slice(&l)
                    .map_err(|e| AuditError::Head(format!("last checkpoint: {e}")))?;
                if c.count == head.count {
                    w.since_checkpoint = 0;
                    w.last_checkpoint = Instant::now();
                    return Ok(());
                }
                (c.n + 1, hex::encode(sha(&l)))
            }
        };
        if head.count == 0 {
            return Ok(());
        }
        let rpath = self.dir.join(RECORDS);
        w.records.sync_data().map_err(io("fsync", &rpath))?;
        let ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let head_hex = hex::encode(head.hash);
        let sig = self
            .keys
            .signing
            .sign(&signed_bytes(n, head.count, &head_hex, &ts, &prev));
        let c = Checkpoint {
            n,
            count: head.count,
            head: head_hex.clone(),
            ts: ts.clone(),
            prev,
            sig: B64.encode(sig.to_bytes()),
        };
        let mut bytes = serde_json::to_vec(&c).unwrap_or_default();
        bytes.push(b'\n');
        if let Err(e) = w.checkpoints.write_all(&bytes) {
            let _ = w.checkpoints.set_len(clen);
            return Err(io("append", &cpath)(e));
        }
        w.checkpoints.sync_data().map_err(io("fsync", &cpath))?;
        // The marker record: names the checkpoint, so losing the
        // checkpoints file's tail is detected.
        let mut event = Map::new();
        event.insert("ts".into(), ts.into());
        event.insert("type".into(), "audit.checkpoint".into());
        event.insert("outcome".into(), "success".into());
        event.insert("n".into(), n.into());
        event.insert("count".into(), head.count.into());
        event.insert("head".into(), head_hex.into());
        let marker = Record {
            seq: 0,
            event,
            subjects: vec![],
            event_ids: vec![],
            messages: vec![],
        };
        self.append_locked(w, &serde_json::to_vec(&marker).unwrap_or_default())?;
        w.records.sync_data().map_err(io("fsync", &rpath))?;
        w.since_checkpoint = 0;
        w.last_checkpoint = Instant::now();
        Ok(())
    }
}

impl EventObserver for AuditTrail {
    fn observe(&self, event: &Map<String, Value>) {
        if let Err(e) = self.append(event) {
            tracing::error!(error = %e, "cannot append to the audit trail");
        }
    }
}

impl Drop for AuditTrail {
    fn drop(&mut self) {
        let pending = self
            .writer
            .lock()
            .map(|w| w.since_checkpoint > 0)
            .unwrap_or(false);
        if pending {
            if let Err(e) = self.checkpoint() {
                tracing::error!(error = %e, "cannot write the audit checkpoint");
            }
        }
    }
}

/// Cuts bytes after the last newline of `f` (length `len`): returns the new
/// length and the bytes cut, or `None` when the file ends with a newline
/// (or is empty).
fn cut_torn_tail(f: &File, len: u64) -> std::io::Result<Option<(u64, u64)>> {
    if len == 0 {
        return Ok(None);
    }
    let mut last = [0u8; 1];
    f.read_exact_at(&mut last, len - 1)?;
    if last[0] == b'\n' {
        return Ok(None);
    }
    let mut pos = len;
    const CHUNK: u64 = 64 * 1024;
    let kept = loop {
        let start = pos.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; (pos - start) as usize];
        f.read_exact_at(&mut chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            break start + i as u64 + 1;
        }
        if start == 0 {
            break 0;
        }
        pos = start;
    };
    f.set_len(kept)?;
    f.sync_data()?;
    Ok(Some((kept, len - kept)))
}

/// Keeps `reserve` bytes allocated past `len` (`fallocate` with
/// `FALLOC_FL_KEEP_SIZE`: the length is unchanged, later appends into the
/// allocated blocks cannot fail for lack of space). Called again once
/// [`TOP_UP_SLACK`] of the reserve is used (a few records), so a full file
/// system is noticed within a few records while the reserve still holds
/// about [`RESERVE_BYTES`]. A file system without `fallocate` has no
/// reserve (not an error).
fn top_up(f: &File, len: u64, reserved_to: &mut u64, reserve: u64) -> std::io::Result<()> {
    if len + reserve.saturating_sub(TOP_UP_SLACK) <= *reserved_to {
        return Ok(());
    }
    match rustix::fs::fallocate(f, rustix::fs::FallocateFlags::KEEP_SIZE, len, reserve) {
        Ok(()) => {
            *reserved_to = len + reserve;
            Ok(())
        }
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
            *reserved_to = u64::MAX;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Reserve bytes used before it is topped up again.
const TOP_UP_SLACK: u64 = 16 << 10;

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The last line of a file (without its newline), read backwards.
fn last_line(f: &File, len: u64) -> std::io::Result<Option<Vec<u8>>> {
    if len == 0 {
        return Ok(None);
    }
    let mut end = len;
    let mut last = [0u8; 1];
    f.read_exact_at(&mut last, len - 1)?;
    if last[0] == b'\n' {
        end -= 1;
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = end;
    const CHUNK: u64 = 64 * 1024;
    loop {
        let start = pos.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; (pos - start) as usize];
        f.read_exact_at(&mut chunk, start)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
        if let Some(i) = buf[..(pos - start) as usize]
            .iter()
            .rposition(|&b| b == b'\n')
        {
            return Ok(Some(buf[i + 1..].to_vec()));
        }
        if start == 0 {
            return Ok(Some(buf));
        }
        pos = start;
    }
}

/// The first problem [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The first broken record (0-based sequence number), if a record.
    pub record: Option<u64>,
    /// The checkpoint concerned (1-based), if any.
    pub checkpoint: Option<u64>,
    /// What is wrong.
    pub what: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.record, self.checkpoint) {
            (Some(r), _) => write!(f, "record {r}: {}", self.what),
            (None, Some(c)) => write!(f, "checkpoint {c}: {}", self.what),
            (None, None) => f.write_str(&self.what),
        }
    }
}

/// The result of [`verify`].
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// Records read.
    pub records: u64,
    /// Checkpoints read.
    pub checkpoints: u64,
    /// Records covered by the last valid checkpoint.
    pub covered: u64,
    /// The signed time (RFC 3339) of the last checkpoint whose signature
    /// and link verified, if any.
    pub last_checkpoint: Option<String>,
    /// The first problem, `None` when intact.
    pub broken: Option<Broken>,
}

fn broken(record: Option<u64>, checkpoint: Option<u64>, what: impl Into<String>) -> Broken {
    Broken {
        record,
        checkpoint,
        what: what.into(),
    }
}

fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
    buf.clear();
    let n = r.read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    let complete = buf.last() == Some(&b'\n');
    if complete {
        buf.pop();
    }
    Ok(Some(complete))
}

/// Verifies the trail in `dir`: the checkpoints' signatures and chain, then
/// every record's sequence number, hash link and authentication tag,
/// checkpoint heads and marker records. Streams the records (memory
/// independent of their number; checkpoints are kept, a few bytes each).
///
/// # Errors
/// [`AuditError::Missing`] when there is no trail, [`AuditError::Io`].
pub fn verify(dir: &Path, keys: &AuditKeys) -> Result<VerifyReport> {
    let rpath = dir.join(RECORDS);
    let cpath = dir.join(CHECKPOINTS);
    if !rpath.is_file() {
        return Err(AuditError::Missing(dir.to_path_buf()));
    }
    let mut report = VerifyReport {
        records: 0,
        checkpoints: 0,
        covered: 0,
        last_checkpoint: None,
        broken: None,
    };
    if !cpath.is_file() {
        report.broken = Some(broken(
            None,
            None,
            format!("{} is missing (deleted checkpoints)", cpath.display()),
        ));
        return Ok(report);
    }
    // Checkpoints: (count, head hex), index n-1.
    let vk = keys.verifying();
    let mut cps: Vec<(u64, String)> = Vec::new();
    {
        let f = File::open(&cpath).map_err(io("open", &cpath))?;
        let mut r = BufReader::new(f);
        let mut buf = Vec::new();
        let mut prev = [0u8; 32];
        while let Some(complete) = read_line(&mut r, &mut buf).map_err(io("read", &cpath))? {
            let n = cps.len() as u64 + 1;
            let fail = |what: &str| Some(broken(None, Some(n), what.to_owned()));
            if !complete {
                report.broken = fail("incomplete last line (truncated checkpoints file)");
                return Ok(report);
            }
            let Ok(c) = serde_json::from_slice::<Checkpoint>(&buf) else {
                report.broken = fail("not a checkpoint line (edited)");
                return Ok(report);
            };
            if c.n != n {
                report.broken = fail(&format!(
                    "found checkpoint number {} (checkpoints deleted or reordered)",
                    c.n
                ));
                return Ok(report);
            }
            if c.prev != hex::encode(prev) {
                report.broken = fail("its link to the previous checkpoint does not match (a checkpoint before it was edited or deleted)");
                return Ok(report);
            }
            let sig_ok = B64
                .decode(&c.sig)
                .ok()
                .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
                .is_some_and(|sig| {
                    vk.verify(&signed_bytes(c.n, c.count, &c.head, &c.ts, &c.prev), &sig)
                        .is_ok()
                });
            if !sig_ok {
                report.broken = fail("bad signature (edited, or signed by another key)");
                return Ok(report);
            }
            if cps.last().is_some_and(|(last, _)| c.count <= *last) {
                report.broken = fail("its record count does not grow");
                return Ok(report);
            }
            prev = sha(&buf);
            report.last_checkpoint = Some(c.ts);
            cps.push((c.count, c.head));
        }
    }
    report.checkpoints = cps.len() as u64;

    let f = File::open(&rpath).map_err(io("open", &rpath))?;
    let mut r = BufReader::with_capacity(256 * 1024, f);
    let mut buf = Vec::new();
    let mut prev = [0u8; 32];
    let mut seq: u64 = 0;
    // Index into `cps` of the next checkpoint whose count is not yet reached.
    let mut next_cp = 0usize;
    while let Some(complete) = read_line(&mut r, &mut buf).map_err(io("read", &rpath))? {
        let fail = |what: String| Some(broken(Some(seq), None, what));
        if !complete {
            report.broken = fail("incomplete last line (truncated records file)".into());
            return Ok(report);
        }
        let Ok(line) = serde_json::from_slice::<Line>(&buf) else {
            report.broken = fail("not a record line (edited)".into());
            return Ok(report);
        };
        // Any byte outside the ciphertext is covered too: the line must be
        // exactly as written (canonical JSON).
        if serde_json::to_vec(&line).ok().as_deref() != Some(&buf[..]) {
            report.broken = fail("not in the form it was written in (edited)".into());
            return Ok(report);
        }
        if line.seq != seq {
            report.broken = fail(if line.seq > seq {
                format!(
                    "missing: the next record carries sequence number {} (records deleted or reordered)",
                    line.seq
                )
            } else {
                format!(
                    "out of order: sequence number {} found here (records reordered or duplicated)",
                    line.seq
                )
            });
            return Ok(report);
        }
        if line.prev != hex::encode(prev) {
            report.broken = fail("its hash link does not match the previous record (the record before it was edited or replaced)".into());
            return Ok(report);
        }
        let (Ok(nonce), Ok(mut ct)) = (hex::decode(&line.nonce), B64.decode(&line.ct)) else {
            report.broken = fail("undecodable nonce or ciphertext (edited)".into());
            return Ok(report);
        };
        let Some(n) = keys.open(seq, &prev, &nonce, &mut ct) else {
            report.broken =
                fail("authentication failed (edited, or encrypted under another key)".into());
            return Ok(report);
        };
        ct.truncate(n);
        let Ok(rec) = serde_json::from_slice::<Record>(&ct) else {
            report.broken = fail("decrypted content is not a record".into());
            return Ok(report);
        };
        // The record right after checkpoint k's count must be k's marker.
        if let Some(k) = cps.iter().position(|(c, _)| *c == seq) {
            let is_marker = rec.event.get("type").and_then(Value::as_str)
                == Some("audit.checkpoint")
                && rec.event.get("n").and_then(Value::as_u64) == Some(k as u64 + 1);
            if !is_marker {
                report.broken = fail(format!("expected the marker of checkpoint {} here", k + 1));
                return Ok(report);
            }
        }
        if rec.event.get("type").and_then(Value::as_str) == Some("audit.checkpoint") {
            let n = rec.event.get("n").and_then(Value::as_u64).unwrap_or(0);
            let count = rec.event.get("count").and_then(Value::as_u64);
            let head = rec.event.get("head").and_then(Value::as_str);
            match n.checked_sub(1).and_then(|i| cps.get(i as usize)) {
                None => {
                    report.broken = fail(format!(
                        "names checkpoint {n}, which is missing from the checkpoints file (checkpoints truncated or deleted)"
                    ));
                    return Ok(report);
                }
                Some((c, h)) if Some(*c) != count || Some(h.as_str()) != head => {
                    report.broken = fail(format!(
                        "names checkpoint {n} with a different count or head"
                    ));
                    return Ok(report);
                }
                Some(_) => {}
            }
        }
        prev = sha(&buf);
        seq += 1;
        while let Some((count, head)) = cps.get(next_cp) {
            if *count != seq {
                break;
            }
            if *head != hex::encode(prev) {
                report.broken = Some(broken(
                    Some(seq - 1),
                    Some(next_cp as u64 + 1),
                    format!(
                        "does not match the head signed by checkpoint {} (edited)",
                        next_cp + 1
                    ),
                ));
                return Ok(report);
            }
            report.covered = *count;
            next_cp += 1;
        }
    }
    report.records = seq;
    if let Some((count, _)) = cps.get(next_cp) {
        report.broken = Some(broken(
            Some(seq),
            Some(next_cp as u64 + 1),
            format!(
                "missing: checkpoint {} covers {count} records but only {seq} are present (records truncated)",
                next_cp + 1
            ),
        ));
        return Ok(report);
    }
    if let Some(k) = cps.iter().position(|(c, _)| *c == seq) {
        report.broken = Some(broken(
            Some(seq),
            Some(k as u64 + 1),
            format!(
                "missing: the marker of checkpoint {} (records truncated)",
                k + 1
            ),
        ));
    }
    Ok(report)
}

/// Reads the records in order, decrypting each, calling `each` until it
/// returns `false`. Records that cannot be decrypted are skipped and
/// counted (run [`verify`] for the reason). Streams; the chain is not
/// checked here.
///
/// # Errors
/// [`AuditError::Missing`], [`AuditError::Io`].
pub fn read(dir: &Path, keys: &AuditKeys, mut each: impl FnMut(Record) -> bool) -> Result<u64> {
    let rpath = dir.join(RECORDS);
    let f = File::open(&rpath).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            AuditError::Missing(dir.to_path_buf())
        } else {
            AuditError::Io {
                op: "open",
                path: rpath.clone(),
                source: e,
            }
        }
    })?;
    let mut r = BufReader::with_capacity(256 * 1024, f);
    let mut buf = Vec::new();
    let mut unreadable = 0u64;
    while read_line(&mut r, &mut buf)
        .map_err(io("read", &rpath))?
        .is_some()
    {
        let Some(rec) = decode(keys, &buf) else {
            unreadable += 1;
            continue;
        };
        if !each(rec) {
            break;
        }
    }
    Ok(unreadable)
}

fn decode(keys: &AuditKeys, line: &[u8]) -> Option<Record> {
    let l: Line = serde_json::from_slice(line).ok()?;
    let prev: [u8; 32] = hex::decode(&l.prev).ok()?.try_into().ok()?;
    let nonce = hex::decode(&l.nonce).ok()?;
    let mut ct = B64.decode(&l.ct).ok()?;
    let n = keys.open(l.seq, &prev, &nonce, &mut ct)?;
    ct.truncate(n);
    let mut rec: Record = serde_json::from_slice(&ct).ok()?;
    rec.seq = l.seq;
    Some(rec)
}

/// Read access to a trail (search, verify) for the front ends, which know
/// no paths or keys.
pub struct AuditReader {
    dir: PathBuf,
    keys: Arc<AuditKeys>,
}

impl AuditReader {
    /// A reader of the trail in `dir`.
    pub fn new(dir: &Path, keys: Arc<AuditKeys>) -> AuditReader {
        AuditReader {
            dir: dir.to_path_buf(),
            keys,
        }
    }

    /// The last `limit` records matching `filter`, oldest first, and the
    /// number of records that could not be decrypted. Streams the trail;
    /// memory is bounded by `limit`.
    ///
    /// # Errors
    /// [`AuditError::Missing`], [`AuditError::Io`].
    pub fn search(&self, filter: &super::Filter, limit: usize) -> Result<(Vec<Record>, u64)> {
        let mut out = std::collections::VecDeque::new();
        let unreadable = read(&self.dir, &self.keys, |r| {
            if filter.matches(&r) {
                if out.len() == limit {
                    out.pop_front();
                }
                out.push_back(r);
            }
            true
        })?;
        Ok((out.into_iter().collect(), unreadable))
    }

    /// A cursor over the records from sequence number `seq` on (the
    /// syslog exporter's way of following the trail, whoever appends to
    /// it). Positioning reads the lines before `seq` without decrypting
    /// them.
    ///
    /// # Errors
    /// [`AuditError::Missing`], [`AuditError::Io`].
    pub fn read_from(&self, seq: u64) -> Result<TrailCursor> {
        let rpath = self.dir.join(RECORDS);
        let f = File::open(&rpath).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                AuditError::Missing(self.dir.clone())
            } else {
                AuditError::Io {
                    op: "open",
                    path: rpath.clone(),
                    source: e,
                }
            }
        })?;
        let mut c = TrailCursor {
            path: rpath,
            keys: self.keys.clone(),
            file: BufReader::with_capacity(256 * 1024, f),
            offset: 0,
            next: 0,
            buf: Vec::new(),
        };
        while c.next < seq {
            if !c.advance()? {
                break;
            }
        }
        Ok(c)
    }

    /// [`verify`] on this trail.
    ///
    /// # Errors
    /// As [`verify`].
    pub fn verify(&self) -> Result<VerifyReport> {
        verify(&self.dir, &self.keys)
    }
}

/// Reads the trail forward from a record ([`AuditReader::read_from`]),
/// picking up records appended later, by any process, on the next call.
pub struct TrailCursor {
    path: PathBuf,
    keys: Arc<AuditKeys>,
    file: BufReader<File>,
    /// Byte offset of the next line.
    offset: u64,
    /// Sequence number (line number) of the next line.
    next: u64,
    buf: Vec<u8>,
}

impl TrailCursor {
    /// Sequence number of the next record [`TrailCursor::next_record`] returns.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// The next complete record: `Ok(None)` at the end of the trail (a line
    /// still being written counts as the end, and is read whole later);
    /// `Some((seq, None))` for a record that does not decrypt (run
    /// [`verify`]), which is passed over.
    ///
    /// # Errors
    /// [`AuditError::Io`].
    pub fn next_record(&mut self) -> Result<Option<(u64, Option<Record>)>> {
        let seq = self.next;
        if !self.advance()? {
            return Ok(None);
        }
        let rec = decode(&self.keys, &self.buf).filter(|r| r.seq == seq);
        Ok(Some((seq, rec)))
    }

    /// Reads the next complete line into `buf`; `false` (position kept) at
    /// the end or before a partial line.
    fn advance(&mut self) -> Result<bool> {
        use std::io::{Seek, SeekFrom};
        match read_line(&mut self.file, &mut self.buf).map_err(io("read", &self.path))? {
            Some(true) => {
                self.offset += self.buf.len() as u64 + 1;
                self.next += 1;
                Ok(true)
            }
            Some(false) => {
                self.file
                    .seek(SeekFrom::Start(self.offset))
                    .map_err(io("seek", &self.path))?;
                Ok(false)
            }
            None => Ok(false),
        }
    }
}
