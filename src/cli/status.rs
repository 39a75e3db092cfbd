//! `tunnel status [--json]`: every endpoint in the state directory, live
//! from its running `tunnel` through the local control socket, or from the
//! saved state (marked down) when none runs.

use super::Failure;
use crate::control;
use crate::state::StateDir;
use crate::status::{self, EndpointStatus};
use anyhow::Context;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Directory for keys and peers
    #[arg(long, default_value = "/var/lib/tunnel", env = "TUNNEL_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Print JSON (an array of endpoints; the shape is documented in the README)
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: StatusArgs) -> Result<(), Failure> {
    let store = StateDir::new(&args.state_dir);
    let mut endpoints: Vec<EndpointStatus> = Vec::new();
    for iface in store.ifaces()? {
        let Some(saved) = store.load(&iface)? else {
            continue;
        };
        let live = control::local::status_of(&store.socket(&iface), Duration::from_secs(3))
            .await
            .ok();
        endpoints.extend(live.unwrap_or_else(|| status::from_state(&iface, &saved)));
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &endpoints).context("writing JSON")?;
        writeln!(out).context("writing to stdout")?;
    } else {
        out.write_all(status::render(&endpoints).as_bytes())
            .context("writing to stdout")?;
    }
    Ok(())
}
