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
    pub uplinks: Vec<IpAddr>,
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
        (ports, from)
    });
    let snat = state
        .peers
        .iter()
        .filter(|p| p.snat_public && p.via.is_none())
        .filter_map(|p| {
            let e = p.endpoint.filter(|e| !is_virtual(e))?;
            Some(Snat {
                site: p.address,
                public: e.ip(),
                subnet: state.subnet,
            })
        })
        .collect();
    Policy {
        iface: config.iface.clone(),
        hub: true,
        routes: config.routes.clone(),
        masquerade: config.masquerade,
        listen,
        snat,
        input: Some(HubInput {
            tunnel: state.subnets().all(),
            uplinks: open.uplinks.clone(),
        }),
    }
}
