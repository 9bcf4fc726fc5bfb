//! The one way Bastion opens an SQLCipher database: the metadata index
//! (`bastion-index`, SQLite engine) and the security database
//! (`bastion-security`) both go through [`open`], so both get the same
//! guarantees (issue 12, "one SQLCipher open path"):
//!
//! - the file is created by us, mode 0600, before SQLite opens it, so it
//!   (and the `-wal`/`-shm` files SQLite derives their mode from) never
//!   exists with a wider mode, whatever the umask;
//! - the 32-byte key (derived by the caller from the master key) is given
//!   as the first statement, as a raw key (`PRAGMA key = "x'…'"`), from a
//!   buffer that is zeroized after use;
//! - SQLCipher's own stderr logger is silenced (its failures come back as
//!   SQLite errors, which the caller reports without the key);
//! - the key is verified before anything else: a wrong key is
//!   [`OpenError::WrongKey`], never a half-opened database;
//! - durability settings: WAL, `synchronous = FULL`, `temp_store = MEMORY`
//!   (no plaintext temporary files), `foreign_keys = ON`, a busy timeout.
//!
//! Home-made because it is policy (what every encrypted database of ours
//! must be), not mechanism: rusqlite with `bundled-sqlcipher` does the rest.

use std::{
    fs::OpenOptions,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, ErrorCode};
use zeroize::Zeroizing;

/// Why an SQLCipher database could not be opened. Messages name the file,
/// never the key.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file could not be created (mode 0600) or opened.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The database file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The key does not decrypt the file (another master key, or not an
    /// SQLCipher database).
    #[error(
        "{path} cannot be decrypted with this key (wrong master key, or not a Bastion database)"
    )]
    WrongKey {
        /// The database file.
        path: PathBuf,
    },
    /// The disk is full (`SQLITE_FULL`).
    #[error("no space left on device for {path}")]
    NoSpace {
        /// The database file.
        path: PathBuf,
    },
    /// Another SQLite failure while opening.
    #[error("{op} {path}: {source}")]
    Sqlite {
        /// What was being done.
        op: &'static str,
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
}

/// How long a statement waits for another connection's lock before
/// `SQLITE_BUSY`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens (creating when missing, mode 0600) the SQLCipher database at `path`
/// with the raw 32-byte `key`, verifies the key and applies the settings in
/// the module docs. The caller runs its own schema migrations next.
///
/// # Errors
/// [`OpenError::Io`] when the file cannot be created; [`OpenError::WrongKey`];
/// [`OpenError::NoSpace`]; [`OpenError::Sqlite`] otherwise.
pub fn open(path: &Path, key: &[u8; 32]) -> Result<Connection, OpenError> {
    let sql = |op: &'static str| {
        let path = path.to_path_buf();
        move |source: rusqlite::Error| match &source {
            rusqlite::Error::SqliteFailure(e, _) if e.code == ErrorCode::DiskFull => {
                OpenError::NoSpace { path: path.clone() }
            }
            _ => OpenError::Sqlite {
                op,
                path: path.clone(),
                source,
            },
        }
    };
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => OpenError::NoSpace {
                path: path.to_path_buf(),
            },
            _ => OpenError::Io {
                op: "create",
                path: path.to_path_buf(),
                source,
            },
        })?;
    let conn = Connection::open(path).map_err(sql("open"))?;

    // The key must be the first statement on the connection.
    let mut pragma = Zeroizing::new(String::with_capacity(80));
    pragma.push_str("PRAGMA key = \"x'");
    for b in key {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        pragma.push(char::from(HEX[usize::from(b >> 4)]));
        pragma.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    pragma.push_str("'\";");
    conn.execute_batch(&pragma).map_err(sql("set the key of"))?;
    drop(pragma);
    // SQLCipher's own logger writes to stderr, past `tracing`: a wrong key
    // printed `ERROR CORE sqlcipher_page_cipher: hmac check failed` lines
    // before our WrongKey error said the same. Its level is process-wide;
    // every failure it would log also comes back as an SQLite error. Set
    // before the key check.
    conn.execute_batch("PRAGMA cipher_log_level = NONE;")
        .map_err(sql("set the SQLCipher log level of"))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(sql("set the busy timeout of"))?;
    match conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(_) => {}
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::NotADatabase => {
            return Err(OpenError::WrongKey {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(sql("verify the key of")(e)),
    }
    conn.execute_batch(
        "PRAGMA temp_store = MEMORY;
         PRAGMA foreign_keys = ON;
         PRAGMA synchronous = FULL;",
    )
    .map_err(sql("configure"))?;
    // WAL where the filesystem allows it (not on some network filesystems):
    // the journal mode SQLite reports is what the caller gets.
    let _mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(sql("enable WAL on"))?;
    Ok(conn)
}

/// The journal mode of `conn` (`wal` after [`open`] on a local filesystem).
///
/// # Errors
/// The SQLite error.
pub fn journal_mode(conn: &Connection) -> Result<String, rusqlite::Error> {
    conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_0600_encrypted_and_the_key_checked() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("x.db");
        let conn = open(&path, &[7u8; 32]).expect("open");
        conn.execute_batch("CREATE TABLE t (v TEXT); INSERT INTO t VALUES ('MARKER^PATIENT');")
            .expect("write");
        assert_eq!(journal_mode(&conn).expect("mode"), "wal");
        drop(conn);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        for f in std::fs::read_dir(dir.path()).expect("ls") {
            let bytes = std::fs::read(f.expect("entry").path()).expect("read");
            assert!(!bytes.windows(14).any(|w| w == b"MARKER^PATIENT"));
        }
        assert!(matches!(
            open(&path, &[8u8; 32]),
            Err(OpenError::WrongKey { .. })
        ));
        let again = open(&path, &[7u8; 32]).expect("reopen");
        let v: String = again
            .query_row("SELECT v FROM t", [], |r| r.get(0))
            .expect("read");
        assert_eq!(v, "MARKER^PATIENT");
    }
}
