//! `tunnel up`: brings a joined site back from its saved state (its own
//! key, the server, its containers), with no new token.

use super::join::resolve;
use super::{Failure, LocalArgs, Toggle, spinner};
use crate::docker::{Bollard, ContainerRuntime};
use crate::net::Netlink;
use crate::shutdown::Shutdown;
use crate::site::{self, Containers, Site};
use crate::state::Endpoint;
use crate::store::StateDir;
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
    /// Attach the containers with this label [default: the label saved at join, if any]
    #[arg(long, value_name = "KEY[=VALUE]", num_args = 0..=1, default_missing_value = crate::docker::Label::DEFAULT, value_parser = crate::docker::Label::parse)]
    pub attach_label: Option<crate::docker::Label>,
    /// Serve Docker's network-plugin API under this name [default name: tunnel]
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = crate::driver::DEFAULT_NAME)]
    pub docker_driver: Option<String>,
    #[command(flatten)]
    pub metrics: super::MetricsArgs,
    /// Our nftables table (the LANs and masquerading saved at join need it)
    #[arg(long, value_enum, default_value_t = Toggle::On)]
    pub firewall: Toggle,
}

pub async fn run(args: UpArgs, shutdown: Shutdown) -> Result<(), Failure> {
    let started = Instant::now();
    let iface = args.local.iface.clone();
    crate::net::validate_ifname(&iface)?;
    args.metrics.check()?;
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
    let label = match (&args.attach_label, &joined.attach_label) {
        (Some(l), _) => Some(l.clone()),
        (None, Some(saved)) => Some(
            crate::docker::Label::parse(saved)
                .map_err(|e| Failure::input(anyhow!("{}: {e}", store.file(&iface).display())))?,
        ),
        (None, None) => None,
    };
    if let Some(n) = &args.docker_driver {
        crate::driver::check_name(n)?;
    }
    let runtime: Option<Arc<dyn ContainerRuntime>> =
        if joined.containers.is_empty() && label.is_none() && args.docker_driver.is_none() {
            None
        } else {
            Some(Arc::new(Bollard::connect().await?))
        };

    if joined.masquerade && args.firewall == Toggle::Off {
        return Err(Failure::input(anyhow!(
            "{iface} masquerades towards its LANs, and that needs the firewall: drop --firewall off"
        )));
    }
    let (route, relay) = site::saved_route(&joined, endpoint, args.proxy.as_deref())?;
    let metrics = super::bind_metrics(&args.metrics).await?;
    let net = Arc::new(Netlink::connect()?);
    let mut gateway = site::site_gateway(
        net.as_ref(),
        &store,
        &iface,
        joined.subnets(),
        &joined.routes,
        joined.masquerade,
        args.firewall == Toggle::On,
    )
    .await?;
    let spec = DeviceSpec {
        name: iface.clone(),
        private_key: joined.private_key.clone(),
        listen_port: 0,
        peers: vec![site::hub_peer(&joined, route.endpoint)],
        addresses: joined.subnets().interface(joined.address.ip()),
        mtu: joined.mtu,
        confine: gateway.confine(),
        relay,
        quarantine: None,
    };
    let device = match crate::endpoint::create(&spec, backend, net.clone(), &store).await {
        Ok(d) => d,
        Err(e) => {
            gateway.stop(net.as_ref()).await;
            return Err(e.into());
        }
    };
    let host = site::prepare_host(
        &mut gateway,
        net.as_ref(),
        device.as_ref(),
        &joined,
        &iface,
        endpoint,
        &route,
    )
    .await;
    let transparent = match host {
        Ok(t) => t,
        Err(e) => {
            let _ = device.destroy().await;
            gateway.stop(net.as_ref()).await;
            return Err(e.into());
        }
    };

    let progress = super::Spinner(spinner());
    progress
        .0
        .set_message(format!("waiting for the server at {endpoint}"));
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
        label,
        driver: args.docker_driver.clone(),
    });
    let site = Site {
        device,
        route,
        net,
        joined,
        iface,
        backend,
        store,
        gateway,
        transparent,
        metrics,
    };
    Ok(site::run(
        site,
        containers,
        super::summary_line(summary),
        &progress,
        shutdown,
    )
    .await?)
}
