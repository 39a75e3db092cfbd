//! `tunnel route approve|reject SITE CIDR`: the hub operator decides which
//! LANs a site may route through the tunnel. A site's `join --route` (or a
//! later advertisement) takes effect only within an approved prefix; what
//! `token --route` approved in advance needs no step here.

use super::{Failure, LocalArgs, not_running};
use crate::control::local::{self, RouteDecision};
use clap::{Args, Subcommand};
use ipnetwork::IpNetwork;
use std::io::Write;

#[derive(Debug, Args)]
pub struct RouteArgs {
    #[command(subcommand)]
    pub command: RouteCommand,
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Let a site route a LAN within CIDR through the tunnel (what it asked for, or in advance)
    Approve(DecisionArgs),
    /// Withdraw what a site advertises or was approved for within CIDR
    Reject(DecisionArgs),
}

#[derive(Debug, Args)]
pub struct DecisionArgs {
    /// The site: its name (as in `tunnel status`) or its tunnel address
    pub site: String,
    /// The prefix, e.g. 192.168.50.0/24
    pub prefix: IpNetwork,
    #[command(flatten)]
    pub local: LocalArgs,
}

pub async fn run(args: RouteArgs) -> Result<(), Failure> {
    let (approve, args) = match args.command {
        RouteCommand::Approve(a) => (true, a),
        RouteCommand::Reject(a) => (false, a),
    };
    let req = RouteDecision {
        site: args.site.clone(),
        prefix: args.prefix,
    };
    let decided = local::request_route(&args.local.socket(), approve, &req)
        .await
        .map_err(|e| not_running(&args.local, e))?;
    let mut out = std::io::stdout().lock();
    let verb = if approve { "approved" } else { "rejected" };
    writeln!(
        out,
        "{verb} {} for {} ({})",
        args.prefix, args.site, decided.site
    )
    .map_err(anyhow::Error::from)?;
    for p in &decided.pending {
        writeln!(out, "still waiting: {p}").map_err(anyhow::Error::from)?;
    }
    Ok(())
}
