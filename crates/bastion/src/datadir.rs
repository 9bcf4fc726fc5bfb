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
//!   audit/records checkpoints lock   tamper-evident audit trail (encrypted, hash-chained, signed checkpoints)
//! ```

use std::{
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context, Result};
use bastion_archive::{Archive, Limits};
use bastion_index::Index;
use bastion_security::{
    audit::{AuditIdentity, AuditKeys, AuditTrail, CheckpointPolicy},
    db::SecurityDb,
    events::{EventLog, Outcome},
    pki, secrets, users,
};
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
    /// `audit/`: the audit trail.
    pub fn audit_dir(&self) -> PathBuf {
        self.root.join("audit")
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

    /// The audit trail's keys: AES-256-GCM derived from the master key
    /// (`bastion audit v1`), the Ed25519 checkpoint key from its own file.
    pub fn audit_keys(&self, master: &MasterKey) -> Result<Arc<AuditKeys>> {
        let key = master.derive("bastion audit v1");
        Ok(Arc::new(AuditKeys::load(&key, &self.audit_key())?))
    }

    /// Opens the event log with the audit trail attached: every event
    /// recorded through it is appended to `audit/` too. Fails when the trail
    /// or its signing key is missing (never re-created here).
    pub fn open_events(
        &self,
        master: &MasterKey,
        config: &Config,
    ) -> Result<(Arc<EventLog>, Arc<AuditTrail>)> {
        let events = Arc::new(EventLog::open(&self.events())?);
        let trail = Arc::new(
            AuditTrail::open(
                &self.audit_dir(),
                self.audit_keys(master)?,
                audit_identity(config),
                CheckpointPolicy::default(),
            )
            .context("cannot open the audit trail")?,
        );
        events.add_observer(trail.clone());
        Ok((events, trail))
    }

    /// Opens the blob store, index and event log (with the audit trail) as
    /// one [`Archive`].
    pub fn open_archive(&self, master: &MasterKey, config: &Config) -> Result<Arc<Archive>> {
        let (events, trail) = self.open_events(master, config)?;
        let archive = self.open_archive_with(master, config, events)?;
        crate::audit_cli::attach_lookup(&trail, &archive);
        Ok(archive)
    }

    /// Opens the blob store and index as one [`Archive`] recording to `events`.
    pub fn open_archive_with(
        &self,
        master: &MasterKey,
        config: &Config,
        events: Arc<EventLog>,
    ) -> Result<Arc<Archive>> {
        let store =
            BlobStore::open(&self.blobs(), master.clone()).context("cannot open the blob store")?;
        let key = master.derive("bastion index v1");
        let index = Index::open(&self.index_db(), &key)
            .with_context(|| format!("cannot open {}", self.index_db().display()))?;
        let l = &config.limits;
        let limits = Limits {
            max_dataset_bytes: l.max_dataset_bytes,
            max_element_bytes: l.max_element_bytes,
            max_inflated_bytes: l.max_inflated_bytes,
            max_sequence_depth: l.max_sequence_depth,
            max_concurrent_parses: l.max_concurrent_parses,
            memory_budget_bytes: l.memory_budget_mib.saturating_mul(1 << 20),
            transfer_budget_bytes: l.transfer_budget_mib.saturating_mul(1 << 20),
        };
        Ok(Arc::new(Archive::new(
            Arc::new(store),
            Arc::new(index),
            events,
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
        drop(AuditTrail::create(
            &self.audit_dir(),
            self.audit_keys(&master)?,
            audit_identity(config),
            CheckpointPolicy::default(),
        )?);
        let archive = self.open_archive(&master, config)?;
        archive.events().record(
            "audit.started",
            Outcome::Success,
            serde_json::json!({"actor": "cli", "detail": "audit trail created by init"}),
        );
        drop(archive);
        std::fs::write(self.config(), config.render()).context("cannot write bastion.toml")?;
        println!("Initialised Bastion data directory {}", self.root.display());
        println!("Initial admin password for user 'admin': {password}");
        println!(
            "(shown once; also in {} (mode 0600), deleted when the admin password is first changed)",
            self.admin_password().display()
        );
        println!(
            "Clients must trust the CA certificate {}",
            self.pki().ca_cert.display()
        );
        Ok(())
    }
}

/// Who we are in audit messages: our AE title, and `AE@hostname` as the
/// audit source.
pub fn audit_identity(config: &Config) -> AuditIdentity {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    AuditIdentity {
        ae_title: config.dicom.ae_title.clone(),
        source_id: format!("{}@{host}", config.dicom.ae_title),
    }
}
