//! Integration tests of bastion-security: a real SQLCipher database in a
//! temporary directory, real argon2.

mod accounts;

/// Set in the child run of [`wrong_key_prints_nothing_on_stderr`].
const QUIET_CHILD: &str = "BASTION_SECURITY_TEST_WRONG_KEY_CHILD";

/// A wrong key is `SecurityError::WrongKey`, not SQLCipher log lines on
/// stderr (`hmac check failed`): SQLCipher writes to the process's stderr
/// directly, so this runs the test binary again and reads what it printed.
#[test]
fn wrong_key_prints_nothing_on_stderr() -> Result<(), Box<dyn std::error::Error>> {
    use bastion_security::db::SecurityDb;
    if let Some(dir) = std::env::var_os(QUIET_CHILD) {
        let path = std::path::Path::new(&dir).join("security.db");
        drop(SecurityDb::open(&path, &[7u8; 32])?);
        assert!(matches!(
            SecurityDb::open(&path, &[8u8; 32]),
            Err(bastion_security::DbError::WrongKey(_))
        ));
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "wrong_key_prints_nothing_on_stderr",
            "--nocapture",
        ])
        .env(QUIET_CHILD, dir.path())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the child did not run the test"
    );
    assert!(!stderr.contains("hmac check failed"), "{stderr}");
    Ok(())
}
