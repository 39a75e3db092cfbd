//! `tunnel token`: more join tokens from the running server.

use super::{Failure, LocalArgs, not_running};
use crate::control::local::{self, TokenRequest};
use crate::limits;
use clap::Args;
use std::io::Write;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// How long the tokens stay valid (e.g. 30m, 1h, 2d; at most 366d)
    #[arg(long, default_value = "1h", value_parser = limits::parse_ttl)]
    pub ttl: Duration,
    /// How many tokens to mint (at most 1000)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub count: u16,
    /// A name for the site that redeems the token (unique; shown in status, used by revoke)
    #[arg(long, value_parser = limits::parse_name)]
    pub name: Option<String>,
    /// A LAN (CIDR) the site that redeems the token may advertise without asking (its `join --route` within it); repeatable. Other routes wait for `tunnel route approve`
    #[arg(long = "route", value_name = "CIDR")]
    pub routes: Vec<ipnetwork::IpNetwork>,
}

pub async fn run(args: TokenArgs) -> Result<(), Failure> {
    let req = TokenRequest {
        count: args.count.into(),
        ttl_secs: args.ttl.as_secs(),
        name: args.name.clone(),
        routes: args.routes.clone(),
    };
    let tokens = local::request_tokens(&args.local.socket(), &req)
        .await
        .map_err(|e| not_running(&args.local, e))?;
    let mut out = std::io::stdout().lock();
    for t in tokens {
        writeln!(out, "{t}").map_err(anyhow::Error::from)?;
    }
    Ok(())
}
