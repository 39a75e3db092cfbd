//! Container endpoints: each attached container gets its own WireGuard
//! interface, made in this namespace (where its UDP socket stays) and moved
//! into the container's, and follows the container through restarts and
//! re-creation via Docker events.
//!
//! The tool never starts, stops or removes containers; when a container
//! stops, its endpoint keeps its key and address and is re-attached when the
//! container runs again.
//!
//! - `follower`: the [`Follower`], which keeps each endpoint in line with
//!   its container (Docker events, restarts, labels, the LANs to route).
//! - `place`: the OS-facing half of attaching ([`Placer`]), faked in tests.
//! - `view`: what status shows of the endpoints ([`ContainerView`]).

mod follower;
mod place;
mod view;

pub use follower::{Follower, route_into};
pub use place::{HostPlacer, Placed, Placer, probe_from_netns};
pub use view::ContainerView;

use crate::docker::{self, DockerError};
use crate::keys::PrivateKey;
use crate::transport::ws::Dialer;
use crate::wg::{PeerSpec, WgError};
use ipnetwork::IpNetwork;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("attaching {container}")]
    Attach {
        container: String,
        #[source]
        source: WgError,
    },
    #[error("attaching {container}: its network namespace")]
    Namespace {
        container: String,
        #[source]
        source: crate::net::NetError,
    },
    #[error("an endpoint for container {container}: {reason}")]
    Endpoint { container: String, reason: String },
}

/// Where the endpoints of containers attached by label (or by the network
/// driver) come from and go back to: the ledger on a hub, the hub's API on
/// a site. Each has a key made on this host.
#[async_trait::async_trait]
pub trait Endpoints: Send + Sync {
    /// A new endpoint for container `name` (for the network driver when
    /// `driver`: not kept across runs).
    async fn allocate(&self, name: &str, driver: bool) -> Result<EndpointSpec, ContainerError>;
    /// The endpoint's container is `name` (known only once it started).
    async fn rename(&self, spec: &EndpointSpec, name: &str) -> Result<(), ContainerError>;
    /// Gives it back: the container is gone.
    async fn release(&self, spec: &EndpointSpec) -> Result<(), ContainerError>;
    /// The network driver's endpoints an earlier run left: their
    /// containers may run on, waiting for them.
    async fn leftovers(&self) -> Vec<EndpointSpec>;
}

/// `--attach-label`: containers that carry the label are attached as they
/// start, and their endpoints given back when they are removed.
pub struct ByLabel {
    pub label: docker::Label,
    pub endpoints: Arc<dyn Endpoints>,
}

/// One container endpoint, as configured.
#[derive(Debug, Clone)]
pub struct EndpointSpec {
    /// The container's name (re-created containers are found by name).
    pub container: String,
    pub iface: String,
    pub key: PrivateKey,
    pub address: IpNetwork,
    /// Its IPv6 twin in a dual-stack tunnel.
    pub address6: Option<IpNetwork>,
    /// The hub, as this endpoint's only peer.
    pub hub: PeerSpec,
    pub mtu: u32,
    /// The hub's control API: probed from inside the container to make the
    /// first handshake happen now and to prove traffic flows.
    pub probe: SocketAddr,
    /// How to reach the hub's WebSocket, when the site uses one.
    pub link: Option<Arc<Dialer>>,
    /// Attached by label (or the network driver): given back when its
    /// container is removed.
    pub by_label: bool,
}

/// The interface name of the `n`th container endpoint of `iface`: unique on
/// the host (UAPI sockets are shared by all namespaces) and within 15 bytes.
pub fn endpoint_iface(iface: &str, n: usize) -> String {
    let suffix = format!("c{n}");
    let keep = 15 - suffix.len();
    let base: String = iface.chars().take(keep).collect();
    format!("{base}{suffix}")
}

#[cfg(test)]
mod tests;
