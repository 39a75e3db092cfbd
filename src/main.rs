//! The `tunnel` binary: parse, set up logging, wire signals, exit code.

use clap::Parser;
use std::process::ExitCode;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;
use tunnel::cli::{self, Cli, Shutdown};

fn main() -> ExitCode {
    tunnel::sys::tune_malloc();
    let nofile = tunnel::sys::raise_nofile_limit();
    // Everything this process creates (state, sockets, the UAPI socket that
    // answers with private keys) is for root alone, before anything can
    // connect to it, whatever umask it was started with.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cli.verbosity.filter()));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match nofile {
        Ok((before, after)) if before != after => {
            tracing::debug!("open files limit raised from {before} to {after}")
        }
        Ok((limit, _)) => tracing::debug!("open files limit: {limit} (already the hard limit)"),
        Err(e) => tracing::debug!("cannot raise the open files limit: {e}"),
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let shutdown = Shutdown::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                tracing::warn!("cannot watch SIGINT/SIGTERM; stop with SIGKILL");
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tracing::info!("signal received, shutting down");
            stop.trigger();
        });
        cli::run(cli.command, shutdown).await
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}
