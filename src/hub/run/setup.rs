//! The hub's state before it starts: the saved one reconciled with what
//! the command line asks for (same key, port, subnet and peers), or a new
//! one. A flag that contradicts the saved state is refused, never applied.

use super::{HubConfig, ServeError};
use crate::state::ServerState;
use crate::store::StateDir;
use ipnetwork::IpNetwork;
use std::net::{IpAddr, SocketAddr};

pub const DEFAULT_PORT: u16 = 51820;
pub const DEFAULT_SUBNET: &str = "10.77.0.0/24";

/// `--subnet6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subnet6 {
    Net(IpNetwork),
    /// IPv4 only.
    None,
}

/// `--port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortChoice {
    Fixed(u16),
    /// A free port from the dynamic range, picked once and kept.
    Random,
}

/// A UDP port in 49152-65535 that nothing on this host holds now.
fn random_port() -> Result<u16, ServeError> {
    for _ in 0..64 {
        let port = 49152 + (rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 16384) as u16;
        let free = |ip: IpAddr| std::net::UdpSocket::bind(SocketAddr::new(ip, port)).is_ok();
        if free(IpAddr::from([0u8; 16])) || free(IpAddr::from([0u8; 4])) {
            return Ok(port);
        }
    }
    Err(ServeError::NoFreePort)
}

/// `--mtu`, else what the transports want: UDP's 1420, or 1400 for a hub
/// reached only over WebSocket.
fn default_mtu(config: &HubConfig) -> u32 {
    config.mtu.unwrap_or(if config.transport.udp {
        crate::transport::UDP_MTU
    } else {
        crate::transport::WS_MTU
    })
}

/// Reuses the saved state (same key, port, subnet, peers) or makes a new one.
pub fn load_or_new(config: &HubConfig, store: &StateDir) -> Result<ServerState, ServeError> {
    match store.load_server(&config.iface)? {
        Some(saved) => reuse(config, store, saved),
        None => fresh(config),
    }
}

fn reuse(
    config: &HubConfig,
    store: &StateDir,
    saved: ServerState,
) -> Result<ServerState, ServeError> {
    let iface = &config.iface;
    let file = store.file(iface);
    if let Some(subnet) = config.subnet.filter(|s| *s != saved.subnet) {
        return Err(ServeError::Input(format!(
            "{} holds subnet {} for {iface}, not {subnet}; drop --subnet or use another --state-dir",
            file.display(),
            saved.subnet
        )));
    }
    if let Some(PortChoice::Fixed(port)) =
        config.port.filter(|p| *p != PortChoice::Fixed(saved.port))
    {
        return Err(ServeError::Input(format!(
            "{} holds port {} for {iface}, not {port}; drop --port or use another --state-dir",
            file.display(),
            saved.port
        )));
    }
    let want6 = match config.subnet6 {
        Some(Subnet6::Net(n)) => Some(Some(n)),
        Some(Subnet6::None) => Some(None),
        None => None,
    };
    if let Some(want6) = want6.filter(|w| *w != saved.subnet6) {
        let show = |s: Option<IpNetwork>| s.map_or("none".to_owned(), |n| n.to_string());
        return Err(ServeError::Input(format!(
            "{} holds IPv6 subnet {} for {iface}, not {}; drop --subnet6 or use another --state-dir",
            file.display(),
            show(saved.subnet6),
            show(want6)
        )));
    }
    tracing::info!("reusing the key and peers saved in {}", file.display());
    Ok(ServerState {
        mtu: default_mtu(config),
        name: config
            .name
            .clone()
            .or(saved.name.clone())
            .or_else(|| Some(crate::sys::hostname())),
        ..saved
    })
}

fn fresh(config: &HubConfig) -> Result<ServerState, ServeError> {
    let subnet = config
        .subnet
        .unwrap_or_else(|| DEFAULT_SUBNET.parse().expect("valid default"));
    let subnet6 = match config.subnet6 {
        Some(Subnet6::Net(n)) => Some(n),
        Some(Subnet6::None) => None,
        // Dual stack by default; an IPv6-only tunnel needs no twin.
        None if subnet.is_ipv4() => Some(crate::ipam::random_ula()),
        None => None,
    };
    crate::ipam::Subnets::new(subnet, subnet6)?;
    crate::ipam::Pool::new(subnet)?;
    let port = match config.port {
        None => DEFAULT_PORT,
        Some(PortChoice::Fixed(p)) => p,
        Some(PortChoice::Random) => random_port()?,
    };
    Ok(ServerState {
        subnet6,
        name: Some(config.name.clone().unwrap_or_else(crate::sys::hostname)),
        ..ServerState::new(subnet, port, default_mtu(config))
    })
}
