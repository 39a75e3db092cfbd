//! The hub's firewall policy, derived from its state and what it opens:
//! forwarding between its peers and to its own LANs, masquerading towards
//! them, and with `--allow-from`, its ports open only to those networks,
//! loopback (the hub's containers) and the peers' last known endpoints.

use super::HubConfig;
use crate::firewall::{HubInput, Policy, Port, Snat};
use crate::state::ServerState;
use crate::transport::is_virtual;
use std::net::IpAddr;

/// What the hub's firewall opens beside its state: the WebSocket
/// listener's port, and the uplink addresses peers may reach.
#[derive(Debug, Clone, Default)]
pub struct Openings {
    pub ws_port: Option<u16>,
    /// The mesh's second UDP port (probes for NAT discovery).
    pub probe_port: Option<u16>,
    pub uplinks: Vec<IpAddr>,
    /// Connected WebSocket sites' underlay addresses, by tunnel address
    /// (loopback: through a proxy on this host that did not say whom for).
    pub ws_sources: std::collections::BTreeMap<IpAddr, IpAddr>,
}

/// The `--snat-public` sites whose public address is not known: on a
/// WebSocket through a proxy on this host that does not say whom for.
pub fn snat_unknown(state: &ServerState, open: &Openings) -> Vec<IpAddr> {
    state
        .peers
        .iter()
        .filter(|p| p.snat_public && p.via.is_none())
        .filter(|p| {
            open.ws_sources
                .get(&p.address)
                .is_some_and(IpAddr::is_loopback)
        })
        .map(|p| p.address)
        .collect()
}

pub fn policy(config: &HubConfig, state: &ServerState, open: &Openings) -> Policy {
    let listen = (!config.allow_from.is_empty()).then(|| {
        let mut from = config.allow_from.clone();
        from.push("127.0.0.0/8".parse().expect("valid"));
        from.push("::1/128".parse().expect("valid"));
        for e in state.peers.iter().filter_map(|p| p.endpoint) {
            if !is_virtual(&e) {
                let host = crate::ipam::host_net(e.ip());
                if !from.contains(&host) {
                    from.push(host);
                }
            }
        }
        let mut ports = vec![];
        if config.transport.udp {
            ports.push(Port::Udp(state.port));
        }
        ports.extend(open.ws_port.map(Port::Tcp));
        ports.extend(open.probe_port.map(Port::Udp));
        (ports, from)
    });
    let snat = state
        .peers
        .iter()
        .filter(|p| p.snat_public && p.via.is_none())
        .filter_map(|p| {
            // Where its WebSocket comes from, else its UDP endpoint.
            let public = match open.ws_sources.get(&p.address) {
                Some(ip) if ip.is_loopback() => return None,
                Some(ip) => *ip,
                None => p.endpoint.filter(|e| !is_virtual(e))?.ip(),
            };
            Some(Snat {
                site: p.address,
                public,
                subnet: state.subnet,
            })
        })
        .collect();
    Policy {
        iface: config.iface.clone(),
        hub: true,
        // The saved set: `route add|del` change it while the hub runs.
        routes: state.routes.clone(),
        masquerade: config.masquerade,
        listen,
        snat,
        input: Some(HubInput {
            tunnel: state.subnets().all(),
            uplinks: open.uplinks.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::Port;
    use crate::state::PeerRecord;
    use ipnetwork::IpNetwork;

    fn peer(address: &str, endpoint: Option<&str>, snat_public: bool) -> PeerRecord {
        PeerRecord {
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            snat_public,
            ..PeerRecord::site(address)
        }
    }

    fn state(peers: Vec<PeerRecord>) -> ServerState {
        let mut s = ServerState::new("10.9.0.0/24".parse().unwrap(), 40000, 1420);
        s.peers = peers;
        s
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn without_allow_from_the_ports_stay_open_to_all() {
        let tmp = tempfile::tempdir().unwrap();
        let c = super::super::setup::tests::config(tmp.path());
        let p = policy(&c, &state(vec![]), &Openings::default());
        assert!(p.listen.is_none());
        assert!(p.hub);
        let input = p.input.expect("the hub's input chain");
        assert_eq!(input.tunnel, vec![net("10.9.0.0/24")]);
    }

    #[test]
    fn allow_from_opens_the_ports_to_loopback_and_to_known_peers_only() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = super::super::setup::tests::config(tmp.path());
        c.allow_from = vec![net("192.0.2.0/24")];
        let peers = vec![
            peer("10.9.0.2", Some("198.51.100.7:5000"), false),
            // A WebSocket link's address is no host to open to.
            peer("10.9.0.3", Some("[100::1]:1"), false),
            peer("10.9.0.4", None, false),
        ];
        let open = Openings {
            ws_port: Some(8443),
            probe_port: Some(40001),
            uplinks: vec![],
            ws_sources: Default::default(),
        };
        let (ports, from) = policy(&c, &state(peers), &open).listen.unwrap();
        // The mesh's probe port is open to the same sources as WireGuard's.
        assert_eq!(
            ports,
            vec![Port::Udp(40000), Port::Tcp(8443), Port::Udp(40001)]
        );
        assert_eq!(
            from,
            vec![
                net("192.0.2.0/24"),
                net("127.0.0.0/8"),
                net("::1/128"),
                net("198.51.100.7/32"),
            ]
        );
    }

    #[test]
    fn only_sites_that_asked_keep_their_public_source() {
        let tmp = tempfile::tempdir().unwrap();
        let c = super::super::setup::tests::config(tmp.path());
        let mut behind = peer("10.9.0.5", Some("198.51.100.8:5000"), true);
        behind.via = Some("10.9.0.2".parse().unwrap());
        let peers = vec![
            peer("10.9.0.2", Some("198.51.100.7:5000"), true),
            peer("10.9.0.3", Some("198.51.100.9:5000"), false),
            peer("10.9.0.4", Some("[100::1]:1"), true),
            behind,
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let state = state(peers);
        let snat = policy(&c, &state, &Openings::default()).snat;
        assert_eq!(snat.len(), 1);
        assert_eq!(snat[0].site, ip("10.9.0.2"));
        assert_eq!(snat[0].public, ip("198.51.100.7"));
        // The WebSocket site's link is down: nothing to say yet.
        assert!(snat_unknown(&state, &Openings::default()).is_empty());
        // Through a proxy on this host that does not say whom for.
        let local = Openings {
            ws_sources: [(ip("10.9.0.4"), ip("127.0.0.1"))].into(),
            ..Default::default()
        };
        assert_eq!(policy(&c, &state, &local).snat.len(), 1);
        assert_eq!(snat_unknown(&state, &local), [ip("10.9.0.4")]);
        // Known from where its connection comes: SNAT to that.
        let open = Openings {
            ws_sources: [(ip("10.9.0.4"), ip("203.0.113.4"))].into(),
            ..Default::default()
        };
        let snat = policy(&c, &state, &open).snat;
        assert_eq!(snat.len(), 2);
        assert_eq!(
            (snat[1].site, snat[1].public),
            (ip("10.9.0.4"), ip("203.0.113.4"))
        );
        assert!(snat_unknown(&state, &open).is_empty());
    }
}
