//! `tunnel up`: brings a joined site back from its saved state (its own
//! key, the server, its containers), with no new token.

use super::join::resolve;
use super::{Failure, LocalArgs, spinner};
use crate::docker::{Bollard, ContainerRuntime};
use crate::net::Netlink;
use crate::shutdown::Shutdown;
use crate::site::{self, Containers, Site};
use crate::state::{Endpoint, StateDir};
use crate::wg::{BackendChoice, DeviceSpec};
use anyhow::anyhow;
use clap::Args;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// WireGuard implementation [default: the one it joined with]
    #[arg(long, value_enum)]
    pub backend: Option<BackendChoice>,
    /// How long to wait for the server before reporting it; the tunnel stays up either way
    #[arg(long, default_value = "10s", value_parser = crate::limits::parse_timeout)]
    pub timeout: Duration,
    /// HTTP proxy for a site that joined over WebSocket, http://[user:pass@]host:port [default: the one it joined through]
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
}

pub async fn run(args: UpArgs, shutdown: Shutdown) -> Result<(), Failure> {
    let started = Instant::now();
    let iface = args.local.iface.clone();
    crate::net::validate_ifname(&iface)?;
    crate::sys::require_net_admin()?;
    let store = StateDir::new(&args.local.state_dir);
    let joined = match store.load(&iface)? {
        Some(Endpoint::Joined(j)) => j,
        Some(Endpoint::Server(_)) => {
            return Err(Failure::input(anyhow!(
                "{iface} is a server; start it with `tunnel serve --iface {iface}`"
            )));
        }
        None => {
            return Err(Failure::input(anyhow!(
                "no joined site {iface} saved in {}; join first with `tunnel join`",
                store.root().display()
            )));
        }
    };
    let backend = args
        .backend
        .or(joined.backend)
        .unwrap_or(BackendChoice::Auto);
    let endpoint = resolve(&joined.endpoint, joined.port).await?;
    // Containers need Docker, but may be stopped now: they are attached
    // when they start.
    let runtime: Option<Arc<dyn ContainerRuntime>> = if joined.containers.is_empty() {
        None
    } else {
        Some(Arc::new(Bollard::connect().await?))
    };

    let (route, relay) = site::saved_route(&joined, endpoint, args.proxy.as_deref())?;
    let spec = DeviceSpec {
        name: iface.clone(),
        private_key: joined.private_key.clone(),
        listen_port: 0,
        peers: vec![site::hub_peer(&joined, route.endpoint)],
        addresses: vec![joined.address],
        mtu: joined.mtu,
        confine: None,
        relay,
    };
    let net = Arc::new(Netlink::connect()?);
    let device = crate::endpoint::create(&spec, backend, net.clone(), &store).await?;

    let progress = spinner();
    progress.set_message(format!("waiting for the server at {endpoint}"));
    let flow = match site::wait_for_flow(site::api(&joined), started + args.timeout).await {
        Ok(()) => format!("first packet after {} ms", started.elapsed().as_millis()),
        Err(e) => {
            tracing::warn!(
                "the server does not answer yet ({e}); the tunnel stays up and connects when it does"
            );
            "server not answering yet".to_owned()
        }
    };
    let summary = format!(
        "up {iface} as {}, server {} at {endpoint} over {}, {flow}",
        joined.address, joined.server_address, route.path
    );
    let containers = runtime.map(|runtime| Containers {
        runtime,
        specs: site::saved_containers(&joined, &route),
    });
    let site = Site {
        device,
        route,
        net,
        joined,
        iface,
        backend,
        store,
    };
    Ok(site::run(
        site,
        containers,
        super::summary_line(summary),
        progress,
        shutdown,
    )
    .await?)
}
