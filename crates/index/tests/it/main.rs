//! Integration tests for `bastion-index`: encryption at rest, keys, commit outcomes
//! (SQLite), and the conformance suite every engine passes (`conformance`).

mod conformance;
mod timing;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bastion_index::{CommitOutcome, Counts, Index, IndexError, NewInstance, OnConflict};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const KEY: [u8; 32] = [0x42; 32];

/// A record in study `study`, series `series`, with instance `sop` and content `content`.
fn rec(study: &str, series: &str, sop: &str, content: &str) -> NewInstance {
    let mut r = NewInstance::default();
    r.patient.patient_id = "PID-987654".into();
    r.patient.patient_name = "Zyxwvut^Qqq".into();
    r.patient.patient_birth_date = "19700101".into();
    r.patient.patient_sex = "O".into();
    r.study.study_instance_uid = study.into();
    r.study.study_date = "20250131".into();
    r.study.accession_number = "ACC1".into();
    r.series.series_instance_uid = series.into();
    r.series.modality = "CT".into();
    r.series.series_number = Some(1);
    r.instance.sop_instance_uid = sop.into();
    r.instance.sop_class_uid = "1.2.840.10008.5.1.4.1.1.2".into();
    r.instance.transfer_syntax_uid = "1.2.840.10008.1.2.1".into();
    r.instance.rows = Some(512);
    r.instance.columns = Some(512);
    r.blob_id = format!("{:0>32}", content.len().to_string() + content);
    r.key_id = "0123456789abcdef".into();
    r.stored_size = 1234;
    r.stored_sha256 = format!("stored-{content}");
    r.content_sha256 = format!("content-{content}");
    r.source_ae = "MODALITY".into();
    r.received_at = "2025-01-31T12:00:00Z".into();
    r
}

#[test]
fn file_is_encrypted() -> TestResult {
    let d = tempfile::tempdir()?;
    let path = d.path().join("index.db");
    let idx = Index::open(&path, &KEY)?;
    idx.commit_batch(&[rec("1.2.3", "1.2.3.1", "1.2.3.1.1", "a")])?;

    // Before the checkpoint the data sits in the WAL: it must be encrypted there too.
    let wal = d.path().join("index.db-wal");
    for file in [&path, &wal] {
        if let Ok(bytes) = fs::read(file) {
            assert_no_plaintext(&bytes, file);
        }
    }
    idx.checkpoint()?;
    drop(idx);
    let bytes = fs::read(&path)?;
    assert!(bytes.len() >= 16);
    assert_ne!(
        &bytes[..16],
        b"SQLite format 3\0",
        "database is not encrypted"
    );
    for entry in fs::read_dir(d.path())? {
        let p = entry?.path();
        assert_no_plaintext(&fs::read(&p)?, &p);
    }
    assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
    Ok(())
}

fn assert_no_plaintext(bytes: &[u8], file: &Path) {
    for needle in [&b"Zyxwvut^Qqq"[..], b"PID-987654", b"Zyxwvut", b"1.2.3.1.1"] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{} contains {:?}",
            file.display(),
            String::from_utf8_lossy(needle)
        );
    }
}

#[test]
fn reopen_keeps_data_and_checks_key() -> TestResult {
    let d = tempfile::tempdir()?;
    let path = d.path().join("index.db");
    {
        let idx = Index::open(&path, &KEY)?;
        idx.commit_batch(&[rec("1.2.3", "1.2.3.1", "1.2.3.1.1", "a")])?;
    }
    {
        let idx = Index::open(&path, &KEY)?;
        let got = idx
            .find_instance("1.2.3.1.1")?
            .ok_or("instance lost on reopen")?;
        assert_eq!(got.study_instance_uid, "1.2.3");
        assert_eq!(got.series_instance_uid, "1.2.3.1");
        assert_eq!(got.stored_size, 1234);
        assert_eq!(got.content_sha256, "content-a");
        assert_eq!(idx.find_instance("nope")?, None);
    }
    match Index::open(&path, &[0x43; 32]) {
        Err(IndexError::WrongKey { .. }) => {}
        r => panic!("expected WrongKey, got {r:?}"),
    }
    // The right key still works after a wrong attempt.
    assert_eq!(Index::open(&path, &KEY)?.counts()?.instances, 1);
    Ok(())
}

#[test]
fn two_handles_share_the_file() -> TestResult {
    let d = tempfile::tempdir()?;
    let path = d.path().join("index.db");
    let a = Index::open(&path, &KEY)?;
    let b = Index::open(&path, &KEY)?;
    a.commit_batch(&[rec("1.2.3", "1.2.3.1", "1.2.3.1.1", "a")])?;
    b.commit_batch(&[rec("1.2.3", "1.2.3.1", "1.2.3.1.2", "b")])?;
    assert_eq!(a.counts()?.instances, 2);
    assert!(b.find_instance("1.2.3.1.1")?.is_some());
    Ok(())
}

#[test]
fn outcomes() -> TestResult {
    let d = tempfile::tempdir()?;
    let idx = Index::open(&d.path().join("index.db"), &KEY)?;
    let first = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", "a");
    assert_eq!(
        idx.commit_batch(std::slice::from_ref(&first))?,
        vec![CommitOutcome::Stored]
    );
    let stored = idx.find_instance("1.2.3.1.1")?.ok_or("missing")?;

    // Identical re-send (new blob, same content).
    let mut again = first.clone();
    again.blob_id = "ffffffffffffffffffffffffffffffff".into();
    assert_eq!(
        idx.commit_batch(&[again])?,
        vec![CommitOutcome::Duplicate {
            existing: stored.clone()
        }]
    );

    // Conflicting re-send, refused.
    let conflicting = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", "b");
    assert_eq!(
        idx.commit_batch(std::slice::from_ref(&conflicting))?,
        vec![CommitOutcome::Conflict {
            existing: stored.clone()
        }]
    );
    assert_eq!(idx.find_instance("1.2.3.1.1")?, Some(stored.clone()));

    // Conflicting re-send, replacing.
    let mut replacing = conflicting;
    replacing.on_conflict = OnConflict::Replace;
    assert_eq!(
        idx.commit_batch(&[replacing.clone()])?,
        vec![CommitOutcome::Replaced {
            previous: stored.clone()
        }]
    );
    let now = idx.find_instance("1.2.3.1.1")?.ok_or("missing")?;
    assert_eq!(now.blob_id, replacing.blob_id);
    assert_eq!(now.content_sha256, "content-b");
    assert_eq!(idx.counts()?.instances, 1);

    let blobs = idx.blob_ids()?;
    assert!(
        blobs.contains(&first.blob_id),
        "replaced blob still referenced"
    );
    assert!(blobs.contains(&replacing.blob_id));
    assert_eq!(blobs.len(), 2);
    Ok(())
}

#[test]
fn duplicates_inside_one_batch() -> TestResult {
    let d = tempfile::tempdir()?;
    let idx = Index::open(&d.path().join("index.db"), &KEY)?;
    let a = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", "a");
    let mut b = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", "b");
    let mut c = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", "c");
    c.on_conflict = OnConflict::Replace;
    let other = rec("1.2.3", "1.2.3.1", "1.2.3.1.2", "x");
    let out = idx.commit_batch(&[a.clone(), a.clone(), b.clone(), other, c.clone(), c])?;
    assert_eq!(out.len(), 6);
    assert_eq!(out[0], CommitOutcome::Stored);
    let Some(CommitOutcome::Duplicate { existing }) = out.get(1) else {
        panic!("expected Duplicate, got {:?}", out[1]);
    };
    assert_eq!(existing.blob_id, a.blob_id);
    assert!(
        matches!(out[2], CommitOutcome::Conflict { ref existing } if existing.blob_id == a.blob_id)
    );
    assert_eq!(out[3], CommitOutcome::Stored);
    assert!(
        matches!(out[4], CommitOutcome::Replaced { ref previous } if previous.blob_id == a.blob_id)
    );
    assert!(
        matches!(out[5], CommitOutcome::Duplicate { ref existing } if existing.content_sha256 == "content-c")
    );
    assert_eq!(idx.counts()?.instances, 2);

    // A failing record rolls back the whole batch.
    b.stored_size = u64::MAX;
    b.instance.sop_instance_uid = "9.9.9".into();
    let fresh = rec("1.2.4", "1.2.4.1", "1.2.4.1.1", "y");
    assert!(matches!(
        idx.commit_batch(&[fresh, b]),
        Err(IndexError::ValueOutOfRange { .. })
    ));
    assert_eq!(idx.find_instance("1.2.4.1.1")?, None);
    assert_eq!(idx.counts()?.studies, 1);
    Ok(())
}

#[test]
fn hierarchy_rows_are_shared() -> TestResult {
    let d = tempfile::tempdir()?;
    let idx = Index::open(&d.path().join("index.db"), &KEY)?;
    idx.commit_batch(&[
        rec("1.2.3", "1.2.3.1", "1.2.3.1.1", "a"),
        rec("1.2.3", "1.2.3.1", "1.2.3.1.2", "b"),
        rec("1.2.3", "1.2.3.2", "1.2.3.2.1", "c"),
    ])?;
    idx.commit_batch(&[rec("1.2.4", "1.2.4.1", "1.2.4.1.1", "d")])?;
    assert_eq!(
        idx.counts()?,
        Counts {
            patients: 1,
            studies: 2,
            series: 3,
            instances: 4
        }
    );

    // Same PatientID, other issuer: another patient.
    let mut other_issuer = rec("1.2.5", "1.2.5.1", "1.2.5.1.1", "e");
    other_issuer.patient.issuer_of_patient_id = "HOSP-B".into();
    // No PatientID: patients told apart by name.
    let mut anon1 = rec("1.2.6", "1.2.6.1", "1.2.6.1.1", "f");
    anon1.patient.patient_id.clear();
    let mut anon2 = rec("1.2.7", "1.2.7.1", "1.2.7.1.1", "g");
    anon2.patient.patient_id.clear();
    anon2.patient.patient_name = "Other^Name".into();
    let mut anon1_again = rec("1.2.8", "1.2.8.1", "1.2.8.1.1", "h");
    anon1_again.patient.patient_id.clear();
    idx.commit_batch(&[other_issuer, anon1, anon2, anon1_again])?;
    assert_eq!(idx.counts()?.patients, 4);
    assert_eq!(idx.counts()?.studies, 6);

    let listed = idx.list_instances(100)?;
    assert_eq!(listed.len(), 8);
    assert_eq!(listed[0].sop_instance_uid, "1.2.3.1.1");
    assert_eq!(idx.list_instances(2)?.len(), 2);
    Ok(())
}

#[test]
fn replace_into_other_study_removes_empty_parents() -> TestResult {
    let d = tempfile::tempdir()?;
    let idx = Index::open(&d.path().join("index.db"), &KEY)?;
    idx.commit_batch(&[rec("1.2.3", "1.2.3.1", "1.2.3.1.1", "a")])?;
    let mut moved = rec("1.2.9", "1.2.9.1", "1.2.3.1.1", "b");
    moved.patient.patient_id = "PID-NEW".into();
    moved.on_conflict = OnConflict::Replace;
    let out = idx.commit_batch(&[moved])?;
    assert!(
        matches!(out[0], CommitOutcome::Replaced { ref previous } if previous.study_instance_uid == "1.2.3")
    );
    assert_eq!(
        idx.counts()?,
        Counts {
            patients: 1,
            studies: 1,
            series: 1,
            instances: 1
        }
    );
    let now = idx.find_instance("1.2.3.1.1")?.ok_or("missing")?;
    assert_eq!(now.study_instance_uid, "1.2.9");
    assert_eq!(idx.blob_ids()?.len(), 2);
    Ok(())
}

#[test]
fn index_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Index>();
}

/// Unmounts on drop so a failing assertion does not leave a mount behind.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_gives_no_space() -> TestResult {
    let d = tempfile::tempdir()?;
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt)?;
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipping: cannot mount tmpfs (not root?)");
        return Ok(());
    }
    let _mount = Mount(mnt.clone());
    let idx = Index::open(&mnt.join("index.db"), &KEY)?;
    let mut result = Ok(Vec::new());
    for batch in 0..1000 {
        let records: Vec<NewInstance> = (0..50)
            .map(|i| {
                let mut r = rec("1.2.3", "1.2.3.1", &format!("1.2.3.1.{batch}.{i}"), "a");
                r.stored_sha256 = "x".repeat(500);
                r
            })
            .collect();
        result = idx.commit_batch(&records);
        if result.is_err() {
            break;
        }
    }
    match result {
        Err(IndexError::NoSpace) => {}
        r => panic!("expected NoSpace, got {r:?}"),
    }
    // Still readable after the failed commit.
    assert!(idx.counts()?.instances > 0);
    Ok(())
}

/// The StudyDate range prefilter keeps exactly the canonical dates inside
/// the range, and every non-canonical stored value (for the matcher to judge).
#[test]
fn study_date_range_prefilter() -> TestResult {
    use bastion_index::query::{Column, Filter, Level, Prefilter};
    let dir = tempfile::tempdir()?;
    let index = Index::open(&dir.path().join("index.db"), &KEY)?;
    let dates = [
        "20140101",
        "20140309",
        "20150309",
        "20150310",
        "2014.03.10",
        "",
    ];
    let records: Vec<NewInstance> = dates
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut r = rec(
                &format!("1.2.{i}"),
                &format!("1.2.{i}.1"),
                &format!("1.2.{i}.1.1"),
                &format!("c{i}"),
            );
            r.study.study_date = (*d).into();
            r
        })
        .collect();
    index.commit_batch(&records)?;
    let range = |lo: Option<&str>, hi: Option<&str>| -> Result<Vec<String>, IndexError> {
        let mut found = Vec::new();
        let f = Prefilter {
            column: Column::StudyDate,
            filter: Filter::Range(lo.map(str::to_owned), hi.map(str::to_owned)),
        };
        index.scan(Level::Study, &[f], |row| {
            found.push(row.study.study_date.clone());
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
        ["", "2014.03.10", "20150310"]
    );
    Ok(())
}

/// The PN prefix prefilter keeps case-insensitive prefix matches and every
/// multi-valued or multi-group name (for the matcher to judge).
#[test]
fn patient_name_prefix_prefilter() -> TestResult {
    use bastion_index::query::{Column, Filter, Level, Prefilter};
    let dir = tempfile::tempdir()?;
    let index = Index::open(&dir.path().join("index.db"), &KEY)?;
    let names = [
        "Doe^John",
        "DOE^JANE",
        "Doerr^J",
        "Smith^A=スミス",
        "Roe^R\\Doe^X",
        "D%e^Q",
    ];
    let records: Vec<NewInstance> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut r = rec(
                &format!("1.3.{i}"),
                &format!("1.3.{i}.1"),
                &format!("1.3.{i}.1.1"),
                &format!("n{i}"),
            );
            r.patient.patient_id = format!("P{i}");
            r.patient.patient_name = (*n).into();
            r
        })
        .collect();
    index.commit_batch(&records)?;
    let found = |prefixes: &[&str]| -> Result<Vec<String>, IndexError> {
        let mut out = Vec::new();
        let f = Prefilter {
            column: Column::PatientName,
            filter: Filter::PrefixNoCase(prefixes.iter().map(|p| (*p).to_owned()).collect()),
        };
        index.scan(Level::Patient, &[f], |row| {
            out.push(row.patient.patient_name.clone());
            true
        })?;
        out.sort();
        Ok(out)
    };
    assert_eq!(
        found(&["doe^j"])?,
        ["DOE^JANE", "Doe^John", "Roe^R\\Doe^X", "Smith^A=スミス"]
    );
    // % and _ in a prefix are literal characters
    assert_eq!(found(&["d%"])?, ["D%e^Q", "Roe^R\\Doe^X", "Smith^A=スミス"]);
    Ok(())
}

/// Set in the child run of [`wrong_key_prints_nothing_on_stderr`].
const QUIET_CHILD: &str = "BASTION_INDEX_TEST_WRONG_KEY_CHILD";

/// A wrong key is an error value, not SQLCipher log lines on stderr
/// (`ERROR CORE sqlcipher_page_cipher: hmac check failed`): SQLCipher
/// writes to the process's stderr directly, so the check runs this test
/// binary again as a child and reads what it printed.
#[test]
fn wrong_key_prints_nothing_on_stderr() -> TestResult {
    if let Some(dir) = std::env::var_os(QUIET_CHILD) {
        let path = Path::new(&dir).join("index.db");
        drop(Index::open(&path, &KEY)?);
        match Index::open(&path, &[0x43; 32]) {
            Err(IndexError::WrongKey { .. }) => {}
            r => panic!("expected WrongKey, got {r:?}"),
        }
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "wrong_key_prints_nothing_on_stderr",
            "--nocapture",
        ])
        .env(QUIET_CHILD, dir.path())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the child did not run the test"
    );
    assert!(!stderr.contains("hmac check failed"), "{stderr}");
    assert!(!stderr.contains("ERROR CORE"), "{stderr}");
    Ok(())
}

/// A new instance may not move a stored series to another study, nor a
/// stored study to another patient, unless the device's policy is replace
/// (the outside trial: one upload re-homed another patient's series and the
/// study vanished from every query).
#[test]
fn reused_series_or_study_uids_do_not_move_stored_images() -> TestResult {
    let d = tempfile::tempdir()?;
    let idx = Index::open(&d.path().join("index.db"), &KEY)?;
    idx.commit_batch(&[rec("1.2.3", "1.2.3.1", "1.2.3.1.1", "a")])?;
    // Same series, another study (and another patient).
    let mut other = rec("1.2.9", "1.2.3.1", "1.2.9.1.1", "b");
    other.patient.patient_id = "OTHERPAT".into();
    let out = idx.commit_batch(std::slice::from_ref(&other))?;
    assert!(
        matches!(&out[0], CommitOutcome::HierarchyMismatch { reason } if reason.contains("series stored under another study (Series Instance UID 1.2.3.1)")),
        "{out:?}"
    );
    // Same study, another patient.
    let mut moved = rec("1.2.3", "1.2.3.2", "1.2.3.2.1", "c");
    moved.patient.patient_id = "OTHERPAT".into();
    let out = idx.commit_batch(std::slice::from_ref(&moved))?;
    assert!(
        matches!(&out[0], CommitOutcome::HierarchyMismatch { reason } if reason.contains("study stored under another patient (Study Instance UID 1.2.3)")),
        "{out:?}"
    );
    // Nothing moved, nothing added.
    let counts = idx.counts()?;
    assert_eq!(
        (
            counts.patients,
            counts.studies,
            counts.series,
            counts.instances
        ),
        (1, 1, 1, 1)
    );
    let kept = idx.find_instance("1.2.3.1.1")?.ok_or("missing")?;
    assert_eq!(kept.study_instance_uid, "1.2.3");
    // A later instance of the same study and patient is fine, in one batch
    // with a refused one.
    let ok = rec("1.2.3", "1.2.3.1", "1.2.3.1.2", "d");
    let out = idx.commit_batch(&[other.clone(), ok])?;
    assert!(matches!(out[0], CommitOutcome::HierarchyMismatch { .. }));
    assert_eq!(out[1], CommitOutcome::Stored);
    // With the replace policy the administrator opted into moves.
    let mut replace = other;
    replace.on_conflict = OnConflict::Replace;
    assert_eq!(idx.commit_batch(&[replace])?, vec![CommitOutcome::Stored]);
    Ok(())
}
