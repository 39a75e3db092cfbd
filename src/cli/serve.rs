//! `tunnel serve`: the hub endpoint.

use super::{EndpointArgs, Failure, LanArgs, Toggle};
use crate::containers::{ByLabel, EndpointSpec, Follower, HostPlacer, endpoint_iface};
use crate::control::{self, CONTROL_PORT};
use crate::firewall::{HubInput, Nftables, Policy, Port, Snat};
use crate::gateway::Gateway;
use crate::hub::api::HubApi;
use crate::hub::{self, Hub, Ledger, MintRequest};
use crate::limits;
use crate::net::{Netlink, validate_ifname};
use crate::shutdown::Shutdown;
use crate::state::ServerState;
use crate::store::StateDir;
use crate::transport::tls::Identity;
use crate::transport::{
    Offer, Relay, ServeTransports, TransportError, WsOffer, WsTarget, is_virtual,
};
use crate::wg::{BackendKind, DeviceSpec};
use anyhow::{Context, anyhow};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::Args;
use ipnetwork::IpNetwork;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub const DEFAULT_PORT: u16 = 51820;
pub const DEFAULT_SUBNET: &str = "10.77.0.0/24";

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: EndpointArgs,
    /// UDP port WireGuard listens on, or "random" for a free one in 49152-65535 (kept in state) [default: 51820, or the saved one]
    #[arg(long, value_parser = parse_port)]
    pub port: Option<PortChoice>,
    /// Tunnel subnet (IPv4, or IPv6 for an IPv6-only tunnel); the server takes its first host address [default: 10.77.0.0/24, or the saved one]
    #[arg(long)]
    pub subnet: Option<IpNetwork>,
    /// IPv6 subnet beside an IPv4 one, where every endpoint gets the twin of its address, or "none" [default: a random ULA /64, or the saved one]
    #[arg(long, value_parser = parse_subnet6, value_name = "CIDR|none")]
    pub subnet6: Option<Subnet6>,
    /// Number of join tokens to print, at most 1000 [default: 1 on the first start, 0 on a restart]
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=1000))]
    pub tokens: Option<u16>,
    /// How long a token stays valid (e.g. 30m, 1h, 2d; at most 366d)
    #[arg(long, default_value = "1h", value_parser = limits::parse_ttl)]
    pub token_ttl: Duration,
    /// A LAN (CIDR) the site that redeems a printed token may advertise without asking (`join --route` within it); repeatable. Other routes wait for `tunnel route approve`
    #[arg(long = "token-route", value_name = "CIDR")]
    pub token_routes: Vec<IpNetwork>,
    /// HOST[:PORT] at which joiners reach this server; a hint baked into tokens
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Transports to accept, comma-separated: udp, wss (WebSocket with TLS by this server), ws (plain WebSocket, behind a TLS-terminating reverse proxy)
    #[arg(long, default_value = "udp", value_parser = parse_transports)]
    pub transport: ServeTransports,
    /// TCP address for WebSocket connections (with --transport wss or ws)
    #[arg(long, default_value = "[::]:443", value_name = "ADDR:PORT")]
    pub wss_listen: SocketAddr,
    /// The URL joiners use when a reverse proxy stands in front, e.g. wss://vpn.example.org/tunnel (the secret path is appended)
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    #[command(flatten)]
    pub lan: LanArgs,
    /// Accept the UDP port only from this network (CIDR) and from the peers' last known endpoints; repeatable. Roaming sites and new joiners from elsewhere are then dropped
    #[arg(long = "allow-from", value_name = "CIDR")]
    pub allow_from: Vec<IpNetwork>,
    /// DNS zone the hub answers on its tunnel addresses: <container>.<site>.<zone> and <site>.<zone>
    #[arg(long, default_value = crate::dns::DEFAULT_ZONE, value_name = "ZONE")]
    pub dns_zone: String,
    /// How many endpoints (containers) one joined site may register
    #[arg(long, default_value_t = limits::DEFAULT_ENDPOINTS_PER_SITE, value_parser = clap::value_parser!(u16).range(0..=4096))]
    pub endpoints_per_site: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subnet6 {
    Net(IpNetwork),
    /// IPv4 only.
    None,
}

fn parse_subnet6(s: &str) -> Result<Subnet6, String> {
    if s == "none" {
        return Ok(Subnet6::None);
    }
    s.parse::<IpNetwork>()
        .map(Subnet6::Net)
        .map_err(|e| format!("{s:?} is not a CIDR or \"none\": {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortChoice {
    Fixed(u16),
    /// A free port from the dynamic range, picked once and kept.
    Random,
}

fn parse_port(s: &str) -> Result<PortChoice, String> {
    if s == "random" {
        return Ok(PortChoice::Random);
    }
    match s.parse::<u16>() {
        Ok(0) => Err("the server needs a fixed port for tokens; use a number or \"random\"".into()),
        Ok(p) => Ok(PortChoice::Fixed(p)),
        Err(_) => Err(format!("{s:?} is not a port (1-65535) or \"random\"")),
    }
}

/// A UDP port in 49152-65535 that nothing on this host holds now.
fn random_port() -> Result<u16, Failure> {
    for _ in 0..64 {
        let port = 49152 + (rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 16384) as u16;
        let free = |ip: IpAddr| std::net::UdpSocket::bind(SocketAddr::new(ip, port)).is_ok();
        if free(IpAddr::from([0u8; 16])) || free(IpAddr::from([0u8; 4])) {
            return Ok(port);
        }
    }
    Err(anyhow!("no free UDP port found in 49152-65535").into())
}

fn parse_transports(s: &str) -> Result<ServeTransports, String> {
    ServeTransports::parse(s).map_err(|e| e.to_string())
}

/// The public URL's `scheme://host[:port]` and path prefix.
fn public_url(text: &str) -> Result<(String, String), Failure> {
    let bad = |why: &str| Failure::input(anyhow!("--public-url {text:?}: {why}"));
    let u = url::Url::parse(text).map_err(|e| bad(&e.to_string()))?;
    if !matches!(u.scheme(), "ws" | "wss") {
        return Err(bad("use a ws:// or wss:// URL"));
    }
    let host = u.host_str().ok_or_else(|| bad("no host"))?;
    if u.query().is_some() || u.fragment().is_some() || !u.username().is_empty() {
        return Err(bad("no query, fragment or user, please"));
    }
    let base = match u.port() {
        Some(p) => format!("{}://{host}:{p}", u.scheme()),
        None => format!("{}://{host}", u.scheme()),
    };
    Ok((base, u.path().trim_end_matches('/').to_owned()))
}

/// The WebSocket side of a hub: its listener and how tokens offer it.
struct WebSocket {
    listener: tokio::net::TcpListener,
    relay: Arc<Relay>,
    path: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
    offer: WsOffer,
}

/// Prepares the WebSocket transport before the host is touched: the
/// listener is bound (so a port in use is refused up front), the secret
/// path made or reused, the certificate made or loaded.
async fn websocket(
    args: &ServeArgs,
    state: &mut ServerState,
    store: &StateDir,
) -> Result<Option<WebSocket>, Failure> {
    let t = args.transport;
    if !t.websocket() {
        if args.public_url.is_some() {
            return Err(Failure::input(anyhow!(
                "--public-url is for the WebSocket transport; add --transport udp,ws or udp,wss"
            )));
        }
        return Ok(None);
    }
    let prefix = args.public_url.as_deref().map(public_url).transpose()?;
    let secret = state
        .websocket_secret
        .get_or_insert_with(|| {
            let mut b = [0u8; 18];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
            URL_SAFE_NO_PAD.encode(b)
        })
        .clone();
    let path = format!(
        "{}/{secret}",
        prefix
            .as_ref()
            .map(|(_, p)| p.as_str())
            .unwrap_or("/tunnel")
    );
    let listener = match crate::transport::ws::bind(args.wss_listen).await {
        Err(TransportError::Connect { source, .. })
            if source.kind() == std::io::ErrorKind::AddrNotAvailable
                && args.wss_listen.is_ipv6() =>
        {
            // No IPv6 here: the IPv4 wildcard instead.
            crate::transport::ws::bind(SocketAddr::from(([0, 0, 0, 0], args.wss_listen.port())))
                .await
        }
        other => other,
    };
    let listener = listener.map_err(|e| match e {
        TransportError::Connect { source, .. }
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            Failure::input(anyhow!(
                "TCP port {} (--wss-listen) is already in use",
                args.wss_listen.port()
            ))
        }
        other => other.into(),
    })?;
    let port = listener
        .local_addr()
        .context("the WebSocket listener")?
        .port();
    let tls = if t.wss {
        store.ensure()?;
        let names = vec![
            args.endpoint
                .as_deref()
                .and_then(|e| e.rsplit_once(':').map(|(h, _)| h).or(Some(e)))
                .unwrap_or("tunnel")
                .trim_matches(|c| c == '[' || c == ']')
                .to_owned(),
        ];
        let id = Identity::load_or_create(&store.certificate(&args.common.iface), names)?;
        let acceptor = id.acceptor().context("the TLS configuration")?;
        Some((acceptor, id.fingerprint()))
    } else {
        None
    };
    let target = match (&prefix, &tls) {
        (Some((base, _)), _) => WsTarget::Url { base: base.clone() },
        (None, Some((_, sha256))) => WsTarget::Pinned {
            port,
            sha256: *sha256,
        },
        (None, None) => WsTarget::Plain { port },
    };
    tracing::info!(
        "WebSocket ({}) on TCP {}{}",
        if t.wss { "TLS" } else { "plain" },
        listener.local_addr().context("the WebSocket listener")?,
        match &prefix {
            Some((base, prefix)) => format!(", reached as {base}{prefix}/…"),
            None => String::new(),
        }
    );
    Ok(Some(WebSocket {
        listener,
        relay: Relay::new(if t.wss { "wss" } else { "ws" }),
        offer: WsOffer {
            target,
            path: path.clone(),
        },
        path,
        tls: tls.map(|(a, _)| a),
    }))
}

pub(crate) fn check_hint(hint: &str) -> Result<(), Failure> {
    if hint.is_empty()
        || hint.len() > 255
        || hint.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(Failure::input(anyhow!(
            "--endpoint {hint:?} is not HOST[:PORT]"
        )));
    }
    Ok(())
}

/// `--mtu`, else what the transports want: UDP's 1420, or 1400 for a hub
/// reached only over WebSocket.
fn default_mtu(args: &ServeArgs) -> u32 {
    args.common.mtu.unwrap_or(if args.transport.udp {
        crate::transport::UDP_MTU
    } else {
        crate::transport::WS_MTU
    })
}

/// Reuses the saved state (same key, port, subnet, peers) or makes a new one.
fn load_or_new(args: &ServeArgs, store: &StateDir) -> Result<ServerState, Failure> {
    let iface = &args.common.iface;
    match store.load_server(iface)? {
        Some(saved) => {
            if let Some(subnet) = args.subnet.filter(|s| *s != saved.subnet) {
                return Err(Failure::input(anyhow!(
                    "{} holds subnet {} for {iface}, not {subnet}; drop --subnet or use another --state-dir",
                    store.file(iface).display(),
                    saved.subnet
                )));
            }
            if let Some(PortChoice::Fixed(port)) =
                args.port.filter(|p| *p != PortChoice::Fixed(saved.port))
            {
                return Err(Failure::input(anyhow!(
                    "{} holds port {} for {iface}, not {port}; drop --port or use another --state-dir",
                    store.file(iface).display(),
                    saved.port
                )));
            }
            let want6 = match args.subnet6 {
                Some(Subnet6::Net(n)) => Some(Some(n)),
                Some(Subnet6::None) => Some(None),
                None => None,
            };
            if let Some(want6) = want6.filter(|w| *w != saved.subnet6) {
                let show = |s: Option<IpNetwork>| s.map_or("none".to_owned(), |n| n.to_string());
                return Err(Failure::input(anyhow!(
                    "{} holds IPv6 subnet {} for {iface}, not {}; drop --subnet6 or use another --state-dir",
                    store.file(iface).display(),
                    show(saved.subnet6),
                    show(want6)
                )));
            }
            tracing::info!(
                "reusing the key and peers saved in {}",
                store.file(iface).display()
            );
            Ok(ServerState {
                mtu: default_mtu(args),
                name: args
                    .common
                    .name
                    .clone()
                    .or(saved.name.clone())
                    .or_else(|| Some(crate::sys::hostname())),
                ..saved
            })
        }
        None => {
            let subnet = args
                .subnet
                .unwrap_or_else(|| DEFAULT_SUBNET.parse().expect("valid default"));
            let subnet6 = match args.subnet6 {
                Some(Subnet6::Net(n)) => Some(n),
                Some(Subnet6::None) => None,
                // Dual stack by default; an IPv6-only tunnel needs no twin.
                None if subnet.is_ipv4() => Some(crate::ipam::random_ula()),
                None => None,
            };
            crate::ipam::Subnets::new(subnet, subnet6).map_err(Failure::input)?;
            crate::ipam::Pool::new(subnet).map_err(Failure::input)?;
            let port = match args.port {
                None => DEFAULT_PORT,
                Some(PortChoice::Fixed(p)) => p,
                Some(PortChoice::Random) => random_port()?,
            };
            Ok(ServerState {
                subnet6,
                name: Some(
                    args.common
                        .name
                        .clone()
                        .unwrap_or_else(crate::sys::hostname),
                ),
                ..ServerState::new(subnet, port, default_mtu(args))
            })
        }
    }
}

pub async fn run(args: ServeArgs, shutdown: Shutdown) -> Result<(), Failure> {
    let iface = args.common.iface.clone();
    validate_ifname(&iface)?;
    args.common.metrics.check()?;
    if let Some(h) = &args.endpoint {
        check_hint(h)?;
    }
    args.lan
        .check(&args.subnet.into_iter().collect::<Vec<_>>())?;
    crate::hub::ledger::validate_routes(
        &args.token_routes,
        &args.subnet.into_iter().collect::<Vec<_>>(),
    )
    .map_err(|e| Failure::input(anyhow!("--token-route: {e}")))?;
    crate::dns::parse_zone(&args.dns_zone).map_err(Failure::input)?;
    if let Some(n) = &args.common.docker_driver {
        crate::driver::check_name(n)?;
    }
    crate::sys::require_net_admin()?;
    // Docker and the containers are checked before the host is touched.
    let docker = super::containers_up_front(
        &args.common.containers,
        args.common.attach_label.is_some() || args.common.docker_driver.is_some(),
    )
    .await?;
    let store = StateDir::new(&args.common.state_dir);
    let restart = store.load_server(&iface)?.is_some();
    let mut state = load_or_new(&args, &store)?;
    args.lan.check(&state.subnets().all())?;
    crate::hub::ledger::validate_routes(&args.token_routes, &state.subnets().all())
        .map_err(|e| Failure::input(anyhow!("--token-route: {e}")))?;
    let metrics_listener = super::bind_metrics(&args.common.metrics).await?;
    // The network driver's endpoints live as long as the run that made
    // them: a crash's are given back now.
    let leftovers = state.containers.iter().filter(|c| c.driver).count();
    if leftovers > 0 {
        tracing::info!("giving back {leftovers} network-driver endpoint(s) a previous run left");
        state.containers.retain(|c| !c.driver);
    }
    if let Some((_, infos)) = &docker {
        let names: Vec<String> = infos.iter().map(|c| c.name.clone()).collect();
        hub::ensure_containers(&mut state, &names, |n| endpoint_iface(&iface, n))?;
    }
    let websocket = websocket(&args, &mut state, &store).await?;
    let openings = Openings {
        ws_port: websocket
            .as_ref()
            .and_then(|w| w.listener.local_addr().ok())
            .map(|a| a.port()),
        uplinks: vec![],
    };
    let mut ledger = Ledger::new(state, args.endpoints_per_site.into())?;
    ledger.resume_swaps(Instant::now());
    ledger
        .set_hub_routes(args.lan.routes.clone())
        .map_err(Failure::input)?;
    ledger.set_offer(Offer {
        udp: args.transport.udp,
        websocket: websocket.as_ref().map(|w| w.offer.clone()),
    });
    // Expired invites never reach the device.
    ledger.prune(SystemTime::now());
    let server_ip = ledger.server_address();
    let state = ledger.state().clone();

    let net = Arc::new(Netlink::connect()?);
    // No site may claim what this host is or reaches directly.
    match crate::net::NetOps::host_networks(net.as_ref(), None).await {
        Ok(nets) => ledger.set_host_networks(&nets),
        Err(e) => tracing::warn!("reading this host's addresses: {e}"),
    }
    let quarantine = Arc::new(crate::wg::Quarantine::new(
        state
            .subnets()
            .interface(server_ip)
            .iter()
            .map(|n| n.ip())
            .collect(),
        CONTROL_PORT,
    ));
    // The firewall comes first, so that no packet is forwarded before it
    // holds.
    let mut gateway = Gateway::start(
        Box::new(Nftables),
        net.as_ref(),
        &store,
        policy(&args, &state, &openings),
        args.lan.firewall == Toggle::On,
        &state
            .subnets()
            .all()
            .into_iter()
            .chain(ledger.site_routes())
            .collect::<Vec<_>>(),
    )
    .await?;
    let result = async {
        let spec = DeviceSpec {
            name: iface.clone(),
            private_key: state.private_key.clone(),
            listen_port: state.port,
            peers: ledger.desired().into_values().collect(),
            addresses: state.subnets().interface(server_ip),
            mtu: state.mtu,
            confine: gateway.confine(),
            relay: websocket.as_ref().map(|w| w.relay.clone()),
            quarantine: Some(quarantine.clone()),
        };
        let device =
            crate::endpoint::create(&spec, args.common.backend, net.clone(), &store).await?;
        let shown: Vec<String> = state
            .subnets()
            .interface(server_ip)
            .iter()
            .map(|a| a.to_string())
            .collect();
        tracing::info!(
            "hub {} on UDP port {}, public key {}",
            shown.join(", "),
            state.port,
            state.private_key.public_key()
        );
        let tokens = args
            .tokens
            .map(usize::from)
            .unwrap_or(if restart { 0 } else { 1 });
        if device.backend() == BackendKind::Kernel {
            tracing::warn!(
                "with the kernel backend, an unused token's key is not kept to the control API: it reaches what a site reaches until redeemed"
            );
        }
        let hub = Arc::new(
            Hub::new(device.clone(), Some(net.clone()), store, &iface, ledger)
                .with_quarantine(quarantine)
                .await,
        );
        let engine = docker.as_ref().map(|(r, _)| r.clone());
        let driver = match (&args.common.docker_driver, engine) {
            (Some(name), Some(runtime)) => Some((
                name.clone(),
                crate::driver::Driver::new(
                    Arc::new(hub::HubEndpoints {
                        hub: hub.clone(),
                        iface: iface.clone(),
                    }),
                    net.clone(),
                    args.common.backend,
                    state.subnet,
                    server_ip,
                    prefixes(hub.routes()),
                ),
                runtime,
            )),
            _ => None,
        };
        let mut follower = docker.map(|(runtime, infos)| {
            let specs = container_specs(&state, &infos, server_ip);
            let f = Follower::new(runtime, HostPlacer::shared(net.clone(), args.common.backend), specs)
                .with_metrics(hub.metrics());
            match &args.common.attach_label {
                Some(label) => f.with_label(ByLabel {
                    label: label.clone(),
                    endpoints: Arc::new(hub::HubEndpoints {
                        hub: hub.clone(),
                        iface: iface.clone(),
                    }),
                }),
                None => f,
            }
        });
        let result = async {
            // The hub relays between its peers (sites, containers, the LANs
            // behind sites), and only between them: the firewall keeps
            // everything else out. The kernel backend cannot confine by
            // itself, so without nftables it does not forward at all.
            if gateway.may_forward(device.backend() == BackendKind::Userspace) {
                gateway
                    .forward(net.as_ref(), state.subnets().has_ipv6())
                    .await?;
            } else {
                tracing::warn!(
                    "without nftables the kernel backend cannot keep peers inside the tunnel; the hub does not forward between its peers"
                );
            }
            hub.route_saved().await?;
            // Peers reach the uplink addresses from the first packet on.
            hub.refresh_host().await;
            let extras = Extras {
                follower: follower.as_mut(),
                driver: driver.clone(),
                metrics: metrics_listener,
                openings: openings.clone(),
            };
            serve(
                &args,
                tokens,
                hub.clone(),
                &mut gateway,
                extras,
                websocket,
                shutdown,
            )
            .await
        }
        .await;
        if let Some((_, d, _)) = &driver {
            d.close().await;
        }
        if let Some(f) = follower.as_mut() {
            f.detach_all().await;
        }
        let teardown = device.destroy().await.context(format!("removing {iface}"));
        tracing::info!("{iface} removed");
        result?;
        Ok::<(), Failure>(teardown?)
    }
    .await;
    gateway.stop(net.as_ref()).await;
    result
}

/// The hub's firewall: forwarding between its peers and to its own LANs,
/// masquerading towards them, and with `--allow-from`, its port open only
/// to those networks, loopback (the hub's containers) and the peers' last
/// known endpoints.
fn policy(args: &ServeArgs, state: &ServerState, open: &Openings) -> Policy {
    let listen = (!args.allow_from.is_empty()).then(|| {
        let mut from = args.allow_from.clone();
        from.push("127.0.0.0/8".parse().expect("valid"));
        from.push("::1/128".parse().expect("valid"));
        for e in state.peers.iter().filter_map(|p| p.endpoint) {
            if !is_virtual(&e) {
                let host = crate::hub::host_net(e.ip());
                if !from.contains(&host) {
                    from.push(host);
                }
            }
        }
        let mut ports = vec![];
        if args.transport.udp {
            ports.push(Port::Udp(state.port));
        }
        ports.extend(open.ws_port.map(Port::Tcp));
        (ports, from)
    });
    let snat = state
        .peers
        .iter()
        .filter(|p| p.snat_public && p.via.is_none())
        .filter_map(|p| {
            let e = p.endpoint.filter(|e| !is_virtual(e))?;
            Some(Snat {
                site: p.address,
                public: e.ip(),
                subnet: state.subnet,
            })
        })
        .collect();
    Policy {
        iface: args.common.iface.clone(),
        hub: true,
        routes: args.lan.routes.clone(),
        masquerade: args.lan.masquerade,
        listen,
        snat,
        input: Some(HubInput {
            tunnel: state.subnets().all(),
            uplinks: open.uplinks.clone(),
        }),
    }
}

/// What the hub's firewall opens beside its state: the WebSocket
/// listener's port, and the uplink addresses peers may reach.
#[derive(Debug, Clone, Default)]
struct Openings {
    ws_port: Option<u16>,
    uplinks: Vec<IpAddr>,
}

/// The endpoints of this host's containers: the hub is their peer, on
/// loopback, as their UDP sockets live in this namespace too.
fn container_specs(
    state: &ServerState,
    infos: &[crate::docker::ContainerInfo],
    server_ip: IpAddr,
) -> Vec<EndpointSpec> {
    state
        .containers
        .iter()
        .filter(|c| c.by_label || infos.iter().any(|i| i.name == c.container))
        .map(|c| hub::container_spec(state, c, server_ip))
        .collect()
}

/// After a restart, peers' sessions are gone on this side only; they would
/// notice after their rekey timeout (~15 s). A packet to each peer seen
/// before makes this side handshake with it now.
async fn nudge_known_peers(server_ip: IpAddr, state: &ServerState) {
    let Ok(sock) = tokio::net::UdpSocket::bind(SocketAddr::new(server_ip, 0)).await else {
        return;
    };
    // Sites on a WebSocket reconnect by themselves.
    for p in state
        .peers
        .iter()
        .filter(|p| p.endpoint.is_some_and(|e| !is_virtual(&e)))
    {
        // The discard port: the packet only has to enter the tunnel.
        let _ = sock.send_to(b"", SocketAddr::new(p.address, 9)).await;
    }
}

/// Tells every site when the advertised LANs change: a datagram to its
/// control port, through the tunnel, after which it asks for them.
async fn poke_sites(hub: Arc<Hub>, server_ip: IpAddr, stop: impl std::future::Future<Output = ()>) {
    let mut routes = hub.routes();
    tokio::pin!(stop);
    let sock = match tokio::net::UdpSocket::bind(SocketAddr::new(server_ip, 0)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("sites will learn route changes within a minute only: {e}");
            return stop.await;
        }
    };
    // At start, a datagram to every peer, sites and their containers: with
    // no session yet, it makes the device start a handshake with each at
    // its saved endpoint, so that a restarted hub is back with all of them
    // at once. Otherwise a site's container, whose side still holds the old
    // session, waits out WireGuard's 15 s before it starts one itself.
    for p in hub.snapshot().await.peers {
        let to = SocketAddr::new(p.address, CONTROL_PORT);
        if let Err(e) = sock.send_to(control::tunnel::ROUTES_POKE, to).await {
            tracing::debug!("greeting {to}: {e}");
        }
    }
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = routes.changed() => if r.is_err() { return stop.await },
        }
        let state = hub.snapshot().await;
        for p in state.peers.iter().filter(|p| p.via.is_none()) {
            let to = SocketAddr::new(p.address, CONTROL_PORT);
            if let Err(e) = sock.send_to(control::tunnel::ROUTES_POKE, to).await {
                tracing::debug!("telling {to} about new routes: {e}");
            }
        }
    }
}

/// Keeps the DNS zone equal to the hub's state: rebuilt on every change.
async fn follow_names(
    hub: Arc<Hub>,
    origin: hickory_proto::rr::Name,
    zone: tokio::sync::watch::Sender<Arc<crate::dns::Zone>>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut changes = hub.changes();
    tokio::pin!(stop);
    loop {
        let state = hub.snapshot().await;
        let z = crate::dns::Zone::from_state(&state, &origin);
        tracing::debug!("DNS zone {origin}: {} names", z.len());
        zone.send_replace(Arc::new(z));
        tokio::select! {
            _ = &mut stop => return,
            r = changes.changed() => if r.is_err() { return stop.await },
        }
    }
}

/// The prefixes of `routes`, as they change.
fn prefixes(
    mut routes: tokio::sync::watch::Receiver<Vec<hub::Advertised>>,
) -> tokio::sync::watch::Receiver<Vec<IpNetwork>> {
    let now = |r: &Vec<hub::Advertised>| r.iter().map(|a| a.prefix).collect::<Vec<_>>();
    let (tx, rx) = tokio::sync::watch::channel(now(&routes.borrow_and_update()));
    tokio::spawn(async move {
        while routes.changed().await.is_ok() {
            if tx.send(now(&routes.borrow_and_update())).is_err() {
                return;
            }
        }
    });
    rx
}

/// What a hub runs beside its tunnel: its containers, followed by name
/// and label or made by Docker through the network driver, and metrics.
struct Extras<'a> {
    follower: Option<&'a mut Follower>,
    driver: Option<NetworkDriver>,
    metrics: Option<crate::metrics::Listener>,
    openings: Openings,
}

/// The driver, its plugin name, and the engine it names endpoints from.
type NetworkDriver = (
    String,
    Arc<crate::driver::Driver>,
    Arc<dyn crate::docker::ContainerRuntime>,
);

async fn serve(
    args: &ServeArgs,
    tokens: usize,
    hub: Arc<Hub>,
    gateway: &mut Gateway,
    extras: Extras<'_>,
    websocket: Option<WebSocket>,
    mut shutdown: Shutdown,
) -> Result<(), Failure> {
    let Extras {
        follower,
        driver,
        metrics,
        mut openings,
    } = extras;
    openings.uplinks = hub.uplink_addresses();
    gateway.keep(Some(policy(args, &hub.snapshot().await, &openings)));
    let iface = &args.common.iface;
    let state = hub.snapshot().await;
    let server_ip = crate::ipam::Pool::new(state.subnet)?.server_address();
    nudge_known_peers(server_ip, &state).await;
    // The first save: a state dir that cannot be written stops us here,
    // before any token is handed out.
    hub.store()
        .save(iface, &crate::state::Endpoint::Server(state))
        .context("saving the hub's state")?;

    let listener = crate::hub::http::bind(SocketAddr::new(server_ip, CONTROL_PORT), iface)?;
    let zone = crate::dns::parse_zone(&args.dns_zone).map_err(Failure::input)?;
    let dns_listeners = crate::dns::bind(
        &std::iter::once(server_ip)
            .chain(hub.snapshot().await.subnets().twin(server_ip))
            .collect::<Vec<_>>(),
        iface,
    )?;
    let (zone_tx, zone_rx) =
        tokio::sync::watch::channel(Arc::new(crate::dns::Zone::empty(zone.clone())));
    let dns = tokio::spawn(crate::dns::serve(dns_listeners, zone_rx, shutdown.waiter()));
    let names = follow_names(hub.clone(), zone.clone(), zone_tx, shutdown.waiter());
    let api = tokio::spawn(crate::hub::http::serve(
        listener,
        hub.clone(),
        shutdown.waiter(),
    ));
    let relay = websocket.as_ref().map(|w| w.relay.clone());
    let ws = websocket.map(|w| {
        tokio::spawn(crate::transport::ws::serve(
            w.listener,
            w.relay,
            w.path,
            w.tls,
            shutdown.waiter(),
        ))
    });
    let socket = hub.store().socket(iface);
    let local = control::local::bind(&socket)?;
    let plugin = match &driver {
        Some((name, d, runtime)) => Some(crate::driver::start(
            name,
            d,
            runtime.clone(),
            &mut shutdown,
        )?),
        None => None,
    };
    let local_api = Arc::new(HubApi {
        hub: hub.clone(),
        iface: iface.clone(),
        endpoint_hint: args.endpoint.clone(),
        containers: follower.as_ref().map(|f| f.status()),
        relay,
        driver: driver.as_ref().map(|(_, d, _)| d.clone()),
    });
    if let Some(l) = metrics {
        tokio::spawn(crate::metrics::serve(
            l,
            hub.metrics(),
            local_api.clone(),
            shutdown.waiter(),
        ));
    }
    let local = tokio::spawn(control::local::serve(
        local,
        socket,
        local_api,
        shutdown.trigger_fn(),
        shutdown.waiter(),
    ));

    let req = MintRequest {
        count: tokens,
        ttl: args.token_ttl,
        endpoint_hint: args.endpoint.clone(),
        name: None,
        routes: args.token_routes.clone(),
    };
    let tokens = hub
        .mint(&req, SystemTime::now())
        .await
        .map_err(|e| anyhow!(e).context("minting tokens"))?;
    let follower = match follower {
        Some(f) => {
            f.reconcile_all().await?;
            Some(f)
        }
        None => None,
    };
    {
        let mut out = std::io::stdout().lock();
        for t in &tokens {
            writeln!(out, "{}", t.encode()).context("writing tokens to stdout")?;
        }
        out.flush().context("writing tokens to stdout")?;
    }
    if !tokens.is_empty() {
        let hint = args.endpoint.as_deref().unwrap_or("<this host's address>");
        tracing::info!(
            "{} token(s) valid for {}; on the other host run: tunnel join <TOKEN> {hint}",
            tokens.len(),
            humantime::format_duration(args.token_ttl)
        );
    }
    crate::sys::notify_ready();

    let pokes = poke_sites(hub.clone(), server_ip, shutdown.waiter());
    let stop_following = shutdown.waiter();
    // The hub's containers reach every advertised LAN.
    let lans = prefixes(hub.routes());
    let follow = async move {
        if let Some(f) = follower {
            f.follow(stop_following, Some(lans)).await;
        }
    };
    let housekeeping = async {
        let mut last_seen = Instant::now();
        let mut changes = hub.changes();
        let mut guarded = Instant::now();
        loop {
            // Poll quickly only while a joiner is switching keys.
            let tick = if hub.has_pending().await {
                Duration::from_millis(20)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = hub.redeemed() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            // Nothing here may stop the hub: a failure is logged, and the
            // next tick tries again.
            let swapped = match hub.complete_swaps(Instant::now()).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("completing key swaps: {:#}", anyhow!(e));
                    0
                }
            };
            // A fresh peer's endpoint is worth saving at once: a server that
            // is killed and restarted uses it to reach the peer first.
            if swapped > 0 || last_seen.elapsed() > Duration::from_secs(10) {
                if let Err(e) = hub.record_endpoints().await {
                    tracing::warn!("recording peer endpoints: {:#}", anyhow!(e));
                }
                hub.refresh_host().await;
                last_seen = Instant::now();
            }
            if let Err(e) = hub.prune(SystemTime::now()).await {
                tracing::warn!("removing expired invites: {:#}", anyhow!(e));
            }
            hub.retry_save().await;
            // Peers' endpoints move (--allow-from, --snat-public). The
            // firewall is read back once a second, not at every quick tick
            // of a burst of joins.
            if changes.has_changed().unwrap_or(false) || guarded.elapsed() >= Duration::from_secs(1)
            {
                changes.borrow_and_update();
                openings.uplinks = hub.uplink_addresses();
                gateway.keep(Some(policy(args, &hub.snapshot().await, &openings)));
                guarded = Instant::now();
            }
        }
    };
    tokio::join!(follow, housekeeping, pokes, names);
    if let Err(e) = hub.record_endpoints().await {
        tracing::warn!("saving peer endpoints: {:#}", anyhow!(e));
    }
    let mut tasks = vec![
        ("control API", api),
        ("local control socket", local),
        ("DNS", dns),
    ];
    tasks.extend(ws.map(|t| ("WebSocket listener", t)));
    tasks.extend(plugin.map(|t| ("network driver", t)));
    for (what, task) in tasks {
        if tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .is_err()
        {
            tracing::warn!("{what} did not stop in time");
        }
    }
    Ok(())
}
