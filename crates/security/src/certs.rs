//! Issued device certificates and their revocation list (issue 10).
//!
//! `bastion cert issue` records every certificate it makes (serial, AE
//! title, SHA-256, not-after) in the security database (migration 7); a
//! re-issue revokes the AE's previous certificates unless asked to keep
//! them. `bastion cert revoke` revokes by AE title or by fingerprint; a
//! fingerprint never recorded (a certificate issued before this table
//! existed, or a pinned third-party certificate) is added as a revoked row.
//! Certificates issued before the table existed cannot be listed by
//! fingerprint, so revoking an AE (or re-issuing for it) also records a
//! cut-off: a certificate that chains to our CA, names that AE as subject
//! CN and was never recorded is revoked too.
//!
//! The TLS handshake (PS3.15 Annex B.1: the peer is authenticated by its
//! certificate) reads the list through a [`TrustCache`]: a snapshot of the
//! database refreshed every few seconds, so a revocation by the CLI in
//! another process (or on another node sharing the database) applies to the
//! next handshake within [`TrustCache::DEFAULT_TTL`]. Home-made: rustls's
//! CRL support needs a CRL signed by the CA, which would put the CA key in
//! every serve process; the revocation list here is a table of fingerprints
//! in the authenticated, encrypted security database instead.

use crate::DbExt;
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bastion_model::AeTitle;
use rusqlite::{params, OptionalExtension};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use crate::{db::SecurityDb, Result, SecurityError};

/// One row of `bastion cert list`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertRecord {
    /// Serial number, lowercase hex; `None` for a fingerprint revoked
    /// without having been recorded at issue.
    pub serial: Option<String>,
    /// The device's AE title (the certificate's subject CN).
    pub ae: Option<String>,
    /// SHA-256 of the DER certificate, 64 lowercase hex digits.
    pub sha256: String,
    /// End of the validity period, RFC 3339.
    pub not_after: Option<String>,
    /// When it was issued, RFC 3339.
    pub issued_at: Option<String>,
    /// Whether it is revoked.
    pub revoked: bool,
    /// When it was revoked, RFC 3339.
    pub revoked_at: Option<String>,
}

/// The certificate table of the security database.
pub struct CertRegistry<'a> {
    db: &'a SecurityDb,
}

fn db_err(op: &'static str) -> impl FnOnce(rusqlite::Error) -> SecurityError {
    move |source| SecurityError::Db { op, source }
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
    )
    .unwrap_or(i64::MAX)
}

fn rfc3339_ms(ms: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()?
        .format(&Rfc3339)
        .ok()
}

/// Checks and normalises a SHA-256 fingerprint given by an operator: 64 hex
/// digits, colons and case ignored.
///
/// # Errors
/// [`SecurityError::Invalid`] when it is not 64 hex digits.
pub fn normalize_sha256(s: &str) -> Result<String> {
    let hexits: String = s
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hexits.len() != 64 || !hexits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(SecurityError::Invalid {
            what: "sha256",
            detail: "expected 64 hexadecimal digits (colons allowed)".into(),
        });
    }
    Ok(hexits)
}

impl<'a> CertRegistry<'a> {
    /// The registry over `db`.
    pub fn new(db: &'a SecurityDb) -> Self {
        CertRegistry { db }
    }

    /// Records a certificate just issued to `ae`. Unless `keep_previous`,
    /// every earlier certificate of `ae` is revoked in the same transaction
    /// (and those issued before certificates were recorded, through the
    /// AE's cut-off). Returns the fingerprints newly revoked.
    ///
    /// # Errors
    /// [`SecurityError::Db`].
    pub fn record_issued(
        &self,
        ae: &AeTitle,
        sha256: &str,
        serial: &str,
        not_after: OffsetDateTime,
        keep_previous: bool,
    ) -> Result<Vec<String>> {
        let now = now_ms();
        let not_after_ms =
            i64::try_from(not_after.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
        self.db.with(|c| {
            let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)
                .map_err(db_err("begin"))?;
            let revoked = if keep_previous {
                Vec::new()
            } else {
                revoke_ae_in(&tx, ae.as_str(), now)?
            };
            tx.execute(
                "INSERT INTO certificates (sha256, serial, ae, not_after_ms, issued_ms, revoked_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL)
                 ON CONFLICT(sha256) DO UPDATE SET serial = ?2, ae = ?3, not_after_ms = ?4, issued_ms = ?5",
                params![sha256, serial, ae.as_str(), not_after_ms, now],
            )
            .map_err(db_err("record certificate"))?;
            tx.commit().map_err(db_err("commit"))?;
            Ok(revoked)
        })
    }

    /// Revokes every certificate issued to `ae` (recorded ones, and through
    /// the AE's cut-off the ones issued before certificates were recorded).
    /// Returns the recorded fingerprints newly revoked.
    ///
    /// # Errors
    /// [`SecurityError::Db`].
    pub fn revoke_ae(&self, ae: &AeTitle) -> Result<Vec<String>> {
        self.db.with(|c| {
            let tx =
                rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)
                    .map_err(db_err("begin"))?;
            let revoked = revoke_ae_in(&tx, ae.as_str(), now_ms())?;
            tx.commit().map_err(db_err("commit"))?;
            Ok(revoked)
        })
    }

    /// Revokes the certificate with this fingerprint (normalised first),
    /// recorded or not. Returns `false` when it was revoked already.
    ///
    /// # Errors
    /// [`SecurityError::Invalid`] for a malformed fingerprint,
    /// [`SecurityError::Db`].
    pub fn revoke_sha256(&self, sha256: &str) -> Result<bool> {
        let sha256 = normalize_sha256(sha256)?;
        let now = now_ms();
        self.db.with(|c| {
            let n = c
                .execute(
                    "INSERT INTO certificates (sha256, revoked_ms) VALUES (?1, ?2)
                     ON CONFLICT(sha256) DO UPDATE SET revoked_ms = ?2 WHERE revoked_ms IS NULL",
                    params![sha256, now],
                )
                .map_err(db_err("revoke certificate"))?;
            Ok(n > 0)
        })
    }

    /// The recorded certificates, of `ae` only when given, oldest first.
    ///
    /// # Errors
    /// [`SecurityError::Db`].
    pub fn list(&self, ae: Option<&AeTitle>) -> Result<Vec<CertRecord>> {
        self.db.with(|c| {
            let mut st = c
                .prepare(
                    "SELECT serial, ae, sha256, not_after_ms, issued_ms, revoked_ms FROM certificates
                     WHERE ?1 IS NULL OR ae = ?1
                     ORDER BY coalesce(issued_ms, revoked_ms), sha256",
                )
                .map_err(db_err("list certificates"))?;
            let rows = st
                .query_map(params![ae.map(AeTitle::as_str)], |r| {
                    let revoked_ms: Option<i64> = r.get(5)?;
                    Ok(CertRecord {
                        serial: r.get(0)?,
                        ae: r.get(1)?,
                        sha256: r.get(2)?,
                        not_after: r.get::<_, Option<i64>>(3)?.and_then(rfc3339_ms),
                        issued_at: r.get::<_, Option<i64>>(4)?.and_then(rfc3339_ms),
                        revoked: revoked_ms.is_some(),
                        revoked_at: revoked_ms.and_then(rfc3339_ms),
                    })
                })
                .map_err(db_err("list certificates"))?;
            rows.collect::<std::result::Result<Vec<_>, _>>()
                .map_err(db_err("list certificates"))
        })
    }

    /// Whether `ae` has a cut-off (its unrecorded certificates are revoked).
    ///
    /// # Errors
    /// [`SecurityError::Db`].
    pub fn has_cutoff(&self, ae: &AeTitle) -> Result<bool> {
        self.db.with(|c| {
            c.query_row(
                "SELECT 1 FROM certificate_ae_cutoffs WHERE ae = ?1",
                [ae.as_str()],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(db_err("read cut-off"))
        })
    }

    /// What the handshake needs: revoked and recorded fingerprints, AE
    /// cut-offs and the devices' pinned fingerprints.
    ///
    /// # Errors
    /// [`SecurityError::Db`].
    pub fn snapshot(&self) -> Result<TrustSnapshot> {
        self.db.with(|c| {
            let strings = |sql: &str| -> Result<HashSet<String>> {
                let mut st = c.prepare(sql).map_err(db_err("read revocation list"))?;
                let rows = st
                    .query_map([], |r| r.get::<_, String>(0))
                    .map_err(db_err("read revocation list"))?;
                rows.collect::<std::result::Result<HashSet<_>, _>>()
                    .map_err(db_err("read revocation list"))
            };
            Ok(TrustSnapshot {
                revoked: strings("SELECT sha256 FROM certificates WHERE revoked_ms IS NOT NULL")?,
                recorded: strings("SELECT sha256 FROM certificates")?,
                cutoff_aes: strings("SELECT ae FROM certificate_ae_cutoffs")?,
                pinned: strings("SELECT cert_sha256 FROM devices WHERE cert_sha256 IS NOT NULL")?,
            })
        })
    }
}

fn revoke_ae_in(tx: &rusqlite::Transaction<'_>, ae: &str, now: i64) -> Result<Vec<String>> {
    let revoked = {
        let mut st = tx
            .prepare("SELECT sha256 FROM certificates WHERE ae = ?1 AND revoked_ms IS NULL")
            .map_err(db_err("revoke certificates"))?;
        let rows = st
            .query_map([ae], |r| r.get::<_, String>(0))
            .map_err(db_err("revoke certificates"))?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(db_err("revoke certificates"))?
    };
    tx.execute(
        "UPDATE certificates SET revoked_ms = ?2 WHERE ae = ?1 AND revoked_ms IS NULL",
        params![ae, now],
    )
    .map_err(db_err("revoke certificates"))?;
    tx.execute(
        "INSERT INTO certificate_ae_cutoffs (ae, at_ms) VALUES (?1, ?2)
         ON CONFLICT(ae) DO UPDATE SET at_ms = ?2",
        params![ae, now],
    )
    .map_err(db_err("revoke certificates"))?;
    Ok(revoked)
}

/// The revocation state at one moment, as the TLS handshake checks it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustSnapshot {
    revoked: HashSet<String>,
    recorded: HashSet<String>,
    cutoff_aes: HashSet<String>,
    pinned: HashSet<String>,
}

impl TrustSnapshot {
    /// Why the certificate with this fingerprint (and, for one that chains
    /// to our CA, this subject CN) is revoked, or `None`.
    pub fn revoked(
        &self,
        sha256: &str,
        chains_to_ca: bool,
        subject_cn: Option<&str>,
    ) -> Option<&'static str> {
        if self.revoked.contains(sha256) {
            return Some("certificate fingerprint is on the revocation list");
        }
        let cut = subject_cn
            .and_then(|cn| AeTitle::parse(cn).ok())
            .is_some_and(|ae| self.cutoff_aes.contains(ae.as_str()));
        (chains_to_ca && cut && !self.recorded.contains(sha256)).then_some(
            "certificate was issued to its AE title before that AE's certificates were revoked or re-issued",
        )
    }

    /// Whether this fingerprint is on the revocation list itself (not only
    /// revoked through its AE's cut-off).
    pub fn listed(&self, sha256: &str) -> bool {
        self.revoked.contains(sha256)
    }

    /// Whether a registered device pins exactly this fingerprint.
    pub fn pinned(&self, sha256: &str) -> bool {
        self.pinned.contains(sha256)
    }
}

/// A [`TrustSnapshot`] refreshed from the database when older than its
/// time-to-live. Shared by every connection of a listener.
pub struct TrustCache {
    db: Arc<SecurityDb>,
    ttl: Duration,
    state: Mutex<Option<(Instant, Arc<TrustSnapshot>)>>,
}

impl std::fmt::Debug for TrustCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustCache")
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl TrustCache {
    /// How long a snapshot is used before the database is read again.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(2);

    /// A cache over `db` refreshed every `ttl`.
    pub fn new(db: Arc<SecurityDb>, ttl: Duration) -> TrustCache {
        TrustCache {
            db,
            ttl,
            state: Mutex::new(None),
        }
    }

    /// The current snapshot: the cached one while younger than the
    /// time-to-live, else read afresh.
    ///
    /// # Errors
    /// [`SecurityError::Db`] when the database cannot be read; the caller
    /// refuses the certificate then (fail closed).
    pub fn current(&self) -> Result<Arc<TrustSnapshot>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, snap)) = state.as_ref() {
            if at.elapsed() < self.ttl {
                return Ok(snap.clone());
            }
        }
        let snap = Arc::new(CertRegistry::new(&self.db).snapshot()?);
        *state = Some((Instant::now(), snap.clone()));
        Ok(snap)
    }

    /// Reads the snapshot afresh whatever its age (e.g. before refusing a
    /// certificate that a device registered a moment ago may pin).
    ///
    /// # Errors
    /// [`SecurityError::Db`] when the database cannot be read.
    pub fn refresh(&self) -> Result<Arc<TrustSnapshot>> {
        let snap = Arc::new(CertRegistry::new(&self.db).snapshot()?);
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), snap.clone()));
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, SecurityDb) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = SecurityDb::open(&dir.path().join("s.db"), &[7; 32]).expect("open");
        (dir, db)
    }

    fn ae(s: &str) -> AeTitle {
        AeTitle::parse(s).expect("ae")
    }

    #[test]
    fn reissue_revokes_previous_unless_kept() {
        let (_d, db) = db();
        let reg = CertRegistry::new(&db);
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let c = "c".repeat(64);
        let later = OffsetDateTime::now_utc() + time::Duration::days(825);
        assert!(reg
            .record_issued(&ae("MOD1"), &a, "01", later, false)
            .expect("a")
            .is_empty());
        assert_eq!(
            reg.record_issued(&ae("MOD1"), &b, "02", later, false)
                .expect("b"),
            vec![a.clone()]
        );
        assert!(reg
            .record_issued(&ae("MOD1"), &c, "03", later, true)
            .expect("c")
            .is_empty());
        let list = reg.list(Some(&ae("MOD1"))).expect("list");
        let state: Vec<(&str, bool)> = list
            .iter()
            .map(|r| (r.serial.as_deref().unwrap_or(""), r.revoked))
            .collect();
        assert_eq!(state, vec![("01", true), ("02", false), ("03", false)]);
        let snap = reg.snapshot().expect("snapshot");
        assert!(snap.revoked(&a, true, Some("MOD1")).is_some());
        assert_eq!(snap.revoked(&b, true, Some("MOD1")), None);
        // An unrecorded (pre-table) certificate of MOD1 is cut off; one of
        // another AE is not.
        let old = "d".repeat(64);
        assert!(snap.revoked(&old, true, Some("MOD1")).is_some());
        assert_eq!(snap.revoked(&old, true, Some("CT2")), None);
        assert_eq!(snap.revoked(&old, false, Some("MOD1")), None);
    }

    #[test]
    fn revoke_by_ae_and_by_fingerprint() {
        let (_d, db) = db();
        let reg = CertRegistry::new(&db);
        let later = OffsetDateTime::now_utc() + time::Duration::days(1);
        let a = "a".repeat(64);
        reg.record_issued(&ae("MOD1"), &a, "01", later, false)
            .expect("a");
        assert!(!reg.has_cutoff(&ae("CT2")).expect("cutoff"));
        assert_eq!(reg.revoke_ae(&ae("MOD1")).expect("revoke"), vec![a.clone()]);
        assert!(reg.revoke_ae(&ae("MOD1")).expect("again").is_empty());
        // an unrecorded fingerprint, with colons and upper case
        let foreign = "AB:".repeat(31) + "AB";
        assert!(reg.revoke_sha256(&foreign).expect("revoke"));
        assert!(!reg.revoke_sha256(&foreign).expect("again"));
        assert!(reg.revoke_sha256("xyz").is_err());
        let all = reg.list(None).expect("list");
        assert_eq!(all.len(), 2);
        let unrecorded = all
            .iter()
            .find(|r| r.sha256 == "ab".repeat(32))
            .expect("row");
        assert!(unrecorded.revoked && unrecorded.ae.is_none() && unrecorded.serial.is_none());
        let snap = reg.snapshot().expect("snapshot");
        assert!(snap.revoked(&"ab".repeat(32), false, None).is_some());
        assert!(snap.revoked(&a, true, Some("MOD1")).is_some());
    }

    #[test]
    fn cache_refreshes_after_ttl() {
        let (_d, db) = db();
        let db = Arc::new(db);
        let cache = TrustCache::new(db.clone(), Duration::ZERO);
        let x = "e".repeat(64);
        assert_eq!(
            cache.current().expect("snap").revoked(&x, false, None),
            None
        );
        CertRegistry::new(&db).revoke_sha256(&x).expect("revoke");
        assert!(cache
            .current()
            .expect("snap")
            .revoked(&x, false, None)
            .is_some());
    }
}
