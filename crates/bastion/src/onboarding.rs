//! First-run guidance: where the web UI is, and the initial admin password
//! file `DIR/initial-admin-password` (written by `init`, shown once).
//!
//! - [`web_ui_line`]: the one line `serve` logs at start with the web UI's
//!   address.
//! - [`InitialPasswordCleanup`]: an [`EventObserver`] that deletes the file
//!   as soon as the `admin` account's password is changed — by the holder
//!   (`user.password_changed`: the web UI's first-login change) or set by
//!   an administrator (`user.password_set`: `bastion user passwd admin`,
//!   the admin API): from then on the file holds a password that no longer
//!   opens anything, and a plaintext password on disk is worth nothing but
//!   to an intruder who finds a habit of reusing it.
//! - [`remove_if_stale`]: the same at `serve` start, for a change made
//!   without the observer (an older version, a process that failed before
//!   recording): the file is deleted when its password no longer opens
//!   `admin`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use bastion_security::{
    db::SecurityDb,
    events::{EventLog, EventObserver},
    users,
};
use serde_json::{Map, Value};

use crate::datadir::DataDir;

/// The account `init` creates, whose password the file holds.
const INITIAL_ADMIN: &str = "admin";

/// The log line that says where the web UI is, for the HTTPS listener bound
/// to `addr`. `first_run`: the initial admin password file is still there
/// (nobody has changed that password yet); `totp_required`: admins must set
/// up a second factor (`[accounts] admin_requires_totp`).
pub fn web_ui_line(addr: SocketAddr, first_run: bool, totp_required: bool) -> String {
    let mut notes = Vec::new();
    let url = if addr.ip().is_unspecified() {
        notes.push("bound to all interfaces".to_owned());
        format!("https://<this host's name or address>:{}/", addr.port())
    } else {
        format!("https://{addr}/")
    };
    if first_run {
        notes.push("log in as admin".to_owned());
        if totp_required {
            notes.push("first login sets up two-factor authentication".to_owned());
        }
    }
    if notes.is_empty() {
        format!("web UI: {url}")
    } else {
        format!("web UI: {url} ({})", notes.join("; "))
    }
}

/// Deletes the initial admin password file when the `admin` account's
/// password changes (see the module documentation).
pub struct InitialPasswordCleanup {
    path: PathBuf,
}

impl InitialPasswordCleanup {
    /// The observer for `dir`'s file.
    pub fn new(dir: &DataDir) -> InitialPasswordCleanup {
        InitialPasswordCleanup {
            path: dir.admin_password(),
        }
    }
}

impl EventObserver for InitialPasswordCleanup {
    fn observe(&self, event: &Map<String, Value>) {
        let kind = event.get("type").and_then(Value::as_str);
        let success = event.get("outcome").and_then(Value::as_str) == Some("success");
        let user = event.get("username").and_then(Value::as_str);
        if matches!(kind, Some("user.password_changed" | "user.password_set"))
            && success
            && user == Some(INITIAL_ADMIN)
        {
            remove(&self.path, "the admin password was changed");
        }
    }
}

/// Watches `events` (a CLI command's log, or serve's) for a change of the
/// `admin` password, to delete the initial password file then.
pub fn watch(dir: &DataDir, events: &EventLog) {
    events.add_observer(std::sync::Arc::new(InitialPasswordCleanup::new(dir)));
}

/// At `serve` start: deletes the initial admin password file when the
/// password in it no longer opens the `admin` account (changed, or the
/// account removed). One argon2id verification, only while the file exists.
pub fn remove_if_stale(dir: &DataDir, security: &SecurityDb) {
    let path = dir.admin_password();
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    match users::verify_password(security, INITIAL_ADMIN, text.trim()) {
        Ok(true) => {}
        Ok(false) => remove(&path, "it no longer opens the admin account"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot check the initial admin password file")
        }
    }
}

fn remove(path: &Path, why: &str) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!("removed {} ({why})", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(
            error = %e,
            "cannot remove {} ({why}); delete it by hand",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary directory, removed
    /// when dropped (this crate has no tempfile dependency).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            let p = std::env::temp_dir().join(format!(
                "bastion-onboarding-{name}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&p).expect("temp dir");
            TempDir(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_web_ui_line() {
        let a: SocketAddr = "127.0.0.1:8443".parse().expect("addr");
        assert_eq!(
            web_ui_line(a, true, true),
            "web UI: https://127.0.0.1:8443/ (log in as admin; first login sets up \
             two-factor authentication)"
        );
        assert_eq!(
            web_ui_line(a, true, false),
            "web UI: https://127.0.0.1:8443/ (log in as admin)"
        );
        assert_eq!(
            web_ui_line(a, false, true),
            "web UI: https://127.0.0.1:8443/"
        );
        let any: SocketAddr = "0.0.0.0:443".parse().expect("addr");
        assert_eq!(
            web_ui_line(any, false, true),
            "web UI: https://<this host's name or address>:443/ (bound to all interfaces)"
        );
        let v6: SocketAddr = "[::1]:8443".parse().expect("addr");
        assert_eq!(web_ui_line(v6, false, true), "web UI: https://[::1]:8443/");
        let v6any: SocketAddr = "[::]:8443".parse().expect("addr");
        assert!(web_ui_line(v6any, true, true).contains("bound to all interfaces; log in as admin"));
    }

    #[test]
    fn the_file_goes_when_the_admin_password_changes() {
        let tmp = TempDir::new("observer");
        let dir = DataDir::new(tmp.path());
        let file = dir.admin_password();
        std::fs::write(&file, "x\n").expect("write");
        let cleanup = InitialPasswordCleanup::new(&dir);
        let event = |kind: &str, outcome: &str, user: &str| {
            let v = serde_json::json!({"type": kind, "outcome": outcome, "username": user});
            v.as_object().cloned().unwrap_or_default()
        };
        for (kind, outcome, user) in [
            ("user.password_changed", "success", "alice"),
            ("user.password_set", "success", "Admin"),
            ("user.password_changed", "failure", "admin"),
            ("login.success", "success", "admin"),
        ] {
            cleanup.observe(&event(kind, outcome, user));
            assert!(file.exists(), "{kind} {outcome} {user}");
        }
        cleanup.observe(&event("user.password_changed", "success", "admin"));
        assert!(!file.exists());
        // Once gone, another change is no error.
        cleanup.observe(&event("user.password_set", "success", "admin"));
        std::fs::write(&file, "x\n").expect("write");
        cleanup.observe(&event("user.password_set", "success", "admin"));
        assert!(!file.exists());
    }

    #[test]
    fn a_stale_file_goes_at_start() {
        let tmp = TempDir::new("stale");
        let dir = DataDir::new(tmp.path());
        let db = SecurityDb::open(&tmp.path().join("security.db"), &[5u8; 32]).expect("db");
        let pw = users::generate_password();
        users::create_user(&db, "admin", &pw, "admin").expect("admin");
        let file = dir.admin_password();
        std::fs::write(&file, format!("{pw}\n")).expect("write");
        remove_if_stale(&dir, &db);
        assert!(file.exists(), "the password still opens admin");
        std::fs::write(&file, "another password\n").expect("write");
        remove_if_stale(&dir, &db);
        assert!(!file.exists());
        remove_if_stale(&dir, &db);
    }
}
