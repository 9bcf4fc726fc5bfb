//! `bastion`: the Bastion PACS binary. Every subcommand takes `--data DIR`
//! (default `./bastion-data`), never prompts, and works while `bastion serve`
//! runs on the same directory.

mod accounts_cli;
mod alerts_cli;
mod audit_cli;
mod cli;
mod config;
mod datadir;
mod decoder_sandbox;
mod doctor;
mod import;
mod keys;
mod migrate;
mod onboarding;
mod serve;
mod study_cli;
mod syslog_client;
mod webhook;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The image decoding child (decoder_sandbox): started by `serve`, never
    // by hand; dispatched before anything else is set up.
    let mut args = std::env::args();
    if args.nth(1).as_deref() == Some(decoder_sandbox::SUBCOMMAND) {
        let max = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
        let codec = args
            .next()
            .and_then(|c| bastion_archive::isolated::IsolatedCodec::from_arg(&c));
        return decoder_sandbox::run_child(max, codec);
    }
    if std::env::args().nth(1).as_deref() == Some("serve") {
        tune_allocator();
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // Pin the process-wide rustls provider (aws-lc-rs); see libraries.md.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// glibc's malloc threshold for serving an allocation with its own `mmap`
/// (given back to the kernel on `free`), in bytes.
const MMAP_THRESHOLD: &str = "1048576";

/// Makes glibc's malloc give large buffers (received datasets, STOW-RS bodies,
/// inflated datasets) back to the kernel when they are freed, so that the
/// memory budget (`[limits] memory_budget_mib`) bounds `serve`'s resident
/// memory and not only its live bytes. By default glibc raises its `mmap`
/// threshold to the size of such a freed buffer (up to 32 MiB) and keeps
/// freed heap memory per arena up to twice that: 64 parallel deflate bombs
/// then left 709 MiB resident above baseline under a 384 MiB budget (379 MiB
/// with the threshold fixed at 1 MiB; `bench/bombs.py`). The threshold can
/// only be set before malloc starts, through the environment (a tunable of
/// glibc; `mallopt` would need `unsafe`, forbidden here), so `serve`
/// re-executes itself once with `MALLOC_MMAP_THRESHOLD_` set (same PID).
/// An operator's own value is kept; on other C libraries, or when the
/// re-execution fails, `serve` runs as it is.
fn tune_allocator() {
    const VAR: &str = "MALLOC_MMAP_THRESHOLD_";
    if !cfg!(all(target_os = "linux", target_env = "gnu")) || std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let err = std::process::Command::new(&exe)
        .arg0(argv0)
        .args(args)
        .env(VAR, MMAP_THRESHOLD)
        .exec();
    // Only reached when exec failed; tracing is not set up yet.
    eprintln!("note: running without the malloc tuning ({err})");
}
