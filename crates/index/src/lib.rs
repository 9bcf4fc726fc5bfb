//! The metadata index: patients, studies, series and instances in an encrypted SQLite
//! database (SQLCipher).
//!
//! The index holds derived state only: every row could be rebuilt from the stored
//! blobs. It knows no DICOM types; all values are plain `String`s (UTF-8, `""` when the
//! attribute is absent) and `Option<i64>` for numbers.
//!
//! # Main types
//!
//! - [`Index`]: one database file, opened with a raw 32-byte key
//!   (in Bastion: `MasterKey::derive("bastion index v1")` from `bastion-store`).
//! - [`NewInstance`] in, [`CommitOutcome`] out of [`Index::commit_batch`], which
//!   decides between stored / identical re-send / conflicting re-send / replaced.
//! - [`StoredInstance`]: what the index knows about one stored instance.
//! - [`IndexError`]: the one error type; [`IndexError::NoSpace`] and
//!   [`IndexError::WrongKey`] are distinct so callers can act on them.
//!
//! # Example
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("bastion-index-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! use bastion_index::{Index, NewInstance, CommitOutcome};
//! let index = Index::open(&dir.join("index.db"), &[7u8; 32])?;
//! let mut rec = NewInstance::default();
//! rec.instance.sop_instance_uid = "1.2.3.4".into();
//! rec.study.study_instance_uid = "1.2.3".into();
//! rec.series.series_instance_uid = "1.2.3.1".into();
//! rec.blob_id = "0123456789abcdef0123456789abcdef".into();
//! assert_eq!(index.commit_batch(&[rec])?, vec![CommitOutcome::Stored]);
//! assert_eq!(index.counts()?.instances, 1);
//! # drop(index); let _ = std::fs::remove_dir_all(&dir);
//! # Ok(()) }
//! ```
//!
//! # Storage and security
//!
//! The file is created with mode 0600 (SQLite gives its `-wal`/`-shm` files the same
//! mode) and encrypted with SQLCipher; `temp_store = MEMORY` keeps temporary tables
//! off disk. `journal_mode = WAL` lets the CLI and the server use the same file
//! concurrently (`busy_timeout` 10 s), and `synchronous = FULL` makes every commit
//! durable before [`Index::commit_batch`] returns, so that a C-STORE success is sent
//! only for committed rows.

mod pg;
pub mod query;
mod schema;

pub use pg::{PgConnect, MAX_ATTEMPTS as PG_MAX_ATTEMPTS};

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{
    params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior,
};

/// How long a statement waits for a lock held by another connection or process.
pub const BUSY_TIMEOUT: Duration = bastion_sqlcipher::BUSY_TIMEOUT;
/// The schema version this build creates and understands.
pub const SCHEMA_VERSION: u32 = schema::MIGRATIONS.len() as u32;

/// Errors of the index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// The key does not decrypt the database (or the file is not a SQLCipher database).
    #[error("cannot open index {path}: wrong key, or not a Bastion index database")]
    WrongKey {
        /// The database file.
        path: PathBuf,
    },
    /// The disk is full (`SQLITE_FULL`, or an I/O error caused by `ENOSPC`/`EDQUOT`).
    /// Nothing of the failed transaction was committed.
    #[error("index: no space left on device")]
    NoSpace,
    /// A SQLite operation failed.
    #[error("index: {op} failed: {source}")]
    Sqlite {
        /// What the index was doing, e.g. `"commit batch"`.
        op: &'static str,
        /// The underlying error.
        source: rusqlite::Error,
    },
    /// Creating the database file failed.
    #[error("index: cannot {op} {path}: {source}")]
    Io {
        /// What the index was doing.
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The database was written by a newer Bastion with a schema this build does not know.
    #[error("index schema version {found} is newer than this build supports ({supported}); upgrade Bastion")]
    SchemaTooNew {
        /// Version found in the database.
        found: i64,
        /// Highest version this build knows.
        supported: u32,
    },
    /// A value cannot be stored (e.g. a size above `i64::MAX`).
    #[error("index: value of {field} is out of range")]
    ValueOutOfRange {
        /// The field.
        field: &'static str,
    },
    /// A value read from the database is invalid (e.g. a negative size).
    #[error("index database holds an invalid value: {reason}")]
    Corrupt {
        /// What is wrong.
        reason: String,
    },
    /// A PostgreSQL operation failed (engine [`Index::open_postgres`]). The
    /// message is PostgreSQL's; it never holds the password, and patient
    /// values reach PostgreSQL only encrypted or as keyed hashes.
    #[error("index: {op} failed: {source}")]
    Postgres {
        /// What the index was doing, e.g. `"commit batch"`.
        op: &'static str,
        /// The underlying error (its `code()` is the SQLSTATE).
        source: postgres::Error,
    },
    /// No connection to the PostgreSQL database could be had in time (the
    /// server is down or unreachable, or every pooled connection is busy).
    #[error("index: PostgreSQL unavailable: {reason}")]
    Unavailable {
        /// The last connection error.
        reason: String,
    },
    /// The PostgreSQL settings are unusable (`[index] url`, TLS, schema).
    #[error("index configuration: {reason}")]
    Config {
        /// What is wrong, naming the setting.
        reason: String,
    },
    /// An encrypted column cannot be sealed or opened (wrong key, or a row
    /// altered in the database).
    #[error("index: {reason}")]
    Crypto {
        /// What failed.
        reason: &'static str,
    },
}

impl IndexError {
    /// Whether the database could not be reached or the connection broke:
    /// PostgreSQL stopped, restarting or unreachable (no connection within
    /// the pool's timeout; SQLSTATE class 08 connection exception, 57P01..03
    /// shutting down or starting up, 53300 too many connections; the
    /// connection closed or failed at the socket). Retrying later may
    /// succeed. A commit that failed this way has an unknown outcome: the
    /// server may have applied it before the connection broke, so the
    /// caller must not delete what the row would reference (the orphan sweep
    /// removes it if the row never came to exist).
    pub fn is_unavailable(&self) -> bool {
        match self {
            IndexError::Unavailable { .. } => true,
            IndexError::Postgres { source, .. } => match source.code() {
                Some(code) => {
                    let c = code.code();
                    c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "53300")
                }
                // Not an error sent by the server: a closed connection, or an
                // I/O error (the cause chain holds an `io::Error`), or a timeout
                // waiting for the server. Conversion errors (a column of the
                // wrong type) have neither and stay internal errors.
                None => {
                    source.is_closed()
                        || std::iter::successors(std::error::Error::source(source), |e| e.source())
                            .any(|e| e.is::<std::io::Error>())
                        || source.to_string().starts_with("timeout waiting for server")
                }
            },
            _ => false,
        }
    }

    /// Whether PostgreSQL refused the login (wrong password or unknown role:
    /// SQLSTATE 28P01 / 28000), so the caller can name the credentials.
    pub fn is_credentials_refused(&self) -> bool {
        use postgres::error::SqlState;
        matches!(self, IndexError::Postgres { source, .. }
            if source.code() == Some(&SqlState::INVALID_PASSWORD)
                || source.code() == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION))
    }
}

/// Maps a rusqlite error, recognising "disk full" as [`IndexError::NoSpace`].
fn sql_err(op: &'static str) -> impl Fn(rusqlite::Error) -> IndexError {
    move |source| {
        if let rusqlite::Error::SqliteFailure(e, _) = &source {
            match e.code {
                ErrorCode::DiskFull => return IndexError::NoSpace,
                ErrorCode::SystemIoFailure => {
                    // SQLite does not report errno through rusqlite; the failing
                    // syscall was the last one made on this thread, so errno still
                    // holds its cause.
                    let errno = std::io::Error::last_os_error().raw_os_error();
                    if errno == Some(libc::ENOSPC) || errno == Some(libc::EDQUOT) {
                        return IndexError::NoSpace;
                    }
                }
                _ => {}
            }
        }
        IndexError::Sqlite { op, source }
    }
}

/// Patient-level attributes, as received (`""` when absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PatientAttrs {
    /// Patient ID (0010,0020).
    pub patient_id: String,
    /// Issuer of Patient ID (0010,0021).
    pub issuer_of_patient_id: String,
    /// Patient's Name (0010,0010), PN string as received, e.g. `"Doe^John"`.
    pub patient_name: String,
    /// Patient's Birth Date (0010,0030), DA `YYYYMMDD`.
    pub patient_birth_date: String,
    /// Patient's Sex (0010,0040).
    pub patient_sex: String,
}

/// Study-level attributes, as received (`""` when absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StudyAttrs {
    /// Study Instance UID (0020,000D); the study key.
    pub study_instance_uid: String,
    /// Study Date (0008,0020), DA `YYYYMMDD`.
    pub study_date: String,
    /// Study Time (0008,0030), TM.
    pub study_time: String,
    /// Accession Number (0008,0050).
    pub accession_number: String,
    /// Study ID (0020,0010).
    pub study_id: String,
    /// Study Description (0008,1030).
    pub study_description: String,
    /// Referring Physician's Name (0008,0090).
    pub referring_physician_name: String,
    /// Indexed sequence attributes, opaque text owned by the caller (schema v2;
    /// `""` when none). The archive layer writes JSON, see `bastion-archive`'s
    /// `query` module.
    pub sequences: String,
}

/// Series-level attributes, as received (`""`/`None` when absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeriesAttrs {
    /// Series Instance UID (0020,000E); the series key.
    pub series_instance_uid: String,
    /// Modality (0008,0060).
    pub modality: String,
    /// Series Number (0020,0011).
    pub series_number: Option<i64>,
    /// Series Description (0008,103E).
    pub series_description: String,
    /// Body Part Examined (0018,0015).
    pub body_part_examined: String,
    /// Indexed sequence attributes, opaque text owned by the caller (schema v2;
    /// `""` when none).
    pub sequences: String,
}

/// Instance-level attributes, as received (`""`/`None` when absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceAttrs {
    /// SOP Instance UID (0008,0018); the instance key.
    pub sop_instance_uid: String,
    /// SOP Class UID (0008,0016).
    pub sop_class_uid: String,
    /// Instance Number (0020,0013).
    pub instance_number: Option<i64>,
    /// Transfer Syntax UID (0002,0010) of the stored encoding.
    pub transfer_syntax_uid: String,
    /// Rows (0028,0010).
    pub rows: Option<i64>,
    /// Columns (0028,0011).
    pub columns: Option<i64>,
    /// Number of Frames (0028,0008).
    pub number_of_frames: Option<i64>,
    /// Specific Character Set (0008,0005), values joined with `\`.
    pub specific_character_set: String,
    /// Acquisition DateTime (0008,002A), DT as received (`YYYYMMDDHHMMSS.FFFFFF&ZZXX`,
    /// any precision, offset suffix kept); schema v4, `""` for rows indexed before.
    pub acquisition_date_time: String,
}

/// What to do when an instance with the same SOP Instance UID but different content
/// is already stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum OnConflict {
    /// Keep the stored instance; report [`CommitOutcome::Conflict`].
    #[default]
    Refuse,
    /// Move the stored row to `replaced_instances` and store the new one;
    /// report [`CommitOutcome::Replaced`].
    Replace,
}

/// One instance to index, with its hierarchy and where its blob is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewInstance {
    /// Patient attributes.
    pub patient: PatientAttrs,
    /// Study attributes.
    pub study: StudyAttrs,
    /// Series attributes.
    pub series: SeriesAttrs,
    /// Instance attributes.
    pub instance: InstanceAttrs,
    /// Blob id in the blob store (32 hex chars).
    pub blob_id: String,
    /// Key id of the master key the blob is encrypted under.
    pub key_id: String,
    /// Size in bytes of the stored (plaintext) object.
    pub stored_size: u64,
    /// Lowercase hex SHA-256 of the stored (plaintext) bytes.
    pub stored_sha256: String,
    /// Lowercase hex hash of the dataset content, used to recognise identical re-sends.
    pub content_sha256: String,
    /// Calling AE title of the sender (or another source label, e.g. `"import"`).
    pub source_ae: String,
    /// When it was received, RFC 3339 UTC, e.g. `"2025-01-31T12:00:00Z"`.
    pub received_at: String,
    /// What to do if a different instance with this SOP Instance UID exists.
    pub on_conflict: OnConflict,
}

/// What the index knows about one stored instance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredInstance {
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// Study Instance UID of its study.
    pub study_instance_uid: String,
    /// Series Instance UID of its series.
    pub series_instance_uid: String,
    /// Transfer Syntax UID of the stored encoding.
    pub transfer_syntax_uid: String,
    /// Blob id in the blob store.
    pub blob_id: String,
    /// Key id of the master key the blob is encrypted under.
    pub key_id: String,
    /// Size in bytes of the stored object.
    pub stored_size: u64,
    /// Lowercase hex SHA-256 of the stored bytes.
    pub stored_sha256: String,
    /// Lowercase hex content hash (identical re-send detection).
    pub content_sha256: String,
    /// When it was received, RFC 3339 UTC.
    pub received_at: String,
}

/// Result of indexing one [`NewInstance`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// New instance; rows written.
    Stored,
    /// Identical re-send (same `content_sha256`); nothing written. The caller may
    /// delete the new blob.
    Duplicate {
        /// The instance already stored.
        existing: StoredInstance,
    },
    /// Different content under a stored SOP Instance UID and [`OnConflict::Refuse`];
    /// nothing written. The caller may delete the new blob.
    Conflict {
        /// The instance already stored.
        existing: StoredInstance,
    },
    /// Different content and [`OnConflict::Replace`]: the old row was moved to
    /// `replaced_instances` (its blob is still referenced, see [`Index::blob_ids`]).
    Replaced {
        /// The instance that was replaced.
        previous: StoredInstance,
    },
    /// A new instance whose Series Instance UID is stored under another
    /// study, or whose Study Instance UID is stored under another patient,
    /// with [`OnConflict::Refuse`]: storing it would move that series or
    /// study (and every instance in it) under this instance's study or
    /// patient. Nothing written; the caller may delete the new blob.
    /// `reason` names the level, never patient data.
    HierarchyMismatch {
        /// What does not match, e.g. "series stored under another study
        /// (Series Instance UID …)".
        reason: String,
    },
}

/// Row counts of the hierarchy tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Number of patients.
    pub patients: u64,
    /// Number of studies.
    pub studies: u64,
    /// Number of series.
    pub series: u64,
    /// Number of instances (not counting replaced ones).
    pub instances: u64,
}

/// An open index. `Send + Sync`. On SQLite (the embedded default,
/// [`Index::open`]) one connection behind a mutex, so calls from several
/// threads are serialised and other processes use their own `Index`; on
/// PostgreSQL ([`Index::open_postgres`]) a pool of connections, so calls run
/// side by side and several processes or nodes share one database.
#[derive(Debug)]
pub struct Index {
    engine: Engine,
    path: PathBuf,
}

/// The database engine behind an [`Index`]: the public API is the same for
/// every engine, and one conformance suite (`tests/it/conformance.rs`) runs
/// against each.
#[derive(Debug)]
enum Engine {
    /// SQLCipher file (the embedded default).
    Sqlite(Mutex<Connection>),
    /// PostgreSQL (scale-out, issue 12).
    Postgres(pg::PgIndex),
}

/// The SQLite connection, or the PostgreSQL engine to hand the call to.
enum Conn<'a> {
    Sqlite(MutexGuard<'a, Connection>),
    Postgres(&'a pg::PgIndex),
}

impl Index {
    /// Opens (creating if missing, mode 0600) the SQLCipher database at `path` with the
    /// raw 32-byte `key`, verifies the key, and migrates the schema to
    /// [`SCHEMA_VERSION`].
    ///
    /// # Errors
    /// [`IndexError::WrongKey`] when the key does not decrypt the file;
    /// [`IndexError::SchemaTooNew`]; [`IndexError::Io`] when the file cannot be created;
    /// [`IndexError::NoSpace`] / [`IndexError::Sqlite`] otherwise.
    pub fn open(path: &Path, key: &[u8; 32]) -> Result<Index, IndexError> {
        // The one SQLCipher open path (bastion-sqlcipher): file created 0600,
        // raw key first and zeroized, key verified, WAL and FULL sync.
        let conn = bastion_sqlcipher::open(path, key).map_err(|e| match e {
            bastion_sqlcipher::OpenError::Io { op, path, source } => {
                IndexError::Io { op, path, source }
            }
            bastion_sqlcipher::OpenError::WrongKey { path } => IndexError::WrongKey { path },
            bastion_sqlcipher::OpenError::NoSpace { .. } => IndexError::NoSpace,
            bastion_sqlcipher::OpenError::Sqlite { op, source, .. } => sql_err(op)(source),
        })?;
        let mode =
            bastion_sqlcipher::journal_mode(&conn).map_err(sql_err("read the journal mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "index: WAL journal mode not available");
        }

        let mut conn = conn;
        migrate(&mut conn)?;
        Ok(Index {
            engine: Engine::Sqlite(Mutex::new(conn)),
            path: path.to_path_buf(),
        })
    }

    /// Opens the index in a PostgreSQL database (the scale-out engine, see
    /// the `pg` module docs and docs/scale-out.md): connects, creates the
    /// schema [`PgConnect::schema`] when missing, applies pending migrations
    /// under an advisory lock (several nodes may start at once), and checks
    /// that `key` is the key this database was written with. Identifying
    /// values are stored encrypted under keys derived from `key`, exactly as
    /// the SQLite engine encrypts its file with it.
    ///
    /// # Errors
    /// [`IndexError::Config`] (URL holds a password, a non-loopback host
    /// without TLS roots, a bad schema name); [`IndexError::Postgres`]
    /// (cannot connect: wrong password → SQLSTATE 28P01, refused TLS, ...);
    /// [`IndexError::WrongKey`] (its `path` is `postgres://USER@HOST:PORT/DB`);
    /// [`IndexError::SchemaTooNew`].
    pub fn open_postgres(connect: &PgConnect, key: &[u8; 32]) -> Result<Index, IndexError> {
        let pg = pg::off_runtime(|| pg::PgIndex::open(connect, key))?;
        Ok(Index {
            path: PathBuf::from(pg.name()),
            engine: Engine::Postgres(pg),
        })
    }

    /// The database file; for PostgreSQL, `postgres://USER@HOST:PORT/DB`
    /// (never a password).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the index is on PostgreSQL (else the embedded SQLite file).
    pub fn is_postgres(&self) -> bool {
        matches!(self.engine, Engine::Postgres(_))
    }

    /// SQLite's `PRAGMA quick_check` (a structural check of every page,
    /// without the index-content cross-check of `integrity_check`): the
    /// problems it reports, empty when the database is sound.
    ///
    /// # Errors
    /// [`IndexError::Sqlite`] when the check cannot run.
    pub fn quick_check(&self) -> Result<Vec<String>, IndexError> {
        let conn = match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(pg) => return pg::off_runtime(|| pg.quick_check()),
        };
        let mut st = conn
            .prepare("PRAGMA quick_check")
            .map_err(sql_err("quick check"))?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sql_err("quick check"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql_err("quick check"))?;
        Ok(rows.into_iter().filter(|r| r != "ok").collect())
    }

    /// Looks up an instance by SOP Instance UID.
    ///
    /// # Errors
    /// [`IndexError::Sqlite`], [`IndexError::Corrupt`].
    pub fn find_instance(
        &self,
        sop_instance_uid: &str,
    ) -> Result<Option<StoredInstance>, IndexError> {
        let conn = match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(pg) => return pg::off_runtime(|| pg.find_instance(sop_instance_uid)),
        };
        Ok(find_row(&conn, sop_instance_uid)?.map(|(s, _)| s))
    }

    /// Indexes `records` in ONE transaction (group commit), in order, and returns one
    /// outcome per record. For each record:
    ///
    /// - no instance with its SOP Instance UID: upsert its patient, study and series
    ///   (existing rows are reused and their attributes overwritten with the new
    ///   values) and insert the instance: [`CommitOutcome::Stored`];
    /// - an instance with the same `content_sha256` exists: nothing is written,
    ///   [`CommitOutcome::Duplicate`];
    /// - one with a different `content_sha256` exists and `on_conflict` is
    ///   [`OnConflict::Refuse`]: nothing is written, [`CommitOutcome::Conflict`];
    /// - ... and [`OnConflict::Replace`]: the old row is copied to `replaced_instances`
    ///   (with `replaced_at`, RFC 3339 UTC), the hierarchy is upserted, the instance row
    ///   is updated to the new blob; patient/study/series rows left empty are removed:
    ///   [`CommitOutcome::Replaced`].
    ///
    /// Patients are keyed by (PatientID, IssuerOfPatientID), plus PatientName when
    /// PatientID is empty; studies by Study Instance UID; series by Series Instance UID.
    /// Records later in the batch see the effect of earlier ones, exactly as if
    /// committed one after another. The commit is durable (`synchronous = FULL`) when
    /// this returns `Ok`; on `Err` nothing of the batch is written.
    ///
    /// # Errors
    /// [`IndexError::NoSpace`], [`IndexError::ValueOutOfRange`] (`stored_size` above
    /// `i64::MAX`), [`IndexError::Sqlite`]. Values are not validated here (empty UIDs
    /// are accepted): validating datasets is the caller's job.
    pub fn commit_batch(&self, records: &[NewInstance]) -> Result<Vec<CommitOutcome>, IndexError> {
        let mut conn = match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(pg) => return pg::off_runtime(|| pg.commit_batch(records)),
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err("begin transaction"))?;
        let mut outcomes = Vec::with_capacity(records.len());
        for rec in records {
            outcomes.push(commit_one(&tx, rec)?);
        }
        tx.commit().map_err(sql_err("commit batch"))?;
        Ok(outcomes)
    }

    /// Every blob id referenced by `instances` and by `replaced_instances` (for orphan
    /// sweeps: a blob in the store but not in this set is unreferenced).
    ///
    /// # Errors
    /// [`IndexError::Sqlite`].
    pub fn blob_ids(&self) -> Result<std::collections::HashSet<String>, IndexError> {
        let conn = match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(pg) => return pg::off_runtime(|| pg.blob_ids()),
        };
        let mut stmt = conn
            .prepare("SELECT blob_id FROM instances UNION SELECT blob_id FROM replaced_instances")
            .map_err(sql_err("list blob ids"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sql_err("list blob ids"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql_err("list blob ids"))
    }

    /// Row counts of patients, studies, series and instances.
    ///
    /// # Errors
    /// [`IndexError::Sqlite`], [`IndexError::Corrupt`].
    pub fn counts(&self) -> Result<Counts, IndexError> {
        let conn = match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(pg) => return pg::off_runtime(|| pg.counts()),
        };
        let (p, st, se, i): (i64, i64, i64, i64) = conn
            .query_row(
                "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies),
                        (SELECT count(*) FROM series), (SELECT count(*) FROM instances)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .map_err(sql_err("count rows"))?;
        Ok(Counts {
            patients: to_u64(p, "count")?,
            studies: to_u64(st, "count")?,
            series: to_u64(se, "count")?,
            instances: to_u64(i, "count")?,
        })
    }

    /// Up to `limit` instances, oldest indexed first.
    ///
    /// # Errors
    /// [`IndexError::Sqlite`], [`IndexError::Corrupt`].
    pub fn list_instances(&self, limit: u32) -> Result<Vec<StoredInstance>, IndexError> {
        let conn = match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(pg) => return pg::off_runtime(|| pg.list_instances(limit)),
        };
        let sql = format!("{SELECT_INSTANCE} ORDER BY i.id LIMIT ?1");
        let mut stmt = conn.prepare(&sql).map_err(sql_err("list instances"))?;
        let rows = stmt
            .query_map([limit], read_row)
            .map_err(sql_err("list instances"))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(sql_err("list instances"))?.into_stored()?.0);
        }
        Ok(out)
    }

    /// Copies the write-ahead log into the database file and truncates the log
    /// (`PRAGMA wal_checkpoint(TRUNCATE)`). Optional: SQLite checkpoints automatically.
    /// On PostgreSQL nothing to do (the server checkpoints).
    ///
    /// # Errors
    /// [`IndexError::NoSpace`], [`IndexError::Sqlite`].
    pub fn checkpoint(&self) -> Result<(), IndexError> {
        let conn = match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(_) => return Ok(()),
        };
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(sql_err("checkpoint"))
    }

    fn conn(&self) -> Conn<'_> {
        match &self.engine {
            // A panic while holding the lock rolled back any open transaction (the
            // `Transaction` guard's drop), so the connection is still usable.
            Engine::Sqlite(c) => Conn::Sqlite(c.lock().unwrap_or_else(PoisonError::into_inner)),
            Engine::Postgres(pg) => Conn::Postgres(pg),
        }
    }

    /// The SQLite connection (unit tests of the SQLite engine only).
    #[cfg(test)]
    fn lock(&self) -> MutexGuard<'_, Connection> {
        match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(_) => panic!("not a SQLite index"),
        }
    }
}

fn to_u64(v: i64, field: &str) -> Result<u64, IndexError> {
    u64::try_from(v).map_err(|_| IndexError::Corrupt {
        reason: format!("negative {field} {v}"),
    })
}

/// Applies pending migrations in one immediate transaction.
fn migrate(conn: &mut Connection) -> Result<(), IndexError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err("begin migration"))?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .map_err(sql_err("create schema_version"))?;
    let current: Option<i64> = tx
        .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
        .map_err(sql_err("read schema version"))?;
    let current = current.unwrap_or(0);
    let supported = SCHEMA_VERSION;
    if current > i64::from(supported) {
        return Err(IndexError::SchemaTooNew {
            found: current,
            supported,
        });
    }
    if current < 0 {
        return Err(IndexError::Corrupt {
            reason: format!("schema version {current}"),
        });
    }
    for (i, sql) in schema::MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql).map_err(sql_err("migrate schema"))?;
        let version = i as i64 + 1;
        tx.execute("DELETE FROM schema_version", [])
            .map_err(sql_err("record schema version"))?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [version],
        )
        .map_err(sql_err("record schema version"))?;
        tracing::info!(version, "index schema migrated");
    }
    tx.commit().map_err(sql_err("commit migration"))
}

pub(crate) const SELECT_INSTANCE: &str =
    "SELECT i.sop_instance_uid, i.sop_class_uid, st.study_instance_uid,
        se.series_instance_uid, i.transfer_syntax_uid, i.blob_id, i.key_id, i.stored_size,
        i.stored_sha256, i.content_sha256, i.received_at, i.id, i.series_ref
    FROM instances i
    JOIN series se ON se.id = i.series_ref
    JOIN studies st ON st.id = se.study_ref";

/// A row of [`SELECT_INSTANCE`] before range checks.
pub(crate) struct RawRow {
    stored: StoredInstance,
    stored_size: i64,
    id: i64,
    series_ref: i64,
}

/// Row ids needed to update or clean up after a replace.
pub(crate) struct RowIds {
    id: i64,
    series_ref: i64,
}

impl RawRow {
    pub(crate) fn into_stored(self) -> Result<(StoredInstance, RowIds), IndexError> {
        let mut stored = self.stored;
        stored.stored_size = to_u64(self.stored_size, "stored_size")?;
        Ok((
            stored,
            RowIds {
                id: self.id,
                series_ref: self.series_ref,
            },
        ))
    }
}

pub(crate) fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        stored: StoredInstance {
            sop_instance_uid: r.get(0)?,
            sop_class_uid: r.get(1)?,
            study_instance_uid: r.get(2)?,
            series_instance_uid: r.get(3)?,
            transfer_syntax_uid: r.get(4)?,
            blob_id: r.get(5)?,
            key_id: r.get(6)?,
            stored_size: 0,
            stored_sha256: r.get(8)?,
            content_sha256: r.get(9)?,
            received_at: r.get(10)?,
        },
        stored_size: r.get(7)?,
        id: r.get(11)?,
        series_ref: r.get(12)?,
    })
}

fn find_row(
    conn: &Connection,
    sop_instance_uid: &str,
) -> Result<Option<(StoredInstance, RowIds)>, IndexError> {
    let sql = format!("{SELECT_INSTANCE} WHERE i.sop_instance_uid = ?1");
    let raw = conn
        .prepare_cached(&sql)
        .and_then(|mut stmt| stmt.query_row([sop_instance_uid], read_row).optional())
        .map_err(sql_err("find instance"))?;
    raw.map(RawRow::into_stored).transpose()
}

fn commit_one(tx: &Transaction<'_>, rec: &NewInstance) -> Result<CommitOutcome, IndexError> {
    let stored_size = i64::try_from(rec.stored_size).map_err(|_| IndexError::ValueOutOfRange {
        field: "stored_size",
    })?;
    let existing = find_row(tx, &rec.instance.sop_instance_uid)?;
    let Some((existing, ids)) = existing else {
        if rec.on_conflict == OnConflict::Refuse {
            if let Some(reason) = hierarchy_mismatch(tx, rec)? {
                return Ok(CommitOutcome::HierarchyMismatch { reason });
            }
        }
        let series_ref = upsert_hierarchy(tx, rec)?;
        let i = &rec.instance;
        tx.prepare_cached(
            r#"INSERT INTO instances (series_ref, sop_instance_uid, sop_class_uid, instance_number,
                transfer_syntax_uid, "rows", "columns", number_of_frames, specific_character_set,
                blob_id, key_id, stored_size, stored_sha256, content_sha256, source_ae, received_at,
                acquisition_date_time)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"#,
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                series_ref,
                i.sop_instance_uid,
                i.sop_class_uid,
                i.instance_number,
                i.transfer_syntax_uid,
                i.rows,
                i.columns,
                i.number_of_frames,
                i.specific_character_set,
                rec.blob_id,
                rec.key_id,
                stored_size,
                rec.stored_sha256,
                rec.content_sha256,
                rec.source_ae,
                rec.received_at,
                i.acquisition_date_time,
            ])
        })
        .map_err(sql_err("insert instance"))?;
        return Ok(CommitOutcome::Stored);
    };
    if existing.content_sha256 == rec.content_sha256 {
        return Ok(CommitOutcome::Duplicate { existing });
    }
    if rec.on_conflict == OnConflict::Refuse {
        return Ok(CommitOutcome::Conflict { existing });
    }

    // Replace: keep the old row for recovery, then point the instance at the new blob.
    tx.prepare_cached(
        r#"INSERT INTO replaced_instances (sop_instance_uid, study_instance_uid, series_instance_uid,
            sop_class_uid, instance_number, transfer_syntax_uid, "rows", "columns", number_of_frames,
            specific_character_set, blob_id, key_id, stored_size, stored_sha256, content_sha256,
            source_ae, received_at, acquisition_date_time, replaced_at)
         SELECT i.sop_instance_uid, st.study_instance_uid, se.series_instance_uid,
            i.sop_class_uid, i.instance_number, i.transfer_syntax_uid, i."rows", i."columns",
            i.number_of_frames, i.specific_character_set, i.blob_id, i.key_id, i.stored_size,
            i.stored_sha256, i.content_sha256, i.source_ae, i.received_at,
            i.acquisition_date_time, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
         FROM instances i
         JOIN series se ON se.id = i.series_ref
         JOIN studies st ON st.id = se.study_ref
         WHERE i.id = ?1"#,
    )
    .and_then(|mut stmt| stmt.execute([ids.id]))
    .map_err(sql_err("keep replaced instance"))?;
    let series_ref = upsert_hierarchy(tx, rec)?;
    let i = &rec.instance;
    tx.prepare_cached(
        r#"UPDATE instances SET series_ref = ?1, sop_class_uid = ?2, instance_number = ?3,
            transfer_syntax_uid = ?4, "rows" = ?5, "columns" = ?6, number_of_frames = ?7,
            specific_character_set = ?8, blob_id = ?9, key_id = ?10, stored_size = ?11,
            stored_sha256 = ?12, content_sha256 = ?13, source_ae = ?14, received_at = ?15,
            acquisition_date_time = ?16
         WHERE id = ?17"#,
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            series_ref,
            i.sop_class_uid,
            i.instance_number,
            i.transfer_syntax_uid,
            i.rows,
            i.columns,
            i.number_of_frames,
            i.specific_character_set,
            rec.blob_id,
            rec.key_id,
            stored_size,
            rec.stored_sha256,
            rec.content_sha256,
            rec.source_ae,
            rec.received_at,
            i.acquisition_date_time,
            ids.id,
        ])
    })
    .map_err(sql_err("replace instance"))?;
    if series_ref != ids.series_ref {
        remove_if_empty(tx, ids.series_ref)?;
    }
    Ok(CommitOutcome::Replaced { previous: existing })
}

/// Whether storing `rec` would move a stored series to another study or a
/// stored study to another patient (DICOM UIDs are unique: one series has
/// one study, one study one patient, PS3.3 C.7). A sender that reuses a UID
/// under other parents is refused rather than allowed to re-home, and so
/// hide, another patient's images.
fn hierarchy_mismatch(
    tx: &Transaction<'_>,
    rec: &NewInstance,
) -> Result<Option<String>, IndexError> {
    let series_study: Option<String> = tx
        .prepare_cached(
            "SELECT st.study_instance_uid FROM series se JOIN studies st ON st.id = se.study_ref
             WHERE se.series_instance_uid = ?1",
        )
        .and_then(|mut stmt| {
            stmt.query_row([&rec.series.series_instance_uid], |r| r.get(0))
                .optional()
        })
        .map_err(sql_err("find series"))?;
    if series_study.is_some_and(|s| s != rec.study.study_instance_uid) {
        return Ok(Some(format!(
            "series stored under another study (Series Instance UID {})",
            rec.series.series_instance_uid
        )));
    }
    let p = &rec.patient;
    let key_name = if p.patient_id.is_empty() {
        p.patient_name.as_str()
    } else {
        ""
    };
    let study_patient: Option<(String, String, String)> = tx
        .prepare_cached(
            "SELECT p.patient_id, p.issuer_of_patient_id, p.key_name
             FROM studies st JOIN patients p ON p.id = st.patient_ref
             WHERE st.study_instance_uid = ?1",
        )
        .and_then(|mut stmt| {
            stmt.query_row([&rec.study.study_instance_uid], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
        })
        .map_err(sql_err("find study"))?;
    if study_patient.is_some_and(|(id, issuer, name)| {
        id != p.patient_id || issuer != p.issuer_of_patient_id || name != key_name
    }) {
        return Ok(Some(format!(
            "study stored under another patient (Study Instance UID {})",
            rec.study.study_instance_uid
        )));
    }
    Ok(None)
}

/// Upserts patient, study and series of `rec`; returns the series row id.
fn upsert_hierarchy(tx: &Transaction<'_>, rec: &NewInstance) -> Result<i64, IndexError> {
    let p = &rec.patient;
    let key_name = if p.patient_id.is_empty() {
        p.patient_name.as_str()
    } else {
        ""
    };
    let patient_ref: i64 = tx
        .prepare_cached(
            "INSERT INTO patients (patient_id, issuer_of_patient_id, key_name, patient_name,
                patient_birth_date, patient_sex)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (patient_id, issuer_of_patient_id, key_name) DO UPDATE SET
                patient_name = excluded.patient_name,
                patient_birth_date = excluded.patient_birth_date,
                patient_sex = excluded.patient_sex
             RETURNING id",
        )
        .and_then(|mut stmt| {
            stmt.query_row(
                params![
                    p.patient_id,
                    p.issuer_of_patient_id,
                    key_name,
                    p.patient_name,
                    p.patient_birth_date,
                    p.patient_sex
                ],
                |r| r.get(0),
            )
        })
        .map_err(sql_err("upsert patient"))?;

    let s = &rec.study;
    let (study_ref, old_patient_ref): (i64, Option<i64>) = {
        let old: Option<i64> = tx
            .prepare_cached("SELECT patient_ref FROM studies WHERE study_instance_uid = ?1")
            .and_then(|mut stmt| {
                stmt.query_row([&s.study_instance_uid], |r| r.get(0))
                    .optional()
            })
            .map_err(sql_err("find study"))?;
        let id = tx
            .prepare_cached(
                "INSERT INTO studies (patient_ref, study_instance_uid, study_date, study_time,
                    accession_number, study_id, study_description, referring_physician_name,
                    sequences)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (study_instance_uid) DO UPDATE SET
                    patient_ref = excluded.patient_ref,
                    study_date = excluded.study_date,
                    study_time = excluded.study_time,
                    accession_number = excluded.accession_number,
                    study_id = excluded.study_id,
                    study_description = excluded.study_description,
                    referring_physician_name = excluded.referring_physician_name,
                    sequences = excluded.sequences
                 RETURNING id",
            )
            .and_then(|mut stmt| {
                stmt.query_row(
                    params![
                        patient_ref,
                        s.study_instance_uid,
                        s.study_date,
                        s.study_time,
                        s.accession_number,
                        s.study_id,
                        s.study_description,
                        s.referring_physician_name,
                        s.sequences
                    ],
                    |r| r.get(0),
                )
            })
            .map_err(sql_err("upsert study"))?;
        (id, old)
    };

    let se = &rec.series;
    let old_study_ref: Option<i64> = tx
        .prepare_cached("SELECT study_ref FROM series WHERE series_instance_uid = ?1")
        .and_then(|mut stmt| {
            stmt.query_row([&se.series_instance_uid], |r| r.get(0))
                .optional()
        })
        .map_err(sql_err("find series"))?;
    let series_ref: i64 = tx
        .prepare_cached(
            "INSERT INTO series (study_ref, series_instance_uid, modality, series_number,
                series_description, body_part_examined, sequences)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (series_instance_uid) DO UPDATE SET
                study_ref = excluded.study_ref,
                modality = excluded.modality,
                series_number = excluded.series_number,
                series_description = excluded.series_description,
                body_part_examined = excluded.body_part_examined,
                sequences = excluded.sequences
             RETURNING id",
        )
        .and_then(|mut stmt| {
            stmt.query_row(
                params![
                    study_ref,
                    se.series_instance_uid,
                    se.modality,
                    se.series_number,
                    se.series_description,
                    se.body_part_examined,
                    se.sequences
                ],
                |r| r.get(0),
            )
        })
        .map_err(sql_err("upsert series"))?;

    // A study or series that moved to another parent may leave that parent empty.
    if let Some(old) = old_study_ref.filter(|&old| old != study_ref) {
        remove_study_if_empty(tx, old)?;
    }
    if let Some(old) = old_patient_ref.filter(|&old| old != patient_ref) {
        remove_patient_if_empty(tx, old)?;
    }
    Ok(series_ref)
}

/// Removes series `series_ref` if it has no instances, then its study and patient if
/// they became empty.
fn remove_if_empty(tx: &Transaction<'_>, series_ref: i64) -> Result<(), IndexError> {
    let study_ref: Option<i64> = tx
        .query_row(
            "DELETE FROM series WHERE id = ?1
                AND NOT EXISTS (SELECT 1 FROM instances WHERE series_ref = ?1)
             RETURNING study_ref",
            [series_ref],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql_err("remove empty series"))?;
    match study_ref {
        Some(study_ref) => remove_study_if_empty(tx, study_ref),
        None => Ok(()),
    }
}

fn remove_study_if_empty(tx: &Transaction<'_>, study_ref: i64) -> Result<(), IndexError> {
    let patient_ref: Option<i64> = tx
        .query_row(
            "DELETE FROM studies WHERE id = ?1
                AND NOT EXISTS (SELECT 1 FROM series WHERE study_ref = ?1)
             RETURNING patient_ref",
            [study_ref],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql_err("remove empty study"))?;
    match patient_ref {
        Some(patient_ref) => remove_patient_if_empty(tx, patient_ref),
        None => Ok(()),
    }
}

fn remove_patient_if_empty(tx: &Transaction<'_>, patient_ref: i64) -> Result<(), IndexError> {
    tx.execute(
        "DELETE FROM patients WHERE id = ?1
            AND NOT EXISTS (SELECT 1 FROM studies WHERE patient_ref = ?1)",
        [patient_ref],
    )
    .map_err(sql_err("remove empty patient"))?;
    Ok(())
}
