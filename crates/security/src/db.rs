//! The security database: devices and users, SQLite encrypted with SQLCipher.
//!
//! The key is 32 bytes derived from the master key by the caller. The file is
//! shared by `bastion serve` and the CLI (WAL mode, busy timeout), so
//! `bastion device add` applies to the next association without a restart.

use std::{path::Path, sync::Mutex, time::Duration};

use rusqlite::Connection;

use crate::{Result, SecurityError};

/// An open security database. `Send + Sync`; statements are serialised by a
/// mutex (the workload is a few reads per association).
pub struct SecurityDb {
    conn: Mutex<Connection>,
}

const MIGRATIONS: &[&str] = &[r#"
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
"#];

impl SecurityDb {
    /// Opens (creating when missing, mode 0600) the database at `path`.
    ///
    /// # Errors
    /// [`SecurityError::WrongKey`] when the key does not decrypt an existing
    /// file; [`SecurityError::Db`] on other SQLite failures.
    pub fn open(path: &Path, key: &[u8; 32]) -> Result<SecurityDb> {
        let existed = path.exists();
        let conn =
            Connection::open(path).map_err(|source| SecurityError::Db { op: "open", source })?;
        if !existed {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        let db = |op| move |source| SecurityError::Db { op, source };
        conn.execute_batch(&format!("PRAGMA key = \"x'{}'\";", hex::encode(key)))
            .map_err(db("set key"))?;
        if conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| {
                r.get::<_, i64>(0)
            })
            .is_err()
        {
            return Err(SecurityError::WrongKey(path.to_path_buf()));
        }
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(db("busy timeout"))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA temp_store = MEMORY;",
        )
        .map_err(db("pragmas"))?;
        conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);")
            .map_err(db("schema_version"))?;
        let version: i64 = conn
            .query_row(
                "SELECT coalesce(max(version), 0) FROM schema_version",
                [],
                |r| r.get(0),
            )
            .map_err(db("read schema version"))?;
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(version).unwrap_or(0))
        {
            conn.execute_batch(&format!(
                "BEGIN IMMEDIATE; {sql}; INSERT INTO schema_version VALUES ({}); COMMIT;",
                i + 1
            ))
            .map_err(db("migrate"))?;
        }
        Ok(SecurityDb {
            conn: Mutex::new(conn),
        })
    }

    /// Runs `f` with the connection held.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }
}
