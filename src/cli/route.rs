//! `tunnel route approve|reject SITE CIDR`: the hub operator decides which
//! LANs a site may route through the tunnel. A site's `join --route` (or a
//! later `route add`) takes effect only within an approved prefix; what
//! `token --route` approved in advance needs no step here.
//! `tunnel route add|del CIDR`: a running site's LANs change live.

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
    /// Route a LAN behind this running site through the tunnel (as join --route does), kept for up
    Add(LanArgs),
    /// Stop routing a LAN behind this running site through the tunnel
    Del(LanArgs),
}

#[derive(Debug, Args)]
pub struct LanArgs {
    /// The LAN, e.g. 192.168.50.0/24
    pub prefix: IpNetwork,
    /// Be a gateway from now on: masquerade what the tunnel sends to this site's LANs
    #[arg(long)]
    pub masquerade: bool,
    #[command(flatten)]
    pub local: LocalArgs,
}

async fn change(args: LanArgs, add: bool) -> Result<(), Failure> {
    let req = local::LanChange {
        prefix: args.prefix,
        add,
        masquerade: args.masquerade,
    };
    let set = local::request_lans(&args.local.socket(), &req)
        .await
        .map_err(|e| not_running(&args.local, e))?;
    let mut out = std::io::stdout().lock();
    let verb = if add { "routing" } else { "no longer routing" };
    let all: Vec<String> = set.routes.iter().map(ToString::to_string).collect();
    writeln!(
        out,
        "{verb} {} through {} (its LANs: {}{})",
        args.prefix,
        args.local.iface,
        if all.is_empty() {
            "none".to_owned()
        } else {
            all.join(", ")
        },
        if set.masquerade { ", masqueraded" } else { "" }
    )
    .map_err(anyhow::Error::from)?;
    for p in &set.pending {
        writeln!(
            out,
            "waiting for the hub operator's approval: {p} (tunnel route approve on the hub)"
        )
        .map_err(anyhow::Error::from)?;
    }
    Ok(())
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
        RouteCommand::Add(a) => return change(a, true).await,
        RouteCommand::Del(a) => return change(a, false).await,
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
