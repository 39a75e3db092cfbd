//! Commands that talk to a running instance over its local control socket:
//! `token`, `revoke`, `down`.

use super::{Failure, LocalArgs};
use crate::control::{self, ControlError};
use crate::status::TokenRequest;
use anyhow::anyhow;
use clap::Args;
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// How long the tokens stay valid (e.g. 30m, 1h, 2d)
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// How many tokens to mint
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub count: u16,
    /// A name for the site that redeems the token (shown in status, used by revoke)
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The peer to remove: its name (from `token --name`) or its tunnel address; also cancels unused tokens
    pub target: String,
    #[command(flatten)]
    pub local: LocalArgs,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    #[command(flatten)]
    pub local: LocalArgs,
}

fn not_running(local: &LocalArgs, e: ControlError) -> Failure {
    match e {
        ControlError::Connect { .. } => anyhow!(
            "no running tunnel serves {} (no answer on {}); start it with `tunnel serve` or `tunnel up`",
            local.iface,
            local.socket().display()
        )
        .into(),
        ControlError::Refused(why) => Failure::input(anyhow!("{why}")),
        other => other.into(),
    }
}

pub async fn token(args: TokenArgs) -> Result<(), Failure> {
    if let Some(n) = &args.name
        && (n.is_empty() || n.len() > 64 || n.chars().any(|c| c.is_control() || c.is_whitespace()))
    {
        return Err(Failure::input(anyhow!(
            "--name {n:?}: use 1-64 characters without spaces"
        )));
    }
    let req = TokenRequest {
        count: args.count.into(),
        ttl_secs: args.ttl.as_secs().max(1),
        name: args.name.clone(),
    };
    let body = serde_json::to_vec(&req).expect("serializes");
    let tokens: Vec<String> = control::local_call(
        &args.local.socket(),
        "POST",
        "/v1/tokens",
        Some(body),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| not_running(&args.local, e))?;
    let mut out = std::io::stdout().lock();
    for t in tokens {
        writeln!(out, "{t}").map_err(anyhow::Error::from)?;
    }
    Ok(())
}

pub async fn revoke(args: RevokeArgs) -> Result<(), Failure> {
    let body =
        serde_json::to_vec(&serde_json::json!({ "target": args.target })).expect("serializes");
    let removed: Vec<String> = control::local_call(
        &args.local.socket(),
        "POST",
        "/v1/revoke",
        Some(body),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| not_running(&args.local, e))?;
    let mut out = std::io::stdout().lock();
    for r in removed {
        writeln!(out, "revoked {r}").map_err(anyhow::Error::from)?;
    }
    Ok(())
}

/// Same as SIGTERM to the running instance; returns once it has stopped.
pub async fn down(args: DownArgs) -> Result<(), Failure> {
    let socket = args.local.socket();
    let _: Vec<String> =
        control::local_call(&socket, "POST", "/v1/down", None, Duration::from_secs(10))
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
