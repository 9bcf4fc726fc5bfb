//! `bastion user …` and `bastion token …`: account and API token
//! management on the host (DESIGN §2 "users"). Nothing prompts: passwords
//! come from stdin with `--password-stdin` or are generated and printed
//! once. Every change is recorded in the event log by
//! [`bastion_security::accounts::Accounts`].

use std::{io::BufRead, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use bastion_model::Role;
use bastion_security::accounts::{
    AccountPolicy, Accounts, PasswordChoice, Scope, MAX_TOKEN_LIFETIME,
};
use clap::Subcommand;

use crate::datadir::DataDir;

/// The `actor` recorded in events for changes made here.
const ACTOR: &str = "cli";

/// `bastion user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create an account. Without --password-stdin a password is generated,
    /// printed once, and must be changed at first login.
    Add {
        /// User name (letters, digits, . _ @ -; at most 64).
        name: String,
        /// admin, clinician (query + view), technologist (query + view +
        /// upload), auditor (event log only), researcher (nothing yet).
        #[arg(long)]
        role: String,
        /// Read the password from the first line of stdin (at least 12
        /// characters, not a common password).
        #[arg(long)]
        password_stdin: bool,
    },
    /// List accounts (never password hashes or TOTP secrets).
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Disable an account: ends its sessions; its tokens stop working.
    Disable {
        /// User name.
        name: String,
    },
    /// Re-enable a disabled account.
    Enable {
        /// User name.
        name: String,
    },
    /// Lift the lock set after repeated failed logins.
    Unlock {
        /// User name.
        name: String,
    },
    /// Set a new password: lifts a lock and ends the account's sessions.
    /// Without --password-stdin a password is generated, printed once, and
    /// must be changed at first login.
    Passwd {
        /// User name.
        name: String,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove an account with its sessions and tokens (never the last
    /// enabled admin).
    Remove {
        /// User name.
        name: String,
    },
    /// Set up TOTP (RFC 6238) for an account and print the otpauth:// URI
    /// once, for an authenticator app. Running it again replaces the secret.
    TotpEnable {
        /// User name.
        name: String,
    },
}

/// `bastion token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token; the token alone is printed on the last line of
    /// stdout (everything else goes to stderr). Only its hash is stored.
    Create {
        /// The account the token acts for.
        #[arg(long)]
        user: String,
        /// Lifetime: a number with a unit, d (days), h (hours) or m
        /// (minutes), e.g. 30d; at most 366d.
        #[arg(long)]
        expires: String,
        /// read (query, view, event log) or upload (upload only); default:
        /// everything the account's role allows.
        #[arg(long)]
        scope: Option<String>,
    },
    /// Revoke a token by id.
    Revoke {
        /// The token id (as in `bastion token list`).
        id: String,
    },
    /// List tokens (never the tokens themselves).
    List {
        /// Only this account's tokens.
        #[arg(long)]
        user: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `bastion user …`.
pub fn user(dir: &DataDir, cmd: UserCommand) -> Result<ExitCode> {
    let accounts = open(dir)?;
    match cmd {
        UserCommand::Add {
            name,
            role,
            password_stdin,
        } => {
            let role = Role::parse(&role)?;
            let given = password_stdin.then(read_password).transpose()?;
            let choice = given
                .as_deref()
                .map_or(PasswordChoice::Generate, PasswordChoice::Given);
            let generated = accounts
                .add_user(ACTOR, &name, role, choice)
                .with_context(|| format!("cannot add user {name:?}"))?;
            eprintln!("user {name} added with role {role}");
            if let Some(pw) = generated {
                print_generated(&name, &pw);
            }
            if role == Role::Admin && accounts.policy().admin_requires_totp {
                eprintln!("note: admin accounts must set up TOTP before they can log in: bastion user totp-enable {name}");
            }
        }
        UserCommand::List { json } => {
            let list = accounts.list_users()?;
            if json {
                let v: Vec<_> = list.iter().map(|u| u.to_json()).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<24} {:<13} {:<8} {:<6} {:<11} {:<4} CREATED",
                    "USER", "ROLE", "DISABLED", "LOCKED", "MUST-CHANGE", "TOTP"
                );
                for u in list {
                    let yn = |b: bool| if b { "yes" } else { "no" };
                    println!(
                        "{:<24} {:<13} {:<8} {:<6} {:<11} {:<4} {}",
                        u.username,
                        u.role.as_str(),
                        yn(u.disabled),
                        yn(u.locked),
                        yn(u.must_change_password),
                        yn(u.totp_enabled),
                        u.created
                    );
                }
            }
        }
        UserCommand::Disable { name } => {
            accounts.set_disabled(ACTOR, &name, true)?;
            println!("user {name} disabled; its sessions ended");
        }
        UserCommand::Enable { name } => {
            accounts.set_disabled(ACTOR, &name, false)?;
            println!("user {name} enabled");
        }
        UserCommand::Unlock { name } => {
            accounts.unlock(ACTOR, &name)?;
            println!("user {name} unlocked");
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            let given = password_stdin.then(read_password).transpose()?;
            let choice = given
                .as_deref()
                .map_or(PasswordChoice::Generate, PasswordChoice::Given);
            let generated = accounts
                .set_password(ACTOR, &name, choice)
                .with_context(|| format!("cannot set the password of {name:?}"))?;
            eprintln!("password of {name} set; lock lifted and sessions ended");
            if let Some(pw) = generated {
                print_generated(&name, &pw);
            }
        }
        UserCommand::Remove { name } => {
            accounts.remove_user(ACTOR, &name)?;
            println!("user {name} removed with its sessions and tokens");
        }
        UserCommand::TotpEnable { name } => {
            let (uri, replaced) = accounts.enable_totp(ACTOR, &name)?;
            if replaced {
                eprintln!("the previous TOTP secret of {name} is replaced");
            }
            eprintln!("add this URI to an authenticator app (shown once; it is a secret):");
            println!("{uri}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `bastion token …`.
pub fn token(dir: &DataDir, cmd: TokenCommand) -> Result<ExitCode> {
    let accounts = open(dir)?;
    match cmd {
        TokenCommand::Create {
            user,
            expires,
            scope,
        } => {
            let lifetime = parse_lifetime(&expires)?;
            let scope = scope.as_deref().map_or(Ok(Scope::Full), Scope::parse)?;
            let (info, token) = accounts
                .create_token(ACTOR, &user, lifetime, scope)
                .with_context(|| format!("cannot create a token for {user:?}"))?;
            let now = accounts.now_unix_ms();
            let j = info.to_json(now);
            eprintln!(
                "token {} for {} (scope {}) expires {}; shown once, only its hash is stored:",
                info.id,
                info.username,
                info.scope.as_str(),
                j["expires"].as_str().unwrap_or("?")
            );
            println!("{token}");
        }
        TokenCommand::Revoke { id } => {
            accounts.revoke_token(ACTOR, &id)?;
            println!("token {id} revoked");
        }
        TokenCommand::List { user, json } => {
            let list = accounts.list_tokens(user.as_deref())?;
            let now = accounts.now_unix_ms();
            if json {
                let v: Vec<_> = list.iter().map(|t| t.to_json(now)).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<16} {:<24} {:<6} {:<25} STATE",
                    "ID", "USER", "SCOPE", "EXPIRES"
                );
                for t in list {
                    let j = t.to_json(now);
                    let state = if t.revoked_ms.is_some() {
                        "revoked"
                    } else if now >= t.expires_ms {
                        "expired"
                    } else {
                        "active"
                    };
                    println!(
                        "{:<16} {:<24} {:<6} {:<25} {state}",
                        t.id,
                        t.username,
                        t.scope.as_str(),
                        j["expires"].as_str().unwrap_or("?")
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn open(dir: &DataDir) -> Result<Accounts> {
    dir.require_initialised()?;
    dir.check_secret_permissions()?;
    let master = dir.load_master_key()?;
    let db = dir.open_security(&master)?;
    let (events, _trail) =
        dir.open_events(&master, &crate::config::Config::load(&dir.config())?)?;
    crate::alerts_cli::attach(dir, &events);
    crate::onboarding::watch(dir, &events);
    // The policy's throttling numbers do not matter to the CLI; the TOTP
    // rule is only reported.
    Ok(Accounts::new(
        Arc::new(db),
        events,
        AccountPolicy::default(),
    ))
}

/// Reads the first line of stdin (without its line ending).
fn read_password() -> Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from stdin")?;
    let pw = line.strip_suffix('\n').unwrap_or(&line);
    let pw = pw.strip_suffix('\r').unwrap_or(pw);
    if pw.is_empty() {
        bail!("--password-stdin: stdin held no password (expected it on the first line)");
    }
    Ok(pw.to_owned())
}

fn print_generated(name: &str, pw: &str) {
    println!("Generated password for user '{name}': {pw}");
    eprintln!("(shown once; it must be changed at the first login)");
}

/// Parses `30d`, `12h`, `90m`.
fn parse_lifetime(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().with_context(|| {
        format!("--expires {s:?}: expected a number and a unit (d, h, m), e.g. 30d")
    })?;
    let secs = match unit {
        "d" => n.checked_mul(86_400),
        "h" => n.checked_mul(3_600),
        "m" => n.checked_mul(60),
        _ => bail!("--expires {s:?}: unit must be d (days), h (hours) or m (minutes), e.g. 30d"),
    };
    match secs {
        Some(secs) if secs > 0 && Duration::from_secs(secs) <= MAX_TOKEN_LIFETIME => {
            Ok(Duration::from_secs(secs))
        }
        _ => bail!("--expires {s:?}: must be more than zero and at most 366d"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        assert_eq!(
            parse_lifetime("30d").ok(),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(
            parse_lifetime("12h").ok(),
            Some(Duration::from_secs(12 * 3_600))
        );
        assert_eq!(parse_lifetime("5m").ok(), Some(Duration::from_secs(300)));
        for bad in [
            "",
            "30",
            "d",
            "0d",
            "367d",
            "-1d",
            "1y",
            "99999999999999999999d",
        ] {
            assert!(parse_lifetime(bad).is_err(), "{bad}");
        }
    }
}
