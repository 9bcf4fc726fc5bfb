//! The blob reader (`crates/store/src/lib.rs`: `BlobStore::open_blob`,
//! `BlobReader::next_segment`; the versioned header and STREAM segments
//! documented there) on files the fuzzer writes into a store directory.
//!
//! Input: byte 0 bit 0 selects the mode.
//! - 0, "file": the next 32 bytes are the blob id (hex), the rest is the
//!   blob file; the reader must fail cleanly or return plaintext (the seeds
//!   are real blobs, so the decryption path is reached).
//! - 1, "tamper": bytes 1..3 = a position, byte 3 = an XOR mask, byte 4 bit 0
//!   = truncate instead; the rest is plaintext. It is `put`, read back (must
//!   be equal), then the file is altered at the position: the read must then
//!   fail (authenticated encryption), never return other bytes.
#![no_main]

use std::sync::OnceLock;

use bastion_store::{BlobId, BlobStore, MasterKey};
use libfuzzer_sys::fuzz_target;

#[path = "common/keys.rs"]
mod keys;

fn store() -> &'static BlobStore {
    static STORE: OnceLock<BlobStore> = OnceLock::new();
    STORE.get_or_init(|| {
        BlobStore::open(
            &keys::scratch("blob"),
            MasterKey::from_bytes(keys::BLOB_MASTER_KEY),
        )
        .expect("a scratch store")
    })
}

fn path_of(id: &BlobId) -> std::path::PathBuf {
    // The documented layout: <root>/<first two hex digits>/<id>.
    store()
        .root()
        .expect("the fuzz store is a local directory")
        .join(&id.as_str()[..2]).join(id.as_str())
}

fn read_all(id: &BlobId) -> Result<Vec<u8>, bastion_store::StoreError> {
    let mut reader = store().open_blob(id)?;
    let mut out = Vec::new();
    while let Some(segment) = reader.next_segment()? {
        out.extend_from_slice(segment);
    }
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if rest.len() < 32 {
            return;
        }
        let (id, file) = rest.split_at(32);
        let Ok(id) = BlobId::parse(&String::from_utf8_lossy(id)) else {
            return;
        };
        let path = path_of(&id);
        std::fs::create_dir_all(path.parent().expect("a shard")).expect("scratch dir");
        std::fs::write(&path, file).expect("scratch write");
        let _ = read_all(&id);
        let _ = store().delete(&id);
        return;
    }
    if rest.len() < 4 {
        return;
    }
    let (spec, plaintext) = rest.split_at(4);
    let info = store().put(plaintext).expect("put into a scratch store");
    assert_eq!(info.plaintext_len, plaintext.len() as u64);
    assert_eq!(
        read_all(&info.id).expect("a blob just written reads"),
        plaintext
    );
    let path = path_of(&info.id);
    let mut file = std::fs::read(&path).expect("the blob file");
    keys::save_seed(&[&[0u8][..], info.id.as_str().as_bytes(), &file].concat());
    let at = usize::from(u16::from_be_bytes([spec[0], spec[1]])) % file.len();
    let altered = if spec[3] & 1 == 1 {
        file.truncate(at);
        true
    } else {
        file[at] ^= spec[2];
        spec[2] != 0
    };
    std::fs::write(&path, &file).expect("scratch write");
    match read_all(&info.id) {
        Ok(back) if altered => panic!("an altered blob was read ({} bytes)", back.len()),
        Ok(back) => assert_eq!(back, plaintext),
        Err(_) => assert!(altered, "an unaltered blob failed to read"),
    }
    store().delete(&info.id).expect("delete");
});
