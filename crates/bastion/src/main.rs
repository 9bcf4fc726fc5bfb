//! `bastion`: the Bastion PACS binary. Every subcommand takes `--data DIR`
//! (default `./bastion-data`), never prompts, and works while `bastion serve`
//! runs on the same directory.

mod accounts_cli;
mod alerts_cli;
mod audit_cli;
mod cli;
mod config;
mod datadir;
mod import;
mod serve;
mod syslog_client;
mod webhook;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
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
