//! `bastion import PATH...`: files and folders, recursively, through the
//! same ingest pipeline as C-STORE.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use bastion_archive::{ArchiveError, Ingested, Origin, Received, IMPORT_AE};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{config::Config, datadir::DataDir};

/// Imports every regular file under `paths`. Exit code 1 when any file was
/// rejected.
pub fn import(dir: &DataDir, paths: &[PathBuf]) -> Result<ExitCode> {
    dir.require_initialised()?;
    dir.check_secret_permissions()?;
    let config = Config::load(&dir.config())?;
    let master = dir.load_master_key()?;
    let archive = dir.open_archive(&master, &config)?;

    let mut files = Vec::new();
    let mut rejected: Vec<(PathBuf, String)> = Vec::new();
    for p in paths {
        // A path named on the command line is followed if it is a symlink;
        // inside folders, symlinks are not followed (loops, surprises) and,
        // like FIFOs and devices, are reported as rejected, never skipped
        // silently.
        match std::fs::metadata(p) {
            Err(e) => rejected.push((p.clone(), format!("cannot access: {e}"))),
            Ok(m) if m.is_file() => files.push(p.clone()),
            Ok(m) if m.is_dir() => {
                for entry in walkdir::WalkDir::new(p)
                    .follow_links(false)
                    .sort_by_file_name()
                {
                    match entry {
                        Ok(e) if e.file_type().is_file() => files.push(e.into_path()),
                        Ok(e) if e.file_type().is_dir() => {}
                        Ok(e) if e.path_is_symlink() => {
                            rejected.push((e.into_path(), "symbolic link inside a folder (not followed; name it directly to import it)".into()))
                        }
                        Ok(e) => rejected.push((e.into_path(), "not a regular file".into())),
                        Err(e) => rejected.push((e.path().map(|p| p.to_path_buf()).unwrap_or_else(|| p.clone()), e.to_string())),
                    }
                }
            }
            Ok(_) => rejected.push((p.clone(), "not a regular file or folder".into())),
        }
    }
    let bar = ProgressBar::new(files.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} files {elapsed_precise} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let origin = Origin {
        ae: IMPORT_AE.into(),
        peer: "file".into(),
        on_conflict: bastion_archive::OnConflict::Refuse,
    };
    let (mut stored, mut duplicates, mut conflicts) = (0u64, 0u64, 0u64);
    let max = config.limits.max_dataset_bytes + 64 * 1024;
    // Why the import stopped early, and how many files it did not try.
    let mut stopped: Option<(String, usize)> = None;
    for (n, f) in files.iter().enumerate() {
        bar.inc(1);
        let len = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        if len > max {
            rejected.push((
                f.clone(),
                format!("file of {len} bytes exceeds the configured limit"),
            ));
            continue;
        }
        let bytes = match std::fs::read(f) {
            Ok(b) => b,
            Err(e) => {
                rejected.push((f.clone(), format!("cannot read: {e}")));
                continue;
            }
        };
        match archive.ingest(Received::File(bytes), &origin) {
            Ok(Ingested::Stored { .. } | Ingested::Replaced { .. }) => stored += 1,
            Ok(Ingested::Duplicate { .. }) => duplicates += 1,
            Err(ArchiveError::Conflict { .. }) => conflicts += 1,
            // The image store or the index is down, or the disk is full: every
            // further file would wait for the same failure (the PostgreSQL
            // pool's 10 s, the object store's retries) and be misreported as
            // rejected; stop, and say how to resume.
            Err(e @ (ArchiveError::StoreUnavailable(_) | ArchiveError::NoSpace)) => {
                stopped = Some((e.to_string(), files.len() - n));
                break;
            }
            Err(e) => rejected.push((f.clone(), e.to_string())),
        }
    }
    bar.finish_and_clear();
    println!("stored: {stored}");
    println!("duplicates: {duplicates}");
    println!("conflicts: {conflicts}");
    println!("rejected: {}", rejected.len());
    for (p, reason) in &rejected {
        println!("rejected {}: {reason}", p.display());
    }
    if conflicts > 0 {
        println!("(conflicts: a different dataset is already stored under the same SOP Instance UID; nothing was overwritten)");
    }
    if let Some((reason, left)) = stopped {
        println!("stopped: {reason}");
        println!(
            "not imported: {left} files (run the same import again once the store is back: what was stored counts as a duplicate)"
        );
        return Ok(ExitCode::from(1));
    }
    Ok(if rejected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
