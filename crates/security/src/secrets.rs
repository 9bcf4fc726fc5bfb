//! Secret files: created 0600, refused when readable by group or others;
//! and keys wrapped by a passphrase ([`wrap_key`], [`unwrap_key`]) for sites
//! that keep the master key next to the data but want a copy of it to be
//! useless without the passphrase.
//!
//! A wrapped key file is one JSON object:
//!
//! ```json
//! {"format": "bastion-wrapped-key-v1", "kdf": "argon2id",
//!  "memory_kib": 65536, "iterations": 3, "parallelism": 1,
//!  "salt": "<16 bytes, hex>", "nonce": "<12 bytes, hex>",
//!  "ciphertext": "<32-byte key + 16-byte GCM tag, hex>"}
//! ```
//!
//! The key-encryption key is argon2id(passphrase, salt) with these
//! parameters (RFC 9106 §4: 64 MiB, 3 passes); the key is sealed with
//! AES-256-GCM (aws-lc-rs, the AEAD the rest of Bastion uses), the format,
//! KDF parameters and salt being the associated data, so that no field can be
//! changed without the unwrap failing.

use std::{
    fs::OpenOptions,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::{io_err, Result, SecurityError};

/// The `format` of a wrapped key file.
pub const WRAPPED_KEY_FORMAT: &str = "bastion-wrapped-key-v1";
/// argon2id memory cost of the key-encryption key, KiB (64 MiB, RFC 9106 §4).
pub const WRAP_MEMORY_KIB: u32 = 64 * 1024;
/// argon2id passes of the key-encryption key (RFC 9106 §4).
pub const WRAP_ITERATIONS: u32 = 3;
/// argon2id lanes of the key-encryption key.
pub const WRAP_PARALLELISM: u32 = 1;
/// Largest passphrase accepted, bytes (bounds the work per attempt).
pub const MAX_PASSPHRASE_BYTES: usize = 1024;

/// Writes a new secret file with mode 0600 and fsyncs it.
///
/// # Errors
/// [`SecurityError::Io`] when the file already exists or cannot be written.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with_mode(path, bytes, 0o600)
}

/// Writes a new public file (certificates) with mode 0644 and fsyncs it.
///
/// # Errors
/// [`SecurityError::Io`] when the file already exists or cannot be written.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with_mode(path, bytes, 0o644)
}

fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("create", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

/// Checks that a secret file grants nothing to group or others.
///
/// # Errors
/// [`SecurityError::InsecurePermissions`] when `mode & 0o077 != 0`;
/// [`SecurityError::Io`] when the file cannot be inspected.
pub fn check_private(path: &Path) -> Result<()> {
    let mode = std::fs::metadata(path)
        .map_err(io_err("inspect", path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(SecurityError::InsecurePermissions {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Reads a secret file after [`check_private`].
///
/// # Errors
/// As [`check_private`], or [`SecurityError::Io`] on read failure.
pub fn read_secret(path: &Path) -> Result<Vec<u8>> {
    check_private(path)?;
    std::fs::read(path).map_err(io_err("read", path))
}

/// The fields of a wrapped key file (module documentation).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WrappedKey {
    format: String,
    kdf: String,
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
    salt: String,
    nonce: String,
    ciphertext: String,
}

impl WrappedKey {
    /// The associated data: every field but the nonce and ciphertext.
    fn aad(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}",
            self.format, self.kdf, self.memory_kib, self.iterations, self.parallelism, self.salt
        )
    }
}

/// argon2id(passphrase, salt) with the given parameters: the 32-byte
/// key-encryption key.
fn kek(passphrase: &[u8], salt: &[u8], m: u32, t: u32, p: u32) -> Result<Zeroizing<[u8; 32]>> {
    let params = argon2::Params::new(m, t, p, Some(32))
        .map_err(|e| SecurityError::PasswordHash(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, salt, &mut out[..])
        .map_err(|e| SecurityError::PasswordHash(e.to_string()))?;
    Ok(out)
}

fn aead(kek: &[u8; 32]) -> Result<LessSafeKey> {
    let unbound = UnboundKey::new(&AES_256_GCM, kek)
        .map_err(|_| SecurityError::PasswordHash("cannot build the AES-256-GCM key".into()))?;
    Ok(LessSafeKey::new(unbound))
}

/// Wraps a 32-byte key with a passphrase: the text of a wrapped key file
/// (module documentation). A fresh random salt and nonce each time.
///
/// # Errors
/// [`SecurityError::Invalid`] for an empty passphrase or one longer than
/// [`MAX_PASSPHRASE_BYTES`]; [`SecurityError::PasswordHash`] when the KDF
/// fails.
pub fn wrap_key(key: &[u8; 32], passphrase: &[u8]) -> Result<String> {
    check_passphrase_length(passphrase)?;
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut w = WrappedKey {
        format: WRAPPED_KEY_FORMAT.into(),
        kdf: "argon2id".into(),
        memory_kib: WRAP_MEMORY_KIB,
        iterations: WRAP_ITERATIONS,
        parallelism: WRAP_PARALLELISM,
        salt: hex::encode(salt),
        nonce: hex::encode(nonce),
        ciphertext: String::new(),
    };
    let kek = kek(passphrase, &salt, w.memory_kib, w.iterations, w.parallelism)?;
    let mut buf = key.to_vec();
    aead(&kek)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(w.aad().as_bytes()),
            &mut buf,
        )
        .map_err(|_| SecurityError::PasswordHash("AES-256-GCM sealing failed".into()))?;
    w.ciphertext = hex::encode(&buf);
    let mut text = serde_json::to_string(&w)
        .map_err(|e| SecurityError::PasswordHash(format!("cannot encode the wrapped key: {e}")))?;
    text.push('\n');
    Ok(text)
}

/// Whether `text` looks like a wrapped key file (rather than, e.g., a hex
/// key): it is a JSON object naming [`WRAPPED_KEY_FORMAT`].
pub fn is_wrapped_key(text: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(text)
        .is_ok_and(|v| v["format"] == WRAPPED_KEY_FORMAT)
}

/// Unwraps the key of a wrapped key file's `text` with `passphrase`; `path`
/// only names the file in errors.
///
/// # Errors
/// [`SecurityError::WrongPassphrase`] when the passphrase (or the file) is
/// wrong; [`SecurityError::InvalidWrappedKey`] when the text is not a wrapped
/// key file or its KDF parameters are outside sane bounds (at most 1 GiB,
/// 16 passes, 16 lanes); [`SecurityError::Invalid`] for an empty or
/// too long passphrase.
pub fn unwrap_key(path: &Path, text: &[u8], passphrase: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
    check_passphrase_length(passphrase)?;
    let invalid = |detail: &str| SecurityError::InvalidWrappedKey {
        path: path.to_path_buf(),
        detail: detail.to_owned(),
    };
    let w: WrappedKey =
        serde_json::from_slice(text).map_err(|_| invalid("not the expected JSON object"))?;
    if w.format != WRAPPED_KEY_FORMAT || w.kdf != "argon2id" {
        return Err(invalid("unknown format or key derivation"));
    }
    if w.memory_kib > 1024 * 1024 || w.iterations > 16 || w.parallelism > 16 {
        return Err(invalid("key derivation parameters out of bounds"));
    }
    let salt = hex::decode(&w.salt).map_err(|_| invalid("salt is not hex"))?;
    let nonce: [u8; NONCE_LEN] = hex::decode(&w.nonce)
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or_else(|| invalid("nonce is not 12 bytes of hex"))?;
    let mut buf =
        Zeroizing::new(hex::decode(&w.ciphertext).map_err(|_| invalid("ciphertext is not hex"))?);
    if buf.len() != 32 + AES_256_GCM.tag_len() {
        return Err(invalid("ciphertext has the wrong length"));
    }
    let kek = kek(passphrase, &salt, w.memory_kib, w.iterations, w.parallelism)?;
    let plain = aead(&kek)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(w.aad().as_bytes()),
            &mut buf[..],
        )
        .map_err(|_| SecurityError::WrongPassphrase(path.to_path_buf()))?;
    let mut key = Zeroizing::new([0u8; 32]);
    if plain.len() != 32 {
        return Err(invalid("wrapped key is not 32 bytes"));
    }
    key.copy_from_slice(plain);
    Ok(key)
}

/// Reads a wrapped key file (after [`check_private`]) and unwraps it.
///
/// # Errors
/// As [`read_secret`] and [`unwrap_key`].
pub fn read_wrapped_key(path: &Path, passphrase: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
    let text = Zeroizing::new(read_secret(path)?);
    unwrap_key(path, &text, passphrase)
}

fn check_passphrase_length(passphrase: &[u8]) -> Result<()> {
    if passphrase.is_empty() || passphrase.len() > MAX_PASSPHRASE_BYTES {
        return Err(SecurityError::Invalid {
            what: "passphrase",
            detail: format!("must be 1 to {MAX_PASSPHRASE_BYTES} bytes long"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_key_round_trips_and_refuses_a_wrong_passphrase_or_an_altered_file() -> Result<()> {
        let key = [0x5a; 32];
        let text = wrap_key(&key, b"correct horse battery staple")?;
        assert!(is_wrapped_key(text.as_bytes()));
        assert!(!is_wrapped_key(hex::encode(key).as_bytes()));
        // Neither the key nor its hex form is in the file.
        assert!(!text.contains(&hex::encode(key)));
        let p = Path::new("master.key.wrapped");
        let back = unwrap_key(p, text.as_bytes(), b"correct horse battery staple")?;
        assert_eq!(*back, key);
        assert!(matches!(
            unwrap_key(p, text.as_bytes(), b"correct horse battery stapler"),
            Err(SecurityError::WrongPassphrase(_))
        ));
        // A KDF parameter lowered by someone with write access: the AAD
        // no longer matches, the unwrap fails.
        let weaker = text.replace("\"iterations\":3", "\"iterations\":1");
        assert_ne!(weaker, text);
        assert!(matches!(
            unwrap_key(p, weaker.as_bytes(), b"correct horse battery staple"),
            Err(SecurityError::WrongPassphrase(_))
        ));
        assert!(matches!(
            unwrap_key(p, b"0123", b"x"),
            Err(SecurityError::InvalidWrappedKey { .. })
        ));
        assert!(matches!(
            wrap_key(&key, b""),
            Err(SecurityError::Invalid { .. })
        ));
        // Two wraps of one key differ (fresh salt and nonce).
        assert_ne!(wrap_key(&key, b"pass")?, wrap_key(&key, b"pass")?);
        Ok(())
    }

    #[test]
    fn secret_is_0600_and_group_readable_is_refused() -> Result<()> {
        let dir = tempfile::tempdir().map_err(io_err("tempdir", Path::new("/tmp")))?;
        let p = dir.path().join("k");
        write_secret(&p, b"abc")?;
        let mode = std::fs::metadata(&p)
            .map(|m| m.permissions().mode() & 0o777)
            .ok();
        assert_eq!(mode, Some(0o600));
        assert_eq!(read_secret(&p)?, b"abc");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640))
            .map_err(io_err("chmod", &p))?;
        assert!(matches!(
            check_private(&p),
            Err(SecurityError::InsecurePermissions { mode: 0o640, .. })
        ));
        Ok(())
    }
}
