//! The wg-quick text of a local endpoint (or one of its containers), so
//! that stock `wg-quick`, or `wireguard-go` plus `wg setconf`, can take it
//! over. It holds the endpoint's private key: it is for this host's root
//! only.

use crate::state::{Endpoint, JoinedState, ServerState};
use ipnetwork::IpNetwork;
use std::fmt::Write as _;
use std::net::SocketAddr;

/// `HOST:PORT` for an Endpoint line, whatever form the user gave.
pub fn endpoint_line(given: &str, port: u16) -> String {
    if given.parse::<SocketAddr>().is_ok() {
        return given.to_owned();
    }
    match given
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<std::net::IpAddr>()
    {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_)
            if given
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok()) =>
        {
            given.to_owned()
        }
        Err(_) => format!("{given}:{port}"),
    }
}

fn list(nets: &[IpNetwork]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The wg-quick text for the endpoint `iface` (or one of its containers).
/// One `[Interface]` section.
struct Interface<'a> {
    what: &'a str,
    address: Vec<IpNetwork>,
    /// The private key, wiped once written.
    key: zeroize::Zeroizing<String>,
    port: Option<u16>,
    mtu: u32,
}

/// One `[Peer]` section.
struct Peer<'a> {
    what: &'a str,
    key: String,
    endpoint: Option<String>,
    allowed: Vec<IpNetwork>,
    keepalive: Option<u16>,
}

fn interface(o: &mut String, i: Interface<'_>) {
    let _ = writeln!(o, "# {}, exported by tunnel", i.what);
    let _ = writeln!(o, "[Interface]");
    let _ = writeln!(o, "Address = {}", list(&i.address));
    if let Some(p) = i.port {
        let _ = writeln!(o, "ListenPort = {p}");
    }
    let _ = writeln!(o, "PrivateKey = {}", i.key.as_str());
    let _ = writeln!(o, "MTU = {}", i.mtu);
}

fn peer(o: &mut String, p: Peer<'_>) {
    let _ = writeln!(o, "\n# {}\n[Peer]\nPublicKey = {}", p.what, p.key);
    if let Some(e) = p.endpoint {
        let _ = writeln!(o, "Endpoint = {e}");
    }
    let _ = writeln!(o, "AllowedIPs = {}", list(&p.allowed));
    if let Some(k) = p.keepalive {
        let _ = writeln!(o, "PersistentKeepalive = {k}");
    }
}

/// The wg-quick text for the endpoint `iface` (or one of its containers).
pub fn render(iface: &str, endpoint: &Endpoint, container: Option<&str>) -> Result<String, String> {
    let mut o = String::new();
    match (endpoint, container) {
        (Endpoint::Joined(j), None) => joined(&mut o, iface, j),
        (Endpoint::Server(s), None) => hub(&mut o, iface, s)?,
        (endpoint, Some(name)) => container_of(&mut o, iface, endpoint, name)?,
    }
    Ok(o)
}

fn joined(o: &mut String, iface: &str, j: &JoinedState) {
    interface(
        o,
        Interface {
            what: &format!("{iface}: joined site"),
            address: j.subnets().interface(j.address.ip()),
            key: j.private_key.to_base64(),
            port: None,
            mtu: j.mtu,
        },
    );
    if let crate::reach::Path::Websocket { .. } = &j.path {
        let _ = writeln!(
            o,
            "# This site reaches the server over {}: stock WireGuard speaks UDP only.\n\
             # Put a WebSocket relay such as wstunnel in front of it and point Endpoint there,\n\
             # or use the server's UDP port where the network allows it (below).",
            j.path
        );
    }
    peer(
        o,
        Peer {
            what: "server",
            key: j.server_public_key.to_string(),
            endpoint: Some(endpoint_line(&j.endpoint, j.port)),
            allowed: j.subnets().all(),
            keepalive: Some(super::KEEPALIVE),
        },
    );
}

fn hub(o: &mut String, iface: &str, s: &ServerState) -> Result<(), String> {
    let server_ip = crate::ipam::Pool::new(s.subnet)
        .map_err(|e| e.to_string())?
        .server_address();
    interface(
        o,
        Interface {
            what: &format!("{iface}: hub"),
            address: s.subnets().interface(server_ip),
            key: s.private_key.to_base64(),
            port: Some(s.port),
            mtu: s.mtu,
        },
    );
    let _ = writeln!(o, "# The hub relays between its peers:");
    let _ = writeln!(o, "PostUp = sysctl -q -w net.ipv4.conf.%i.forwarding=1");
    if s.subnets().has_ipv6() {
        let _ = writeln!(o, "PostUp = sysctl -q -w net.ipv6.conf.all.forwarding=1");
    }
    for p in &s.peers {
        let what = p.name.clone().unwrap_or_else(|| "site".into());
        let allowed = s.subnets().hosts(p.address).into_iter();
        peer(
            o,
            Peer {
                what: &what,
                key: p.public_key.to_string(),
                endpoint: p.endpoint.map(|e| e.to_string()),
                allowed: allowed.chain(p.routes.iter().copied()).collect(),
                keepalive: None,
            },
        );
    }
    for c in &s.containers {
        peer(
            o,
            Peer {
                what: &format!("container {}", c.container),
                key: c.private_key.public_key().to_string(),
                endpoint: None,
                allowed: s.subnets().hosts(c.address),
                keepalive: None,
            },
        );
    }
    Ok(())
}

fn container_of(
    o: &mut String,
    iface: &str,
    endpoint: &Endpoint,
    name: &str,
) -> Result<(), String> {
    let (containers, subnets, hub_key, hub_endpoint, mtu) = match endpoint {
        Endpoint::Server(s) => (
            &s.containers,
            s.subnets(),
            s.private_key.public_key(),
            format!("127.0.0.1:{}", s.port),
            s.mtu,
        ),
        Endpoint::Joined(j) => (
            &j.containers,
            j.subnets(),
            j.server_public_key,
            endpoint_line(&j.endpoint, j.port),
            j.mtu,
        ),
    };
    let c = containers
        .iter()
        .find(|c| c.container == name)
        .ok_or_else(|| format!("{iface} has no endpoint for container {name:?}"))?;
    interface(
        o,
        Interface {
            what: &format!("{}: container {name}", c.iface),
            address: subnets.interface(c.address),
            key: c.private_key.to_base64(),
            port: None,
            mtu,
        },
    );
    peer(
        o,
        Peer {
            what: "server",
            key: hub_key.to_string(),
            endpoint: Some(hub_endpoint),
            allowed: subnets.all(),
            keepalive: Some(super::KEEPALIVE),
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_websocket_site_is_told_that_stock_wireguard_needs_a_relay() {
        use crate::state::JoinedState;
        use crate::transport::{Path, WsOffer, WsTarget};
        let j = JoinedState {
            name: None,
            private_key: crate::keys::PrivateKey::generate(),
            mtu: 1400,
            backend: None,
            server_public_key: crate::keys::PrivateKey::generate().public_key(),
            endpoint: "192.0.2.1".into(),
            port: 51820,
            address: "10.77.0.2/24".parse().unwrap(),
            server_address: "10.77.0.1".parse().unwrap(),
            subnet: "10.77.0.0/24".parse().unwrap(),
            subnet6: None,
            containers: vec![],
            path: Path::Websocket {
                offer: WsOffer {
                    target: WsTarget::Plain { port: 80 },
                    path: "/t/x".into(),
                },
                proxy: None,
                proxy_ca: None,
            },
            routes: vec![],
            masquerade: false,
            transparent: false,
            snat_public: false,
            attach_label: None,
            advertise_endpoint: None,
            listen_port: None,
        };
        let text = render("wg0", &Endpoint::Joined(j), None).unwrap();
        assert!(text.contains("stock WireGuard speaks UDP only"), "{text}");
        assert!(text.contains("MTU = 1400"), "{text}");
    }

    #[test]
    fn endpoint_forms() {
        assert_eq!(endpoint_line("192.0.2.1", 51820), "192.0.2.1:51820");
        assert_eq!(endpoint_line("192.0.2.1:9", 51820), "192.0.2.1:9");
        assert_eq!(endpoint_line("fd00::1", 5), "[fd00::1]:5");
        assert_eq!(endpoint_line("vpn.example.org", 5), "vpn.example.org:5");
        assert_eq!(endpoint_line("vpn.example.org:7", 5), "vpn.example.org:7");
    }

    fn hub_state() -> ServerState {
        use crate::state::{ContainerRecord, PeerRecord};
        let mut s = ServerState::new("10.77.0.0/24".parse().unwrap(), 51820, 1420);
        s.peers.push(PeerRecord {
            name: Some("office".into()),
            endpoint: Some("192.0.2.7:40000".parse().unwrap()),
            routes: vec!["192.168.50.0/24".parse().unwrap()],
            ..PeerRecord::site("10.77.0.2")
        });
        s.containers.push(ContainerRecord {
            container: "web".into(),
            iface: "wg0-c0".into(),
            private_key: crate::keys::PrivateKey::generate(),
            address: "10.77.0.3".parse().unwrap(),
            by_label: false,
            driver: false,
        });
        s
    }

    #[test]
    fn a_hub_export_lists_its_sites_with_their_lans_and_its_containers() {
        let s = hub_state();
        let key = s.private_key.to_base64();
        let text = render("wg0", &Endpoint::Server(s), None).unwrap();
        assert!(text.contains("ListenPort = 51820"), "{text}");
        assert!(
            text.contains(&format!("PrivateKey = {}", key.as_str())),
            "{text}"
        );
        assert!(text.contains("# office"), "{text}");
        assert!(text.contains("Endpoint = 192.0.2.7:40000"), "{text}");
        assert!(
            text.contains("AllowedIPs = 10.77.0.2/32, 192.168.50.0/24"),
            "{text}"
        );
        assert!(text.contains("# container web"), "{text}");
        assert!(text.contains("AllowedIPs = 10.77.0.3/32"), "{text}");
        assert!(text.contains("net.ipv4.conf.%i.forwarding=1"), "{text}");
        assert!(!text.contains("PersistentKeepalive"), "{text}");
    }

    #[test]
    fn a_container_export_has_the_hub_as_its_peer_on_loopback() {
        let text = render("wg0", &Endpoint::Server(hub_state()), Some("web")).unwrap();
        assert!(text.contains("# wg0-c0: container web"), "{text}");
        assert!(text.contains("Endpoint = 127.0.0.1:51820"), "{text}");
        assert!(text.contains("PersistentKeepalive = 25"), "{text}");
        let err = render("wg0", &Endpoint::Server(hub_state()), Some("db")).unwrap_err();
        assert!(err.contains("no endpoint for container \"db\""), "{err}");
    }
}
