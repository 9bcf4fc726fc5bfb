//! Numbered schema migrations of the PostgreSQL engine (`migrations/NNNN_*.sql`),
//! the counterpart of the SQLite engine's `schema::MIGRATIONS`: entry `n`
//! brings the schema from version `n` to `n + 1`; the applied version is kept
//! in `schema_version`.
//!
//! Several nodes may start at once: the whole migration runs in one
//! transaction holding a transaction-level advisory lock ([`MIGRATION_LOCK`]),
//! so exactly one applies each migration and the others then find the schema
//! current. PostgreSQL's DDL is transactional: a failed migration leaves the
//! previous version intact. (Advisory locks do not survive pgbouncer's
//! transaction pooling across transactions; this one lives inside one.)

use postgres::Client;

use super::{get, pg_err, Keys};
use crate::IndexError;

/// All migrations in order; the schema version after applying `MIGRATIONS[..n]` is `n`.
pub(crate) const MIGRATIONS: &[&str] = &[include_str!("migrations/0001_hierarchy.sql")];

/// The advisory lock key of index migrations (`"bastidx1"` as a big-endian
/// integer); the security database's migrations will use another key.
pub(crate) const MIGRATION_LOCK: i64 = i64::from_be_bytes(*b"bastidx1");

/// Creates `schema` when missing, applies pending migrations, and checks (or
/// on a new database, records) which index key writes it.
pub(crate) fn migrate(
    client: &mut Client,
    schema: &str,
    keys: &Keys,
    name: &str,
) -> Result<(), IndexError> {
    let op = "migrate schema";
    let mut tx = client.transaction().map_err(pg_err("begin migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(pg_err("lock migrations"))?;
    // `schema` is checked by the caller: lowercase letters, digits and `_`.
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.schema_version (version INTEGER NOT NULL);"
    ))
    .map_err(pg_err("create schema_version"))?;
    let row = tx
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {schema}.schema_version"),
            &[],
        )
        .map_err(pg_err("read schema version"))?;
    let current: i32 = get(&row, 0, "read schema version")?;
    let supported = MIGRATIONS.len() as u32;
    if i64::from(current) > i64::from(supported) {
        return Err(IndexError::SchemaTooNew {
            found: i64::from(current),
            supported,
        });
    }
    let current = usize::try_from(current).map_err(|_| IndexError::Corrupt {
        reason: format!("schema version {current}"),
    })?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.batch_execute(sql).map_err(pg_err(op))?;
        let version = i as i32 + 1;
        tx.execute(&format!("DELETE FROM {schema}.schema_version"), &[])
            .map_err(pg_err("record schema version"))?;
        tx.execute(
            &format!("INSERT INTO {schema}.schema_version (version) VALUES ($1)"),
            &[&version],
        )
        .map_err(pg_err("record schema version"))?;
        tracing::info!(version, engine = "postgresql", "index schema migrated");
    }

    let mac = keys.hash("key-check", b"bastion index key check");
    let stored = tx
        .query_opt("SELECT mac FROM key_check", &[])
        .map_err(pg_err("check key"))?;
    match stored {
        None => {
            tx.execute("INSERT INTO key_check (mac) VALUES ($1)", &[&mac])
                .map_err(pg_err("record key check"))?;
        }
        Some(r) => {
            let stored: Vec<u8> = get(&r, 0, "check key")?;
            if aws_lc_rs::constant_time::verify_slices_are_equal(&stored, &mac).is_err() {
                return Err(IndexError::WrongKey { path: name.into() });
            }
        }
    }
    tx.commit().map_err(pg_err("commit migration"))
}
