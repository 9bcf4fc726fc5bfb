//! Passwords of local user accounts (DESIGN §2 "users"): argon2id hashing
//! with the OWASP parameters, the password policy, and generated passwords.
//! No default password exists: the first `admin` gets a random one, shown
//! once. Account management itself is [`crate::accounts::Accounts`].

use crate::DbExt;
use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Algorithm, Argon2, Params, Version,
};
use bastion_model::Role;
use rand::{distributions::Alphanumeric, rngs::OsRng, Rng};
use rusqlite::{params, OptionalExtension};

use crate::{db::SecurityDb, Result, SecurityError};

/// argon2 memory cost in KiB: 19 MiB (OWASP Password Storage Cheat Sheet,
/// argon2id, m = 19 MiB, t = 2, p = 1).
pub const ARGON2_MEMORY_KIB: u32 = 19 * 1024;
/// argon2 iterations (OWASP: 2 with 19 MiB).
pub const ARGON2_ITERATIONS: u32 = 2;
/// argon2 parallelism (OWASP: 1).
pub const ARGON2_PARALLELISM: u32 = 1;
/// Minimum length of a password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Maximum length of a password, in bytes (bounds hashing work per request).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Minimum zxcvbn score (0–4) a chosen password must reach: 3 is "safely
/// unguessable: moderate protection from offline slow-hash scenario".
pub const MIN_STRENGTH_SCORE: u8 = 3;
/// Length of a user name, in bytes.
pub const MAX_USERNAME_BYTES: usize = 64;

/// Generates a random password of 24 alphanumeric characters (~142 bits).
pub fn generate_password() -> String {
    OsRng
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

/// Checks a user name: 1–64 bytes of ASCII letters, digits and `. _ @ -`,
/// starting with a letter or digit (it appears in otpauth URIs, logs and
/// events, so no separators or control characters).
///
/// # Errors
/// [`SecurityError::Invalid`] saying which rule is broken.
pub fn validate_username(username: &str) -> Result<()> {
    let invalid = |detail: &str| SecurityError::Invalid {
        what: "user name",
        detail: detail.to_owned(),
    };
    if username.is_empty() || username.len() > MAX_USERNAME_BYTES {
        return Err(invalid("must be 1 to 64 characters long"));
    }
    if !username
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
    {
        return Err(invalid("must start with a letter or a digit"));
    }
    if !username
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
    {
        return Err(invalid(
            "may contain only ASCII letters, digits and . _ @ -",
        ));
    }
    Ok(())
}

/// Checks a password a person chose against the policy: at least
/// [`MIN_PASSWORD_CHARS`] characters, at most [`MAX_PASSWORD_BYTES`] bytes,
/// and a zxcvbn score of at least [`MIN_STRENGTH_SCORE`] (zxcvbn's
/// dictionaries include common-password lists; the user name counts as a
/// known word).
///
/// # Errors
/// [`SecurityError::WeakPassword`] with the reason; the message never
/// contains the password.
pub fn check_password_policy(username: &str, password: &str) -> Result<()> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(SecurityError::WeakPassword(format!(
            "it has {chars} characters; at least {MIN_PASSWORD_CHARS} are required"
        )));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(SecurityError::WeakPassword(format!(
            "it is longer than {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    if password.chars().any(char::is_control) {
        return Err(SecurityError::WeakPassword(
            "it contains control characters".into(),
        ));
    }
    let entropy = zxcvbn::zxcvbn(password, &[username, "bastion", "pacs"]);
    let score = u8::from(entropy.score());
    if score < MIN_STRENGTH_SCORE {
        let mut why = format!(
            "it is too easy to guess (strength {score} of 4, at least {MIN_STRENGTH_SCORE} required)"
        );
        if let Some(f) = entropy.feedback() {
            if let Some(w) = f.warning() {
                why.push_str(&format!(": {w}"));
            }
            for s in f.suggestions() {
                why.push_str(&format!(" {s}"));
            }
        }
        return Err(SecurityError::WeakPassword(why));
    }
    Ok(())
}

/// The argon2id instance with the parameters above, set explicitly.
pub(crate) fn argon2() -> Result<Argon2<'static>> {
    let params = Params::new(
        ARGON2_MEMORY_KIB,
        ARGON2_ITERATIONS,
        ARGON2_PARALLELISM,
        None,
    )
    .map_err(|e| SecurityError::PasswordHash(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes a password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`)
/// with a random salt.
///
/// # Errors
/// [`SecurityError::PasswordHash`].
pub(crate) fn hash_password(password: &str) -> Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(argon2()?
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| SecurityError::PasswordHash(e.to_string()))?
        .to_string())
}

/// Verifies `password` against a stored PHC string; argon2 compares in
/// constant time. A malformed stored hash verifies nothing (and still costs
/// one hash, against `fallback`).
pub(crate) fn verify_hash(stored: &str, fallback: &str, password: &str) -> bool {
    let Ok(argon) = argon2() else {
        return false;
    };
    match PasswordHash::new(stored) {
        Ok(h) => argon.verify_password(password.as_bytes(), &h).is_ok(),
        Err(_) => {
            if let Ok(h) = PasswordHash::new(fallback) {
                let _ = argon.verify_password(password.as_bytes(), &h);
            }
            false
        }
    }
}

/// Creates a user with `password`, which must be changed at first login
/// (this is how `bastion init` creates the first `admin`; other accounts are
/// made with [`crate::accounts::Accounts::add_user`]).
///
/// # Errors
/// [`SecurityError::UserExists`], [`SecurityError::UserNameCaseClash`]
/// (the name differs from an existing one only in letter case),
/// [`SecurityError::Model`] for an unknown
/// role, [`SecurityError::Invalid`] for a bad user name,
/// [`SecurityError::PasswordHash`], [`SecurityError::Db`].
pub fn create_user(db: &SecurityDb, username: &str, password: &str, role: &str) -> Result<()> {
    let role = Role::parse(role)?;
    validate_username(username)?;
    let hash = hash_password(password)?;
    insert_user(db, username, &hash, role, true)
}

/// Inserts a user row.
pub(crate) fn insert_user(
    db: &SecurityDb,
    username: &str,
    hash: &str,
    role: Role,
    must_change_password: bool,
) -> Result<()> {
    let ts = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    db.with(|c| {
        let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)
            .map_err(|source| SecurityError::Db { op: "begin", source })?;
        // SQLite's lower() folds ASCII letters only, as intended: names
        // are ASCII (validate_username).
        let clash: Option<String> = tx
            .query_row(
                "SELECT username FROM users WHERE lower(username) = lower(?1) AND username <> ?1",
                params![username],
                |r| r.get(0),
            )
            .optional()
            .map_err(|source| SecurityError::Db { op: "read users", source })?;
        if let Some(existing) = clash {
            return Err(SecurityError::UserNameCaseClash {
                name: username.to_owned(),
                existing,
            });
        }
        let n = tx
            .execute(
                "INSERT OR IGNORE INTO users (username, password_hash, role, must_change_password, created_at) VALUES (?1,?2,?3,?4,?5)",
                params![username, hash, role.as_str(), must_change_password, ts],
            )
            .map_err(|source| SecurityError::Db { op: "insert user", source })?;
        if n == 0 {
            return Err(SecurityError::UserExists(username.to_owned()));
        }
        tx.commit()
            .map_err(|source| SecurityError::Db { op: "commit", source })?;
        Ok(())
    })
}

/// Verifies a password without any throttling (argon2 compares in constant
/// time). Unknown users also cost one hash so timing does not reveal which
/// names exist. The web front end must use
/// [`crate::accounts::Accounts::login`] instead, which throttles.
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
    match stored {
        Some(h) => Ok(verify_hash(&h, &h, password)),
        None => {
            let _ = hash_password(password)?;
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
        assert!(matches!(
            create_user(&db, "x", &pw, "root"),
            Err(SecurityError::Model(_))
        ));
        // the database is encrypted: the wrong key cannot open it
        drop(db);
        assert!(matches!(
            SecurityDb::open(&dir.path().join("s.db"), &[8u8; 32]),
            Err(crate::DbError::WrongKey(_))
        ));
        Ok(())
    }

    #[test]
    fn hashes_carry_the_owasp_parameters() -> Result<()> {
        let h = hash_password("correct horse battery staple")?;
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_hash(&h, &h, "correct horse battery staple"));
        assert!(!verify_hash(&h, &h, "correct horse battery stapl"));
        assert!(!verify_hash("not a hash", &h, "x"));
        Ok(())
    }

    #[test]
    fn password_policy() {
        let refused = |user: &str, pw: &str| match check_password_policy(user, pw) {
            Err(SecurityError::WeakPassword(why)) => {
                assert!(!why.contains(pw), "the message echoes the password: {why}");
                why
            }
            other => panic!("{pw:?} accepted: {other:?}"),
        };
        assert!(refused("alice", "Xy7!kq").contains("at least 12"));
        // common passwords of 12+ characters, from zxcvbn's lists
        for pw in [
            "password1234",
            "123456789012",
            "qwertyuiopasdf",
            "iloveyou12345",
        ] {
            assert!(refused("alice", pw).contains("too easy"), "{pw}");
        }
        // the user name is a known word
        assert!(refused("radiology2024", "radiology2024!").contains("too easy"));
        assert!(refused("alice", "correct horse\u{7}battery").contains("control"));
        assert!(refused("alice", &"a".repeat(2000)).contains("1024"));
        assert!(check_password_policy("alice", "correct horse battery staple").is_ok());
        assert!(check_password_policy("alice", &generate_password()).is_ok());
    }

    #[test]
    fn user_names() {
        for ok in ["admin", "dr.smith", "a_b-c@example.org", "7"] {
            assert!(validate_username(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "a b", "a:b", "ä", &"a".repeat(65), "a\nb"] {
            assert!(validate_username(bad).is_err(), "{bad:?}");
        }
    }
}
