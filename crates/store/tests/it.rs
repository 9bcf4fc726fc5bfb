//! Integration tests for `bastion-store`: round trips, tamper detection, key files, NoSpace.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bastion_store::{BlobId, BlobStore, MasterKey, StoreError, HEADER_LEN, SEGMENT_SIZE};
use sha2::{Digest, Sha256};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn store() -> Result<(tempfile::TempDir, BlobStore), StoreError> {
    let dir = tempfile::tempdir().map_err(|source| StoreError::Source { source })?;
    let s = BlobStore::open(&dir.path().join("blobs"), MasterKey::generate())?;
    Ok((dir, s))
}

/// The root of a store opened on a directory.
fn root(s: &BlobStore) -> &Path {
    s.root()
        .unwrap_or_else(|| panic!("a directory store has a root"))
}

fn blob_file(s: &BlobStore, id: &BlobId) -> PathBuf {
    root(s).join(&id.as_str()[..2]).join(id.as_str())
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ (i >> 8) as u8).collect()
}

const SEG_CT: usize = SEGMENT_SIZE as usize + 16;

#[test]
fn round_trip_sizes() -> TestResult {
    let (_d, s) = store()?;
    for len in [0usize, 1, 65535, 65536, 65537, 1024 * 1024 + 3] {
        let data = pattern(len);
        let info = s.put(&data)?;
        assert_eq!(info.plaintext_len, len as u64);
        assert_eq!(info.sha256, <[u8; 32]>::from(Sha256::digest(&data)));
        assert_eq!(info.key_id, s.key_id());
        let file_len = fs::metadata(blob_file(&s, &info.id))?.len() as usize;
        let segments = if len == 0 { 1 } else { len.div_ceil(65536) };
        assert_eq!(file_len, HEADER_LEN + len + 16 * segments, "len {len}");
        assert_eq!(s.get(&info.id)?, data, "len {len}");

        // Streaming put and streaming read agree.
        let info2 = s.put_reader(&mut &data[..])?;
        let mut back = Vec::new();
        s.open_blob(&info2.id)?.read_to_end(&mut back)?;
        assert_eq!(back, data);
    }
    Ok(())
}

/// A reader that hands out one byte at a time exercises the short-read handling.
struct Trickle<'a>(&'a [u8]);
impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0.is_empty() || buf.is_empty() {
            return Ok(0);
        }
        buf[0] = self.0[0];
        self.0 = &self.0[1..];
        Ok(1)
    }
}

#[test]
fn put_reader_handles_short_reads() -> TestResult {
    let (_d, s) = store()?;
    let data = pattern(65536 * 2 + 10);
    let info = s.put_reader(&mut Trickle(&data))?;
    assert_eq!(s.get(&info.id)?, data);
    Ok(())
}

#[test]
fn ciphertext_hides_plaintext() -> TestResult {
    let (_d, s) = store()?;
    let marker = b"Zyxwvut^Qqq-PLAINTEXT-MARKER";
    let mut data = Vec::new();
    for _ in 0..5000 {
        data.extend_from_slice(marker);
    }
    let info = s.put(&data)?;
    let raw = fs::read(blob_file(&s, &info.id))?;
    assert!(!raw.windows(marker.len()).any(|w| w == marker));
    assert!(!raw.windows(7).any(|w| w == b"Zyxwvut"));
    Ok(())
}

fn expect_corrupt(r: Result<Vec<u8>, StoreError>, what: &str) {
    match r {
        Err(StoreError::Corrupt { .. }) => {}
        other => panic!("{what}: expected Corrupt, got {other:?}"),
    }
}

#[test]
fn tampering_is_detected() -> TestResult {
    let (_d, s) = store()?;
    let data = pattern(3 * 65536 + 100); // 4 segments
    let info = s.put(&data)?;
    let path = blob_file(&s, &info.id);
    let orig = fs::read(&path)?;

    // Flip a byte in every region: header fields, each segment.
    for pos in [
        0,
        8,
        10,
        20,
        35,
        60,
        92,
        HEADER_LEN + 5,
        HEADER_LEN + SEG_CT + 1,
        orig.len() - 1,
    ] {
        let mut b = orig.clone();
        b[pos] ^= 0x01;
        fs::write(&path, &b)?;
        match s.get(&info.id) {
            Err(StoreError::Corrupt { .. }) | Err(StoreError::UnknownKey { .. }) => {}
            other => panic!("flip at {pos}: expected Corrupt, got {other:?}"),
        }
    }

    // Truncate the last segment.
    fs::write(&path, &orig[..orig.len() - 10])?;
    expect_corrupt(s.get(&info.id), "truncated last segment");

    // Drop the whole last segment (file ends at a segment boundary).
    fs::write(&path, &orig[..HEADER_LEN + 3 * SEG_CT])?;
    expect_corrupt(s.get(&info.id), "dropped last segment");

    // Drop a middle segment.
    let mut b = orig[..HEADER_LEN + SEG_CT].to_vec();
    b.extend_from_slice(&orig[HEADER_LEN + 2 * SEG_CT..]);
    fs::write(&path, &b)?;
    expect_corrupt(s.get(&info.id), "dropped middle segment");

    // Swap two segments.
    let mut b = orig[..HEADER_LEN].to_vec();
    b.extend_from_slice(&orig[HEADER_LEN + SEG_CT..HEADER_LEN + 2 * SEG_CT]);
    b.extend_from_slice(&orig[HEADER_LEN..HEADER_LEN + SEG_CT]);
    b.extend_from_slice(&orig[HEADER_LEN + 2 * SEG_CT..]);
    fs::write(&path, &b)?;
    expect_corrupt(s.get(&info.id), "reordered segments");

    // Appended garbage.
    let mut b = orig.clone();
    b.extend_from_slice(&[0u8; 32]);
    fs::write(&path, &b)?;
    expect_corrupt(s.get(&info.id), "appended bytes");

    // Header only, no segments; and a truncated header.
    fs::write(&path, &orig[..HEADER_LEN])?;
    expect_corrupt(s.get(&info.id), "no segments");
    fs::write(&path, &orig[..50])?;
    expect_corrupt(s.get(&info.id), "short header");

    // Intact again.
    fs::write(&path, &orig)?;
    assert_eq!(s.get(&info.id)?, data);
    Ok(())
}

/// Format version 2 binds a blob to its id: a blob file copied over another
/// id's file (a swap on disk) fails authentication instead of returning the
/// other blob's plaintext.
#[test]
fn a_blob_file_moved_to_another_id_is_detected() -> TestResult {
    let (_d, s) = store()?;
    let a = s.put(b"instance A")?;
    let b = s.put(b"instance B")?;
    assert!(s.open_blob(&a.id)?.bound_to_id());
    fs::copy(blob_file(&s, &b.id), blob_file(&s, &a.id))?;
    expect_corrupt(s.get(&a.id), "blob B under id A");
    assert_eq!(s.get(&b.id)?, b"instance B");
    Ok(())
}

#[test]
fn empty_blob_cannot_be_extended_or_emptied() -> TestResult {
    let (_d, s) = store()?;
    let info = s.put(b"")?;
    let path = blob_file(&s, &info.id);
    let orig = fs::read(&path)?;
    assert_eq!(orig.len(), HEADER_LEN + 16);
    fs::write(&path, &orig[..HEADER_LEN])?;
    expect_corrupt(s.get(&info.id), "missing empty final segment");
    Ok(())
}

#[test]
fn wrong_master_key_is_refused() -> TestResult {
    let d = tempfile::tempdir()?;
    let root = d.path().join("blobs");
    let k1 = MasterKey::generate();
    let info = BlobStore::open(&root, k1.clone())?.put(b"secret")?;
    let other = BlobStore::open(&root, MasterKey::generate())?;
    match other.get(&info.id) {
        Err(StoreError::UnknownKey { key_id }) => assert_eq!(key_id, k1.key_id()),
        r => panic!("expected UnknownKey, got {r:?}"),
    }
    // After rotation the old key still reads old blobs.
    let rotated = BlobStore::open_with_previous(&root, MasterKey::generate(), vec![k1])?;
    assert_eq!(rotated.get(&info.id)?, b"secret");
    Ok(())
}

#[test]
fn blob_id_parsing() {
    for bad in [
        "../x",
        "",
        "0123456789abcdef0123456789ABCDEF",
        "0123456789abcdef0123456789abcde",
        "0123456789abcdef0123456789abcdef0",
        "../../../../../../../../etc/pass",
        "0123456789abcdef/123456789abcdef",
        "0123456789abcdef0123456789abcdeg",
    ] {
        assert!(
            matches!(BlobId::parse(bad), Err(StoreError::InvalidBlobId(_))),
            "{bad:?} accepted"
        );
    }
    let ok = "0123456789abcdef0123456789abcdef";
    assert!(BlobId::parse(ok).is_ok_and(|id| id.as_str() == ok && id.to_string() == ok));
}

#[test]
fn missing_blob_and_delete() -> TestResult {
    let (_d, s) = store()?;
    let id = BlobId::parse("00000000000000000000000000000000")?;
    assert!(matches!(s.get(&id), Err(StoreError::NotFound { .. })));
    s.delete(&id)?; // NotFound is Ok
    let info = s.put(b"x")?;
    s.delete(&info.id)?;
    assert!(matches!(s.get(&info.id), Err(StoreError::NotFound { .. })));
    Ok(())
}

#[test]
fn key_files() -> TestResult {
    let d = tempfile::tempdir()?;
    let path = d.path().join("master.key");
    let k = MasterKey::generate();
    k.write_hex_file(&path)?;
    assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
    assert_eq!(MasterKey::load_hex_file(&path)?.as_bytes(), k.as_bytes());
    // Never overwritten.
    assert!(matches!(
        MasterKey::generate().write_hex_file(&path),
        Err(StoreError::Io { .. })
    ));

    fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
    assert!(matches!(
        MasterKey::load_hex_file(&path),
        Err(StoreError::InsecurePermissions { .. })
    ));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640))?;
    assert!(matches!(
        MasterKey::load_hex_file(&path),
        Err(StoreError::InsecurePermissions { .. })
    ));

    let bad = d.path().join("bad.key");
    for content in ["abc\n", &"zz".repeat(32), &"ab".repeat(33)] {
        let _ = fs::remove_file(&bad);
        fs::write(&bad, content)?;
        fs::set_permissions(&bad, fs::Permissions::from_mode(0o600))?;
        assert!(
            matches!(
                MasterKey::load_hex_file(&bad),
                Err(StoreError::InvalidKeyFile { .. })
            ),
            "{content:?}"
        );
    }
    // Without newline is fine too.
    fs::write(&bad, hex::encode(k.as_bytes()))?;
    assert_eq!(MasterKey::load_hex_file(&bad)?.key_id(), k.key_id());
    Ok(())
}

#[test]
fn list_returns_puts() -> TestResult {
    let (_d, s) = store()?;
    let mut ids: Vec<BlobId> = (0..20)
        .map(|i| s.put(&[i as u8; 10]).map(|b| b.id))
        .collect::<Result<_, _>>()?;
    // Noise that list must ignore.
    fs::write(root(&s).join("README"), "x")?;
    fs::create_dir_all(root(&s).join("zz"))?;
    let mut listed: Vec<BlobId> = s.list()?.into_iter().map(|(id, _)| id).collect();
    ids.sort();
    listed.sort();
    assert_eq!(ids, listed);
    Ok(())
}

#[test]
fn sweep_tmp_removes_old_files() -> TestResult {
    let (_d, s) = store()?;
    let stale = root(&s).join("tmp").join("stale.tmp");
    fs::write(&stale, "x")?;
    assert_eq!(s.sweep_tmp(Duration::from_secs(3600))?, 0);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(s.sweep_tmp(Duration::from_millis(1))?, 1);
    assert!(!stale.exists());
    Ok(())
}

#[test]
fn directories_are_private() -> TestResult {
    let (_d, s) = store()?;
    let info = s.put(b"x")?;
    for dir in [
        root(&s).to_path_buf(),
        root(&s).join("tmp"),
        root(&s).join(&info.id.as_str()[..2]),
    ] {
        assert_eq!(fs::metadata(&dir)?.permissions().mode() & 0o777, 0o700);
    }
    assert_eq!(
        fs::metadata(blob_file(&s, &info.id))?.permissions().mode() & 0o777,
        0o600
    );
    Ok(())
}

/// Unmounts on drop so a failing assertion does not leave a mount behind.
struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_tiny_tmpfs(dir: &Path) -> Option<Mount> {
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"])
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Mount(dir.to_path_buf()))
}

#[test]
fn full_disk_gives_no_space_and_leaves_no_garbage() -> TestResult {
    let d = tempfile::tempdir()?;
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt)?;
    let Some(_mount) = mount_tiny_tmpfs(&mnt) else {
        eprintln!("skipping: cannot mount tmpfs (not root?)");
        return Ok(());
    };
    let s = BlobStore::open(&mnt.join("blobs"), MasterKey::generate())?;
    let small = s.put(b"fits")?;
    match s.put(&pattern(1024 * 1024)) {
        Err(StoreError::NoSpace { .. }) => {}
        r => panic!("expected NoSpace, got {r:?}"),
    }
    // Streaming variant too.
    match s.put_reader(&mut &pattern(1024 * 1024)[..]) {
        Err(StoreError::NoSpace { .. }) => {}
        r => panic!("expected NoSpace, got {r:?}"),
    }
    assert_eq!(fs::read_dir(mnt.join("blobs").join("tmp"))?.count(), 0);
    assert_eq!(s.list()?.len(), 1);
    assert_eq!(s.get(&small.id)?, b"fits");
    Ok(())
}
