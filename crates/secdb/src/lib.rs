//! The security database: devices, users, web sessions, API tokens and the
//! device inventory, SQLite encrypted with SQLCipher.
//!
//! The key is 32 bytes derived from the master key by the caller. The file is
//! shared by `bastion serve` and the CLI (WAL mode, busy timeout), so
//! `bastion device add` applies to the next association without a restart.

use std::{path::Path, sync::Mutex};

use rusqlite::Connection;

/// Errors of the security database. Messages name the file or the
/// operation, never the key.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A file could not be created or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Which file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The database failed.
    #[error("security database: {op}: {source}")]
    Db {
        /// What was being done.
        op: &'static str,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The database could not be opened with the derived key.
    #[error("security database {0} cannot be decrypted with this master key")]
    WrongKey(std::path::PathBuf),
}

/// Shorthand for results of this crate.
pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// An open security database. `Send + Sync`; statements are serialised by a
/// mutex (the workload is a few reads per association).
pub struct SecurityDb {
    conn: Mutex<Connection>,
}

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE devices (
    ae TEXT PRIMARY KEY NOT NULL,
    network TEXT NOT NULL,
    transport TEXT NOT NULL,
    allow TEXT NOT NULL,
    cert_sha256 TEXT,
    host TEXT,
    port INTEGER,
    on_conflict TEXT NOT NULL DEFAULT 'refuse',
    move_destinations TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE users (
    username TEXT PRIMARY KEY NOT NULL,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    must_change_password INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL
);
"#,
    // 2: accounts (issue 4). Users gain state for throttling, disabling and
    // TOTP; web sessions and API tokens are stored hashed. Times in the new
    // columns are Unix milliseconds (UTC).
    r#"
ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN locked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN failed_logins INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN last_failure_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN totp_secret BLOB;
ALTER TABLE users ADD COLUMN totp_last_step INTEGER NOT NULL DEFAULT 0;
CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY NOT NULL,
    username TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE INDEX sessions_username ON sessions(username);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY NOT NULL,
    username TEXT NOT NULL,
    hash BLOB NOT NULL,
    scope TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    revoked_ms INTEGER,
    last_used_ms INTEGER
);
CREATE INDEX tokens_username ON tokens(username);
"#,
    // 3: login throttling state of names that are not accounts (SHA-256 of
    // the name), so that they cost the same work as real ones.
    r#"
CREATE TABLE unknown_logins (
    name_hash TEXT PRIMARY KEY NOT NULL,
    failures INTEGER NOT NULL,
    last_failure_ms INTEGER NOT NULL
);
CREATE INDEX unknown_logins_last ON unknown_logins(last_failure_ms);
"#,
    // 4: the device inventory (issue 5): what each device's stored headers
    // say, every distinct set of values, and the addresses from which
    // unregistered AE titles tried to connect. Times are Unix milliseconds.
    r#"
CREATE TABLE device_inventory (
    ae TEXT PRIMARY KEY NOT NULL,
    manufacturer TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    software_versions TEXT NOT NULL DEFAULT '',
    serial_number TEXT NOT NULL DEFAULT '',
    station_name TEXT NOT NULL DEFAULT '',
    transport TEXT,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE device_inventory_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ae TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    manufacturer TEXT NOT NULL,
    model TEXT NOT NULL,
    software_versions TEXT NOT NULL,
    serial_number TEXT NOT NULL,
    station_name TEXT NOT NULL
);
CREATE INDEX device_inventory_history_ae ON device_inventory_history(ae, id);
CREATE TABLE unknown_devices (
    address TEXT PRIMARY KEY NOT NULL,
    ae_titles TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    first_ms INTEGER NOT NULL,
    last_ms INTEGER NOT NULL
);
CREATE INDEX unknown_devices_last ON unknown_devices(last_ms);
"#,
    // 5: alerts raised by the detection rules (issue 5). `details` is JSON;
    // `ack_*` are NULL until acknowledged. Ids are never reused.
    r#"
CREATE TABLE alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    rule TEXT NOT NULL,
    severity TEXT NOT NULL,
    summary TEXT NOT NULL,
    details TEXT NOT NULL,
    ack_ts TEXT,
    ack_by TEXT,
    ack_comment TEXT
);
CREATE INDEX alerts_open ON alerts(ack_ts, id);
"#,
    // 6: the admin API (issue 6). Each registered device's most recent
    // refusal (association refused by the policy, or a DIMSE request
    // refused for a missing permission), and each alert's evidence: JSON
    // summaries of the events that raised it (no patient data).
    r#"
CREATE TABLE device_rejections (
    ae TEXT PRIMARY KEY NOT NULL,
    at_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    address TEXT NOT NULL
);
ALTER TABLE alerts ADD COLUMN evidence TEXT NOT NULL DEFAULT '[]';
"#,
    // 7: alert grouping (issue 10): the findings of one burst update one
    // alert; `count` of them and the time of the latest (`last_ts`).
    r#"
ALTER TABLE alerts ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
ALTER TABLE alerts ADD COLUMN last_ts TEXT;
"#,
    // 8: device certificates (issue 10). Every certificate `bastion cert
    // issue` made (serial, AE, SHA-256, not-after) and the revocation list;
    // a revoked fingerprint that was never recorded (issued before this
    // migration) has NULL serial/AE/not-after. `certificate_ae_cutoffs`:
    // AE titles whose certificates issued before this table existed are
    // revoked (they cannot be listed by fingerprint). Times: Unix ms.
    r#"
CREATE TABLE certificates (
    sha256 TEXT PRIMARY KEY NOT NULL,
    serial TEXT,
    ae TEXT,
    not_after_ms INTEGER,
    issued_ms INTEGER,
    revoked_ms INTEGER
);
CREATE INDEX certificates_ae ON certificates(ae);
CREATE TABLE certificate_ae_cutoffs (
    ae TEXT PRIMARY KEY NOT NULL,
    at_ms INTEGER NOT NULL
);
"#,
];

impl SecurityDb {
    /// Opens (creating when missing, mode 0600) the database at `path`.
    ///
    /// # Errors
    /// [`DbError::WrongKey`] when the key does not decrypt an existing
    /// file; [`DbError::Db`] on other SQLite failures.
    pub fn open(path: &Path, key: &[u8; 32]) -> Result<SecurityDb> {
        // The one SQLCipher open path (bastion-sqlcipher): file created 0600
        // before SQLite opens it, raw key first and zeroized, key verified,
        // WAL and FULL sync.
        let conn = bastion_sqlcipher::open(path, key).map_err(|e| match e {
            bastion_sqlcipher::OpenError::Io { op, path, source } => {
                DbError::Io { op, path, source }
            }
            bastion_sqlcipher::OpenError::WrongKey { path } => DbError::WrongKey(path),
            bastion_sqlcipher::OpenError::NoSpace { path } => DbError::Io {
                op: "write",
                path,
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            },
            bastion_sqlcipher::OpenError::Sqlite { op, source, .. } => DbError::Db { op, source },
        })?;
        let db = |op| move |source| DbError::Db { op, source };
        conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);")
            .map_err(db("schema_version"))?;
        let current: i64 = conn
            .query_row(
                "SELECT coalesce(max(version), 0) FROM schema_version",
                [],
                |r| r.get(0),
            )
            .map_err(db("read schema version"))?;
        let skip = usize::try_from(current).unwrap_or(0);
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(skip) {
            let target = i64::try_from(i + 1).unwrap_or(i64::MAX);
            // Version read and migration in one IMMEDIATE transaction: a CLI
            // command and `serve` opening an old file at once migrate it once.
            let tx = rusqlite::Transaction::new_unchecked(
                &conn,
                rusqlite::TransactionBehavior::Immediate,
            )
            .map_err(db("begin migration"))?;
            let version: i64 = tx
                .query_row(
                    "SELECT coalesce(max(version), 0) FROM schema_version",
                    [],
                    |r| r.get(0),
                )
                .map_err(db("read schema version"))?;
            if version < target {
                tx.execute_batch(sql).map_err(db("migrate"))?;
                tx.execute("INSERT INTO schema_version VALUES (?1)", [target])
                    .map_err(db("migrate"))?;
            }
            tx.commit().map_err(db("commit migration"))?;
        }
        Ok(SecurityDb {
            conn: Mutex::new(conn),
        })
    }

    /// SQLite's `PRAGMA quick_check`: the problems it reports, empty when
    /// the database is sound.
    ///
    /// # Errors
    /// [`DbError::Db`] when the check cannot run.
    pub fn quick_check(&self) -> Result<Vec<String>> {
        self.with_conn(|c| {
            let mut st = c
                .prepare("PRAGMA quick_check")
                .map_err(|source| DbError::Db {
                    op: "quick check",
                    source,
                })?;
            let rows = st
                .query_map([], |r| r.get::<_, String>(0))
                .and_then(|rows| rows.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|source| DbError::Db {
                    op: "quick check",
                    source,
                })?;
            Ok(rows.into_iter().filter(|r| r != "ok").collect())
        })
    }

    /// Runs `f` with the connection held (one at a time: the connection is
    /// behind a mutex). For the crates that own the tables
    /// (`bastion-security`: devices, users, certificates; `bastion-detect`:
    /// alerts, inventory), with their own error type `E`.
    ///
    /// # Errors
    /// What `f` returns.
    pub fn with_conn<T, E>(
        &self,
        f: impl FnOnce(&Connection) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }
}
