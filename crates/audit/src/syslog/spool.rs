//! The encrypted, append-only syslog spool.
//!
//! ```text
//! DIR/spool/syslog/<first seq, 20 digits>.seg   records, appended
//! DIR/spool/syslog/delivered                    last sequence number delivered (decimal)
//! ```
//!
//! A record is `len: u32 BE | seq: u64 BE | nonce: 12 bytes | ciphertext`,
//! where `len` counts everything after itself and the ciphertext is
//! AES-256-GCM (random nonce, AAD = `bastion syslog spool v1` | seq) of
//! `severity: u8 | timestamp: i64 BE Unix microseconds | source seq: u64 BE
//! | message (UTF-8)`. Messages name patients, so the file system only sees
//! ciphertext. Sequence numbers start at 1 and increase by one per record
//! across segments; a new segment starts past [`SEGMENT_BYTES`]; segments
//! whose records were all delivered are deleted.
//!
//! [`Spool::append`] returns only after the record is on disk (`fdatasync`,
//! one for all records appended concurrently). `delivered` is replaced
//! atomically (write, fsync, rename, fsync directory). On open, a torn or
//! unauthenticated tail (a crash during a write) is cut off and reported.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::{io_err, LogError, Result};

/// A segment is closed once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 16 << 20;

/// Largest message accepted, bytes (a PS3.15 audit message is a few KiB).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

const AAD_PREFIX: &[u8] = b"bastion syslog spool v1";
const HEADER: usize = 4 + 8 + 12;
const DELIVERED: &str = "delivered";

/// One spooled message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledMessage {
    /// Spool sequence number (1, 2, …).
    pub seq: u64,
    /// Syslog severity (RFC 5424 §6.2.1, 0–7).
    pub severity: u8,
    /// When the message was spooled, Unix microseconds.
    pub timestamp_us: i64,
    /// The producer's own sequence number (the audit record number).
    pub source_seq: u64,
    /// The message text.
    pub message: String,
}

/// The spool. `Send + Sync`: appends are serialised, reads use their own
/// file handles.
pub struct Spool {
    dir: PathBuf,
    key: LessSafeKey,
    state: Mutex<WriteState>,
    sync: Mutex<u64>,
}

struct WriteState {
    file: File,
    segment_len: u64,
    /// Sequence number of the last record written (0: none).
    last: u64,
    /// The source sequence number of the last record written, and how many
    /// records at the end carry it (a trail record with two messages).
    last_source: Option<(u64, u32)>,
}

impl Spool {
    /// Opens (creating, mode 0700) the spool in `dir`.
    ///
    /// # Errors
    /// [`LogError::Io`]; [`LogError::Invalid`] for an unusable key.
    pub fn open(dir: &Path, key: &[u8; 32]) -> Result<Spool> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create", dir))?;
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| {
            LogError::Invalid {
                what: "syslog spool key",
                detail: "not an AES-256 key".into(),
            }
        })?);
        let segments = segments(dir)?;
        let delivered = read_delivered(dir)?;
        let mut last_source = None;
        let (file, segment_len, last) = match segments.last() {
            Some(&(first, ref path)) => {
                let Scan {
                    valid: valid_len,
                    last,
                    tail,
                } = scan_segment(&key, path, first)?;
                last_source = tail;
                // A segment created just before a crash holds nothing yet:
                // the source position is in the one before.
                if last_source.is_none() && segments.len() > 1 {
                    let (first, ref path) = segments[segments.len() - 2];
                    last_source = scan_segment(&key, path, first)?.tail;
                }
                let mut file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io_err("open", path))?;
                let len = file.metadata().map_err(io_err("stat", path))?.len();
                if len > valid_len {
                    tracing::warn!(path = %path.display(), bytes = len - valid_len,
                        "syslog spool: cut off a record whose write was interrupted");
                    file.set_len(valid_len).map_err(io_err("truncate", path))?;
                    file.sync_all().map_err(io_err("fsync", path))?;
                }
                file.seek(SeekFrom::End(0)).map_err(io_err("seek", path))?;
                (file, valid_len, last.unwrap_or(first - 1).max(delivered))
            }
            None => {
                let first = delivered + 1;
                let path = segment_path(dir, first);
                (create_segment(dir, &path)?, 0, delivered)
            }
        };
        Ok(Spool {
            dir: dir.to_path_buf(),
            key,
            state: Mutex::new(WriteState {
                file,
                segment_len,
                last,
                last_source,
            }),
            sync: Mutex::new(last),
        })
    }

    /// Appends one message; returns its sequence number once it is on disk.
    ///
    /// # Errors
    /// [`LogError::Io`]; [`LogError::Invalid`] for a message over
    /// [`MAX_MESSAGE_BYTES`].
    pub fn append(
        &self,
        severity: u8,
        timestamp_us: i64,
        source_seq: u64,
        message: &str,
    ) -> Result<u64> {
        let seq = self.append_unsynced(severity, timestamp_us, source_seq, message)?;
        self.sync_upto(seq)?;
        Ok(seq)
    }

    /// Appends one message without waiting for the disk: readers see it
    /// only after [`Spool::sync`] (a batch of appends, one `fdatasync`).
    ///
    /// # Errors
    /// As [`Spool::append`].
    pub fn append_unsynced(
        &self,
        severity: u8,
        timestamp_us: i64,
        source_seq: u64,
        message: &str,
    ) -> Result<u64> {
        if message.len() > MAX_MESSAGE_BYTES {
            return Err(LogError::Invalid {
                what: "syslog message",
                detail: format!("{} bytes, more than {MAX_MESSAGE_BYTES}", message.len()),
            });
        }
        let seq = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let seq = st.last + 1;
            if st.segment_len >= SEGMENT_BYTES {
                // Everything before this segment must be durable before the
                // new file can be the only one written (and synced) later.
                st.file.sync_data().map_err(io_err("fsync", &self.dir))?;
                let path = segment_path(&self.dir, seq);
                st.file = create_segment(&self.dir, &path)?;
                st.segment_len = 0;
            }
            let mut plain = Vec::with_capacity(17 + message.len() + 16);
            plain.push(severity);
            plain.extend_from_slice(&timestamp_us.to_be_bytes());
            plain.extend_from_slice(&source_seq.to_be_bytes());
            plain.extend_from_slice(message.as_bytes());
            let mut nonce = [0u8; 12];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
            self.key
                .seal_in_place_append_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad(seq)),
                    &mut plain,
                )
                .map_err(|_| LogError::Invalid {
                    what: "syslog spool record",
                    detail: "encryption failed".into(),
                })?;
            let len = u32::try_from(8 + 12 + plain.len()).unwrap_or(u32::MAX);
            let mut rec = Vec::with_capacity(HEADER + plain.len());
            rec.extend_from_slice(&len.to_be_bytes());
            rec.extend_from_slice(&seq.to_be_bytes());
            rec.extend_from_slice(&nonce);
            rec.extend_from_slice(&plain);
            if let Err(e) = st.file.write_all(&rec) {
                // A partial record (a full disk) must not stay in front of
                // the next one: cut the segment back to its last whole
                // record, so the retry writes this sequence number again
                // at the right place. A failure to cut is reported; the
                // open-time scan cuts a torn tail too.
                let keep = st.segment_len;
                if let Err(t) = st
                    .file
                    .set_len(keep)
                    .and_then(|()| st.file.seek(SeekFrom::Start(keep)).map(|_| ()))
                {
                    tracing::error!(dir = %self.dir.display(), error = %t,
                        "syslog spool: cannot cut off a partial record");
                }
                return Err(io_err("append to", &self.dir)(e));
            }
            st.segment_len += rec.len() as u64;
            st.last = seq;
            st.last_source = match st.last_source {
                Some((src, n)) if src == source_seq => Some((src, n + 1)),
                _ => Some((source_seq, 1)),
            };
            seq
        };
        Ok(seq)
    }

    /// Makes every record appended so far durable and readable.
    ///
    /// # Errors
    /// [`LogError::Io`].
    pub fn sync(&self) -> Result<()> {
        let last = self.state.lock().unwrap_or_else(|p| p.into_inner()).last;
        self.sync_upto(last)
    }

    /// The source sequence number (audit record number) of the last record
    /// appended, and how many records at the end of the spool carry it;
    /// `None` for an empty spool. Where following the trail resumes.
    pub fn last_source(&self) -> Option<(u64, u32)> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_source
    }

    /// Sequence number of the last record durably appended.
    pub fn last_synced(&self) -> u64 {
        *self.sync.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last sequence number marked delivered.
    ///
    /// # Errors
    /// [`LogError::Io`] when `delivered` cannot be read.
    pub fn delivered(&self) -> Result<u64> {
        read_delivered(&self.dir)
    }

    /// Records that every message up to `seq` was delivered (durably), and
    /// deletes segments holding only delivered records.
    ///
    /// # Errors
    /// [`LogError::Io`].
    pub fn set_delivered(&self, seq: u64) -> Result<()> {
        let tmp = self.dir.join("delivered.tmp");
        let path = self.dir.join(DELIVERED);
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(format!("{seq}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
        sync_dir(&self.dir)?;
        // A segment can go when the next one starts at or before seq + 1.
        let segs = segments(&self.dir)?;
        for pair in segs.windows(2) {
            if pair[1].0 <= seq + 1 {
                std::fs::remove_file(&pair[0].1).map_err(io_err("remove", &pair[0].1))?;
            }
        }
        Ok(())
    }

    /// A reader positioned at the first record with a sequence number ≥ `from`.
    pub fn reader(&self, from: u64) -> SpoolReader<'_> {
        SpoolReader {
            spool: self,
            next: from.max(1),
            file: None,
        }
    }

    fn sync_upto(&self, seq: u64) -> Result<()> {
        let mut synced = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        if *synced >= seq {
            return Ok(());
        }
        // Group commit: one fdatasync covers every record written so far.
        let (file, last) = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            (
                st.file.try_clone().map_err(io_err("dup", &self.dir))?,
                st.last,
            )
        };
        file.sync_data().map_err(io_err("fsync", &self.dir))?;
        *synced = last.max(*synced);
        Ok(())
    }

    fn open_record(&self, seq: u64, nonce: &[u8], mut ct: Vec<u8>) -> Option<SpooledMessage> {
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad(seq)), &mut ct)
            .ok()?;
        if plain.len() < 17 {
            return None;
        }
        let severity = plain[0];
        let timestamp_us = i64::from_be_bytes(plain[1..9].try_into().ok()?);
        let source_seq = u64::from_be_bytes(plain[9..17].try_into().ok()?);
        let message = String::from_utf8(plain[17..].to_vec()).ok()?;
        Some(SpooledMessage {
            seq,
            severity,
            timestamp_us,
            source_seq,
            message,
        })
    }
}

/// Reads records in sequence order, never past the last durable one.
pub struct SpoolReader<'a> {
    spool: &'a Spool,
    next: u64,
    file: Option<(File, u64)>,
}

impl SpoolReader<'_> {
    /// The next record, or `None` when every durable record was read.
    ///
    /// # Errors
    /// [`LogError::Io`]; [`LogError::Invalid`] for a record that
    /// does not authenticate or a gap in the sequence.
    pub fn next_message(&mut self) -> Result<Option<SpooledMessage>> {
        if self.next > self.spool.last_synced() {
            return Ok(None);
        }
        loop {
            if self.file.is_none() {
                let segs = segments(&self.spool.dir)?;
                let Some((first, path)) = segs.iter().rev().find(|(f, _)| *f <= self.next) else {
                    return Err(corrupt(format!(
                        "no segment holds sequence number {}",
                        self.next
                    )));
                };
                let f = File::open(path).map_err(io_err("open", path))?;
                self.file = Some((f, *first));
            }
            let Some((file, _)) = self.file.as_mut() else {
                continue;
            };
            let mut header = [0u8; HEADER];
            if !read_exact_or_eof(file, &mut header)? {
                // End of this segment: the next one starts at self.next.
                let path = segment_path(&self.spool.dir, self.next);
                if path.exists() {
                    self.file =
                        Some((File::open(&path).map_err(io_err("open", &path))?, self.next));
                    continue;
                }
                return Ok(None);
            }
            let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let seq = u64::from_be_bytes(header[4..12].try_into().unwrap_or_default());
            if !(20 + 16..=20 + 17 + MAX_MESSAGE_BYTES + 16).contains(&len) {
                return Err(corrupt(format!("record {seq}: impossible length {len}")));
            }
            let mut ct = vec![0u8; len - 20];
            if !read_exact_or_eof(file, &mut ct)? {
                return Err(corrupt(format!("record {seq} is cut short")));
            }
            if seq < self.next {
                continue;
            }
            if seq != self.next {
                return Err(corrupt(format!(
                    "expected record {}, found {seq}",
                    self.next
                )));
            }
            let msg = self
                .spool
                .open_record(seq, &header[12..24], ct)
                .ok_or_else(|| corrupt(format!("record {seq} does not authenticate")))?;
            self.next = seq + 1;
            return Ok(Some(msg));
        }
    }
}

fn corrupt(detail: String) -> LogError {
    LogError::Invalid {
        what: "syslog spool",
        detail,
    }
}

fn aad(seq: u64) -> Vec<u8> {
    let mut a = AAD_PREFIX.to_vec();
    a.extend_from_slice(&seq.to_be_bytes());
    a
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

/// The segments, by first sequence number.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err("read", dir))? {
        let e = e.map_err(io_err("read", dir))?;
        let name = e.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
            continue;
        };
        if let Ok(first) = stem.parse::<u64>() {
            if first > 0 {
                out.push((first, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn create_segment(dir: &Path, path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))?;
    sync_dir(dir)?;
    Ok(f)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

fn read_delivered(dir: &Path) -> Result<u64> {
    let path = dir.join(DELIVERED);
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse().map_err(|_| {
            corrupt(format!(
                "{} does not hold a sequence number",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

/// What [`scan_segment`] found in a segment.
struct Scan {
    /// Length of the valid prefix.
    valid: u64,
    /// Sequence number of its last record.
    last: Option<u64>,
    /// Source sequence number of its last record, and how many records at
    /// its end carry it.
    tail: Option<(u64, u32)>,
}

/// Scans a segment.
/// A record cut short (a crash during its write) ends the valid prefix; a
/// complete record that does not authenticate is an error (another key, or
/// damage), never silently cut off.
fn scan_segment(key: &LessSafeKey, path: &Path, first: u64) -> Result<Scan> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut valid = 0u64;
    let mut last = None;
    let mut tail: Option<(u64, u32)> = None;
    let mut expect = first;
    loop {
        let mut header = [0u8; HEADER];
        if !read_exact_or_eof(&mut f, &mut header).unwrap_or(false) {
            break;
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let seq = u64::from_be_bytes(header[4..12].try_into().unwrap_or_default());
        let mut ct = vec![0u8; len.saturating_sub(20).min(MAX_MESSAGE_BYTES + 64)];
        if !read_exact_or_eof(&mut f, &mut ct).unwrap_or(false) {
            break;
        }
        let source = (seq == expect && (20 + 16..=20 + 17 + MAX_MESSAGE_BYTES + 16).contains(&len))
            .then(|| Nonce::try_assume_unique_for_key(&header[12..24]).ok())
            .flatten()
            .and_then(|n| key.open_in_place(n, Aad::from(aad(seq)), &mut ct).ok())
            .and_then(|plain| plain.get(9..17).and_then(|b| b.try_into().ok()))
            .map(u64::from_be_bytes);
        let Some(source) = source else {
            return Err(corrupt(format!(
                "{}: record {} at byte {valid} does not decrypt (another master key, or damage)",
                path.display(),
                expect
            )));
        };
        tail = match tail {
            Some((src, n)) if src == source => Some((src, n + 1)),
            _ => Some((source, 1)),
        };
        valid += (4 + len) as u64;
        last = Some(seq);
        expect += 1;
    }
    Ok(Scan { valid, last, tail })
}

/// Fills `buf`; `false` at a clean end of file before the first byte, an
/// error for a partial read.
fn read_exact_or_eof(f: &mut File, buf: &mut [u8]) -> Result<bool> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) if n == 0 => return Ok(false),
            Ok(0) => {
                return Err(corrupt("a record is cut short".into()));
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read", Path::new("syslog spool"))(e)),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_messages_survive_a_reopen_and_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = [3u8; 32];
        let spool = Spool::open(dir.path(), &key).expect("open");
        for i in 1..=5u64 {
            assert_eq!(
                spool
                    .append(5, 1, i * 10, &format!("m{i}"))
                    .expect("append"),
                i
            );
        }
        drop(spool);
        // a crash in the middle of a write leaves a partial record
        let seg = segment_path(dir.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&seg).expect("seg");
        f.write_all(&[0, 0, 0, 60, 0, 0]).expect("write");
        drop(f);
        let spool = Spool::open(dir.path(), &key).expect("reopen");
        let mut r = spool.reader(3);
        let m = r.next_message().expect("read").expect("some");
        assert_eq!((m.seq, m.source_seq, m.message.as_str()), (3, 30, "m3"));
        assert_eq!(spool.append(4, 2, 60, "m6").expect("append"), 6);
        let rest: Vec<u64> = std::iter::from_fn(|| r.next_message().expect("read"))
            .map(|m| m.seq)
            .collect();
        assert_eq!(rest, [4, 5, 6]);
        // the plaintext never reaches the disk
        let raw = std::fs::read(&seg).expect("raw");
        assert!(!raw.windows(2).any(|w| w == b"m3"));
    }

    #[test]
    fn delivered_segments_are_removed_and_sequence_continues() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = [4u8; 32];
        let spool = Spool::open(dir.path(), &key).expect("open");
        let big = "x".repeat(MAX_MESSAGE_BYTES);
        let n = SEGMENT_BYTES / MAX_MESSAGE_BYTES as u64 + 2;
        for _ in 0..n {
            spool.append(5, 0, 0, &big).expect("append");
        }
        assert!(segments(dir.path()).expect("segs").len() >= 2);
        spool.set_delivered(n).expect("delivered");
        assert_eq!(segments(dir.path()).expect("segs").len(), 1);
        drop(spool);
        let spool = Spool::open(dir.path(), &key).expect("reopen");
        assert_eq!(spool.delivered().expect("delivered"), n);
        assert_eq!(spool.append(5, 0, 0, "next").expect("append"), n + 1);
        let m = spool
            .reader(n + 1)
            .next_message()
            .expect("read")
            .expect("some");
        assert_eq!(m.message, "next");
    }

    #[test]
    fn another_key_is_refused_and_nothing_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), &[1; 32]).expect("open");
        spool.append(5, 0, 0, "secret").expect("append");
        drop(spool);
        assert!(Spool::open(dir.path(), &[2; 32]).is_err());
        let spool = Spool::open(dir.path(), &[1; 32]).expect("reopen");
        let m = spool.reader(1).next_message().expect("read").expect("some");
        assert_eq!(m.message, "secret");
    }
}
