//! Where the keys live: the master key, the audit-signing key and the CA
//! key, and the passphrase that may wrap the master key.
//!
//! Three places, chosen by `[secrets] dir` in `bastion.toml`:
//!
//! | `[secrets] dir` | keys in | writable |
//! |---|---|---|
//! | absent (the embedded default) | `DATA/secrets/master.key`, `DATA/secrets/audit-signing.key`, `DATA/tls/ca.key` | yes |
//! | `"/etc/bastion/secrets"` (absolute, outside the data directory) | `DIR/master.key`, `DIR/audit-signing.key`, `DIR/ca.key` | yes |
//! | `"$CREDENTIALS_DIRECTORY"` | the same names in the directory systemd gives the service (`LoadCredential=`, `LoadCredentialEncrypted=`) | no: `init` refuses, naming the variable (`DataDir::init`) |
//!
//! Keys inside the data directory are the default so that a fresh `bastion
//! serve` needs no extra step, but a copy of that directory (a backup, a disk
//! image) then decrypts everything, and whoever can write there can forge
//! audit checkpoints and issue device certificates: `serve` and the posture
//! page warn ([`KeyPaths::inside_data_dir_warnings`]).
//!
//! The master key may instead be `master.key.wrapped`: wrapped by a
//! passphrase (argon2id + AES-256-GCM, `bastion_security::secrets::wrap_key`)
//! given at each start with `--passphrase-stdin` or `--passphrase-file`.
//! Any later secret file (e.g. database engine credentials) belongs in
//! [`KeyPaths::dir`] too.
//! Home-made path logic because no library knows this layout; the
//! cryptography is the security crate's (argon2, aws-lc-rs).

use std::{
    ffi::OsString,
    fmt,
    io::BufRead,
    path::{Component, Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context, Result};
use zeroize::Zeroizing;

/// File name of the plain master key (64 hex characters).
pub const MASTER_KEY: &str = "master.key";
/// File name of the passphrase-wrapped master key.
pub const MASTER_KEY_WRAPPED: &str = "master.key.wrapped";
/// File name of the Ed25519 audit-signing key (PKCS#8 PEM).
pub const AUDIT_KEY: &str = "audit-signing.key";
/// File name of the CA private key (PEM).
pub const CA_KEY: &str = "ca.key";
/// The environment variable systemd sets to the service's credentials
/// directory (systemd.exec(5), "Credentials").
pub const CREDENTIALS_VAR: &str = "CREDENTIALS_DIRECTORY";
/// The `[secrets] dir` value that selects the systemd credentials directory.
pub const CREDENTIALS_VALUE: &str = "$CREDENTIALS_DIRECTORY";

/// Which of the three places holds the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// Inside the data directory (no `[secrets]`): the embedded default.
    DataDir,
    /// A key directory outside the data directory (`[secrets] dir = "/…"`).
    Dir,
    /// The systemd credentials directory (read-only).
    Credentials,
}

/// The paths of the key files, resolved once per command.
#[derive(Debug, Clone)]
pub struct KeyPaths {
    /// Where they are.
    pub source: KeySource,
    /// The key directory (for [`KeySource::DataDir`]: `DATA/secrets`).
    pub dir: PathBuf,
    /// The plain master key.
    pub master: PathBuf,
    /// The passphrase-wrapped master key.
    pub master_wrapped: PathBuf,
    /// The audit-signing key.
    pub audit: PathBuf,
    /// The CA key.
    pub ca: PathBuf,
}

impl KeyPaths {
    /// The embedded default: `DATA/secrets/…` and `DATA/tls/ca.key`.
    pub fn in_data_dir(root: &Path) -> KeyPaths {
        let dir = root.join("secrets");
        KeyPaths {
            source: KeySource::DataDir,
            master: dir.join(MASTER_KEY),
            master_wrapped: dir.join(MASTER_KEY_WRAPPED),
            audit: dir.join(AUDIT_KEY),
            ca: root.join("tls").join(CA_KEY),
            dir,
        }
    }

    fn in_dir(dir: &Path, source: KeySource) -> KeyPaths {
        KeyPaths {
            source,
            dir: dir.to_path_buf(),
            master: dir.join(MASTER_KEY),
            master_wrapped: dir.join(MASTER_KEY_WRAPPED),
            audit: dir.join(AUDIT_KEY),
            ca: dir.join(CA_KEY),
        }
    }

    /// The key paths for a data directory at `root` whose `[secrets] dir` is
    /// `configured`; `credentials` is the value of `$CREDENTIALS_DIRECTORY`
    /// (passed in rather than read here, so that tests need not change the
    /// process environment).
    ///
    /// # Errors
    /// `"$CREDENTIALS_DIRECTORY"` while the variable is unset or empty; a
    /// relative directory.
    pub fn resolve(
        root: &Path,
        configured: Option<&str>,
        credentials: Option<OsString>,
    ) -> Result<KeyPaths> {
        match configured {
            None => Ok(KeyPaths::in_data_dir(root)),
            Some(CREDENTIALS_VALUE) => {
                let Some(dir) = credentials.filter(|d| !d.is_empty()) else {
                    bail!(
                        "bastion.toml says [secrets] dir = \"{CREDENTIALS_VALUE}\" but ${CREDENTIALS_VAR} is not set: \
                         run Bastion as a systemd service with LoadCredential= (README, \"Where the keys live\")"
                    );
                };
                Ok(KeyPaths::in_dir(Path::new(&dir), KeySource::Credentials))
            }
            Some(dir) => {
                let dir = Path::new(dir);
                if !dir.is_absolute() {
                    bail!(
                        "[secrets] dir = {dir:?} must be an absolute path (or \"{CREDENTIALS_VALUE}\")"
                    );
                }
                Ok(KeyPaths::in_dir(dir, KeySource::Dir))
            }
        }
    }

    /// One warning line per key file that sits inside the data directory
    /// `root` (compared after resolving symbolic links), saying what a copy
    /// of the directory gives away. With the keys kept elsewhere, a key file
    /// left at its default place in the data directory (a copy forgotten
    /// when the keys were moved) is reported too. A passphrase-wrapped master
    /// key is not reported: a copy of it is useless without the passphrase.
    pub fn inside_data_dir_warnings(&self, root: &Path) -> Vec<String> {
        let resolved_root = resolved(root);
        let default = KeyPaths::in_data_dir(root);
        let mut out = Vec::new();
        for (name, consequence, here, there) in [
            (
                "master key",
                "a copy of the data directory (a backup, a disk image) decrypts every image and database",
                &self.master,
                &default.master,
            ),
            (
                "audit signing key",
                "whoever can write to the data directory can forge audit checkpoints",
                &self.audit,
                &default.audit,
            ),
            (
                "CA key",
                "whoever holds a copy of the data directory can issue device certificates",
                &self.ca,
                &default.ca,
            ),
        ] {
            let mut paths = vec![here];
            if self.source != KeySource::DataDir {
                paths.push(there);
            }
            for path in paths {
                if path.exists() && resolved(path).starts_with(&resolved_root) {
                    out.push(format!(
                        "the {name} ({}) is inside the data directory: {consequence}; move the keys out \
                         (`bastion secrets move --to DIR`; README, \"Where the keys live\")",
                        path.display()
                    ));
                }
            }
        }
        out
    }
}

/// Refuses a key directory `secrets` (given with the option `flag`) inside
/// the data directory `root` (or the data directory inside it, or both the
/// same), comparing absolute paths with symbolic links resolved as far as
/// the paths exist.
///
/// # Errors
/// The two overlap.
pub fn check_outside(root: &Path, secrets: &Path, flag: &str) -> Result<()> {
    let (r, s) = (resolved(root), resolved(secrets));
    if s.starts_with(&r) {
        bail!(
            "refusing {flag} {}: it is inside the data directory {}, where a copy of the data would carry the keys; choose a directory outside it (e.g. /etc/bastion/secrets)",
            secrets.display(),
            root.display()
        );
    }
    if r.starts_with(&s) {
        bail!(
            "refusing {flag} {}: the data directory {} is inside it; choose a separate directory (e.g. /etc/bastion/secrets)",
            secrets.display(),
            root.display()
        );
    }
    Ok(())
}

/// `p` made absolute, with its longest existing ancestor's symbolic links
/// resolved and `.`/`..` of the rest removed lexically.
pub fn resolved(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    for ancestor in abs.ancestors() {
        let Ok(mut out) = ancestor.canonicalize() else {
            continue;
        };
        let Ok(tail) = abs.strip_prefix(ancestor) else {
            continue;
        };
        for part in tail.components() {
            match part {
                Component::ParentDir => {
                    out.pop();
                }
                Component::CurDir => {}
                other => out.push(other.as_os_str()),
            }
        }
        return out;
    }
    abs
}

/// A passphrase given on the command line's behalf (stdin or a file); zeroed
/// when dropped, never shown by `Debug`.
#[derive(Clone)]
pub struct Passphrase(Arc<Zeroizing<Vec<u8>>>);

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

impl Passphrase {
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Reads the first line of `input` (at most
    /// `bastion_security::secrets::MAX_PASSPHRASE_BYTES` bytes, the line end
    /// removed; reading stops at the line end, so a terminal needs no
    /// end-of-file). `from` names the source in errors.
    ///
    /// # Errors
    /// Unreadable, empty, or too long.
    pub fn read(input: impl BufRead, from: &str) -> Result<Passphrase> {
        let max = bastion_security::secrets::MAX_PASSPHRASE_BYTES;
        let mut line = Zeroizing::new(Vec::with_capacity(max + 2));
        input
            .take(u64::try_from(max).unwrap_or(u64::MAX) + 2)
            .read_until(b'\n', &mut line)
            .with_context(|| format!("cannot read the passphrase from {from}"))?;
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            bail!("the passphrase from {from} is empty");
        }
        if line.len() > max {
            bail!("the passphrase from {from} is longer than {max} bytes");
        }
        Ok(Passphrase(Arc::new(line)))
    }

    /// Reads the passphrase from a file that must be private (mode 0600 or
    /// 0400, e.g. a systemd credential).
    ///
    /// # Errors
    /// As [`bastion_security::secrets::read_secret`] and [`Passphrase::read`].
    pub fn from_file(path: &Path) -> Result<Passphrase> {
        let bytes = Zeroizing::new(bastion_security::secrets::read_secret(path)?);
        Passphrase::read(&bytes[..], &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_is_inside_the_data_dir_and_warned_about() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = tmp.path().join("data");
        let k = KeyPaths::resolve(&root, None, Some("/run/creds".into()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(k.source, KeySource::DataDir);
        assert_eq!(k.master, root.join("secrets/master.key"));
        assert_eq!(k.audit, root.join("secrets/audit-signing.key"));
        assert_eq!(k.ca, root.join("tls/ca.key"));
        // No file yet: nothing to warn about.
        assert!(k.inside_data_dir_warnings(&root).is_empty());
        for p in [&k.master, &k.audit, &k.ca] {
            std::fs::create_dir_all(p.parent().unwrap_or(&root)).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(p, b"k").unwrap_or_else(|e| panic!("{e}"));
        }
        let w = k.inside_data_dir_warnings(&root);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].starts_with("the master key"), "{w:?}");
        assert!(w[1].starts_with("the audit signing key"), "{w:?}");
        assert!(w[2].starts_with("the CA key"), "{w:?}");
    }

    #[test]
    fn a_key_dir_outside_is_not_warned_about_and_one_inside_is_refused() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = tmp.path().join("data");
        let outside = tmp.path().join("keys");
        std::fs::create_dir_all(&outside).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("{e}"));
        let k = KeyPaths::resolve(&root, outside.to_str(), None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(k.source, KeySource::Dir);
        assert_eq!(k.ca, outside.join("ca.key"));
        for p in [&k.master, &k.audit, &k.ca] {
            std::fs::write(p, b"k").unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(k.inside_data_dir_warnings(&root).is_empty());
        // A copy left at the default place is still reported.
        let left = KeyPaths::in_data_dir(&root).ca;
        std::fs::create_dir_all(root.join("tls")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&left, b"k").unwrap_or_else(|e| panic!("{e}"));
        let w = k.inside_data_dir_warnings(&root);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(&format!("the CA key ({})", left.display())),
            "{w:?}"
        );
        assert!(check_outside(&root, &outside, "--secrets-dir").is_ok());
        // Inside, by a plain path, through `..`, through a symbolic link; the same dir.
        assert!(check_outside(&root, &root.join("keys"), "--secrets-dir").is_err());
        assert!(check_outside(&root, &outside.join("../data/k"), "--secrets-dir").is_err());
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&root, &link).unwrap_or_else(|e| panic!("{e}"));
        assert!(check_outside(&root, &link.join("keys"), "--secrets-dir").is_err());
        assert!(check_outside(&root, &root, "--secrets-dir").is_err());
        assert!(check_outside(&root, tmp.path(), "--secrets-dir").is_err());
        // A relative [secrets] dir is refused.
        assert!(KeyPaths::resolve(&root, Some("keys"), None).is_err());
    }

    #[test]
    fn credentials_need_the_variable() {
        let root = Path::new("/var/lib/bastion");
        let err = KeyPaths::resolve(root, Some(CREDENTIALS_VALUE), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("$CREDENTIALS_DIRECTORY is not set"), "{err}");
        let k = KeyPaths::resolve(
            root,
            Some(CREDENTIALS_VALUE),
            Some("/run/credentials/bastion.service".into()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(k.source, KeySource::Credentials);
        assert_eq!(
            k.master,
            Path::new("/run/credentials/bastion.service/master.key")
        );
        assert_eq!(k.ca, Path::new("/run/credentials/bastion.service/ca.key"));
        // An empty variable is no directory.
        assert!(KeyPaths::resolve(root, Some(CREDENTIALS_VALUE), Some("".into())).is_err());
    }

    #[test]
    fn passphrase_is_the_first_line_and_never_debug_printed() {
        let p = Passphrase::read(&b"s3cret words\r\nignored\n"[..], "stdin")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.bytes(), b"s3cret words");
        assert_eq!(format!("{p:?}"), "Passphrase(..)");
        assert!(Passphrase::read(&b"\n"[..], "stdin").is_err());
        let long = vec![b'a'; bastion_security::secrets::MAX_PASSPHRASE_BYTES + 1];
        assert!(Passphrase::read(&long[..], "stdin").is_err());
    }
}
