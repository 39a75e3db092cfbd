//! A joined site: what it is ([`Site`]), how it is brought up with a
//! token or from its saved state ([`Site::join`], [`Site::up`]); the join
//! as a state machine without IO ([`machine`]), run against the device
//! and the hub ([`join`]) over the path it chooses ([`path`]); its
//! containers ([`endpoints`]), what it changes on its host ([`host`]), how
//! it follows the LANs the hub advertises ([`routes`]), and how it runs
//! until shutdown ([`run`]).

mod api;
mod bringup;
mod drive;
pub mod endpoints;
pub mod host;
mod invitation;
pub mod join;
pub mod lans;
pub mod machine;
mod mesh;
pub mod path;
mod resolve;
pub mod routes;

pub use crate::node::Containers;
use api::SiteApi;
pub use bringup::{JoinConfig, Ready, UpConfig};
pub use endpoints::{SiteEndpoints, register_containers, saved_containers};
pub use host::{TRANSPARENT_TABLE, prepare_host, site_gateway, site_policy, start_gateway};
pub use invitation::Invitation;
pub use join::{Joiner, establish, own_key, wait_for_flow};
pub use resolve::resolve;
use routes::RouteSync;
pub use routes::remote_routes;

use crate::containers::ContainerError;
use crate::control::auth::AuthError;
use crate::control::{CONTROL_PORT, ControlError, tunnel};
use crate::gateway::Gateway;
use crate::net::NetOps;
use crate::node::Services;
use crate::shutdown::Shutdown;
use crate::state::JoinedState;
use crate::store::{StateDir, StateError};
use crate::transport::proxy::Proxy;
use crate::transport::ws::{Connection, Dialer, Link};
use crate::transport::{HUB_LINK, Path, Relay, TransportError, WsOffer, virtual_addr};
use crate::wg::mesh::{Inbound, MeshSocket};
use crate::wg::{BackendChoice, KEEPALIVE, PeerSpec, WgDevice, WgError};
use ipnetwork::IpNetwork;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Where a bring-up reports its steps: the command shows them (a
/// spinner on a terminal); the library only says what it is doing.
pub trait Progress: Send + Sync {
    /// The step under way.
    fn step(&self, message: &str);
    /// The steps are over; whatever shows them goes away.
    fn done(&self);
}

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("the server refused this token: {0}")]
    Refused(String),
    #[error(
        "the token was already used: the server at {0} recognised it but did not admit it; ask for a new token (or, if the server is busy admitting many sites at once, it may only have been too slow to answer: try again)"
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
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    Driver(#[from] crate::driver::DriverError),
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::EndpointError),
    /// The user's input (an address, a flag, what the state directory
    /// holds for the interface), found wanting before the host is touched.
    #[error(transparent)]
    Input(Box<dyn std::error::Error + Send + Sync>),
}

impl SiteError {
    /// Bad input, with its message (and its causes, if any).
    pub fn input(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        SiteError::Input(e.into())
    }

    /// Whether the input (the token) is at fault, rather than the network.
    pub fn is_input(&self) -> bool {
        match self {
            SiteError::Refused(_) | SiteError::AlreadyUsed(_) | SiteError::Input(_) => true,
            SiteError::Transport(t) => t.is_input(),
            _ => false,
        }
    }
}

/// Refuses a tunnel whose subnets overlap an address or route the host
/// already has (another tunnel with the same default subnet, a LAN): its
/// traffic, the join's own requests first, would leave through the
/// other interface. Read before anything is changed.
pub async fn refuse_clash(
    net: &dyn NetOps,
    subnets: &[IpNetwork],
    iface: &str,
) -> Result<(), SiteError> {
    let host = net.occupied().await?;
    match crate::net::clash(subnets, &host, iface) {
        None => Ok(()),
        Some((subnet, o)) => Err(SiteError::input(format!(
            "the tunnel's subnet {subnet} overlaps the {o}: this host is already on a network there; \
             ask the server's operator for a tunnel on a subnet of its own (tunnel serve --subnet CIDR)"
        ))),
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

/// The hub's control API, through the tunnel on `iface`.
pub fn api(joined: &JoinedState, iface: &str) -> tunnel::HubApi {
    tunnel::HubApi::via(SocketAddr::new(joined.server_address, CONTROL_PORT), iface)
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
    pub(crate) fn udp(endpoint: SocketAddr, mtu: u32) -> Self {
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
            proxy_ca: dialer.proxy().and_then(|p| p.ca.clone()),
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
    proxy_ca: Option<&std::path::Path>,
) -> Result<(Route, Option<Arc<Relay>>), SiteError> {
    match &joined.path {
        Path::Udp => Ok((Route::udp(endpoint, joined.mtu), None)),
        Path::Websocket {
            offer,
            proxy: saved,
            proxy_ca: saved_ca,
        } => {
            let ca = proxy_ca.or(saved_ca.as_deref());
            let proxy = proxy
                .or(saved.as_deref())
                .map(Proxy::parse)
                .transpose()?
                .map(|p| p.trusting(ca));
            let dialer = Arc::new(Dialer::new(offer, &endpoint.ip().to_string(), proxy)?);
            let relay = Relay::new("websocket");
            let route = Route::websocket(offer.clone(), dialer, relay.clone(), None, joined.mtu);
            Ok((route, Some(relay)))
        }
    }
}

/// A joined site that is up: its device carries its own key.
pub struct Site {
    pub device: Arc<dyn WgDevice>,
    /// How its datagrams reach the hub; its link lives as long as the site.
    pub route: Route,
    pub net: Arc<dyn NetOps>,
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
    /// The mesh's side of the device's socket, and the probes it split off.
    pub mesh: Option<(Arc<MeshSocket>, tokio::sync::mpsc::Receiver<Inbound>)>,
}

/// Saves the port the device got, for `up` to take again.
async fn keep_port(
    mut joined: JoinedState,
    device: &dyn WgDevice,
    store: &StateDir,
    iface: &str,
) -> JoinedState {
    if let Ok(port) = device.listen_port().await
        && joined.listen_port != Some(port)
    {
        joined.listen_port = Some(port);
        if let Err(e) = store.save(iface, &crate::state::Endpoint::Joined(joined.clone())) {
            tracing::warn!("saving the listen port: {e}");
        }
    }
    joined
}

/// What follows the hub while the site runs: the LANs it advertises, and
/// the mesh's agent (when the device can take part), tied together: the
/// agent hears the hub's pokes and tells which LANs its peers carry.
fn followers(
    device: &Arc<dyn WgDevice>,
    net: &Arc<dyn NetOps>,
    mesh: Option<(Arc<MeshSocket>, tokio::sync::mpsc::Receiver<Inbound>)>,
    joined: &JoinedState,
    store: &StateDir,
    iface: &str,
    transparent: Option<IpNetwork>,
) -> (
    RouteSync,
    Option<crate::node::mesh::Agent>,
    tokio::sync::watch::Receiver<crate::node::mesh::MeshView>,
) {
    let pokes = tokio::sync::watch::channel(0u64);
    let owned = tokio::sync::watch::channel(vec![]);
    let allowed = crate::node::mesh::AllowedLock::default();
    let view = tokio::sync::watch::channel(crate::node::mesh::MeshView::default());
    let routing = RouteSync {
        device: device.clone(),
        net: net.clone(),
        iface: iface.to_owned(),
        joined: joined.clone(),
        current: vec![],
        extra: transparent.into_iter().collect(),
        owned: Some(owned.1.clone()),
        allowed: allowed.clone(),
        pokes: pokes.0,
        applied_owned: vec![],
    };
    let agent = mesh::agent(
        device,
        mesh,
        joined,
        store,
        iface,
        (pokes.1, owned.0, allowed, view.0),
    );
    (routing, agent, view.1)
}

/// How long a starting site waits for its peer map before it says it is
/// ready (a hub that does not answer, and no cached map).
const FIRST_MAP_WAIT: Duration = Duration::from_secs(3);

/// What `join` and `up` share once the site's own endpoint is up: attach
/// the containers, call `ready` with what was attached (it prints the
/// summary), answer on the local socket, follow the containers until
/// shutdown, then remove everything.
pub async fn run(
    site: Site,
    containers: Option<Containers>,
    ready: impl FnOnce(&str) -> std::io::Result<()>,
    progress: &dyn Progress,
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
        mesh,
    } = site;
    let joined = keep_port(joined, device.as_ref(), &store, &iface).await;
    let metrics = crate::metrics::Metrics::new();
    let hub_api = api(&joined, &iface);
    let remote = tokio::sync::watch::channel(vec![]);
    let (routing, agent, view) =
        followers(&device, &net, mesh, &joined, &store, &iface, transparent);
    let mesh_on = agent.is_some();
    let lans = Arc::new(lans::Lans::new(
        &joined,
        net.clone(),
        &iface,
        &store,
        hub_api,
        gateway,
    )?);
    let (meshing, has_map, stop_mesh) = mesh::running(agent, shutdown.waiter());
    let mut services = Services::default();
    let starting = async {
        let result = async {
            let mut attached = String::new();
            if let Some(c) = &containers {
                progress.step("attaching containers");
                for s in &c.specs {
                    attached.push_str(&format!(", container {} as {}", s.container, s.address));
                }
            }
            // One book of the containers' endpoints, for labels and the driver.
            let endpoints: Option<Arc<dyn crate::containers::Endpoints>> = match containers
                .as_ref()
                .filter(|c| c.label.is_some() || c.driver.is_some())
            {
                Some(c) => {
                    let e = Arc::new(SiteEndpoints::new(&joined, &iface, &store, &route)?);
                    // The driver takes back what it can of an earlier run's.
                    if c.driver.is_none() {
                        e.release_leftovers().await;
                    }
                    Some(e)
                }
                None => None,
            };
            let ctx = crate::node::Context {
                net: net.clone(),
                backend,
                subnet: joined.subnet,
                subnet6: joined.subnet6,
                server: joined.server_address,
                metrics: metrics.clone(),
            };
            services =
                Services::start(containers, endpoints, &ctx, remote.1.clone(), &mut shutdown)?;
            services.attach().await?;
            // A packet sent the moment `join` returns goes to its peer,
            // not through the hub in clear.
            let _ = tokio::time::timeout(FIRST_MAP_WAIT, has_map).await;
            progress.done();
            ready(&attached).map_err(SiteError::Output)?;
            let api = Arc::new(SiteApi {
                device: device.clone(),
                path: route.path.clone(),
                joined,
                iface: iface.clone(),
                containers: services.containers(),
                driver: services.driver(),
                mesh: mesh_on.then(|| view.clone()),
                lans: lans.clone(),
            });
            let metrics = metrics_listener.map(|l| (l, metrics.clone()));
            services.listen(&store, &iface, api, metrics, &shutdown)?;
            crate::sys::notify_ready();
            Ok::<(), SiteError>(())
        }
        .await;
        progress.done();
        if result.is_ok() {
            let stop_routing = shutdown.waiter();
            let following = services.follow(shutdown.waiter(), remote.1.clone());
            tokio::join!(following, routing.run(remote.0, stop_routing));
        } else {
            let _ = stop_mesh.send(());
        }
        result
    };
    let (result, ()) = tokio::join!(starting, meshing);
    services.stop().await;
    let teardown = lans.teardown(device.as_ref(), result.is_ok()).await;
    result?;
    Ok(teardown?)
}
