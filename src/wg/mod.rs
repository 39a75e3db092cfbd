//! WireGuard devices behind one trait, whichever backend runs them.
//!
//! - [`kernel`]: a kernel `wireguard` link, configured with wireguard-control.
//! - [`userspace`]: the embedded gotatun device over TUN, in this process,
//!   with the standard UAPI socket so that stock `wg show` works.
//!
//! Both are created by [`create`], which also sets the link's MTU and
//! addresses, and both are torn down by [`WgDevice::destroy`]. Everything above
//! this module sees only [`WgDevice`].

#[cfg(test)]
pub mod fake;
pub mod gro;
pub mod kernel;
pub mod mesh;
pub mod offload;
pub mod quarantine;
pub mod quick;
pub mod userspace;

pub use quarantine::Quarantine;

use crate::keys::{PrivateKey, PublicKey};
use crate::net::{NetError, NetOps};
use async_trait::async_trait;
use ipnetwork::IpNetwork;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Joiners are often behind NAT; 25 s keeps typical mappings alive.
pub const KEEPALIVE: u16 = 25;

/// The directory of UAPI sockets, shared by every network namespace.
pub const UAPI_DIR: &str = "/var/run/wireguard";

pub fn uapi_socket(name: &str) -> PathBuf {
    PathBuf::from(UAPI_DIR).join(format!("{name}.sock"))
}

/// The underlying error of a backend, whatever its library's type.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("/dev/net/tun is missing: load the tun module (modprobe tun) or use --backend kernel")]
    NoTun,
    #[error("needs root or CAP_NET_ADMIN (opening /dev/net/tun was refused)")]
    TunPermission,
    #[error(
        "interface name {0} is in use by another WireGuard process (its UAPI socket {1} answers)"
    )]
    UapiInUse(String, String),
    #[error("UDP port {0} is already in use")]
    PortInUse(u16),
    #[error(
        "the WebSocket transport needs the userspace backend (kernel WireGuard speaks only UDP)"
    )]
    KernelWebSocket,
    #[error("userspace WireGuard: {what}")]
    Userspace {
        what: &'static str,
        #[source]
        source: Cause,
    },
    #[error("kernel WireGuard: {what}")]
    Kernel {
        what: &'static str,
        #[source]
        source: Cause,
    },
}

pub use crate::state::BackendChoice;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Kernel,
    Userspace,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Kernel => "kernel",
            BackendKind::Userspace => "userspace",
        })
    }
}

/// A peer as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSpec {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNetwork>,
    pub keepalive: Option<u16>,
}

/// A peer as the device reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNetwork>,
    /// Time since the last completed handshake.
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub keepalive: Option<u16>,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub name: String,
    pub private_key: PrivateKey,
    /// 0 picks a free port.
    pub listen_port: u16,
    pub peers: Vec<PeerSpec>,
    pub addresses: Vec<IpNetwork>,
    pub mtu: u32,
    /// Userspace only: drop packets between the tunnel and any address
    /// outside these networks (the hub's confinement where nftables is
    /// missing). The kernel backend ignores it; nftables does its job.
    pub confine: Option<Vec<IpNetwork>>,
    /// Userspace only: WebSocket links beside the UDP socket.
    pub relay: Option<Arc<crate::transport::Relay>>,
    /// Userspace only (a hub): addresses whose keys may reach nothing but
    /// the control API, until the hub trusts them ([`Quarantine`]).
    pub quarantine: Option<Arc<Quarantine>>,
    /// Userspace only: the mesh's probes and relay on the UDP socket.
    pub mesh: Option<Arc<mesh::MeshSocket>>,
    /// Whether to bind a UDP socket; false (userspace only) leaves the
    /// WebSocket links as the only way in (a hub on `--transport wss`).
    pub udp: bool,
}

/// A running WireGuard interface.
#[async_trait]
pub trait WgDevice: Send + Sync {
    fn name(&self) -> &str;
    fn backend(&self) -> BackendKind;
    async fn set_private_key(&self, key: &PrivateKey) -> Result<(), WgError>;
    /// Adds the peer, or replaces all of an existing peer's settings.
    async fn upsert_peer(&self, peer: &PeerSpec) -> Result<(), WgError>;
    /// Replaces only the peer's allowed IPs, keeping its learned endpoint.
    async fn set_allowed_ips(&self, key: &PublicKey, ips: &[IpNetwork]) -> Result<(), WgError>;
    async fn remove_peer(&self, key: &PublicKey) -> Result<(), WgError>;
    /// Points the peer's datagrams at `endpoint`, keeping its session.
    async fn set_endpoint(&self, key: &PublicKey, endpoint: SocketAddr) -> Result<(), WgError>;
    async fn peers(&self) -> Result<Vec<PeerStatus>, WgError>;
    async fn listen_port(&self) -> Result<u16, WgError>;
    /// Removes the interface and everything that came with it. The device
    /// is unusable afterwards.
    async fn destroy(&self) -> Result<(), WgError>;
}

/// A network namespace to put a device's interface in (a container's).
pub struct Placement {
    /// A process in that namespace.
    pub pid: u32,
    /// Netlink in that namespace.
    pub net: Arc<dyn NetOps>,
}

/// Creates the device, configures it, and gives its link its addresses and
/// MTU. With `into`, the link is made in the current namespace, where its
/// UDP socket stays, then moved into the other namespace and configured
/// there. On any error, whatever was created is removed again.
pub async fn create(
    spec: &DeviceSpec,
    choice: BackendChoice,
    host: Arc<dyn NetOps>,
    into: Option<Placement>,
) -> Result<Box<dyn WgDevice>, WgError> {
    crate::net::validate_ifname(&spec.name)?;
    if host.link_exists(&spec.name).await? {
        return Err(NetError::Exists(spec.name.clone()).into());
    }
    userspace::check_uapi_free(&spec.name)?;
    if spec.udp && spec.listen_port != 0 {
        check_port_free(spec.listen_port)?;
    }
    let link_net = into
        .as_ref()
        .map(|p| p.net.clone())
        .unwrap_or_else(|| host.clone());
    let kernel = || kernel::KernelDevice::create(spec, host.clone(), link_net.clone());
    let user = || userspace::UserspaceDevice::create(spec, link_net.clone());
    // Kernel WireGuard speaks UDP only.
    let choice = match (choice, &spec.relay) {
        (BackendChoice::Kernel, Some(_)) => return Err(WgError::KernelWebSocket),
        (BackendChoice::Auto, Some(_)) => BackendChoice::Userspace,
        (c, _) => c,
    };
    let device: Box<dyn WgDevice> = match choice {
        BackendChoice::Kernel => Box::new(kernel().await?),
        BackendChoice::Userspace => Box::new(user().await?),
        BackendChoice::Auto => match kernel().await {
            Ok(d) => {
                tracing::info!("backend: kernel WireGuard");
                Box::new(d)
            }
            Err(WgError::Net(NetError::NotSupported(why))) => {
                tracing::info!(
                    "backend: userspace (gotatun), as the kernel has no WireGuard: {why}"
                );
                Box::new(user().await?)
            }
            Err(e) => return Err(e),
        },
    };
    place(
        device,
        spec,
        host.as_ref(),
        link_net.as_ref(),
        into.map(|p| p.pid),
    )
    .await
}

/// Moves a new device's link into the namespace of `pid` (if any) and
/// configures it there; on any error the device is destroyed again.
async fn place(
    device: Box<dyn WgDevice>,
    spec: &DeviceSpec,
    host: &dyn NetOps,
    link_net: &dyn NetOps,
    pid: Option<u32>,
) -> Result<Box<dyn WgDevice>, WgError> {
    let placed = match pid {
        Some(pid) => host.move_to_netns(&spec.name, pid).await,
        None => Ok(()),
    };
    let configured = match placed {
        Ok(()) => {
            link_net
                .configure(&spec.name, &spec.addresses, spec.mtu)
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = configured {
        let _ = device.destroy().await;
        return Err(e.into());
    }
    Ok(device)
}

/// A UDP port is free when a dual-stack socket can bind it, as the device will.
pub fn check_port_free(port: u16) -> Result<(), WgError> {
    use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};
    let in_use = |e: &std::io::Error| e.kind() == std::io::ErrorKind::AddrInUse;
    match UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => Ok(()),
        Err(e) if in_use(&e) => Err(WgError::PortInUse(port)),
        // No IPv6 on this host: check IPv4 alone.
        Err(_) => match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
            Err(e) if in_use(&e) => Err(WgError::PortInUse(port)),
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::fake::FakeNet;

    fn spec() -> DeviceSpec {
        DeviceSpec {
            name: "wgt0".into(),
            private_key: PrivateKey::generate(),
            listen_port: 0,
            peers: vec![],
            addresses: vec!["10.77.0.2/24".parse().unwrap()],
            mtu: 1420,
            confine: None,
            relay: None,
            quarantine: None,
            mesh: None,
            udp: true,
        }
    }

    #[tokio::test]
    async fn a_device_that_cannot_be_placed_is_destroyed() {
        // The link is not in the host namespace, so the move fails.
        let host = FakeNet::default();
        let dev = fake::FakeWg::default();
        let err = place(Box::new(dev.clone()), &spec(), &host, &host, Some(42))
            .await
            .err()
            .expect("the move fails");
        assert!(matches!(err, WgError::Net(NetError::NotFound(_))), "{err}");
        assert!(dev.state.lock().unwrap().destroyed);
    }

    #[tokio::test]
    async fn a_device_that_cannot_be_configured_is_destroyed() {
        let host = FakeNet::default();
        host.add_link("wgt0");
        let container = FakeNet::default();
        let dev = fake::FakeWg::default();
        assert!(
            place(Box::new(dev.clone()), &spec(), &host, &container, Some(42))
                .await
                .is_err()
        );
        assert!(dev.state.lock().unwrap().destroyed);
        assert_eq!(host.links.lock().unwrap()["wgt0"].netns_pid, Some(42));
    }

    #[tokio::test]
    async fn a_placed_device_is_configured_where_it_lives() {
        let host = FakeNet::default();
        host.add_link("wgt0");
        let dev = fake::FakeWg::default();
        place(Box::new(dev.clone()), &spec(), &host, &host, None)
            .await
            .unwrap();
        let link = host.links.lock().unwrap()["wgt0"].clone();
        assert!(link.up && link.mtu == Some(1420));
        assert!(!dev.state.lock().unwrap().destroyed);
    }
}
