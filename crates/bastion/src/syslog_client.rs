//! The TLS connection to the syslog collector (RFC 5425) behind
//! `bastion_security::syslog::Collector`: Bastion's server certificate
//! (which carries clientAuth) as client certificate, the collector's
//! certificate verified against the configured CA file and its name or IP
//! address, TLS 1.3/1.2 with the aws-lc-rs provider as everywhere else.
//! A collector certificate that fails verification (wrong name, untrusted
//! issuer, expired) is refused as before, and the exact failure is logged
//! and recorded as `tls.peer_rejected` (which raises a Security Alert); the
//! same failure is recorded again only after [`REPORT_AGAIN_AFTER`], not at
//! every reconnect.

use std::{
    io::{self, Read, Write},
    net::{TcpStream, ToSocketAddrs},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bastion_dimse::tls::{ReportingServerVerifier, ServerReject};
use bastion_security::{
    audit::{AuditReader, AuditTrail},
    events::{EventLog, Outcome},
    syslog::{Collector, CollectorConnection, Header, SyslogExporter},
};
use bastion_store::MasterKey;
use rustls::{
    client::WebPkiServerVerifier,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig, ClientConnection, RootCertStore, StreamOwned,
};

use crate::{config::Config, datadir::DataDir};

/// Connect, handshake, read and write time limits.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The same certificate failure of the collector is recorded again after
/// this long (the exporter reconnects every few seconds).
pub const REPORT_AGAIN_AFTER: Duration = Duration::from_secs(600);

/// Starts the syslog exporter when `[audit.syslog]` is set: spool in
/// `DIR/spool/syslog` (key `bastion syslog spool v1`), fed with the audit
/// messages of every record `trail` appends.
///
/// # Errors
/// Invalid `[audit.syslog]`, unreadable certificate files, a spool that does
/// not decrypt.
pub fn start(
    dir: &DataDir,
    config: &Config,
    master: &MasterKey,
    trail: &AuditTrail,
    events: &Arc<EventLog>,
) -> Result<Option<Arc<SyslogExporter>>> {
    let Some(s) = &config.audit.syslog else {
        return Ok(None);
    };
    let (host, port) = s.target()?;
    let p = dir.pki();
    let ca = s.ca.clone().unwrap_or_else(|| p.ca_cert.clone());
    let collector = TlsCollector::new(&host, port, &ca, &p.server_cert, &p.server_key)?
        .reporting_to(events.clone());
    let hostname = s.hostname.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    });
    let spool = dir.root.join("spool/syslog");
    let key = master.derive("bastion syslog spool v1");
    let exporter = SyslogExporter::start(&spool, &key, Header::new(&hostname), Arc::new(collector))
        .with_context(|| format!("cannot open the syslog spool {}", spool.display()))?;
    // The exporter follows the trail file itself, so records appended by
    // CLI processes (and by serve before a crash) are exported too; serve's
    // own appends only wake it early.
    exporter.set_events(events.clone());
    exporter
        .follow(AuditReader::new(&dir.audit_dir(), dir.audit_keys(master)?))
        .context("cannot start following the audit trail for syslog export")?;
    trail.set_sink(exporter.clone());
    tracing::info!(collector = %s.url, ca = %ca.display(), backlog = exporter.backlog(),
        "audit messages exported to syslog over TLS");
    Ok(Some(exporter))
}

/// A syslog collector reached over TLS.
pub struct TlsCollector {
    host: String,
    port: u16,
    name: ServerName<'static>,
    config: Arc<ClientConfig>,
    /// Where the verifier leaves the reason it refused the collector's
    /// certificate.
    rejected: ServerReject,
    events: Option<Arc<EventLog>>,
    /// The failure last recorded, and when.
    reported: Mutex<Option<(String, Instant)>>,
}

impl TlsCollector {
    /// Loads the CA file that must sign the collector's certificate and our
    /// certificate and key.
    ///
    /// # Errors
    /// A file cannot be read or used; `host` is not a valid DNS name or IP.
    pub fn new(host: &str, port: u16, ca: &Path, cert: &Path, key: &Path) -> Result<TlsCollector> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("[audit.syslog] cannot read CA file {}", ca.display()))?
        {
            let c = c.with_context(|| format!("[audit.syslog] cannot parse {}", ca.display()))?;
            roots
                .add(c)
                .with_context(|| format!("[audit.syslog] cannot use CA {}", ca.display()))?;
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<_, _>>())
            .with_context(|| format!("cannot read {}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("cannot read {}", key.display()))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let rejected: ServerReject = Arc::new(Mutex::new(None));
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .with_context(|| format!("[audit.syslog] cannot use CA {}", ca.display()))?;
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ReportingServerVerifier::new(
                verifier,
                rejected.clone(),
            )))
            .with_client_auth_cert(chain, key)
            .with_context(|| format!("cannot use {} as client certificate", cert.display()))?;
        let name = ServerName::try_from(host.to_owned())
            .with_context(|| format!("[audit.syslog] {host:?} is not a host name or IP address"))?;
        Ok(TlsCollector {
            host: host.to_owned(),
            port,
            name,
            config: Arc::new(config),
            rejected,
            events: None,
            reported: Mutex::new(None),
        })
    }

    /// Records refused collector certificates in `events`.
    #[must_use]
    pub fn reporting_to(mut self, events: Arc<EventLog>) -> TlsCollector {
        self.events = Some(events);
        self
    }

    /// Logs and records the certificate failure the verifier left, if any
    /// (once per distinct failure per [`REPORT_AGAIN_AFTER`]).
    fn report_rejection(&self) {
        let Some(reason) = self
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let mut last = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((r, at)) = last.as_ref() {
            if *r == reason && at.elapsed() < REPORT_AGAIN_AFTER {
                return;
            }
        }
        tracing::warn!(collector = %self.describe(), reason = %reason, "syslog collector certificate refused");
        if let Some(events) = &self.events {
            events.record(
                "tls.peer_rejected",
                Outcome::Failure,
                serde_json::json!({
                    "role": "client", "purpose": "syslog collector",
                    "peer": format!("{}:{}", self.host, self.port), "reason": reason,
                }),
            );
        }
        *last = Some((reason, Instant::now()));
    }
}

impl Collector for TlsCollector {
    fn connect(&self) -> io::Result<Box<dyn CollectorConnection>> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for addr in (self.host.as_str(), self.port).to_socket_addrs()? {
            let tcp = match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
                Ok(t) => t,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            tcp.set_nodelay(true)?;
            tcp.set_read_timeout(Some(IO_TIMEOUT))?;
            tcp.set_write_timeout(Some(IO_TIMEOUT))?;
            let conn = ClientConnection::new(self.config.clone(), self.name.clone())
                .map_err(io::Error::other)?;
            let mut tls = StreamOwned::new(conn, tcp);
            while tls.conn.is_handshaking() {
                if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                    self.report_rejection();
                    return Err(e);
                }
            }
            return Ok(Box::new(TlsConnection(tls)));
        }
        Err(last)
    }

    fn describe(&self) -> String {
        format!("tls://{}:{}", self.host, self.port)
    }
}

struct TlsConnection(StreamOwned<ClientConnection, TcpStream>);

impl CollectorConnection for TlsConnection {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)?;
        self.0.flush()
    }

    fn probe(&mut self) -> io::Result<()> {
        // A collector never sends application data (RFC 5425 §4.3): any
        // read that does not block means close_notify, FIN or reset.
        self.0.sock.set_nonblocking(true)?;
        let mut buf = [0u8; 256];
        let r = self.0.read(&mut buf);
        self.0.sock.set_nonblocking(false)?;
        match r {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the collector closed the connection",
            )),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for TlsConnection {
    fn drop(&mut self) {
        self.0.conn.send_close_notify();
        let _ = self.0.conn.complete_io(&mut self.0.sock);
    }
}
