//! `tunnel down`: stops a running serve, join or up, as SIGTERM does.

use super::{Failure, LocalArgs, not_running};
use crate::control::local;
use anyhow::anyhow;
use clap::Args;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct DownArgs {
    #[command(flatten)]
    pub local: LocalArgs,
}

/// Returns once the instance has stopped.
pub async fn run(args: DownArgs) -> Result<(), Failure> {
    let socket = args.local.socket();
    local::request_down(&socket)
        .await
        .map_err(|e| not_running(&args.local, e))?;
    // The socket goes away once the instance has removed everything.
    let deadline = Instant::now() + Duration::from_secs(30);
    while socket.exists() {
        if Instant::now() > deadline {
            return Err(anyhow!("{} is still stopping after 30 s", args.local.iface).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!("{} stopped", args.local.iface);
    Ok(())
}
