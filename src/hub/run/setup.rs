//! The hub's state before it starts: the saved one reconciled with what
//! the command line asks for (same key, port, subnet and peers), or a new
//! one. A flag that contradicts the saved state is refused, never applied.

use super::{HubConfig, ServeError};
use crate::state::ServerState;
use crate::store::StateDir;
use ipnetwork::IpNetwork;
use std::net::{IpAddr, SocketAddr};

pub const DEFAULT_PORT: u16 = 51820;

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

/// Reuses the saved state (same key, port, subnet, peers) or makes a new
/// one, whose default subnet overlaps none of `taken` (the host's
/// addresses and routes).
pub fn load_or_new(
    config: &HubConfig,
    store: &StateDir,
    taken: &[IpNetwork],
) -> Result<ServerState, ServeError> {
    match store.load_server(&config.iface)? {
        Some(saved) => reuse(config, store, saved),
        None => fresh(config, taken),
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

fn fresh(config: &HubConfig, taken: &[IpNetwork]) -> Result<ServerState, ServeError> {
    let subnet = match config.subnet {
        Some(s) => s,
        None => crate::ipam::random_subnet(&mut rand_core::OsRng, taken).ok_or_else(|| {
            ServeError::Input(format!(
                "no free /24 in {} or {} on this host: give one with --subnet CIDR",
                crate::ipam::DEFAULT_RANGE,
                crate::ipam::FALLBACK_RANGE
            ))
        })?,
    };
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::state::Endpoint;
    use crate::transport::ServeTransports;

    /// `tunnel serve` with no flags, its state in `dir`.
    pub(in crate::hub::run) fn config(dir: &std::path::Path) -> HubConfig {
        HubConfig {
            iface: "wgt0".into(),
            state_dir: dir.to_owned(),
            backend: crate::wg::BackendChoice::Auto,
            mtu: None,
            name: Some("hub".into()),
            attach_label: None,
            docker_driver: None,
            port: None,
            subnet: None,
            subnet6: None,
            tokens: None,
            token_ttl: std::time::Duration::from_secs(3600),
            token_routes: vec![],
            endpoint: None,
            transport: ServeTransports::parse("udp").unwrap(),
            wss_listen: "[::]:443".parse().unwrap(),
            public_url: None,
            routes: vec![],
            masquerade: false,
            firewall: true,
            allow_from: vec![],
            dns_zone: "tunnel".into(),
            endpoints_per_site: 16,
            mesh: true,
        }
    }

    fn saved(dir: &std::path::Path) -> (StateDir, ServerState) {
        let store = StateDir::new(dir);
        let mut state = ServerState::new("10.9.0.0/24".parse().unwrap(), 40000, 1420);
        state.subnet6 = Some("fd00:9::/64".parse().unwrap());
        store
            .save("wgt0", &Endpoint::Server(state.clone()))
            .unwrap();
        (store, state)
    }

    #[test]
    fn a_first_start_takes_the_defaults_and_a_twin_ipv6_subnet() {
        let tmp = tempfile::tempdir().unwrap();
        let host: IpNetwork = "100.64.0.0/11".parse().unwrap();
        let store = StateDir::new(tmp.path());
        let s = load_or_new(&config(tmp.path()), &store, &[host]).unwrap();
        // Away from what the host has; kept once saved.
        assert!(
            s.subnet.prefix() == 24 && !host.contains(s.subnet.network()),
            "{}",
            s.subnet
        );
        store.save("wgt0", &Endpoint::Server(s.clone())).unwrap();
        let again = load_or_new(&config(tmp.path()), &store, &[]).unwrap();
        assert_eq!(again.subnet, s.subnet);
        assert_eq!(s.port, DEFAULT_PORT);
        assert_eq!(s.mtu, crate::transport::UDP_MTU);
        assert!(s.subnet6.is_some_and(|n| n.is_ipv6()));
        assert_eq!(s.name.as_deref(), Some("hub"));
    }

    #[test]
    fn ipv4_only_and_ipv6_only_tunnels_have_no_twin() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateDir::new(tmp.path());
        let mut c = config(tmp.path());
        c.subnet6 = Some(Subnet6::None);
        assert_eq!(load_or_new(&c, &store, &[]).unwrap().subnet6, None);
        let mut c = config(tmp.path());
        c.subnet = Some("fd00:77::/64".parse().unwrap());
        assert_eq!(load_or_new(&c, &store, &[]).unwrap().subnet6, None);
    }

    #[test]
    fn a_random_port_is_from_the_dynamic_range() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = config(tmp.path());
        c.port = Some(PortChoice::Random);
        let port = load_or_new(&c, &StateDir::new(tmp.path()), &[])
            .unwrap()
            .port;
        assert!(port >= 49152, "{port}");
    }

    #[test]
    fn a_hub_reached_only_over_websocket_gets_the_smaller_mtu() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = config(tmp.path());
        c.transport = ServeTransports::parse("wss").unwrap();
        let s = load_or_new(&c, &StateDir::new(tmp.path()), &[]).unwrap();
        assert_eq!(s.mtu, crate::transport::WS_MTU);
    }

    #[test]
    fn a_restart_keeps_the_key_port_and_subnets() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, before) = saved(tmp.path());
        let after = load_or_new(&config(tmp.path()), &store, &[]).unwrap();
        assert_eq!(
            after.private_key.public_key(),
            before.private_key.public_key()
        );
        assert_eq!(
            (after.port, after.subnet, after.subnet6),
            (40000, before.subnet, before.subnet6)
        );
    }

    #[test]
    fn flags_that_contradict_the_saved_state_are_refused_with_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = saved(tmp.path());
        let file = store.file("wgt0").display().to_string();
        let mut subnet = config(tmp.path());
        subnet.subnet = Some("10.8.0.0/24".parse().unwrap());
        let mut port = config(tmp.path());
        port.port = Some(PortChoice::Fixed(40001));
        let mut six = config(tmp.path());
        six.subnet6 = Some(Subnet6::None);
        for (c, flag) in [(subnet, "--subnet"), (port, "--port"), (six, "--subnet6")] {
            match load_or_new(&c, &store, &[]) {
                Err(ServeError::Input(m)) => {
                    assert!(m.contains(&file) && m.contains(flag), "{m}")
                }
                other => panic!("{flag}: {other:?}"),
            }
        }
        // Saying what is saved is no contradiction.
        let mut same = config(tmp.path());
        same.port = Some(PortChoice::Fixed(40000));
        same.subnet = Some("10.9.0.0/24".parse().unwrap());
        assert!(load_or_new(&same, &store, &[]).is_ok());
    }

    #[test]
    fn a_subnet_too_small_for_a_hub_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = config(tmp.path());
        c.subnet = Some("10.9.0.0/31".parse().unwrap());
        assert!(matches!(
            load_or_new(&c, &StateDir::new(tmp.path()), &[]),
            Err(ServeError::Ipam(_))
        ));
    }
}
