//! The data directory: layout, first-start initialisation (no default
//! credentials anywhere), and opening the archive on it.
//!
//! ```text
//! DIR/                       0700
//!   bastion.toml             settings (written last by init: its presence marks a complete init)
//!   secrets/master.key       0600, 256-bit master key (hex)
//!   secrets/audit-signing.key 0600, Ed25519 PKCS#8 PEM
//!   tls/ca.crt ca.key server.crt server.key   (keys 0600)
//!   initial-admin-password   0600, shown once
//!   security.db              devices, users (SQLCipher)
//!   index.db                 patient/study/series/instance index (SQLCipher)
//!   blobs/                   encrypted instances
//!   events/events.log        security event log (no patient data)
//! ```

use std::{
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context, Result};
use bastion_archive::{Archive, Limits};
use bastion_index::Index;
use bastion_security::{db::SecurityDb, events::EventLog, pki, secrets, users};
use bastion_store::{BlobStore, MasterKey};

use crate::config::Config;

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    /// The root.
    pub root: PathBuf,
}

impl DataDir {
    /// Wraps a path.
    pub fn new(root: &Path) -> DataDir {
        DataDir {
            root: root.to_path_buf(),
        }
    }
    /// `bastion.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join("bastion.toml")
    }
    /// `secrets/master.key`.
    pub fn master_key(&self) -> PathBuf {
        self.root.join("secrets/master.key")
    }
    /// `secrets/audit-signing.key`.
    pub fn audit_key(&self) -> PathBuf {
        self.root.join("secrets/audit-signing.key")
    }
    /// `initial-admin-password`.
    pub fn admin_password(&self) -> PathBuf {
        self.root.join("initial-admin-password")
    }
    /// `security.db`.
    pub fn security_db(&self) -> PathBuf {
        self.root.join("security.db")
    }
    /// `index.db`.
    pub fn index_db(&self) -> PathBuf {
        self.root.join("index.db")
    }
    /// `blobs/`.
    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }
    /// `events/events.log`.
    pub fn events(&self) -> PathBuf {
        self.root.join("events/events.log")
    }
    /// TLS file paths.
    pub fn pki(&self) -> pki::PkiPaths {
        pki::PkiPaths::new(&self.root)
    }
    /// Whether `init` completed here.
    pub fn is_initialised(&self) -> bool {
        self.config().exists()
    }

    /// Every secret file that must be 0600.
    fn secret_files(&self) -> Vec<PathBuf> {
        let p = self.pki();
        let mut v = vec![self.master_key(), self.audit_key(), p.ca_key, p.server_key];
        if self.admin_password().exists() {
            v.push(self.admin_password());
        }
        v
    }

    /// Refuses to go on when a secret file is readable by others.
    pub fn check_secret_permissions(&self) -> Result<()> {
        for f in self.secret_files() {
            secrets::check_private(&f)
                .with_context(|| "refusing to start: a secret file is not private")?;
        }
        Ok(())
    }

    /// Loads the master key.
    pub fn load_master_key(&self) -> Result<MasterKey> {
        MasterKey::load_hex_file(&self.master_key())
            .with_context(|| format!("cannot load {}", self.master_key().display()))
    }

    /// Opens the security database.
    pub fn open_security(&self, master: &MasterKey) -> Result<SecurityDb> {
        let key = master.derive("bastion security db v1");
        SecurityDb::open(&self.security_db(), &key)
            .with_context(|| format!("cannot open {}", self.security_db().display()))
    }

    /// Opens the blob store, index and event log as one [`Archive`].
    pub fn open_archive(&self, master: &MasterKey, config: &Config) -> Result<Arc<Archive>> {
        let store =
            BlobStore::open(&self.blobs(), master.clone()).context("cannot open the blob store")?;
        let key = master.derive("bastion index v1");
        let index = Index::open(&self.index_db(), &key)
            .with_context(|| format!("cannot open {}", self.index_db().display()))?;
        let events = EventLog::open(&self.events())?;
        let l = &config.limits;
        let limits = Limits {
            max_dataset_bytes: l.max_dataset_bytes,
            max_element_bytes: l.max_element_bytes,
            max_inflated_bytes: l.max_inflated_bytes,
            max_sequence_depth: l.max_sequence_depth,
            max_concurrent_parses: l.max_concurrent_parses,
        };
        Ok(Arc::new(Archive::new(
            Arc::new(store),
            Arc::new(index),
            Arc::new(events),
            limits,
        )))
    }

    /// Requires a completed `init`.
    pub fn require_initialised(&self) -> Result<()> {
        if !self.is_initialised() {
            bail!(
                "{} is not an initialised Bastion data directory: run `bastion init --data {}` (or `bastion serve`, which initialises an empty one)",
                self.root.display(),
                self.root.display()
            );
        }
        Ok(())
    }

    /// First-start initialisation. Prints the admin password once.
    pub fn init(&self, config: &Config) -> Result<()> {
        if self.is_initialised() {
            bail!(
                "{} is already initialised; refusing to overwrite its keys",
                self.root.display()
            );
        }
        if self.root.exists()
            && std::fs::read_dir(&self.root)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false)
        {
            bail!(
                "{} is not empty but has no bastion.toml (an interrupted init?): move it away or choose another --data",
                self.root.display()
            );
        }
        let mkdir = |p: &Path| {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(p)
                .with_context(|| format!("cannot create {}", p.display()))
        };
        mkdir(&self.root)?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))?;
        mkdir(&self.root.join("secrets"))?;
        mkdir(&self.root.join("tls"))?;
        mkdir(&self.root.join("events"))?;

        let master = MasterKey::generate();
        master
            .write_hex_file(&self.master_key())
            .context("cannot write the master key")?;
        let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let pem = ed25519_dalek::pkcs8::EncodePrivateKey::to_pkcs8_pem(
            &signing,
            ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF,
        )
        .map_err(|e| anyhow::anyhow!("cannot encode the audit signing key: {e}"))?;
        secrets::write_secret(&self.audit_key(), pem.as_bytes())?;

        let mut hosts = Vec::new();
        for addr in [Some(config.dicom.tls_addr), config.dicom.plain_addr]
            .into_iter()
            .flatten()
        {
            if !addr.ip().is_unspecified() {
                hosts.push(addr.ip().to_string());
            }
        }
        pki::generate(&self.pki(), &hosts)
            .context("cannot create the private CA and server certificate")?;

        let security = self.open_security(&master)?;
        let password = users::generate_password();
        users::create_user(&security, "admin", &password, "admin")?;
        secrets::write_secret(&self.admin_password(), format!("{password}\n").as_bytes())?;
        drop(self.open_archive(&master, config)?);
        std::fs::write(self.config(), config.render()).context("cannot write bastion.toml")?;
        println!("Initialised Bastion data directory {}", self.root.display());
        println!("Initial admin password for user 'admin': {password}");
        println!(
            "(shown once; also in {} (mode 0600): delete it after saving the password elsewhere)",
            self.admin_password().display()
        );
        println!(
            "Clients must trust the CA certificate {}",
            self.pki().ca_cert.display()
        );
        Ok(())
    }
}
