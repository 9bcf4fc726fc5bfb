//! Command-line interface (clap) and the small subcommands.

use std::{
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context, Result};
use bastion_model::{AeTitle, Transport, Uid};
use bastion_security::{
    certs::{self, CertRegistry},
    devices::{Device, DeviceRegistry, DeviceSettings, OnConflict},
    events::{EventLog, Outcome},
    inventory, pki,
};
use clap::{Args, Parser, Subcommand};

use crate::{
    config::Config,
    datadir::DataDir,
    keys::{Passphrase, CREDENTIALS_VAR},
};

/// Bastion: a secure-by-default PACS. Only registered devices may connect;
/// everything is encrypted in transit and at rest; every decision is logged.
#[derive(Debug, Parser)]
#[command(name = "bastion", version, about, long_about = None)]
pub struct Cli {
    /// Data directory (keys, certificates, index, encrypted images).
    #[arg(
        long,
        global = true,
        default_value = "./bastion-data",
        env = "BASTION_DATA"
    )]
    data: PathBuf,
    /// Read the passphrase that wraps the master key from the first line of
    /// standard input (with `init`/first `serve`: wrap the new master key
    /// with it).
    #[arg(long, global = true, conflicts_with = "passphrase_file")]
    passphrase_stdin: bool,
    /// Read that passphrase from the first line of FILE (mode 0600 or 0400,
    /// e.g. a systemd credential).
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "BASTION_PASSPHRASE_FILE"
    )]
    passphrase_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Initialise an empty data directory: master key, audit signing key,
    /// private CA and server certificate, admin user with a random password.
    Init(InitArgs),
    /// Run the DICOM and HTTPS listeners (initialises an empty data directory first).
    Serve(ListenArgs),
    /// Manage the device allowlist (remote AE titles allowed to connect).
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Issue certificates from Bastion's private CA.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Import Part 10 files and folders (recursive) through the ingest pipeline.
    Import {
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Read stored instances.
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// What is stored: list studies (filters like C-FIND), show one with its
    /// series and instances. Every use is recorded in the audit trail.
    #[command(subcommand)]
    Study(crate::study_cli::StudyCommand),
    /// Manage user accounts (web front end).
    #[command(subcommand)]
    User(crate::accounts_cli::UserCommand),
    /// Manage API tokens (bearer tokens for DICOMweb clients).
    #[command(subcommand)]
    Token(crate::accounts_cli::TokenCommand),
    /// Alerts raised by the detection rules (open first); `ack` one.
    Alerts(crate::alerts_cli::AlertsArgs),
    /// The tamper-evident audit trail: verify it, search it.
    #[command(subcommand)]
    Audit(crate::audit_cli::AuditCommand),
    /// Where the keys live (README, "Where the keys live").
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Copy this installation to the scale-out engines (docs/scale-out.md,
    /// "Moving an installation"): the encrypted blobs to an S3-compatible
    /// bucket (--to-store), optionally the index to another engine
    /// (--to-index). The source is only read; every instance is verified
    /// (decrypted, SHA-256 compared) at the source and at the destination;
    /// an interrupted run, run again, resumes; counts and sample queries are
    /// compared at the end. Exit 1 when an instance failed (named by SOP
    /// Instance UID) or a comparison differed. Needs the master key (a local
    /// administrator's command) and a stopped `serve`.
    Migrate(crate::migrate::MigrateArgs),
    /// Check this installation's health, read-only: configuration, file
    /// modes, where the keys live, free space, the databases (with SQLite's
    /// quick_check), the audit trail (verify, and whether it records),
    /// certificates, risky settings, accounts, open alerts. One line per
    /// check (ok / warn / FAIL); exit 0 when nothing failed, 1 when a check
    /// failed, 2 without an installation. Works while the audit trail cannot
    /// record.
    Doctor {
        /// One JSON object per check ({"level", "check", "message"}).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SecretsCommand {
    /// Move the master key, the audit signing key and the CA key out of the
    /// data directory into DIR (created 0700; `serve` must be stopped), and
    /// record `[secrets] dir` in bastion.toml.
    Move {
        /// The new key directory, outside the data directory.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
}

/// `bastion init` flags.
#[derive(Debug, Args, Clone)]
pub struct InitArgs {
    #[command(flatten)]
    listen: ListenArgs,
    /// Keep the master key, the audit signing key and the CA key in DIR
    /// (created 0700, outside the data directory) instead of inside the data
    /// directory; recorded as `[secrets] dir` in bastion.toml.
    #[arg(long, value_name = "DIR")]
    secrets_dir: Option<PathBuf>,
    /// Put the metadata index in PostgreSQL, `postgres://USER@HOST:PORT/DB`
    /// (no password in it: `PGPASSWORD` or the 0600 file `index-password`
    /// in the secrets directory); recorded as `[index] url` in bastion.toml.
    #[arg(long, value_name = "URL")]
    index_url: Option<String>,
    /// The PostgreSQL schema for the index [default: bastion_index]; recorded
    /// as `[index] schema`. Only with --index-url.
    #[arg(long, value_name = "NAME", requires = "index_url")]
    index_schema: Option<String>,
}

/// Listener settings (override `bastion.toml`).
#[derive(Debug, Args, Clone)]
pub struct ListenArgs {
    /// DICOM-TLS listener, IP:PORT (overrides bastion.toml; default 127.0.0.1:2762)
    #[arg(long, value_name = "HOST:PORT")]
    pub dicom_addr: Option<SocketAddr>,
    /// Plain (unencrypted) DICOM listener for `plain` devices, IP:PORT; off unless given
    #[arg(long, value_name = "HOST:PORT")]
    pub dicom_plain_addr: Option<SocketAddr>,
    /// Our AE title [default: BASTION]
    #[arg(long)]
    pub ae_title: Option<String>,
    /// HTTPS listener (DICOMweb, account API), IP:PORT or `off` (overrides bastion.toml; default 127.0.0.1:8443)
    #[arg(long, value_name = "HOST:PORT|off")]
    pub http_addr: Option<String>,
    /// Serve the OHIF Viewer unpacked in DIR (npm @ohif/app: the package or
    /// its dist/) at /viewer/ (overrides `[http] ohif_dir`)
    #[arg(long, value_name = "DIR")]
    pub ohif_dir: Option<std::path::PathBuf>,
    /// Keep the encrypted instance blobs in an S3-compatible bucket instead of
    /// DIR/blobs: 's3://BUCKET?endpoint=http://HOST:PORT&region=REGION'
    /// (`[store] url` in bastion.toml; `init` records it). Credentials from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, else the file
    /// store-credentials in the secrets directory (two lines: access key id,
    /// secret; mode 0600). See docs/scale-out.md.
    #[arg(long, value_name = "URL")]
    pub store_url: Option<String>,
}

impl ListenArgs {
    /// Applies the flags over a configuration.
    pub fn apply(&self, mut c: Config) -> Result<Config> {
        if let Some(a) = self.dicom_addr {
            c.dicom.tls_addr = a;
        }
        if let Some(a) = self.dicom_plain_addr {
            c.dicom.plain_addr = Some(a);
        }
        if let Some(ae) = &self.ae_title {
            c.dicom.ae_title = ae.clone();
        }
        if let Some(a) = &self.http_addr {
            c.http.addr = a.clone();
        }
        if let Some(d) = &self.ohif_dir {
            c.http.ohif_dir = Some(d.clone());
        }
        if let Some(u) = &self.store_url {
            bastion_store::S3Location::parse(u).context("invalid --store-url")?;
            c.store.url = Some(u.clone());
        }
        AeTitle::parse(&c.dicom.ae_title).context("invalid --ae-title")?;
        c.http.listen_addr().context("invalid --http-addr")?;
        Ok(c)
    }
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Register a device. Adding an existing AE title is an error.
    Add(DeviceArgs),
    /// Change a registered device (only the flags given change).
    Update(DeviceArgs),
    /// Remove a device.
    Remove {
        /// AE title.
        #[arg(long)]
        ae: String,
    },
    /// List devices with what their stored instances say (manufacturer,
    /// model, software versions, serial number, station name, transport,
    /// first/last seen, changes), then unknown devices that tried to
    /// connect.
    List {
        /// JSON output (an array of registered devices, each with an
        /// `inventory` object or null; with `--unknown`, the unknown devices).
        #[arg(long)]
        json: bool,
        /// Only the unknown devices: source addresses whose unregistered AE
        /// titles were refused, with the titles tried, count and last attempt.
        #[arg(long)]
        unknown: bool,
    },
}

#[derive(Debug, Args)]
struct DeviceArgs {
    /// The device's AE title (leading/trailing spaces are not significant).
    #[arg(long)]
    ae: String,
    /// Network its associations must come from, as CIDR (e.g. 10.1.2.0/24, 127.0.0.1/32). Required for `add`.
    #[arg(long)]
    network: Option<String>,
    /// tls (client certificate optional, must chain to our CA), mtls (certificate required:
    /// our CA or --cert-sha256), plain (legacy, plain listener only). Required for `add`.
    #[arg(long)]
    transport: Option<String>,
    /// Comma-separated subset of echo,store,find,move,get. Required for `add`.
    #[arg(long)]
    allow: Option<String>,
    /// SHA-256 of the device's DER client certificate (hex; colons and case
    /// ignored). When set, it is the only certificate accepted for the device.
    #[arg(long)]
    cert_sha256: Option<String>,
    /// Host for outbound associations (retrieve destination).
    #[arg(long)]
    host: Option<String>,
    /// Port for outbound associations.
    #[arg(long)]
    port: Option<u16>,
    /// What to do when the device re-sends a different dataset under a stored
    /// SOP Instance UID: refuse (status 0x0111, default) or replace (keeps the old version).
    #[arg(long)]
    on_conflict: Option<String>,
    /// Comma-separated AE titles of other registered devices this device may
    /// name as C-MOVE destination (it may always move to itself when it has
    /// --host/--port). An empty value clears the list.
    #[arg(long)]
    move_destinations: Option<String>,
}

impl DeviceArgs {
    /// The flags given, for [`DeviceSettings::create`] / [`DeviceSettings::apply`]
    /// (lists split at commas; an empty `--cert-sha256` or
    /// `--move-destinations` clears).
    fn settings(&self) -> DeviceSettings {
        let list = |s: &Option<String>| {
            s.as_deref().map(|v| {
                v.split(',')
                    .filter(|i| !i.trim().is_empty())
                    .map(str::to_owned)
                    .collect()
            })
        };
        DeviceSettings {
            network: self.network.clone(),
            transport: self.transport.clone(),
            allow: list(&self.allow),
            cert_sha256: self.cert_sha256.clone(),
            host: self.host.clone().map(Some),
            port: self.port.map(Some),
            on_conflict: self.on_conflict.clone(),
            move_destinations: list(&self.move_destinations),
        }
    }
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Replace the server certificate (signed by the existing CA) so that its
    /// subject alternative names cover the configured listen addresses and
    /// any --host given; restart `serve` afterwards. Clients keep trusting
    /// the same ca.crt.
    Server {
        /// Extra DNS name or IP address for the certificate (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Issue a client certificate for a registered device: writes
    /// OUT/client.key (0600), OUT/client.crt and OUT/ca.crt, prints the
    /// certificate's SHA-256. The certificate's subject CN is the AE title,
    /// and Bastion accepts it only from that device. It is recorded (serial,
    /// AE, SHA-256, not-after), and the device's previous certificates are
    /// revoked unless --keep-previous.
    Issue {
        /// The device's AE title (becomes the certificate's CN).
        #[arg(long)]
        ae: String,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
        /// Keep the device's previous certificates valid (e.g. while it is
        /// being switched over); by default they are revoked.
        #[arg(long)]
        keep_previous: bool,
    },
    /// Revoke device certificates: every certificate of an AE title, or one
    /// certificate by its SHA-256 fingerprint (also one never recorded, e.g.
    /// issued before certificates were recorded, or a pinned third-party
    /// certificate). Applies to the next TLS handshake on every node within
    /// seconds; no restart.
    Revoke {
        /// Revoke every certificate issued to this AE title (including ones
        /// issued before certificates were recorded).
        #[arg(long, conflicts_with = "sha256", required_unless_present = "sha256")]
        ae: Option<String>,
        /// Revoke the certificate with this SHA-256 (hex; colons and case ignored).
        #[arg(long)]
        sha256: Option<String>,
    },
    /// List recorded device certificates: serial, AE, SHA-256, not-after,
    /// revoked.
    List {
        /// Only the certificates of this AE title.
        #[arg(long)]
        ae: Option<String>,
        /// JSON array of {serial, ae, sha256, not_after, issued_at, revoked, revoked_at}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum InstanceCommand {
    /// Decrypt one stored instance to a Part 10 file (zero preamble,
    /// regenerated meta, the dataset exactly as received).
    Get {
        /// SOP Instance UID.
        #[arg(long)]
        sop_uid: String,
        /// Output file (created with mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let passphrase = if cli.passphrase_stdin {
        Some(Passphrase::read(std::io::stdin().lock(), "standard input")?)
    } else if let Some(f) = &cli.passphrase_file {
        Some(Passphrase::from_file(f)?)
    } else {
        None
    };
    let dir = DataDir::open(&cli.data, passphrase, std::env::var_os(CREDENTIALS_VAR))?;
    match cli.command {
        Command::Init(args) => {
            let mut config = args.listen.apply(Config::default())?;
            if let Some(d) = &args.secrets_dir {
                config.secrets.dir = Some(
                    d.to_str()
                        .with_context(|| format!("--secrets-dir {} is not UTF-8", d.display()))?
                        .to_owned(),
                );
            }
            config.index.url = args.index_url.clone();
            config.index.schema = args.index_schema.clone();
            dir.init(&config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(listen) => crate::serve::serve(&dir, &listen),
        Command::Device(cmd) => device(&dir, cmd),
        Command::Cert(CertCommand::Issue {
            ae,
            out,
            keep_previous,
        }) => cert_issue(&dir, &ae, &out, keep_previous),
        Command::Cert(CertCommand::Revoke { ae, sha256 }) => cert_revoke(&dir, ae, sha256),
        Command::Cert(CertCommand::List { ae, json }) => cert_list(&dir, ae, json),
        Command::Cert(CertCommand::Server { hosts }) => cert_server(&dir, hosts),
        Command::Import { paths } => crate::import::import(&dir, &paths),
        Command::Instance(InstanceCommand::Get { sop_uid, out }) => {
            instance_get(&dir, &sop_uid, &out)
        }
        Command::Study(cmd) => crate::study_cli::study(&dir, cmd),
        Command::User(cmd) => crate::accounts_cli::user(&dir, cmd),
        Command::Token(cmd) => crate::accounts_cli::token(&dir, cmd),
        Command::Alerts(args) => crate::alerts_cli::alerts(&dir, args),
        Command::Audit(cmd) => crate::audit_cli::audit(&dir, cmd),
        Command::Secrets(SecretsCommand::Move { to }) => secrets_move(&dir, &to),
        Command::Doctor { json } => crate::doctor::doctor(&dir, json),
        Command::Migrate(args) => crate::migrate::migrate(&dir, &args),
    }
}

fn secrets_move(dir: &DataDir, to: &Path) -> Result<ExitCode> {
    dir.require_initialised()?;
    // Loaded first: a wrong passphrase stops here, and the move is recorded
    // in the audit trail afterwards.
    dir.load_master_key()?;
    let keys = dir.move_keys(to)?;
    open_events(&dir.reopen()?)?.record(
        "secrets.moved",
        Outcome::Success,
        serde_json::json!({"actor": "cli", "dir": keys.dir}),
    );
    println!(
        "moved the master key, the audit signing key and the CA key to {}; bastion.toml now says [secrets] dir = {:?}",
        keys.dir.display(),
        keys.dir.display().to_string()
    );
    Ok(ExitCode::SUCCESS)
}

fn open_events(dir: &DataDir) -> Result<std::sync::Arc<EventLog>> {
    let master = dir.load_master_key()?;
    let (events, _trail) = dir.open_events(&master, &Config::load(&dir.config())?)?;
    crate::alerts_cli::attach(dir, &events);
    Ok(events)
}

fn device(dir: &DataDir, cmd: DeviceCommand) -> Result<ExitCode> {
    dir.require_initialised()?;
    dir.check_secret_permissions()?;
    let master = dir.load_master_key()?;
    let db = dir.open_security(&master)?;
    let reg = DeviceRegistry::new(&db);
    let events = open_events(dir)?;
    match cmd {
        DeviceCommand::Add(a) => {
            if a.network.is_none() || a.transport.is_none() || a.allow.is_none() {
                bail!("device add needs --network, --transport and --allow");
            }
            let (d, warnings) = a.settings().create(&a.ae)?;
            warn(&warnings);
            reg.add(&d)?;
            events.record(
                "device.added",
                Outcome::Success,
                serde_json::json!({"actor": "cli", "device": d.to_json()}),
            );
            println!("device {} added", d.ae);
        }
        DeviceCommand::Update(a) => {
            let ae = AeTitle::parse(&a.ae)?;
            let Some(mut d) = reg.get(&ae)? else {
                bail!("no device with AE title {ae}")
            };
            let warnings = a.settings().apply(&mut d)?;
            warn(&warnings);
            reg.update(&d)?;
            events.record(
                "device.updated",
                Outcome::Success,
                serde_json::json!({"actor": "cli", "device": d.to_json()}),
            );
            println!("device {} updated", d.ae);
        }
        DeviceCommand::Remove { ae } => {
            let ae = AeTitle::parse(&ae)?;
            reg.remove(&ae)?;
            events.record(
                "device.removed",
                Outcome::Success,
                serde_json::json!({"actor": "cli", "ae": ae.as_str()}),
            );
            println!("device {ae} removed");
        }
        DeviceCommand::List { json, unknown } => {
            let list = reg.list()?;
            let mut inventory: std::collections::HashMap<String, inventory::DeviceRecord> =
                inventory::list_devices(&db)?
                    .into_iter()
                    .map(|r| (r.ae.clone(), r))
                    .collect();
            let unknown_devices = inventory::list_unknown(&db)?;
            if unknown {
                if json {
                    println!("{}", serde_json::to_string_pretty(&unknown_devices)?);
                } else {
                    print_unknown(&unknown_devices);
                }
                return Ok(ExitCode::SUCCESS);
            }
            if json {
                let v: Vec<_> = list
                    .iter()
                    .map(|d| {
                        let mut j = d.to_json();
                        j["inventory"] = serde_json::to_value(inventory.remove(d.ae.as_str()))
                            .unwrap_or_default();
                        j
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if list.is_empty() {
                println!("no devices registered: add one with `bastion device add`");
            } else {
                println!(
                    "{:<16} {:<20} {:<9} {:<24} {:<8} {:<22} MOVE TO",
                    "AE", "NETWORK", "TRANSPORT", "ALLOW", "CONFLICT", "DESTINATION"
                );
                for d in &list {
                    let dest = match (&d.host, d.port) {
                        (Some(h), Some(p)) => format!("{h}:{p}"),
                        _ => "-".into(),
                    };
                    let conflict = if d.on_conflict == OnConflict::Replace {
                        "replace"
                    } else {
                        "refuse"
                    };
                    let moves = if d.move_destinations.is_empty() {
                        "-".to_owned()
                    } else {
                        d.move_destinations
                            .iter()
                            .map(AeTitle::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    println!(
                        "{:<16} {:<20} {:<9} {:<24} {:<8} {dest:<22} {moves}",
                        d.ae.to_string(),
                        d.network.to_string(),
                        d.transport.to_string(),
                        d.allow.to_string(),
                        conflict
                    );
                }
                print_inventory(&list, &inventory);
            }
            if !json && !unknown_devices.is_empty() {
                println!();
                print_unknown(&unknown_devices);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The inventory table of `bastion device list`: what each device's stored
/// instances say.
fn print_inventory(
    list: &[Device],
    inventory: &std::collections::HashMap<String, inventory::DeviceRecord>,
) {
    println!();
    println!(
        "{:<16} {:<20} {:<20} {:<16} {:<12} {:<12} {:<9} {:<24} {:<24} CHANGES",
        "AE",
        "MANUFACTURER",
        "MODEL",
        "SOFTWARE",
        "SERIAL",
        "STATION",
        "USED",
        "FIRST SEEN",
        "LAST SEEN"
    );
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    for d in list {
        match inventory.get(d.ae.as_str()) {
            Some(r) => println!(
                "{:<16} {:<20} {:<20} {:<16} {:<12} {:<12} {:<9} {:<24} {:<24} {}",
                r.ae,
                dash(&r.headers.manufacturer),
                dash(&r.headers.model),
                dash(&r.headers.software_versions),
                dash(&r.headers.serial_number),
                dash(&r.headers.station_name),
                r.transport.as_deref().unwrap_or("-"),
                r.first_seen,
                r.last_seen,
                r.history.len().saturating_sub(1)
            ),
            None => println!("{:<16} (not seen yet)", d.ae.as_str()),
        }
    }
}

/// The unknown-device table of `bastion device list`.
fn print_unknown(unknown: &[inventory::UnknownDevice]) {
    if unknown.is_empty() {
        println!("no unknown device tried to connect");
        return;
    }
    println!("unknown devices (refused: AE title not registered)");
    println!(
        "{:<40} {:>8} {:<24} {:<24} AE TITLES TRIED",
        "ADDRESS", "ATTEMPTS", "FIRST ATTEMPT", "LAST ATTEMPT"
    );
    for u in unknown {
        println!(
            "{:<40} {:>8} {:<24} {:<24} {}",
            u.address,
            u.attempts,
            u.first_attempt,
            u.last_attempt,
            u.ae_titles.join(",")
        );
    }
}

fn warn(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

fn cert_issue(dir: &DataDir, ae: &str, out: &Path, keep_previous: bool) -> Result<ExitCode> {
    dir.require_initialised()?;
    dir.check_secret_permissions()?;
    let ae = AeTitle::parse(ae)?;
    let master = dir.load_master_key()?;
    let db = dir.open_security(&master)?;
    let host = {
        let Some(device) = DeviceRegistry::new(&db).get(&ae)? else {
            bail!("no device with AE title {ae}: register it first with `bastion device add --ae {ae} ...`; a certificate is bound to one registered device");
        };
        if device.transport == Transport::Plain {
            bail!("device {ae} uses the plain transport; change it with `bastion device update --ae {ae} --transport mtls` first");
        }
        device.host
    };
    let key = out.join("client.key");
    let crt = out.join("client.crt");
    let ca = out.join("ca.crt");
    for p in [&key, &crt, &ca] {
        if p.exists() {
            bail!("{} exists; refusing to overwrite", p.display());
        }
    }
    let issued = pki::issue_client(&dir.pki(), ae.as_str(), host.as_deref())?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    bastion_security::secrets::write_secret(&key, issued.key_pem.as_bytes())?;
    bastion_security::secrets::write_public(&crt, issued.cert_pem.as_bytes())?;
    std::fs::copy(dir.pki().ca_cert, &ca).context("cannot copy ca.crt")?;
    let revoked = CertRegistry::new(&db).record_issued(
        &ae,
        &issued.sha256,
        &issued.serial,
        issued.not_after,
        keep_previous,
    )?;
    let events = open_events(dir)?;
    events.record(
        "cert.issued",
        Outcome::Success,
        serde_json::json!({"actor": "cli", "ae": ae.as_str(), "certificate_sha256": issued.sha256,
                           "serial": issued.serial, "keep_previous": keep_previous}),
    );
    if !keep_previous {
        events.record(
            "cert.revoked",
            Outcome::Success,
            serde_json::json!({"actor": "cli", "ae": ae.as_str(), "certificates_sha256": revoked,
                               "why": "re-issued"}),
        );
    }
    println!(
        "wrote {}, {} and {}",
        key.display(),
        crt.display(),
        ca.display()
    );
    println!("certificate SHA-256: {}", issued.sha256);
    println!("serial: {}", issued.serial);
    if keep_previous {
        println!("previous certificates of {ae} stay valid (--keep-previous)");
    } else {
        println!(
            "revoked {} previous certificate(s) of {ae}{}",
            revoked.len(),
            if revoked.is_empty() { "" } else { ":" }
        );
        for r in &revoked {
            println!("  {r}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cert_revoke(dir: &DataDir, ae: Option<String>, sha256: Option<String>) -> Result<ExitCode> {
    dir.require_initialised()?;
    dir.check_secret_permissions()?;
    let master = dir.load_master_key()?;
    let db = dir.open_security(&master)?;
    let reg = CertRegistry::new(&db);
    let events = open_events(dir)?;
    match (ae, sha256) {
        (Some(ae), None) => {
            let ae = AeTitle::parse(&ae)?;
            let revoked = reg.revoke_ae(&ae)?;
            events.record(
                "cert.revoked",
                Outcome::Success,
                serde_json::json!({"actor": "cli", "ae": ae.as_str(), "certificates_sha256": revoked}),
            );
            println!(
                "revoked {} recorded certificate(s) of {ae}, and any issued to {ae} before certificates were recorded",
                revoked.len()
            );
            for r in &revoked {
                println!("  {r}");
            }
        }
        (None, Some(sha)) => {
            let sha = certs::normalize_sha256(&sha)?;
            let newly = reg.revoke_sha256(&sha)?;
            if newly {
                events.record(
                    "cert.revoked",
                    Outcome::Success,
                    serde_json::json!({"actor": "cli", "certificate_sha256": sha}),
                );
                println!("revoked certificate {sha}");
            } else {
                println!("certificate {sha} was already revoked");
            }
        }
        _ => bail!("give exactly one of --ae AE or --sha256 HEX"),
    }
    Ok(ExitCode::SUCCESS)
}

fn cert_list(dir: &DataDir, ae: Option<String>, json: bool) -> Result<ExitCode> {
    dir.require_initialised()?;
    dir.check_secret_permissions()?;
    let master = dir.load_master_key()?;
    let db = dir.open_security(&master)?;
    let ae = ae.as_deref().map(AeTitle::parse).transpose()?;
    let list = CertRegistry::new(&db).list(ae.as_ref())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!("no certificates recorded (certificates issued before this version are not listed; revoke them with `bastion cert revoke --ae AE`)");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<34} {:<16} {:<64} {:<26} REVOKED",
        "SERIAL", "AE", "SHA-256", "NOT AFTER"
    );
    for c in &list {
        println!(
            "{:<34} {:<16} {:<64} {:<26} {}",
            c.serial.as_deref().unwrap_or("-"),
            c.ae.as_deref().unwrap_or("-"),
            c.sha256,
            c.not_after.as_deref().unwrap_or("-"),
            c.revoked_at.as_deref().unwrap_or("no")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cert_server(dir: &DataDir, mut hosts: Vec<String>) -> Result<ExitCode> {
    dir.require_initialised()?;
    dir.check_secret_permissions()?;
    let config = Config::load(&dir.config())?;
    let http = config.http.listen_addr()?;
    for addr in [Some(config.dicom.tls_addr), config.dicom.plain_addr, http]
        .into_iter()
        .flatten()
    {
        if !addr.ip().is_unspecified() {
            hosts.push(addr.ip().to_string());
        }
    }
    pki::renew_server(&dir.pki(), &hosts)?;
    open_events(dir)?.record(
        "cert.server_renewed",
        Outcome::Success,
        serde_json::json!({"actor": "cli", "hosts": hosts}),
    );
    println!(
        "wrote a new {} for localhost, 127.0.0.1, ::1{}{}; restart `bastion serve` to use it",
        dir.pki().server_cert.display(),
        if hosts.is_empty() { "" } else { ", " },
        hosts.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

fn instance_get(dir: &DataDir, sop_uid: &str, out: &Path) -> Result<ExitCode> {
    dir.require_initialised()?;
    dir.check_secret_permissions()?;
    let uid = Uid::parse(sop_uid)?;
    let config = Config::load(&dir.config())?;
    let master = dir.load_master_key()?;
    let archive = dir.open_archive(&master, &config)?;
    let bytes = archive.instance_part10(&uid)?;
    // create_new: never overwrite (or follow a symlink at) the destination,
    // and the decrypted patient data is readable by the owner only.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {} (it must not exist yet)", out.display()))?;
    std::io::Write::write_all(&mut f, &bytes)
        .with_context(|| format!("cannot write {}", out.display()))?;
    archive.events().record(
        "instance.exported",
        Outcome::Success,
        serde_json::json!({"actor": "cli", "sop_instance_uid": uid}),
    );
    println!("wrote {} ({} bytes)", out.display(), bytes.len());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(store_url: &str) -> ListenArgs {
        ListenArgs {
            dicom_addr: None,
            dicom_plain_addr: None,
            ae_title: None,
            http_addr: None,
            ohif_dir: None,
            store_url: Some(store_url.into()),
        }
    }

    /// `--store-url` is checked before it is recorded; a URL carrying
    /// credentials is refused without echoing them.
    #[test]
    fn store_url_flag_is_checked_and_recorded() {
        let url = "s3://bastion?endpoint=http://127.0.0.1:3900&region=garage";
        let c = listen(url)
            .apply(Config::default())
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(c.store.url.as_deref(), Some(url));
        match listen("s3://GKID:TopSecretValue@bastion?endpoint=http://127.0.0.1:1")
            .apply(Config::default())
        {
            Ok(_) => panic!("credentials in the URL accepted"),
            Err(e) => {
                let text = format!("{e:#}");
                assert!(text.contains("--store-url"), "{text}");
                assert!(!text.contains("TopSecretValue"), "{text}");
            }
        }
        assert!(listen("file:///tmp/x").apply(Config::default()).is_err());
    }
}
