//! What a site changes on its host: its firewall and forwarding, and
//! transparent mode's table and rules; all journaled by the gateway.

use super::invitation::Invitation;
use super::{Route, SiteError};
use crate::firewall::Firewall;
use crate::gateway::Gateway;
use crate::net::{MAIN_TABLE, NetOps, PolicyRule};
use crate::state::JoinedState;
use crate::store::StateDir;
use crate::wg::WgDevice;
use ipnetwork::IpNetwork;
use std::net::SocketAddr;

/// A site's firewall policy: forwarding between the tunnel and its own
/// LANs only, masquerading towards them with `--masquerade`.
pub fn site_policy(iface: &str, routes: &[IpNetwork], masquerade: bool) -> crate::firewall::Policy {
    crate::firewall::Policy {
        iface: iface.to_owned(),
        hub: false,
        routes: routes.to_vec(),
        masquerade,
        ..Default::default()
    }
}

/// A joining site's firewall, before its device exists.
pub async fn start_gateway(
    net: &dyn NetOps,
    nft: Box<dyn Firewall>,
    store: &StateDir,
    inv: &Invitation<'_>,
    firewall: bool,
) -> Result<Gateway, SiteError> {
    let policy = site_policy(inv.iface, inv.routes, inv.masquerade);
    site_gateway(net, nft, store, inv.token.subnets(), policy, firewall).await
}

/// The same for a saved site (`up`).
pub async fn site_gateway(
    net: &dyn NetOps,
    nft: Box<dyn Firewall>,
    store: &StateDir,
    subnets: crate::ipam::Subnets,
    policy: crate::firewall::Policy,
    firewall: bool,
) -> Result<Gateway, SiteError> {
    let nets: Vec<IpNetwork> = subnets
        .all()
        .into_iter()
        .chain(policy.routes.iter().copied())
        .collect();
    Ok(Gateway::start(nft, net, store, policy, firewall, &nets).await?)
}

/// What a site changes on its host once its device is up: forwarding for
/// its LANs, and transparent mode when it was asked for (the server's
/// address, as a network, for the hub peer's allowed IPs).
pub async fn prepare_host(
    gateway: &mut Gateway,
    net: &dyn NetOps,
    device: &dyn WgDevice,
    joined: &JoinedState,
    iface: &str,
    server: SocketAddr,
    route: &Route,
) -> Result<Option<IpNetwork>, SiteError> {
    gateway.forward(net, false).await?;
    if !joined.transparent {
        return Ok(None);
    }
    let to = go_transparent(gateway, net, device, joined, iface, server, route).await?;
    Ok(Some(to))
}

/// Transparent mode's routing table (`Table =` in the guide's config).
pub const TRANSPARENT_TABLE: u32 = 51820;
/// Its rules' priorities, as in the guide: the tunnel's own transport to
/// the server stays on the main table; the rest for the server goes to ours.
const TRANSPARENT_PRIORITY: u32 = 455;

/// Transparent mode (seed 002): whatever this host sends to the server's
/// address goes through the tunnel, except the tunnel's own transport
/// (its UDP port, or the WebSocket's TCP port). A route in a table of our
/// own and two policy rules, journaled and undone on exit like the rest;
/// the hub peer is allowed that address too. Returns the address as a
/// network, for the hub peer's allowed IPs.
async fn go_transparent(
    gateway: &mut Gateway,
    net: &dyn NetOps,
    device: &dyn WgDevice,
    joined: &JoinedState,
    iface: &str,
    server: SocketAddr,
    route: &Route,
) -> Result<IpNetwork, SiteError> {
    let to = crate::ipam::host_net(server.ip());
    let transport = match &route.dialer {
        None => (IPPROTO_UDP, server.port()),
        Some(d) => (
            IPPROTO_TCP,
            url::Url::parse(&d.url())
                .ok()
                .and_then(|u| u.port_or_known_default())
                .unwrap_or(443),
        ),
    };
    device
        .set_allowed_ips(
            &joined.server_public_key,
            &joined
                .subnets()
                .all()
                .into_iter()
                .chain([to])
                .collect::<Vec<_>>(),
        )
        .await?;
    let changes = gateway.changes();
    changes
        .add_route(
            net,
            crate::gateway::TableRoute {
                dst: to,
                iface: iface.to_owned(),
                table: TRANSPARENT_TABLE,
            },
        )
        .await?;
    changes
        .add_rule(
            net,
            PolicyRule {
                priority: TRANSPARENT_PRIORITY,
                to,
                table: MAIN_TABLE,
                ip_proto: Some(transport.0),
                dport: Some(transport.1),
            },
        )
        .await?;
    changes
        .add_rule(
            net,
            PolicyRule {
                priority: TRANSPARENT_PRIORITY + 1,
                to,
                table: TRANSPARENT_TABLE,
                ip_proto: None,
                dport: None,
            },
        )
        .await?;
    tracing::info!(
        "transparent: traffic for {} goes through {iface}, except {} port {}",
        server.ip(),
        if transport.0 == IPPROTO_UDP {
            "UDP"
        } else {
            "TCP"
        },
        transport.1
    );
    Ok(to)
}

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::fake::FakeFirewall;
    use crate::net::fake::FakeNet;
    use std::sync::Arc;

    fn subnets() -> crate::ipam::Subnets {
        crate::ipam::Subnets::new("10.77.0.0/24".parse().unwrap(), None).unwrap()
    }

    #[tokio::test]
    async fn a_sites_gateway_puts_its_table_in_the_firewall_it_is_given_and_takes_it_away() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateDir::new(tmp.path());
        let net = FakeNet::default();
        let fw = Arc::new(FakeFirewall::default());
        let lan: IpNetwork = "192.168.50.0/24".parse().unwrap();
        let policy = site_policy("wgs0", &[lan], true);
        assert!(!policy.hub && policy.masquerade && policy.routes == [lan]);
        let g = site_gateway(&net, Box::new(fw.clone()), &store, subnets(), policy, true)
            .await
            .unwrap();
        assert_eq!(fw.tables.lock().unwrap().len(), 1);
        g.stop(&net).await;
        assert!(fw.tables.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn with_the_firewall_off_a_site_adds_no_table() {
        let tmp = tempfile::tempdir().unwrap();
        let net = FakeNet::default();
        let fw = Arc::new(FakeFirewall::default());
        let policy = site_policy("wgs0", &[], false);
        let store = StateDir::new(tmp.path());
        let g = site_gateway(&net, Box::new(fw.clone()), &store, subnets(), policy, false)
            .await
            .unwrap();
        assert!(fw.tables.lock().unwrap().is_empty());
        g.stop(&net).await;
    }
}
