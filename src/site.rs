//! A joined site: what it is ([`Site`]), how `join` redeems a token and
//! switches to the site's own key ([`redeem_and_switch`]), how `join` and
//! `up` register and attach its containers, and how it runs until shutdown
//! ([`run`]).

use crate::containers::{
    ByLabel, ContainerError, ContainerView, EndpointSpec, Follower, HostPlacer, endpoint_iface,
};
use crate::control::auth::{AuthError, Signer};
use crate::control::local::{self, LocalApi};
use crate::control::{CONTROL_PORT, ControlError, Patience, tunnel};
use crate::docker::{ContainerInfo, ContainerRuntime};
use crate::gateway::Gateway;
use crate::control::tunnel::{Advertised, Joining};
use crate::keys::PrivateKey;
use crate::net::Netlink;
use crate::net::{MAIN_TABLE, NetOps, PolicyRule};
use crate::shutdown::Shutdown;
use crate::state::{ContainerRecord, Endpoint, JoinedState};
use crate::store::{StateDir, StateError};
use crate::status::{EndpointStatus, PeerReport, Role};
use crate::token::Token;
use crate::transport::proxy::Proxy;
use crate::transport::ws::{Connection, Dialer, Link};
use crate::transport::{
    HUB_LINK, JoinTransport, Path, Relay, TransportError, UDP_MTU, WS_MTU, WsOffer, virtual_addr,
};
use crate::wg::{BackendChoice, KEEPALIVE, DeviceSpec, PeerSpec, WgDevice, WgError};
use indicatif::ProgressBar;
use ipnetwork::IpNetwork;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// After a handshake with the invite key, how long without a connection to
/// the API means the server knows the invite but no longer admits it. Long
/// enough for a hub busy admitting hundreds to accept our connection.
const USED_AFTER: Duration = Duration::from_secs(6);
/// How long a request the hub has taken may wait for its answer before it
/// is asked again (the hub answers the same request the same way).
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("the server refused this token: {0}")]
    Refused(String),
    #[error(
        "the token was already used: the server at {0} recognised it but no longer admits it; ask for a new token"
    )]
    AlreadyUsed(SocketAddr),
    #[error(
        "server unreachable: no WireGuard handshake with {endpoint} within {timeout} (is `tunnel serve` running there, and UDP port {} open?)",
        endpoint.port()
    )]
    Unreachable {
        endpoint: SocketAddr,
        timeout: String,
    },
    #[error("the server assigned {got} but the token says {want}")]
    Mismatch { got: IpNetwork, want: IpNetwork },
    #[error("the server admitted this host but traffic does not flow")]
    NoFlow(#[source] ControlError),
    #[error(
        "server unreachable: no WireGuard handshake over UDP, and no WebSocket connection ({0})"
    )]
    NoPath(String),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("registering container {name} with the server")]
    Register {
        name: String,
        #[source]
        source: ControlError,
    },
    #[error("the token's keys cannot sign requests")]
    Auth(#[from] AuthError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Wg(#[from] WgError),
    #[error(transparent)]
    Containers(#[from] ContainerError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("writing to stdout")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Gateway(#[from] crate::gateway::GatewayError),
    #[error(transparent)]
    Driver(#[from] crate::driver::DriverError),
}

impl SiteError {
    /// Whether the input (the token) is at fault, rather than the network.
    pub fn is_input(&self) -> bool {
        match self {
            SiteError::Refused(_) | SiteError::AlreadyUsed(_) => true,
            SiteError::Transport(t) => t.is_input(),
            _ => false,
        }
    }
}

/// The hub as a site's only peer: the whole tunnel subnet through it.
pub fn hub_peer(joined: &JoinedState, endpoint: SocketAddr) -> PeerSpec {
    PeerSpec {
        public_key: joined.server_public_key,
        endpoint: Some(endpoint),
        allowed_ips: joined.subnets().all(),
        keepalive: Some(KEEPALIVE),
    }
}

/// A site's firewall, before its device exists: forwarding between the
/// tunnel and its own LANs only, masquerading towards them with
/// `--masquerade`.
pub async fn start_gateway(
    net: &dyn NetOps,
    store: &StateDir,
    iface: &str,
    inv: &Invitation<'_>,
    firewall: bool,
) -> Result<Gateway, SiteError> {
    site_gateway(
        net,
        store,
        iface,
        inv.token.subnets(),
        inv.routes,
        inv.masquerade,
        firewall,
    )
    .await
}

/// The same for a saved site (`up`).
pub async fn site_gateway(
    net: &dyn NetOps,
    store: &StateDir,
    iface: &str,
    subnets: crate::ipam::Subnets,
    routes: &[IpNetwork],
    masquerade: bool,
    firewall: bool,
) -> Result<Gateway, SiteError> {
    let policy = crate::firewall::Policy {
        iface: iface.to_owned(),
        hub: false,
        routes: routes.to_vec(),
        masquerade,
        ..Default::default()
    };
    let nets: Vec<IpNetwork> = subnets
        .all()
        .into_iter()
        .chain(routes.iter().copied())
        .collect();
    Ok(Gateway::start(
        Box::new(crate::firewall::Nftables),
        net,
        store,
        policy,
        firewall,
        &nets,
    )
    .await?)
}

/// The hub's control API, through the tunnel.
pub fn api(joined: &JoinedState) -> SocketAddr {
    SocketAddr::new(joined.server_address, CONTROL_PORT)
}

/// What a token and the command line say about the site being joined.
pub struct Invitation<'a> {
    pub token: &'a Token,
    /// The server as the user gave it (`HOST[:PORT]`), kept for `up`.
    pub server: &'a str,
    pub endpoint: SocketAddr,
    pub iface: &'a str,
    /// As given with `--mtu`; otherwise it follows the transport.
    pub mtu: Option<u32>,
    pub backend: BackendChoice,
    pub transport: JoinTransport,
    /// `--proxy`, which wins over the environment.
    pub proxy: Option<&'a str>,
    /// How long the whole bring-up may take.
    pub timeout: Duration,
    /// The LANs behind this site, advertised with the redeem.
    pub routes: &'a [IpNetwork],
    pub masquerade: bool,
    /// `--transparent`, and `--snat-public` with it.
    pub transparent: bool,
    pub snat_public: bool,
    /// `--name`, else the host name (which the hub may number).
    pub name: Option<&'a str>,
    /// `--attach-label`, saved for `up`.
    pub attach_label: Option<String>,
}

impl Invitation<'_> {
    /// Whether WebSocket is among the ways to try.
    pub fn websocket(&self) -> bool {
        self.token.websocket.is_some() && self.transport != JoinTransport::Udp
    }

    /// Whether UDP is among the ways to try.
    pub fn udp(&self) -> bool {
        self.token.udp && self.transport != JoinTransport::Wss
    }

    /// Checks the choice against the token before anything is touched.
    pub fn check(&self) -> Result<(), SiteError> {
        match self.transport {
            JoinTransport::Wss if self.token.websocket.is_none() => Err(SiteError::Refused(
                "the token offers no WebSocket transport (serve with --transport udp,wss)".into(),
            )),
            JoinTransport::Udp if !self.token.udp => Err(SiteError::Refused(
                "the server takes no UDP (the token offers WebSocket only)".into(),
            )),
            _ => Ok(()),
        }
    }

    fn initial_mtu(&self) -> u32 {
        self.mtu
            .unwrap_or(if self.udp() { UDP_MTU } else { WS_MTU })
    }

    /// The device to bring up first: the invite key, the hub as its peer,
    /// with a relay for WebSocket links when they may be needed.
    pub fn device_spec(&self, relay: Option<Arc<Relay>>) -> DeviceSpec {
        DeviceSpec {
            name: self.iface.to_owned(),
            private_key: self.token.invite_key.clone(),
            listen_port: 0,
            peers: vec![self.hub(self.endpoint)],
            addresses: self.token.subnets().interface(self.token.assigned),
            mtu: self.initial_mtu(),
            confine: None,
            relay,
            quarantine: None,
        }
    }

    fn hub(&self, endpoint: SocketAddr) -> PeerSpec {
        PeerSpec {
            public_key: self.token.server_public_key,
            endpoint: Some(endpoint),
            allowed_ips: self.token.subnets().all(),
            keepalive: Some(KEEPALIVE),
        }
    }

    /// The WebSocket dialers to try, in order: direct, then through the
    /// environment's proxy (`HTTPS_PROXY`/`HTTP_PROXY`, unless NO_PROXY
    /// exempts the server). An explicit `--proxy` is the only way tried.
    fn dialers(&self) -> Result<Vec<Arc<Dialer>>, SiteError> {
        let Some(offer) = &self.token.websocket else {
            return Ok(vec![]);
        };
        let host = self.endpoint.ip().to_string();
        if let Some(flag) = self.proxy {
            let proxy = Proxy::parse(flag)?;
            return Ok(vec![Arc::new(Dialer::new(offer, &host, Some(proxy))?)]);
        }
        let direct = Dialer::new(offer, &host, None)?;
        let tls = direct.url().starts_with("wss:");
        let proxy = Proxy::for_target(None, direct.host(), tls, |k| std::env::var(k).ok())?;
        let mut out = vec![Arc::new(direct)];
        if let Some(p) = proxy {
            out.push(Arc::new(Dialer::new(offer, &host, Some(p))?));
        }
        Ok(out)
    }
}

/// How this site's datagrams reach the hub, once chosen.
pub struct Route {
    pub path: Path,
    /// The hub's endpoint for the device: its UDP address, or the link's
    /// virtual address.
    pub endpoint: SocketAddr,
    /// For WebSocket: how to reach the hub again (containers use it too).
    pub dialer: Option<Arc<Dialer>>,
    /// The site's own link, kept up while the route is.
    pub link: Option<Link>,
    pub mtu: u32,
}

impl Route {
    fn udp(endpoint: SocketAddr, mtu: u32) -> Self {
        Route {
            path: Path::Udp,
            endpoint,
            dialer: None,
            link: None,
            mtu,
        }
    }

    /// A route over `dialer`'s WebSocket, through `relay`.
    pub fn websocket(
        offer: WsOffer,
        dialer: Arc<Dialer>,
        relay: Arc<Relay>,
        first: Option<Connection>,
        mtu: u32,
    ) -> Self {
        let path = Path::Websocket {
            offer,
            proxy: dialer.proxy().map(|p| p.url.clone()),
        };
        Route {
            path,
            endpoint: virtual_addr(HUB_LINK),
            link: Some(Link::spawn(dialer.clone(), relay, first)),
            dialer: Some(dialer),
            mtu,
        }
    }
}

/// The route a joined site saved (for `up`), with the relay its device
/// needs for a WebSocket. `proxy` (`--proxy`) replaces the saved proxy.
pub fn saved_route(
    joined: &JoinedState,
    endpoint: SocketAddr,
    proxy: Option<&str>,
) -> Result<(Route, Option<Arc<Relay>>), SiteError> {
    match &joined.path {
        Path::Udp => Ok((Route::udp(endpoint, joined.mtu), None)),
        Path::Websocket {
            offer,
            proxy: saved,
        } => {
            let proxy = proxy.or(saved.as_deref()).map(Proxy::parse).transpose()?;
            let dialer = Arc::new(Dialer::new(offer, &endpoint.ip().to_string(), proxy)?);
            let relay = Relay::new("websocket");
            let route = Route::websocket(offer.clone(), dialer, relay.clone(), None, joined.mtu);
            Ok((route, Some(relay)))
        }
    }
}

/// How long UDP gets to complete a handshake before `auto` tries WebSocket.
const UDP_BOUND: Duration = Duration::from_millis(1000);
/// After this long without a direct WebSocket, the proxy is tried too.
const STAGGER: Duration = Duration::from_millis(300);

/// Chooses the path: UDP when it gets a handshake within a short bound
/// (or is the only one), else WebSocket direct, else through the proxy.
/// The device must have been made with `relay` when WebSocket is possible.
pub async fn choose_path(
    inv: &Invitation<'_>,
    device: &dyn WgDevice,
    relay: Option<&Arc<Relay>>,
    net: &dyn NetOps,
    progress: &ProgressBar,
    deadline: Instant,
) -> Result<Route, SiteError> {
    let mtu = inv.initial_mtu();
    if !inv.websocket() {
        return Ok(Route::udp(inv.endpoint, mtu));
    }
    if inv.udp() {
        progress.set_message(format!("trying UDP to {}", inv.endpoint));
        let api = SocketAddr::new(inv.token.server_address, CONTROL_PORT);
        let until = (Instant::now() + UDP_BOUND).min(deadline);
        while Instant::now() < until {
            // Any packet starts a handshake; the ping's answer is not needed.
            let _ = tunnel::ping(api, Duration::from_millis(100)).await;
            if device
                .peers()
                .await?
                .iter()
                .any(|p| p.last_handshake.is_some())
            {
                return Ok(Route::udp(inv.endpoint, mtu));
            }
        }
        tracing::info!("no WireGuard handshake over UDP within {UDP_BOUND:?}; trying WebSocket");
    }
    let relay = relay.expect("a relay when WebSocket is possible").clone();
    let dialers = inv.dialers()?;
    progress.set_message(format!("connecting to {}", dialers[0].shown()));
    let (i, conn) = first_connection(&dialers, deadline).await?;
    let offer = inv.token.websocket.clone().expect("checked above");
    let mtu = inv.mtu.unwrap_or(WS_MTU);
    let route = Route::websocket(offer, dialers[i].clone(), relay, Some(conn), mtu);
    // A fresh peer with the link's address: the next packet handshakes at
    // once instead of waiting out a UDP attempt's retry timer.
    device.remove_peer(&inv.token.server_public_key).await?;
    device.upsert_peer(&inv.hub(route.endpoint)).await?;
    if mtu != inv.initial_mtu() {
        net.set_mtu(inv.iface, mtu).await.map_err(WgError::from)?;
    }
    Ok(route)
}

/// The first dialer to connect; a later one starts when the earlier has
/// failed or has taken longer than [`STAGGER`].
async fn first_connection(
    dialers: &[Arc<Dialer>],
    deadline: Instant,
) -> Result<(usize, Connection), SiteError> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut running = FuturesUnordered::new();
    let attempt = |i: usize| {
        let d = dialers[i].clone();
        async move {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(500));
            (i, d.connect(left).await)
        }
    };
    let mut next = 1;
    running.push(attempt(0));
    let mut errors = Vec::new();
    loop {
        let stagger = tokio::time::sleep(STAGGER);
        tokio::pin!(stagger);
        tokio::select! {
            done = running.next() => match done {
                Some((i, Ok(conn))) => return Ok((i, conn)),
                Some((i, Err(e))) => {
                    tracing::info!("WebSocket via {}: {e}", dialers[i].shown());
                    if e.is_input() {
                        return Err(e.into());
                    }
                    errors.push(format!("{}{}: {e}", dialers[i].shown(), dialers[i].proxy().map(|p| format!(" via {p:?}")).unwrap_or_default()));
                    if next < dialers.len() {
                        running.push(attempt(next));
                        next += 1;
                    } else if running.is_empty() {
                        return Err(SiteError::NoPath(errors.join("; ")));
                    }
                }
                None => return Err(SiteError::NoPath(errors.join("; "))),
            },
            _ = &mut stagger, if next < dialers.len() => {
                running.push(attempt(next));
                next += 1;
            }
        }
    }
}

/// Redeems the invite over the tunnel for `own_key`, saves the site, and
/// switches the device to `own_key`; returns once traffic flows with it.
pub async fn redeem_and_switch(
    inv: &Invitation<'_>,
    route: &Route,
    own_key: &PrivateKey,
    device: &dyn WgDevice,
    store: &StateDir,
    progress: &ProgressBar,
    deadline: Instant,
) -> Result<JoinedState, SiteError> {
    let token = inv.token;
    let endpoint = inv.endpoint;
    let api = SocketAddr::new(token.server_address, CONTROL_PORT);
    if route.path != Path::Udp {
        progress.set_message(format!("handshaking over {}", route.path));
    }
    let invite = Signer::new(&token.invite_key, &token.server_public_key)?;

    if route.path == Path::Udp {
        progress.set_message(format!("handshaking with {endpoint}"));
    }
    let mut handshake_at: Option<Instant> = None;
    // Once a connection is made the invite still routes, so the token is
    // not used, whatever the hub's load.
    let mut reached = false;
    crate::sys::crash_point("redeem-sending");
    let redeemed = loop {
        // Connecting is retried quickly (the first packets may wait for the
        // handshake); once connected, the hub may be busy with hundreds of
        // joiners, so the answer is waited for longer, though not for ever:
        // a lost answer costs TCP seconds of backoff, while asking again
        // gets the same admission at once.
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = Patience {
            connect: Duration::from_millis(700).min(left),
            total: ANSWER_WITHIN.min(left),
        };
        let joining = Joining {
            routes: inv.routes.to_vec(),
            snat_public: inv.snat_public,
            name: Some(
                inv.name
                    .map(str::to_owned)
                    .unwrap_or_else(crate::sys::hostname),
            ),
            default_name: inv.name.is_none(),
        };
        match tunnel::redeem_invite(api, &invite, &own_key.public_key(), &joining, attempt).await {
            Ok(r) => break r,
            Err(e) if !e.is_transient() => {
                let why = match e {
                    ControlError::Refused { message, .. } => message,
                    other => other.to_string(),
                };
                return Err(SiteError::Refused(why));
            }
            Err(e) => {
                reached |= e.connected();
                tracing::debug!("redeem attempt: {e}");
            }
        }
        if handshake_at.is_none()
            && device
                .peers()
                .await?
                .iter()
                .any(|p| p.last_handshake.is_some())
        {
            handshake_at = Some(Instant::now());
            progress.set_message("redeeming the invite");
        }
        if !reached && handshake_at.is_some_and(|t| t.elapsed() > USED_AFTER) {
            return Err(SiteError::AlreadyUsed(endpoint));
        }
        if Instant::now() >= deadline {
            return Err(SiteError::Unreachable {
                endpoint,
                timeout: humantime::format_duration(inv.timeout).to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    crate::sys::crash_point("redeem-answered");
    if !redeemed.pending.is_empty() {
        let who = redeemed
            .name
            .clone()
            .unwrap_or_else(|| token.assigned.to_string());
        for p in &redeemed.pending {
            tracing::warn!(
                "route {p} waits for the hub operator's approval (on the hub: tunnel route approve {who} {p})"
            );
        }
    }
    if redeemed.address != token.assigned_network() {
        return Err(SiteError::Mismatch {
            got: redeemed.address,
            want: token.assigned_network(),
        });
    }

    // Saved before the switch: once the server has our key, losing it would
    // strand this site.
    let joined = JoinedState {
        name: redeemed.name.clone(),
        private_key: own_key.clone(),
        mtu: route.mtu,
        backend: Some(inv.backend),
        server_public_key: token.server_public_key,
        endpoint: inv.server.to_owned(),
        port: endpoint.port(),
        address: token.assigned_network(),
        server_address: token.server_address,
        subnet: token.subnet,
        subnet6: token.subnet6,
        containers: vec![],
        path: route.path.clone(),
        routes: inv.routes.to_vec(),
        masquerade: inv.masquerade,
        transparent: inv.transparent,
        snat_public: inv.snat_public,
        attach_label: inv.attach_label.clone(),
    };
    store.save(inv.iface, &Endpoint::Joined(joined.clone()))?;
    device.set_private_key(own_key).await?;
    crate::sys::crash_point("key-swapped");
    tracing::info!(
        "invite redeemed; now using this host's own key {}",
        own_key.public_key()
    );

    progress.set_message("waiting for traffic with our own key");
    wait_for_flow(api, deadline)
        .await
        .map_err(SiteError::NoFlow)?;
    Ok(joined)
}

/// Probes the server's API through the tunnel until it answers or `deadline`.
pub async fn wait_for_flow(api: SocketAddr, deadline: Instant) -> Result<(), ControlError> {
    loop {
        // A connection shows traffic flows; its answer may wait on a busy hub.
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = Patience {
            connect: Duration::from_millis(100).min(left),
            total: ANSWER_WITHIN.min(left),
        };
        match tunnel::ping(api, attempt).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => tracing::debug!("ping: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The endpoint of one of this site's containers: the hub is its peer on
/// the site's route (a WebSocket link of its own when the site uses one).
fn container_spec(joined: &JoinedState, c: &ContainerRecord, route: &Route) -> EndpointSpec {
    spec_for(joined, c, route.endpoint, route.dialer.clone())
}

fn spec_for(
    joined: &JoinedState,
    c: &ContainerRecord,
    hub: SocketAddr,
    link: Option<Arc<Dialer>>,
) -> EndpointSpec {
    EndpointSpec {
        container: c.container.clone(),
        iface: c.iface.clone(),
        key: c.private_key.clone(),
        address: IpNetwork::new(c.address, joined.subnet.prefix())
            .expect("validated with the state"),
        address6: joined.subnets().interface(c.address).get(1).copied(),
        hub: hub_peer(joined, hub),
        mtu: joined.mtu,
        probe: api(joined),
        link,
        by_label: c.by_label,
    }
}

/// The endpoints of the containers saved with the site (for `up`).
pub fn saved_containers(joined: &JoinedState, route: &Route) -> Vec<EndpointSpec> {
    joined
        .containers
        .iter()
        .filter(|c| !c.driver)
        .map(|c| container_spec(joined, c, route))
        .collect()
}

/// Registers this site's containers with the hub (each with a key made
/// here), signed with the site's key, and saves them with the site.
pub async fn register_containers(
    joined: &mut JoinedState,
    iface: &str,
    infos: &[ContainerInfo],
    route: &Route,
    store: &StateDir,
) -> Result<Vec<EndpointSpec>, SiteError> {
    let signer = Signer::new(&joined.private_key, &joined.server_public_key)?;
    for (n, info) in infos.iter().enumerate() {
        let key = PrivateKey::generate();
        let got = tunnel::register_endpoint(
            api(joined),
            &signer,
            &key.public_key(),
            &info.name,
            Duration::from_secs(5),
        )
        .await
        .map_err(|source| SiteError::Register {
            name: info.name.clone(),
            source,
        })?;
        joined.containers.push(ContainerRecord {
            container: info.name.clone(),
            iface: endpoint_iface(iface, n),
            private_key: key,
            address: got.address.ip(),
            by_label: false,
            driver: false,
        });
    }
    store.save(iface, &Endpoint::Joined(joined.clone()))?;
    Ok(saved_containers(joined, route))
}

/// A joined site that is up: its device carries its own key.
pub struct Site {
    pub device: Arc<dyn WgDevice>,
    /// How its datagrams reach the hub; its link lives as long as the site.
    pub route: Route,
    pub net: Arc<Netlink>,
    pub joined: JoinedState,
    pub iface: String,
    pub backend: BackendChoice,
    pub store: StateDir,
    /// Its firewall and forwarding, stopped with it.
    pub gateway: Gateway,
    /// The server's address, when it is reached through the tunnel
    /// (`--transparent`).
    pub transparent: Option<IpNetwork>,
    /// `--metrics`: where Prometheus scrapes it.
    pub metrics: Option<crate::metrics::Listener>,
}

/// Its containers, and the engine that runs them.
pub struct Containers {
    pub runtime: Arc<dyn ContainerRuntime>,
    pub specs: Vec<EndpointSpec>,
    /// `--attach-label`.
    pub label: Option<crate::docker::Label>,
    /// `--docker-driver`: the plugin name.
    pub driver: Option<String>,
}

/// A site's containers attached by label or the network driver: each
/// with a key made here, registered with the hub (signed with the site's
/// key) and saved with the site; given back when the container goes.
pub struct SiteEndpoints {
    signer: Signer,
    store: StateDir,
    iface: String,
    joined: tokio::sync::Mutex<JoinedState>,
    hub: SocketAddr,
    link: Option<Arc<Dialer>>,
}

impl SiteEndpoints {
    /// Gives back the network driver's endpoints a crashed run left: Docker
    /// lost them with that run.
    pub async fn release_leftovers(&self) {
        let mut joined = self.joined.lock().await;
        let left: Vec<ContainerRecord> = joined
            .containers
            .iter()
            .filter(|c| c.driver)
            .cloned()
            .collect();
        if left.is_empty() {
            return;
        }
        for c in &left {
            if let Err(e) = tunnel::release_endpoint(
                api(&joined),
                &self.signer,
                &c.private_key.public_key(),
                Duration::from_secs(5),
            )
            .await
            {
                tracing::debug!("giving back {}: {e}", c.address);
            }
        }
        joined.containers.retain(|c| !c.driver);
        if let Err(e) = self
            .store
            .save(&self.iface, &Endpoint::Joined(joined.clone()))
        {
            tracing::warn!("{e}");
        }
        tracing::info!(
            "gave back {} network-driver endpoint(s) a previous run left",
            left.len()
        );
    }

    pub fn new(
        joined: &JoinedState,
        iface: &str,
        store: &StateDir,
        route: &Route,
    ) -> Result<Self, SiteError> {
        Ok(Self {
            signer: Signer::new(&joined.private_key, &joined.server_public_key)?,
            store: store.clone(),
            iface: iface.to_owned(),
            joined: tokio::sync::Mutex::new(joined.clone()),
            hub: route.endpoint,
            link: route.dialer.clone(),
        })
    }
}

#[async_trait::async_trait]
impl crate::containers::Endpoints for SiteEndpoints {
    async fn allocate(&self, name: &str, driver: bool) -> Result<EndpointSpec, ContainerError> {
        let fail = |reason: String| ContainerError::Endpoint {
            container: name.to_owned(),
            reason,
        };
        let mut joined = self.joined.lock().await;
        if let Some(c) = joined.containers.iter().find(|c| c.container == name) {
            return Ok(spec_for(&joined, c, self.hub, self.link.clone()));
        }
        let key = PrivateKey::generate();
        let got = tunnel::register_endpoint(
            api(&joined),
            &self.signer,
            &key.public_key(),
            name,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| fail(format!("{:#}", anyhow::Error::from(e))))?;
        let mut n = 0;
        while joined
            .containers
            .iter()
            .any(|c| c.iface == endpoint_iface(&self.iface, n))
        {
            n += 1;
        }
        let record = ContainerRecord {
            container: name.to_owned(),
            iface: endpoint_iface(&self.iface, n),
            private_key: key,
            address: got.address.ip(),
            by_label: !driver,
            driver,
        };
        joined.containers.push(record.clone());
        self.store
            .save(&self.iface, &Endpoint::Joined(joined.clone()))
            .map_err(|e| fail(e.to_string()))?;
        Ok(spec_for(&joined, &record, self.hub, self.link.clone()))
    }

    async fn rename(&self, spec: &EndpointSpec, name: &str) -> Result<(), ContainerError> {
        let mut joined = self.joined.lock().await;
        // Registering the same key under another name renames it.
        tunnel::register_endpoint(
            api(&joined),
            &self.signer,
            &spec.key.public_key(),
            name,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| ContainerError::Endpoint {
            container: name.to_owned(),
            reason: format!("{:#}", anyhow::Error::from(e)),
        })?;
        let key = spec.key.public_key();
        if let Some(c) = joined
            .containers
            .iter_mut()
            .find(|c| c.private_key.public_key() == key)
        {
            c.container = name.to_owned();
        }
        self.store
            .save(&self.iface, &Endpoint::Joined(joined.clone()))
            .map_err(|e| ContainerError::Endpoint {
                container: name.to_owned(),
                reason: e.to_string(),
            })
    }

    async fn release(&self, spec: &EndpointSpec) -> Result<(), ContainerError> {
        let mut joined = self.joined.lock().await;
        match tunnel::release_endpoint(
            api(&joined),
            &self.signer,
            &spec.key.public_key(),
            Duration::from_secs(5),
        )
        .await
        {
            Ok(()) | Err(ControlError::Refused { status: 404, .. }) => {}
            Err(e) => {
                return Err(ContainerError::Endpoint {
                    container: spec.container.clone(),
                    reason: format!("giving it back: {:#}", anyhow::Error::from(e)),
                });
            }
        }
        let key = spec.key.public_key();
        joined
            .containers
            .retain(|c| c.private_key.public_key() != key);
        self.store
            .save(&self.iface, &Endpoint::Joined(joined.clone()))
            .map_err(|e| ContainerError::Endpoint {
                container: spec.container.clone(),
                reason: e.to_string(),
            })
    }
}

/// What `join` and `up` share once the site's own endpoint is up: attach
/// the containers, call `ready` with what was attached (it prints the
/// summary), answer on the local socket, follow the containers until
/// shutdown, then remove everything.
pub async fn run(
    site: Site,
    containers: Option<Containers>,
    ready: impl FnOnce(&str) -> std::io::Result<()>,
    progress: ProgressBar,
    mut shutdown: Shutdown,
) -> Result<(), SiteError> {
    let Site {
        device,
        route,
        net,
        joined,
        iface,
        backend,
        store,
        gateway,
        transparent,
        metrics: metrics_listener,
    } = site;
    let metrics = crate::metrics::Metrics::new();
    let hub_api = api(&joined);
    let lans = tokio::sync::watch::channel(vec![]);
    let routing = RouteSync {
        device: device.clone(),
        net: net.clone(),
        iface: iface.clone(),
        joined: joined.clone(),
        current: vec![],
        extra: transparent.into_iter().collect(),
    };
    let signer = Signer::new(&joined.private_key, &joined.server_public_key)?;
    let mut follower = None;
    let mut driver: Option<Arc<crate::driver::Driver>> = None;
    let result = async {
        let mut attached = String::new();
        if let Some(c) = containers {
            progress.set_message("attaching containers");
            for s in &c.specs {
                attached.push_str(&format!(", container {} as {}", s.container, s.address));
            }
            // One book of the containers' endpoints, for labels and the driver.
            let endpoints = if c.label.is_some() || c.driver.is_some() {
                let e = Arc::new(SiteEndpoints::new(&joined, &iface, &store, &route)?);
                e.release_leftovers().await;
                Some(e)
            } else {
                None
            };
            if let (Some(name), Some(e)) = (&c.driver, &endpoints) {
                let d = crate::driver::Driver::new(
                    e.clone(),
                    net.clone(),
                    backend,
                    joined.subnet,
                    joined.server_address,
                    lans.1.clone(),
                );
                crate::driver::start(name, &d, c.runtime.clone(), &mut shutdown)?;
                driver = Some(d);
            }
            let mut f = Follower::new(c.runtime, HostPlacer::shared(net.clone(), backend), c.specs)
                .with_metrics(metrics.clone());
            if let (Some(label), Some(e)) = (c.label, endpoints) {
                f = f.with_label(ByLabel {
                    label,
                    endpoints: e,
                });
            }
            let f = follower.insert(f);
            f.reconcile_all().await?;
            if let Err(e) = f.discover().await {
                tracing::warn!("attaching labelled containers: {e}");
            }
        }
        progress.finish_and_clear();
        ready(&attached).map_err(SiteError::Output)?;
        let socket = store.socket(&iface);
        let listener = local::bind(&socket)?;
        let api = Arc::new(SiteApi {
            device: device.clone(),
            path: route.path.clone(),
            joined,
            iface: iface.clone(),
            containers: follower.as_ref().map(|f: &Follower| f.status()),
            driver: driver.clone(),
        });
        if let Some(l) = metrics_listener {
            tokio::spawn(crate::metrics::serve(
                l,
                metrics.clone(),
                api.clone(),
                shutdown.waiter(),
            ));
        }
        tokio::spawn(local::serve(
            listener,
            socket,
            api,
            shutdown.trigger_fn(),
            shutdown.waiter(),
        ));
        crate::sys::notify_ready();
        Ok::<(), SiteError>(())
    }
    .await;
    progress.finish_and_clear();
    if result.is_ok() {
        let stop_routing = shutdown.waiter();
        let following = async {
            match follower.as_mut() {
                Some(f) => f.follow(shutdown.waiter(), Some(lans.1)).await,
                None => shutdown.wait().await,
            }
        };
        tokio::join!(following, routing.run(lans.0, stop_routing));
    }
    if let Some(d) = &driver {
        d.close().await;
    }
    if let Some(f) = follower.as_mut() {
        f.detach_all().await;
    }
    if result.is_ok()
        && let Err(e) = tunnel::leave_hub(hub_api, &signer, Duration::from_millis(500)).await
    {
        tracing::debug!("telling the server we leave: {e}");
    }
    let teardown = device.destroy().await;
    tracing::info!("{iface} removed");
    gateway.stop(net.as_ref()).await;
    result?;
    Ok(teardown?)
}

/// What a site changes on its host once its device is up: forwarding for
/// its LANs, and transparent mode when it was asked for (the server's
/// address, as a network, for the hub peer's allowed IPs).
pub async fn prepare_host(
    gateway: &mut Gateway,
    net: &dyn NetOps,
    device: &dyn WgDevice,
    joined: &JoinedState,
    iface: &str,
    server: SocketAddr,
    route: &Route,
) -> Result<Option<IpNetwork>, SiteError> {
    gateway.forward(net, false).await?;
    if !joined.transparent {
        return Ok(None);
    }
    let to = go_transparent(gateway, net, device, joined, iface, server, route).await?;
    Ok(Some(to))
}

/// Transparent mode's routing table (`Table =` in the guide's config).
pub const TRANSPARENT_TABLE: u32 = 51820;
/// Its rules' priorities, as in the guide: the tunnel's own transport to
/// the server stays on the main table; the rest for the server goes to ours.
const TRANSPARENT_PRIORITY: u32 = 455;

/// Transparent mode (seed 002): whatever this host sends to the server's
/// address goes through the tunnel, except the tunnel's own transport
/// (its UDP port, or the WebSocket's TCP port). A route in a table of our
/// own and two policy rules, journaled and undone on exit like the rest;
/// the hub peer is allowed that address too. Returns the address as a
/// network, for the hub peer's allowed IPs.
async fn go_transparent(
    gateway: &mut Gateway,
    net: &dyn NetOps,
    device: &dyn WgDevice,
    joined: &JoinedState,
    iface: &str,
    server: SocketAddr,
    route: &Route,
) -> Result<IpNetwork, SiteError> {
    let to = crate::ipam::host_net(server.ip());
    let transport = match &route.dialer {
        None => (IPPROTO_UDP, server.port()),
        Some(d) => (
            IPPROTO_TCP,
            url::Url::parse(&d.url())
                .ok()
                .and_then(|u| u.port_or_known_default())
                .unwrap_or(443),
        ),
    };
    device
        .set_allowed_ips(
            &joined.server_public_key,
            &joined
                .subnets()
                .all()
                .into_iter()
                .chain([to])
                .collect::<Vec<_>>(),
        )
        .await?;
    let changes = gateway.changes();
    changes
        .add_route(
            net,
            crate::gateway::TableRoute {
                dst: to,
                iface: iface.to_owned(),
                table: TRANSPARENT_TABLE,
            },
        )
        .await?;
    changes
        .add_rule(
            net,
            PolicyRule {
                priority: TRANSPARENT_PRIORITY,
                to,
                table: MAIN_TABLE,
                ip_proto: Some(transport.0),
                dport: Some(transport.1),
            },
        )
        .await?;
    changes
        .add_rule(
            net,
            PolicyRule {
                priority: TRANSPARENT_PRIORITY + 1,
                to,
                table: TRANSPARENT_TABLE,
                ip_proto: None,
                dport: None,
            },
        )
        .await?;
    tracing::info!(
        "transparent: traffic for {} goes through {iface}, except {} port {}",
        server.ip(),
        if transport.0 == IPPROTO_UDP {
            "UDP"
        } else {
            "TCP"
        },
        transport.1
    );
    Ok(to)
}

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// How often a site asks the hub for the LANs even when not told they
/// changed (a lost poke, a hub that restarted).
const ROUTES_POLL: Duration = Duration::from_secs(30);

/// The LANs behind other sites and the hub, routed into this site's
/// tunnel: the kernel's routes, the hub peer's allowed IPs, and (through
/// the watch) its containers' endpoints follow what the hub says.
struct RouteSync {
    device: Arc<dyn WgDevice>,
    net: Arc<Netlink>,
    iface: String,
    joined: JoinedState,
    /// What is routed now.
    current: Vec<IpNetwork>,
    /// Allowed through the hub beside the subnet and the LANs: the
    /// server's own address in transparent mode.
    extra: Vec<IpNetwork>,
}

/// The LANs of `all` that are not behind the site at `own`, sorted.
pub fn remote_routes(all: &[Advertised], own: std::net::IpAddr) -> Vec<IpNetwork> {
    let mut out: Vec<IpNetwork> = all
        .iter()
        .filter(|a| a.via != own)
        .map(|a| a.prefix)
        .collect();
    out.sort();
    out.dedup();
    out
}

impl RouteSync {
    /// Asks the hub for the LANs at start, when it pokes this site's
    /// control port (they changed), and every [`ROUTES_POLL`], until `stop`.
    async fn run(
        mut self,
        lans: tokio::sync::watch::Sender<Vec<IpNetwork>>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let own = self.joined.address.ip();
        let hub = self.joined.server_address;
        let poke = match tokio::net::UdpSocket::bind(SocketAddr::new(own, CONTROL_PORT)).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(
                    "listening for route changes on {own}:{CONTROL_PORT}: {e}; polling every {}s instead",
                    ROUTES_POLL.as_secs()
                );
                None
            }
        };
        let mut buf = [0u8; 64];
        let mut retry = Duration::ZERO;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(retry) => {}
                got = async {
                    match &poke {
                        Some(s) => s.recv_from(&mut buf).await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Only the hub tells; anything else is ignored.
                    if !matches!(got, Ok((_, from)) if from.ip() == hub) {
                        continue;
                    }
                }
            }
            retry = match tunnel::fetch_routes(api(&self.joined), Duration::from_secs(5)).await {
                Ok(all) => {
                    let remote = remote_routes(&all, own);
                    if let Err(e) = self.apply(&remote).await {
                        tracing::warn!("routing the LANs {remote:?} into {}: {e}", self.iface);
                        Duration::from_secs(2)
                    } else {
                        lans.send_if_modified(|l| {
                            let changed = *l != remote;
                            *l = remote;
                            changed
                        });
                        ROUTES_POLL
                    }
                }
                Err(e) => {
                    tracing::debug!("asking the hub for routes: {e}");
                    Duration::from_secs(2)
                }
            };
        }
    }

    async fn apply(&mut self, remote: &[IpNetwork]) -> Result<(), SiteError> {
        if remote == self.current {
            return Ok(());
        }
        let mut allowed = self.joined.subnets().all();
        allowed.extend(self.extra.iter().copied());
        allowed.extend(remote.iter().copied());
        self.device
            .set_allowed_ips(&self.joined.server_public_key, &allowed)
            .await?;
        for r in remote.iter().filter(|r| !self.current.contains(r)) {
            self.net
                .add_route(*r, &self.iface, None)
                .await
                .map_err(WgError::Net)?;
            tracing::info!("routing {r} through the tunnel");
        }
        for r in self.current.iter().filter(|r| !remote.contains(r)) {
            self.net
                .del_route(*r, &self.iface, None)
                .await
                .map_err(WgError::Net)?;
            tracing::info!("{r} is no longer advertised");
        }
        self.current = remote.to_vec();
        Ok(())
    }
}

/// The joined site's status: live stats of its link to the server.
struct SiteApi {
    device: Arc<dyn WgDevice>,
    path: Path,
    joined: JoinedState,
    iface: String,
    containers: Option<ContainerView>,
    driver: Option<Arc<crate::driver::Driver>>,
}

#[async_trait::async_trait]
impl LocalApi for SiteApi {
    async fn report(&self) -> Vec<EndpointStatus> {
        let mut main =
            crate::status::from_state(&self.iface, &Endpoint::Joined(self.joined.clone()))
                .swap_remove(0);
        main.state = crate::status::State::Up;
        main.backend = Some(self.device.backend());
        main.listen_port = self.device.listen_port().await.ok();
        main.peers = self
            .device
            .peers()
            .await
            .unwrap_or_default()
            .iter()
            .map(|p| {
                let mut r = PeerReport::from_live(
                    p,
                    Some("server".into()),
                    Some(self.joined.server_address),
                );
                r.transport = Some(self.path.to_string());
                r.routes = p
                    .allowed_ips
                    .iter()
                    .filter(|n| **n != self.joined.subnet)
                    .copied()
                    .collect();
                if self.path != Path::Udp {
                    r.endpoint = None;
                }
                r
            })
            .collect();
        debug_assert_eq!(main.role, Role::Joined);
        let mut out = vec![main];
        if let Some(c) = &self.containers {
            out.extend(c.report().await);
        }
        if let Some(d) = &self.driver {
            out.extend(d.report().await);
        }
        out
    }
}
