//! `tunnel status [--iface NAME] [--json | --check]`: every endpoint (or
//! one) in the state
//! directory, live from its running `tunnel` through the local control
//! socket, or from the saved state (marked down) when none runs. `--check`
//! judges them instead, for compose `healthcheck:` and systemd.

use super::Failure;
use crate::control;
use crate::status::{self, EndpointStatus};
use crate::store::StateDir;
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
    /// Only this endpoint (its WireGuard interface name), not every one in the state directory
    #[arg(long)]
    pub iface: Option<String>,
    /// Print JSON (an array of endpoints; the shape is documented in the README)
    #[arg(long)]
    pub json: bool,
    /// Exit 0 only if every endpoint here runs and had a handshake in the last 3 minutes (a joined site's server must also answer now); for healthchecks
    #[arg(long, conflicts_with = "json")]
    pub check: bool,
}

pub async fn run(args: StatusArgs) -> Result<(), Failure> {
    let store = StateDir::new(&args.state_dir);
    let mut endpoints: Vec<EndpointStatus> = Vec::new();
    let mut ifaces = store.ifaces()?;
    if let Some(one) = &args.iface {
        if !ifaces.contains(one) {
            return Err(Failure::input(anyhow::anyhow!(
                "no endpoint named {one} in {} (tunnel status lists them)",
                store.root().display()
            )));
        }
        ifaces.retain(|i| i == one);
    }
    for iface in ifaces {
        let Some(saved) = store.load(&iface)? else {
            continue;
        };
        let live = control::local::status_of(&store.socket(&iface), Duration::from_secs(3))
            .await
            .ok();
        endpoints.extend(live.unwrap_or_else(|| status::from_state(&iface, &saved)));
    }
    if args.check {
        return check(&store, &endpoints).await;
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

/// Prints one line per endpoint and fails unless all are healthy.
async fn check(store: &StateDir, endpoints: &[EndpointStatus]) -> Result<(), Failure> {
    use status::{Health, Role, State};
    if endpoints.is_empty() {
        return Err(
            anyhow::anyhow!("unhealthy: no endpoints in {}", store.root().display()).into(),
        );
    }
    let mut out = std::io::stdout().lock();
    let mut failing = 0;
    for e in endpoints {
        // A joined site asks its hub over the tunnel: a stopped hub fails
        // the check now, not when the last handshake ages out.
        let hub_answers = match (e.role, e.state, e.peers.first().and_then(|p| p.address)) {
            (Role::Joined, State::Up, Some(hub)) => Some(
                control::tunnel::ping(
                    control::tunnel::HubApi::via(
                        std::net::SocketAddr::new(hub, control::CONTROL_PORT),
                        &e.iface,
                    ),
                    Duration::from_secs(3),
                )
                .await
                .is_ok(),
            ),
            _ => None,
        };
        let (word, why) = match status::health(e, hub_answers) {
            Health::Ok(why) => ("ok", why),
            Health::NotCounted(why) => ("not counted", why),
            Health::Failing(why) => {
                failing += 1;
                ("FAILING", why)
            }
        };
        let what = match &e.container {
            Some(c) => format!("{} (container {c})", e.iface),
            None => e.iface.clone(),
        };
        writeln!(out, "{what}: {word}: {why}").context("writing to stdout")?;
    }
    if failing > 0 {
        return Err(anyhow::anyhow!(
            "unhealthy: {failing} of {} endpoint(s) failing",
            endpoints.len()
        )
        .into());
    }
    Ok(())
}
