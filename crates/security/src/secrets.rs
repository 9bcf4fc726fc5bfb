//! Secret files: created 0600, refused when readable by group or others.

use std::{
    fs::OpenOptions,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use crate::{io_err, Result, SecurityError};

/// Writes a new secret file with mode 0600 and fsyncs it.
///
/// # Errors
/// [`SecurityError::Io`] when the file already exists or cannot be written.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with_mode(path, bytes, 0o600)
}

/// Writes a new public file (certificates) with mode 0644 and fsyncs it.
///
/// # Errors
/// [`SecurityError::Io`] when the file already exists or cannot be written.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with_mode(path, bytes, 0o644)
}

fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("create", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

/// Checks that a secret file grants nothing to group or others.
///
/// # Errors
/// [`SecurityError::InsecurePermissions`] when `mode & 0o077 != 0`;
/// [`SecurityError::Io`] when the file cannot be inspected.
pub fn check_private(path: &Path) -> Result<()> {
    let mode = std::fs::metadata(path)
        .map_err(io_err("inspect", path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(SecurityError::InsecurePermissions {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Reads a secret file after [`check_private`].
///
/// # Errors
/// As [`check_private`], or [`SecurityError::Io`] on read failure.
pub fn read_secret(path: &Path) -> Result<Vec<u8>> {
    check_private(path)?;
    std::fs::read(path).map_err(io_err("read", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_0600_and_group_readable_is_refused() -> Result<()> {
        let dir = tempfile::tempdir().map_err(io_err("tempdir", Path::new("/tmp")))?;
        let p = dir.path().join("k");
        write_secret(&p, b"abc")?;
        let mode = std::fs::metadata(&p)
            .map(|m| m.permissions().mode() & 0o777)
            .ok();
        assert_eq!(mode, Some(0o600));
        assert_eq!(read_secret(&p)?, b"abc");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640))
            .map_err(io_err("chmod", &p))?;
        assert!(matches!(
            check_private(&p),
            Err(SecurityError::InsecurePermissions { mode: 0o640, .. })
        ));
        Ok(())
    }
}
