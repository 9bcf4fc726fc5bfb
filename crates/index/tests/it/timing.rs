//! Query timings of the conformance queries on each engine (not a timed
//! test: it asserts nothing about time and is `#[ignore]`d; it prints the
//! figures). `cargo test --workspace --test it timing -- --ignored --nocapture`
//! with `BASTION_TEST_PG_URL` set to include PostgreSQL; `BASTION_TIMING_STUDIES`
//! sets the size (default 10 000 studies, one series and instance each).

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

fn fill(idx: &Index, studies: usize) -> Result<(), Box<dyn std::error::Error>> {
    let mut batch = Vec::new();
    for i in 0..studies {
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
    for _ in 0..21 {
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

#[test]
#[ignore = "prints query timings; run on demand"]
fn timing() -> Result<(), Box<dyn std::error::Error>> {
    let studies: usize = std::env::var("BASTION_TIMING_STUDIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    each_engine_pub("timing", |f: &Fixture| {
        let t = Instant::now();
        fill(&f.index, studies)?;
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
        let queries = [
            (
                "PatientID exact",
                vec![Prefilter {
                    column: Column::PatientId,
                    filter: Filter::AnyOf(vec!["PID0001234".into()]),
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
        ];
        println!(
            "[{}] {studies} studies indexed in {:.1} s",
            f.engine,
            fill_time.as_secs_f64()
        );
        for (name, filters) in &queries {
            let (m, n) = median(&f.index, filters)?;
            println!(
                "[{}] {name}: median {:.2} ms, {n} candidate rows",
                f.engine,
                m.as_secs_f64() * 1000.0
            );
        }
        Ok(())
    })
}
