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
//! A joined endpoint outlives this process in the hub's ledger: on exit
//! its device goes but its address and key stay, and the next start
//! gives it back to its container if that still runs (`resume`), or to
//! the hub if not.
//!
//! - `socket`: the plugin socket, and who is on its other end.
//! - `wire`: the protocol's messages and answers, as plain data.
//! - `handlers`: what each request does to the [`Driver`]'s book.
//! - `naming`: endpoints renamed after their containers, from Docker's
//!   events.
//! - `resume`: at start, what an earlier run left.

mod handlers;
mod naming;
mod resume;
mod socket;
mod wire;

pub use socket::{Peer, PeerListener, bind, socket_path, start};

use crate::containers::{EndpointSpec, Endpoints};
use crate::net::NetOps;
use crate::status::{EndpointStatus, PeerReport, Role, State};
use crate::transport::ws::Link;
use crate::wg::{BackendChoice, WgDevice};
use ipnetwork::IpNetwork;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub const DEFAULT_NAME: &str = "tunnel";
/// Where the Docker engine looks for plugin sockets.
pub const PLUGIN_DIR: &str = "/run/docker/plugins";

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

/// One endpoint Docker knows of.
struct Ep {
    spec: EndpointSpec,
    /// Docker gave it its IPv6 address too (a network with `--ipv6`).
    v6: bool,
    /// Its container's name, once it started.
    named: bool,
    device: Option<Arc<dyn WgDevice>>,
    /// Its own WebSocket link, on a site that uses one.
    _link: Option<Link>,
    /// Its container's init process, once known (it started).
    pid: Option<u32>,
    /// The LANs it routes to the hub now.
    lans: Vec<IpNetwork>,
}

/// An endpoint whose LANs change.
struct Reroute {
    id: String,
    device: Arc<dyn WgDevice>,
    pid: u32,
    spec: EndpointSpec,
    before: Vec<IpNetwork>,
    after: Vec<IpNetwork>,
}

impl Ep {
    /// Of `lans`, those of its families.
    fn routable(&self, lans: &[IpNetwork]) -> Vec<IpNetwork> {
        lans.iter()
            .filter(|l| l.is_ipv4() || self.v6)
            .copied()
            .collect()
    }
}

#[derive(Default)]
struct Book {
    /// Network id -> whether its containers keep a way to the internet.
    networks: HashMap<String, bool>,
    /// Addresses handed out by IPAM, not yet an endpoint.
    pending: HashMap<IpAddr, EndpointSpec>,
    /// Of those, the ones whose IPv6 twin was not asked for yet, latest
    /// last: Docker asks for an endpoint's IPv4 address, then at once for
    /// its IPv6 one, which must be the twin.
    unpaired: Vec<IpAddr>,
    /// Endpoint id -> endpoint.
    endpoints: HashMap<String, Ep>,
}

/// The driver of one `tunnel serve` or `tunnel join`.
pub struct Driver {
    endpoints: Arc<dyn Endpoints>,
    host: Arc<dyn NetOps>,
    backend: BackendChoice,
    subnet: IpNetwork,
    /// A dual-stack tunnel's IPv6 subnet.
    subnet6: Option<IpNetwork>,
    /// The hub's tunnel address: the network's "gateway" for IPAM.
    server: IpAddr,
    /// Its IPv6 twin.
    server6: Option<IpAddr>,
    /// The LANs the hub and the sites advertise, routed into containers.
    routes: tokio::sync::watch::Receiver<Vec<IpNetwork>>,
    book: tokio::sync::Mutex<Book>,
}

impl Driver {
    pub fn new(
        endpoints: Arc<dyn Endpoints>,
        host: Arc<dyn NetOps>,
        backend: BackendChoice,
        subnets: crate::ipam::Subnets,
        server: IpAddr,
        routes: tokio::sync::watch::Receiver<Vec<IpNetwork>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            endpoints,
            host,
            backend,
            subnet: subnets.main,
            subnet6: subnets.v6,
            server,
            server6: subnets.twin(server),
            routes,
            book: Default::default(),
        })
    }

    fn net(&self, a: IpAddr) -> String {
        let prefix = match (a, self.subnet6) {
            (IpAddr::V6(_), Some(s6)) => s6.prefix(),
            _ => self.subnet.prefix(),
        };
        IpNetwork::new(a, prefix)
            .expect("an address of the subnet")
            .to_string()
    }

    /// The endpoints in containers, for status.
    pub async fn report(&self) -> Vec<EndpointStatus> {
        let entries: Vec<(EndpointSpec, Option<Arc<dyn WgDevice>>)> = {
            let book = self.book.lock().await;
            book.endpoints
                .values()
                .map(|e| {
                    let mut spec = e.spec.clone();
                    // Its twin is its address only where Docker gave it.
                    spec.address6 = spec.address6.filter(|_| e.v6);
                    (spec, e.device.clone())
                })
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
                address6: spec.address6,
                listen_port: None,
                listening: vec![],
                public_key: spec.key.public_key(),
                container: Some(spec.container.clone()),
                container_id: None,
                server: None,
                routes: vec![],
                mesh: None,
                peers,
            });
        }
        out
    }

    /// The LANs behind other sites are now `lans`: each running endpoint
    /// routes them (allowed IPs, and routes in its container).
    async fn set_lans(&self, lans: &[IpNetwork]) {
        let todo: Vec<Reroute> = {
            let book = self.book.lock().await;
            book.endpoints
                .iter()
                .filter_map(|(id, e)| {
                    let after = e.routable(lans);
                    (after != e.lans).then_some(())?;
                    Some(Reroute {
                        id: id.clone(),
                        device: e.device.clone()?,
                        pid: e.pid?,
                        spec: e.spec.clone(),
                        before: e.lans.clone(),
                        after,
                    })
                })
                .collect()
        };
        for Reroute {
            id,
            device,
            pid,
            spec,
            before,
            after,
        } in todo
        {
            let routed = async {
                let net = crate::net::Netlink::connect_in_netns(pid).map_err(|e| e.to_string())?;
                let link = net
                    .route_iface(self.server)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("no link to the hub in the container")?;
                crate::containers::route_into(device.as_ref(), &net, &link, &spec, &before, &after)
                    .await
                    .map_err(|e| e.to_string())
            };
            match routed.await {
                Ok(()) => {
                    if let Some(e) = self.book.lock().await.endpoints.get_mut(&id) {
                        e.lans = after;
                    }
                }
                Err(e) => tracing::warn!("routing LANs into container {}: {e}", spec.container),
            }
        }
    }

    /// Removes every endpoint's device. A joined endpoint's container
    /// runs on, and Docker still counts it as connected: it is kept for
    /// the next start. The others are given back.
    pub async fn close(&self) {
        let mut book = self.book.lock().await;
        let mut specs: Vec<EndpointSpec> = vec![];
        let mut devices = vec![];
        for (_, e) in book.endpoints.drain() {
            match e.device {
                Some(d) => devices.push(d),
                None => specs.push(e.spec),
            }
        }
        specs.extend(book.pending.drain().map(|(_, s)| s));
        book.unpaired.clear();
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

#[cfg(test)]
mod tests;
