//! The wg-quick text of a local endpoint (or one of its containers), so
//! that stock `wg-quick`, or `wireguard-go` plus `wg setconf`, can take it
//! over. It holds the endpoint's private key: it is for this host's root
//! only.

use crate::state::Endpoint;
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
pub fn render(iface: &str, endpoint: &Endpoint, container: Option<&str>) -> Result<String, String> {
    let mut o = String::new();
    let iface_part = |o: &mut String,
                      what: &str,
                      address: Vec<IpNetwork>,
                      key: &str,
                      port: Option<u16>,
                      mtu: u32| {
        let _ = writeln!(o, "# {what}, exported by tunnel");
        let _ = writeln!(o, "[Interface]");
        let _ = writeln!(o, "Address = {}", list(&address));
        if let Some(p) = port {
            let _ = writeln!(o, "ListenPort = {p}");
        }
        let _ = writeln!(o, "PrivateKey = {key}");
        let _ = writeln!(o, "MTU = {mtu}");
    };
    let peer = |o: &mut String,
                what: &str,
                key: String,
                endpoint: Option<String>,
                allowed: String,
                keepalive: Option<u16>| {
        let _ = writeln!(o, "\n# {what}\n[Peer]\nPublicKey = {key}");
        if let Some(e) = endpoint {
            let _ = writeln!(o, "Endpoint = {e}");
        }
        let _ = writeln!(o, "AllowedIPs = {allowed}");
        if let Some(k) = keepalive {
            let _ = writeln!(o, "PersistentKeepalive = {k}");
        }
    };
    match (endpoint, container) {
        (Endpoint::Joined(j), None) => {
            iface_part(
                &mut o,
                &format!("{iface}: joined site"),
                j.subnets().interface(j.address.ip()),
                &j.private_key.to_base64(),
                None,
                j.mtu,
            );
            let e = endpoint_line(&j.endpoint, j.port);
            if let crate::transport::Path::Websocket { .. } = &j.path {
                let _ = writeln!(
                    o,
                    "# This site reaches the server over {}: stock WireGuard speaks UDP only.\n\
                     # Put a WebSocket relay such as wstunnel in front of it and point Endpoint there,\n\
                     # or use the server's UDP port where the network allows it (below).",
                    j.path
                );
            }
            peer(
                &mut o,
                "server",
                j.server_public_key.to_string(),
                Some(e),
                list(&j.subnets().all()),
                Some(25),
            );
        }
        (Endpoint::Server(s), None) => {
            let server_ip = crate::ipam::Pool::new(s.subnet)
                .map_err(|e| e.to_string())?
                .server_address();
            iface_part(
                &mut o,
                &format!("{iface}: hub"),
                s.subnets().interface(server_ip),
                &s.private_key.to_base64(),
                Some(s.port),
                s.mtu,
            );
            let _ = writeln!(o, "# The hub relays between its peers:");
            let _ = writeln!(o, "PostUp = sysctl -q -w net.ipv4.conf.%i.forwarding=1");
            if s.subnets().has_ipv6() {
                let _ = writeln!(o, "PostUp = sysctl -q -w net.ipv6.conf.all.forwarding=1");
            }
            for p in &s.peers {
                let what = p.name.clone().unwrap_or_else(|| "site".into());
                peer(
                    &mut o,
                    &what,
                    p.public_key.to_string(),
                    p.endpoint.map(|e| e.to_string()),
                    list(
                        &s.subnets()
                            .hosts(p.address)
                            .into_iter()
                            .chain(p.routes.iter().copied())
                            .collect::<Vec<_>>(),
                    ),
                    None,
                );
            }
            for c in &s.containers {
                let what = format!("container {}", c.container);
                peer(
                    &mut o,
                    &what,
                    c.private_key.public_key().to_string(),
                    None,
                    list(&s.subnets().hosts(c.address)),
                    None,
                );
            }
        }
        (endpoint, Some(name)) => {
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
            iface_part(
                &mut o,
                &format!("{}: container {name}", c.iface),
                subnets.interface(c.address),
                &c.private_key.to_base64(),
                None,
                mtu,
            );
            peer(
                &mut o,
                "server",
                hub_key.to_string(),
                Some(hub_endpoint),
                list(&subnets.all()),
                Some(25),
            );
        }
    }
    Ok(o)
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
            },
            routes: vec![],
            masquerade: false,
            transparent: false,
            snat_public: false,
            attach_label: None,
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
}
