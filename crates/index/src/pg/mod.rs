//! The PostgreSQL engine of the index (issue 12): the same semantics as the
//! SQLite engine, for several `bastion serve` nodes writing one database.
//!
//! # Connections
//! The index API is blocking, so this engine uses the synchronous `postgres`
//! client (rust-postgres) through an `r2d2` pool (`r2d2_postgres`): each
//! call checks out one connection, so the group-commit writer, C-FIND scans
//! and the CLI run side by side instead of queueing behind one mutex as on
//! SQLite. The `postgres` client runs its own Tokio runtime inside each call:
//! call the index from blocking threads (as the archive does), never from an
//! async task. TLS (`rustls` with aws-lc-rs through `tokio-postgres-rustls`;
//! no `ring`) verifies the server's chain and host name against the roots
//! given in [`PgConnect::tls_roots`], i.e. `sslmode=verify-full`; without
//! roots only loopback hosts and unix sockets are accepted, in plaintext.
//!
//! # Several writers
//! READ COMMITTED (set on every connection); a transaction failing with a
//! serialization failure or deadlock (SQLSTATE 40001/40P01), or with a
//! foreign-key or unique violation caused by a concurrent writer (23503,
//! 23505), is retried whole, at most [`MAX_ATTEMPTS`] times. Before its
//! first statement a batch takes transaction advisory locks on the SOP,
//! series and study UIDs it writes, in one sorted order (no deadlock
//! between batches): the duplicate/conflict/hierarchy decisions are made
//! exactly as if the batches ran one after another, as on SQLite.
//! Patient, study and series rows are created with `INSERT … ON CONFLICT`
//! on their unique keys; no counter row is updated by inserts (counts are
//! `count(*)`); an instance exists once its transaction commits
//! (`synchronous_commit = on`).
//!
//! # No plaintext patient data
//! See [`crypt`] and `migrations/0001_hierarchy.sql`: identifying values are
//! sealed with AES-256-GCM, exact-match keys are keyed hashes, and Patient's
//! Name prefixes are keyed hashes in a side table. A prefilter this engine
//! cannot evaluate on hashes (e.g. a PN prefix on another column) is not
//! applied: prefilters may always return a superset (the matcher decides).

pub(crate) mod crypt;
mod migrations;

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use postgres::config::{Host, SslMode};
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::GenericClient;
use r2d2_postgres::PostgresConnectionManager;
use tokio_postgres_rustls::MakeRustlsConnect;
use zeroize::Zeroizing;

use crate::query::{Column, EntityRow, Filter, Level, PatientCounts, Prefilter, StudyCounts};
use crate::{
    to_u64, CommitOutcome, Counts, IndexError, InstanceAttrs, NewInstance, OnConflict,
    PatientAttrs, SeriesAttrs, StoredInstance, StudyAttrs, SELECT_INSTANCE,
};
use crypt::Keys;

/// How often one transaction is tried when a concurrent writer makes it fail
/// (serialization failure, deadlock, FK/unique violation).
pub const MAX_ATTEMPTS: u32 = 6;

/// How to reach the PostgreSQL database of an index.
#[derive(Clone)]
pub struct PgConnect {
    /// `postgres://USER@HOST:PORT/DB` (libpq URL or key=value syntax, as
    /// rust-postgres parses it). Must not hold a password.
    pub url: String,
    /// The role's password (in Bastion: `PGPASSWORD` or the 0600 secrets
    /// file `index-password`); never logged nor put in errors.
    pub password: Option<Zeroizing<String>>,
    /// Trusted roots for TLS: `Some` → TLS required, the server's
    /// certificate chain and host name verified (`sslmode=verify-full`);
    /// `None` → plaintext, refused unless every host is loopback or a unix
    /// socket.
    pub tls_roots: Option<rustls::RootCertStore>,
    /// The PostgreSQL schema holding the index tables (created when
    /// missing): lowercase ASCII letters, digits and `_`, at most 63 bytes.
    pub schema: String,
    /// Most connections this process opens.
    pub pool_size: u32,
}

impl PgConnect {
    /// Plaintext to a loopback `url`, schema `bastion_index`, 8 connections.
    pub fn new(url: &str) -> PgConnect {
        PgConnect {
            url: url.to_owned(),
            password: None,
            tls_roots: None,
            schema: "bastion_index".to_owned(),
            pool_size: 8,
        }
    }
}

impl std::fmt::Debug for PgConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnect")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls_roots.is_some())
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

type Pool = r2d2::Pool<Manager>;
type Tx<'a> = postgres::Transaction<'a>;
/// A write transaction with the connection's statement cache.
type W<'a, 'b> = Cached<'a, Tx<'b>>;

/// Most prepared statements kept per connection (then the cache starts over;
/// scans build their SQL from the prefilters, so their number is bounded but
/// not tiny).
const STATEMENT_CACHE: usize = 256;

/// r2d2_postgres's manager, with a prepared-statement cache per connection:
/// without it every statement is parsed and planned again (two round trips
/// instead of one), which halved ingest throughput.
struct Manager(PostgresConnectionManager<MakeRustlsConnect>);

/// A pooled connection and its prepared statements (by SQL text).
struct PgConn {
    client: postgres::Client,
    cache: std::collections::HashMap<String, postgres::Statement>,
}

impl PgConn {
    fn cached(&mut self) -> Cached<'_, postgres::Client> {
        Cached {
            c: &mut self.client,
            cache: &mut self.cache,
        }
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<PgConn, postgres::Error> {
        Ok(PgConn {
            client: self.0.connect()?,
            cache: std::collections::HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), postgres::Error> {
        self.0.is_valid(&mut conn.client)
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        self.0.has_broken(&mut conn.client)
    }
}

/// A client or transaction with its connection's statement cache: the
/// `GenericClient` calls the engine uses, each on a prepared statement.
struct Cached<'a, C> {
    c: &'a mut C,
    cache: &'a mut std::collections::HashMap<String, postgres::Statement>,
}

impl<C: GenericClient> Cached<'_, C> {
    fn stmt(&mut self, sql: &str) -> Result<postgres::Statement, postgres::Error> {
        if let Some(s) = self.cache.get(sql) {
            return Ok(s.clone());
        }
        let s = self.c.prepare(sql)?;
        if self.cache.len() >= STATEMENT_CACHE {
            self.cache.clear();
        }
        self.cache.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let s = self.stmt(sql)?;
        self.c.execute(&s, params)
    }

    fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        let s = self.stmt(sql)?;
        self.c.query(&s, params)
    }

    fn query_one(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<postgres::Row, postgres::Error> {
        let s = self.stmt(sql)?;
        self.c.query_one(&s, params)
    }

    fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<postgres::Row>, postgres::Error> {
        let s = self.stmt(sql)?;
        self.c.query_opt(&s, params)
    }
}

/// An open PostgreSQL index.
pub(crate) struct PgIndex {
    /// Always `Some` until dropped (see the `Drop` impl).
    pool: Option<Pool>,
    keys: Keys,
    /// `postgres://USER@HOST:PORT/DB`, for errors.
    name: String,
}

impl std::fmt::Debug for PgIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgIndex")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for PgIndex {
    /// Closing a `postgres` client blocks on its runtime: the pool's
    /// connections are closed off any async context (`serve` drops the
    /// archive inside its runtime at shutdown).
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            off_runtime(move || drop(pool));
        }
    }
}

/// Maps a PostgreSQL error, recognising "disk full" (SQLSTATE 53100).
pub(crate) fn pg_err(op: &'static str) -> impl Fn(postgres::Error) -> IndexError {
    move |source| {
        if source.code() == Some(&SqlState::DISK_FULL) {
            return IndexError::NoSpace;
        }
        IndexError::Postgres { op, source }
    }
}

fn config_err(reason: impl Into<String>) -> IndexError {
    IndexError::Config {
        reason: reason.into(),
    }
}

/// Whether a failed transaction may succeed when tried again.
fn retryable(e: &IndexError) -> bool {
    let IndexError::Postgres { source, .. } = e else {
        return false;
    };
    source.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::FOREIGN_KEY_VIOLATION
            || *c == SqlState::UNIQUE_VIOLATION
    })
}

fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn is_local(config: &postgres::Config) -> bool {
    let host_ok = config.get_hosts().iter().all(|h| match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
    });
    host_ok && config.get_hostaddrs().iter().all(IpAddr::is_loopback)
}

fn display_name(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => String::new(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

/// Associated data of a sealed column: table and row key.
fn aad(table: &str, key: &[u8]) -> Vec<u8> {
    let mut a = format!("bastion-index-pg/{table}/").into_bytes();
    a.extend_from_slice(key);
    a
}

fn get<'a, T: postgres::types::FromSql<'a>>(
    r: &'a postgres::Row,
    i: usize,
    op: &'static str,
) -> Result<T, IndexError> {
    r.try_get(i).map_err(pg_err(op))
}

impl PgIndex {
    /// Connects, migrates the schema (once, under an advisory lock, whatever
    /// the number of nodes starting at once) and checks the key.
    pub(crate) fn open(c: &PgConnect, key: &[u8; 32]) -> Result<PgIndex, IndexError> {
        if !valid_schema(&c.schema) {
            return Err(config_err(format!(
                "index schema name {:?}: use lowercase letters, digits and _",
                c.schema
            )));
        }
        let mut config = postgres::Config::from_str(&c.url)
            .map_err(|e| config_err(format!("[index] url is not a PostgreSQL URL: {e}")))?;
        if config.get_password().is_some() {
            return Err(config_err(
                "[index] url holds a password: give it in PGPASSWORD or the secrets file index-password",
            ));
        }
        let roots = match &c.tls_roots {
            Some(roots) => {
                config.ssl_mode(SslMode::Require);
                roots.clone()
            }
            None if is_local(&config) => {
                config.ssl_mode(SslMode::Disable);
                rustls::RootCertStore::empty()
            }
            None => {
                return Err(config_err(
                    "[index] url names a host that is not loopback: TLS roots are required (verify-full)",
                ))
            }
        };
        if let Some(pw) = &c.password {
            config.password(pw.as_bytes());
        }
        config.options(&format!(
            "-c search_path={} -c synchronous_commit=on -c default_transaction_isolation=read\\ committed -c client_min_messages=warning",
            c.schema
        ));
        config.application_name("bastion");
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config_err(format!("TLS to the index database: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = MakeRustlsConnect::new(tls);
        let keys = Keys::derive(key)?;
        let name = display_name(&config);
        {
            let mut client = config
                .connect(connector.clone())
                .map_err(pg_err("connect"))?;
            migrations::migrate(&mut client, &c.schema, &keys, &name)?;
        }
        let manager = Manager(PostgresConnectionManager::new(config, connector));
        let pool = r2d2::Pool::builder()
            .max_size(c.pool_size.max(1))
            .min_idle(Some(0))
            .connection_timeout(Duration::from_secs(10))
            .build_unchecked(manager);
        Ok(PgIndex {
            pool: Some(pool),
            keys,
            name,
        })
    }

    /// `postgres://USER@HOST:PORT/DB`.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<Manager>, IndexError> {
        self.pool
            .as_ref()
            .ok_or_else(|| IndexError::Unavailable {
                reason: "index closed".into(),
            })?
            .get()
            .map_err(|e| IndexError::Unavailable {
                reason: e.to_string(),
            })
    }

    /// Runs `f` in a READ COMMITTED transaction, tried again (bounded) when a
    /// concurrent writer made it fail.
    fn write<T>(
        &self,
        op: &'static str,
        mut f: impl FnMut(&mut W<'_, '_>) -> Result<T, IndexError>,
    ) -> Result<T, IndexError> {
        let mut conn = self.conn()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = (|| {
                let PgConn { client, cache } = &mut *conn;
                let mut tx = client.transaction().map_err(pg_err("begin transaction"))?;
                let v = f(&mut Cached { c: &mut tx, cache })?;
                tx.commit().map_err(pg_err(op))?;
                Ok(v)
            })();
            match result {
                Err(e) if attempt < MAX_ATTEMPTS && retryable(&e) => {
                    tracing::debug!(attempt, error = %e, "index: transaction retried");
                    std::thread::sleep(Duration::from_millis(2 << attempt));
                }
                other => return other,
            }
        }
    }

    fn patient_key(&self, p: &PatientAttrs) -> Vec<u8> {
        let key_name = if p.patient_id.is_empty() {
            p.patient_name.as_str()
        } else {
            ""
        };
        self.keys.hash_parts(
            "patient-key",
            &[
                p.patient_id.as_bytes(),
                p.issuer_of_patient_id.as_bytes(),
                key_name.as_bytes(),
            ],
        )
    }

    pub(crate) fn commit_batch(
        &self,
        records: &[NewInstance],
    ) -> Result<Vec<CommitOutcome>, IndexError> {
        let mut locks: Vec<i64> = records
            .iter()
            .flat_map(|r| {
                [
                    self.keys.lock_key("lock-sop", &r.instance.sop_instance_uid),
                    self.keys
                        .lock_key("lock-series", &r.series.series_instance_uid),
                    self.keys
                        .lock_key("lock-study", &r.study.study_instance_uid),
                ]
            })
            .collect();
        locks.sort_unstable();
        locks.dedup();
        self.write("commit batch", |tx| {
            tx.execute(
                "SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::bigint[]) AS k",
                &[&locks],
            )
            .map_err(pg_err("lock batch keys"))?;
            let mut outcomes = Vec::with_capacity(records.len());
            for rec in records {
                outcomes.push(self.commit_one(tx, rec)?);
            }
            Ok(outcomes)
        })
    }

    fn commit_one(
        &self,
        tx: &mut W<'_, '_>,
        rec: &NewInstance,
    ) -> Result<CommitOutcome, IndexError> {
        let stored_size =
            i64::try_from(rec.stored_size).map_err(|_| IndexError::ValueOutOfRange {
                field: "stored_size",
            })?;
        let i = &rec.instance;
        let Some((existing, id, old_series_ref)) = find_row(tx, &i.sop_instance_uid)? else {
            if rec.on_conflict == OnConflict::Refuse {
                if let Some(reason) = self.hierarchy_mismatch(tx, rec)? {
                    return Ok(CommitOutcome::HierarchyMismatch { reason });
                }
            }
            let series_ref = self.upsert_hierarchy(tx, rec)?;
            tx.execute(
                r#"INSERT INTO instances (series_ref, sop_instance_uid, sop_class_uid, instance_number,
                    transfer_syntax_uid, "rows", "columns", number_of_frames, specific_character_set,
                    blob_id, key_id, stored_size, stored_sha256, content_sha256, source_ae, received_at,
                    acquisition_date_time)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"#,
                &[
                    &series_ref,
                    &i.sop_instance_uid,
                    &i.sop_class_uid,
                    &i.instance_number,
                    &i.transfer_syntax_uid,
                    &i.rows,
                    &i.columns,
                    &i.number_of_frames,
                    &i.specific_character_set,
                    &rec.blob_id,
                    &rec.key_id,
                    &stored_size,
                    &rec.stored_sha256,
                    &rec.content_sha256,
                    &rec.source_ae,
                    &rec.received_at,
                    &i.acquisition_date_time,
                ],
            )
            .map_err(pg_err("insert instance"))?;
            return Ok(CommitOutcome::Stored);
        };
        if existing.content_sha256 == rec.content_sha256 {
            return Ok(CommitOutcome::Duplicate { existing });
        }
        if rec.on_conflict == OnConflict::Refuse {
            return Ok(CommitOutcome::Conflict { existing });
        }
        tx.execute(
            r#"INSERT INTO replaced_instances (sop_instance_uid, study_instance_uid, series_instance_uid,
                sop_class_uid, instance_number, transfer_syntax_uid, "rows", "columns", number_of_frames,
                specific_character_set, blob_id, key_id, stored_size, stored_sha256, content_sha256,
                source_ae, received_at, acquisition_date_time, replaced_at)
             SELECT i.sop_instance_uid, st.study_instance_uid, se.series_instance_uid,
                i.sop_class_uid, i.instance_number, i.transfer_syntax_uid, i."rows", i."columns",
                i.number_of_frames, i.specific_character_set, i.blob_id, i.key_id, i.stored_size,
                i.stored_sha256, i.content_sha256, i.source_ae, i.received_at,
                i.acquisition_date_time,
                to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
             FROM instances i
             JOIN series se ON se.id = i.series_ref
             JOIN studies st ON st.id = se.study_ref
             WHERE i.id = $1"#,
            &[&id],
        )
        .map_err(pg_err("keep replaced instance"))?;
        let series_ref = self.upsert_hierarchy(tx, rec)?;
        tx.execute(
            r#"UPDATE instances SET series_ref = $1, sop_class_uid = $2, instance_number = $3,
                transfer_syntax_uid = $4, "rows" = $5, "columns" = $6, number_of_frames = $7,
                specific_character_set = $8, blob_id = $9, key_id = $10, stored_size = $11,
                stored_sha256 = $12, content_sha256 = $13, source_ae = $14, received_at = $15,
                acquisition_date_time = $16
             WHERE id = $17"#,
            &[
                &series_ref,
                &i.sop_class_uid,
                &i.instance_number,
                &i.transfer_syntax_uid,
                &i.rows,
                &i.columns,
                &i.number_of_frames,
                &i.specific_character_set,
                &rec.blob_id,
                &rec.key_id,
                &stored_size,
                &rec.stored_sha256,
                &rec.content_sha256,
                &rec.source_ae,
                &rec.received_at,
                &i.acquisition_date_time,
                &id,
            ],
        )
        .map_err(pg_err("replace instance"))?;
        if series_ref != old_series_ref {
            remove_series_if_empty(tx, old_series_ref)?;
        }
        Ok(CommitOutcome::Replaced { previous: existing })
    }

    /// The SQLite engine's `hierarchy_mismatch`, with the patient compared by
    /// its keyed patient key.
    fn hierarchy_mismatch(
        &self,
        tx: &mut W<'_, '_>,
        rec: &NewInstance,
    ) -> Result<Option<String>, IndexError> {
        let op = "find series";
        let series_study = tx
            .query_opt(
                "SELECT st.study_instance_uid FROM series se JOIN studies st ON st.id = se.study_ref
                 WHERE se.series_instance_uid = $1",
                &[&rec.series.series_instance_uid],
            )
            .map_err(pg_err(op))?;
        if let Some(row) = series_study {
            if get::<String>(&row, 0, op)? != rec.study.study_instance_uid {
                return Ok(Some(format!(
                    "series stored under another study (Series Instance UID {})",
                    rec.series.series_instance_uid
                )));
            }
        }
        let op = "find study";
        let study_patient = tx
            .query_opt(
                "SELECT p.key_hash FROM studies st JOIN patients p ON p.id = st.patient_ref
                 WHERE st.study_instance_uid = $1",
                &[&rec.study.study_instance_uid],
            )
            .map_err(pg_err(op))?;
        if let Some(row) = study_patient {
            if get::<Vec<u8>>(&row, 0, op)? != self.patient_key(&rec.patient) {
                return Ok(Some(format!(
                    "study stored under another patient (Study Instance UID {})",
                    rec.study.study_instance_uid
                )));
            }
        }
        Ok(None)
    }

    /// Upserts patient, study and series of `rec`; returns the series row id.
    /// A row whose values are unchanged (same `row_h`) is not written.
    fn upsert_hierarchy(&self, tx: &mut W<'_, '_>, rec: &NewInstance) -> Result<i64, IndexError> {
        let k = &self.keys;
        let p = &rec.patient;
        let key_hash = self.patient_key(p);
        let pf = [
            p.patient_id.as_str(),
            &p.issuer_of_patient_id,
            &p.patient_name,
            &p.patient_birth_date,
            &p.patient_sex,
        ];
        let row_h = k.hash_parts("patient-row", &pf.map(str::as_bytes));
        let op = "upsert patient";
        let old = tx
            .query_opt(
                "SELECT id, row_h FROM patients WHERE key_hash = $1",
                &[&key_hash],
            )
            .map_err(pg_err(op))?;
        let patient_ref: i64 = match old {
            Some(r) if get::<Vec<u8>>(&r, 1, op)? == row_h => get(&r, 0, op)?,
            _ => {
                let pii = k.seal(&aad("patients", &key_hash), &pf)?;
                let id: i64 = get(
                    &tx.query_one(
                        "INSERT INTO patients (key_hash, patient_id_h, issuer_h, name_unsure, row_h, pii)
                         VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (key_hash) DO UPDATE SET
                            name_unsure = excluded.name_unsure, row_h = excluded.row_h,
                            pii = excluded.pii
                         RETURNING id",
                        &[
                            &key_hash,
                            &k.hash("patient-id", p.patient_id.as_bytes()),
                            &k.hash("issuer", p.issuer_of_patient_id.as_bytes()),
                            &crypt::name_unsure(&p.patient_name),
                            &row_h,
                            &pii,
                        ],
                    )
                    .map_err(pg_err(op))?,
                    0,
                    op,
                )?;
                let prefixes = k.name_prefixes(&key_hash, &p.patient_name);
                tx.execute(
                    "DELETE FROM patient_name_prefixes WHERE patient_ref = $1 AND NOT h = ANY($2)",
                    &[&id, &prefixes],
                )
                .map_err(pg_err(op))?;
                tx.execute(
                    "INSERT INTO patient_name_prefixes (h, patient_ref)
                     SELECT h, $2 FROM unnest($1::bytea[]) AS h ON CONFLICT DO NOTHING",
                    &[&prefixes, &id],
                )
                .map_err(pg_err(op))?;
                id
            }
        };

        let s = &rec.study;
        let sf = [
            s.study_time.as_str(),
            &s.accession_number,
            &s.study_id,
            &s.study_description,
            &s.referring_physician_name,
            &s.sequences,
        ];
        let pref = patient_ref.to_be_bytes();
        let mut parts: Vec<&[u8]> = vec![
            &pref,
            s.study_instance_uid.as_bytes(),
            s.study_date.as_bytes(),
        ];
        parts.extend(sf.iter().map(|v| v.as_bytes()));
        let row_h = k.hash_parts("study-row", &parts);
        let op = "upsert study";
        let old = tx
            .query_opt(
                "SELECT id, patient_ref, row_h FROM studies WHERE study_instance_uid = $1",
                &[&s.study_instance_uid],
            )
            .map_err(pg_err(op))?;
        let old_patient_ref: Option<i64> = old.as_ref().map(|r| get(r, 1, op)).transpose()?;
        let study_ref: i64 = match old {
            Some(r) if get::<Vec<u8>>(&r, 2, op)? == row_h => get(&r, 0, op)?,
            _ => {
                let pii = k.seal(&aad("studies", s.study_instance_uid.as_bytes()), &sf)?;
                get(
                    &tx.query_one(
                        "INSERT INTO studies (patient_ref, study_instance_uid, study_date, accession_h,
                            study_id_h, row_h, pii)
                         VALUES ($1, $2, $3, $4, $5, $6, $7)
                         ON CONFLICT (study_instance_uid) DO UPDATE SET
                            patient_ref = excluded.patient_ref, study_date = excluded.study_date,
                            accession_h = excluded.accession_h, study_id_h = excluded.study_id_h,
                            row_h = excluded.row_h, pii = excluded.pii
                         RETURNING id",
                        &[
                            &patient_ref,
                            &s.study_instance_uid,
                            &s.study_date,
                            &k.hash("accession", s.accession_number.as_bytes()),
                            &k.hash("study-id", s.study_id.as_bytes()),
                            &row_h,
                            &pii,
                        ],
                    )
                    .map_err(pg_err(op))?,
                    0,
                    op,
                )?
            }
        };

        let se = &rec.series;
        let ef = [
            se.series_description.as_str(),
            &se.body_part_examined,
            &se.sequences,
        ];
        let sref = study_ref.to_be_bytes();
        let num = se.series_number.map(i64::to_be_bytes);
        let mut parts: Vec<&[u8]> = vec![
            &sref,
            se.series_instance_uid.as_bytes(),
            se.modality.as_bytes(),
            num.as_ref().map_or(&[][..], |n| &n[..]),
        ];
        parts.extend(ef.iter().map(|v| v.as_bytes()));
        let row_h = k.hash_parts("series-row", &parts);
        let op = "upsert series";
        let old = tx
            .query_opt(
                "SELECT id, study_ref, row_h FROM series WHERE series_instance_uid = $1",
                &[&se.series_instance_uid],
            )
            .map_err(pg_err(op))?;
        let old_study_ref: Option<i64> = old.as_ref().map(|r| get(r, 1, op)).transpose()?;
        let series_ref: i64 = match old {
            Some(r) if get::<Vec<u8>>(&r, 2, op)? == row_h => get(&r, 0, op)?,
            _ => {
                let pii = k.seal(&aad("series", se.series_instance_uid.as_bytes()), &ef)?;
                get(
                    &tx.query_one(
                        "INSERT INTO series (study_ref, series_instance_uid, modality, series_number,
                            row_h, pii)
                         VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (series_instance_uid) DO UPDATE SET
                            study_ref = excluded.study_ref, modality = excluded.modality,
                            series_number = excluded.series_number, row_h = excluded.row_h,
                            pii = excluded.pii
                         RETURNING id",
                        &[
                            &study_ref,
                            &se.series_instance_uid,
                            &se.modality,
                            &se.series_number,
                            &row_h,
                            &pii,
                        ],
                    )
                    .map_err(pg_err(op))?,
                    0,
                    op,
                )?
            }
        };

        if let Some(old) = old_study_ref.filter(|&old| old != study_ref) {
            remove_study_if_empty(tx, old)?;
        }
        if let Some(old) = old_patient_ref.filter(|&old| old != patient_ref) {
            remove_patient_if_empty(tx, old)?;
        }
        Ok(series_ref)
    }

    pub(crate) fn find_instance(
        &self,
        sop_instance_uid: &str,
    ) -> Result<Option<StoredInstance>, IndexError> {
        let mut conn = self.conn()?;
        Ok(find_row(&mut conn.cached(), sop_instance_uid)?.map(|(s, _, _)| s))
    }

    pub(crate) fn blob_ids(&self) -> Result<std::collections::HashSet<String>, IndexError> {
        let op = "list blob ids";
        let mut conn = self.conn()?;
        let rows = conn
            .cached()
            .query(
                "SELECT blob_id FROM instances UNION SELECT blob_id FROM replaced_instances",
                &[],
            )
            .map_err(pg_err(op))?;
        rows.iter().map(|r| get(r, 0, op)).collect()
    }

    pub(crate) fn counts(&self) -> Result<Counts, IndexError> {
        let op = "count rows";
        let mut conn = self.conn()?;
        let r = conn
            .cached()
            .query_one(
                "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies),
                        (SELECT count(*) FROM series), (SELECT count(*) FROM instances)",
                &[],
            )
            .map_err(pg_err(op))?;
        Ok(Counts {
            patients: to_u64(get(&r, 0, op)?, "count")?,
            studies: to_u64(get(&r, 1, op)?, "count")?,
            series: to_u64(get(&r, 2, op)?, "count")?,
            instances: to_u64(get(&r, 3, op)?, "count")?,
        })
    }

    pub(crate) fn list_instances(&self, limit: u32) -> Result<Vec<StoredInstance>, IndexError> {
        let op = "list instances";
        let mut conn = self.conn()?;
        let rows = conn
            .cached()
            .query(
                &format!("{SELECT_INSTANCE} ORDER BY i.id LIMIT $1"),
                &[&i64::from(limit)],
            )
            .map_err(pg_err(op))?;
        rows.iter().map(|r| Ok(stored_from_row(r)?.0)).collect()
    }

    /// A trivial round trip: PostgreSQL checks its own pages.
    pub(crate) fn quick_check(&self) -> Result<Vec<String>, IndexError> {
        let mut conn = self.conn()?;
        conn.client
            .simple_query("SELECT 1")
            .map_err(pg_err("quick check"))?;
        Ok(Vec::new())
    }

    /// [`scan`](Self::scan) from any thread (see [`off_runtime`]); on a
    /// current-thread runtime the rows are collected first, then handed out.
    pub(crate) fn scan_any_thread(
        &self,
        level: Level,
        prefilters: &[Prefilter],
        each: &mut dyn FnMut(EntityRow) -> bool,
    ) -> Result<(), IndexError> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Err(_) => self.scan(level, prefilters, each),
            Ok(RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.scan(level, prefilters, each))
            }
            Ok(_) => {
                let rows = off_runtime(|| {
                    let mut rows = Vec::new();
                    self.scan(level, prefilters, &mut |r| {
                        rows.push(r);
                        true
                    })
                    .map(|()| rows)
                })?;
                for r in rows {
                    if !each(r) {
                        break;
                    }
                }
                Ok(())
            }
        }
    }

    pub(crate) fn scan(
        &self,
        level: Level,
        prefilters: &[Prefilter],
        each: &mut dyn FnMut(EntityRow) -> bool,
    ) -> Result<(), IndexError> {
        let op = "query scan";
        let (sql, params) = self.scan_sql(level, prefilters);
        let mut conn = self.conn()?;
        let stmt = conn.cached().stmt(&sql).map_err(pg_err(op))?;
        let mut rows = conn
            .client
            .query_raw(
                &stmt,
                params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)),
            )
            .map_err(pg_err(op))?;
        while let Some(row) = rows.next().map_err(pg_err(op))? {
            if !each(self.read_entity(&row, level)?) {
                break;
            }
        }
        Ok(())
    }

    fn scan_sql(&self, level: Level, prefilters: &[Prefilter]) -> (String, Vec<Param>) {
        const P: &str = "p.id, p.key_hash, p.pii";
        const ST: &str = "st.id, st.study_instance_uid, st.study_date, st.pii";
        const SE: &str = "se.id, se.series_instance_uid, se.modality, se.series_number, se.pii";
        const I: &str = r#"i.id, i.sop_instance_uid, i.sop_class_uid, i.instance_number,
            i.transfer_syntax_uid, i."rows", i."columns", i.number_of_frames,
            i.specific_character_set, i.acquisition_date_time"#;
        let (cols, from, order) = match level {
            Level::Patient => (P.to_owned(), "patients p", "p.id"),
            Level::Study => (
                format!("{P}, {ST}"),
                "studies st JOIN patients p ON p.id = st.patient_ref",
                "st.id",
            ),
            Level::Series => (
                format!("{P}, {ST}, {SE}"),
                "series se JOIN studies st ON st.id = se.study_ref
                 JOIN patients p ON p.id = st.patient_ref",
                "se.id",
            ),
            Level::Instance => (
                format!("{P}, {ST}, {SE}, {I}"),
                "instances i JOIN series se ON se.id = i.series_ref
                 JOIN studies st ON st.id = se.study_ref
                 JOIN patients p ON p.id = st.patient_ref",
                "i.id",
            ),
        };
        let mut sql = format!("SELECT {cols} FROM {from} WHERE TRUE");
        let mut params: Vec<Param> = Vec::new();
        let push = |params: &mut Vec<Param>, p: Param| -> String {
            params.push(p);
            format!("${}", params.len())
        };
        let k = &self.keys;
        for f in prefilters.iter().filter(|f| f.column.level() <= level) {
            let plain = match f.column {
                Column::StudyInstanceUid => Some("st.study_instance_uid"),
                Column::StudyDate => Some("st.study_date"),
                Column::SeriesInstanceUid => Some("se.series_instance_uid"),
                Column::Modality => Some("se.modality"),
                Column::SopInstanceUid => Some("i.sop_instance_uid"),
                Column::SopClassUid => Some("i.sop_class_uid"),
                _ => None,
            };
            let hashed = match f.column {
                Column::PatientId => Some(("p.patient_id_h", "patient-id")),
                Column::IssuerOfPatientId => Some(("p.issuer_h", "issuer")),
                Column::AccessionNumber => Some(("st.accession_h", "accession")),
                Column::StudyId => Some(("st.study_id_h", "study-id")),
                _ => None,
            };
            match &f.filter {
                Filter::AnyOf(values) if values.is_empty() => sql.push_str(" AND FALSE"),
                Filter::AnyOf(values) => {
                    if let Some(col) = plain {
                        let n = push(&mut params, Box::new(values.clone()));
                        sql.push_str(&format!(" AND {col} = ANY({n})"));
                    } else if let Some((col, domain)) = hashed {
                        let hashes: Vec<Vec<u8>> = values
                            .iter()
                            .map(|v| k.hash(domain, v.as_bytes()))
                            .collect();
                        let n = push(&mut params, Box::new(hashes));
                        sql.push_str(&format!(" AND {col} = ANY({n})"));
                    }
                    // Patient's Name: only prefixes are searchable; the matcher decides.
                }
                Filter::Range(lo, hi) if f.column == Column::StudyDate => {
                    let canonical = lo.as_ref().or(hi.as_ref()).is_some_and(|v| v.len() == 8)
                        && lo.iter().chain(hi.iter()).all(|v| v.len() == 8);
                    if canonical {
                        // Indexed both ways: canonical dates in range
                        // (studies_study_date), plus every non-canonical value
                        // (the partial index) for the matcher to decide.
                        sql.push_str(
                            " AND st.id IN (SELECT id FROM studies WHERE NOT date_noncanonical",
                        );
                        if let Some(lo) = lo {
                            let n = push(&mut params, Box::new(lo.clone()));
                            sql.push_str(&format!(" AND study_date >= {n}"));
                        }
                        if let Some(hi) = hi {
                            let n = push(&mut params, Box::new(hi.clone()));
                            sql.push_str(&format!(" AND study_date <= {n}"));
                        }
                        sql.push_str(" UNION ALL SELECT id FROM studies WHERE date_noncanonical)");
                    } else {
                        let width = lo.as_ref().or(hi.as_ref()).map_or(0, String::len);
                        sql.push_str(&format!(
                            " AND (length(st.study_date) <> {width} OR st.study_date ~ '[^0-9]' OR (TRUE"
                        ));
                        if let Some(lo) = lo {
                            let n = push(&mut params, Box::new(lo.clone()));
                            sql.push_str(&format!(" AND st.study_date >= {n}"));
                        }
                        if let Some(hi) = hi {
                            let n = push(&mut params, Box::new(hi.clone()));
                            sql.push_str(&format!(" AND st.study_date <= {n}"));
                        }
                        sql.push_str("))");
                    }
                }
                Filter::PrefixNoCase(prefixes) if f.column == Column::PatientName => {
                    let hashes: Option<Vec<Vec<u8>>> =
                        prefixes.iter().map(|p| k.name_prefix_query(p)).collect();
                    // An empty prefix matches every name: no narrowing.
                    if let Some(hashes) = hashes {
                        let n = push(&mut params, Box::new(hashes));
                        sql.push_str(&format!(
                            " AND (p.name_unsure OR p.id IN
                                (SELECT patient_ref FROM patient_name_prefixes WHERE h = ANY({n})))"
                        ));
                    }
                }
                // Ranges and prefixes on other columns are left to the matcher.
                Filter::Range(..) | Filter::PrefixNoCase(_) => {}
            }
        }
        sql.push_str(" ORDER BY ");
        sql.push_str(order);
        (sql, params)
    }

    fn read_entity(&self, r: &postgres::Row, level: Level) -> Result<EntityRow, IndexError> {
        let op = "query scan";
        let k = &self.keys;
        let mut e = EntityRow::default();
        e.ids.patient = get(r, 0, op)?;
        let key_hash: Vec<u8> = get(r, 1, op)?;
        let mut pf = k
            .open(&aad("patients", &key_hash), &get::<Vec<u8>>(r, 2, op)?, 5)?
            .into_iter();
        let mut next = move || pf.next().unwrap_or_default();
        e.patient = PatientAttrs {
            patient_id: next(),
            issuer_of_patient_id: next(),
            patient_name: next(),
            patient_birth_date: next(),
            patient_sex: next(),
        };
        if level >= Level::Study {
            e.ids.study = Some(get(r, 3, op)?);
            let uid: String = get(r, 4, op)?;
            let mut sf = k
                .open(
                    &aad("studies", uid.as_bytes()),
                    &get::<Vec<u8>>(r, 6, op)?,
                    6,
                )?
                .into_iter();
            let mut next = move || sf.next().unwrap_or_default();
            e.study = StudyAttrs {
                study_date: get(r, 5, op)?,
                study_instance_uid: uid,
                study_time: next(),
                accession_number: next(),
                study_id: next(),
                study_description: next(),
                referring_physician_name: next(),
                sequences: next(),
            };
        }
        if level >= Level::Series {
            e.ids.series = Some(get(r, 7, op)?);
            let uid: String = get(r, 8, op)?;
            let mut ef = k
                .open(
                    &aad("series", uid.as_bytes()),
                    &get::<Vec<u8>>(r, 11, op)?,
                    3,
                )?
                .into_iter();
            let mut next = move || ef.next().unwrap_or_default();
            e.series = SeriesAttrs {
                series_instance_uid: uid,
                modality: get(r, 9, op)?,
                series_number: get(r, 10, op)?,
                series_description: next(),
                body_part_examined: next(),
                sequences: next(),
            };
        }
        if level >= Level::Instance {
            e.ids.instance = Some(get(r, 12, op)?);
            e.instance = InstanceAttrs {
                sop_instance_uid: get(r, 13, op)?,
                sop_class_uid: get(r, 14, op)?,
                instance_number: get(r, 15, op)?,
                transfer_syntax_uid: get(r, 16, op)?,
                rows: get(r, 17, op)?,
                columns: get(r, 18, op)?,
                number_of_frames: get(r, 19, op)?,
                specific_character_set: get(r, 20, op)?,
                acquisition_date_time: get(r, 21, op)?,
            };
        }
        Ok(e)
    }

    pub(crate) fn patient_counts(&self, patient: i64) -> Result<PatientCounts, IndexError> {
        let op = "patient counts";
        let mut conn = self.conn()?;
        let r = conn
            .cached()
            .query_one(
                "SELECT (SELECT count(*) FROM studies WHERE patient_ref = $1),
                        (SELECT count(*) FROM series se JOIN studies st ON st.id = se.study_ref
                            WHERE st.patient_ref = $1),
                        (SELECT count(*) FROM instances i JOIN series se ON se.id = i.series_ref
                            JOIN studies st ON st.id = se.study_ref WHERE st.patient_ref = $1)",
                &[&patient],
            )
            .map_err(pg_err(op))?;
        Ok(PatientCounts {
            studies: to_u64(get(&r, 0, op)?, "count")?,
            series: to_u64(get(&r, 1, op)?, "count")?,
            instances: to_u64(get(&r, 2, op)?, "count")?,
        })
    }

    pub(crate) fn study_counts_many(
        &self,
        studies: &[i64],
    ) -> Result<std::collections::HashMap<i64, StudyCounts>, IndexError> {
        let op = "study counts";
        let mut out: std::collections::HashMap<i64, StudyCounts> = studies
            .iter()
            .map(|s| (*s, StudyCounts::default()))
            .collect();
        let ids = studies.to_vec();
        let mut conn = self.conn()?;
        // One snapshot for the four statements, as the SQLite engine's read transaction.
        let PgConn { client, cache } = &mut *conn;
        let mut tx = client
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(pg_err(op))?;
        let mut w = Cached { c: &mut tx, cache };
        for r in w
            .query(
                "SELECT study_ref, count(*) FROM series WHERE study_ref = ANY($1) GROUP BY study_ref",
                &[&ids],
            )
            .map_err(pg_err(op))?
        {
            if let Some(c) = out.get_mut(&get::<i64>(&r, 0, op)?) {
                c.series = to_u64(get(&r, 1, op)?, "count")?;
            }
        }
        for r in w
            .query(
                "SELECT se.study_ref, count(*) FROM instances i JOIN series se ON se.id = i.series_ref
                 WHERE se.study_ref = ANY($1) GROUP BY se.study_ref",
                &[&ids],
            )
            .map_err(pg_err(op))?
        {
            if let Some(c) = out.get_mut(&get::<i64>(&r, 0, op)?) {
                c.instances = to_u64(get(&r, 1, op)?, "count")?;
            }
        }
        for r in w
            .query(
                "SELECT DISTINCT study_ref, modality FROM series
                 WHERE study_ref = ANY($1) AND modality <> ''",
                &[&ids],
            )
            .map_err(pg_err(op))?
        {
            if let Some(c) = out.get_mut(&get::<i64>(&r, 0, op)?) {
                c.modalities.push(get(&r, 1, op)?);
            }
        }
        for r in w
            .query(
                "SELECT DISTINCT se.study_ref, i.sop_class_uid FROM instances i
                 JOIN series se ON se.id = i.series_ref
                 WHERE se.study_ref = ANY($1) AND i.sop_class_uid <> ''",
                &[&ids],
            )
            .map_err(pg_err(op))?
        {
            if let Some(c) = out.get_mut(&get::<i64>(&r, 0, op)?) {
                c.sop_classes.push(get(&r, 1, op)?);
            }
        }
        tx.commit().map_err(pg_err(op))?;
        for c in out.values_mut() {
            c.modalities.sort();
            c.sop_classes.sort();
        }
        Ok(out)
    }

    pub(crate) fn series_instance_count(&self, series: i64) -> Result<u64, IndexError> {
        let op = "series counts";
        let mut conn = self.conn()?;
        let r = conn
            .cached()
            .query_one(
                "SELECT count(*) FROM instances WHERE series_ref = $1",
                &[&series],
            )
            .map_err(pg_err(op))?;
        to_u64(get(&r, 0, op)?, "count")
    }

    pub(crate) fn instances_under(
        &self,
        cond: &str,
        id: i64,
    ) -> Result<Vec<StoredInstance>, IndexError> {
        let op = "list instances";
        let sql = format!(
            "{SELECT_INSTANCE} WHERE {} ORDER BY i.id",
            cond.replace("?1", "$1")
        );
        let mut conn = self.conn()?;
        let rows = conn.cached().query(&sql, &[&id]).map_err(pg_err(op))?;
        rows.iter().map(|r| Ok(stored_from_row(r)?.0)).collect()
    }
}

/// Runs `f`, a call of the blocking `postgres` client, so that it works from
/// any thread: outside Tokio directly; on a multi-thread runtime through
/// `block_in_place` (an async worker, e.g. the audit trail's patient lookup
/// run by the web layer's event recording, may call the index: the
/// client's own `block_on` would panic there); on a current-thread runtime
/// on a scoped thread of its own.
pub(crate) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Err(_) => f(),
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        Ok(_) => std::thread::scope(|s| match s.spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
    }
}

/// A boxed statement parameter.
type Param = Box<dyn ToSql + Sync>;

/// A [`SELECT_INSTANCE`] row: the instance, its row id and its series row id.
fn stored_from_row(r: &postgres::Row) -> Result<(StoredInstance, i64, i64), IndexError> {
    let op = "read instance";
    let size: i64 = get(r, 7, op)?;
    Ok((
        StoredInstance {
            sop_instance_uid: get(r, 0, op)?,
            sop_class_uid: get(r, 1, op)?,
            study_instance_uid: get(r, 2, op)?,
            series_instance_uid: get(r, 3, op)?,
            transfer_syntax_uid: get(r, 4, op)?,
            blob_id: get(r, 5, op)?,
            key_id: get(r, 6, op)?,
            stored_size: to_u64(size, "stored_size")?,
            stored_sha256: get(r, 8, op)?,
            content_sha256: get(r, 9, op)?,
            received_at: get(r, 10, op)?,
        },
        get(r, 11, op)?,
        get(r, 12, op)?,
    ))
}

fn find_row<C: GenericClient>(
    client: &mut Cached<'_, C>,
    sop_instance_uid: &str,
) -> Result<Option<(StoredInstance, i64, i64)>, IndexError> {
    client
        .query_opt(
            &format!("{SELECT_INSTANCE} WHERE i.sop_instance_uid = $1"),
            &[&sop_instance_uid],
        )
        .map_err(pg_err("find instance"))?
        .map(|r| stored_from_row(&r))
        .transpose()
}

fn remove_series_if_empty(tx: &mut W<'_, '_>, series_ref: i64) -> Result<(), IndexError> {
    let op = "remove empty series";
    let study = tx
        .query_opt(
            "DELETE FROM series WHERE id = $1
                AND NOT EXISTS (SELECT 1 FROM instances WHERE series_ref = $1)
             RETURNING study_ref",
            &[&series_ref],
        )
        .map_err(pg_err(op))?;
    match study {
        Some(r) => remove_study_if_empty(tx, get(&r, 0, op)?),
        None => Ok(()),
    }
}

fn remove_study_if_empty(tx: &mut W<'_, '_>, study_ref: i64) -> Result<(), IndexError> {
    let op = "remove empty study";
    let patient = tx
        .query_opt(
            "DELETE FROM studies WHERE id = $1
                AND NOT EXISTS (SELECT 1 FROM series WHERE study_ref = $1)
             RETURNING patient_ref",
            &[&study_ref],
        )
        .map_err(pg_err(op))?;
    match patient {
        Some(r) => remove_patient_if_empty(tx, get(&r, 0, op)?),
        None => Ok(()),
    }
}

fn remove_patient_if_empty(tx: &mut W<'_, '_>, patient_ref: i64) -> Result<(), IndexError> {
    tx.execute(
        "DELETE FROM patients WHERE id = $1
            AND NOT EXISTS (SELECT 1 FROM studies WHERE patient_ref = $1)",
        &[&patient_ref],
    )
    .map_err(pg_err("remove empty patient"))?;
    Ok(())
}
