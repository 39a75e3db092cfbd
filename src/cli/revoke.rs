//! `tunnel revoke NAME|ADDRESS`: removes a peer from the running server.

use super::{Failure, LocalArgs, not_running};
use crate::control::local;
use clap::Args;
use std::io::Write;

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The peer to remove: a site's name (from `token --name`), a container's name, or a tunnel address; also cancels unused tokens
    pub target: String,
    #[command(flatten)]
    pub local: LocalArgs,
}

pub async fn run(args: RevokeArgs) -> Result<(), Failure> {
    let removed = local::request_revoke(&args.local.socket(), &args.target)
        .await
        .map_err(|e| not_running(&args.local, e))?;
    let mut out = std::io::stdout().lock();
    for r in removed {
        writeln!(out, "revoked {r}").map_err(anyhow::Error::from)?;
    }
    Ok(())
}
