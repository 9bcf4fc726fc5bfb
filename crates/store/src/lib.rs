//! Encrypted blob store: opaque byte blobs, encrypted at rest with envelope encryption.
//!
//! The filesystem only ever sees ciphertext. The store knows nothing of DICOM: callers
//! hand it bytes and get back a random [`BlobId`] plus a [`BlobInfo`] (plaintext length
//! and SHA-256). Blob names are random and never derived from any input, so no caller
//! data can steer a path.
//!
//! Two object backends sit under the one blob format (the envelope encryption and the
//! SHA-256 stay here, above them, so a backend only ever sees ciphertext under random
//! names):
//!
//! - a local directory ([`BlobStore::open`], the embedded default): home-made rather
//!   than `object_store`'s local backend, which neither exposes the
//!   write-fsync-rename-fsync(dir) publish sequence this crate guarantees nor keeps
//!   `ENOSPC` distinguishable (needed for DICOM status 0xA700);
//! - an S3-compatible object store ([`BlobStore::open_s3`], `s3://BUCKET?endpoint=…`,
//!   see [`S3Location`]) through the `object_store` crate: single PUT for small blobs,
//!   multipart upload for large ones, range reads of about 1 MiB handed out segment by
//!   segment, never a
//!   conditional write (Garage ignores `If-None-Match`) and never a listing for
//!   correctness (only for the age-guarded orphan sweep). Its failures are
//!   [`StoreError::Unavailable`] / [`StoreError::Denied`], never a false success.
//!
//! # Main types
//!
//! - [`MasterKey`]: the 32-byte root secret; derives the key-encryption key (KEK), the
//!   key id recorded in each blob, and purpose-bound keys for other crates
//!   ([`MasterKey::derive`], e.g. the index key `"bastion index v1"`).
//! - [`BlobStore`]: encrypted blobs with a durable, atomic [`put`](BlobStore::put): in a
//!   local directory (write to `tmp/`, fsync, rename, fsync directory) or in an S3
//!   bucket (the object exists only once its PUT or multipart completion succeeded).
//! - [`BlobReader`]: streaming, authenticated decryption of one blob.
//! - [`StoreError`]: the one error type; [`StoreError::NoSpace`] is distinct so that the
//!   caller can answer "out of resources" (DICOM status 0xA700).
//!
//! # Example
//!
//! ```
//! # fn main() -> Result<(), bastion_store::StoreError> {
//! # let dir = std::env::temp_dir().join(format!("bastion-store-doc-{}", std::process::id()));
//! use bastion_store::{BlobStore, MasterKey};
//! let store = BlobStore::open(&dir, MasterKey::generate())?;
//! let info = store.put(b"opaque bytes")?;
//! assert_eq!(store.get(&info.id)?, b"opaque bytes");
//! store.delete(&info.id)?;
//! # let _ = std::fs::remove_dir_all(&dir);
//! # Ok(()) }
//! ```
//!
//! # On-disk layout
//!
//! ```text
//! <root>/                 mode 0700 when created by the store
//! <root>/tmp/<32 hex>.tmp blobs being written (removed on failure; see BlobStore::sweep_tmp)
//! <root>/<ab>/<abcd…>     published blobs; <ab> = first two hex chars of the id
//! ```
//!
//! # Blob file format, versions 1 and 2
//!
//! All integers are big-endian. The header is [`HEADER_LEN`] = 96 bytes:
//!
//! | offset | length | field |
//! |-------:|-------:|-------|
//! | 0  | 8  | magic `b"BSTNBLB1"` |
//! | 8  | 1  | format version, `2` (`1` still read) |
//! | 9  | 4  | `segment_size`: plaintext bytes per segment (65536 when written by this version) |
//! | 13 | 16 | key id of the master key, 16 lowercase ASCII hex chars ([`MasterKey::key_id`]) |
//! | 29 | 12 | wrap nonce (random) |
//! | 41 | 48 | wrapped data key: AES-256-GCM of the 32-byte data key under KEK = `master.derive("bastion blob kek v1")`, AAD = bytes 0..29 (magic, version, segment_size, key id) followed, in version 2, by the blob's id (its 32 hex characters) |
//! | 89 | 7  | random nonce prefix for the segments |
//!
//! The header is followed by one or more segments. Segment `i` (counting from 0) is
//! AES-256-GCM under the data key of up to `segment_size` plaintext bytes, with nonce
//! `prefix(7) || u32 i || u8 last` (`last` = 1 for the final segment, else 0) and AAD =
//! the whole 96-byte header; its ciphertext is the plaintext length + 16 bytes (tag).
//! Every segment but the last holds exactly `segment_size` plaintext bytes; the last
//! holds 0..=`segment_size` (an empty blob is a single empty final segment).
//!
//! This is the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015): because
//! the counter and the final flag are bound into each nonce, truncation, reordering,
//! dropping or duplicating segments, and appending data are all detected as
//! authentication failures ([`StoreError::Corrupt`]). Because the header is the AAD of
//! every segment, editing any header byte is detected too.
//!
//! Version 2 binds a blob to its id: the data key unwraps only under the id it was
//! written for, so a blob file copied or renamed over another id fails authentication
//! ([`BlobReader::bound_to_id`]). Callers that map ids to content elsewhere (the index)
//! need no content hash to detect swapped files. Version 1 blobs (no binding) are still
//! read; [`BlobReader::bound_to_id`] is `false` for them.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

mod s3;

pub use s3::{S3Credentials, S3Location};

use hkdf::Hkdf;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub mod spool;
pub use spool::{Spool, Spooled};

/// Magic bytes that open every blob file (format version 1).
pub const MAGIC: &[u8; 8] = b"BSTNBLB1";
/// Blob format version written by this crate (1 is still read).
pub const FORMAT_VERSION: u8 = 2;
/// Plaintext bytes per segment written by this crate (64 KiB).
pub const SEGMENT_SIZE: u32 = 65536;
/// Length in bytes of the blob header (see the crate docs for the layout).
pub const HEADER_LEN: usize = 96;
/// HKDF `info` used to derive the blob key-encryption key from the master key.
pub const BLOB_KEK_PURPOSE: &str = "bastion blob kek v1";
/// HKDF `info` used to derive the key id from the master key.
pub const KEY_ID_PURPOSE: &str = "bastion key-id v1";

/// Largest `segment_size` a reader accepts from a header (16 MiB), bounding memory.
const MAX_SEGMENT_SIZE: u32 = 16 * 1024 * 1024;
const TAG_LEN: usize = 16;
const KEY_ID_LEN: usize = 16;
const WRAP_NONCE_LEN: usize = 12;
const WRAPPED_KEY_LEN: usize = 48;
const PREFIX_LEN: usize = 7;
const OFF_KEY_ID: usize = 13;
const OFF_WRAP_NONCE: usize = OFF_KEY_ID + KEY_ID_LEN; // 29
const OFF_WRAPPED: usize = OFF_WRAP_NONCE + WRAP_NONCE_LEN; // 41
const OFF_PREFIX: usize = OFF_WRAPPED + WRAPPED_KEY_LEN; // 89
const TMP_DIR: &str = "tmp";
const TMP_SUFFIX: &str = ".tmp";

/// Errors of the blob store.
///
/// Each variant is a failure a caller can act on; I/O failures carry the operation and
/// the path involved, and the underlying [`io::Error`] as `source`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A filesystem operation failed (other than running out of space).
    #[error("blob store: cannot {op} {path}: {source}")]
    Io {
        /// What the store was doing, e.g. `"create temp file"`.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The filesystem is full or the quota is exhausted (`ENOSPC` / `EDQUOT`).
    /// Nothing was stored; a DICOM front end answers 0xA700 (Out of Resources).
    #[error("blob store: no space left on device while writing {path}")]
    NoSpace {
        /// The file or directory being written.
        path: PathBuf,
    },
    /// A secret file grants permissions to group or others (mode & 0o077 != 0).
    #[error(
        "refusing to use {path}: it is readable or writable by group/others; run `chmod 600` on it"
    )]
    InsecurePermissions {
        /// The offending file.
        path: PathBuf,
    },
    /// A key file does not hold exactly 64 hex characters (plus an optional newline).
    #[error("invalid key file {path}: {reason}")]
    InvalidKeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The blob failed authentication or is malformed: tampered, truncated, reordered
    /// segments, bad header. The blob must not be trusted.
    #[error("blob {id} is corrupt: {reason}")]
    Corrupt {
        /// The blob.
        id: BlobId,
        /// What was detected.
        reason: String,
    },
    /// The blob was encrypted under a master key this store does not hold.
    #[error(
        "blob encrypted under unknown master key id {key_id}; is the right master key configured?"
    )]
    UnknownKey {
        /// The key id recorded in the blob header.
        key_id: String,
    },
    /// No blob with that id exists.
    #[error("blob {id} not found")]
    NotFound {
        /// The blob asked for.
        id: BlobId,
    },
    /// A string is not a valid blob id (32 lowercase hex characters).
    #[error("invalid blob id {0:?}: expected 32 lowercase hex characters")]
    InvalidBlobId(String),
    /// Reading the plaintext from the caller's reader failed (in [`BlobStore::put_reader`]).
    #[error("blob store: reading the input failed: {source}")]
    Source {
        /// The underlying error of the caller's reader.
        source: io::Error,
    },
    /// The plaintext exceeds the format's limit (2^32 segments, i.e. 256 TiB).
    #[error("blob too large for the blob format")]
    TooLarge,
    /// The AEAD refused to encrypt (cannot happen for inputs within the format limits).
    #[error("blob store: encryption failed while {op}")]
    Crypto {
        /// What was being encrypted.
        op: &'static str,
    },
    /// The object store cannot be reached or answered with an error (connection
    /// refused, timeout, 5xx, missing bucket). Nothing was stored; a DICOM front end
    /// answers 0xA700 and STOW-RS 503: retrying later may succeed.
    #[error("object store {store} unavailable while {op}: {detail}")]
    Unavailable {
        /// The bucket and endpoint (never credentials).
        store: String,
        /// What the store was doing, e.g. `"uploading a blob"`.
        op: &'static str,
        /// The client's error, with the access key id removed.
        detail: String,
    },
    /// The object store refused the credentials or the key lacks a permission
    /// (HTTP 401/403).
    #[error(
        "object store {store} refused access while {op} (check the access key and its bucket permissions): {detail}"
    )]
    Denied {
        /// The bucket and endpoint (never credentials).
        store: String,
        /// What the store was doing.
        op: &'static str,
        /// The client's error, with the access key id removed.
        detail: String,
    },
    /// A `[store] url` that cannot be used; the reason names the part at fault,
    /// never echoes credentials.
    #[error("invalid [store] url: {0}")]
    InvalidUrl(String),
}

/// Maps an I/O error to [`StoreError::NoSpace`] when it is `ENOSPC`/`EDQUOT`, else to
/// [`StoreError::Io`].
fn io_err(op: &'static str, path: &Path, source: io::Error) -> StoreError {
    match source.raw_os_error() {
        Some(code) if code == libc::ENOSPC || code == libc::EDQUOT => StoreError::NoSpace {
            path: path.to_path_buf(),
        },
        _ => StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        },
    }
}

/// The 32-byte master key. Zeroized on drop; its `Debug` output shows only the key id.
///
/// Never used directly as a cipher key: every use goes through HKDF-SHA256 with a
/// purpose string ([`MasterKey::derive`]).
#[derive(Clone)]
pub struct MasterKey {
    bytes: Zeroizing<[u8; 32]>,
}

impl MasterKey {
    /// Generates a new random master key from the operating system RNG.
    pub fn generate() -> MasterKey {
        let mut bytes = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut bytes[..]);
        MasterKey { bytes }
    }

    /// Wraps 32 raw key bytes.
    pub fn from_bytes(b: [u8; 32]) -> MasterKey {
        MasterKey {
            bytes: Zeroizing::new(b),
        }
    }

    /// The raw 32 key bytes (for backup/export; prefer [`derive`](Self::derive)).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// The public identifier of this key: 16 lowercase hex chars, the first 8 bytes of
    /// HKDF-SHA256(ikm = master, no salt, info = `"bastion key-id v1"`).
    /// Recorded in every blob header so that keys can rotate.
    pub fn key_id(&self) -> String {
        let k = self.derive(KEY_ID_PURPOSE);
        hex::encode(&k[..8])
    }

    /// Derives a 32-byte key for `purpose`: HKDF-SHA256(ikm = master, no salt,
    /// info = `purpose`). Distinct purposes give independent keys, e.g.
    /// `"bastion index v1"` for the index database key.
    pub fn derive(&self, purpose: &str) -> Zeroizing<[u8; 32]> {
        let hk = Hkdf::<Sha256>::new(None, &self.bytes[..]);
        let mut out = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 8160-byte output limit, so expand cannot fail.
        if hk.expand(purpose.as_bytes(), &mut out[..]).is_err() {
            unreachable!("HKDF-SHA256 expand of 32 bytes cannot fail");
        }
        out
    }

    /// Loads a key file holding 64 hex characters and an optional trailing newline.
    ///
    /// # Errors
    /// - [`StoreError::InsecurePermissions`] when the file mode grants any permission to
    ///   group or others (`mode & 0o077 != 0`);
    /// - [`StoreError::InvalidKeyFile`] when the content is not 64 hex chars;
    /// - [`StoreError::Io`] when the file cannot be opened or read.
    pub fn load_hex_file(path: &Path) -> Result<MasterKey, StoreError> {
        let mut file = File::open(path).map_err(|e| io_err("open key file", path, e))?;
        // fstat on the opened file: no window between the check and the read.
        let meta = file
            .metadata()
            .map_err(|e| io_err("stat key file", path, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(StoreError::InsecurePermissions {
                path: path.to_path_buf(),
            });
        }
        let mut buf = Zeroizing::new(Vec::with_capacity(80));
        // Read at most 80 bytes: a longer file is invalid anyway.
        (&mut file)
            .take(80)
            .read_to_end(&mut buf)
            .map_err(|e| io_err("read key file", path, e))?;
        let mut text: &[u8] = &buf;
        if let Some(rest) = text.strip_suffix(b"\n") {
            text = rest.strip_suffix(b"\r").unwrap_or(rest);
        }
        if text.len() != 64 {
            return Err(StoreError::InvalidKeyFile {
                path: path.to_path_buf(),
                reason: "expected exactly 64 hex characters",
            });
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text, &mut bytes[..]).map_err(|_| StoreError::InvalidKeyFile {
            path: path.to_path_buf(),
            reason: "contains a character that is not hex",
        })?;
        Ok(MasterKey { bytes })
    }

    /// Writes the key as 64 lowercase hex chars plus a newline to a new file created
    /// with mode 0600, then fsyncs the file and its directory.
    ///
    /// # Errors
    /// [`StoreError::Io`] (e.g. kind `AlreadyExists`: an existing file is never
    /// overwritten) or [`StoreError::NoSpace`].
    pub fn write_hex_file(&self, path: &Path) -> Result<(), StoreError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io_err("create key file", path, e))?;
        // Encode straight into a zeroized buffer: no unzeroized copy of the key remains.
        let mut text = Zeroizing::new([0u8; 65]);
        if hex::encode_to_slice(&self.bytes[..], &mut text[..64]).is_err() {
            unreachable!("32 bytes always encode to 64 hex chars");
        }
        text[64] = b'\n';
        file.write_all(&text[..])
            .map_err(|e| io_err("write key file", path, e))?;
        file.sync_all()
            .map_err(|e| io_err("fsync key file", path, e))?;
        if let Some(parent) = path.parent() {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            fsync_dir(parent)?;
        }
        Ok(())
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

/// Identifier of a stored blob: 32 lowercase hex chars (128 random bits).
///
/// The only constructors are [`BlobId::parse`] and the store itself, so a `BlobId` can
/// never contain `/`, `..` or anything else that would escape the store directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(String);

impl BlobId {
    /// Parses a blob id.
    ///
    /// # Errors
    /// [`StoreError::InvalidBlobId`] unless `s` is exactly 32 chars of `[0-9a-f]`.
    pub fn parse(s: &str) -> Result<BlobId, StoreError> {
        if s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(BlobId(s.to_owned()))
        } else {
            Err(StoreError::InvalidBlobId(s.to_owned()))
        }
    }

    /// The id as a 32-char lowercase hex string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn random() -> BlobId {
        let mut b = [0u8; 16];
        OsRng.fill_bytes(&mut b);
        BlobId(hex::encode(b))
    }

    /// The 2-char shard directory name.
    fn shard(&self) -> &str {
        &self.0[..2]
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for BlobId {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<BlobId, StoreError> {
        BlobId::parse(s)
    }
}

/// What [`BlobStore::put`] stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// The new blob's id.
    pub id: BlobId,
    /// Key id of the master key that wraps the blob's data key ([`MasterKey::key_id`]).
    pub key_id: String,
    /// Plaintext length in bytes.
    pub plaintext_len: u64,
    /// SHA-256 of the plaintext.
    pub sha256: [u8; 32],
}

/// Encrypted blobs in a local directory or an S3 bucket.
///
/// `Send + Sync`; share it with `Arc`. Every operation is self-contained (a filesystem
/// operation, or one object-store request sequence), so several processes may use the
/// same root or bucket concurrently. The methods are synchronous: call them from a
/// blocking thread (`spawn_blocking`). The S3 backend runs its requests on a small
/// runtime of its own, so it never blocks inside the caller's async runtime.
pub struct BlobStore {
    backend: Backend,
    /// The key new blobs are written with.
    current: MasterKey,
    current_id: String,
    /// Older keys still accepted for reading, with their key ids.
    previous: Vec<(String, MasterKey)>,
}

impl fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStore")
            .field("backend", &self.describe())
            .field("key_id", &self.current_id)
            .finish_non_exhaustive()
    }
}

impl BlobStore {
    /// Opens the store at `root`, creating `root` and `root/tmp` (mode 0700) if missing.
    /// New blobs are encrypted under `master`.
    ///
    /// # Errors
    /// [`StoreError::Io`] / [`StoreError::NoSpace`] when the directories cannot be created.
    pub fn open(root: &Path, master: MasterKey) -> Result<BlobStore, StoreError> {
        BlobStore::open_with_previous(root, master, Vec::new())
    }

    /// Like [`open`](Self::open), and additionally accepts blobs written under the
    /// `previous` master keys when reading (key rotation without rewriting blobs).
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn open_with_previous(
        root: &Path,
        master: MasterKey,
        previous: Vec<MasterKey>,
    ) -> Result<BlobStore, StoreError> {
        let tmp = root.join(TMP_DIR);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tmp)
            .map_err(|e| io_err("create directory", &tmp, e))?;
        Ok(BlobStore::with_backend(
            Backend::Local(LocalDir {
                root: root.to_path_buf(),
                tmp,
            }),
            master,
            previous,
        ))
    }

    /// Opens a store in an S3-compatible bucket (`[store] url = "s3://…"`). No request
    /// is made here; call [`check`](Self::check) to find out whether the bucket is
    /// reachable with these credentials. `previous` as in
    /// [`open_with_previous`](Self::open_with_previous).
    ///
    /// # Errors
    /// [`StoreError::InvalidUrl`] when the client cannot be built from `location`,
    /// [`StoreError::Io`] when its runtime cannot start.
    pub fn open_s3(
        location: &S3Location,
        credentials: S3Credentials,
        master: MasterKey,
        previous: Vec<MasterKey>,
    ) -> Result<BlobStore, StoreError> {
        let backend = s3::S3Backend::new(location, credentials)?;
        Ok(BlobStore::with_backend(
            Backend::S3(backend),
            master,
            previous,
        ))
    }

    fn with_backend(backend: Backend, master: MasterKey, previous: Vec<MasterKey>) -> BlobStore {
        let current_id = master.key_id();
        BlobStore {
            backend,
            current: master,
            current_id,
            previous: previous.into_iter().map(|k| (k.key_id(), k)).collect(),
        }
    }

    /// The store's root directory; `None` for an object store.
    pub fn root(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Local(l) => Some(&l.root),
            Backend::S3(_) => None,
        }
    }

    /// Where the blobs are, for messages: the directory, or `s3://BUCKET at ENDPOINT`
    /// (never credentials).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Local(l) => l.root.display().to_string(),
            Backend::S3(b) => b.describe().to_owned(),
        }
    }

    /// Checks that the store is usable now: for a directory, that it exists; for an
    /// object store, that the bucket can be listed and that an object can be written
    /// and deleted with these credentials (a probe object with a random name that
    /// [`list`](Self::list) never returns). `serve` calls it before accepting work.
    ///
    /// # Errors
    /// [`StoreError::Denied`] for refused credentials or permissions,
    /// [`StoreError::Unavailable`] for an unreachable endpoint or a missing bucket,
    /// [`StoreError::Io`] for a missing directory.
    pub fn check(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(l) => fs::metadata(&l.tmp)
                .map(|_| ())
                .map_err(|e| io_err("stat directory", &l.tmp, e)),
            Backend::S3(b) => b.check(),
        }
    }

    /// Key id of the master key new blobs are written with.
    pub fn key_id(&self) -> &str {
        &self.current_id
    }

    /// Encrypts `plaintext` under a fresh random 256-bit data key, writes it to
    /// `root/tmp/<random>.tmp`, fsyncs it, renames it atomically to `root/<ab>/<id>` and
    /// fsyncs the directory. Returns after the blob is durable. In an object store: one
    /// PUT of the object `<id>`, or a multipart upload (8 MiB parts) for a blob larger
    /// than one part, returning after the PUT or the completion succeeded.
    ///
    /// # Errors
    /// [`StoreError::NoSpace`] when the disk is full, [`StoreError::Io`] otherwise;
    /// [`StoreError::Unavailable`] / [`StoreError::Denied`] from an object store. On any
    /// failure the temp file is removed (an unfinished multipart upload aborted), best
    /// effort, and nothing is published.
    pub fn put(&self, plaintext: &[u8]) -> Result<BlobInfo, StoreError> {
        let mut r = plaintext;
        self.put_reader(&mut r)
    }

    /// Like [`put`](Self::put), but streams the plaintext from `r` one segment at a time;
    /// memory use stays at about two segments (128 KiB) whatever the blob size.
    ///
    /// # Errors
    /// As [`put`](Self::put), plus [`StoreError::Source`] when `r` fails.
    pub fn put_reader(&self, r: &mut dyn Read) -> Result<BlobInfo, StoreError> {
        let id = BlobId::random();
        let local = match &self.backend {
            Backend::Local(l) => l,
            Backend::S3(b) => {
                let mut sink = b.writer(&id);
                let written = self.encrypt_to(&mut sink, &id, FORMAT_VERSION, r);
                let (plaintext_len, sha256) = match written {
                    Ok(v) => v,
                    Err(e) => {
                        sink.abort();
                        return Err(e);
                    }
                };
                sink.finish()?;
                return Ok(BlobInfo {
                    id,
                    key_id: self.current_id.clone(),
                    plaintext_len,
                    sha256,
                });
            }
        };
        let tmp_path = local.tmp.join(format!("{}{TMP_SUFFIX}", BlobId::random()));
        let result = self.write_and_publish(local, &id, &tmp_path, FORMAT_VERSION, r);
        if result.is_err() {
            if let Err(e) = fs::remove_file(&tmp_path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %tmp_path.display(), error = %e, "cannot remove temp blob");
                }
            }
        }
        result
    }

    /// Reads, authenticates and decrypts a whole blob into memory.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], [`StoreError::UnknownKey`] (written under a master key
    /// this store does not hold), [`StoreError::Corrupt`] (tampering, truncation,
    /// reordered or missing segments, bad header), [`StoreError::Io`].
    pub fn get(&self, id: &BlobId) -> Result<Vec<u8>, StoreError> {
        let mut reader = self.open_blob(id)?;
        let mut out = Vec::new();
        while let Some(seg) = reader.next_segment()? {
            out.extend_from_slice(seg);
        }
        Ok(out)
    }

    /// Opens a blob for streaming decryption. The header is checked and the data key
    /// unwrapped here; segments are authenticated as they are read.
    ///
    /// # Errors
    /// As [`get`](Self::get) for the header.
    pub fn open_blob(&self, id: &BlobId) -> Result<BlobReader, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            id: id.clone(),
            reason: reason.to_owned(),
        };
        let mut header = [0u8; HEADER_LEN];
        let (source, n) = match &self.backend {
            Backend::Local(l) => {
                let path = l.blob_path(id);
                let mut file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(StoreError::NotFound { id: id.clone() })
                    }
                    Err(e) => return Err(io_err("open blob", &path, e)),
                };
                let n =
                    read_full(&mut file, &mut header).map_err(|e| io_err("read blob", &path, e))?;
                (Source::File { file, path }, n)
            }
            Backend::S3(b) => {
                let (reader, n) = b.open(id, &mut header)?;
                (Source::Object(reader), n)
            }
        };
        if n < HEADER_LEN {
            return Err(corrupt("truncated header"));
        }
        if &header[..8] != MAGIC {
            return Err(corrupt("bad magic (not a Bastion blob)"));
        }
        let version = header[8];
        if version != 1 && version != FORMAT_VERSION {
            return Err(StoreError::Corrupt {
                id: id.clone(),
                reason: format!("unsupported format version {}", header[8]),
            });
        }
        let segment_size = u32::from_be_bytes([header[9], header[10], header[11], header[12]]);
        if segment_size == 0 || segment_size > MAX_SEGMENT_SIZE {
            return Err(StoreError::Corrupt {
                id: id.clone(),
                reason: format!("segment size {segment_size} out of range"),
            });
        }
        let key_id_bytes = &header[OFF_KEY_ID..OFF_WRAP_NONCE];
        if !key_id_bytes
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(corrupt("key id is not lowercase hex"));
        }
        let key_id = String::from_utf8_lossy(key_id_bytes).into_owned();
        let master = self
            .key_for(&key_id)
            .ok_or_else(|| StoreError::UnknownKey {
                key_id: key_id.clone(),
            })?;
        let kek = master.derive(BLOB_KEK_PURPOSE);
        let kek_cipher = Cipher::new(&kek[..])?;
        let mut data_key = Zeroizing::new(header[OFF_WRAPPED..OFF_PREFIX].to_vec());
        kek_cipher
            .decrypt_in_place(
                &header[OFF_WRAP_NONCE..OFF_WRAPPED],
                &wrap_aad(&header, (version >= 2).then_some(id)),
                &mut data_key,
            )
            .map_err(|_| {
                corrupt("data key failed authentication (header tampered, or the file belongs to another blob id)")
            })?;
        if data_key.len() != 32 {
            return Err(corrupt("unwrapped data key has the wrong length"));
        }
        let cipher = Cipher::new(&data_key)?;
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(&header[OFF_PREFIX..]);
        let chunk = segment_size as usize + TAG_LEN;
        Ok(BlobReader {
            source,
            id: id.clone(),
            version,
            cipher,
            header,
            prefix,
            chunk,
            counter: 0,
            cur: Vec::with_capacity(chunk),
            next: Vec::with_capacity(chunk),
            started: false,
            done: false,
            pos: 0,
            in_segment: false,
        })
    }

    /// Deletes a blob and fsyncs its directory (an object store: one DELETE). A blob
    /// that does not exist is not an error.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the file exists but cannot be removed;
    /// [`StoreError::Unavailable`] / [`StoreError::Denied`] from an object store.
    pub fn delete(&self, id: &BlobId) -> Result<(), StoreError> {
        let local = match &self.backend {
            Backend::Local(l) => l,
            Backend::S3(b) => return b.delete(id),
        };
        let path = local.blob_path(id);
        match fs::remove_file(&path) {
            Ok(()) => fsync_dir(&local.root.join(id.shard())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete blob", &path, e)),
        }
    }

    /// Copies the blob `id` of this store into `dest` under the same id, as stored:
    /// the ciphertext is streamed (1 MiB at a time), never decrypted here, and
    /// published in `dest` like [`put`](Self::put) does (temp file, fsync, atomic
    /// rename; one PUT or a multipart upload). A copy stays valid because a
    /// format-2 blob is bound to its id and its data key is wrapped by the master
    /// key, which both stores share: `dest` reads it as this store does. Used by
    /// `bastion migrate`, which authenticates the copy by reading it back from
    /// `dest` ([`open_blob`](Self::open_blob)) before counting it as moved; a
    /// damaged source blob is copied damaged and fails that check. Copying a blob
    /// again overwrites the earlier copy (same bytes). Returns the bytes copied.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when this store has no such blob; read errors of
    /// this store and write errors of `dest` as for [`get`](Self::get) and
    /// [`put`](Self::put). On failure nothing is published in `dest` (the temp
    /// file removed, the multipart upload aborted, best effort).
    pub fn copy_encrypted_to(&self, id: &BlobId, dest: &BlobStore) -> Result<u64, StoreError> {
        const CHUNK: usize = 1 << 20;
        let (mut source, first) = match &self.backend {
            Backend::Local(l) => {
                let path = l.blob_path(id);
                let file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(StoreError::NotFound { id: id.clone() })
                    }
                    Err(e) => return Err(io_err("open blob", &path, e)),
                };
                (Source::File { file, path }, Vec::new())
            }
            Backend::S3(b) => {
                let mut header = [0u8; HEADER_LEN];
                let (reader, n) = b.open(id, &mut header)?;
                (Source::Object(reader), header[..n].to_vec())
            }
        };
        let pump = |source: &mut Source, sink: &mut dyn Sink| -> Result<u64, StoreError> {
            sink.write_all(&first)?;
            let mut total = first.len() as u64;
            let mut buf = Vec::with_capacity(CHUNK);
            loop {
                source.read_chunk(&mut buf, CHUNK)?;
                if buf.is_empty() {
                    return Ok(total);
                }
                sink.write_all(&buf)?;
                total += buf.len() as u64;
            }
        };
        match &dest.backend {
            Backend::S3(b) => {
                let mut sink = b.writer(id);
                match pump(&mut source, &mut sink) {
                    Ok(total) => {
                        sink.finish()?;
                        Ok(total)
                    }
                    Err(e) => {
                        sink.abort();
                        Err(e)
                    }
                }
            }
            Backend::Local(local) => {
                let tmp_path = local.tmp.join(format!("{}{TMP_SUFFIX}", BlobId::random()));
                let result = (|| {
                    let file = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&tmp_path)
                        .map_err(|e| io_err("create temp file", &tmp_path, e))?;
                    let mut sink = FileSink {
                        file,
                        path: &tmp_path,
                    };
                    let total = pump(&mut source, &mut sink)?;
                    sink.file
                        .sync_all()
                        .map_err(|e| io_err("fsync temp file", &tmp_path, e))?;
                    let shard_dir = local.root.join(id.shard());
                    match DirBuilder::new().mode(0o700).create(&shard_dir) {
                        Ok(()) => fsync_dir(&local.root)?,
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(io_err("create directory", &shard_dir, e)),
                    }
                    let published = shard_dir.join(id.as_str());
                    fs::rename(&tmp_path, &published)
                        .map_err(|e| io_err("publish blob", &published, e))?;
                    fsync_dir(&shard_dir)?;
                    Ok(total)
                })();
                if result.is_err() {
                    let _ = fs::remove_file(&tmp_path);
                }
                result
            }
        }
    }

    /// Lists every published blob with its modification time (for orphan sweeps:
    /// compare with the index and only remove blobs older than a grace period, since a
    /// blob is published before its index row commits). Order is unspecified; entries
    /// that are not blobs are ignored.
    ///
    /// In an object store the time is the object's last-modified time, and the listing
    /// may lag behind recent writes (it is only ever used for this age-guarded sweep).
    ///
    /// # Errors
    /// [`StoreError::Io`] when a directory cannot be read;
    /// [`StoreError::Unavailable`] / [`StoreError::Denied`] from an object store.
    pub fn list(&self) -> Result<Vec<(BlobId, SystemTime)>, StoreError> {
        let local = match &self.backend {
            Backend::Local(l) => l,
            Backend::S3(b) => return b.list(),
        };
        let mut out = Vec::new();
        for shard in read_dir(&local.root)? {
            let shard_name = shard.file_name();
            let Some(shard_name) = shard_name.to_str() else {
                continue;
            };
            if shard_name.len() != 2
                || !shard_name
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                continue;
            }
            let shard_path = shard.path();
            if !shard_path.is_dir() {
                continue;
            }
            for entry in read_dir(&shard_path)? {
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(|s| BlobId::parse(s).ok()) else {
                    continue;
                };
                if id.shard() != shard_name {
                    continue;
                }
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    // Deleted concurrently.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err("stat blob", &entry.path(), e)),
                };
                if !meta.is_file() {
                    continue;
                }
                let mtime = meta
                    .modified()
                    .map_err(|e| io_err("read mtime of", &entry.path(), e))?;
                out.push((id, mtime));
            }
        }
        Ok(out)
    }

    /// Removes files in `root/tmp` whose modification time is more than `older_than` ago
    /// (left behind by a crash during [`put`](Self::put)). Returns how many were removed.
    /// Use a generous `older_than` (minutes), since a put in progress keeps its temp
    /// file's mtime fresh only while data arrives.
    ///
    /// An object store has no temporary files (an unfinished multipart upload is aborted
    /// by the failing `put`; for a crash, give the bucket a lifecycle rule that aborts
    /// incomplete multipart uploads): it returns 0.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the directory cannot be read or a file cannot be removed.
    pub fn sweep_tmp(&self, older_than: Duration) -> Result<usize, StoreError> {
        let local = match &self.backend {
            Backend::Local(l) => l,
            Backend::S3(_) => return Ok(0),
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in read_dir(&local.tmp)? {
            let path = entry.path();
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat temp file", &path, e)),
            };
            if !meta.is_file() {
                continue;
            }
            let mtime = meta
                .modified()
                .map_err(|e| io_err("read mtime of", &path, e))?;
            // A clock step backwards gives Err here: treat such files as fresh.
            let old = now.duration_since(mtime).is_ok_and(|age| age > older_than);
            if old {
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("remove temp file", &path, e)),
                }
            }
        }
        Ok(removed)
    }

    fn key_for(&self, key_id: &str) -> Option<&MasterKey> {
        if key_id == self.current_id {
            return Some(&self.current);
        }
        self.previous
            .iter()
            .find(|(id, _)| id == key_id)
            .map(|(_, k)| k)
    }

    fn write_and_publish(
        &self,
        local: &LocalDir,
        id: &BlobId,
        tmp_path: &Path,
        version: u8,
        r: &mut dyn Read,
    ) -> Result<BlobInfo, StoreError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp_path)
            .map_err(|e| io_err("create temp file", tmp_path, e))?;
        let mut sink = FileSink {
            file,
            path: tmp_path,
        };
        let (plaintext_len, sha256) = self.encrypt_to(&mut sink, id, version, r)?;
        let file = sink.file;
        file.sync_all()
            .map_err(|e| io_err("fsync temp file", tmp_path, e))?;
        drop(file);

        let shard_dir = local.root.join(id.shard());
        match DirBuilder::new().mode(0o700).create(&shard_dir) {
            Ok(()) => fsync_dir(&local.root)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create directory", &shard_dir, e)),
        }
        let dest = shard_dir.join(id.as_str());
        fs::rename(tmp_path, &dest).map_err(|e| io_err("publish blob", &dest, e))?;
        fsync_dir(&shard_dir)?;
        Ok(BlobInfo {
            id: id.clone(),
            key_id: self.current_id.clone(),
            plaintext_len,
            sha256,
        })
    }

    /// Writes header and segments to `out`; returns plaintext length and SHA-256.
    fn encrypt_to(
        &self,
        out: &mut dyn Sink,
        id: &BlobId,
        version: u8,
        r: &mut dyn Read,
    ) -> Result<(u64, [u8; 32]), StoreError> {
        // Header and wrapped data key.
        let mut data_key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut data_key[..]);
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8] = version;
        header[9..13].copy_from_slice(&SEGMENT_SIZE.to_be_bytes());
        header[OFF_KEY_ID..OFF_WRAP_NONCE].copy_from_slice(self.current_id.as_bytes());
        OsRng.fill_bytes(&mut header[OFF_WRAP_NONCE..OFF_WRAPPED]);
        OsRng.fill_bytes(&mut header[OFF_PREFIX..]);
        let kek = self.current.derive(BLOB_KEK_PURPOSE);
        let kek_cipher = Cipher::new(&kek[..])?;
        let mut wrapped = Zeroizing::new(data_key.to_vec());
        {
            let aad = wrap_aad(&header, (version >= 2).then_some(id));
            kek_cipher
                .encrypt_in_place(&header[OFF_WRAP_NONCE..OFF_WRAPPED], &aad, &mut wrapped)
                .map_err(|_| StoreError::Crypto {
                    op: "wrapping the data key",
                })?;
        }
        if wrapped.len() != WRAPPED_KEY_LEN {
            return Err(StoreError::Crypto {
                op: "wrapping the data key",
            });
        }
        header[OFF_WRAPPED..OFF_PREFIX].copy_from_slice(&wrapped);
        out.write_all(&header)?;

        // Segments, with one segment of lookahead to know which one is last.
        let cipher = Cipher::new(&data_key[..])?;
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(&header[OFF_PREFIX..]);
        let seg = SEGMENT_SIZE as usize;
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        let mut counter: u32 = 0;
        let mut cur = Vec::with_capacity(seg + TAG_LEN);
        let mut next = Vec::with_capacity(seg + TAG_LEN);
        fill_segment(r, &mut cur, seg).map_err(|source| StoreError::Source { source })?;
        loop {
            let last = if cur.len() < seg {
                true
            } else {
                fill_segment(r, &mut next, seg).map_err(|source| StoreError::Source { source })?;
                next.is_empty()
            };
            hasher.update(&cur);
            total += cur.len() as u64;
            let nonce = segment_nonce(&prefix, counter, last);
            cipher
                .encrypt_in_place(&nonce, &header, &mut cur)
                .map_err(|_| StoreError::Crypto {
                    op: "encrypting a segment",
                })?;
            out.write_all(&cur)?;
            if last {
                break;
            }
            counter = counter.checked_add(1).ok_or(StoreError::TooLarge)?;
            std::mem::swap(&mut cur, &mut next);
        }
        Ok((total, hasher.finalize().into()))
    }
}

/// Streaming, authenticated decryption of one blob (from [`BlobStore::open_blob`]).
///
/// Plaintext is released one segment at a time and only after that segment has been
/// authenticated. Note that a consumer streaming the plaintext onwards has seen the
/// earlier segments before a later corruption is detected; use [`BlobStore::get`] when
/// all-or-nothing matters.
///
/// Implements [`Read`]; corruption surfaces there as an [`io::Error`] of kind
/// `InvalidData` wrapping the [`StoreError`].
pub struct BlobReader {
    source: Source,
    id: BlobId,
    /// Format version of the file (1 or 2).
    version: u8,
    cipher: Cipher,
    header: [u8; HEADER_LEN],
    prefix: [u8; PREFIX_LEN],
    /// Ciphertext bytes of a full segment (segment_size + tag).
    chunk: usize,
    counter: u32,
    cur: Vec<u8>,
    next: Vec<u8>,
    started: bool,
    done: bool,
    /// Read position in `cur` for the `Read` impl.
    pos: usize,
    /// Whether `cur` holds decrypted plaintext not yet fully handed out by `Read`.
    in_segment: bool,
}

impl fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobReader")
            .field("id", &self.id)
            .field("segment", &self.counter)
            .finish_non_exhaustive()
    }
}

impl BlobReader {
    /// The blob being read.
    pub fn id(&self) -> &BlobId {
        &self.id
    }

    /// Whether the blob's authentication covers its id (format version 2): its
    /// plaintext is then exactly what was [`put`](BlobStore::put) under this id, and
    /// a file moved from another id has already failed in
    /// [`open_blob`](BlobStore::open_blob). `false` for version 1 blobs, whose
    /// callers must check content some other way (a recorded hash).
    pub fn bound_to_id(&self) -> bool {
        self.version >= 2
    }

    /// Returns the next authenticated plaintext segment, or `None` after the final one.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when a segment fails authentication, is truncated, or the
    /// blob ends without a final segment; [`StoreError::Io`] on read errors.
    pub fn next_segment(&mut self) -> Result<Option<&[u8]>, StoreError> {
        if self.done {
            return Ok(None);
        }
        if !self.started {
            self.started = true;
            self.source.read_chunk(&mut self.next, self.chunk)?;
        }
        std::mem::swap(&mut self.cur, &mut self.next);
        let last = if self.cur.len() < self.chunk {
            true
        } else {
            self.source.read_chunk(&mut self.next, self.chunk)?;
            self.next.is_empty()
        };
        if self.cur.len() < TAG_LEN {
            self.done = true;
            return Err(self.corrupt(format!(
                "blob ends without its final segment (segment {} missing or truncated)",
                self.counter
            )));
        }
        let nonce = segment_nonce(&self.prefix, self.counter, last);
        if self
            .cipher
            .decrypt_in_place(&nonce, &self.header, &mut self.cur)
            .is_err()
        {
            self.done = true;
            return Err(self.corrupt(format!(
                "segment {} failed authentication (tampered, truncated or reordered)",
                self.counter
            )));
        }
        if last {
            self.done = true;
        } else {
            match self.counter.checked_add(1) {
                Some(c) => self.counter = c,
                None => {
                    self.done = true;
                    return Err(self.corrupt("too many segments".to_owned()));
                }
            }
        }
        Ok(Some(&self.cur))
    }

    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt {
            id: self.id.clone(),
            reason,
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.in_segment && self.pos < self.cur.len() {
                let n = buf.len().min(self.cur.len() - self.pos);
                buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            self.in_segment = false;
            match self.next_segment() {
                Ok(Some(_)) => {
                    self.pos = 0;
                    self.in_segment = true;
                }
                Ok(None) => return Ok(0),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
    }
}

/// Nonce of segment `counter`: prefix(7) || u32 BE counter || u8 last flag.
/// AAD of the wrapped data key: header bytes 0..29, then (version 2) the blob id.
fn wrap_aad(header: &[u8; HEADER_LEN], id: Option<&BlobId>) -> Vec<u8> {
    let mut aad = header[..OFF_WRAP_NONCE].to_vec();
    if let Some(id) = id {
        aad.extend_from_slice(id.as_str().as_bytes());
    }
    aad
}

fn segment_nonce(prefix: &[u8; PREFIX_LEN], counter: u32, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..PREFIX_LEN].copy_from_slice(prefix);
    n[PREFIX_LEN..PREFIX_LEN + 4].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    n
}

/// Replaces `buf` with up to `seg` bytes from `r`, reading until full or end of input.
fn fill_segment(r: &mut dyn Read, buf: &mut Vec<u8>, seg: usize) -> io::Result<()> {
    buf.clear();
    buf.resize(seg, 0);
    let n = read_full(r, buf)?;
    buf.truncate(n);
    Ok(())
}

/// Where the blobs are.
enum Backend {
    Local(LocalDir),
    S3(s3::S3Backend),
}

/// The local directory backend (see "On-disk layout" in the crate docs).
struct LocalDir {
    root: PathBuf,
    tmp: PathBuf,
}

impl LocalDir {
    fn blob_path(&self, id: &BlobId) -> PathBuf {
        self.root.join(id.shard()).join(id.as_str())
    }
}

/// Where [`BlobStore::encrypt_to`] writes the ciphertext.
trait Sink {
    fn write_all(&mut self, buf: &[u8]) -> Result<(), StoreError>;
}

/// A temporary file of the local directory backend.
struct FileSink<'a> {
    file: File,
    path: &'a Path,
}

impl Sink for FileSink<'_> {
    fn write_all(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all(buf)
            .map_err(|e| io_err("write temp file", self.path, e))
    }
}

/// Where a [`BlobReader`] reads the ciphertext after the header.
enum Source {
    File { file: File, path: PathBuf },
    Object(s3::ObjectReader),
}

impl Source {
    /// Replaces `buf` with the next up to `chunk` bytes of the blob (empty at its end).
    fn read_chunk(&mut self, buf: &mut Vec<u8>, chunk: usize) -> Result<(), StoreError> {
        match self {
            Source::File { file, path } => {
                fill_segment(file, buf, chunk).map_err(|e| io_err("read blob", path, e))
            }
            Source::Object(o) => o.read_chunk(buf, chunk),
        }
    }
}

/// Reads until `buf` is full or end of input; returns the number of bytes read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync directory", dir, e))
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>, StoreError> {
    fs::read_dir(dir)
        .and_then(|it| it.collect::<io::Result<Vec<_>>>())
        .map_err(|e| io_err("read directory", dir, e))
}

/// AES-256-GCM through aws-lc-rs (already linked for TLS): its AVX-512/CLMUL
/// GCM is several times faster than the portable RustCrypto implementation
/// on the ingest path, and it is the same FIPS-validated library rustls uses.
struct Cipher(aws_lc_rs::aead::LessSafeKey);

impl Cipher {
    fn new(key: &[u8]) -> Result<Cipher, StoreError> {
        let unbound = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, key)
            .map_err(|_| StoreError::Crypto {
                op: "setting up an AES-256-GCM key",
            })?;
        Ok(Cipher(aws_lc_rs::aead::LessSafeKey::new(unbound)))
    }

    fn nonce(nonce: &[u8]) -> Result<aws_lc_rs::aead::Nonce, ()> {
        aws_lc_rs::aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| ())
    }

    /// Encrypts `buf` in place and appends the 16-byte tag.
    fn encrypt_in_place(&self, nonce: &[u8], aad: &[u8], buf: &mut Vec<u8>) -> Result<(), ()> {
        self.0
            .seal_in_place_append_tag(Self::nonce(nonce)?, aws_lc_rs::aead::Aad::from(aad), buf)
            .map_err(|_| ())
    }

    /// Authenticates and decrypts `buf` in place, removing the tag.
    fn decrypt_in_place(&self, nonce: &[u8], aad: &[u8], buf: &mut Vec<u8>) -> Result<(), ()> {
        let len = self
            .0
            .open_in_place(
                Self::nonce(nonce)?,
                aws_lc_rs::aead::Aad::from(aad),
                buf.as_mut_slice(),
            )
            .map_err(|_| ())?
            .len();
        buf.truncate(len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<BlobStore>();
        check::<MasterKey>();
        fn check_send<T: Send>() {}
        check_send::<BlobReader>();
    }

    /// Version 1 blobs (written before the id binding) are still read, and say
    /// that they are not bound to their id.
    #[test]
    fn version_1_blobs_are_read_and_not_bound() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| io_err("tempdir", Path::new("."), e))?;
        let store = BlobStore::open(dir.path(), MasterKey::generate())?;
        let id = BlobId::random();
        let Backend::Local(local) = &store.backend else {
            unreachable!("opened as a directory")
        };
        let tmp = local.tmp.join("v1.tmp");
        let data = vec![42u8; 200_000];
        let mut r = &data[..];
        store.write_and_publish(local, &id, &tmp, 1, &mut r)?;
        let mut reader = store.open_blob(&id)?;
        assert!(!reader.bound_to_id());
        let mut out = Vec::new();
        reader
            .read_to_end(&mut out)
            .map_err(|e| io_err("read", Path::new("."), e))?;
        assert_eq!(out, data);
        let v2 = store.put(b"v2")?;
        assert!(store.open_blob(&v2.id)?.bound_to_id());
        Ok(())
    }

    /// A blob copied by id into another store under the same master key reads
    /// back identical there; a missing one is NotFound; a damaged one is
    /// copied but fails authentication in the destination.
    #[test]
    fn copy_encrypted_to_keeps_the_blob_valid_under_its_id() -> Result<(), StoreError> {
        let tmp = |e| io_err("tempdir", Path::new("."), e);
        let (a, b) = (
            tempfile::tempdir().map_err(tmp)?,
            tempfile::tempdir().map_err(tmp)?,
        );
        let key = MasterKey::generate();
        let src = BlobStore::open(a.path(), key.clone())?;
        let dst = BlobStore::open(b.path(), key)?;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let info = src.put(&data)?;
        let copied = src.copy_encrypted_to(&info.id, &dst)?;
        let on_disk = fs::metadata(b.path().join(info.id.shard()).join(info.id.as_str()))
            .map_err(tmp)?
            .len();
        assert_eq!(copied, on_disk);
        assert_eq!(dst.get(&info.id)?, data);
        assert!(matches!(
            src.copy_encrypted_to(&BlobId::random(), &dst),
            Err(StoreError::NotFound { .. })
        ));
        // Flip one ciphertext byte in the source: the copy fails authentication.
        let path = a.path().join(info.id.shard()).join(info.id.as_str());
        let mut bytes = fs::read(&path).map_err(tmp)?;
        let last = bytes.len() - 10;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).map_err(tmp)?;
        src.copy_encrypted_to(&info.id, &dst)?;
        assert!(matches!(dst.get(&info.id), Err(StoreError::Corrupt { .. })));
        Ok(())
    }

    #[test]
    fn header_offsets_add_up() {
        assert_eq!(OFF_PREFIX + PREFIX_LEN, HEADER_LEN);
        assert_eq!(OFF_WRAP_NONCE, 29);
    }

    #[test]
    fn key_id_is_16_lowercase_hex() {
        let k = MasterKey::from_bytes([7; 32]);
        let id = k.key_id();
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        assert_eq!(id, MasterKey::from_bytes([7; 32]).key_id());
        assert_ne!(id, MasterKey::from_bytes([8; 32]).key_id());
        assert_ne!(*k.derive("a"), *k.derive("b"));
    }
}
