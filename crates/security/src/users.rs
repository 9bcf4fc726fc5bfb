//! Local user accounts (DESIGN §2 "users"). Passwords are hashed with
//! argon2id (OWASP parameters: m = 19 MiB, t = 2, p = 1); no default
//! password exists: the first `admin` gets a random one, shown once.

use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use rand::{distributions::Alphanumeric, rngs::OsRng, Rng};
use rusqlite::{params, OptionalExtension};

use crate::{db::SecurityDb, Result, SecurityError};

/// Roles of DESIGN §2; only `admin` is created in this release.
pub const ROLES: [&str; 5] = [
    "admin",
    "clinician",
    "technologist",
    "auditor",
    "researcher",
];

/// Generates a random password of 24 alphanumeric characters (~142 bits).
pub fn generate_password() -> String {
    OsRng
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

/// Creates a user with `password`.
///
/// # Errors
/// [`SecurityError::UserExists`], [`SecurityError::Invalid`] for an unknown
/// role, [`SecurityError::PasswordHash`], [`SecurityError::Db`].
pub fn create_user(db: &SecurityDb, username: &str, password: &str, role: &str) -> Result<()> {
    if !ROLES.contains(&role) {
        return Err(SecurityError::Invalid {
            what: "role",
            detail: role.to_owned(),
        });
    }
    let salt = SaltString::generate(&mut OsRng);
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| SecurityError::PasswordHash(e.to_string()))?
        .to_string();
    let ts = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    db.with(|c| {
        let n = c
            .execute(
                "INSERT OR IGNORE INTO users (username, password_hash, role, created_at) VALUES (?1,?2,?3,?4)",
                params![username, hash, role, ts],
            )
            .map_err(|source| SecurityError::Db { op: "insert user", source })?;
        if n == 0 {
            return Err(SecurityError::UserExists(username.to_owned()));
        }
        Ok(())
    })
}

/// Verifies a password (argon2 compares in constant time). Unknown users
/// also cost one hash so timing does not reveal which names exist.
///
/// # Errors
/// [`SecurityError::Db`] on database failure.
pub fn verify_password(db: &SecurityDb, username: &str, password: &str) -> Result<bool> {
    let stored: Option<String> = db.with(|c| {
        c.query_row(
            "SELECT password_hash FROM users WHERE username=?1",
            params![username],
            |r| r.get(0),
        )
        .optional()
        .map_err(|source| SecurityError::Db {
            op: "read user",
            source,
        })
    })?;
    let argon = Argon2::default();
    match stored.as_deref().map(PasswordHash::new) {
        Some(Ok(h)) => Ok(argon.verify_password(password.as_bytes(), &h).is_ok()),
        _ => {
            let salt = SaltString::generate(&mut OsRng);
            let _ = argon.hash_password(password.as_bytes(), &salt);
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_and_verify() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| SecurityError::Invalid {
            what: "tmp",
            detail: e.to_string(),
        })?;
        let db = SecurityDb::open(&dir.path().join("s.db"), &[7u8; 32])?;
        let pw = generate_password();
        assert_eq!(pw.len(), 24);
        create_user(&db, "admin", &pw, "admin")?;
        assert!(verify_password(&db, "admin", &pw)?);
        assert!(!verify_password(&db, "admin", "wrong")?);
        assert!(!verify_password(&db, "nobody", &pw)?);
        assert!(matches!(
            create_user(&db, "admin", &pw, "admin"),
            Err(SecurityError::UserExists(_))
        ));
        // the database is encrypted: the wrong key cannot open it
        drop(db);
        assert!(matches!(
            SecurityDb::open(&dir.path().join("s.db"), &[8u8; 32]),
            Err(SecurityError::WrongKey(_))
        ));
        Ok(())
    }
}
