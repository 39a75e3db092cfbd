//! A Docker network driver and IPAM driver (the legacy remote plugin
//! protocol, JSON over HTTP on `/run/docker/plugins/<name>.sock`), so that
//! `docker network create -d tunnel --ipam-driver tunnel NET` gives a
//! network whose containers get a tunnel endpoint as they are created:
//!
//! - IPAM: the pool is the tunnel's subnet; each address is an endpoint
//!   allocated as the hub does it (a key made here, the address from the
//!   hub's ledger, through [`Endpoints`]); the "gateway" is the hub.
//! - Join: the endpoint's device is made here, where its UDP socket stays,
//!   its link moved into the namespace of the Docker engine (the peer of
//!   the plugin socket), and handed to Docker, which moves it into the
//!   container, names it `tun0`, gives it its address and brings it up,
//!   all before the container's process starts. Containers on the network
//!   get no default gateway (`DisableGatewayService`): they reach the
//!   tunnel, and the internet only through another network, unless the
//!   network was created with `-o tunnel.internet=true`.
//! - The container's name is known once it starts (Docker tells drivers
//!   nothing about it): the endpoint is renamed then, for DNS.
//!
//! Endpoints live as long as this process: on exit they are removed and
//! given back, and a crash's leftovers are given back at the next start.

use crate::containers::{EndpointSpec, Endpoints};
use crate::docker::ContainerRuntime;
use crate::net::{NetOps, Netlink};
use crate::status::{EndpointStatus, PeerReport, Role, State};
use crate::transport::Relay;
use crate::transport::ws::Link;
use crate::wg::{self, BackendChoice, DeviceSpec, Placement, WgDevice};
use axum::extract::{ConnectInfo, State as AxState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const DEFAULT_NAME: &str = "tunnel";
/// Where the Docker engine looks for plugin sockets.
pub const PLUGIN_DIR: &str = "/run/docker/plugins";
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";
/// What the container calls its tunnel interface (Docker appends an index).
const DST_PREFIX: &str = "tun";
/// The Docker option that lets a tunnel network's containers keep a way
/// to the internet (Docker adds its gateway bridge).
const INTERNET_OPTION: &str = "tunnel.internet";
const GATEWAY_REQUEST: &str = "com.docker.network.gateway";

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("--docker-driver {0:?}: a plugin name is letters, digits, '.', '_' and '-'")]
    BadName(String),
    #[error("{path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} is already served by another process (a running tunnel with --docker-driver of that name?)"
    )]
    InUse(PathBuf),
}

/// Checks a plugin name before anything is touched.
pub fn check_name(name: &str) -> Result<(), DriverError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(DriverError::BadName(name.to_owned()))
    }
}

/// The plugin's socket for `name`.
pub fn socket_path(name: &str) -> PathBuf {
    Path::new(PLUGIN_DIR).join(format!("{name}.sock"))
}

/// Where a plugin request comes from: the Docker engine's pid, from the
/// socket's peer credentials.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub pid: Option<u32>,
}

impl crate::control::server::Source for Peer {
    fn ip(&self) -> Option<IpAddr> {
        None
    }
}

/// A unix listener that tells each connection's peer process.
pub struct PeerListener(tokio::net::UnixListener);

impl axum::serve::Listener for PeerListener {
    type Io = tokio::net::UnixStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((s, _)) => {
                    let pid = s
                        .peer_cred()
                        .ok()
                        .and_then(|c| c.pid())
                        .and_then(|p| u32::try_from(p).ok());
                    return (s, Peer { pid });
                }
                Err(e) => {
                    tracing::debug!("plugin socket: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer { pid: None })
    }
}

/// Binds the plugin socket (0600): a live one means another process
/// serves that name; a dead one is a crash's leftover and is replaced.
pub fn bind(name: &str) -> Result<(PeerListener, PathBuf), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(name);
    let err = |source| DriverError::Socket {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(PLUGIN_DIR).map_err(err)?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(DriverError::InUse(path));
        }
        std::fs::remove_file(&path).map_err(err)?;
    }
    let listener = tokio::net::UnixListener::bind(&path).map_err(err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok((PeerListener(listener), path))
}

/// Serves `driver` as plugin `name` until `shutdown`, and names its
/// endpoints after their containers from `runtime`'s events; the socket is
/// removed after.
pub fn start(
    name: &str,
    driver: &Arc<Driver>,
    runtime: Arc<dyn ContainerRuntime>,
    shutdown: &mut crate::shutdown::Shutdown,
) -> Result<tokio::task::JoinHandle<()>, DriverError> {
    let (listener, path) = bind(name)?;
    tracing::info!(
        "Docker network driver {name} on {}: docker network create -d {name} --ipam-driver {name} NET",
        path.display()
    );
    let router = driver.router();
    let stop = shutdown.waiter();
    let served = tokio::spawn(async move {
        crate::control::server::serve(listener, router, crate::control::server::LOCAL, stop).await;
        let _ = std::fs::remove_file(&path);
    });
    tokio::spawn(driver.clone().follow(runtime, shutdown.waiter()));
    Ok(served)
}

/// One endpoint Docker knows of.
struct Ep {
    spec: EndpointSpec,
    /// Its container's name, once it started.
    named: bool,
    device: Option<Arc<dyn WgDevice>>,
    /// Its own WebSocket link, on a site that uses one.
    _link: Option<Link>,
}

#[derive(Default)]
struct Book {
    /// Network id -> whether its containers keep a way to the internet.
    networks: HashMap<String, bool>,
    /// Addresses handed out by IPAM, not yet an endpoint.
    pending: HashMap<IpAddr, EndpointSpec>,
    /// Endpoint id -> endpoint.
    endpoints: HashMap<String, Ep>,
}

/// The driver of one `tunnel serve` or `tunnel join`.
pub struct Driver {
    endpoints: Arc<dyn Endpoints>,
    host: Arc<dyn NetOps>,
    backend: BackendChoice,
    subnet: IpNetwork,
    /// The hub's tunnel address: the network's "gateway" for IPAM.
    server: IpAddr,
    /// The LANs the hub and the sites advertise, routed into containers.
    routes: tokio::sync::watch::Receiver<Vec<IpNetwork>>,
    book: tokio::sync::Mutex<Book>,
}

/// A plugin answer: JSON with Docker's content type.
fn reply(v: Value) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], v.to_string()).into_response()
}

/// An operation Docker asked for and that did not happen: `{"Err": ...}`.
fn refused(why: impl std::fmt::Display) -> Response {
    let why = why.to_string();
    tracing::warn!("network driver: {why}");
    reply(json!({ "Err": why }))
}

/// A request that does not decode.
struct BadRequest(String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, CONTENT_TYPE)],
            json!({ "Err": format!("bad request: {}", self.0) }).to_string(),
        )
            .into_response()
    }
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BadRequest> {
    serde_json::from_slice(body).map_err(|e| BadRequest(e.to_string()))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct PoolRequest {
    pool: String,
    #[serde(rename = "V6")]
    v6: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct AddressRequest {
    #[serde(rename = "PoolID")]
    pool_id: String,
    address: String,
    options: Option<HashMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct NetworkRequest {
    #[serde(rename = "NetworkID")]
    network_id: String,
    options: Option<HashMap<String, Value>>,
    #[serde(rename = "IPv4Data")]
    ipv4_data: Option<Vec<IpamData>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct IpamData {
    pool: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct EndpointRequest {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
    interface: Option<InterfaceData>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct InterfaceData {
    address: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct StaticRoute {
    destination: String,
    route_type: u8,
}

impl Driver {
    pub fn new(
        endpoints: Arc<dyn Endpoints>,
        host: Arc<dyn NetOps>,
        backend: BackendChoice,
        subnet: IpNetwork,
        server: IpAddr,
        routes: tokio::sync::watch::Receiver<Vec<IpNetwork>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            endpoints,
            host,
            backend,
            subnet,
            server,
            routes,
            book: Default::default(),
        })
    }

    pub fn router(self: &Arc<Self>) -> axum::Router {
        let caps = |v: Value| move || async move { reply(v) };
        axum::Router::new()
            .route(
                "/Plugin.Activate",
                post(caps(
                    json!({ "Implements": ["NetworkDriver", "IpamDriver"] }),
                )),
            )
            .route(
                "/NetworkDriver.GetCapabilities",
                post(caps(
                    json!({ "Scope": "local", "ConnectivityScope": "local" }),
                )),
            )
            .route(
                "/IpamDriver.GetCapabilities",
                post(caps(
                    json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false }),
                )),
            )
            .route(
                "/IpamDriver.GetDefaultAddressSpaces",
                post(caps(json!({
                    "LocalDefaultAddressSpace": "tunnel",
                    "GlobalDefaultAddressSpace": "tunnel"
                }))),
            )
            .route("/IpamDriver.RequestPool", post(request_pool))
            .route("/IpamDriver.ReleasePool", post(caps(json!({}))))
            .route("/IpamDriver.RequestAddress", post(request_address))
            .route("/IpamDriver.ReleaseAddress", post(release_address))
            .route("/NetworkDriver.CreateNetwork", post(create_network))
            .route("/NetworkDriver.DeleteNetwork", post(delete_network))
            .route("/NetworkDriver.CreateEndpoint", post(create_endpoint))
            .route(
                "/NetworkDriver.EndpointOperInfo",
                post(caps(json!({ "Value": {} }))),
            )
            .route("/NetworkDriver.DeleteEndpoint", post(delete_endpoint))
            .route("/NetworkDriver.Join", post(join))
            .route("/NetworkDriver.Leave", post(caps(json!({}))))
            .route("/NetworkDriver.DiscoverNew", post(caps(json!({}))))
            .route("/NetworkDriver.DiscoverDelete", post(caps(json!({}))))
            .route(
                "/NetworkDriver.ProgramExternalConnectivity",
                post(caps(json!({}))),
            )
            .route(
                "/NetworkDriver.RevokeExternalConnectivity",
                post(caps(json!({}))),
            )
            .with_state(self.clone())
    }

    fn net(&self, a: IpAddr) -> String {
        IpNetwork::new(a, self.subnet.prefix())
            .expect("an address of the subnet")
            .to_string()
    }

    /// Names each new endpoint after its container once it starts (Docker
    /// does not tell drivers), until `stop`.
    pub async fn follow(
        self: Arc<Self>,
        runtime: Arc<dyn ContainerRuntime>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            let mut events = runtime.events();
            self.name_all(runtime.as_ref()).await;
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    ev = events.next() => match ev {
                        Some(Ok(ev)) if ev.kind == crate::docker::EventKind::Start => {
                            self.name_from(runtime.as_ref(), &ev.id).await;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!("Docker events: {e}; retrying");
                            break;
                        }
                        None => break,
                    },
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }

    async fn name_all(&self, runtime: &dyn ContainerRuntime) {
        let unnamed: Vec<String> = {
            let book = self.book.lock().await;
            book.endpoints
                .iter()
                .filter(|(_, e)| !e.named && e.device.is_some())
                .map(|(id, _)| id.clone())
                .collect()
        };
        if unnamed.is_empty() {
            return;
        }
        if let Ok(names) = runtime.by_endpoint(&unnamed).await {
            for (endpoint, name) in names {
                self.rename(&endpoint, &name).await;
            }
        }
    }

    async fn name_from(&self, runtime: &dyn ContainerRuntime, container: &str) {
        let Ok(Some(info)) = runtime.inspect(container).await else {
            return;
        };
        for endpoint in &info.endpoint_ids {
            self.rename(endpoint, &info.name).await;
        }
    }

    async fn rename(&self, endpoint: &str, name: &str) {
        let spec = {
            let book = self.book.lock().await;
            match book.endpoints.get(endpoint) {
                Some(e) if !e.named => e.spec.clone(),
                _ => return,
            }
        };
        match self.endpoints.rename(&spec, name).await {
            Ok(()) => {
                tracing::info!(
                    "container {name} is on the tunnel network as {}",
                    spec.address
                );
                let mut book = self.book.lock().await;
                if let Some(e) = book.endpoints.get_mut(endpoint) {
                    e.named = true;
                    e.spec.container = name.to_owned();
                }
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }

    /// The endpoints in containers, for status.
    pub async fn report(&self) -> Vec<EndpointStatus> {
        let entries: Vec<(EndpointSpec, Option<Arc<dyn WgDevice>>)> = {
            let book = self.book.lock().await;
            book.endpoints
                .values()
                .map(|e| (e.spec.clone(), e.device.clone()))
                .collect()
        };
        let mut out = vec![];
        for (spec, device) in entries {
            let peers = match &device {
                Some(d) => d
                    .peers()
                    .await
                    .unwrap_or_default()
                    .iter()
                    .map(|p| PeerReport::from_live(p, Some("server".into()), Some(self.server)))
                    .collect(),
                None => vec![],
            };
            out.push(EndpointStatus {
                iface: spec.iface.clone(),
                name: None,
                role: Role::Container,
                state: if device.is_some() {
                    State::Up
                } else {
                    State::Down
                },
                backend: device.as_ref().map(|d| d.backend()),
                address: spec.address,
                address6: None,
                listen_port: None,
                public_key: spec.key.public_key(),
                container: Some(spec.container.clone()),
                container_id: None,
                server: None,
                routes: vec![],
                peers,
            });
        }
        out
    }

    /// Removes every endpoint's device and gives every endpoint back.
    pub async fn close(&self) {
        let mut book = self.book.lock().await;
        let mut specs: Vec<EndpointSpec> = vec![];
        let mut devices = vec![];
        for (_, e) in book.endpoints.drain() {
            devices.extend(e.device);
            specs.push(e.spec);
        }
        specs.extend(book.pending.drain().map(|(_, s)| s));
        drop(book);
        for d in devices {
            if let Err(e) = d.destroy().await {
                tracing::warn!("removing {}: {e}", d.name());
            }
        }
        for s in specs {
            if let Err(e) = self.endpoints.release(&s).await {
                tracing::warn!("{e}");
            }
        }
    }
}

async fn request_pool(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: PoolRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    if req.v6 {
        return refused(
            "IPv6 on a tunnel network is not supported: its containers get an IPv4 address (create it without --ipv6)",
        );
    }
    if !req.pool.is_empty() && req.pool != d.subnet.to_string() {
        return refused(format!(
            "the tunnel's subnet is {}: create the network without --subnet, or with --subnet {}",
            d.subnet, d.subnet
        ));
    }
    reply(json!({ "PoolID": "tunnel", "Pool": d.subnet.to_string(), "Data": {} }))
}

async fn request_address(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: AddressRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let gateway = req
        .options
        .as_ref()
        .and_then(|o| o.get("RequestAddressType"))
        .is_some_and(|t| t == GATEWAY_REQUEST);
    if gateway {
        return reply(json!({ "Address": d.net(d.server), "Data": {} }));
    }
    if !req.address.is_empty() {
        return refused("addresses on a tunnel network come from its hub: drop --ip");
    }
    let _ = req.pool_id;
    // The container is not known yet: a placeholder name until it starts.
    let mut tag = [0u8; 4];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut tag);
    let placeholder = format!(
        "docker-{}",
        tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    match d.endpoints.allocate(&placeholder, true).await {
        Ok(spec) => {
            let address = d.net(spec.address.ip());
            d.book.lock().await.pending.insert(spec.address.ip(), spec);
            reply(json!({ "Address": address, "Data": {} }))
        }
        Err(e) => refused(e),
    }
}

async fn release_address(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: AddressRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let Ok(ip) = req
        .address
        .split('/')
        .next()
        .unwrap_or("")
        .parse::<IpAddr>()
    else {
        return reply(json!({}));
    };
    if ip == d.server {
        return reply(json!({}));
    }
    let spec = {
        let mut book = d.book.lock().await;
        let from_endpoint = book
            .endpoints
            .iter()
            .find(|(_, e)| e.spec.address.ip() == ip)
            .map(|(id, _)| id.clone());
        match from_endpoint {
            Some(id) => book.endpoints.remove(&id).map(|e| e.spec),
            None => book.pending.remove(&ip),
        }
    };
    if let Some(spec) = spec
        && let Err(e) = d.endpoints.release(&spec).await
    {
        return refused(e);
    }
    reply(json!({}))
}

async fn create_network(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: NetworkRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let pools: Vec<String> = req
        .ipv4_data
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.pool)
        .collect();
    if pools != [d.subnet.to_string()] {
        return refused(format!(
            "a tunnel network takes its addresses from the tunnel ({}): create it with --ipam-driver of the same name as -d",
            d.subnet
        ));
    }
    let internet = req
        .options
        .as_ref()
        .and_then(|o| o.get("com.docker.network.generic"))
        .and_then(|g| g.get(INTERNET_OPTION))
        .is_some_and(|v| v == "true" || v == true);
    d.book
        .lock()
        .await
        .networks
        .insert(req.network_id, internet);
    reply(json!({}))
}

async fn delete_network(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: NetworkRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    d.book.lock().await.networks.remove(&req.network_id);
    reply(json!({}))
}

async fn create_endpoint(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: EndpointRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let ip = req
        .interface
        .as_ref()
        .and_then(|i| i.address.split('/').next()?.parse::<IpAddr>().ok());
    let mut book = d.book.lock().await;
    let Some(spec) = ip.and_then(|ip| book.pending.remove(&ip)) else {
        return refused("this endpoint has no address from the tunnel's IPAM");
    };
    let _ = req.network_id;
    book.endpoints.insert(
        req.endpoint_id,
        Ep {
            spec,
            named: false,
            device: None,
            _link: None,
        },
    );
    reply(json!({}))
}

async fn delete_endpoint(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: EndpointRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let device = {
        let mut book = d.book.lock().await;
        match book.endpoints.get_mut(&req.endpoint_id) {
            Some(e) => {
                e._link = None;
                e.device.take()
            }
            None => None,
        }
    };
    if let Some(dev) = device
        && let Err(e) = dev.destroy().await
    {
        tracing::warn!("removing {}: {e}", dev.name());
    }
    reply(json!({}))
}

async fn join(
    AxState(d): AxState<Arc<Driver>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: axum::body::Bytes,
) -> Response {
    let req: EndpointRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let Some(pid) = peer.pid else {
        return refused("cannot tell which process the Docker engine is (no peer credentials)");
    };
    let (spec, internet) = {
        let book = d.book.lock().await;
        let Some(e) = book.endpoints.get(&req.endpoint_id) else {
            return refused(format!("no endpoint {}", req.endpoint_id));
        };
        (
            e.spec.clone(),
            book.networks.get(&req.network_id).copied().unwrap_or(false),
        )
    };
    let lans = d.routes.borrow().clone();
    let mut hub = spec.hub.clone();
    hub.allowed_ips.extend(lans.iter().copied());
    let relay = spec.link.as_ref().map(|_| Relay::new("websocket"));
    let device_spec = DeviceSpec {
        name: spec.iface.clone(),
        private_key: spec.key.clone(),
        listen_port: 0,
        peers: vec![hub],
        // Docker gives it the address IPAM handed out.
        addresses: vec![],
        mtu: spec.mtu,
        confine: None,
        relay: relay.clone(),
        quarantine: None,
    };
    // The link goes where the Docker engine can find it by name; its UDP
    // socket stays here.
    let engine = match Netlink::connect_in_netns(pid) {
        Ok(n) => Arc::new(n),
        Err(e) => return refused(format!("the Docker engine's namespace: {e}")),
    };
    let device = match wg::create(
        &device_spec,
        d.backend,
        d.host.clone(),
        Some(Placement { pid, net: engine }),
    )
    .await
    {
        Ok(dev) => Arc::from(dev),
        Err(e) => {
            return refused(format!(
                "creating {}: {:#}",
                spec.iface,
                anyhow::Error::from(e)
            ));
        }
    };
    let link = match (&spec.link, relay) {
        (Some(dialer), Some(r)) => Some(Link::spawn(dialer.clone(), r, None)),
        _ => None,
    };
    {
        let mut book = d.book.lock().await;
        match book.endpoints.get_mut(&req.endpoint_id) {
            Some(e) => {
                e.device = Some(device);
                e._link = link;
            }
            None => {
                let dev = device;
                tokio::spawn(async move {
                    let _ = dev.destroy().await;
                });
                return refused("the endpoint went while it joined");
            }
        }
    }
    let routes: Vec<StaticRoute> = lans
        .iter()
        .filter(|r| r.is_ipv4())
        .map(|r| StaticRoute {
            destination: r.to_string(),
            route_type: 1,
        })
        .collect();
    tracing::debug!("endpoint {} joins as {}", spec.iface, spec.address);
    reply(json!({
        "InterfaceName": { "SrcName": spec.iface, "DstPrefix": DST_PREFIX },
        "StaticRoutes": routes,
        "DisableGatewayService": !internet,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::ContainerError;
    use crate::keys::PrivateKey;
    use crate::wg::PeerSpec;
    use http_body_util::BodyExt;
    use std::sync::Mutex;
    use tower::ServiceExt;

    #[derive(Default)]
    struct Book2 {
        allocated: Mutex<Vec<String>>,
        released: Mutex<Vec<IpAddr>>,
        renamed: Mutex<Vec<(IpAddr, String)>>,
    }

    #[async_trait::async_trait]
    impl Endpoints for Book2 {
        async fn allocate(&self, name: &str, driver: bool) -> Result<EndpointSpec, ContainerError> {
            assert!(driver);
            let mut a = self.allocated.lock().unwrap();
            a.push(name.to_owned());
            let n = a.len() + 1;
            Ok(EndpointSpec {
                container: name.into(),
                iface: format!("wgd{n}"),
                key: PrivateKey::generate(),
                address: format!("10.77.0.{n}/24").parse().unwrap(),
                address6: None,
                hub: PeerSpec {
                    public_key: PrivateKey::generate().public_key(),
                    endpoint: None,
                    allowed_ips: vec!["10.77.0.0/24".parse().unwrap()],
                    keepalive: None,
                },
                mtu: 1420,
                probe: "10.77.0.1:51821".parse().unwrap(),
                link: None,
                by_label: false,
            })
        }

        async fn rename(&self, spec: &EndpointSpec, name: &str) -> Result<(), ContainerError> {
            self.renamed
                .lock()
                .unwrap()
                .push((spec.address.ip(), name.to_owned()));
            Ok(())
        }

        async fn release(&self, spec: &EndpointSpec) -> Result<(), ContainerError> {
            self.released.lock().unwrap().push(spec.address.ip());
            Ok(())
        }
    }

    fn driver() -> (Arc<Driver>, Arc<Book2>) {
        let book = Arc::new(Book2::default());
        let (_tx, rx) = tokio::sync::watch::channel(vec![]);
        let d = Driver::new(
            book.clone(),
            Arc::new(crate::net::fake::FakeNet::default()),
            BackendChoice::Userspace,
            "10.77.0.0/24".parse().unwrap(),
            "10.77.0.1".parse().unwrap(),
            rx,
        );
        (d, book)
    }

    async fn call(d: &Arc<Driver>, path: &str, body: Value) -> Value {
        let mut req = hyper::Request::post(path)
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        req.extensions_mut().insert(ConnectInfo(Peer { pid: None }));
        let res = d.router().oneshot(req).await.unwrap();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn the_handshake_says_network_and_ipam() {
        let (d, _) = driver();
        let v = call(&d, "/Plugin.Activate", json!({})).await;
        assert_eq!(v["Implements"], json!(["NetworkDriver", "IpamDriver"]));
        let v = call(&d, "/NetworkDriver.GetCapabilities", json!({})).await;
        assert_eq!(v["Scope"], "local");
    }

    #[tokio::test]
    async fn addresses_come_from_the_hub_and_go_back_to_it() {
        let (d, book) = driver();
        let v = call(
            &d,
            "/IpamDriver.RequestPool",
            json!({"AddressSpace": "tunnel", "Pool": "", "V6": false}),
        )
        .await;
        assert_eq!(v["Pool"], "10.77.0.0/24");
        let v = call(
            &d,
            "/IpamDriver.RequestPool",
            json!({"Pool": "172.18.0.0/16"}),
        )
        .await;
        assert!(v["Err"].as_str().unwrap().contains("10.77.0.0/24"), "{v}");
        let v = call(&d, "/IpamDriver.RequestPool", json!({"V6": true})).await;
        assert!(v["Err"].as_str().unwrap().contains("IPv6"), "{v}");
        // The gateway is the hub.
        let v = call(
            &d,
            "/IpamDriver.RequestAddress",
            json!({"PoolID": "tunnel", "Options": {"RequestAddressType": GATEWAY_REQUEST}}),
        )
        .await;
        assert_eq!(v["Address"], "10.77.0.1/24");
        // A network made with another IPAM is refused.
        let v = call(
            &d,
            "/NetworkDriver.CreateNetwork",
            json!({"NetworkID": "n1", "IPv4Data": [{"Pool": "172.18.0.0/16"}]}),
        )
        .await;
        assert!(v["Err"].as_str().unwrap().contains("--ipam-driver"), "{v}");
        let v = call(
            &d,
            "/NetworkDriver.CreateNetwork",
            json!({"NetworkID": "n1", "IPv4Data": [{"Pool": "10.77.0.0/24"}]}),
        )
        .await;
        assert_eq!(v, json!({}));
        let v = call(
            &d,
            "/IpamDriver.RequestAddress",
            json!({"PoolID": "tunnel"}),
        )
        .await;
        assert_eq!(v["Address"], "10.77.0.2/24");
        assert_eq!(book.allocated.lock().unwrap().len(), 1);
        let v = call(
            &d,
            "/IpamDriver.RequestAddress",
            json!({"PoolID": "tunnel", "Address": "10.77.0.9"}),
        )
        .await;
        assert!(v["Err"].as_str().unwrap().contains("--ip"), "{v}");
        let v = call(&d, "/NetworkDriver.CreateEndpoint", json!({"NetworkID": "n1", "EndpointID": "e1", "Interface": {"Address": "10.77.0.2/24"}})).await;
        assert_eq!(v, json!({}));
        // An endpoint Docker did not get an address for from us.
        let v = call(&d, "/NetworkDriver.CreateEndpoint", json!({"NetworkID": "n1", "EndpointID": "e2", "Interface": {"Address": "10.77.0.7/24"}})).await;
        assert!(v.get("Err").is_some(), "{v}");
        // Joining needs the engine's pid, from the socket.
        let v = call(
            &d,
            "/NetworkDriver.Join",
            json!({"NetworkID": "n1", "EndpointID": "e1", "SandboxKey": "/x"}),
        )
        .await;
        assert!(
            v["Err"].as_str().unwrap().contains("peer credentials"),
            "{v}"
        );
        call(
            &d,
            "/NetworkDriver.DeleteEndpoint",
            json!({"NetworkID": "n1", "EndpointID": "e1"}),
        )
        .await;
        let v = call(
            &d,
            "/IpamDriver.ReleaseAddress",
            json!({"PoolID": "tunnel", "Address": "10.77.0.2/24"}),
        )
        .await;
        assert_eq!(v, json!({}));
        assert_eq!(
            *book.released.lock().unwrap(),
            ["10.77.0.2".parse::<IpAddr>().unwrap()]
        );
        // Releasing the gateway gives nothing back.
        call(
            &d,
            "/IpamDriver.ReleaseAddress",
            json!({"PoolID": "tunnel", "Address": "10.77.0.1/24"}),
        )
        .await;
        assert_eq!(book.released.lock().unwrap().len(), 1);
    }

    #[test]
    fn plugin_names() {
        assert!(check_name("tunnel").is_ok());
        assert!(check_name("tun_1.a-b").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("../x").is_err());
    }
}
