//! The index conformance suite: every test runs unchanged against every
//! engine (issue 12; garage's `Db` trait with one shared suite is the model).
//!
//! SQLite always runs. PostgreSQL runs when `BASTION_TEST_PG_URL` is set
//! (`scripts/test.sh` always sets it, through `scripts/postgres.sh`); each
//! test then gets a schema of its own, dropped at the end. The password comes
//! from the 0600 file `BASTION_TEST_PG_PASSWORD_FILE`, else `PGPASSWORD`.
//! Without the variable each test prints one `SKIP` line naming it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};

use bastion_index::query::{Column, Filter, Level, Prefilter};
use bastion_index::{CommitOutcome, Index, IndexError, NewInstance, OnConflict, PgConnect};
use zeroize::Zeroizing;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const KEY: [u8; 32] = [0x42; 32];
/// Environment variable naming the test PostgreSQL database.
const PG_URL: &str = "BASTION_TEST_PG_URL";

/// One engine's fresh, empty index and what is needed to inspect and remove it.
pub(crate) struct Fixture {
    /// `sqlite` or `postgres`.
    pub(crate) engine: &'static str,
    /// The index under test.
    pub(crate) index: Index,
    /// SQLite: the temp dir holding the file.
    dir: Option<tempfile::TempDir>,
    /// PostgreSQL: the connection settings (schema of this test).
    pub(crate) pg: Option<PgConnect>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(pg) = &self.pg {
            if let Ok(mut c) = pg_client(pg) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", pg.schema));
            }
        }
    }
}

fn pg_password() -> Option<Zeroizing<String>> {
    if let Some(f) = std::env::var_os("BASTION_TEST_PG_PASSWORD_FILE") {
        if let Ok(s) = std::fs::read_to_string(f) {
            return Some(Zeroizing::new(s.trim_end().to_owned()));
        }
    }
    std::env::var("PGPASSWORD").ok().map(Zeroizing::new)
}

/// The test database's settings with a fresh schema named after `test`.
fn pg_connect(test: &str) -> Option<PgConnect> {
    static N: AtomicU32 = AtomicU32::new(0);
    let url = std::env::var(PG_URL).ok()?;
    let mut c = PgConnect::new(&url);
    c.password = pg_password();
    c.pool_size = 6;
    c.schema = format!(
        "t{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        test.chars().take(30).collect::<String>()
    );
    Some(c)
}

/// [`pg_client`] for the other test modules.
pub(crate) fn pg_client_pub(c: &PgConnect) -> Result<postgres::Client, postgres::Error> {
    pg_client(c)
}

/// A plain client to the test database (to inspect or drop a schema).
fn pg_client(c: &PgConnect) -> Result<postgres::Client, postgres::Error> {
    let mut config: postgres::Config = c.url.parse()?;
    if let Some(pw) = &c.password {
        config.password(pw.as_bytes());
    }
    config.connect(postgres::NoTls)
}

/// [`each_engine`] for the other test modules.
pub(crate) fn each_engine_pub(test: &str, body: impl Fn(&Fixture) -> TestResult) -> TestResult {
    each_engine(test, body)
}

/// Runs `body` on a fresh index of every available engine.
fn each_engine(test: &str, body: impl Fn(&Fixture) -> TestResult) -> TestResult {
    let dir = tempfile::tempdir()?;
    let sqlite = Fixture {
        engine: "sqlite",
        index: Index::open(&dir.path().join("index.db"), &KEY)?,
        dir: Some(dir),
        pg: None,
    };
    body(&sqlite).map_err(|e| format!("[sqlite] {e}"))?;
    match pg_connect(test) {
        None => println!("SKIP {test} on PostgreSQL: {PG_URL} is not set"),
        Some(c) => {
            let pg = Fixture {
                engine: "postgres",
                index: Index::open_postgres(&c, &KEY)?,
                dir: None,
                pg: Some(c),
            };
            body(&pg).map_err(|e| format!("[postgres] {e}"))?;
        }
    }
    Ok(())
}

/// Instance `sop` of series `series` of study `study` of patient `pid`, content `content`.
fn rec(pid: &str, study: &str, series: &str, sop: &str, content: &str) -> NewInstance {
    let mut r = NewInstance::default();
    r.patient.patient_id = pid.into();
    r.patient.issuer_of_patient_id = "HOSP".into();
    r.patient.patient_name = format!("Name{pid}^Given");
    r.patient.patient_birth_date = "19700101".into();
    r.patient.patient_sex = "O".into();
    r.study.study_instance_uid = study.into();
    r.study.study_date = "20250131".into();
    r.study.study_time = "101500".into();
    r.study.accession_number = format!("ACC-{study}");
    r.study.study_id = format!("SID-{study}");
    r.study.study_description = "CT HEAD".into();
    r.study.referring_physician_name = "Ref^Doc".into();
    r.study.sequences = r#"{"00081032":[{"00080100":"X"}]}"#.into();
    r.series.series_instance_uid = series.into();
    r.series.modality = "CT".into();
    r.series.series_number = Some(3);
    r.series.series_description = "AXIAL".into();
    r.series.body_part_examined = "HEAD".into();
    r.instance.sop_instance_uid = sop.into();
    r.instance.sop_class_uid = "1.2.840.10008.5.1.4.1.1.2".into();
    r.instance.instance_number = Some(7);
    r.instance.transfer_syntax_uid = "1.2.840.10008.1.2.1".into();
    r.instance.rows = Some(512);
    r.instance.columns = Some(256);
    r.instance.number_of_frames = Some(1);
    r.instance.specific_character_set = "ISO_IR 100".into();
    r.instance.acquisition_date_time = "20250131101500".into();
    r.blob_id = format!("{:0>32}", hex(content));
    r.key_id = "0123456789abcdef".into();
    r.stored_size = 1234;
    r.stored_sha256 = format!("stored-{content}");
    r.content_sha256 = format!("content-{content}");
    r.source_ae = "MODALITY".into();
    r.received_at = "2025-01-31T12:00:00Z".into();
    r
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn counts(idx: &Index) -> Result<(u64, u64, u64, u64), IndexError> {
    let c = idx.counts()?;
    Ok((c.patients, c.studies, c.series, c.instances))
}

/// The key UIDs (patient: PatientID) of the entities `scan` returns, sorted.
fn scan(idx: &Index, level: Level, filters: &[Prefilter]) -> Result<Vec<String>, IndexError> {
    let mut out = Vec::new();
    idx.scan(level, filters, |e| {
        out.push(match level {
            Level::Patient => e.patient.patient_id,
            Level::Study => e.study.study_instance_uid,
            Level::Series => e.series.series_instance_uid,
            Level::Instance => e.instance.sop_instance_uid,
        });
        true
    })?;
    out.sort();
    Ok(out)
}

fn any_of(column: Column, values: &[&str]) -> Prefilter {
    Prefilter {
        column,
        filter: Filter::AnyOf(values.iter().map(|v| (*v).to_owned()).collect()),
    }
}

#[test]
fn commit_duplicate_conflict_replace() -> TestResult {
    each_engine("outcomes", |f| {
        let idx = &f.index;
        let first = rec("P1", "1.2.3", "1.2.3.1", "1.2.3.1.1", "a");
        assert_eq!(
            idx.commit_batch(std::slice::from_ref(&first))?,
            vec![CommitOutcome::Stored]
        );
        let stored = idx.find_instance("1.2.3.1.1")?.ok_or("missing")?;
        assert_eq!(stored.study_instance_uid, "1.2.3");
        assert_eq!(stored.series_instance_uid, "1.2.3.1");
        assert_eq!(stored.blob_id, first.blob_id);
        assert_eq!(stored.stored_size, 1234);
        assert_eq!(stored.stored_sha256, "stored-a");
        assert_eq!(stored.received_at, "2025-01-31T12:00:00Z");

        let mut again = first.clone();
        again.blob_id = "f".repeat(32);
        assert_eq!(
            idx.commit_batch(&[again])?,
            vec![CommitOutcome::Duplicate {
                existing: stored.clone()
            }]
        );
        let conflicting = rec("P1", "1.2.3", "1.2.3.1", "1.2.3.1.1", "b");
        assert_eq!(
            idx.commit_batch(std::slice::from_ref(&conflicting))?,
            vec![CommitOutcome::Conflict {
                existing: stored.clone()
            }]
        );
        assert_eq!(idx.find_instance("1.2.3.1.1")?, Some(stored.clone()));

        let mut replacing = conflicting;
        replacing.on_conflict = OnConflict::Replace;
        assert_eq!(
            idx.commit_batch(std::slice::from_ref(&replacing))?,
            vec![CommitOutcome::Replaced {
                previous: stored.clone()
            }]
        );
        let now = idx.find_instance("1.2.3.1.1")?.ok_or("missing")?;
        assert_eq!(now.blob_id, replacing.blob_id);
        assert_eq!(now.content_sha256, "content-b");
        assert_eq!(counts(idx)?, (1, 1, 1, 1));
        // Orphan listing: the replaced blob is still referenced.
        let blobs = idx.blob_ids()?;
        assert_eq!(
            blobs,
            [first.blob_id.clone(), replacing.blob_id.clone()]
                .into_iter()
                .collect()
        );

        // Duplicates inside one batch see the earlier records.
        let a = rec("P1", "1.2.3", "1.2.3.1", "1.2.3.1.2", "c");
        let out = idx.commit_batch(&[a.clone(), a.clone()])?;
        assert_eq!(out[0], CommitOutcome::Stored);
        assert!(matches!(out[1], CommitOutcome::Duplicate { .. }), "{out:?}");
        assert_eq!(idx.find_instance("no.such")?, None);
        let listed: Vec<String> = idx
            .list_instances(10)?
            .into_iter()
            .map(|s| s.sop_instance_uid)
            .collect();
        assert_eq!(listed, ["1.2.3.1.1", "1.2.3.1.2"]);
        assert_eq!(idx.list_instances(1)?.len(), 1);
        Ok(())
    })
}

#[test]
fn hierarchy_mismatch_and_replace_moves() -> TestResult {
    each_engine("hierarchy", |f| {
        let idx = &f.index;
        idx.commit_batch(&[rec("P1", "1.2.3", "1.2.3.1", "1.2.3.1.1", "a")])?;
        let other = rec("P2", "1.2.9", "1.2.3.1", "1.2.9.1.1", "b");
        let out = idx.commit_batch(std::slice::from_ref(&other))?;
        assert!(
            matches!(&out[0], CommitOutcome::HierarchyMismatch { reason }
                if reason == "series stored under another study (Series Instance UID 1.2.3.1)"),
            "{out:?}"
        );
        let moved = rec("P2", "1.2.3", "1.2.3.2", "1.2.3.2.1", "c");
        let out = idx.commit_batch(&[moved])?;
        assert!(
            matches!(&out[0], CommitOutcome::HierarchyMismatch { reason }
                if reason == "study stored under another patient (Study Instance UID 1.2.3)"),
            "{out:?}"
        );
        // Another issuer is another patient too.
        let mut issuer = rec("P1", "1.2.3", "1.2.3.3", "1.2.3.3.1", "d");
        issuer.patient.issuer_of_patient_id = "OTHER".into();
        assert!(matches!(
            idx.commit_batch(&[issuer])?[0],
            CommitOutcome::HierarchyMismatch { .. }
        ));
        assert_eq!(counts(idx)?, (1, 1, 1, 1));
        // A refused record and a good one in one batch.
        let ok = rec("P1", "1.2.3", "1.2.3.1", "1.2.3.1.2", "e");
        let out = idx.commit_batch(&[other.clone(), ok])?;
        assert!(matches!(out[0], CommitOutcome::HierarchyMismatch { .. }));
        assert_eq!(out[1], CommitOutcome::Stored);
        // The replace policy moves the series, and the emptied parents go.
        let mut a = rec("P2", "1.2.9", "1.2.3.1", "1.2.3.1.1", "f");
        a.on_conflict = OnConflict::Replace;
        let mut b = rec("P2", "1.2.9", "1.2.3.1", "1.2.3.1.2", "g");
        b.on_conflict = OnConflict::Replace;
        let out = idx.commit_batch(&[a, b])?;
        assert!(out
            .iter()
            .all(|o| matches!(o, CommitOutcome::Replaced { .. })));
        assert_eq!(counts(idx)?, (1, 1, 1, 2));
        assert_eq!(scan(idx, Level::Patient, &[])?, ["P2"]);
        assert_eq!(scan(idx, Level::Study, &[])?, ["1.2.9"]);
        // Patients without PatientID are told apart by name.
        let mut n1 = rec("", "2.1", "2.1.1", "2.1.1.1", "h");
        n1.patient.patient_name = "Anon^One".into();
        let mut n2 = rec("", "2.2", "2.2.1", "2.2.1.1", "i");
        n2.patient.patient_name = "Anon^Two".into();
        idx.commit_batch(&[n1, n2])?;
        assert_eq!(counts(idx)?, (3, 3, 3, 4));
        Ok(())
    })
}

/// Every attribute comes back from `scan` exactly as committed, and a later
/// instance's values overwrite its parents' (as on SQLite).
#[test]
fn scan_returns_every_attribute() -> TestResult {
    each_engine("attributes", |f| {
        let idx = &f.index;
        let mut r = rec("P1", "1.2.3", "1.2.3.1", "1.2.3.1.1", "a");
        r.patient.patient_name = "Müller^Jürgen=ミュラー".into();
        idx.commit_batch(std::slice::from_ref(&r))?;
        let mut rows = Vec::new();
        idx.scan(Level::Instance, &[], |e| {
            rows.push(e);
            true
        })?;
        assert_eq!(rows.len(), 1);
        let e = &rows[0];
        assert_eq!(e.patient, r.patient);
        assert_eq!(e.study, r.study);
        assert_eq!(e.series, r.series);
        assert_eq!(e.instance, r.instance);
        assert!(e.ids.study.is_some() && e.ids.series.is_some() && e.ids.instance.is_some());

        let mut later = rec("P1", "1.2.3", "1.2.3.1", "1.2.3.1.2", "b");
        later.patient.patient_name = "Mueller^Juergen".into();
        later.study.study_description = "CT HEAD W/O".into();
        later.series.series_number = None;
        idx.commit_batch(std::slice::from_ref(&later))?;
        let mut rows = Vec::new();
        idx.scan(Level::Series, &[], |e| {
            rows.push(e);
            true
        })?;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].patient.patient_name, "Mueller^Juergen");
        assert_eq!(rows[0].study.study_description, "CT HEAD W/O");
        assert_eq!(rows[0].series.series_number, None);
        assert_eq!(rows[0].instance, Default::default());
        Ok(())
    })
}

fn prefilter_data(idx: &Index) -> Result<(), IndexError> {
    let mut recs = Vec::new();
    let names = [
        "Doe^John",
        "DOE^JANE",
        "Doerr^J",
        "Smith^A=スミス",
        "Roe^R\\Doe^X",
        "D%e^Q",
        "Doeblingerhausen^Max",
    ];
    let dates = [
        "20140101",
        "20140309",
        "20150309",
        "20150310",
        "2014.03.10",
        "",
        "20160101",
    ];
    let modalities = ["CT", "MR", "CT", "US", "MR", "CT", "PT"];
    for i in 0..names.len() {
        let mut r = rec(
            &format!("P{i}"),
            &format!("1.5.{i}"),
            &format!("1.5.{i}.1"),
            &format!("1.5.{i}.1.1"),
            &format!("x{i}"),
        );
        r.patient.patient_name = names[i].into();
        r.study.study_date = dates[i].into();
        r.series.modality = modalities[i].into();
        if i == 2 {
            r.instance.sop_class_uid = "1.2.840.10008.5.1.4.1.1.4".into();
            r.patient.issuer_of_patient_id = "OTHER".into();
        }
        recs.push(r);
    }
    // Case and whitespace matter for exact keys.
    let mut lower = rec("p0", "1.6", "1.6.1", "1.6.1.1", "y");
    lower.patient.patient_name = "doe^john".into();
    recs.push(lower);
    for o in idx.commit_batch(&recs)? {
        assert_eq!(o, CommitOutcome::Stored);
    }
    Ok(())
}

#[test]
fn prefilter_patient_id_and_issuer_are_exact() -> TestResult {
    each_engine("patient_id", |f| {
        let idx = &f.index;
        prefilter_data(idx)?;
        assert_eq!(
            scan(idx, Level::Patient, &[any_of(Column::PatientId, &["P0"])])?,
            ["P0"]
        );
        assert_eq!(
            scan(
                idx,
                Level::Patient,
                &[any_of(Column::PatientId, &["p0", "P3", "P"])]
            )?,
            ["P3", "p0"]
        );
        assert_eq!(
            scan(idx, Level::Study, &[any_of(Column::PatientId, &["P1"])])?,
            ["1.5.1"]
        );
        assert_eq!(
            scan(idx, Level::Instance, &[any_of(Column::PatientId, &["P1"])])?,
            ["1.5.1.1.1"]
        );
        assert!(scan(idx, Level::Patient, &[any_of(Column::PatientId, &[])])?.is_empty());
        assert_eq!(
            scan(
                idx,
                Level::Patient,
                &[any_of(Column::IssuerOfPatientId, &["OTHER"])]
            )?,
            ["P2"]
        );
        assert_eq!(
            scan(
                idx,
                Level::Study,
                &[any_of(Column::AccessionNumber, &["ACC-1.5.4", "ACC-nope"])]
            )?,
            ["1.5.4"]
        );
        assert_eq!(
            scan(
                idx,
                Level::Study,
                &[any_of(Column::StudyId, &["SID-1.5.5"])]
            )?,
            ["1.5.5"]
        );
        Ok(())
    })
}

#[test]
fn prefilter_patient_name_prefix() -> TestResult {
    each_engine("patient_name", |f| {
        let idx = &f.index;
        prefilter_data(idx)?;
        let prefix = |prefixes: &[&str]| -> Result<Vec<String>, IndexError> {
            let f = Prefilter {
                column: Column::PatientName,
                filter: Filter::PrefixNoCase(prefixes.iter().map(|p| (*p).to_owned()).collect()),
            };
            let mut out = Vec::new();
            idx.scan(Level::Patient, &[f], |row| {
                out.push(row.patient.patient_name);
                true
            })?;
            out.sort();
            Ok(out)
        };
        // Case-insensitive prefixes, plus every multi-valued / multi-group name.
        assert_eq!(
            prefix(&["doe^j"])?,
            [
                "DOE^JANE",
                "Doe^John",
                "Roe^R\\Doe^X",
                "Smith^A=スミス",
                "doe^john"
            ]
        );
        assert_eq!(
            prefix(&["d%"])?,
            ["D%e^Q", "Roe^R\\Doe^X", "Smith^A=スミス"]
        );
        // Longer than the hashed prefixes: a superset the matcher narrows.
        let long = prefix(&["DOEBLINGERHAUS"])?;
        assert!(
            long.contains(&"Doeblingerhausen^Max".to_owned()),
            "{long:?}"
        );
        assert!(!long.contains(&"Doe^John".to_owned()), "{long:?}");
        assert_eq!(
            prefix(&["smith", "roe"])?,
            ["Roe^R\\Doe^X", "Smith^A=スミス"]
        );
        assert_eq!(prefix(&["xyz"])?, ["Roe^R\\Doe^X", "Smith^A=スミス"]);
        // Study level narrows by the patient's name too.
        let f = Prefilter {
            column: Column::PatientName,
            filter: Filter::PrefixNoCase(vec!["doerr".into()]),
        };
        assert_eq!(scan(idx, Level::Study, &[f])?, ["1.5.2", "1.5.3", "1.5.4"]);
        Ok(())
    })
}

#[test]
fn prefilter_study_date_range() -> TestResult {
    each_engine("study_date", |f| {
        let idx = &f.index;
        prefilter_data(idx)?;
        let range = |lo: Option<&str>, hi: Option<&str>| -> Result<Vec<String>, IndexError> {
            let f = Prefilter {
                column: Column::StudyDate,
                filter: Filter::Range(lo.map(str::to_owned), hi.map(str::to_owned)),
            };
            let mut found = Vec::new();
            idx.scan(Level::Study, &[f], |row| {
                found.push(row.study.study_date);
                true
            })?;
            found.sort();
            Ok(found)
        };
        assert_eq!(
            range(Some("20140309"), Some("20150309"))?,
            ["", "2014.03.10", "20140309", "20150309"]
        );
        assert_eq!(
            range(None, Some("20140309"))?,
            ["", "2014.03.10", "20140101", "20140309"]
        );
        assert_eq!(
            range(Some("20150310"), None)?,
            ["", "2014.03.10", "20150310", "20160101", "20250131"]
        );
        // Combined with another prefilter, at series level.
        let both = [
            Prefilter {
                column: Column::StudyDate,
                filter: Filter::Range(Some("20140101".into()), Some("20151231".into())),
            },
            any_of(Column::Modality, &["CT"]),
        ];
        assert_eq!(
            scan(idx, Level::Series, &both)?,
            ["1.5.0.1", "1.5.2.1", "1.5.5.1"]
        );
        Ok(())
    })
}

#[test]
fn prefilter_modality_and_uids() -> TestResult {
    each_engine("uids", |f| {
        let idx = &f.index;
        prefilter_data(idx)?;
        assert_eq!(
            scan(
                idx,
                Level::Series,
                &[any_of(Column::Modality, &["MR", "PT"])]
            )?,
            ["1.5.1.1", "1.5.4.1", "1.5.6.1"]
        );
        assert_eq!(
            scan(idx, Level::Study, &[any_of(Column::Modality, &["US"])])?.len(),
            8
        );
        assert_eq!(
            scan(
                idx,
                Level::Study,
                &[any_of(Column::StudyInstanceUid, &["1.5.3", "1.6"])]
            )?,
            ["1.5.3", "1.6"]
        );
        assert_eq!(
            scan(
                idx,
                Level::Instance,
                &[any_of(Column::SeriesInstanceUid, &["1.5.3.1"])]
            )?,
            ["1.5.3.1.1"]
        );
        assert_eq!(
            scan(
                idx,
                Level::Instance,
                &[any_of(Column::SopInstanceUid, &["1.5.6.1.1", "9.9"])]
            )?,
            ["1.5.6.1.1"]
        );
        assert_eq!(
            scan(
                idx,
                Level::Instance,
                &[any_of(Column::SopClassUid, &["1.2.840.10008.5.1.4.1.1.4"])]
            )?,
            ["1.5.2.1.1"]
        );
        // A callback returning false stops the walk.
        let mut seen = 0;
        idx.scan(Level::Instance, &[], |_| {
            seen += 1;
            seen < 3
        })?;
        assert_eq!(seen, 3);
        Ok(())
    })
}

#[test]
fn counts_below_each_entity() -> TestResult {
    each_engine("counts", |f| {
        let idx = &f.index;
        let mut recs = vec![
            rec("P1", "1.1", "1.1.1", "1.1.1.1", "a"),
            rec("P1", "1.1", "1.1.1", "1.1.1.2", "b"),
            rec("P1", "1.1", "1.1.2", "1.1.2.1", "c"),
            rec("P1", "1.2", "1.2.1", "1.2.1.1", "d"),
            rec("P2", "2.1", "2.1.1", "2.1.1.1", "e"),
        ];
        recs[2].series.modality = "SR".into();
        recs[2].instance.sop_class_uid = "1.2.840.10008.5.1.4.1.1.88.11".into();
        idx.commit_batch(&recs)?;
        assert_eq!(counts(idx)?, (2, 3, 4, 5));
        let mut patients = Vec::new();
        idx.scan(Level::Patient, &[any_of(Column::PatientId, &["P1"])], |e| {
            patients.push(e.ids);
            true
        })?;
        let p = idx.patient_counts(patients[0].patient)?;
        assert_eq!((p.studies, p.series, p.instances), (2, 3, 4));
        let mut studies = Vec::new();
        idx.scan(Level::Study, &[], |e| {
            studies.push((e.study.study_instance_uid, e.ids));
            true
        })?;
        let s11 = studies.iter().find(|(u, _)| u == "1.1").ok_or("1.1")?.1;
        let c = idx.study_counts(s11.study.ok_or("id")?)?;
        assert_eq!((c.series, c.instances), (2, 3));
        assert_eq!(c.modalities, ["CT", "SR"]);
        assert_eq!(
            c.sop_classes,
            ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.11"]
        );
        let ids: Vec<i64> = studies.iter().filter_map(|(_, i)| i.study).collect();
        let many = idx.study_counts_many(&[ids.clone(), vec![-5]].concat())?;
        assert_eq!(many.len(), 4);
        assert_eq!(many[&-5], Default::default());
        assert_eq!(many[&s11.study.ok_or("id")?], c);
        let total: u64 = many.values().map(|c| c.instances).sum();
        assert_eq!(total, 5);
        let mut series = Vec::new();
        idx.scan(
            Level::Series,
            &[any_of(Column::SeriesInstanceUid, &["1.1.1"])],
            |e| {
                series.push(e.ids);
                true
            },
        )?;
        assert_eq!(idx.series_instance_count(series[0].series.ok_or("id")?)?, 2);
        // Retrieval lists at each level.
        let uids = |level, ids| -> Result<Vec<String>, IndexError> {
            Ok(idx
                .instances_under(level, ids)?
                .into_iter()
                .map(|s| s.sop_instance_uid)
                .collect())
        };
        assert_eq!(
            uids(Level::Patient, &patients[0])?,
            ["1.1.1.1", "1.1.1.2", "1.1.2.1", "1.2.1.1"]
        );
        assert_eq!(uids(Level::Study, &s11)?, ["1.1.1.1", "1.1.1.2", "1.1.2.1"]);
        assert_eq!(uids(Level::Series, &series[0])?, ["1.1.1.1", "1.1.1.2"]);
        assert!(matches!(
            idx.instances_under(Level::Instance, &series[0]),
            Err(IndexError::Corrupt { .. })
        ));
        Ok(())
    })
}

/// Several writers create the same patient, study and series at the same
/// moment (threads through one `Index`, plus a second `Index` on the same
/// database where the engine allows it): every instance stored once, one
/// row per entity; the same SOP Instance sent by two writers is stored once
/// and reported a duplicate once.
#[test]
fn concurrent_writers_create_the_same_study() -> TestResult {
    const WRITERS: usize = 4;
    const EACH: usize = 10;
    each_engine("concurrent", |f| {
        let second = match (&f.dir, &f.pg) {
            (Some(d), _) => Index::open(&d.path().join("index.db"), &KEY)?,
            (None, Some(c)) => Index::open_postgres(c, &KEY)?,
            (None, None) => return Err("no engine".into()),
        };
        let handles = [&f.index, &second];
        let barrier = Arc::new(Barrier::new(WRITERS));
        let outcomes: Vec<Vec<CommitOutcome>> = std::thread::scope(|s| {
            let joins: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let barrier = Arc::clone(&barrier);
                    let idx = handles[w % 2];
                    s.spawn(move || -> Result<Vec<CommitOutcome>, IndexError> {
                        barrier.wait();
                        let mut out = Vec::new();
                        for i in 0..EACH {
                            let mut batch = vec![rec(
                                "P1",
                                "7.7",
                                "7.7.1",
                                &format!("7.7.1.{w}.{i}"),
                                &format!("w{w}i{i}"),
                            )];
                            // Every writer also sends the shared instance 7.7.1.0.
                            if i == EACH / 2 {
                                batch.push(rec("P1", "7.7", "7.7.1", "7.7.1.0", "shared"));
                            }
                            out.extend(idx.commit_batch(&batch)?);
                        }
                        Ok(out)
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| {
                    j.join()
                        .map_err(|_| "writer panicked".to_owned())?
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<_, _>>()
        })?;
        let all: Vec<&CommitOutcome> = outcomes.iter().flatten().collect();
        assert_eq!(all.len(), WRITERS * (EACH + 1));
        let stored = all.iter().filter(|o| ***o == CommitOutcome::Stored).count();
        let dups = all
            .iter()
            .filter(|o| matches!(o, CommitOutcome::Duplicate { .. }))
            .count();
        assert_eq!((stored, dups), (WRITERS * EACH + 1, WRITERS - 1), "{all:?}");
        assert_eq!(counts(&f.index)?, (1, 1, 1, (WRITERS * EACH + 1) as u64));
        assert_eq!(counts(&second)?, counts(&f.index)?);
        Ok(())
    })
}

/// The wrong key is refused at open, on every engine.
#[test]
fn wrong_key_is_refused() -> TestResult {
    each_engine("wrong_key", |f| {
        f.index
            .commit_batch(&[rec("P1", "1.2", "1.2.1", "1.2.1.1", "a")])?;
        let other = [0x24u8; 32];
        let reopened = match (&f.dir, &f.pg) {
            (Some(d), _) => Index::open(&d.path().join("index.db"), &other),
            (None, Some(c)) => Index::open_postgres(c, &other),
            (None, None) => return Err("no engine".into()),
        };
        assert!(
            matches!(reopened, Err(IndexError::WrongKey { .. })),
            "{reopened:?}"
        );
        Ok(())
    })
}

/// No plaintext patient data at rest: a marked patient is committed, then
/// the engine's storage is read whole (SQLite: the database files after a
/// checkpoint; PostgreSQL: `pg_dump` of the schema, and the cluster's data
/// directory when `BASTION_TEST_PG_DATADIR` is readable) and searched.
#[test]
fn no_plaintext_patient_data_at_rest() -> TestResult {
    each_engine("plaintext", |f| {
        let mut r = rec("PID-MARK-4711", "1.9", "1.9.1", "1.9.1.1", "a");
        r.patient.patient_name = "Qzxmarker^Wolfgang".into();
        r.patient.patient_birth_date = "19230405".into();
        r.study.accession_number = "ACCMARK-0815".into();
        r.study.referring_physician_name = "Refmarker^Doc".into();
        f.index.commit_batch(&[r])?;
        f.index.checkpoint()?;
        let needles: [&[u8]; 6] = [
            b"Qzxmarker",
            b"QZXMARKER",
            b"PID-MARK-4711",
            b"19230405",
            b"ACCMARK-0815",
            b"Refmarker",
        ];
        let mut haystacks: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(d) = &f.dir {
            for e in std::fs::read_dir(d.path())? {
                let p = e?.path();
                haystacks.push((p.display().to_string(), std::fs::read(&p)?));
            }
        }
        if let Some(c) = &f.pg {
            haystacks.push(("pg_dump".into(), pg_dump(c)?));
            if let Some(dir) = std::env::var_os("BASTION_TEST_PG_DATADIR") {
                for e in walk(PathBuf::from(dir)) {
                    if let Ok(bytes) = std::fs::read(&e) {
                        haystacks.push((e.display().to_string(), bytes));
                    }
                }
            }
        }
        assert!(!haystacks.is_empty());
        for (name, bytes) in &haystacks {
            for n in needles {
                assert!(
                    memchr_find(bytes, n).is_none(),
                    "[{}] {name} contains {}",
                    f.engine,
                    String::from_utf8_lossy(n)
                );
            }
        }
        Ok(())
    })
}

/// A PostgreSQL server that cannot be reached (nothing listens on the port:
/// the server is stopped) is reported as unavailable, so that the archive
/// answers "retry later" (C-STORE 0xA700, STOW-RS 503) and keeps a blob whose
/// commit outcome is unknown. Needs no PostgreSQL: runs everywhere.
#[test]
fn unreachable_postgres_is_unavailable() -> TestResult {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let c = PgConnect::new(&format!("postgres://bastion@127.0.0.1:{port}/bastion"));
    let err = Index::open_postgres(&c, &KEY)
        .err()
        .ok_or("opened an index on a closed port")?;
    assert!(err.is_unavailable(), "{err}");
    assert!(!IndexError::NoSpace.is_unavailable());
    Ok(())
}

/// PostgreSQL only: a wrong password is a clear error that does not echo it;
/// several nodes starting on a new database at once migrate it exactly once.
#[test]
fn postgres_credentials_and_concurrent_migration() -> TestResult {
    let Some(mut c) = pg_connect("migrate") else {
        println!("SKIP postgres_credentials_and_concurrent_migration: {PG_URL} is not set");
        return Ok(());
    };
    let good = c.password.clone();
    c.password = Some(Zeroizing::new("not-the-password-xyzzy".into()));
    let err = Index::open_postgres(&c, &KEY)
        .err()
        .ok_or("wrong password accepted")?;
    let msg = err.to_string();
    assert!(
        matches!(&err, IndexError::Postgres { source, .. }
            if source.code() == Some(&postgres::error::SqlState::INVALID_PASSWORD)),
        "{msg}"
    );
    assert!(!msg.contains("xyzzy"), "{msg}");
    // a refused login is a configuration fault, not a database that is down
    assert!(!err.is_unavailable(), "{msg}");
    c.password = good;
    let mut in_url = c.clone();
    in_url.url = in_url.url.replacen("://", "://u:secret-pw@", 1);
    let err = Index::open_postgres(&in_url, &KEY)
        .err()
        .ok_or("password in URL accepted")?;
    assert!(matches!(err, IndexError::Config { .. }) && !err.to_string().contains("secret-pw"));

    let barrier = Barrier::new(4);
    let opened: Vec<Result<Index, IndexError>> = std::thread::scope(|s| {
        let joins: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    Index::open_postgres(&c, &KEY)
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| {
                j.join().unwrap_or_else(|_| {
                    Err(IndexError::Corrupt {
                        reason: "panic".into(),
                    })
                })
            })
            .collect()
    });
    let fixture = Fixture {
        engine: "postgres",
        index: Index::open_postgres(&c, &KEY)?,
        dir: None,
        pg: Some(c.clone()),
    };
    for o in opened {
        o?;
    }
    let mut client = pg_client(&c)?;
    let versions: Vec<i32> = client
        .query(
            &format!("SELECT version FROM {}.schema_version", c.schema),
            &[],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1]);
    assert!(fixture.index.is_postgres());
    Ok(())
}

fn pg_dump(c: &PgConnect) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let bin = std::env::var("BASTION_TEST_PG_BIN")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    let mut cmd = std::process::Command::new(format!("{bin}/pg_dump"));
    cmd.arg("--schema")
        .arg(&c.schema)
        .arg("--dbname")
        .arg(&c.url);
    if let Some(pw) = &c.password {
        cmd.env("PGPASSWORD", pw.as_str());
    }
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("pg_dump failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let dump = out.stdout;
    // The dump holds the data: the schema's rows are there, as ciphertext.
    assert!(
        memchr_find(&dump, b"1.9.1.1").is_some(),
        "pg_dump holds no rows"
    );
    Ok(dump)
}

/// Every file below `dir` (bounded: at most 100 000 entries).
fn walk(dir: PathBuf) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir];
    let mut seen = BTreeSet::new();
    while let Some(d) = todo.pop() {
        if seen.len() > 100_000 {
            break;
        }
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if !seen.insert(p.clone()) {
                continue;
            }
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// The index is usable from an async task on either Tokio runtime flavour
/// (the web layer's event recording looks patients up on an async worker):
/// the PostgreSQL client's own `block_on` must not panic there.
#[test]
fn usable_from_async_tasks() -> TestResult {
    each_engine("async", |f| {
        let idx = &f.index;
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()?;
        let current = tokio::runtime::Builder::new_current_thread().build()?;
        for (i, rt) in [multi, current].iter().enumerate() {
            let got: Result<(Vec<String>, u64), IndexError> = rt.block_on(async {
                let r = rec(
                    "P1",
                    "3.1",
                    "3.1.1",
                    &format!("3.1.1.{i}"),
                    &format!("z{i}"),
                );
                idx.commit_batch(&[r])?;
                let studies = scan(idx, Level::Study, &[any_of(Column::PatientId, &["P1"])])?;
                // Opened and dropped (its connections closed) on the runtime.
                let other = match (&f.dir, &f.pg) {
                    (Some(d), _) => Index::open(&d.path().join("index.db"), &KEY)?,
                    (None, Some(c)) => Index::open_postgres(c, &KEY)?,
                    (None, None) => Index::open(std::path::Path::new("/nonexistent/x"), &KEY)?,
                };
                assert_eq!(other.counts()?, idx.counts()?);
                drop(other);
                Ok((studies, idx.counts()?.instances))
            });
            assert_eq!(got?, (vec!["3.1".to_owned()], i as u64 + 1));
        }
        Ok(())
    })
}
