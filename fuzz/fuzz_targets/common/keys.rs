//! Fixed, public keys of the `blob_reader` and `audit_record` targets (their
//! file-mode seeds are encrypted under them). Never used outside `fuzz/`.
#![allow(dead_code)] // each target uses some of these

/// The blob store's master key.
pub const BLOB_MASTER_KEY: [u8; 32] = [0x42; 32];
/// The audit trail's AES-256-GCM key.
pub const AUDIT_AEAD_KEY: [u8; 32] = [0x24; 32];
/// Seed of the audit trail's Ed25519 checkpoint signing key.
pub const AUDIT_SIGNING_SEED: [u8; 32] = [0x17; 32];

/// A scratch directory for this process (tmpfs when there is one).
pub fn scratch(name: &str) -> std::path::PathBuf {
    let base = std::path::Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("bastion-fuzz-{name}-{}", std::process::id()))
}

/// With `BASTION_FUZZ_SEEDS=DIR` set, a round-trip mode writes the real
/// files it produced as a "file"-mode input into `DIR` (how the committed
/// seeds of `blob_reader` and `audit_record` were made; see fuzz/README.md).
pub fn save_seed(input: &[u8]) {
    use std::hash::{Hash, Hasher};
    let Some(dir) = std::env::var_os("BASTION_FUZZ_SEEDS") else {
        return;
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut h);
    let dir = std::path::PathBuf::from(dir);
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{:016x}", h.finish())), input);
}
