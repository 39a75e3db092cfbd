//! `tunnel join <TOKEN> <HOST[:PORT]>`: the other side.
//!
//! The whole token is validated before the host is touched. The interface
//! comes up with the token's invite key; the invite is redeemed over the
//! tunnel for a key made here, and the device switches to that key
//! ([`crate::site`] does the work).

use super::up::LazySpinner;
use super::{EndpointArgs, Failure, LanArgs, Toggle};
use crate::docker::{ContainerInfo, ContainerRuntime};
use crate::net::{Netlink, validate_ifname};
use crate::shutdown::Shutdown;
use crate::site::{self, Invitation, JoinConfig, Site};
use crate::state::Endpoint;
use crate::store::StateDir;
use crate::token::Token;
use crate::transport::JoinTransport;
use anyhow::{Context, anyhow};
use clap::Args;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The join token printed by `tunnel serve` ("-" reads it from stdin, keeping it out of the process list)
    pub token: String,
    /// The server's address as reachable from here: HOST or HOST:PORT (the port defaults to the token's; without it, the token's --endpoint hint is used)
    pub server: Option<String>,
    #[command(flatten)]
    pub common: EndpointArgs,
    /// How long to wait for the tunnel to carry traffic
    #[arg(long, default_value = "20s", value_parser = crate::limits::parse_timeout)]
    pub timeout: Duration,
    /// How to reach the server: auto tries UDP, then WebSocket direct, then through the proxy (from the token's offer)
    #[arg(long, value_enum, default_value_t = JoinTransport::Auto)]
    pub transport: JoinTransport,
    /// HTTP proxy for the WebSocket transport, http[s]://[user:pass@]host:port [default: HTTPS_PROXY, HTTP_PROXY, unless NO_PROXY]
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
    /// CA certificates (PEM) that an https:// proxy's certificate may chain to, beside the system's roots; kept for up
    #[arg(long, value_name = "FILE")]
    pub proxy_ca: Option<std::path::PathBuf>,
    /// A proxy auto-config file (http:// URL or file) whose FindProxyForURL picks the proxy for the server's WebSocket URL; the proxy it picks is kept for up
    #[arg(long, value_name = "URL|FILE", conflicts_with = "proxy")]
    pub proxy_pac: Option<String>,
    #[command(flatten)]
    pub lan: LanArgs,
    /// Send this host's traffic for the server's address through the tunnel (except the tunnel's own transport); direct again when the tunnel is down
    #[arg(long)]
    pub transparent: bool,
    /// With --transparent: the server sees this host's public address as the source, not its tunnel address
    #[arg(long, requires = "transparent")]
    pub snat_public: bool,
    /// A port forward to this host's WireGuard port (IP:PORT), offered to the other sites as a way to reach it directly; saved for `up`
    #[arg(long, value_name = "IP:PORT")]
    pub advertise_endpoint: Option<std::net::SocketAddr>,
}

/// `up`'s arguments for a join that finds its site saved already.
fn resume_args(args: &JoinArgs) -> super::up::UpArgs {
    super::up::UpArgs {
        local: super::LocalArgs {
            iface: args.common.iface.clone(),
            state_dir: args.common.state_dir.clone(),
        },
        backend: Some(args.common.backend),
        timeout: args.timeout,
        proxy: args.proxy.clone(),
        proxy_ca: args.proxy_ca.clone(),
        attach_label: args.common.attach_label.clone(),
        docker_driver: args.common.docker_driver.clone(),
        metrics: args.common.metrics.clone(),
        firewall: args.lan.firewall,
    }
}

fn read_token(arg: &str) -> Result<Token, Failure> {
    let text = if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the token from stdin")?;
        zeroize::Zeroizing::new(s)
    } else {
        zeroize::Zeroizing::new(arg.to_owned())
    };
    Token::decode(&text).map_err(Failure::input)
}

/// A join with this token that crashed after saving the site: the token
/// is spent on us, and `up` is what brings the site back.
fn joined_already(args: &JoinArgs, store: &StateDir, token: &Token) -> Result<bool, Failure> {
    let iface = &args.common.iface;
    let Some(Endpoint::Joined(j)) = store.load(iface)? else {
        return Ok(false);
    };
    if j.server_public_key != token.server_public_key || j.address != token.assigned_network() {
        return Ok(false);
    }
    eprintln!(
        "{iface} joined with this token already ({}): bringing it up from its saved state, as `tunnel up` does",
        store.file(iface).display()
    );
    store.remove_pending(iface);
    Ok(true)
}

/// What the checks of the input find, before the host is touched.
struct Checked {
    server: String,
    endpoint: SocketAddr,
    docker: Option<(Arc<dyn ContainerRuntime>, Vec<ContainerInfo>)>,
    metrics: Option<crate::metrics::Listener>,
}

/// The proxy `--proxy-pac SOURCE` picks for the server's WebSocket URL
/// (none: DIRECT, or a token without a WebSocket offer). Bad input when
/// the file cannot be had or the script fails.
async fn pac_proxy(
    source: &str,
    token: &Token,
    checked: &Checked,
) -> Result<Option<String>, Failure> {
    use crate::transport::pac;
    let Some(offer) = &token.websocket else {
        return Ok(None);
    };
    let host = checked.endpoint.ip().to_string();
    let target = crate::transport::ws::Dialer::new(offer, &host, None)
        .map_err(Failure::input)?
        .url();
    let script = pac::load(source).await.map_err(Failure::input)?;
    let (source2, target2) = (source.to_owned(), target.clone());
    let choice = tokio::task::spawn_blocking(move || pac::choose(&source2, &script, &target2))
        .await
        .map_err(|e| Failure::input(anyhow::anyhow!("--proxy-pac {source}: {e}")))?
        .map_err(Failure::input)?;
    tracing::info!("--proxy-pac {source}: {choice:?}");
    Ok(match choice {
        pac::Choice::Proxy(url) => Some(url),
        pac::Choice::Direct => None,
    })
}

/// Everything about the input, checked before the host is touched.
async fn check(args: &JoinArgs, token: &Token, store: &StateDir) -> Result<Checked, Failure> {
    token
        .check_expiry(SystemTime::now())
        .map_err(Failure::input)?;
    let iface = &args.common.iface;
    validate_ifname(iface)?;
    let server = args
        .server
        .clone()
        .or_else(|| token.endpoint_hint.clone())
        .ok_or_else(|| {
            Failure::input(anyhow!(
                "give the server's address (tunnel join <TOKEN> <HOST[:PORT]>): this token carries no endpoint hint"
            ))
        })?;
    let endpoint = site::resolve(&server, token.port).await?;
    args.lan.check(&token.subnets().all())?;
    crate::sys::require_net_admin()?;
    site::refuse_clash(&Netlink::connect()?, &token.subnets().all(), iface).await?;
    if let Some(n) = &args.common.docker_driver {
        crate::driver::check_name(n)?;
    }
    let docker = super::containers_up_front(
        &args.common.containers,
        args.common.attach_label.is_some() || args.common.docker_driver.is_some(),
    )
    .await?;
    if let Some(Endpoint::Server(_)) = store.load(iface)? {
        return Err(Failure::input(anyhow!(
            "{} holds a server for {iface}; use another --iface or --state-dir",
            store.file(iface).display()
        )));
    }
    let metrics = super::bind_metrics(&args.common.metrics).await?;
    Ok(Checked {
        server,
        endpoint,
        docker,
        metrics,
    })
}

pub async fn run(args: JoinArgs, shutdown: Shutdown) -> Result<(), Failure> {
    let started = Instant::now();
    args.common.metrics.check()?;
    let token = read_token(&args.token)?;
    crate::sys::crash_point("token-parsed");
    let store = StateDir::new(&args.common.state_dir);
    if joined_already(&args, &store, &token)? {
        return super::up::run(resume_args(&args), shutdown).await;
    }
    let checked = check(&args, &token, &store).await?;
    let pac_proxy = match &args.proxy_pac {
        Some(source) => pac_proxy(source, &token, &checked).await?,
        None => None,
    };
    let iface = &args.common.iface;
    let inv = Invitation {
        token: &token,
        server: &checked.server,
        endpoint: checked.endpoint,
        iface,
        mtu: args.common.mtu,
        backend: args.common.backend,
        transport: args.transport,
        proxy: args.proxy.as_deref().or(pac_proxy.as_deref()),
        proxy_ca: args.proxy_ca.as_deref(),
        timeout: args.timeout,
        routes: &args.lan.routes,
        masquerade: args.lan.masquerade,
        transparent: args.transparent,
        snat_public: args.snat_public,
        name: args.common.name.as_deref(),
        attach_label: args.common.attach_label.as_ref().map(|l| l.to_string()),
        advertise_endpoint: args.advertise_endpoint,
    };
    inv.check()?;
    super::check_proxy_ca(args.proxy_ca.as_deref())?;
    if let Some(p) = &args.proxy {
        crate::transport::proxy::Proxy::parse(p).map_err(Failure::input)?;
    }
    let config = JoinConfig {
        inv,
        started,
        store,
        net: Arc::new(Netlink::connect()?),
        nft: Box::new(crate::firewall::Nftables),
        firewall: args.lan.firewall == Toggle::On,
        docker: checked.docker,
        label: args.common.attach_label.clone(),
        driver: args.common.docker_driver.clone(),
        metrics: checked.metrics,
    };
    let progress = LazySpinner::default();
    let ready = Site::join(config, &progress).await?;
    let summary = format!(
        "joined {iface} as {}, server {} at {} over {}, first packet after {} ms",
        token.assigned_network(),
        token.server_address,
        checked.endpoint,
        ready.site.route.path,
        ready.first_packet.unwrap_or_default().as_millis()
    );
    let (site, containers) = (ready.site, ready.containers);
    let ready = super::summary_line(summary);
    Ok(site::run(site, containers, ready, &progress, shutdown).await?)
}
