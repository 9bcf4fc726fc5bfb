//! The S3-compatible object backend of [`crate::BlobStore`], through the `object_store`
//! crate (AWS S3 API: endpoint, region, bucket, path-style requests).
//!
//! Only ciphertext under random names (`[PREFIX/]<blob id>`) ever reaches the bucket;
//! the blob format and the envelope encryption stay in `lib.rs`. Correctness relies on
//! neither conditional writes (Garage 2.5 ignores `If-None-Match: *` and overwrites)
//! nor listing consistency: names are random, the index commit is what makes an
//! instance exist, and listing serves only the age-guarded orphan sweep.
//!
//! `BlobStore` is synchronous (its callers run on blocking threads); the requests run
//! on a small multi-threaded tokio runtime owned by the backend, handed over through a
//! channel, so a call never nests `block_on` in the caller's runtime.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectStore,
    ObjectStoreExt, PutPayload, RetryConfig,
};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::{BlobId, Sink, StoreError, HEADER_LEN};

/// Bytes per multipart part (S3 wants ≥ 5 MiB for every part but the last). A blob
/// of at most one part goes up as one PUT.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Worker threads of the backend's own runtime.
const WORKERS: usize = 2;
/// Connecting to the endpoint must succeed within this time.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One request (e.g. one 8 MiB part) must complete within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Transient failures are retried this often, within [`RETRY_TIMEOUT`]: an
/// unreachable store fails a C-STORE within seconds instead of minutes.
const MAX_RETRIES: usize = 2;
const RETRY_TIMEOUT: Duration = Duration::from_secs(10);
/// Name prefix of the probe object written and deleted by `check` (not a blob id,
/// so `list` never returns it).
const PROBE_PREFIX: &str = "bastion-probe-";

/// Where an S3 bucket is: parsed from `s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION`.
///
/// `endpoint` is the S3 API base URL (e.g. `http://127.0.0.1:3900` for a local
/// Garage; absent: AWS). With an endpoint, requests are path-style
/// (`ENDPOINT/BUCKET/KEY`), which Garage and most S3-compatible servers expect.
/// `region` defaults to `us-east-1` (Garage's default region is `garage`).
/// Credentials never belong in the URL (refused): see [`S3Credentials`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    /// The bucket name.
    pub bucket: String,
    /// A key prefix inside the bucket (no leading or trailing `/`), or empty.
    pub prefix: String,
    /// The S3 API endpoint URL, `http://` or `https://`; `None` for AWS.
    pub endpoint: Option<String>,
    /// The signing region.
    pub region: String,
}

impl S3Location {
    /// Parses `s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION`.
    ///
    /// # Errors
    /// [`StoreError::InvalidUrl`] naming the part at fault (never echoing the URL,
    /// which might carry credentials by mistake).
    pub fn parse(text: &str) -> Result<S3Location, StoreError> {
        let bad = |m: &str| StoreError::InvalidUrl(m.to_owned());
        let url = url::Url::parse(text)
            .map_err(|e| StoreError::InvalidUrl(format!("not a URL ({e})")))?;
        if url.scheme() != "s3" {
            return Err(bad(
                "the scheme must be s3:// (s3://BUCKET?endpoint=http://HOST:PORT&region=REGION)",
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "credentials do not belong in the URL: use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the secrets file store-credentials",
            ));
        }
        if url.port().is_some() {
            return Err(bad(
                "a port belongs in endpoint=, not after the bucket name",
            ));
        }
        let bucket = url.host_str().unwrap_or_default().to_owned();
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.'));
        if !bucket_ok {
            return Err(bad(
                "the bucket name must be 3 to 63 characters of a-z, 0-9, '-' and '.'",
            ));
        }
        let prefix = url.path().trim_matches('/').to_owned();
        if prefix.split('/').any(|p| p == "." || p == "..")
            || prefix.contains("//")
            || !prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(bad(
                "the key prefix (the path after the bucket) must be plain ASCII segments",
            ));
        }
        let mut endpoint = None;
        let mut region = None;
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "endpoint" => {
                    let e = url::Url::parse(&v)
                        .map_err(|_| bad("endpoint= is not a URL (e.g. http://127.0.0.1:3900)"))?;
                    if !matches!(e.scheme(), "http" | "https") || e.host_str().is_none() {
                        return Err(bad("endpoint= must be an http:// or https:// URL"));
                    }
                    if !e.username().is_empty() || e.password().is_some() {
                        return Err(bad("credentials do not belong in endpoint="));
                    }
                    endpoint = Some(v.trim_end_matches('/').to_owned());
                }
                "region" => {
                    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                        return Err(bad("region= must be letters, digits and '-'"));
                    }
                    region = Some(v.into_owned());
                }
                _ => {
                    return Err(StoreError::InvalidUrl(format!(
                        "unknown parameter {:?} (known: endpoint, region)",
                        k.chars().take(40).collect::<String>()
                    )))
                }
            }
        }
        Ok(S3Location {
            bucket,
            prefix,
            endpoint,
            region: region.unwrap_or_else(|| "us-east-1".to_owned()),
        })
    }

    /// `s3://BUCKET[/PREFIX] at ENDPOINT`, for messages.
    pub fn describe(&self) -> String {
        let mut s = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        if let Some(e) = &self.endpoint {
            s.push_str(" at ");
            s.push_str(e);
        }
        s
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// An S3 access key: id and secret. The secret is zeroized on drop and never shown:
/// `Debug` prints neither part.
#[derive(Clone)]
pub struct S3Credentials {
    access_key_id: String,
    secret_access_key: Zeroizing<String>,
}

impl S3Credentials {
    /// Wraps an access key id and its secret.
    ///
    /// # Errors
    /// [`StoreError::InvalidUrl`] when either is empty or holds whitespace or control
    /// characters (a pasted line break).
    pub fn new(access_key_id: &str, secret_access_key: &str) -> Result<S3Credentials, StoreError> {
        let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
        if !ok(access_key_id) || !ok(secret_access_key) {
            return Err(StoreError::InvalidUrl(
                "the S3 access key id and secret must be non-empty printable ASCII without spaces"
                    .to_owned(),
            ));
        }
        Ok(S3Credentials {
            access_key_id: access_key_id.to_owned(),
            secret_access_key: Zeroizing::new(secret_access_key.to_owned()),
        })
    }

    /// Parses the secrets file `store-credentials`: two lines, the access key id and
    /// the secret (a trailing newline and `\r` are allowed).
    ///
    /// # Errors
    /// [`StoreError::InvalidUrl`] when the text is not two such lines (the message
    /// never quotes the file).
    pub fn from_file_text(text: &str) -> Result<S3Credentials, StoreError> {
        let lines: Vec<&str> = text
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !l.is_empty())
            .collect();
        match lines.as_slice() {
            [id, secret] => S3Credentials::new(id, secret),
            _ => Err(StoreError::InvalidUrl(
                "the file store-credentials must hold two lines: the access key id, then the secret"
                    .to_owned(),
            )),
        }
    }

    /// The access key id (not secret, but kept out of logs anyway).
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials").finish_non_exhaustive()
    }
}

/// The backend's own runtime; shut down in the background when the last user goes,
/// so dropping a store inside an async context never panics.
struct Runner {
    rt: Option<tokio::runtime::Runtime>,
}

impl Runner {
    /// Runs `fut` on the backend's runtime and waits for it on this thread.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, &'static str> {
        let Some(rt) = &self.rt else {
            return Err("the object store client has stopped");
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            // The receiver waits until we send; it is gone only if the caller is.
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| "the object store client stopped during a request")
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Shared by the backend and its open readers.
struct Client {
    runner: Runner,
    store: Arc<dyn ObjectStore>,
    describe: String,
    /// Removed from error texts before they leave the backend.
    access_key_id: String,
}

impl Client {
    fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        fut: impl Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> Result<T, StoreError> {
        match self.runner.run(fut) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(op, e)),
            Err(m) => Err(StoreError::Unavailable {
                store: self.describe.clone(),
                op,
                detail: m.to_owned(),
            }),
        }
    }

    /// Maps a client error: 401/403 → [`StoreError::Denied`], anything else →
    /// [`StoreError::Unavailable`] (callers handle `NotFound` first where it means
    /// something).
    fn error(&self, op: &'static str, e: object_store::Error) -> StoreError {
        let mut detail = e.to_string();
        if !self.access_key_id.is_empty() {
            detail = detail.replace(&self.access_key_id, "<access key id>");
        }
        // Bounded: an error body is the server's to choose.
        if detail.len() > 600 {
            let mut cut = 600;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push_str("...");
        }
        let store = self.describe.clone();
        let denied = match &e {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => true,
            // Listing and multipart requests come back as `Generic` whatever the
            // status, and the status-carrying `RetryError` is not exported by
            // object_store 0.14: its message is the only place the 401/403 shows.
            object_store::Error::Generic { .. } => {
                detail.contains("status code: 403") || detail.contains("status code: 401")
            }
            _ => false,
        };
        if denied {
            StoreError::Denied { store, op, detail }
        } else {
            StoreError::Unavailable { store, op, detail }
        }
    }
}

/// An S3 bucket (or a prefix in one) holding blobs.
pub(crate) struct S3Backend {
    client: Arc<Client>,
    prefix: String,
}

impl S3Backend {
    pub(crate) fn new(
        location: &S3Location,
        credentials: S3Credentials,
    ) -> Result<S3Backend, StoreError> {
        let describe = location.describe();
        let mut options = ClientOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(&location.region)
            .with_access_key_id(credentials.access_key_id.clone())
            .with_secret_access_key(credentials.secret_access_key.as_str())
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: MAX_RETRIES,
                retry_timeout: RETRY_TIMEOUT,
            });
        if let Some(endpoint) = &location.endpoint {
            // Path-style: ENDPOINT/BUCKET/KEY (Garage, most S3-compatible servers).
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
            if endpoint.starts_with("http://") {
                // Only ciphertext and SigV4 signatures (never the secret) cross the
                // wire; the operator chose a plain-HTTP endpoint explicitly.
                options = options.with_allow_http(true);
            }
        }
        let store = builder.with_client_options(options).build().map_err(|e| {
            StoreError::InvalidUrl(format!(
                "cannot set up the S3 client for {describe}: {}",
                e.to_string()
                    .replace(&credentials.access_key_id, "<access key id>")
            ))
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name("bastion-s3")
            .enable_all()
            .build()
            .map_err(|source| StoreError::Io {
                op: "start the object store client runtime",
                path: std::path::PathBuf::from(&describe),
                source,
            })?;
        Ok(S3Backend {
            client: Arc::new(Client {
                runner: Runner { rt: Some(rt) },
                store: Arc::new(store),
                describe,
                access_key_id: credentials.access_key_id.clone(),
            }),
            prefix: location.prefix.clone(),
        })
    }

    pub(crate) fn describe(&self) -> &str {
        &self.client.describe
    }

    fn key(&self, name: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(name)
        } else {
            ObjPath::from(format!("{}/{name}", self.prefix))
        }
    }

    fn prefix_path(&self) -> Option<ObjPath> {
        (!self.prefix.is_empty()).then(|| ObjPath::from(self.prefix.as_str()))
    }

    /// Lists the first page of the bucket, then writes and deletes a probe object.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        let store = self.client.store.clone();
        let prefix = self.prefix_path();
        self.client.run("listing the bucket", async move {
            let mut stream = store.list(prefix.as_ref());
            match stream.next().await {
                Some(Err(e)) => Err(e),
                _ => Ok(()),
            }
        })?;
        let mut r = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut r);
        let probe = self.key(&format!("{PROBE_PREFIX}{}", hex::encode(r)));
        let store = self.client.store.clone();
        self.client.run("writing a probe object", async move {
            store
                .put(&probe, PutPayload::from_static(b"bastion probe"))
                .await?;
            match store.delete(&probe).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    pub(crate) fn writer(&self, id: &BlobId) -> ObjectWriter {
        ObjectWriter {
            client: self.client.clone(),
            path: self.key(id.as_str()),
            buf: Vec::new(),
            upload: None,
        }
    }

    /// Reads the first `header.len()` bytes into `header` with one range read; returns
    /// the reader for the rest and how many header bytes there were.
    pub(crate) fn open(
        &self,
        id: &BlobId,
        header: &mut [u8; HEADER_LEN],
    ) -> Result<(ObjectReader, usize), StoreError> {
        let path = self.key(id.as_str());
        let store = self.client.store.clone();
        let p = path.clone();
        let got = self.client.runner.run(async move {
            let r = store
                .get_opts(
                    &p,
                    GetOptions {
                        // The header and the first window of segments in one
                        // request: a blob of up to ~1 MiB (most instances) is one
                        // GET, and a larger one starts without a second round
                        // trip (measured: a separate header GET cost ~43 ms per
                        // instance on loopback Garage, delayed ACK).
                        range: Some(GetRange::Bounded(0..FIRST_READ)),
                        ..GetOptions::default()
                    },
                )
                .await?;
            let size = r.meta.size;
            let bytes = r.bytes().await?;
            Ok::<_, object_store::Error>((size, bytes))
        });
        let (size, bytes) = match got {
            Ok(Ok(v)) => v,
            Ok(Err(object_store::Error::NotFound { .. })) => {
                return Err(StoreError::NotFound { id: id.clone() })
            }
            Ok(Err(e)) => return Err(self.client.error("reading a blob header", e)),
            Err(m) => {
                return Err(StoreError::Unavailable {
                    store: self.client.describe.clone(),
                    op: "reading a blob header",
                    detail: m.to_owned(),
                })
            }
        };
        let n = bytes.len().min(HEADER_LEN);
        header[..n].copy_from_slice(&bytes[..n]);
        let window = bytes.get(n..).unwrap_or_default().to_vec();
        Ok((
            ObjectReader {
                client: self.client.clone(),
                path,
                size,
                offset: bytes.len() as u64,
                window,
                pos: 0,
            },
            n,
        ))
    }

    pub(crate) fn delete(&self, id: &BlobId) -> Result<(), StoreError> {
        let store = self.client.store.clone();
        let path = self.key(id.as_str());
        self.client.run("deleting a blob", async move {
            match store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    pub(crate) fn list(&self) -> Result<Vec<(BlobId, SystemTime)>, StoreError> {
        let store = self.client.store.clone();
        let prefix = self.prefix_path();
        let depth = prefix.as_ref().map_or(0, |p| p.parts().count());
        let metas = self.client.run("listing the bucket", async move {
            let mut out = Vec::new();
            let mut stream = store.list(prefix.as_ref());
            while let Some(meta) = stream.next().await {
                let meta = meta?;
                // Only direct children of the prefix named like a blob id.
                let parts: Vec<_> = meta.location.parts().collect();
                if parts.len() != depth + 1 {
                    continue;
                }
                let Some(name) = parts.last() else { continue };
                if let Ok(id) = BlobId::parse(name.as_ref()) {
                    out.push((id, SystemTime::from(meta.last_modified)));
                }
            }
            Ok(out)
        })?;
        Ok(metas)
    }
}

/// Uploads one blob: buffered up to one part; a larger blob becomes a multipart
/// upload whose parts go up as they fill.
pub(crate) struct ObjectWriter {
    client: Arc<Client>,
    path: ObjPath,
    buf: Vec<u8>,
    upload: Option<Box<dyn MultipartUpload>>,
}

impl ObjectWriter {
    fn put_part(&mut self, part: Vec<u8>) -> Result<(), StoreError> {
        if self.upload.is_none() {
            let store = self.client.store.clone();
            let path = self.path.clone();
            let upload = self.client.run("starting a multipart upload", async move {
                store.put_multipart(&path).await
            })?;
            self.upload = Some(upload);
        }
        let Some(upload) = self.upload.as_mut() else {
            unreachable!("the upload was started above")
        };
        let fut = upload.put_part(PutPayload::from(part));
        self.client.run("uploading a part", fut)
    }

    /// Completes the upload: one PUT, or the last part and the completion. The object
    /// exists (and is durable as far as the store guarantees) once this returns `Ok`.
    pub(crate) fn finish(mut self) -> Result<(), StoreError> {
        if self.upload.is_none() {
            let store = self.client.store.clone();
            let path = self.path.clone();
            let payload = PutPayload::from(std::mem::take(&mut self.buf));
            return self
                .client
                .run("uploading a blob", async move {
                    store.put(&path, payload).await
                })
                .map(|_| ());
        }
        let rest = std::mem::take(&mut self.buf);
        let result = if rest.is_empty() {
            Ok(())
        } else {
            self.put_part(rest)
        };
        if let Err(e) = result {
            self.abort();
            return Err(e);
        }
        let Some(mut upload) = self.upload.take() else {
            unreachable!("checked above")
        };
        let completed = self
            .client
            .run("completing a multipart upload", async move {
                upload.complete().await.map(|_| ())
            });
        if completed.is_err() {
            // The upload may or may not be complete: if it is, the object is an orphan
            // that the sweep removes; nothing is acknowledged either way.
            tracing::warn!(store = %self.client.describe, "multipart upload completion failed");
        }
        completed
    }

    /// Aborts an unfinished multipart upload (best effort; a lifecycle rule on the
    /// bucket catches what this misses).
    pub(crate) fn abort(&mut self) {
        self.buf = Vec::new();
        if let Some(mut upload) = self.upload.take() {
            if let Err(e) = self.client.run("aborting a multipart upload", async move {
                upload.abort().await
            }) {
                tracing::warn!(error = %e, "cannot abort a multipart upload");
            }
        }
    }
}

impl Sink for ObjectWriter {
    fn write_all(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        self.buf.extend_from_slice(buf);
        while self.buf.len() >= PART_SIZE {
            let rest = self.buf.split_off(PART_SIZE);
            let part = std::mem::replace(&mut self.buf, rest);
            self.put_part(part)?;
        }
        Ok(())
    }
}

/// Reads a blob's segments through range reads of at most [`READ_AHEAD_SEGMENTS`]
/// segments (about 1 MiB) each, handed out one segment at a time: a large blob never
/// sits whole in memory, and a 1 GiB blob takes about a thousand requests, not 16 000.
pub(crate) struct ObjectReader {
    client: Arc<Client>,
    path: ObjPath,
    /// Object size from the first response.
    size: u64,
    /// Object offset of the first byte not yet fetched.
    offset: u64,
    /// Fetched bytes not yet handed out: `window[pos..]`.
    window: Vec<u8>,
    pos: usize,
}

/// Segments fetched per range read.
const READ_AHEAD_SEGMENTS: usize = 16;

/// Bytes of the first range read: the header and [`READ_AHEAD_SEGMENTS`]
/// segments as this crate writes them (plaintext + 16-byte tag each).
const FIRST_READ: u64 =
    HEADER_LEN as u64 + READ_AHEAD_SEGMENTS as u64 * (crate::SEGMENT_SIZE as u64 + 16);

impl ObjectReader {
    /// Replaces `buf` with the next up to `chunk` bytes (empty at the end).
    pub(crate) fn read_chunk(&mut self, buf: &mut Vec<u8>, chunk: usize) -> Result<(), StoreError> {
        buf.clear();
        if self.pos >= self.window.len() {
            self.fill(chunk.saturating_mul(READ_AHEAD_SEGMENTS))?;
        }
        let n = chunk.min(self.window.len() - self.pos);
        buf.extend_from_slice(&self.window[self.pos..self.pos + n]);
        self.pos += n;
        Ok(())
    }

    /// Fetches the next up to `len` bytes into the window (empty at the end).
    fn fill(&mut self, len: usize) -> Result<(), StoreError> {
        self.window.clear();
        self.pos = 0;
        if self.offset >= self.size {
            return Ok(());
        }
        let end = self.offset.saturating_add(len as u64).min(self.size);
        let range = self.offset..end;
        let store = self.client.store.clone();
        let path = self.path.clone();
        let bytes = self.client.run("reading a blob", async move {
            store.get_range(&path, range).await
        })?;
        // A shorter answer (the object changed under us) ends the blob here; the
        // segment authentication then reports it as truncated.
        let want = usize::try_from(end - self.offset).unwrap_or(usize::MAX);
        self.window
            .extend_from_slice(&bytes[..bytes.len().min(want)]);
        self.offset = if bytes.len() < want { self.size } else { end };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fixed_interface_url() -> Result<(), StoreError> {
        let l =
            S3Location::parse("s3://bastion-blobs?endpoint=http://127.0.0.1:3900&region=garage")?;
        assert_eq!(l.bucket, "bastion-blobs");
        assert_eq!(l.prefix, "");
        assert_eq!(l.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(l.region, "garage");
        let l = S3Location::parse("s3://b12/site/a")?;
        assert_eq!(
            (l.prefix.as_str(), l.endpoint, l.region.as_str()),
            ("site/a", None, "us-east-1")
        );
        Ok(())
    }

    #[test]
    fn refuses_bad_urls_without_echoing_them() {
        for bad in [
            "s3://KEY:SECRETVALUE@bucket?endpoint=http://h:1",
            "http://bucket",
            "s3://b?endpoint=ftp://x",
            "s3://bucket?foo=1",
            "s3://bucket:99",
            "s3://a",
            "s3://bucket/a//b",
            "s3://bucket?region=a%20b",
        ] {
            match S3Location::parse(bad) {
                Err(StoreError::InvalidUrl(m)) => {
                    assert!(!m.contains("SECRETVALUE"), "{m}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn credentials_file_and_debug() -> Result<(), StoreError> {
        let c = S3Credentials::from_file_text("GKabc\r\nsecretvalue\n")?;
        assert_eq!(c.access_key_id(), "GKabc");
        assert_eq!(c.secret_access_key.as_str(), "secretvalue");
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("GKabc") && !dbg.contains("secretvalue"),
            "{dbg}"
        );
        assert!(S3Credentials::from_file_text("only-one-line\n").is_err());
        assert!(S3Credentials::from_file_text("a\nb\nc\n").is_err());
        assert!(S3Credentials::from_file_text("a b\nc\n").is_err());
        Ok(())
    }
}
