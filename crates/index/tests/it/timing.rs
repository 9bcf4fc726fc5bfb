//! Query timings of the conformance queries on each engine (not a timed
//! test: it asserts nothing about time and is `#[ignore]`d; it prints the
//! figures). `cargo test --workspace --test it timing -- --ignored --nocapture`
//! with `BASTION_TEST_PG_URL` set to include PostgreSQL; `BASTION_TIMING_STUDIES`
//! sets the size (default 10 000 studies, one series and instance each), or
//! a comma-separated rising list (`10000,100000,1000000`): the scaling probe
//! of issue 12, one index filled step by step, every query kind and the
//! index size on disk printed at each step (a markdown row per size).

use std::time::{Duration, Instant};

use bastion_index::query::{Column, Filter, Level, Prefilter};
use bastion_index::{Index, NewInstance};

use super::conformance::{each_engine_pub, Fixture};

const FAMILY: [&str; 24] = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
];

/// Indexes studies `from..to` (one series and instance each).
fn fill(idx: &Index, from: usize, to: usize) -> Result<(), Box<dyn std::error::Error>> {
    let mut batch = Vec::new();
    for i in from..to {
        let mut r = NewInstance::default();
        // Zipf-like: low family indexes much more frequent.
        let f = (i * 7919) % 300;
        let fam = FAMILY[(f * f) / (300 * 300 / FAMILY.len() + 1) % FAMILY.len()];
        r.patient.patient_id = format!("PID{:07}", i / 3);
        r.patient.patient_name = format!("{fam}{}^Given{}", (i / 3) % 97, i % 13);
        r.study.study_instance_uid = format!("1.2.826.0.1.{i}");
        let day = (i * 37) % 3650;
        r.study.study_date = format!(
            "{:04}{:02}{:02}",
            2015 + day / 365,
            1 + (day % 365) / 31 % 12,
            1 + day % 28
        );
        r.series.series_instance_uid = format!("1.2.826.0.1.{i}.1");
        r.series.modality = ["CT", "MR", "CR", "US"][i % 4].into();
        r.instance.sop_instance_uid = format!("1.2.826.0.1.{i}.1.1");
        r.content_sha256 = format!("c{i}");
        r.blob_id = format!("{i:032x}");
        batch.push(r);
        if batch.len() == 500 {
            idx.commit_batch(&batch)?;
            batch.clear();
        }
    }
    idx.commit_batch(&batch)?;
    Ok(())
}

fn median(
    idx: &Index,
    filters: &[Prefilter],
) -> Result<(Duration, usize), Box<dyn std::error::Error>> {
    let mut times = Vec::new();
    let mut n = 0;
    // 21 runs, or at least 5 once 5 s are spent (the wide scans at 100k+ studies)
    let start = Instant::now();
    for i in 0..21 {
        if i >= 5 && start.elapsed() > Duration::from_secs(5) {
            break;
        }
        let t = Instant::now();
        n = 0;
        idx.scan(Level::Study, filters, |_| {
            n += 1;
            true
        })?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok((times[times.len() / 2], n))
}

/// The index's size on disk: the SQLCipher file (after a WAL checkpoint),
/// or every relation of the PostgreSQL schema (tables, indexes, TOAST).
fn size_on_disk(f: &Fixture) -> Result<u64, Box<dyn std::error::Error>> {
    if let Some(c) = &f.pg {
        let mut client = super::conformance::pg_client_pub(c)?;
        let row = client.query_one(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'm')",
            &[&c.schema],
        )?;
        return Ok(u64::try_from(row.get::<_, i64>(0))?);
    }
    f.index.checkpoint()?;
    let path = f.index.path();
    let mut total = std::fs::metadata(path)?.len();
    for ext in ["db-wal", "db-shm"] {
        if let Ok(m) = std::fs::metadata(path.with_extension(ext)) {
            total += m.len();
        }
    }
    Ok(total)
}

#[test]
#[ignore = "prints query timings; run on demand"]
fn timing() -> Result<(), Box<dyn std::error::Error>> {
    let sizes: Vec<usize> = std::env::var("BASTION_TIMING_STUDIES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty() && v.windows(2).all(|w| w[0] < w[1]))
        .unwrap_or_else(|| vec![10_000]);
    println!(
        "| engine | studies | PatientID exact: median ms (candidate rows) \
         | PatientName SMITH1* | StudyDate one month | Modality MR | index on disk MiB |"
    );
    each_engine_pub("timing", |f: &Fixture| {
        let mut filled = 0;
        for &studies in &sizes {
            let t = Instant::now();
            fill(&f.index, filled, studies)?;
            filled = studies;
            let fill_time = t.elapsed();
            // As autovacuum would after a bulk load: the planner needs statistics.
            if let Some(c) = &f.pg {
                let mut client = super::conformance::pg_client_pub(c)?;
                client.batch_execute(&format!(
                    "SET search_path = {}; ANALYZE patients; ANALYZE patient_name_prefixes;
                     ANALYZE studies; ANALYZE series; ANALYZE instances;",
                    c.schema
                ))?;
            }
            let bytes = size_on_disk(f)?;
            println!(
                "[{}] {studies} studies: this step indexed in {:.1} s; index on disk {:.1} MiB",
                f.engine,
                fill_time.as_secs_f64(),
                bytes as f64 / 1048576.0
            );
            let mut row = format!("| {} | {studies} |", f.engine);
            for (name, filters) in &queries(studies) {
                let (m, n) = median(&f.index, filters)?;
                println!(
                    "[{}] {studies} studies, {name}: median {:.2} ms, {n} candidate rows",
                    f.engine,
                    m.as_secs_f64() * 1000.0
                );
                row += &format!(" {:.2} ({n}) |", m.as_secs_f64() * 1000.0);
            }
            row += &format!(" {:.1} |", bytes as f64 / 1048576.0);
            println!("{row}");
        }
        Ok(())
    })
}

/// The query kinds, for an index of `studies` studies: one patient's ID
/// (from the middle of the filled range), a family-name prefix, one month.
fn queries(studies: usize) -> [(&'static str, Vec<Prefilter>); 4] {
    [
        (
            "PatientID exact",
            vec![Prefilter {
                column: Column::PatientId,
                filter: Filter::AnyOf(vec![format!("PID{:07}", studies / 6)]),
            }],
        ),
        (
            "PatientName wildcard SMITH1*",
            vec![Prefilter {
                column: Column::PatientName,
                filter: Filter::PrefixNoCase(vec!["SMITH1".into()]),
            }],
        ),
        (
            "StudyDate one month",
            vec![Prefilter {
                column: Column::StudyDate,
                filter: Filter::Range(Some("20190301".into()), Some("20190331".into())),
            }],
        ),
        (
            "Modality MR",
            vec![Prefilter {
                column: Column::Modality,
                filter: Filter::AnyOf(vec!["MR".into()]),
            }],
        ),
    ]
}
