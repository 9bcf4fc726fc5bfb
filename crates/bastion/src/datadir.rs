//! The data directory: layout, first-start initialisation (no default
//! credentials anywhere), and opening the archive on it.
//!
//! ```text
//! DIR/                       0700
//!   bastion.toml             settings (written last by init: its presence marks a complete init)
//!   secrets/master.key       0600, 256-bit master key (hex), or master.key.wrapped (passphrase)
//!   secrets/audit-signing.key 0600, Ed25519 PKCS#8 PEM
//!   tls/ca.crt ca.key server.crt server.key   (keys 0600)
//!     (secrets/ and tls/ca.key are elsewhere with `[secrets] dir`: crate::keys)
//!   initial-admin-password   0600, shown once
//!   security.db              devices, users (SQLCipher)
//!   index.db                 patient/study/series/instance index (SQLCipher)
//!   blobs/                   encrypted instances
//!   events/events.log        security event log (no patient data)
//!   audit/records checkpoints lock   tamper-evident audit trail (encrypted, hash-chained, signed checkpoints)
//! ```

use std::{
    ffi::OsString,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use anyhow::{anyhow, bail, Context, Result};
use bastion_archive::{Archive, Limits};
use bastion_index::{Index, PgConnect};
use bastion_security::{
    audit::{AuditIdentity, AuditKeys, AuditTrail, CheckpointPolicy},
    db::SecurityDb,
    events::{EventLog, Outcome},
    pki, secrets, users,
};
use bastion_store::{BlobStore, MasterKey, S3Credentials, S3Location};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use zeroize::Zeroizing;

use crate::{
    config::Config,
    keys::{self, KeyPaths, KeySource, Passphrase},
};

/// Paths inside a data directory, where its keys are ([`KeyPaths`]), and
/// the passphrase given for a wrapped master key.
#[derive(Debug, Clone)]
pub struct DataDir {
    /// The root.
    pub root: PathBuf,
    keys: KeyPaths,
    passphrase: Option<Passphrase>,
    /// The master key once loaded (unwrapping costs an argon2id run).
    master: Arc<OnceLock<MasterKey>>,
}

/// What [`DataDir::lock_serve`] holds: released when dropped (or the
/// process ends).
#[derive(Debug)]
pub struct ServeLock {
    _file: std::fs::File,
    _dir: std::fs::File,
}

/// The secrets file holding the S3 access key id and secret (two lines, 0600).
pub const STORE_CREDENTIALS: &str = "store-credentials";

impl DataDir {
    /// Takes the lock one `bastion serve` holds while it runs (released when
    /// the process exits, however it exits): an advisory lock (flock) on the
    /// data directory itself, which commands that must not run beside
    /// `serve` but must not write the directory either (`bastion migrate`)
    /// take too ([`DataDir::lock_dir`]), and on `DIR/serve.lock` (kept for
    /// the versions that locked only that file). `None` when another process
    /// holds either.
    ///
    /// # Errors
    /// The directory or the lock file cannot be opened.
    pub fn lock_serve(&self) -> Result<Option<ServeLock>> {
        let Some(dir) = self.lock_dir()? else {
            return Ok(None);
        };
        let lock_path = self.root.join("serve.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        Ok(lock.try_lock().is_ok().then_some(ServeLock {
            _file: lock,
            _dir: dir,
        }))
    }

    /// The advisory lock on the data directory itself (no file is created):
    /// `None` when another process (a running `serve`) holds it.
    ///
    /// # Errors
    /// The directory cannot be opened.
    pub fn lock_dir(&self) -> Result<Option<std::fs::File>> {
        let dir = std::fs::File::open(&self.root)
            .with_context(|| format!("cannot open {}", self.root.display()))?;
        Ok(dir.try_lock().is_ok().then_some(dir))
    }

    /// Wraps a path, keys in the data directory (the embedded default), no
    /// passphrase.
    pub fn new(root: &Path) -> DataDir {
        DataDir {
            root: root.to_path_buf(),
            keys: KeyPaths::in_data_dir(root),
            passphrase: None,
            master: Arc::default(),
        }
    }

    /// The data directory at `root` with its keys where its `bastion.toml`
    /// says (`[secrets] dir`; the embedded default before `init`);
    /// `credentials` is `$CREDENTIALS_DIRECTORY`.
    ///
    /// # Errors
    /// An unreadable `bastion.toml`, or `[secrets] dir` unusable
    /// ([`KeyPaths::resolve`]).
    pub fn open(
        root: &Path,
        passphrase: Option<Passphrase>,
        credentials: Option<OsString>,
    ) -> Result<DataDir> {
        let mut dir = DataDir::new(root);
        dir.passphrase = passphrase;
        if dir.is_initialised() {
            let config = Config::load(&dir.config())?;
            dir.keys = KeyPaths::resolve(root, config.secrets.dir.as_deref(), credentials)?;
        }
        Ok(dir)
    }

    /// The same data directory opened again (after its `bastion.toml`
    /// changed), with the same passphrase and loaded master key.
    ///
    /// # Errors
    /// As [`DataDir::open`].
    pub fn reopen(&self) -> Result<DataDir> {
        let mut dir = DataDir::open(
            &self.root,
            self.passphrase.clone(),
            std::env::var_os(keys::CREDENTIALS_VAR),
        )?;
        dir.master = self.master.clone();
        Ok(dir)
    }

    /// Where the keys are.
    pub fn keys(&self) -> &KeyPaths {
        &self.keys
    }
    /// `bastion.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join("bastion.toml")
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
    /// TLS file paths: certificates and the server key under `tls/`, the CA
    /// key where the keys are.
    pub fn pki(&self) -> pki::PkiPaths {
        let mut p = pki::PkiPaths::new(&self.root);
        p.ca_key = self.keys.ca.clone();
        p
    }
    /// Whether `init` completed here.
    pub fn is_initialised(&self) -> bool {
        self.config().exists()
    }

    /// The master key file in use: the wrapped one when it exists.
    fn master_key_file(&self) -> &Path {
        if self.keys.master_wrapped.exists() {
            &self.keys.master_wrapped
        } else {
            &self.keys.master
        }
    }

    /// Every secret file that must be 0600.
    fn secret_files(&self) -> Vec<PathBuf> {
        let p = self.pki();
        let mut v = vec![
            self.master_key_file().to_path_buf(),
            self.keys.audit.clone(),
            p.ca_key,
            p.server_key,
        ];
        if self.admin_password().exists() {
            v.push(self.admin_password());
        }
        v
    }

    /// Refuses to go on when a key is missing (with where it was looked
    /// for and why) or a secret file is readable by others.
    pub fn check_secret_permissions(&self) -> Result<()> {
        for (what, path) in [
            ("master key", self.master_key_file()),
            ("audit signing key", &self.keys.audit),
            ("CA key", &self.keys.ca),
        ] {
            if !path.exists() {
                return Err(self.missing_key(what, path));
            }
        }
        for f in self.secret_files() {
            secrets::check_private(&f)
                .with_context(|| "refusing to start: a secret file is not private")?;
        }
        Ok(())
    }

    /// The error for a missing key file, saying where keys are kept.
    fn missing_key(&self, what: &str, path: &Path) -> anyhow::Error {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match self.keys.source {
            KeySource::DataDir => anyhow!("the {what} {} is missing", path.display()),
            KeySource::Dir => anyhow!(
                "the {what} {} is missing: this data directory keeps its keys in {} ([secrets] dir in {}){}; \
                 a copy of the data directory alone cannot be opened: restore or mount the key directory",
                path.display(),
                self.keys.dir.display(),
                self.config().display(),
                if self.keys.dir.is_dir() { "" } else { ", which does not exist" }
            ),
            KeySource::Credentials => anyhow!(
                "the {what} {name} is missing from ${} ({}): pass it with LoadCredential={name}:/path/to/{name} in the service unit",
                keys::CREDENTIALS_VAR,
                self.keys.dir.display()
            ),
        }
    }

    /// Loads the master key: `master.key` (hex), or `master.key.wrapped`
    /// unwrapped with the passphrase given (`--passphrase-stdin`,
    /// `--passphrase-file`). Loaded once per command.
    ///
    /// # Errors
    /// Missing or unreadable key; a wrapped key without a passphrase, or
    /// with a wrong one; a passphrase given for a key that is not wrapped.
    pub fn load_master_key(&self) -> Result<MasterKey> {
        if let Some(k) = self.master.get() {
            return Ok(k.clone());
        }
        let (plain, wrapped) = (&self.keys.master, &self.keys.master_wrapped);
        let key = match (plain.exists(), wrapped.exists(), &self.passphrase) {
            (true, true, _) => bail!(
                "both {} and {} exist: keep only one master key",
                plain.display(),
                wrapped.display()
            ),
            (false, true, None) => bail!(
                "the master key {} is wrapped by a passphrase: give it with --passphrase-stdin or --passphrase-file FILE",
                wrapped.display()
            ),
            (false, true, Some(p)) => {
                let bytes = secrets::read_wrapped_key(wrapped, p.bytes())?;
                MasterKey::from_bytes(*bytes)
            }
            (true, false, Some(_)) => bail!(
                "a passphrase was given but the master key {} is not wrapped by one",
                plain.display()
            ),
            (true, false, None) => MasterKey::load_hex_file(plain)
                .with_context(|| format!("cannot load {}", plain.display()))?,
            (false, false, _) => return Err(self.missing_key("master key", plain)),
        };
        Ok(self.master.get_or_init(|| key).clone())
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
        Ok(Arc::new(AuditKeys::load(&key, &self.keys.audit)?))
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
        let store = self.open_store(master, config)?;
        let index = self.open_index(master, config)?;
        let l = &config.limits;
        let limits = Limits {
            max_dataset_bytes: l.max_dataset_bytes,
            max_element_bytes: l.max_element_bytes,
            max_inflated_bytes: l.max_inflated_bytes,
            max_sequence_depth: l.max_sequence_depth,
            max_concurrent_parses: l.max_concurrent_parses,
            memory_budget_bytes: l.memory_budget_mib.saturating_mul(1 << 20),
            transfer_budget_bytes: l.transfer_budget_mib.saturating_mul(1 << 20),
            spool_budget_bytes: l.spool_budget_mib.saturating_mul(1 << 20),
        };
        let archive = Archive::new(Arc::new(store), Arc::new(index), events, limits);
        archive.set_spool_dir(self.root.join("spool").join("ingest"));
        Ok(Arc::new(archive))
    }

    /// Opens the blob store: the bucket `[store] url` names, checked now (listed,
    /// a probe object written and deleted) so that wrong credentials or a missing
    /// bucket stop the command with a message naming the setting; else the
    /// directory `DIR/blobs`.
    pub fn open_store(&self, master: &MasterKey, config: &Config) -> Result<BlobStore> {
        let Some(url) = &config.store.url else {
            return BlobStore::open(&self.blobs(), master.clone())
                .context("cannot open the blob store");
        };
        let location = S3Location::parse(url)
            .with_context(|| format!("[store] url in {}", self.config().display()))?;
        let (credentials, from) = self.store_credentials()?;
        let store = BlobStore::open_s3(&location, credentials, master.clone(), Vec::new())
            .with_context(|| format!("[store] url in {}", self.config().display()))?;
        store.check().map_err(|e| {
            anyhow!(
                "cannot use the object store of [store] url in {} ({location}) with the credentials from {from}: {e}",
                self.config().display()
            )
        })?;
        Ok(store)
    }

    /// The S3 credentials: `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY`, else the
    /// secrets file `store-credentials` (must be 0600); with where they came from
    /// (never their values).
    pub(crate) fn store_credentials(&self) -> Result<(S3Credentials, String)> {
        let id = std::env::var("AWS_ACCESS_KEY_ID").ok();
        let secret = std::env::var("AWS_SECRET_ACCESS_KEY")
            .ok()
            .map(Zeroizing::new);
        let file = self.keys.dir.join(STORE_CREDENTIALS);
        match (id, secret) {
            (Some(id), Some(secret)) => Ok((
                S3Credentials::new(&id, &secret)
                    .context("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")?,
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY".to_owned(),
            )),
            (Some(_), None) | (None, Some(_)) => bail!(
                "[store] url needs both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (only one is set), or neither and the file {}",
                file.display()
            ),
            (None, None) => {
                if !file.exists() {
                    bail!(
                        "[store] url names an object store but no credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write {} (two lines: access key id, secret; mode 0600)",
                        file.display()
                    );
                }
                let bytes = Zeroizing::new(
                    secrets::read_secret(&file)
                        .context("refusing to use the S3 credentials file")?,
                );
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| anyhow!("{} is not UTF-8 text", file.display()))?;
                let creds = S3Credentials::from_file_text(text)
                    .with_context(|| format!("{}", file.display()))?;
                Ok((creds, file.display().to_string()))
            }
        }
    }

    /// Opens the index where `[index]` says: the SQLCipher file in the data
    /// directory, or PostgreSQL (`[index] url`, password from `PGPASSWORD`
    /// or the secrets file `index-password`, TLS roots from `[index] ca`).
    /// Errors name the setting, never the password.
    pub fn open_index(&self, master: &MasterKey, config: &Config) -> Result<Index> {
        let key = master.derive("bastion index v1");
        let Some(url) = &config.index.url else {
            return Index::open(&self.index_db(), &key)
                .with_context(|| format!("cannot open {}", self.index_db().display()));
        };
        let mut connect = PgConnect::new(url);
        if let Some(schema) = &config.index.schema {
            connect.schema = schema.clone();
        }
        let file = self.keys.dir.join(crate::config::INDEX_PASSWORD_FILE);
        let (password, from) = match std::env::var("PGPASSWORD") {
            Ok(p) => (Some(Zeroizing::new(p)), "PGPASSWORD".to_owned()),
            Err(_) if file.exists() => {
                let bytes = Zeroizing::new(secrets::read_secret(&file)?);
                let text = std::str::from_utf8(&bytes)
                    .with_context(|| format!("{} is not UTF-8 text", file.display()))?;
                (
                    Some(Zeroizing::new(
                        text.trim_end_matches(['\n', '\r']).to_owned(),
                    )),
                    file.display().to_string(),
                )
            }
            Err(_) => (None, format!("no PGPASSWORD and no {}", file.display())),
        };
        connect.password = password;
        if let Some(ca) = &config.index.ca {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("[index] ca: cannot read {}", ca.display()))?
            {
                let c = c.with_context(|| format!("[index] ca: cannot parse {}", ca.display()))?;
                roots
                    .add(c)
                    .with_context(|| format!("[index] ca: cannot use {}", ca.display()))?;
            }
            connect.tls_roots = Some(roots);
        }
        let shown = crate::config::redact_url(url);
        Index::open_postgres(&connect, &key).map_err(|e| {
            if e.is_credentials_refused() {
                anyhow!("[index] url = {shown:?}: the database refused the credentials (password from {from}): {e}")
            } else {
                anyhow!("cannot open the index at [index] url = {shown:?}: {e}")
            }
        })
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

    /// First-start initialisation. Prints the admin password once. The
    /// keys go where `config.secrets.dir` says (`bastion init --secrets-dir
    /// DIR`: created 0700, never inside the data directory), else into the
    /// data directory; the master key is wrapped when a passphrase was given.
    /// Returns the data directory opened with its keys.
    ///
    /// # Errors
    /// Already initialised or not empty; `$CREDENTIALS_DIRECTORY` set
    /// (read-only keys) or chosen; a key directory inside the data
    /// directory, or one that already holds keys; a weak passphrase.
    pub fn init(&self, config: &Config) -> Result<DataDir> {
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
        let mut config = config.clone();
        let keys = self.init_key_paths(&mut config)?;
        if let Some(p) = &self.passphrase {
            let text =
                std::str::from_utf8(p.bytes()).context("the passphrase must be UTF-8 text")?;
            users::check_password_policy("", text)
                .map_err(|e| anyhow!("{}", e.to_string().replace("password", "passphrase")))?;
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
        mkdir(&keys.dir)?;
        mkdir(&self.root.join("tls"))?;
        mkdir(&self.root.join("events"))?;
        let dir = DataDir {
            root: self.root.clone(),
            keys,
            passphrase: self.passphrase.clone(),
            master: Arc::default(),
        };

        let master = MasterKey::generate();
        match &dir.passphrase {
            Some(p) => {
                let text = secrets::wrap_key(master.as_bytes(), p.bytes())?;
                secrets::write_secret(&dir.keys.master_wrapped, text.as_bytes())
                    .context("cannot write the wrapped master key")?;
            }
            None => master
                .write_hex_file(&dir.keys.master)
                .context("cannot write the master key")?,
        }
        let _ = dir.master.set(master.clone());
        let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let pem = ed25519_dalek::pkcs8::EncodePrivateKey::to_pkcs8_pem(
            &signing,
            ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF,
        )
        .map_err(|e| anyhow::anyhow!("cannot encode the audit signing key: {e}"))?;
        secrets::write_secret(&dir.keys.audit, pem.as_bytes())?;

        let mut hosts = Vec::new();
        for addr in [Some(config.dicom.tls_addr), config.dicom.plain_addr]
            .into_iter()
            .flatten()
        {
            if !addr.ip().is_unspecified() {
                hosts.push(addr.ip().to_string());
            }
        }
        pki::generate(&dir.pki(), &hosts)
            .context("cannot create the private CA and server certificate")?;

        let security = dir.open_security(&master)?;
        let password = users::generate_password();
        users::create_user(&security, "admin", &password, "admin")?;
        secrets::write_secret(&dir.admin_password(), format!("{password}\n").as_bytes())?;
        drop(AuditTrail::create(
            &dir.audit_dir(),
            dir.audit_keys(&master)?,
            audit_identity(&config),
            CheckpointPolicy::default(),
        )?);
        let archive = dir.open_archive(&master, &config)?;
        archive.events().record(
            "audit.started",
            Outcome::Success,
            serde_json::json!({"actor": "cli", "detail": "audit trail created by init"}),
        );
        drop(archive);
        std::fs::write(dir.config(), config.render()).context("cannot write bastion.toml")?;
        println!("Initialised Bastion data directory {}", dir.root.display());
        match dir.keys.source {
            KeySource::DataDir if dir.passphrase.is_some() => println!(
                "The audit signing and CA keys are inside the data directory ({}, {}); \
                 see `bastion init --secrets-dir` (README, \"Where the keys live\")",
                dir.keys.dir.display(),
                dir.keys.ca.display()
            ),
            KeySource::DataDir => println!(
                "Keys are inside the data directory ({}, {}): a copy of it decrypts everything; \
                 see `bastion init --secrets-dir` (README, \"Where the keys live\")",
                dir.keys.dir.display(),
                dir.keys.ca.display()
            ),
            _ => println!(
                "Keys are in {} (outside the data directory; back it up separately)",
                dir.keys.dir.display()
            ),
        }
        if dir.passphrase.is_some() {
            println!(
                "The master key is wrapped by your passphrase: every command needs --passphrase-stdin or --passphrase-file"
            );
        }
        println!("Initial admin password for user 'admin': {password}");
        println!(
            "(shown once; also in {} (mode 0600), deleted when the admin password is first changed)",
            dir.admin_password().display()
        );
        println!(
            "Clients must trust the CA certificate {}",
            dir.pki().ca_cert.display()
        );
        Ok(dir)
    }

    /// Where `init` puts the keys: the key directory (if any) checked,
    /// `config.secrets.dir` set to its absolute path. Creates nothing.
    fn init_key_paths(&self, config: &mut Config) -> Result<KeyPaths> {
        let credentials = std::env::var_os(keys::CREDENTIALS_VAR).filter(|v| !v.is_empty());
        let Some(wanted) = config.secrets.dir.clone() else {
            if credentials.is_some() {
                bail!(
                    "${} is set (systemd credentials, read-only) and no --secrets-dir was given: \
                     refusing to create keys inside the data directory; create them outside the service \
                     (`bastion init --data {} --secrets-dir DIR`) and pass them with LoadCredential=",
                    keys::CREDENTIALS_VAR,
                    self.root.display()
                );
            }
            return Ok(KeyPaths::in_data_dir(&self.root));
        };
        let keys = self.new_key_dir(&wanted, "--secrets-dir")?;
        config.secrets.dir = Some(keys.dir.to_string_lossy().into_owned());
        Ok(keys)
    }

    /// The key paths in a new key directory `wanted` (named `flag` in
    /// errors), checked: not the systemd credentials (read-only), outside
    /// the data directory, private if it exists, holding no key yet.
    /// Nothing is created.
    fn new_key_dir(&self, wanted: &str, flag: &str) -> Result<KeyPaths> {
        if wanted == keys::CREDENTIALS_VALUE {
            bail!(
                "cannot create keys in ${}: systemd credentials are read-only; create them with \
                 `bastion init --secrets-dir DIR` outside the service, pass them with LoadCredential= \
                 and set [secrets] dir = \"{}\" in bastion.toml",
                keys::CREDENTIALS_VAR,
                keys::CREDENTIALS_VALUE
            );
        }
        let dir = keys::resolved(Path::new(wanted));
        keys::check_outside(&self.root, &dir, flag)?;
        if dir.exists() {
            let meta = std::fs::metadata(&dir)
                .with_context(|| format!("cannot inspect {}", dir.display()))?;
            if !meta.is_dir() {
                bail!("{flag} {} is not a directory", dir.display());
            }
            if meta.permissions().mode() & 0o077 != 0 {
                bail!(
                    "{flag} {} is accessible by other users (mode {:o}); run `chmod 700 {}` or choose a new directory",
                    dir.display(),
                    meta.permissions().mode() & 0o7777,
                    dir.display()
                );
            }
        }
        let keys = KeyPaths::resolve(
            &self.root,
            Some(
                dir.to_str()
                    .with_context(|| format!("{flag} {} is not valid UTF-8", dir.display()))?,
            ),
            None,
        )?;
        for f in [&keys.master, &keys.master_wrapped, &keys.audit, &keys.ca] {
            if f.exists() {
                bail!(
                    "{} already exists: that key directory belongs to another data directory; choose a new one",
                    f.display()
                );
            }
        }
        Ok(keys)
    }

    /// `bastion secrets move --to DIR`: moves the master key (plain or
    /// wrapped), the audit signing key and the CA key of an installation
    /// that keeps them inside its data directory to the new key directory
    /// DIR (0700, files 0600), records `[secrets] dir` in `bastion.toml`,
    /// then deletes the old files. `serve` must be stopped (its lock is
    /// taken for the move). Order: copies fsynced first, then the
    /// configuration replaced atomically, then the old files removed, so an
    /// interruption leaves a working installation (at worst with a leftover
    /// copy that `serve` reports).
    ///
    /// # Errors
    /// Not initialised; keys already elsewhere; `serve` running; DIR
    /// unusable ([`DataDir::new_key_dir`]); a key missing or not private.
    pub fn move_keys(&self, to: &Path) -> Result<KeyPaths> {
        self.require_initialised()?;
        if self.keys.source != KeySource::DataDir {
            bail!(
                "the keys of {} are already outside it, in {} ([secrets] dir in {})",
                self.root.display(),
                self.keys.dir.display(),
                self.config().display()
            );
        }
        self.check_secret_permissions()?;
        let wanted = to
            .to_str()
            .with_context(|| format!("--to {} is not UTF-8", to.display()))?;
        let new = self.new_key_dir(wanted, "--to")?;
        // The lock file is the first thing written: everything above only reads.
        let Some(lock) = self.lock_serve()? else {
            bail!(
                "`bastion serve` is running on {}: stop it before moving the keys",
                self.root.display()
            );
        };
        let master_new = if self.master_key_file() == self.keys.master_wrapped {
            &new.master_wrapped
        } else {
            &new.master
        };
        let moves = [
            (self.master_key_file().to_path_buf(), master_new.clone()),
            (self.keys.audit.clone(), new.audit.clone()),
            (self.keys.ca.clone(), new.ca.clone()),
        ];
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&new.dir)
            .with_context(|| format!("cannot create {}", new.dir.display()))?;
        for (from, to) in &moves {
            let bytes = zeroize::Zeroizing::new(secrets::read_secret(from)?);
            secrets::write_secret(to, &bytes)?;
        }
        std::fs::File::open(&new.dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot fsync {}", new.dir.display()))?;
        let text = std::fs::read_to_string(self.config())
            .with_context(|| format!("cannot read {}", self.config().display()))?;
        let updated = crate::config::with_secrets_dir(&text, &new.dir.to_string_lossy())?;
        let tmp = self.root.join("bastion.toml.new");
        std::fs::write(&tmp, updated)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, self.config())
            .with_context(|| format!("cannot replace {}", self.config().display()))?;
        for (from, _) in &moves {
            std::fs::remove_file(from)
                .with_context(|| format!("cannot remove {}", from.display()))?;
        }
        // The old secrets/ directory, when nothing else is left in it.
        let _ = std::fs::remove_dir(&self.keys.dir);
        drop(lock);
        Ok(new)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `bastion migrate` holds the data directory's lock without creating
    /// any file; a `serve` started meanwhile finds it taken and refuses
    /// (outside test: on a never-served directory, with no serve.lock yet,
    /// `serve` started and acknowledged instances during a migration).
    #[test]
    fn the_directory_lock_keeps_serve_out_and_creates_nothing() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = DataDir::new(tmp.path());
        let held = dir.lock_dir()?;
        assert!(held.is_some());
        assert_eq!(std::fs::read_dir(tmp.path())?.count(), 0, "nothing created");
        assert!(dir.lock_serve()?.is_none(), "serve must not start");
        drop(held);
        let serving = dir.lock_serve()?;
        assert!(serving.is_some());
        assert!(
            dir.lock_dir()?.is_none(),
            "migrate must not start beside serve"
        );
        Ok(())
    }
}
