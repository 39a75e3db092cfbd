//! `tunnel up`: brings a joined site back from its saved state (its own
//! key, the server, its containers), with no new token.

use super::join::{KEEPALIVE, Site, resolve, run_site, spinner, wait_for_flow};
use super::{Failure, LocalArgs, Shutdown};
use crate::containers::EndpointSpec;
use crate::control;
use crate::docker::{Bollard, ContainerRuntime};
use crate::net::Netlink;
use crate::state::{Endpoint, StateDir};
use crate::wg::{self, BackendChoice, DeviceSpec, PeerSpec, WgDevice};
use anyhow::{Context, anyhow};
use clap::Args;
use ipnetwork::IpNetwork;
use std::net::SocketAddr;
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
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
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
    let backend = args.backend.unwrap_or(match joined.backend.as_deref() {
        Some("kernel") => BackendChoice::Kernel,
        Some("userspace") => BackendChoice::Userspace,
        _ => BackendChoice::Auto,
    });
    let endpoint = resolve(&joined.endpoint, joined.port).await?;
    // Containers need Docker, but may be stopped now: they are attached
    // when they start.
    let runtime: Option<Arc<dyn ContainerRuntime>> = if joined.containers.is_empty() {
        None
    } else {
        Some(Arc::new(Bollard::connect().await?))
    };

    let hub = PeerSpec {
        public_key: joined.server_public_key,
        endpoint: Some(endpoint),
        allowed_ips: vec![joined.subnet],
        keepalive: Some(KEEPALIVE),
    };
    let spec = DeviceSpec {
        name: iface.clone(),
        private_key: joined.private_key.clone(),
        listen_port: 0,
        peers: vec![hub.clone()],
        addresses: vec![joined.address],
        mtu: joined.mtu,
    };
    let net = Arc::new(Netlink::connect()?);
    super::clean_up_after_crash(net.as_ref(), &store, &iface).await?;
    let device: Arc<dyn WgDevice> = Arc::from(
        wg::create(&spec, backend, net.clone(), None)
            .await
            .context(format!("creating {iface}"))?,
    );
    tracing::info!(
        "{iface} is up ({} backend) as {}",
        device.backend(),
        joined.address
    );

    let progress = spinner();
    progress.set_message(format!("waiting for the server at {endpoint}"));
    let api = SocketAddr::new(joined.server_address, control::CONTROL_PORT);
    let flow = match wait_for_flow(api, started + args.timeout).await {
        Ok(()) => format!("first packet after {} ms", started.elapsed().as_millis()),
        Err(e) => {
            tracing::warn!(
                "the server does not answer yet ({e}); the tunnel stays up and connects when it does"
            );
            "server not answering yet".to_owned()
        }
    };
    let summary = format!(
        "up {iface} as {}, server {} at {endpoint}, {flow}",
        joined.address, joined.server_address
    );
    let containers = runtime.map(|rt| {
        let specs = joined
            .containers
            .iter()
            .map(|c| EndpointSpec {
                container: c.container.clone(),
                iface: c.iface.clone(),
                key: c.private_key.clone(),
                address: IpNetwork::new(c.address, joined.subnet.prefix())
                    .expect("prefix of the subnet"),
                hub: hub.clone(),
                mtu: joined.mtu,
                probe: api,
            })
            .collect();
        (rt, specs)
    });
    let site = Site {
        device,
        net,
        joined,
        iface,
        backend,
        store,
    };
    run_site(site, containers, summary, progress, shutdown).await
}
