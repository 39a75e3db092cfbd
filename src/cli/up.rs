//! `tunnel up`: brings a joined site back from its saved state (its own
//! key, the server, its containers), with no new token.

use super::{Failure, LocalArgs, Spinner, Toggle, spinner};
use crate::docker::{Bollard, ContainerRuntime, Label};
use crate::net::Netlink;
use crate::shutdown::Shutdown;
use crate::site::{self, Progress, Site, UpConfig};
use crate::state::{Endpoint, JoinedState};
use crate::store::StateDir;
use crate::wg::BackendChoice;
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
    /// CA certificates (PEM) for an https:// proxy, beside the system's roots [default: the file saved at join]
    #[arg(long, value_name = "FILE")]
    pub proxy_ca: Option<std::path::PathBuf>,
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

/// The site saved for `--iface`, or why there is none to bring up.
fn saved(args: &UpArgs, store: &StateDir) -> Result<JoinedState, Failure> {
    let iface = &args.local.iface;
    match store.load(iface)? {
        Some(Endpoint::Joined(j)) => Ok(j),
        Some(Endpoint::Server(_)) => Err(Failure::input(anyhow!(
            "{iface} is a server; start it with `tunnel serve --iface {iface}`"
        ))),
        None => Err(Failure::input(anyhow!(
            "no joined site {iface} saved in {}; join first with `tunnel join`",
            store.root().display()
        ))),
    }
}

/// `--attach-label`, else the label saved at join.
fn label(args: &UpArgs, joined: &JoinedState, store: &StateDir) -> Result<Option<Label>, Failure> {
    match (&args.attach_label, &joined.attach_label) {
        (Some(l), _) => Ok(Some(l.clone())),
        (None, Some(saved)) => Ok(Some(Label::parse(saved).map_err(|e| {
            Failure::input(anyhow!("{}: {e}", store.file(&args.local.iface).display()))
        })?)),
        (None, None) => Ok(None),
    }
}

pub async fn run(args: UpArgs, shutdown: Shutdown) -> Result<(), Failure> {
    let started = Instant::now();
    let iface = args.local.iface.clone();
    crate::net::validate_ifname(&iface)?;
    args.metrics.check()?;
    crate::sys::require_net_admin()?;
    let store = StateDir::new(&args.local.state_dir);
    let joined = saved(&args, &store)?;
    let backend = args
        .backend
        .or(joined.backend)
        .unwrap_or(BackendChoice::Auto);
    let endpoint = site::resolve(&joined.endpoint, joined.port).await?;
    // Containers need Docker, but may be stopped now: they are attached
    // when they start.
    let label = label(&args, &joined, &store)?;
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
    super::check_proxy_ca(args.proxy_ca.as_deref())?;
    let (route, relay) = site::saved_route(
        &joined,
        endpoint,
        args.proxy.as_deref(),
        args.proxy_ca.as_deref(),
    )?;
    let metrics = super::bind_metrics(&args.metrics).await?;
    let config = UpConfig {
        joined,
        iface,
        store,
        net: Arc::new(Netlink::connect()?),
        backend,
        endpoint,
        route,
        relay,
        nft: Box::new(crate::firewall::Nftables),
        firewall: args.firewall == Toggle::On,
        started,
        timeout: args.timeout,
        runtime,
        label,
        driver: args.docker_driver.clone(),
        metrics,
    };
    let progress = LazySpinner::default();
    let ready = Site::up(config, &progress).await?;
    let flow = match ready.first_packet {
        Some(t) => format!("first packet after {} ms", t.as_millis()),
        None => "server not answering yet".to_owned(),
    };
    let site = &ready.site;
    let summary = format!(
        "up {} as {}, server {} at {endpoint} over {}, {flow}",
        site.iface, site.joined.address, site.joined.server_address, site.route.path
    );
    let (site, containers) = (ready.site, ready.containers);
    let ready = super::summary_line(summary);
    Ok(site::run(site, containers, ready, &progress, shutdown).await?)
}

/// The command's spinner ([`super::spinner`]), made at the first step a
/// bring-up reports, so that nothing shows while the host is prepared.
#[derive(Default)]
pub(super) struct LazySpinner(std::sync::OnceLock<Spinner>);

impl Progress for LazySpinner {
    fn step(&self, message: &str) {
        self.0.get_or_init(|| Spinner(spinner())).step(message);
    }

    fn done(&self) {
        if let Some(s) = self.0.get() {
            s.done();
        }
    }
}
