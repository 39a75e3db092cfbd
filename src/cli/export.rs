//! `tunnel export`: a standard wg-quick config for a local endpoint, so that
//! stock `wg-quick`, or `wireguard-go` plus `wg setconf`, can take it over.
//! It holds the endpoint's private key: it is for this host's root only.

use super::{Failure, LocalArgs};
use crate::store::StateDir;
use crate::wg::quick::render;
use anyhow::{Context, anyhow};
use clap::Args;
use std::io::Write;

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// Export this container's endpoint instead of the host's
    #[arg(long)]
    pub container: Option<String>,
}

pub async fn run(args: ExportArgs) -> Result<(), Failure> {
    let store = StateDir::new(&args.local.state_dir);
    let endpoint = store.load(&args.local.iface)?.ok_or_else(|| {
        Failure::input(anyhow!(
            "no saved endpoint {} in {}",
            args.local.iface,
            args.local.state_dir.display()
        ))
    })?;
    let text = render(&args.local.iface, &endpoint, args.container.as_deref())
        .map_err(|e| Failure::input(anyhow!(e)))?;
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("writing to stdout")?;
    Ok(())
}
