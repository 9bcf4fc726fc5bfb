//! Encrypted spool for received data too large to hold in memory.
//!
//! A dataset being received over DICOM (PS3.8 P-DATA fragments) or a STOW-RS
//! part (PS3.18 §10.5) that outgrows its share of the memory budget goes on
//! here instead of being refused. The bytes never reach the disk in
//! plaintext:
//!
//! - the file is anonymous (`O_TMPFILE` through [`tempfile::tempfile_in`]):
//!   it has no name, so nothing else can open it, and the kernel frees it
//!   when the spool is dropped or the process dies — no sweep is needed;
//! - it is encrypted with AES-256-GCM under a random key made for this spool
//!   alone and held only in memory (zeroized on drop), so even the blocks
//!   left on the disk after a crash cannot be read;
//! - it is cut into [`SPOOL_SEGMENT`]-byte segments, segment `i` sealed with
//!   nonce `u32 0 || u64 i` and AAD `u64 i`, so any segment can be read back
//!   on its own (random access for the dataset scan) and a changed or moved
//!   segment fails authentication.
//!
//! The spool holds one plaintext segment in memory while writing and one
//! while reading (1 MiB each): that is all the memory a spooled dataset of
//! any size costs.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};

use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::Zeroizing;

use crate::{io_err, Cipher, StoreError};

/// Plaintext bytes per spool segment (1 MiB).
pub const SPOOL_SEGMENT: usize = 1 << 20;
const TAG: usize = 16;

/// A spool being written: append bytes, then [`finish`](Spool::finish).
pub struct Spool {
    file: File,
    dir: PathBuf,
    cipher: Cipher,
    /// The plaintext of the segment being filled (at most [`SPOOL_SEGMENT`]).
    pending: Vec<u8>,
    /// Segments written so far.
    segments: u64,
    /// Plaintext bytes appended so far.
    len: u64,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("len", &self.len).finish()
    }
}

impl Spool {
    /// A new, empty spool: an anonymous file in `dir` (created 0700 if
    /// missing), under a fresh random key.
    ///
    /// # Errors
    /// [`StoreError::NoSpace`] or [`StoreError::Io`] naming `dir`.
    pub fn create(dir: &Path) -> Result<Spool, StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_err("create directory", dir, e))?;
        let file =
            tempfile::tempfile_in(dir).map_err(|e| io_err("create a spool file in", dir, e))?;
        let mut key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(key.as_mut());
        Ok(Spool {
            file,
            dir: dir.to_path_buf(),
            cipher: Cipher::new(key.as_ref())?,
            pending: Vec::new(),
            segments: 0,
            len: 0,
        })
    }

    /// Plaintext bytes appended so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was appended yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `bytes`, sealing and writing each segment as it fills.
    ///
    /// # Errors
    /// [`StoreError::NoSpace`] when the disk is full, [`StoreError::Io`]
    /// otherwise; the spool is of no further use then (drop it).
    pub fn append(&mut self, mut bytes: &[u8]) -> Result<(), StoreError> {
        while !bytes.is_empty() {
            if self.pending.capacity() < SPOOL_SEGMENT + TAG {
                self.pending
                    .reserve_exact(SPOOL_SEGMENT + TAG - self.pending.len());
            }
            let take = bytes.len().min(SPOOL_SEGMENT - self.pending.len());
            let (now, rest) = bytes.split_at(take);
            self.pending.extend_from_slice(now);
            self.len += take as u64;
            bytes = rest;
            if self.pending.len() == SPOOL_SEGMENT {
                self.seal_pending()?;
            }
        }
        Ok(())
    }

    fn seal_pending(&mut self) -> Result<(), StoreError> {
        let i = self.segments;
        self.cipher
            .encrypt_in_place(&nonce(i), &i.to_be_bytes(), &mut self.pending)
            .map_err(|()| StoreError::Crypto {
                op: "sealing a spool segment",
            })?;
        let at = i * (SPOOL_SEGMENT + TAG) as u64;
        self.file
            .write_all_at(&self.pending, at)
            .map_err(|e| io_err("write a spool segment in", &self.dir, e))?;
        self.pending.clear();
        self.segments += 1;
        Ok(())
    }

    /// Seals the last segment and hands the spool over for reading. Not
    /// fsynced: a spool only lives as long as the transfer it holds.
    ///
    /// # Errors
    /// As [`append`](Spool::append).
    pub fn finish(mut self) -> Result<Spooled, StoreError> {
        if !self.pending.is_empty() {
            self.seal_pending()?;
        }
        let _ = self.file.flush();
        Ok(Spooled {
            file: self.file,
            cipher: self.cipher,
            len: self.len,
            cache: RefCell::new((u64::MAX, Vec::new())),
        })
    }
}

/// A finished spool: the received bytes, readable at any offset
/// ([`read_at`](Spooled::read_at)) or as a stream ([`reader`](Spooled::reader)).
/// Freed (file and key) when dropped. `Send`, not `Sync` (one segment cache).
pub struct Spooled {
    file: File,
    cipher: Cipher,
    len: u64,
    /// The last segment decrypted: (index, plaintext).
    cache: RefCell<(u64, Vec<u8>)>,
}

impl std::fmt::Debug for Spooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spooled").field("len", &self.len).finish()
    }
}

impl Spooled {
    /// Plaintext length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the spool holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills `out` with the plaintext at byte `at`.
    ///
    /// # Errors
    /// [`io::ErrorKind::UnexpectedEof`] past the end; [`io::ErrorKind::InvalidData`]
    /// when a segment fails authentication (the spool file was changed).
    pub fn read_at(&self, mut at: u64, mut out: &mut [u8]) -> io::Result<()> {
        if at.saturating_add(out.len() as u64) > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the spool",
            ));
        }
        while !out.is_empty() {
            let seg = at / SPOOL_SEGMENT as u64;
            let off = (at % SPOOL_SEGMENT as u64) as usize;
            let mut cache = self.cache.borrow_mut();
            if cache.0 != seg {
                self.load(seg, &mut cache.1)?;
                cache.0 = seg;
            }
            let avail = cache.1.get(off..).unwrap_or_default();
            let n = avail.len().min(out.len());
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "spool segment shorter than recorded",
                ));
            }
            let (head, tail) = out.split_at_mut(n);
            head.copy_from_slice(&avail[..n]);
            out = tail;
            at += n as u64;
        }
        Ok(())
    }

    fn load(&self, seg: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        let start = seg * SPOOL_SEGMENT as u64;
        let plain = (self.len - start).min(SPOOL_SEGMENT as u64) as usize;
        buf.clear();
        buf.resize(plain + TAG, 0);
        self.file
            .read_exact_at(buf, seg * (SPOOL_SEGMENT + TAG) as u64)?;
        self.cipher
            .decrypt_in_place(&nonce(seg), &seg.to_be_bytes(), buf)
            .map_err(|()| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a spool segment failed authentication",
                )
            })
    }

    /// The bytes from `from` to the end, as a stream.
    pub fn reader(&self, from: u64) -> SpoolReader<'_> {
        SpoolReader {
            spool: self,
            at: from.min(self.len),
        }
    }
}

/// Sequential reader over a [`Spooled`] (see [`Spooled::reader`]).
pub struct SpoolReader<'a> {
    spool: &'a Spooled,
    at: u64,
}

impl Read for SpoolReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let left = self.spool.len - self.at;
        let n = (out.len() as u64).min(left) as usize;
        // One segment at a time keeps each read to one decryption.
        let to_boundary = SPOOL_SEGMENT - (self.at % SPOOL_SEGMENT as u64) as usize;
        let n = n.min(to_boundary);
        if n == 0 {
            return Ok(0);
        }
        self.spool.read_at(self.at, &mut out[..n])?;
        self.at += n as u64;
        Ok(n)
    }
}

fn nonce(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&i.to_be_bytes());
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 1000) as u8).collect()
    }

    #[test]
    fn round_trip_random_access_and_stream() {
        let dir = tempfile::tempdir().expect("dir");
        let data = pattern(3 * SPOOL_SEGMENT + 12345);
        let mut spool = Spool::create(dir.path()).expect("spool");
        // Appended in odd pieces, across segment boundaries.
        for piece in data.chunks(77_777) {
            spool.append(piece).expect("append");
        }
        let spooled = spool.finish().expect("finish");
        assert_eq!(spooled.len(), data.len() as u64);
        let mut all = Vec::new();
        spooled.reader(0).read_to_end(&mut all).expect("read");
        assert_eq!(all, data);
        let mut tail = Vec::new();
        spooled
            .reader(1_500_000)
            .read_to_end(&mut tail)
            .expect("read");
        assert_eq!(tail, data[1_500_000..]);
        // Random access across a segment boundary, backwards too.
        for at in [SPOOL_SEGMENT * 2 - 3, 5, SPOOL_SEGMENT * 3 + 12340] {
            let mut out = [0u8; 5];
            spooled.read_at(at as u64, &mut out).expect("read_at");
            assert_eq!(out, data[at..at + 5]);
        }
        let mut out = [0u8; 6];
        assert_eq!(
            spooled
                .read_at(data.len() as u64 - 5, &mut out)
                .expect_err("past the end")
                .kind(),
            io::ErrorKind::UnexpectedEof
        );
        // Nothing named is left in the directory: the file is anonymous.
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
    }

    #[test]
    fn the_file_holds_no_plaintext_and_changes_are_detected() {
        let dir = tempfile::tempdir().expect("dir");
        let marker = b"SPOOL^MARKER^PATIENT";
        let mut data = Vec::new();
        while data.len() < 2 * SPOOL_SEGMENT {
            data.extend_from_slice(marker);
        }
        let mut spool = Spool::create(dir.path()).expect("spool");
        spool.append(&data).expect("append");
        let spooled = spool.finish().expect("finish");
        let mut raw = Vec::new();
        (&spooled.file).read_to_end(&mut raw).expect("raw");
        assert_eq!(raw.len(), data.len() + 3 * TAG);
        assert!(!raw.windows(marker.len()).any(|w| w == marker));
        // Flip one ciphertext byte of the second segment.
        let at = (SPOOL_SEGMENT + TAG + 10) as u64;
        let mut b = [0u8; 1];
        spooled.file.read_exact_at(&mut b, at).expect("byte");
        spooled.file.write_all_at(&[b[0] ^ 1], at).expect("flip");
        let mut out = [0u8; 4];
        spooled.read_at(0, &mut out).expect("first segment intact");
        assert_eq!(
            spooled
                .read_at(SPOOL_SEGMENT as u64 + 1, &mut out)
                .expect_err("tampered")
                .kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn empty_spool() {
        let dir = tempfile::tempdir().expect("dir");
        let spooled = Spool::create(dir.path())
            .expect("spool")
            .finish()
            .expect("finish");
        assert!(spooled.is_empty());
        let mut all = Vec::new();
        spooled.reader(0).read_to_end(&mut all).expect("read");
        assert!(all.is_empty());
    }
}
