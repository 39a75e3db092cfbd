//! Links and addresses through rtnetlink. Never shells out to `ip`.
//!
//! [`NetOps`] is the small surface the rest of the tool needs; [`Netlink`] is
//! the real implementation and [`fake::FakeNet`] records calls for unit tests.

#[cfg(test)]
pub mod fake;
mod netlink;

pub use netlink::Netlink;

use async_trait::async_trait;
use ipnetwork::IpNetwork;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("needs root or CAP_NET_ADMIN ({0} was refused)")]
    Permission(String),
    #[error("interface name {0} is already taken")]
    Exists(String),
    #[error("no interface named {0}")]
    NotFound(String),
    #[error("the kernel has no WireGuard support (creating a wireguard link: {0})")]
    NotSupported(String),
    #[error("invalid interface name {0:?}: {1}")]
    BadName(String, &'static str),
    #[error("netlink: {what}")]
    Other {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What the tool asks of the host's network stack.
#[async_trait]
pub trait NetOps: Send + Sync {
    async fn link_exists(&self, name: &str) -> Result<bool, NetError>;
    /// Creates a kernel `wireguard` link.
    async fn create_wireguard(&self, name: &str) -> Result<(), NetError>;
    /// Sets the MTU, adds the addresses (the kernel adds the subnet routes
    /// with them) and brings the link up.
    async fn configure(&self, name: &str, addrs: &[IpNetwork], mtu: u32) -> Result<(), NetError>;
    async fn delete_link(&self, name: &str) -> Result<(), NetError>;
    /// Changes the MTU of a link that is up (a site that moved to a WebSocket).
    async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), NetError>;
    /// Moves the link into the network namespace of process `pid`.
    async fn move_to_netns(&self, name: &str, pid: u32) -> Result<(), NetError>;
    /// Renames the link, which is left down (Linux renames no link that
    /// is up).
    async fn rename_link(&self, name: &str, to: &str) -> Result<(), NetError>;
    /// Whether the kernel forwards IPv4 packets that arrive on the link.
    async fn forwarding(&self, name: &str) -> Result<bool, NetError>;
    /// Lets the kernel forward IPv4 packets that arrive on the link, or
    /// not. Per interface, so the host as a whole does not become a
    /// router. Set over netlink, as /proc/sys is read-only in containers.
    async fn set_forwarding(&self, name: &str, on: bool) -> Result<(), NetError>;
    /// Whether the kernel forwards IPv6 packets (a host-wide switch).
    async fn forwarding6(&self) -> Result<bool, NetError>;
    /// Turns IPv6 forwarding on or off for the host.
    async fn set_forwarding6(&self, on: bool) -> Result<(), NetError>;
    /// The links that take router advertisements only while the host does
    /// not forward (`accept_ra` 1): IPv6 forwarding would cost them their
    /// SLAAC addresses and default route.
    async fn ra_links(&self) -> Result<Vec<String>, NetError>;
    /// Sets a link's `accept_ra` (2: even while forwarding).
    async fn set_accept_ra(&self, name: &str, value: u8) -> Result<(), NetError>;
    /// A route to `dst` through the link (in `table`, else main); one that
    /// is already there is fine.
    async fn add_route(
        &self,
        dst: IpNetwork,
        name: &str,
        table: Option<u32>,
    ) -> Result<(), NetError>;
    /// Removes that route; one that is gone is fine.
    async fn del_route(
        &self,
        dst: IpNetwork,
        name: &str,
        table: Option<u32>,
    ) -> Result<(), NetError>;
    /// The interface the main table sends packets for `to` out of.
    async fn route_iface(&self, to: std::net::IpAddr) -> Result<Option<String>, NetError>;
    /// Every address of this namespace (of `link` alone, when given) with
    /// its prefix (`10.1.2.3/24`), the tunnel's own included: what the
    /// host itself is and what it reaches directly, which no peer may
    /// claim as its LAN.
    async fn host_networks(&self, link: Option<&str>) -> Result<Vec<IpNetwork>, NetError>;
    /// The host's addresses and the main table's routes (but the default
    /// ones), each with the interface it is on: what a new tunnel subnet
    /// must not overlap.
    async fn occupied(&self) -> Result<Vec<Occupied>, NetError>;
    /// A policy routing rule; one that is already there is fine.
    async fn add_rule(&self, rule: &PolicyRule) -> Result<(), NetError>;
    /// Removes that rule; one that is gone is fine.
    async fn del_rule(&self, rule: &PolicyRule) -> Result<(), NetError>;
}

/// `ip rule add to TO [ipproto P] [dport D] table T priority N`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyRule {
    pub priority: u32,
    pub to: IpNetwork,
    pub table: u32,
    pub ip_proto: Option<u8>,
    pub dport: Option<u16>,
}

/// A network the host already has: an address of one of its interfaces
/// (with its prefix), or a route in its main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occupied {
    pub net: IpNetwork,
    pub iface: String,
    /// An address, rather than a route.
    pub address: bool,
}

impl std::fmt::Display for Occupied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.address { "address" } else { "route" };
        write!(f, "{what} {} on {}", self.net, self.iface)
    }
}

/// The first of `occupied` that overlaps one of `subnets`, leaving out
/// what sits on `own` (our own interface, left by a crash, goes before
/// the new one comes) and default routes (they overlap everything, and
/// a more specific route wins over them).
pub fn clash<'a>(
    subnets: &[IpNetwork],
    occupied: &'a [Occupied],
    own: &str,
) -> Option<(IpNetwork, &'a Occupied)> {
    subnets.iter().find_map(|s| {
        occupied
            .iter()
            .filter(|o| o.iface != own && o.net.prefix() > 0)
            .find(|o| crate::ipam::overlaps(s, &o.net))
            .map(|o| (*s, o))
    })
}

/// The main routing table's number.
pub const MAIN_TABLE: u32 = 254;

/// The routes to add and to take back to go from `before` to `after`.
pub fn route_changes(
    before: &[IpNetwork],
    after: &[IpNetwork],
) -> (Vec<IpNetwork>, Vec<IpNetwork>) {
    let add = after
        .iter()
        .filter(|r| !before.contains(r))
        .copied()
        .collect();
    let del = before
        .iter()
        .filter(|r| !after.contains(r))
        .copied()
        .collect();
    (add, del)
}

/// Routes the prefixes of `after` that `before` lacks into `iface`, and
/// takes back the others; hub and sites follow the advertised LANs so.
pub async fn sync_routes(
    net: &dyn NetOps,
    iface: &str,
    before: &[IpNetwork],
    after: &[IpNetwork],
) -> Result<(), NetError> {
    let (add, del) = route_changes(before, after);
    for r in add {
        net.add_route(r, iface, None).await?;
        tracing::info!("routing {r} through {iface}");
    }
    for r in del {
        net.del_route(r, iface, None).await?;
        tracing::info!("{r} is no longer routed through {iface}");
    }
    Ok(())
}

/// Checks an interface name the way the kernel will (`dev_valid_name`).
pub fn validate_ifname(name: &str) -> Result<(), NetError> {
    crate::limits::ifname_problem(name)
        .map_or(Ok(()), |why| Err(NetError::BadName(name.to_owned(), why)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subnet_clashes_with_an_address_or_route_elsewhere_only() {
        let n = |s: &str| s.parse::<IpNetwork>().unwrap();
        let on = |net: &str, iface: &str, address: bool| Occupied {
            net: n(net),
            iface: iface.into(),
            address,
        };
        let host = [
            on("0.0.0.0/0", "eth0", false),
            on("192.168.1.20/24", "eth0", true),
            on("10.77.0.2/24", "wg-x", true),
            on("10.77.0.0/24", "wg-x", false),
            on("10.9.0.0/16", "wg-old", false),
            on("fd00:1::/64", "eth0", false),
        ];
        let (s, o) = clash(&[n("10.77.0.0/24")], &host, "wg-y").unwrap();
        assert_eq!(
            (s, o.iface.as_str(), o.address),
            (n("10.77.0.0/24"), "wg-x", true)
        );
        assert_eq!(o.to_string(), "address 10.77.0.2/24 on wg-x");
        // Our own interface's leftovers and the default route do not count.
        assert!(clash(&[n("10.77.0.0/24")], &host, "wg-x").is_none());
        assert!(clash(&[n("100.64.3.0/24")], &host, "wg-y").is_none());
        // A subnet inside a route, or around an address, clashes.
        assert_eq!(
            clash(&[n("10.9.4.0/24")], &host, "wg-y").unwrap().1.iface,
            "wg-old"
        );
        assert!(clash(&[n("192.168.0.0/16")], &host, "wg-y").is_some());
        assert!(clash(&[n("10.1.0.0/24"), n("fd00:1::/64")], &host, "wg-y").is_some());
        assert!(clash(&[n("fd00:2::/64")], &host, "wg-y").is_none());
    }

    #[test]
    fn route_changes_add_what_is_new_and_take_back_what_went() {
        let n = |s: &str| s.parse::<IpNetwork>().unwrap();
        let before = [n("192.168.1.0/24"), n("192.168.2.0/24")];
        let after = [n("192.168.2.0/24"), n("10.1.0.0/16")];
        let (add, del) = route_changes(&before, &after);
        assert_eq!(add, vec![n("10.1.0.0/16")]);
        assert_eq!(del, vec![n("192.168.1.0/24")]);
        assert_eq!(route_changes(&after, &after), (vec![], vec![]));
    }

    #[test]
    fn interface_names() {
        assert!(validate_ifname("wg-tunnel").is_ok());
        assert!(validate_ifname("a23456789012345").is_ok());
        for bad in ["", "a234567890123456", "..", "a/b", "a b", "wg:0", "wé"] {
            assert!(validate_ifname(bad).is_err(), "{bad}");
        }
    }
}
