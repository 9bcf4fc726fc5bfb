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
mod import;
mod keys;
mod onboarding;
mod serve;
mod syslog_client;
mod webhook;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The JPEG 2000 decoding child (decoder_sandbox): started by `serve`,
    // never by hand; dispatched before anything else is set up.
    let mut args = std::env::args();
    if args.nth(1).as_deref() == Some(decoder_sandbox::SUBCOMMAND) {
        let max = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
        return decoder_sandbox::run_child(max);
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
