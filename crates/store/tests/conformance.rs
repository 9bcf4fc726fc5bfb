//! One conformance suite for the blob store, run unchanged against every object
//! backend (issue 12): the local directory always; an S3-compatible store (Garage in
//! CI, started by `scripts/garage.sh`) when `BASTION_TEST_S3_URL`,
//! `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` are set. Without them the S3 tests
//! print a SKIP line naming the variables and return; `scripts/test.sh` always sets
//! them, so in CI they always run. No mock: a real Garage.
//!
//! Each case is a function over an [`Engine`]; the `conformance!` macro instantiates
//! every case once per engine. An engine gives the suite a fresh, empty store (for S3
//! a random key prefix in the test bucket), raw access to the stored objects (to
//! tamper with them), and the engine's "wrong credentials" and "unreachable" stores.

use std::collections::BTreeSet;
use std::io::Read;
use std::time::{Duration, SystemTime};

use bastion_store::{
    BlobId, BlobStore, MasterKey, S3Credentials, S3Location, StoreError, HEADER_LEN, SEGMENT_SIZE,
};
use sha2::{Digest, Sha256};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const SEG: usize = SEGMENT_SIZE as usize;
/// Ciphertext bytes of a full segment (plaintext + GCM tag).
const SEG_CT: usize = SEG + 16;

/// What the suite needs from a backend.
trait Engine {
    /// The store under test on the engine's location (fresh and empty at the first
    /// call), opened with `master`.
    fn store(&self, master: MasterKey) -> BlobStore;
    /// The stored bytes of a blob (ciphertext).
    fn read_raw(&self, id: &BlobId) -> Vec<u8>;
    /// Replaces the stored bytes of a blob.
    fn write_raw(&self, id: &BlobId, bytes: &[u8]);
    /// The same location opened with wrong credentials, for engines that have any.
    fn with_wrong_credentials(&self, master: MasterKey) -> Option<BlobStore>;
    /// A store of this engine that cannot be reached (the S3 endpoint a closed
    /// port; the directory removed).
    fn unreachable(&self, master: MasterKey) -> BlobStore;
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 8) as u8 ^ seed)
        .collect()
}

// ---------------------------------------------------------------------------
// The cases (engine-independent).

/// put → get is bit-identical for sizes around the segment boundaries; the
/// reported length and SHA-256 are the plaintext's.
fn put_get_bit_identical(e: &dyn Engine) -> TestResult {
    let s = e.store(MasterKey::generate());
    for len in [0usize, 1, SEG - 1, SEG, SEG + 1, 3 * SEG + 17] {
        let data = pattern(len, 1);
        let info = s.put(&data)?;
        assert_eq!(info.plaintext_len, len as u64);
        assert_eq!(info.sha256, <[u8; 32]>::from(Sha256::digest(&data)));
        let segments = if len == 0 { 1 } else { len.div_ceil(SEG) };
        assert_eq!(
            e.read_raw(&info.id).len(),
            HEADER_LEN + len + 16 * segments,
            "stored size for {len}"
        );
        assert_eq!(s.get(&info.id)?, data, "len {len}");
    }
    Ok(())
}

/// A multi-segment blob reads back one authenticated segment at a time, each of
/// the segment size but the last; a streamed put of a blob larger than one
/// multipart part (8 MiB) reads back identical.
fn segment_reads_of_a_multi_segment_blob(e: &dyn Engine) -> TestResult {
    let s = e.store(MasterKey::generate());
    let data = pattern(5 * SEG + 1234, 2);
    let info = s.put(&data)?;
    let mut reader = s.open_blob(&info.id)?;
    assert!(reader.bound_to_id());
    let mut sizes = Vec::new();
    let mut back = Vec::new();
    let mut rounds = 0;
    while let Some(seg) = reader.next_segment()? {
        sizes.push(seg.len());
        back.extend_from_slice(seg);
        rounds += 1;
        assert!(rounds <= 10, "more segments than written");
    }
    assert_eq!(sizes, vec![SEG, SEG, SEG, SEG, SEG, 1234]);
    assert_eq!(back, data);
    assert!(reader.next_segment()?.is_none());

    // Larger than one multipart part: streamed in, streamed out.
    let big = pattern(20 * 1024 * 1024 + 5, 3);
    let info = s.put_reader(&mut &big[..])?;
    assert_eq!(info.plaintext_len, big.len() as u64);
    let mut out = Vec::with_capacity(big.len());
    s.open_blob(&info.id)?.read_to_end(&mut out)?;
    assert!(out == big, "20 MiB blob differs after the round trip");
    Ok(())
}

fn expect_corrupt(r: Result<Vec<u8>, StoreError>, what: &str) {
    match r {
        Err(StoreError::Corrupt { .. }) => {}
        other => panic!("{what}: expected Corrupt, got {:?}", other.map(|v| v.len())),
    }
}

/// Flipped bytes (header, each segment), a dropped final segment, and a blob
/// copied over another id are all detected; the original still reads.
fn tamper_detection(e: &dyn Engine) -> TestResult {
    let s = e.store(MasterKey::generate());
    let data = pattern(3 * SEG + 100, 4);
    let info = s.put(&data)?;
    let orig = e.read_raw(&info.id);
    for pos in [
        10,
        45,
        HEADER_LEN + 5,
        HEADER_LEN + SEG_CT + 1,
        orig.len() - 1,
    ] {
        let mut b = orig.clone();
        b[pos] ^= 0x01;
        e.write_raw(&info.id, &b);
        expect_corrupt(s.get(&info.id), &format!("flip at {pos}"));
    }
    e.write_raw(&info.id, &orig[..HEADER_LEN + 3 * SEG_CT]);
    expect_corrupt(s.get(&info.id), "final segment dropped");
    let other = s.put(b"another blob")?;
    e.write_raw(&other.id, &orig);
    expect_corrupt(s.get(&other.id), "blob copied over another id");
    e.write_raw(&info.id, &orig);
    assert_eq!(s.get(&info.id)?, data);
    Ok(())
}

/// delete removes the blob (NotFound after), and deleting again is not an error.
fn delete(e: &dyn Engine) -> TestResult {
    let s = e.store(MasterKey::generate());
    let keep = s.put(b"keep")?;
    let gone = s.put(b"gone")?;
    s.delete(&gone.id)?;
    assert!(matches!(s.get(&gone.id), Err(StoreError::NotFound { .. })));
    assert!(matches!(
        s.open_blob(&gone.id),
        Err(StoreError::NotFound { .. })
    ));
    s.delete(&gone.id)?;
    assert_eq!(s.get(&keep.id)?, b"keep");
    Ok(())
}

/// The orphan sweep as `Archive::sweep_orphans` does it: list, keep what is
/// referenced or younger than `min_age`, delete the rest.
fn sweep(s: &BlobStore, referenced: &BTreeSet<BlobId>, min_age: Duration) -> usize {
    let now = SystemTime::now();
    let mut removed = 0;
    for (id, mtime) in s.list().unwrap_or_else(|e| panic!("list: {e}")) {
        let old = now.duration_since(mtime).is_ok_and(|age| age >= min_age);
        if old && !referenced.contains(&id) {
            s.delete(&id).unwrap_or_else(|e| panic!("delete: {e}"));
            removed += 1;
        }
    }
    removed
}

/// list returns exactly the blobs (with a last-modified time near now); an
/// age-guarded sweep spares young blobs, a sweep without guard removes the
/// unreferenced ones only.
fn list_and_age_guarded_sweep(e: &dyn Engine) -> TestResult {
    let s = e.store(MasterKey::generate());
    let before = SystemTime::now() - Duration::from_secs(300);
    let ids: Vec<BlobId> = (0..3)
        .map(|i| s.put(&pattern(100 + i, 5)).map(|b| b.id))
        .collect::<Result<_, _>>()?;
    let listed = s.list()?;
    let listed_ids: BTreeSet<BlobId> = listed.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(listed_ids, ids.iter().cloned().collect::<BTreeSet<_>>());
    for (_, t) in &listed {
        assert!(
            *t > before && *t < SystemTime::now() + Duration::from_secs(300),
            "last-modified {t:?} not near now"
        );
    }
    let referenced: BTreeSet<BlobId> = ids[..1].iter().cloned().collect();
    assert_eq!(sweep(&s, &referenced, Duration::from_secs(3600)), 0);
    assert_eq!(s.list()?.len(), 3, "the age guard spares young blobs");
    assert_eq!(sweep(&s, &referenced, Duration::ZERO), 2);
    let left: Vec<BlobId> = s.list()?.into_iter().map(|(id, _)| id).collect();
    assert_eq!(left, vec![ids[0].clone()]);
    assert!(s.check().is_ok(), "check passes on a working store");
    Ok(())
}

/// Another master key cannot read (UnknownKey); wrong credentials (engines that
/// have any) fail check, put and get with Denied, never a success.
fn wrong_key_or_credentials(e: &dyn Engine) -> TestResult {
    let master = MasterKey::generate();
    let s = e.store(master.clone());
    let info = s.put(b"secret bytes")?;
    // Same location, another key: the index would be unreadable too; the blob is.
    let wrong_key = e.store(MasterKey::generate());
    match wrong_key.get(&info.id) {
        Err(StoreError::UnknownKey { key_id }) => assert_eq!(key_id, master.key_id()),
        other => panic!("wrong master key: expected UnknownKey, got {other:?}"),
    }
    if let Some(bad) = e.with_wrong_credentials(master) {
        let denied = |r: Result<(), StoreError>, what: &str| match r {
            Err(StoreError::Denied { .. }) => {}
            other => panic!("{what} with wrong credentials: expected Denied, got {other:?}"),
        };
        denied(bad.check(), "check");
        denied(bad.put(b"x").map(|_| ()), "put");
        denied(bad.get(&info.id).map(|_| ()), "get");
        if let Err(err) = bad.check() {
            let text = err.to_string();
            assert!(!text.contains(WRONG_SECRET), "secret echoed: {text}");
        }
    }
    Ok(())
}

/// An unreachable store fails every operation with an error (never a success, and
/// a read is not "not found").
fn unreachable_store_is_an_error(e: &dyn Engine) -> TestResult {
    let s = e.unreachable(MasterKey::generate());
    assert!(s.check().is_err(), "check");
    match s.put(b"lost?") {
        Err(StoreError::Unavailable { .. }) | Err(StoreError::Io { .. }) => {}
        other => panic!("put on an unreachable store: {other:?}"),
    }
    let id = BlobId::parse("00112233445566778899aabbccddeeff")?;
    match s.get(&id) {
        Err(StoreError::Unavailable { .. }) => {}
        // A removed directory holds nothing.
        Err(StoreError::NotFound { .. }) if s.root().is_some() => {}
        other => panic!("get on an unreachable store: {other:?}"),
    }
    assert!(s.list().is_err(), "list");
    Ok(())
}

const WRONG_SECRET: &str = "wrong-secret-access-key-0123456789";

// ---------------------------------------------------------------------------
// Engine: the local directory.

struct Local {
    dir: tempfile::TempDir,
}

impl Local {
    fn new() -> Option<Local> {
        Some(Local {
            dir: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
        })
    }

    fn path(&self, id: &BlobId) -> std::path::PathBuf {
        self.dir
            .path()
            .join("blobs")
            .join(&id.as_str()[..2])
            .join(id.as_str())
    }
}

impl Engine for Local {
    fn store(&self, master: MasterKey) -> BlobStore {
        BlobStore::open(&self.dir.path().join("blobs"), master)
            .unwrap_or_else(|e| panic!("open: {e}"))
    }
    fn read_raw(&self, id: &BlobId) -> Vec<u8> {
        std::fs::read(self.path(id)).unwrap_or_else(|e| panic!("read: {e}"))
    }
    fn write_raw(&self, id: &BlobId, bytes: &[u8]) {
        std::fs::write(self.path(id), bytes).unwrap_or_else(|e| panic!("write: {e}"))
    }
    fn with_wrong_credentials(&self, _: MasterKey) -> Option<BlobStore> {
        None
    }
    fn unreachable(&self, master: MasterKey) -> BlobStore {
        let root = self.dir.path().join("gone");
        let s = BlobStore::open(&root, master).unwrap_or_else(|e| panic!("open: {e}"));
        std::fs::remove_dir_all(&root).unwrap_or_else(|e| panic!("remove: {e}"));
        s
    }
}

// ---------------------------------------------------------------------------
// Engine: an S3-compatible store (Garage in CI).

const S3_VARS: &str = "BASTION_TEST_S3_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY";

struct S3 {
    location: S3Location,
    key_id: String,
    secret: String,
    /// Raw access for tampering, on its own client and runtime.
    raw: std::sync::Arc<dyn object_store::ObjectStore>,
    rt: tokio::runtime::Runtime,
}

impl S3 {
    /// The engine on a fresh random prefix of the test bucket, or `None` (with a
    /// SKIP line) when the variables are not set.
    fn new() -> Option<S3> {
        let (Ok(url), Ok(key_id), Ok(secret)) = (
            std::env::var("BASTION_TEST_S3_URL"),
            std::env::var("AWS_ACCESS_KEY_ID"),
            std::env::var("AWS_SECRET_ACCESS_KEY"),
        ) else {
            println!("SKIP: S3 conformance tests need {S3_VARS} (scripts/garage.sh sets them)");
            return None;
        };
        let mut location = S3Location::parse(&url).unwrap_or_else(|e| panic!("{e}"));
        let mut r = [0u8; 8];
        getrandom(&mut r);
        let test_prefix = format!("conformance-{}", hex(&r));
        location.prefix = if location.prefix.is_empty() {
            test_prefix
        } else {
            format!("{}/{test_prefix}", location.prefix)
        };
        let mut b = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(&location.region)
            .with_access_key_id(&key_id)
            .with_secret_access_key(&secret)
            .with_virtual_hosted_style_request(false);
        if let Some(ep) = &location.endpoint {
            b = b
                .with_endpoint(ep)
                .with_client_options(object_store::ClientOptions::new().with_allow_http(true));
        }
        let raw = std::sync::Arc::new(b.build().unwrap_or_else(|e| panic!("raw client: {e}")));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        Some(S3 {
            location,
            key_id,
            secret,
            raw,
            rt,
        })
    }

    fn key(&self, id: &BlobId) -> object_store::path::Path {
        object_store::path::Path::from(format!("{}/{}", self.location.prefix, id.as_str()))
    }

    fn open_with(&self, location: &S3Location, secret: &str, master: MasterKey) -> BlobStore {
        let creds = S3Credentials::new(&self.key_id, secret).unwrap_or_else(|e| panic!("{e}"));
        BlobStore::open_s3(location, creds, master, Vec::new()).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Engine for S3 {
    fn store(&self, master: MasterKey) -> BlobStore {
        self.open_with(&self.location, &self.secret, master)
    }
    fn read_raw(&self, id: &BlobId) -> Vec<u8> {
        use object_store::ObjectStoreExt;
        let (raw, key) = (self.raw.clone(), self.key(id));
        self.rt
            .block_on(async move { raw.get(&key).await?.bytes().await })
            .unwrap_or_else(|e| panic!("raw get: {e}"))
            .to_vec()
    }
    fn write_raw(&self, id: &BlobId, bytes: &[u8]) {
        use object_store::ObjectStoreExt;
        let (raw, key) = (self.raw.clone(), self.key(id));
        let payload = object_store::PutPayload::from(bytes.to_vec());
        self.rt
            .block_on(async move { raw.put(&key, payload).await })
            .unwrap_or_else(|e| panic!("raw put: {e}"));
    }
    fn with_wrong_credentials(&self, master: MasterKey) -> Option<BlobStore> {
        Some(self.open_with(&self.location, WRONG_SECRET, master))
    }
    fn unreachable(&self, master: MasterKey) -> BlobStore {
        let mut l = self.location.clone();
        l.endpoint = Some(format!("http://127.0.0.1:{}", closed_port()));
        self.open_with(&l, &self.secret, master)
    }
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    l.local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"))
        .port()
}

fn getrandom(out: &mut [u8]) {
    use rand::RngCore;
    rand::rngs::OsRng.fill_bytes(out);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Every case against every engine.

macro_rules! conformance {
    ($engine:ident, $new:expr) => {
        mod $engine {
            use super::*;

            fn run(case: fn(&dyn Engine) -> TestResult) -> TestResult {
                match $new {
                    Some(e) => case(&e),
                    None => Ok(()),
                }
            }

            #[test]
            fn put_get_bit_identical() -> TestResult {
                run(super::put_get_bit_identical)
            }
            #[test]
            fn segment_reads_of_a_multi_segment_blob() -> TestResult {
                run(super::segment_reads_of_a_multi_segment_blob)
            }
            #[test]
            fn tamper_detection() -> TestResult {
                run(super::tamper_detection)
            }
            #[test]
            fn delete() -> TestResult {
                run(super::delete)
            }
            #[test]
            fn list_and_age_guarded_sweep() -> TestResult {
                run(super::list_and_age_guarded_sweep)
            }
            #[test]
            fn wrong_key_or_credentials() -> TestResult {
                run(super::wrong_key_or_credentials)
            }
            #[test]
            fn unreachable_store_is_an_error() -> TestResult {
                run(super::unreachable_store_is_an_error)
            }
        }
    };
}

conformance!(local, Local::new());
conformance!(s3, S3::new());

/// Runs without any S3 server: a store whose endpoint is a closed port fails
/// `check`, `put`, `get` and `list` with `Unavailable` within the client's
/// bounded retries, and the error names neither secret nor access key id.
#[test]
fn s3_endpoint_on_a_closed_port_is_unavailable() -> TestResult {
    let location = S3Location::parse(&format!(
        "s3://bastion-test?endpoint=http://127.0.0.1:{}&region=garage",
        closed_port()
    ))?;
    let creds = S3Credentials::new("GKaccesskeyid0001", WRONG_SECRET)?;
    let s = BlobStore::open_s3(&location, creds, MasterKey::generate(), Vec::new())?;
    let unavailable = |r: Result<(), StoreError>, what: &str| match r {
        Err(e @ StoreError::Unavailable { .. }) => {
            let text = e.to_string();
            assert!(
                !text.contains(WRONG_SECRET) && !text.contains("GKaccesskeyid0001"),
                "{what}: {text}"
            );
            assert!(text.contains("127.0.0.1"), "{what} names the store: {text}");
        }
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    };
    unavailable(s.check(), "check");
    unavailable(s.put(b"x").map(|_| ()), "put");
    unavailable(
        s.put(&pattern(9 * 1024 * 1024, 7)).map(|_| ()),
        "multipart put",
    );
    let id = BlobId::parse("00112233445566778899aabbccddeeff")?;
    unavailable(s.get(&id).map(|_| ()), "get");
    unavailable(s.list().map(|_| ()), "list");
    unavailable(s.delete(&id), "delete");
    Ok(())
}

/// A bucket that does not exist fails `check` (what `serve` runs before it
/// accepts work), and a put there is never a success. Needs the S3 engine.
#[test]
fn s3_missing_bucket_fails_check() -> TestResult {
    let Some(e) = S3::new() else { return Ok(()) };
    let mut l = e.location.clone();
    l.bucket = format!("no-such-bucket-{}", &l.prefix[l.prefix.len() - 8..]);
    let s = e.open_with(&l, &e.secret, MasterKey::generate());
    match s.check() {
        Err(StoreError::Unavailable { .. }) | Err(StoreError::Denied { .. }) => {}
        other => panic!("check on a missing bucket: {other:?}"),
    }
    assert!(s.put(b"x").is_err(), "put into a missing bucket succeeded");
    Ok(())
}
