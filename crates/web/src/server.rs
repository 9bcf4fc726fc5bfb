//! The TLS listener: rustls (aws-lc-rs; TLS 1.3 and 1.2; ALPN `http/1.1`)
//! in front of hyper's HTTP/1.1 connection, one task per connection.
//!
//! Bounds on every connection, before any request reaches the router:
//! admission by [`bastion_security::admission`] (at most
//! [`ConnectionLimits::max_connections`] sockets, at most
//! [`ConnectionLimits::max_connections_per_address`] from one address, of
//! which at most [`ConnectionLimits::max_unproven_per_address`] not yet past
//! the TLS handshake and a first request's headers; a newcomer evicts the
//! oldest such unproven socket of its own address, or of the address holding
//! the most when the listener is full, so idle sockets from one host or from
//! hundreds cannot lock anyone out, not even a client at the flooding
//! address), the TLS handshake within
//! [`ConnectionLimits::handshake_timeout`], each request's headers within
//! [`ConnectionLimits::header_timeout`] (hyper closes a slowloris
//! connection, and an idle keep-alive one), headers at most
//! [`ConnectionLimits::max_header_bytes`].
//! There is no plaintext listener: a client speaking plain HTTP to the port
//! (its first byte is not a TLS handshake record, 0x16, RFC 8446 §5.1, but
//! an ASCII letter) gets one fixed `400 Bad Request` with a `text/plain`
//! hint naming the `https://` address, and the connection is closed: no
//! data, no cookie, no redirect to follow blindly (`plain_http_hint`).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{extract::ConnectInfo, Router};
use bastion_security::admission::{Admission, AdmissionLimits, Ticket};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer},
    ServerConfig,
};
use tokio::{
    net::TcpListener,
    sync::{watch, Notify},
    task::JoinSet,
};
use tower::ServiceExt;

/// Per-connection bounds.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections held at once.
    pub max_connections: usize,
    /// Connections held at once from one source address (IPv6: one /64).
    pub max_connections_per_address: usize,
    /// Connections from one source address not yet past the TLS handshake
    /// and a first request's headers; a newcomer beyond it evicts the
    /// oldest.
    pub max_unproven_per_address: usize,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// Deadline for a request's headers (and for the next request on an
    /// idle keep-alive connection).
    pub header_timeout: Duration,
    /// Largest header block, bytes.
    pub max_header_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 256,
            max_connections_per_address: 64,
            max_unproven_per_address: 16,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
        }
    }
}

/// The TLS server configuration: the given chain and key (the DICOM-TLS
/// server certificate), aws-lc-rs, TLS 1.3 and 1.2 (BCP 195 suites only), no
/// client certificate, ALPN `http/1.1`.
///
/// # Errors
/// rustls refuses the key or the chain.
pub fn tls_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves `app` over TLS on `listener` until `shutdown` turns true, then
/// lets the connections finish their current request (at most 10 s).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    app: Router,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let admission = Admission::new(AdmissionLimits {
        max_total: limits.max_connections,
        max_per_address: limits.max_connections_per_address,
        max_unproven_per_address: limits.max_unproven_per_address,
    });
    let mut tasks = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTPS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        while tasks.try_join_next().is_some() {}
        let evicted = Arc::new(Notify::new());
        let wake = evicted.clone();
        let ticket = match admission.admit(peer.ip(), Box::new(move || wake.notify_one())) {
            Ok(t) => t,
            Err(refusal) => {
                tracing::warn!(%peer, reason = refusal.describe(), "HTTPS connection refused");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let mut stop = shutdown.clone();
        tasks.spawn(async move {
            // The first byte tells TLS from plain HTTP (peeked: the TLS
            // acceptor still reads it), under the handshake deadline.
            let first = tokio::select! {
                r = tokio::time::timeout(limits.handshake_timeout, first_byte(&tcp)) => match r {
                    Ok(Ok(Some(b))) => b,
                    Ok(Ok(None)) | Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                () = evicted.notified() => return,
            };
            if first != TLS_HANDSHAKE && first.is_ascii_alphabetic() {
                tokio::select! {
                    _ = tokio::time::timeout(limits.handshake_timeout, plain_http_hint(tcp)) => {}
                    () = evicted.notified() => {}
                }
                tracing::debug!(%peer, "plain HTTP on the HTTPS port: answered with the https:// hint");
                drop(ticket);
                return;
            }
            let stream = tokio::select! {
                r = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)) => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                () = evicted.notified() => {
                    tracing::debug!(%peer, "connection closed in the TLS handshake: evicted by a newer one");
                    return;
                }
            };
            let ticket = Arc::new(Mutex::new(ticket));
            serve_connection(stream, peer, app, limits, ticket, &evicted, &mut stop).await;
        });
    }
    tracing::info!("HTTPS listener stopped; finishing open connections");
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
}

/// TLS record content type `handshake` (RFC 8446 §5.1): the first byte a
/// TLS client sends.
const TLS_HANDSHAKE: u8 = 0x16;

/// Largest plain HTTP request head read for [`plain_http_hint`], bytes.
const MAX_PLAIN_HEAD: usize = 4096;

/// The first byte the client sent, without consuming it (`None`: it closed
/// first).
async fn first_byte(tcp: &tokio::net::TcpStream) -> std::io::Result<Option<u8>> {
    let mut b = [0u8; 1];
    let n = tcp.peek(&mut b).await?;
    Ok((n == 1).then_some(b[0]))
}

/// Answers a plain HTTP request sent to the HTTPS port: reads its head (at
/// most [`MAX_PLAIN_HEAD`] bytes), writes `400 Bad Request` with a
/// `text/plain` body "This port speaks HTTPS: use https://HOST/" (HOST from
/// the request's `Host` header when it is a plain host[:port], else the
/// address the client connected to) and closes. Nothing else is served: no
/// request is routed, no cookie set, no Location to follow.
async fn plain_http_hint(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while head.len() < MAX_PLAIN_HEAD && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let host = host_header(&head)
        .or_else(|| tcp.local_addr().ok().map(|a| a.to_string()))
        .unwrap_or_default();
    let body = format!("This port speaks HTTPS: use https://{host}/\n");
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(response.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

/// The `Host` header of a request head when it is a plain `host[:port]`
/// (letters, digits, `.`, `-`, `:`, `[`, `]`; at most 255 bytes), so that
/// nothing the client sent but a host name is echoed.
fn host_header(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head).ok()?;
    let value = text.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("host")
            .then(|| value.trim())
    })?;
    let ok = !value.is_empty()
        && value.len() <= 255
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    ok.then(|| value.to_owned())
}

async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    app: Router,
    limits: ConnectionLimits,
    ticket: Arc<Mutex<Ticket>>,
    evicted: &Notify,
    stop: &mut watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = app.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
        // A whole request head arrived: the connection can no longer be
        // evicted by newcomers (it still counts against the caps).
        ticket.lock().unwrap_or_else(|p| p.into_inner()).prove();
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "HTTPS connection ended with an error");
            }
        }
        // Only an unproven connection is ever evicted (before its first
        // request's headers): nothing is lost by dropping it.
        () = evicted.notified() => {
            tracing::debug!(%peer, "connection closed before its first request: evicted by a newer one");
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_only_a_plain_host() {
        let h = |s: &str| host_header(s.as_bytes());
        assert_eq!(
            h("GET / HTTP/1.1\r\nhost: pacs.example:8443\r\n\r\n").as_deref(),
            Some("pacs.example:8443")
        );
        assert_eq!(
            h("GET / HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n").as_deref(),
            Some("[::1]:8443")
        );
        assert_eq!(h("GET / HTTP/1.1\r\nHost: a/<script>\r\n\r\n"), None);
        assert_eq!(h("GET / HTTP/1.1\r\nX: y\r\n\r\n"), None);
        assert_eq!(h("Host: x\r\n"), None, "the request line is no header");
    }
}
