//! The hub's runtime: from a [`HubConfig`] to a running hub, until
//! shutdown, then everything undone.
//!
//! The order matters: the state is reconciled and every listener bound
//! before the host is touched ([`setup`], [`websocket`]); the firewall
//! comes before the device, so no packet is forwarded before it holds
//! ([`policy`]); the first save comes before any token is handed out. The
//! services shared with sites (containers, driver, local socket, metrics)
//! are [`crate::node`]'s; what only a hub does beside its API is in
//! [`tasks`].

pub mod policy;
pub mod setup;
pub mod tasks;
pub mod websocket;

pub use setup::{DEFAULT_PORT, PortChoice, Subnet6};

use super::api::HubApi;
use super::{Hub, HubEndpoints, Ledger, MintRequest};
use crate::containers::{EndpointSpec, endpoint_iface};
use crate::control::{CONTROL_PORT, ControlError};
use crate::docker::{ContainerInfo, ContainerRuntime, Label};
use crate::gateway::Gateway;
use crate::metrics::Listener;
use crate::net::NetOps;
use crate::node::{Containers, Context, Services};
use crate::shutdown::Shutdown;
use crate::state::{Endpoint, ServerState};
use crate::store::StateDir;
use crate::token::Token;
use crate::transport::{Offer, ServeTransports};
use crate::wg::{BackendChoice, BackendKind, DeviceSpec, Quarantine};
use ipnetwork::IpNetwork;
use policy::{Openings, policy};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use websocket::WebSocket;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The command line or the saved state is at fault; the text says how.
    #[error("{0}")]
    Input(String),
    #[error("no free UDP port found in 49152-65535")]
    NoFreePort,
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
    #[error("the TLS configuration")]
    Tls(#[source] rustls::Error),
    #[error("minting tokens")]
    Mint(#[source] super::Denied<super::MintError>),
    #[error("saving the hub's state")]
    Save(#[source] crate::store::StateError),
    #[error(transparent)]
    Hub(#[from] super::HubError),
    #[error(transparent)]
    Ipam(#[from] crate::ipam::IpamError),
    #[error(transparent)]
    State(#[from] crate::store::StateError),
    #[error(transparent)]
    Wg(#[from] crate::wg::WgError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    Gateway(#[from] crate::gateway::GatewayError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::EndpointError),
}

/// What `tunnel serve` asks for, checked by the command.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub iface: String,
    pub state_dir: PathBuf,
    pub backend: BackendChoice,
    pub mtu: Option<u32>,
    pub name: Option<String>,
    pub attach_label: Option<Label>,
    pub docker_driver: Option<String>,
    pub port: Option<PortChoice>,
    pub subnet: Option<IpNetwork>,
    pub subnet6: Option<Subnet6>,
    /// Tokens to print; `None`: one on the first start, none on a restart.
    pub tokens: Option<u16>,
    pub token_ttl: Duration,
    pub token_routes: Vec<IpNetwork>,
    pub endpoint: Option<String>,
    pub transport: ServeTransports,
    pub wss_listen: SocketAddr,
    pub public_url: Option<String>,
    /// The hub's own LANs (`--route`), `--masquerade`, `--firewall on`.
    pub routes: Vec<IpNetwork>,
    pub masquerade: bool,
    pub firewall: bool,
    pub allow_from: Vec<IpNetwork>,
    pub dns_zone: String,
    pub endpoints_per_site: u16,
    /// Direct paths between sites, with this hub as rendezvous and relay.
    pub mesh: bool,
}

/// What the command has prepared before the host is touched: the Docker
/// engine and the named containers, `--metrics` bound, and the host's
/// real implementations (netlink, nftables) that the hub changes it with.
pub struct Prepared {
    pub docker: Option<(Arc<dyn ContainerRuntime>, Vec<ContainerInfo>)>,
    pub metrics: Option<Listener>,
    pub net: Arc<dyn NetOps>,
    pub firewall: Box<dyn crate::firewall::Firewall>,
}

/// The hub's state reconciled, its ledger made and its WebSocket bound:
/// everything decided, nothing on the host changed yet.
struct Plan {
    store: StateDir,
    restart: bool,
    state: ServerState,
    websocket: Option<WebSocket>,
    openings: Openings,
}

fn input(what: &str) -> impl FnOnce(super::RouteError) -> ServeError + '_ {
    move |e| ServeError::Input(format!("{what}{e}"))
}

async fn plan(
    config: &HubConfig,
    docker: Option<&[ContainerInfo]>,
    taken: &[IpNetwork],
) -> Result<(Plan, Ledger), ServeError> {
    let store = StateDir::new(&config.state_dir);
    let restart = store.load_server(&config.iface)?.is_some();
    let mut state = setup::load_or_new(config, &store, taken)?;
    let subnets = state.subnets().all();
    super::ledger::validate_routes(&config.routes, &subnets).map_err(input(""))?;
    super::ledger::validate_routes(&config.token_routes, &subnets)
        .map_err(input("--token-route: "))?;
    // The network driver's endpoints an earlier run left wait for the
    // driver, which takes back those whose containers still run; without
    // one they are given back now.
    let leftovers = state.containers.iter().filter(|c| c.driver).count();
    if leftovers > 0 && config.docker_driver.is_none() {
        tracing::info!("giving back {leftovers} network-driver endpoint(s) a previous run left");
        state.containers.retain(|c| !c.driver);
    }
    if let Some(infos) = docker {
        let names: Vec<String> = infos.iter().map(|c| c.name.clone()).collect();
        super::ensure_containers(&mut state, &names, |n| endpoint_iface(&config.iface, n))?;
    }
    let websocket = websocket::prepare(config, &mut state, &store).await?;
    let openings = Openings {
        ws_port: websocket.as_ref().and_then(WebSocket::port),
        probe_port: None,
        uplinks: vec![],
        ws_sources: Default::default(),
    };
    let mut ledger = Ledger::new(state, config.endpoints_per_site.into())?;
    ledger.resume_swaps(Instant::now());
    // `--route` replaces the saved LANs; without it the hub keeps what
    // it had (`route add|del` changed them live).
    let own_routes = if config.routes.is_empty() {
        ledger.state().routes.clone()
    } else {
        config.routes.clone()
    };
    ledger.set_hub_routes(own_routes).map_err(input(""))?;
    ledger.set_offer(Offer {
        udp: config.transport.udp,
        websocket: websocket.as_ref().map(|w| w.offer.clone()),
    });
    // Expired invites never reach the device.
    ledger.prune(SystemTime::now());
    let state = ledger.state().clone();
    let plan = Plan {
        store,
        restart,
        state,
        websocket,
        openings,
    };
    Ok((plan, ledger))
}

/// Whether the hub binds a UDP port: unless it takes WebSocket only.
fn udp_bound(config: &HubConfig, websocket: bool) -> bool {
    config.transport.udp || !websocket
}

/// What the hub listens on, as `status` says it.
fn listening(config: &HubConfig, port: u16, ws_port: Option<u16>) -> Vec<String> {
    let mut out = vec![];
    if udp_bound(config, ws_port.is_some()) {
        out.push(format!("UDP {port}"));
    }
    if let Some(p) = ws_port {
        let kind = match (config.transport.wss, config.transport.ws) {
            (true, true) => "WebSocket (wss, ws)",
            (true, false) => "WebSocket with TLS (wss)",
            _ => "plain WebSocket (ws, behind a TLS proxy)",
        };
        out.push(format!(
            "{kind} on TCP {}",
            SocketAddr::new(config.wss_listen.ip(), p)
        ));
    }
    out
}

/// Runs the hub until `shutdown`: prints its tokens through `print` once
/// it is up, and undoes everything on the way out, after errors too.
pub async fn run(
    config: HubConfig,
    prepared: Prepared,
    print: impl FnOnce(&[Token]) -> std::io::Result<()>,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    let Prepared {
        docker,
        metrics,
        net,
        firewall,
    } = prepared;
    // A new hub's default subnet keeps clear of what the host has (but
    // our own interface, which a crash may have left).
    let taken: Vec<IpNetwork> = match net.occupied().await {
        Ok(o) => o
            .into_iter()
            .filter(|o| o.iface != config.iface)
            .map(|o| o.net)
            .collect(),
        Err(e) => {
            tracing::warn!("reading this host's addresses and routes: {e}");
            vec![]
        }
    };
    let docker_infos = docker.as_ref().map(|(_, i)| i.as_slice());
    let (plan, mut ledger) = plan(&config, docker_infos, &taken).await?;
    // No site may claim what this host is or reaches directly.
    match net.host_networks(None).await {
        Ok(nets) => ledger.set_host_networks(&nets),
        Err(e) => tracing::warn!("reading this host's addresses: {e}"),
    }
    // The firewall comes first, so that no packet is forwarded before it
    // holds.
    let mut gateway = Gateway::start(
        firewall,
        net.as_ref(),
        &plan.store,
        policy(&config, &plan.state, &plan.openings),
        config.firewall,
        &plan
            .state
            .subnets()
            .all()
            .into_iter()
            .chain(ledger.site_routes())
            .collect::<Vec<_>>(),
    )
    .await?;
    let mut services = Services::default();
    let result = async {
        let hub = bring_up(&config, &plan, ledger, net.clone(), &gateway).await?;
        let device = hub.device();
        let result = running(
            &config,
            plan,
            Up {
                hub,
                net: net.clone(),
                docker,
                metrics,
            },
            &mut gateway,
            &mut services,
            print,
            shutdown,
        )
        .await;
        services.stop().await;
        let removed = device.destroy().await;
        tracing::info!("{} removed", config.iface);
        result?;
        Ok::<(), ServeError>(removed?)
    }
    .await;
    gateway.stop(net.as_ref()).await;
    result
}

/// Creates the device with the ledger's peers and wraps it in a [`Hub`].
async fn bring_up(
    config: &HubConfig,
    plan: &Plan,
    ledger: Ledger,
    net: Arc<dyn NetOps>,
    gateway: &Gateway,
) -> Result<Arc<Hub>, ServeError> {
    let state = &plan.state;
    let server_ip = ledger.server_address();
    let quarantine = Arc::new(Quarantine::new(
        state
            .subnets()
            .interface(server_ip)
            .iter()
            .map(|n| n.ip())
            .collect(),
        CONTROL_PORT,
    ));
    let (mesh_socket, disco) =
        crate::wg::mesh::MeshSocket::new(true, plan.websocket.as_ref().map(|w| w.relay.clone()));
    let spec = DeviceSpec {
        name: config.iface.clone(),
        private_key: state.private_key.clone(),
        listen_port: state.port,
        peers: ledger.desired().into_values().collect(),
        addresses: state.subnets().interface(server_ip),
        mtu: state.mtu,
        confine: gateway.confine(),
        relay: plan.websocket.as_ref().map(|w| w.relay.clone()),
        quarantine: Some(quarantine.clone()),
        mesh: Some(mesh_socket.clone()),
        // A hub on WebSocket only binds no UDP port at all.
        udp: udp_bound(config, plan.websocket.is_some()),
    };
    let device = crate::endpoint::create(&spec, config.backend, net.clone(), &plan.store).await?;
    let mesh = match device.backend() {
        BackendKind::Userspace if !config.mesh => {
            tracing::info!("no mesh (--no-mesh): sites reach each other through this hub");
            None
        }
        BackendKind::Userspace if !spec.udp => {
            tracing::info!(
                "no mesh: a hub on WebSocket only has no UDP port to meet sites on; they reach each other through it"
            );
            None
        }
        BackendKind::Userspace => {
            let tunnel = state.subnets().all();
            super::mesh::HubMesh::start(mesh_socket, disco, state.private_key.clone(), tunnel).await
        }
        BackendKind::Kernel => {
            tracing::info!(
                "the kernel backend relays nothing of ours: sites stay routed through this hub"
            );
            None
        }
    };
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
    if device.backend() == BackendKind::Kernel {
        tracing::warn!(
            "with the kernel backend, an unused token's key is not kept to the control API: it reaches what a site reaches until redeemed"
        );
    }
    let hub = Hub::new(device, Some(net), plan.store.clone(), &config.iface, ledger)
        .with_quarantine(quarantine)
        .await
        .with_mesh(mesh)
        .with_websocket(plan.websocket.as_ref().map(|w| w.relay.clone()));
    Ok(Arc::new(hub))
}

/// The hub and what runs beside it, once its device exists.
struct Up {
    hub: Arc<Hub>,
    net: Arc<dyn NetOps>,
    docker: Option<(Arc<dyn ContainerRuntime>, Vec<ContainerInfo>)>,
    metrics: Option<Listener>,
}

/// The endpoints of this host's containers: the hub is their peer, on
/// loopback, as their UDP sockets live in this namespace too.
fn container_specs(
    state: &ServerState,
    infos: &[ContainerInfo],
    server_ip: IpAddr,
) -> Vec<EndpointSpec> {
    state
        .containers
        .iter()
        .filter(|c| !c.driver && (c.by_label || infos.iter().any(|i| i.name == c.container)))
        .map(|c| super::container_spec(state, c, server_ip))
        .collect()
}

/// Forwarding, the containers' services, the first save: what comes
/// before the API answers.
async fn prepare_services(
    config: &HubConfig,
    up: &mut Up,
    gateway: &mut Gateway,
    services: &mut Services,
    shutdown: &mut Shutdown,
) -> Result<(), ServeError> {
    let hub = &up.hub;
    let state = hub.snapshot().await;
    let server_ip = crate::ipam::Pool::new(state.subnet)?.server_address();
    // The hub relays between its peers (sites, containers, the LANs
    // behind sites), and only between them: the firewall keeps
    // everything else out. The kernel backend cannot confine by
    // itself, so without nftables it does not forward at all.
    let userspace = hub.device().backend() == BackendKind::Userspace;
    if gateway.may_forward(userspace) {
        gateway
            .forward(up.net.as_ref(), state.subnets().has_ipv6())
            .await?;
    } else {
        tracing::warn!(
            "without nftables the kernel backend cannot keep peers inside the tunnel; the hub does not forward between its peers"
        );
    }
    hub.route_saved().await?;
    // Peers reach the uplink addresses from the first packet on.
    hub.refresh_host().await;
    let endpoints: Arc<dyn crate::containers::Endpoints> = Arc::new(HubEndpoints {
        hub: hub.clone(),
        iface: config.iface.clone(),
    });
    let containers = up.docker.take().map(|(runtime, infos)| Containers {
        runtime,
        specs: container_specs(&state, &infos, server_ip),
        label: config.attach_label.clone(),
        driver: config.docker_driver.clone(),
    });
    let ctx = Context {
        net: up.net.clone(),
        backend: config.backend,
        subnet: state.subnet,
        subnet6: state.subnet6,
        server: server_ip,
        metrics: hub.metrics(),
    };
    let lans = crate::node::follow_prefixes(hub.routes(), |a| a.prefix);
    *services = Services::start(containers, Some(endpoints), &ctx, lans, shutdown)?;
    Ok(())
}

/// Serves the API, DNS, WebSocket and the local socket, prints the tokens,
/// then keeps house until shutdown.
async fn running(
    config: &HubConfig,
    plan: Plan,
    mut up: Up,
    gateway: &mut Gateway,
    services: &mut Services,
    print: impl FnOnce(&[Token]) -> std::io::Result<()>,
    mut shutdown: Shutdown,
) -> Result<(), ServeError> {
    prepare_services(config, &mut up, gateway, services, &mut shutdown).await?;
    let hub = up.hub.clone();
    let mut openings = plan.openings;
    openings.uplinks = hub.uplink_addresses();
    openings.probe_port = hub.mesh().map(|m| m.probe_port());
    gateway.keep(Some(policy(config, &hub.snapshot().await, &openings)));
    let state = hub.snapshot().await;
    let port = state.port;
    let server_ip = crate::ipam::Pool::new(state.subnet)?.server_address();
    tasks::nudge_known_peers(server_ip, &state).await;
    // The first save: a state dir that cannot be written stops us here,
    // before any token is handed out.
    hub.store()
        .save(&config.iface, &Endpoint::Server(state))
        .map_err(ServeError::Save)?;
    let relay = plan.websocket.as_ref().map(|w| w.relay.clone());
    listen(config, &hub, server_ip, plan.websocket, services, &shutdown).await?;
    let local_api = Arc::new(HubApi {
        hub: hub.clone(),
        iface: config.iface.clone(),
        endpoint_hint: config.endpoint.clone(),
        containers: services.containers(),
        relay,
        driver: services.driver(),
        listening: listening(config, port, openings.ws_port),
        udp: udp_bound(config, openings.ws_port.is_some()),
    });
    let metrics = up.metrics.take().map(|l| (l, hub.metrics()));
    services.listen(hub.store(), &config.iface, local_api, metrics, &shutdown)?;
    let count = config
        .tokens
        .map(usize::from)
        .unwrap_or(if plan.restart { 0 } else { 1 });
    let tokens = mint(config, &hub, count).await?;
    services.attach().await?;
    print(&tokens).map_err(|e| ServeError::Io("writing tokens to stdout", e))?;
    if !tokens.is_empty() {
        let hint = config
            .endpoint
            .as_deref()
            .unwrap_or("<this host's address>");
        tracing::info!(
            "{} token(s) valid for {}; on the other host run: tunnel join <TOKEN> {hint}",
            tokens.len(),
            humantime::format_duration(config.token_ttl)
        );
    }
    crate::sys::notify_ready();
    let lans = crate::node::follow_prefixes(hub.routes(), |a| a.prefix);
    let pokes = tasks::poke_sites(hub.clone(), server_ip, shutdown.waiter());
    let mesh = super::mesh::run(hub.clone(), shutdown.waiter());
    let stop_following = shutdown.waiter();
    let follow = services.follow(stop_following, lans);
    let housekeeping = housekeeping(config, &hub, gateway, openings, shutdown);
    tokio::join!(follow, housekeeping, pokes, mesh);
    if let Err(e) = hub.record_endpoints().await {
        tracing::warn!("saving peer endpoints: {}", chain(&e));
    }
    Ok(())
}

async fn mint(config: &HubConfig, hub: &Hub, count: usize) -> Result<Vec<Token>, ServeError> {
    let req = MintRequest {
        count,
        ttl: config.token_ttl,
        endpoint_hint: config.endpoint.clone(),
        name: None,
        routes: config.token_routes.clone(),
    };
    hub.mint(&req, SystemTime::now())
        .await
        .map_err(ServeError::Mint)
}

/// The hub's listeners: the API on its tunnel address, DNS, WebSocket.
async fn listen(
    config: &HubConfig,
    hub: &Arc<Hub>,
    server_ip: IpAddr,
    websocket: Option<WebSocket>,
    services: &mut Services,
    shutdown: &Shutdown,
) -> Result<(), ServeError> {
    let iface = &config.iface;
    let listener = super::http::bind(SocketAddr::new(server_ip, CONTROL_PORT), iface)?;
    let zone = crate::dns::parse_zone(&config.dns_zone)?;
    let dns_listeners = crate::dns::bind(
        &std::iter::once(server_ip)
            .chain(hub.snapshot().await.subnets().twin(server_ip))
            .collect::<Vec<_>>(),
        iface,
    )?;
    let (zone_tx, zone_rx) =
        tokio::sync::watch::channel(Arc::new(crate::dns::Zone::empty(zone.clone())));
    // Names outside the zone: the host's resolvers, for the tunnel's
    // peers only.
    let forward = match crate::dns::Forwarder::from_system(hub.snapshot().await.subnets().all()) {
        Ok(f) => Some(Arc::new(f)),
        Err(e) => {
            tracing::warn!("{e}; the hub's DNS answers the tunnel's names only");
            None
        }
    };
    let dns = crate::dns::serve(dns_listeners, zone_rx, forward, shutdown.waiter());
    services.spawned("DNS", tokio::spawn(dns));
    let names = tasks::follow_names(hub.clone(), zone, zone_tx, shutdown.waiter());
    services.spawned("DNS zone", tokio::spawn(names));
    let api = super::http::serve(listener, hub.clone(), shutdown.waiter());
    services.spawned("control API", tokio::spawn(api));
    if let Some(w) = websocket {
        let ws = crate::transport::ws::serve(w.listener, w.relay, w.path, w.tls, shutdown.waiter());
        services.spawned("WebSocket listener", tokio::spawn(ws));
    }
    Ok(())
}

/// Swaps, endpoints, expiry, save retries and the firewall's view of the
/// peers, until shutdown: each round does what is due and sleeps until
/// the next deadline ([`Hub::housekeep`]), or until something sooner comes
/// in (a redeem). Nothing here may stop the hub: the hub logs a failure,
/// and the chore comes round again.
async fn housekeeping(
    config: &HubConfig,
    hub: &Hub,
    gateway: &mut Gateway,
    mut openings: Openings,
    mut shutdown: Shutdown,
) {
    // `--snat-public` sites already told about, once each.
    let mut unknown = std::collections::BTreeSet::new();
    loop {
        let round = hub.housekeep(Instant::now(), SystemTime::now()).await;
        // Peers' endpoints move (--allow-from, --snat-public), and someone
        // may flush the firewall: read back after changes and once a second.
        if round.check_firewall {
            openings.uplinks = hub.uplink_addresses();
            openings.ws_sources = hub.websocket_sources().await;
            openings.probe_port = hub.mesh().map(|m| m.probe_port());
            let state = hub.snapshot().await;
            let lans_changed = state.routes != gateway.policy().routes;
            gateway.keep(Some(policy(config, &state, &openings)));
            for site in policy::snat_unknown(&state, &openings) {
                if unknown.insert(site) {
                    tracing::warn!(
                        "site {site} asked for --snat-public, but its WebSocket comes through a proxy on this host that does not say whom for (X-Forwarded-For): its traffic to this host keeps its tunnel address"
                    );
                }
            }
            // New LANs of the hub's own: their links forward too (the
            // replies come in there).
            if lans_changed
                && let Some(net) = hub.net()
                && let Err(e) = gateway
                    .forward(net.as_ref(), state.subnets().has_ipv6())
                    .await
            {
                tracing::warn!("forwarding towards the hub's LANs: {e}");
            }
        }
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = hub.wakeup() => {}
            _ = tokio::time::sleep_until(round.next.into()) => {}
        }
    }
}

/// An error with its causes, as `{:#}` shows an `anyhow` chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
