//! `bastion migrate`: copies an installation to the scale-out engines (issue 12,
//! "Moving an installation"; docs/scale-out.md): the encrypted instance blobs to
//! an S3-compatible bucket (`--to-store`), and optionally the index to another
//! index engine (`--to-index`). The source is only ever read.
//!
//! How it copies (and why):
//! - **Blobs are copied as ciphertext, by id** ([`BlobStore::copy_encrypted_to`]).
//!   A blob of store format 2 is bound to its id and its data key is wrapped by
//!   the master key, which the destination shares (same installation, same
//!   key), so the copy is valid under the same id and the index rows keep
//!   naming it: with only `--to-store`, the installation's `index.db` stays the
//!   index and switching `[store] url` is the whole switch. No re-encryption,
//!   no re-parsing; the dataset bytes cannot change on the way.
//! - **With `--to-index`**, the destination index gets its rows by re-ingesting
//!   each instance (decrypted and verified first) into an archive built from the
//!   destination store and index: the ingest pipeline is the only writer of
//!   index rows (`crates/index` has no row-copy API, and its invariants, the
//!   hierarchy checks and the group commit, stay in one place). The Source
//!   Application Entity Title of the stored meta is kept, so the re-stored Part 10
//!   bytes, and their SHA-256, are those of the source; the reception time
//!   becomes the time of the migration (a limit, documented).
//!
//! Every instance is re-verified before it counts as moved: its source blob is
//! read, authenticated segment by segment and hashed, the SHA-256 compared with
//! the one the index recorded; then the destination copy is read back the same
//! way. A failure is reported by SOP Instance UID (never patient data) and the
//! rest is still moved; the command then ends with exit code 1.
//!
//! Resumable: an instance whose destination copy is present and verifies is
//! skipped, so a run interrupted anyhow (Ctrl-C, kill -9) run again finishes the
//! rest; a copy is published atomically (a temp file renamed, or one S3 PUT /
//! completed multipart upload), so a half-written one is never seen, and a
//! second copy of a blob lands under the same id (no duplicates).
//!
//! It is a local administrator's command on the data directory: it needs the
//! master key (and its passphrase when wrapped) like every other command that
//! reads instances; anyone who cannot read the key cannot run it. `serve` must
//! be stopped (instances received during a copy would be missed).

use std::{
    collections::{BTreeSet, HashSet},
    io::IsTerminal,
    path::Path,
    process::ExitCode,
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use bastion_archive::{Archive, ArchiveError, Ingested, Limits, OnConflict, Origin, Received};
use bastion_index::{Index, StoredInstance};
use bastion_model::Uid;
use bastion_security::events::EventLog;
use bastion_store::{BlobId, BlobStore, MasterKey, S3Location};
use clap::Args;
use dicom_core::VR;
use dicom_dictionary_std::tags;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::seq::SliceRandom;
use sha2::{Digest, Sha256};

use crate::{config::Config, datadir::DataDir};

/// `bastion migrate` flags (fixed interface: `--to-store`, `--to-index`).
#[derive(Debug, Args, Clone)]
pub struct MigrateArgs {
    /// The destination bucket:
    /// 's3://BUCKET?endpoint=http://HOST:PORT&region=REGION'. Credentials from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, else the file
    /// store-credentials in the secrets directory (never echoed).
    #[arg(long, value_name = "URL")]
    pub to_store: String,
    /// The destination index: `postgres://USER@HOST:PORT/DB` (the PostgreSQL
    /// index engine), or the path of a new SQLite index file. Without it the
    /// installation keeps its index.db (only the blobs move).
    #[arg(long, value_name = "URL")]
    pub to_index: Option<String>,
    /// The PostgreSQL schema of the destination index (default
    /// `bastion_index`; another name lets several installations share one
    /// database). Recorded by --switch as `[index] schema`.
    #[arg(long, value_name = "NAME", requires = "to_index")]
    pub to_index_schema: Option<String>,
    /// Check the source and the destination and print what would be copied;
    /// copy nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// After a successful migration, rewrite DIR/bastion.toml to use the new
    /// engines (the old file kept as bastion.toml.before-migrate); without it
    /// the lines to change are printed.
    #[arg(long)]
    pub switch: bool,
    /// How many random studies to query on both sides at the end (C-FIND
    /// equivalent, by Study Instance UID and by Patient ID).
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub sample: usize,
}

/// Opens the destination index named by `--to-index`: the one place where the
/// index engines are chosen for `migrate`. A `postgres://` URL opens the
/// PostgreSQL engine exactly as `serve` would with `[index] url` set to it
/// (password from `PGPASSWORD` or the secrets file `index-password`, TLS
/// roots from this installation's `[index] ca`, schema `schema` or
/// `bastion_index`); a file path, a new SQLite index file (created, mode
/// 0600, SQLCipher-encrypted with the index key).
///
/// # Errors
/// An unsupported URL scheme; the engine's own errors, naming the setting.
pub fn open_index_at(
    dir: &DataDir,
    master: &MasterKey,
    config: &Config,
    url_or_path: &str,
    schema: Option<&str>,
) -> Result<Index> {
    if url_or_path.starts_with("postgres://") || url_or_path.starts_with("postgresql://") {
        let mut cfg = config.clone();
        cfg.index.url = Some(url_or_path.to_owned());
        cfg.index.schema = schema.map(str::to_owned);
        return dir.open_index(master, &cfg).context("--to-index");
    }
    if url_or_path.contains("://") {
        bail!("--to-index: unsupported index URL scheme (postgres://… or a file path)");
    }
    let path = Path::new(url_or_path);
    let key = master.derive("bastion index v1");
    Index::open(path, &key).with_context(|| format!("cannot open the index {}", path.display()))
}

/// The data directory's lock ([`DataDir::lock_dir`]), held for the whole
/// migration so that a `serve` started meanwhile refuses to run (it takes
/// the same lock first); nothing is created (the source is not written).
/// Also refuses while `DIR/serve.lock` is held (a `serve` of the versions
/// that locked only that file). Outside test: with no `serve.lock` (a
/// directory never served), `serve` could start and acknowledge instances
/// in the middle of a migration.
fn lock_serve_if_present(dir: &DataDir) -> Result<Option<std::fs::File>> {
    let running = || {
        anyhow!(
            "`bastion serve` is running on {}: stop it before migrating (instances received during the copy would be missed)",
            dir.root.display()
        )
    };
    // The data directory itself: `serve` holds it while it runs, whether or
    // not it ever created serve.lock (no file is created here).
    let Some(dir_lock) = dir.lock_dir()? else {
        return Err(running());
    };
    let path = dir.root.join("serve.lock");
    match std::fs::File::open(&path) {
        Ok(f) => {
            if f.try_lock().is_err() {
                return Err(running());
            }
            drop(f);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    }
    Ok(Some(dir_lock))
}

/// Reads blob `id` of `store` whole, authenticating every segment, and checks
/// its length and SHA-256 against the index row. Returns the plaintext when
/// `keep` (for re-ingest), else an empty vector. The error names no patient
/// data (store errors name blob ids and paths).
fn verified_read(
    store: &BlobStore,
    id: &BlobId,
    size: u64,
    sha256: &str,
    keep: bool,
) -> Result<Vec<u8>, String> {
    let mut reader = store.open_blob(id).map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    let mut kept = Vec::new();
    let mut len = 0u64;
    while let Some(seg) = reader.next_segment().map_err(|e| e.to_string())? {
        hasher.update(seg);
        len += seg.len() as u64;
        if keep {
            kept.extend_from_slice(seg);
        }
    }
    if len != size {
        return Err(format!("{len} bytes where the index records {size}"));
    }
    if hex::encode(hasher.finalize()) != sha256 {
        return Err("SHA-256 differs from the one the index recorded".into());
    }
    Ok(kept)
}

/// Reads a blob whole (authenticating every segment); for blobs with no index
/// row to compare with (replaced versions kept for recovery).
fn authenticated_read(store: &BlobStore, id: &BlobId) -> Result<(), String> {
    let mut reader = store.open_blob(id).map_err(|e| e.to_string())?;
    while reader.next_segment().map_err(|e| e.to_string())?.is_some() {}
    Ok(())
}

/// The Source Application Entity Title (0002,0016) of a stored Part 10 file's
/// meta (PS3.10 §7.1), empty when absent.
fn source_ae(part10: &[u8]) -> String {
    part10
        .get(128..)
        .and_then(|rest| dicom_object::meta::FileMetaTable::from_reader(rest).ok())
        .and_then(|m| m.source_application_entity_title)
        .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
        .unwrap_or_default()
}

/// Progress: an indicatif bar on a terminal, else one plain line every few
/// seconds (CI logs).
struct Progress {
    bar: ProgressBar,
    plain: bool,
    last: Instant,
    total: u64,
    total_bytes: u64,
    started: Instant,
}

impl Progress {
    fn new(total: u64, total_bytes: u64) -> Progress {
        let plain = !std::io::stderr().is_terminal();
        let bar = if plain {
            ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::hidden())
        } else {
            ProgressBar::new(total_bytes)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {msg} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Progress {
            bar,
            plain,
            last: Instant::now(),
            total,
            total_bytes,
            started: Instant::now(),
        }
    }

    fn update(&mut self, done: u64, bytes: u64) {
        self.bar.set_position(bytes);
        self.bar
            .set_message(format!("{done}/{} instances", self.total));
        // Plain lines: every 5 s, every 5 % of the instances, and at the end.
        let step = (self.total / 20).max(1);
        if self.plain
            && (self.last.elapsed() >= Duration::from_secs(5)
                || done.is_multiple_of(step)
                || done == self.total)
        {
            self.last = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            eprintln!(
                "migrate: {done}/{} instances, {:.1}/{:.1} MiB, {:.1} MiB/s",
                self.total,
                mib(bytes),
                mib(self.total_bytes),
                mib(bytes) / secs
            );
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// What the copy loop did.
#[derive(Default)]
struct Tally {
    moved: u64,
    present: u64,
    bytes_moved: u64,
    failed: Vec<(String, String)>,
}

/// Runs `bastion migrate`. Exit code 0 after a complete, verified migration; 1
/// when an instance failed verification or the comparison found a difference.
///
/// # Errors
/// Not initialised, `serve` running, keys missing, an unusable destination.
pub fn migrate(dir: &DataDir, args: &MigrateArgs) -> Result<ExitCode> {
    dir.require_initialised()?;
    dir.check_secret_permissions()?;
    let config = Config::load(&dir.config())?;
    let master = dir.load_master_key()?;
    let _lock = lock_serve_if_present(dir)?;

    let location = S3Location::parse(&args.to_store).context("invalid --to-store")?;
    if config.store.url.as_deref() == Some(args.to_store.as_str()) {
        bail!("--to-store names the bucket this installation already uses ([store] url)");
    }
    let (credentials, from) = dir.store_credentials()?;
    let dest_store = BlobStore::open_s3(&location, credentials, master.clone(), Vec::new())
        .context("--to-store")?;
    dest_store.check().with_context(|| {
        format!(
            "--to-store {}: the bucket is not usable with the credentials from {from}",
            dest_store.describe()
        )
    })?;
    let src_store = dir.open_store(&master, &config)?;
    let src_index = Arc::new(dir.open_index(&master, &config)?);
    let dest_index = match &args.to_index {
        Some(url) => {
            if Path::new(url) == dir.index_db() || config.index.url.as_deref() == Some(url.as_str())
            {
                bail!("--to-index names this installation's own index");
            }
            Some(Arc::new(open_index_at(
                dir,
                &master,
                &config,
                url,
                args.to_index_schema.as_deref(),
            )?))
        }
        None => None,
    };

    let instances = src_index
        .list_instances(u32::MAX)
        .context("cannot list the stored instances")?;
    let total_bytes: u64 = instances.iter().map(|i| i.stored_size).sum();
    let counts = src_index.counts().context("cannot count the source")?;
    println!(
        "source: {} ({} patients, {} studies, {} series, {} instances, {:.1} MiB)",
        dir.root.display(),
        counts.patients,
        counts.studies,
        counts.series,
        counts.instances,
        mib(total_bytes)
    );
    println!(
        "destination: store {}{}",
        dest_store.describe(),
        match &args.to_index {
            Some(u) => format!(", index {}", crate::config::redact_url(u)),
            None => format!(", index {} (kept)", dir.index_db().display()),
        }
    );
    if args.dry_run {
        println!("dry run: nothing copied");
        return Ok(ExitCode::SUCCESS);
    }

    // The archives built below record their events (queries, re-ingests) in a
    // log of their own, deleted at the end: the source's event log and audit
    // trail are never written.
    let scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
    let events = Arc::new(EventLog::open(&scratch.path().join("events.log"))?);
    let limits = archive_limits(&config);
    let src_store = Arc::new(src_store);
    let dest_store = Arc::new(dest_store);

    let started = Instant::now();
    let mut progress = Progress::new(instances.len() as u64, total_bytes);
    let mut tally = Tally::default();
    let dest_archive = match &dest_index {
        None => {
            copy_blobs(
                &src_store,
                &dest_store,
                &instances,
                &mut tally,
                &mut progress,
            );
            copy_replaced(&src_index, &src_store, &dest_store, &instances, &mut tally)?;
            Archive::new(
                dest_store.clone(),
                src_index.clone(),
                events.clone(),
                limits,
            )
        }
        Some(index) => {
            let archive = Archive::new(dest_store.clone(), index.clone(), events.clone(), limits);
            archive.set_spool_dir(scratch.path().join("spool"));
            reingest(
                &src_store,
                &dest_store,
                index,
                &archive,
                &instances,
                &mut tally,
                &mut progress,
            );
            archive
        }
    };
    progress.bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64().max(0.001);
    println!(
        "copied: {} instances ({:.1} MiB) in {:.1} s: {:.1} instances/s, {:.1} MiB/s",
        tally.moved,
        mib(tally.bytes_moved),
        secs,
        tally.moved as f64 / secs,
        mib(tally.bytes_moved) / secs
    );
    println!("already present and verified: {}", tally.present);
    println!("failed: {}", tally.failed.len());
    for (uid, reason) in &tally.failed {
        println!("failed {uid}: {reason}");
    }

    let src_archive = Archive::new(src_store.clone(), src_index.clone(), events.clone(), limits);
    let mismatches = compare(
        &src_archive,
        &dest_archive,
        &src_index,
        dest_index.as_deref(),
        &instances,
        &config,
        args.sample,
        tally.moved + tally.present,
    )?;
    drop(dest_archive);
    drop(src_archive);

    if !tally.failed.is_empty() || mismatches > 0 {
        println!(
            "migration incomplete: {} failed, {} differences; the configuration was not changed",
            tally.failed.len(),
            mismatches
        );
        return Ok(ExitCode::from(1));
    }
    switch_or_print(dir, args)?;
    Ok(ExitCode::SUCCESS)
}

/// The configured limits as the archive's.
fn archive_limits(config: &Config) -> Limits {
    let l = &config.limits;
    Limits {
        max_dataset_bytes: l.max_dataset_bytes,
        max_element_bytes: l.max_element_bytes,
        max_inflated_bytes: l.max_inflated_bytes,
        max_sequence_depth: l.max_sequence_depth,
        max_concurrent_parses: l.max_concurrent_parses,
        memory_budget_bytes: l.memory_budget_mib.saturating_mul(1 << 20),
        transfer_budget_bytes: l.transfer_budget_mib.saturating_mul(1 << 20),
        spool_budget_bytes: l.spool_budget_mib.saturating_mul(1 << 20),
    }
}

/// The blob copy (no `--to-index`): each instance's blob verified at the
/// destination (skipped when it is there already), else verified at the
/// source, copied by id and verified again at the destination.
fn copy_blobs(
    src: &BlobStore,
    dest: &BlobStore,
    instances: &[StoredInstance],
    tally: &mut Tally,
    progress: &mut Progress,
) {
    let one = |inst: &StoredInstance| -> Result<bool, String> {
        let id = BlobId::parse(&inst.blob_id).map_err(|e| e.to_string())?;
        let check = |store: &BlobStore| {
            verified_read(store, &id, inst.stored_size, &inst.stored_sha256, false)
        };
        if check(dest).is_ok() {
            return Ok(false);
        }
        check(src).map_err(|e| format!("source: {e}"))?;
        src.copy_encrypted_to(&id, dest)
            .map_err(|e| format!("copy: {e}"))?;
        check(dest).map_err(|e| format!("destination: {e}"))?;
        Ok(true)
    };
    run_all(instances, COPY_WORKERS, tally, progress, &one);
}

/// Blob copies in flight at once: each streams (about 1 MiB held), and an
/// object store's latency, not the CPU, bounds one copy at a time.
const COPY_WORKERS: usize = 4;
/// Re-ingests in flight at once: each holds one instance in memory.
const INGEST_WORKERS: usize = 2;

/// Runs `one` on every instance on `workers` threads (each takes the next
/// instance), counting the outcomes (`Ok(true)` moved, `Ok(false)` already
/// present and verified, `Err` failed) and showing progress on this thread.
fn run_all(
    instances: &[StoredInstance],
    workers: usize,
    tally: &mut Tally,
    progress: &mut Progress,
    one: &(dyn Fn(&StoredInstance) -> Result<bool, String> + Sync),
) {
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel::<(usize, Result<bool, String>)>();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let next = &next;
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(inst) = instances.get(i) else { break };
                if tx.send((i, one(inst))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let (mut done, mut bytes) = (0u64, 0u64);
        for (i, outcome) in rx {
            let Some(inst) = instances.get(i) else {
                continue;
            };
            done += 1;
            bytes += inst.stored_size;
            match outcome {
                Ok(true) => {
                    tally.moved += 1;
                    tally.bytes_moved += inst.stored_size;
                }
                Ok(false) => tally.present += 1,
                Err(e) => tally.failed.push((inst.sop_instance_uid.clone(), e)),
            }
            progress.update(done, bytes);
        }
    });
    tally.failed.sort();
}

/// Blobs of replaced versions (`--on-conflict replace` keeps the old one for
/// recovery; the index still references it): copied by id and authenticated
/// at the destination, so that an orphan sweep there finds them referenced.
fn copy_replaced(
    src_index: &Index,
    src: &BlobStore,
    dest: &BlobStore,
    instances: &[StoredInstance],
    tally: &mut Tally,
) -> Result<()> {
    let current: HashSet<&str> = instances.iter().map(|i| i.blob_id.as_str()).collect();
    let all = src_index.blob_ids().context("cannot list blob ids")?;
    for blob in all.iter().filter(|b| !current.contains(b.as_str())) {
        let outcome = (|| -> Result<(), String> {
            let id = BlobId::parse(blob).map_err(|e| e.to_string())?;
            if authenticated_read(dest, &id).is_ok() {
                return Ok(());
            }
            authenticated_read(src, &id).map_err(|e| format!("source: {e}"))?;
            src.copy_encrypted_to(&id, dest)
                .map_err(|e| format!("copy: {e}"))?;
            authenticated_read(dest, &id).map_err(|e| format!("destination: {e}"))
        })();
        if let Err(e) = outcome {
            tally
                .failed
                .push((format!("replaced version (blob {blob})"), e));
        }
    }
    Ok(())
}

/// The re-ingest (`--to-index`): an instance present in the destination index
/// whose blob verifies against the source's SHA-256 is skipped; else the
/// source is read and verified, ingested into `archive` (destination store +
/// index) under its original Source AE, and the new row and blob verified.
fn reingest(
    src: &BlobStore,
    dest: &BlobStore,
    dest_index: &Index,
    archive: &Archive,
    instances: &[StoredInstance],
    tally: &mut Tally,
    progress: &mut Progress,
) {
    let at_dest = |inst: &StoredInstance| -> Result<bool, String> {
        let Some(row) = dest_index
            .find_instance(&inst.sop_instance_uid)
            .map_err(|e| format!("destination index: {e}"))?
        else {
            return Ok(false);
        };
        if row.stored_sha256 != inst.stored_sha256 {
            return Err("the destination holds a different version of this instance".into());
        }
        let id = BlobId::parse(&row.blob_id).map_err(|e| e.to_string())?;
        verified_read(dest, &id, inst.stored_size, &inst.stored_sha256, false)
            .map_err(|e| format!("destination: {e}"))?;
        Ok(true)
    };
    let one = |inst: &StoredInstance| -> Result<bool, String> {
        if at_dest(inst).unwrap_or(false) {
            return Ok(false);
        }
        let id = BlobId::parse(&inst.blob_id).map_err(|e| e.to_string())?;
        let part10 = verified_read(src, &id, inst.stored_size, &inst.stored_sha256, true)
            .map_err(|e| format!("source: {e}"))?;
        let origin = Origin {
            ae: source_ae(&part10),
            peer: "migrate".into(),
            on_conflict: OnConflict::Refuse,
        };
        match archive.ingest(Received::File(part10), &origin) {
            Ok(Ingested::Stored { .. } | Ingested::Duplicate { .. }) => {}
            Ok(Ingested::Replaced { .. }) => return Err("unexpectedly replaced".into()),
            Err(ArchiveError::Conflict { .. }) => {
                return Err("the destination holds a different version of this instance".into())
            }
            Err(e) => return Err(format!("ingest: {e}")),
        }
        if !at_dest(inst)? {
            return Err("not in the destination index after ingest".into());
        }
        Ok(true)
    };
    run_all(instances, INGEST_WORKERS, tally, progress, &one);
}

/// Compares source and destination: the counts (patients, studies, series,
/// instances), then up to `sample` random studies queried on both sides at
/// study level by Study Instance UID and by Patient ID (the C-FIND answers of
/// `bastion study list`, PS3.4 §C.6.2), and one instance of each retrieved
/// from both (same bytes). Prints the figures; returns the number of
/// differences.
#[allow(clippy::too_many_arguments)]
fn compare(
    src: &Archive,
    dest: &Archive,
    src_index: &Index,
    dest_index: Option<&Index>,
    instances: &[StoredInstance],
    config: &Config,
    sample: usize,
    verified_at_dest: u64,
) -> Result<u64> {
    let mut differences = 0u64;
    let s = src_index.counts().context("cannot count the source")?;
    let d = match dest_index {
        Some(i) => i.counts().context("cannot count the destination")?,
        // Same index: the destination's instances are those verified in the store.
        None => bastion_index::Counts {
            instances: verified_at_dest,
            ..s
        },
    };
    println!("counts (source / destination):");
    for (what, a, b) in [
        ("patients", s.patients, d.patients),
        ("studies", s.studies, d.studies),
        ("series", s.series, d.series),
        ("instances", s.instances, d.instances),
    ] {
        let mark = if a == b { "" } else { "  DIFFERENT" };
        println!("  {what}: {a} / {b}{mark}");
        if a != b {
            differences += 1;
        }
    }

    let studies: BTreeSet<&str> = instances
        .iter()
        .map(|i| i.study_instance_uid.as_str())
        .collect();
    let mut studies: Vec<&str> = studies.into_iter().collect();
    studies.shuffle(&mut rand::thread_rng());
    studies.truncate(sample);
    let mut queries = 0u64;
    let mut query_diffs = 0u64;
    let mut retrieved = 0u64;
    for study in &studies {
        queries += 1;
        let a = answers(src, config, Some(study), None);
        let b = answers(dest, config, Some(study), None);
        let Some(a) = same(a, b) else {
            query_diffs += 1;
            println!("query by StudyInstanceUID differs for study {study}");
            continue;
        };
        let patient_id = serde_json::from_str::<serde_json::Value>(&a)
            .ok()
            .and_then(|v| v.get(0)?.get("patient_id")?.as_str().map(str::to_owned))
            .unwrap_or_default();
        if !patient_id.is_empty() {
            queries += 1;
            let a = answers(src, config, None, Some(&patient_id));
            let b = answers(dest, config, None, Some(&patient_id));
            if same(a, b).is_none() {
                query_diffs += 1;
                println!("query by PatientID differs for the patient of study {study}");
            }
        }
        if let Some(inst) = instances.iter().find(|i| i.study_instance_uid == *study) {
            let uid = Uid::parse(&inst.sop_instance_uid)
                .map_err(|_| anyhow!("invalid SOP Instance UID in the index"))?;
            retrieved += 1;
            let a = src.instance_part10(&uid).map(|b| Sha256::digest(&b));
            let b = dest.instance_part10(&uid).map(|b| Sha256::digest(&b));
            match (a, b) {
                (Ok(a), Ok(b)) if a == b => {}
                _ => {
                    query_diffs += 1;
                    println!("retrieval of instance {} differs", inst.sop_instance_uid);
                }
            }
        }
    }
    println!(
        "queries compared: {queries} on {} studies, instances retrieved: {retrieved}, differences: {query_diffs}",
        studies.len()
    );
    Ok(differences + query_diffs)
}

/// The study-level answers (every attribute `bastion study list` returns) to a
/// query by Study Instance UID or by Patient ID, as JSON text.
fn answers(
    archive: &Archive,
    config: &Config,
    study_uid: Option<&str>,
    patient_id: Option<&str>,
) -> Result<String> {
    let own = |v: Option<&str>| v.map(str::to_owned);
    let filters = [
        (tags::PATIENT_ID, VR::LO, "PatientID", own(patient_id)),
        (tags::PATIENT_NAME, VR::PN, "PatientName", None),
        (tags::STUDY_DATE, VR::DA, "StudyDate", None),
        (tags::ACCESSION_NUMBER, VR::SH, "AccessionNumber", None),
        (
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            "StudyInstanceUID",
            own(study_uid),
        ),
    ];
    let rows = crate::study_cli::list(archive, config, &filters)?;
    if rows.is_empty() {
        bail!("no match");
    }
    // Compared as a set: studies of one date come back in each engine's own
    // order (SQLite and PostgreSQL break date ties differently).
    let mut rows = rows
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()?;
    rows.sort_by_key(|r| r.to_string());
    Ok(serde_json::to_string(&rows)?)
}

/// The common answer when both sides answered the same (a failed or empty
/// query on either side is a difference).
fn same(a: Result<String>, b: Result<String>) -> Option<String> {
    match (a, b) {
        (Ok(a), Ok(b)) if a == b => Some(a),
        _ => None,
    }
}

/// After success: `--switch` rewrites DIR/bastion.toml (backup first), else the
/// lines to change are printed. No credential is ever printed.
fn switch_or_print(dir: &DataDir, args: &MigrateArgs) -> Result<()> {
    let store_line = format!("url = {}", toml::Value::String(args.to_store.clone()));
    if !args.switch {
        println!(
            "migration complete and verified. To switch, set in {}:",
            dir.config().display()
        );
        println!("  [store]");
        println!("  {store_line}");
        if let Some(i) = &args.to_index {
            println!("  [index]");
            println!(
                "  url = {}",
                toml::Value::String(crate::config::redact_url(i))
            );
        }
        println!("(or run again with --switch; `bastion serve` then uses the new engines)");
        return Ok(());
    }
    let text = std::fs::read_to_string(dir.config())
        .with_context(|| format!("cannot read {}", dir.config().display()))?;
    let mut updated = with_store_url(&text, &args.to_store)?;
    if let Some(url) = &args.to_index {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!(
                "--switch with a SQLite --to-index: an installation's SQLite index is always DIR/index.db; the data is migrated to {}: move that file there by hand (serve stopped)", crate::config::redact_url(url)
            );
        }
        updated = with_table_value(&updated, "index", "url", url)?;
        if let Some(schema) = &args.to_index_schema {
            updated = with_table_value(&updated, "index", "schema", schema)?;
        }
    }
    let backup = dir.root.join("bastion.toml.before-migrate");
    std::fs::copy(dir.config(), &backup)
        .with_context(|| format!("cannot write {}", backup.display()))?;
    let tmp = dir.root.join("bastion.toml.new");
    std::fs::write(&tmp, updated)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.config())
        .with_context(|| format!("cannot replace {}", dir.config().display()))?;
    println!(
        "switched: {} now has [store] {store_line} (previous file: {})",
        dir.config().display(),
        backup.display()
    );
    Ok(())
}

/// `text` (a `bastion.toml`) with `[store] url = "URL"`, everything else kept
/// ([`with_table_value`]).
///
/// # Errors
/// As [`with_table_value`].
fn with_store_url(text: &str, url: &str) -> Result<String> {
    with_table_value(text, "store", "url", url)
}

/// `text` (a `bastion.toml`) with `[table] key = "value"`, everything else
/// kept: an existing `key =` or commented `# key =` line of the table
/// replaced, else the line put under `[table]`, else the table appended.
/// Parsed back and checked.
///
/// # Errors
/// The result does not parse or does not hold the value.
fn with_table_value(text: &str, table: &str, key: &str, value: &str) -> Result<String> {
    let _: Config = toml::from_str(text).context("invalid bastion.toml")?;
    let line = format!("{key} = {}", toml::Value::String(value.to_owned()));
    let header = format!("[{table}]");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    match lines.iter().position(|l| l.trim() == header) {
        Some(h) => {
            let end = lines[h + 1..]
                .iter()
                .position(|l| l.trim_start().starts_with('['))
                .map_or(lines.len(), |i| h + 1 + i);
            let existing = (h + 1..end).find(|&i| {
                let t = lines[i].trim_start();
                t.starts_with(&format!("{key} "))
                    || t.starts_with(&format!("{key}="))
                    || t.starts_with(&format!("# {key} ="))
            });
            match existing {
                Some(i) => lines[i] = line,
                None => lines.insert(h + 1, line),
            }
        }
        None => {
            lines.push(String::new());
            lines.push(header);
            lines.push("# Set by `bastion migrate --switch`.".into());
            lines.push(line);
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    let parsed: Config =
        toml::from_str(&out).with_context(|| format!("bastion.toml with [{table}] {key}"))?;
    let got = match (table, key) {
        ("store", "url") => parsed.store.url,
        ("index", "url") => parsed.index.url,
        ("index", "schema") => parsed.index.schema,
        _ => None,
    };
    if got.as_deref() != Some(value) {
        bail!("cannot record [{table}] {key} in bastion.toml");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_url_is_recorded_keeping_the_rest() -> Result<()> {
        let base = Config::default().render();
        let out = with_store_url(&base, "s3://b?endpoint=http://127.0.0.1:3900&region=garage")?;
        let c: Config = toml::from_str(&out)?;
        assert_eq!(
            c.store.url.as_deref(),
            Some("s3://b?endpoint=http://127.0.0.1:3900&region=garage")
        );
        assert_eq!(c.dicom.ae_title, Config::default().dicom.ae_title);
        // Replacing an existing url.
        let again = with_store_url(&out, "s3://c?endpoint=http://127.0.0.1:3900&region=garage")?;
        let c: Config = toml::from_str(&again)?;
        assert_eq!(
            c.store.url.as_deref(),
            Some("s3://c?endpoint=http://127.0.0.1:3900&region=garage")
        );
        Ok(())
    }

    #[test]
    fn index_url_and_schema_are_recorded_keeping_the_rest() -> Result<()> {
        let base = Config::default().render();
        let out = with_table_value(&base, "index", "url", "postgres://b@127.0.0.1:5432/b")?;
        let out = with_table_value(&out, "index", "schema", "moved")?;
        let parsed: Config = toml::from_str(&out)?;
        assert_eq!(
            parsed.index.url.as_deref(),
            Some("postgres://b@127.0.0.1:5432/b")
        );
        assert_eq!(parsed.index.schema.as_deref(), Some("moved"));
        assert_eq!(out.matches("[index]").count(), 1);
        Ok(())
    }

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            crate::config::redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            crate::config::redact_url("postgres://u@h/db"),
            "postgres://u@h/db"
        );
    }
}
