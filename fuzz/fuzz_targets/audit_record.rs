//! The audit-trail reader (`crates/security/src/audit/trail.rs`: `verify`,
//! `read`, `AuditReader::search`, `TrailCursor`; the record and checkpoint
//! line formats documented in `audit/mod.rs`) on trail files the fuzzer
//! writes, and the writer → reader round trip on arbitrary events (which
//! also drives the PS3.15 A.5 audit-message renderer).
//!
//! Input: byte 0 bit 0 selects the mode.
//! - 0, "files": bytes 1..3 = length of the checkpoints file (big-endian),
//!   taken from the end; the records file in between. Seeds are real trails.
//! - 1, "append": the rest is a JSON object, appended as an event to a new
//!   trail (a checkpoint every two records); the trail must then verify
//!   intact and read back the same event.
#![no_main]

use std::{path::PathBuf, sync::Arc, sync::OnceLock};

use bastion_security::audit::{
    self, AuditIdentity, AuditKeys, AuditReader, AuditTrail, CheckpointPolicy, Filter,
};
use libfuzzer_sys::fuzz_target;

#[path = "common/keys.rs"]
mod keys;

/// Records read from one trail at most.
const MAX_RECORDS: usize = 1000;

fn keys() -> Arc<AuditKeys> {
    static KEYS: OnceLock<Arc<AuditKeys>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let signing = ed25519_dalek::SigningKey::from_bytes(&keys::AUDIT_SIGNING_SEED);
        Arc::new(AuditKeys::new(&keys::AUDIT_AEAD_KEY, signing).expect("fixed keys"))
    })
    .clone()
}

fn fresh_dir() -> PathBuf {
    let dir = keys::scratch("audit");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let keys = keys();
    if mode & 1 == 0 {
        if rest.len() < 2 {
            return;
        }
        let (len, files) = rest.split_at(2);
        let len = usize::from(u16::from_be_bytes([len[0], len[1]])).min(files.len());
        let (records, checkpoints) = files.split_at(files.len() - len);
        let dir = fresh_dir();
        std::fs::write(dir.join("records"), records).expect("scratch write");
        std::fs::write(dir.join("checkpoints"), checkpoints).expect("scratch write");
        let report = audit::verify(&dir, &keys).expect("the files exist");
        let mut n = 0usize;
        let _ = audit::read(&dir, &keys, |_| {
            n += 1;
            n < MAX_RECORDS
        })
        .expect("the files exist");
        if report.broken.is_none() && report.records < MAX_RECORDS as u64 {
            assert_eq!(report.records, n as u64, "an intact trail reads whole");
        }
        let reader = AuditReader::new(&dir, keys.clone());
        let _ = reader
            .search(&Filter::default(), 10)
            .expect("the files exist");
        let mut cursor = reader.read_from(0).expect("the files exist");
        for _ in 0..MAX_RECORDS {
            match cursor.next_record() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        return;
    }
    let Ok(event) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(rest)
    else {
        return;
    };
    let dir = fresh_dir();
    let trail = AuditTrail::create(
        &dir.join("trail"),
        keys.clone(),
        AuditIdentity {
            ae_title: "BASTION".into(),
            source_id: "BASTION@fuzz".into(),
        },
        CheckpointPolicy {
            every_records: 2,
            ..CheckpointPolicy::default()
        },
    )
    .expect("a new trail");
    trail.append(&event).expect("append");
    trail.append(&event).expect("append");
    trail.checkpoint().expect("checkpoint");
    drop(trail);
    if let (Ok(records), Ok(checkpoints)) = (
        std::fs::read(dir.join("trail/records")),
        std::fs::read(dir.join("trail/checkpoints")),
    ) {
        if let Ok(len) = u16::try_from(checkpoints.len()) {
            keys::save_seed(&[&[0u8][..], &len.to_be_bytes(), &records, &checkpoints].concat());
        }
    }
    let report = audit::verify(&dir.join("trail"), &keys).expect("the trail exists");
    assert!(
        report.broken.is_none(),
        "a fresh trail is broken: {:?}",
        report.broken
    );
    let mut events = Vec::new();
    let unreadable = audit::read(&dir.join("trail"), &keys, |r| {
        events.push(r.event);
        true
    })
    .expect("the trail exists");
    assert_eq!(unreadable, 0);
    // The trail stores JSON: compare with the event as JSON reads it back.
    // serde_json (without its `float_roundtrip` feature) may parse a float's
    // shortest form to a neighbouring f64 (finding
    // `regression-float-roundtrip`); Bastion's events carry no floats.
    let expected: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&serde_json::to_vec(&event).expect("a map serialises"))
            .expect("and parses");
    assert_eq!(events[0], expected, "the event reads back as appended");
    assert_eq!(events[1], expected);
});
