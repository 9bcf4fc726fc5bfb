//! The alert webhook: each new alert is POSTed as JSON to an `https://` URL
//! (`[detect] webhook_url`), the server certificate verified against
//! `webhook_ca_file` or the system's trusted roots.
//!
//! [`Webhook::send`] only queues: a bounded queue (the oldest alert is
//! dropped, and logged, when it is full), drained by a thread of its own,
//! so neither the event path nor the detector ever waits for the network.
//! A failed delivery (no connection, TLS failure, a status other than 2xx)
//! is retried with exponential back-off (1 s doubling up to 5 min, 10
//! attempts), in order.

use std::{
    collections::VecDeque,
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use bastion_security::alerts::Alert;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};

const ATTEMPTS: u32 = 10;
const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(300);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A handle on the webhook's queue.
pub struct Webhook {
    queue: Arc<(Mutex<VecDeque<String>>, Condvar)>,
    capacity: usize,
}

struct Target {
    host: String,
    port: u16,
    path: String,
    tls: Arc<rustls::ClientConfig>,
}

impl Webhook {
    /// Parses the URL, loads the trust anchors and starts the sender thread.
    ///
    /// # Errors
    /// Not an `https://host[:port][/path]` URL; an unreadable or empty CA
    /// file; no system roots found.
    pub fn start(url: &str, ca_file: Option<&str>, capacity: usize) -> Result<Webhook> {
        let rest = url
            .strip_prefix("https://")
            .with_context(|| format!("[detect] webhook_url {url:?} must start with https://"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>()
                    .with_context(|| format!("[detect] webhook_url {url:?}: bad port"))?,
            ),
            _ => (authority.trim_start_matches('[').trim_end_matches(']'), 443),
        };
        if host.is_empty() || authority.contains('@') {
            bail!("[detect] webhook_url {url:?}: expected https://host[:port]/path (no user info)");
        }
        let mut roots = rustls::RootCertStore::empty();
        let pems: Vec<CertificateDer<'static>> = match ca_file {
            Some(f) => CertificateDer::pem_file_iter(f)
                .and_then(|it| it.collect())
                .with_context(|| format!("cannot read [detect] webhook_ca_file {f}"))?,
            None => system_roots()?,
        };
        let (added, _) = roots.add_parsable_certificates(pems);
        if added == 0 {
            bail!("[detect] webhook: no usable CA certificate to verify the server with");
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let target = Target {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
            tls: Arc::new(tls),
        };
        ServerName::try_from(target.host.clone())
            .with_context(|| format!("[detect] webhook_url {url:?}: bad host name"))?;
        let queue = Arc::new((Mutex::new(VecDeque::new()), Condvar::new()));
        let q = queue.clone();
        std::thread::Builder::new()
            .name("bastion-webhook".into())
            .spawn(move || sender(&q, &target))
            .context("cannot start the webhook thread")?;
        Ok(Webhook { queue, capacity })
    }

    /// Queues `alert` for delivery; never blocks on the network.
    pub fn send(&self, alert: &Alert) {
        let Ok(body) = serde_json::to_string(alert) else {
            return;
        };
        let (lock, cv) = &*self.queue;
        let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= self.capacity {
            q.pop_front();
            tracing::warn!("webhook queue full: the oldest undelivered alert was dropped");
        }
        q.push_back(body);
        cv.notify_one();
    }
}

fn sender(queue: &(Mutex<VecDeque<String>>, Condvar), target: &Target) {
    let (lock, cv) = queue;
    loop {
        let body = {
            let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(b) = q.front() {
                    break b.clone();
                }
                q = cv.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let mut delay = FIRST_DELAY;
        for attempt in 1..=ATTEMPTS {
            match post(target, &body) {
                Ok(()) => break,
                Err(e) if attempt == ATTEMPTS => {
                    tracing::error!(error = %format!("{e:#}"), attempts = ATTEMPTS, "webhook: alert not delivered; giving up on it");
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), attempt, retry_in = ?delay, "webhook: delivery failed");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(MAX_DELAY);
                }
            }
        }
        let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
        // The front is still ours unless it was dropped for space meanwhile.
        if q.front() == Some(&body) {
            q.pop_front();
        }
    }
}

/// One HTTPS POST; `Ok` on a 2xx status.
fn post(t: &Target, body: &str) -> Result<()> {
    let mut last = None;
    let mut tcp = None;
    for addr in (t.host.as_str(), t.port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}", t.host))?
    {
        match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(format!("cannot connect to {addr}: {e}")),
        }
    }
    let tcp = tcp.with_context(|| last.unwrap_or_else(|| format!("no address for {}", t.host)))?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    let name = ServerName::try_from(t.host.clone())?;
    let conn = rustls::ClientConnection::new(t.tls.clone(), name)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let host_header = if t.port == 443 {
        t.host.clone()
    } else {
        format!("{}:{}", t.host, t.port)
    };
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bastion\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        t.path,
        host_header,
        body.len(),
        body
    );
    tls.write_all(req.as_bytes()).context("TLS write")?;
    tls.flush()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 8192 {
        let n = tls.read(&mut buf).context("TLS read")?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| "no HTTP status line in the webhook's answer")?;
    if !(200..300).contains(&status) {
        bail!("webhook answered HTTP {status}");
    }
    Ok(())
}

/// The system's trusted roots (the usual CA bundle paths).
fn system_roots() -> Result<Vec<CertificateDer<'static>>> {
    for f in [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ] {
        if let Ok(certs) =
            CertificateDer::pem_file_iter(f).and_then(|it| it.collect::<Result<Vec<_>, _>>())
        {
            if !certs.is_empty() {
                return Ok(certs);
            }
        }
    }
    bail!("no system CA bundle found; set [detect] webhook_ca_file")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let pem = "tests-do-not-exist.pem";
        assert!(Webhook::start("http://example.org/x", None, 10).is_err());
        assert!(Webhook::start("https://example.org/x", Some(pem), 10).is_err());
        assert!(Webhook::start("https://u:p@example.org/x", None, 10).is_err());
    }
}
