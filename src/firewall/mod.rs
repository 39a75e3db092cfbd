//! nftables rules of our own, in one table per interface
//! (`inet tunnel-<iface>`), beside whatever else the host runs (Docker's
//! iptables rules, firewalld). The rules are planned here as plain data
//! ([`plan`], pure and tested without root) and written by [`Nftables`]
//! over netlink in one atomic batch; nothing runs `nft` or `iptables`.
//!
//! What the plan holds:
//! - **Forwarding, confined.** The hub forwards between its own tunnel
//!   peers, and a host (hub or site) forwards between the tunnel and the
//!   LANs it advertises, for those prefixes only; everything else that
//!   enters or leaves the tunnel interface is dropped. Linux decides IPv4
//!   forwarding by the incoming interface, so without this every peer
//!   could reach the host's other networks on any host with
//!   `ip_forward=1` (every Docker host).
//! - **Masquerade** for a gateway (`--masquerade`): what comes from the
//!   tunnel and leaves towards an advertised LAN gets the gateway's
//!   address, so LAN hosts need no route back.
//! - **The listen ports**, with `--allow-from`: the UDP port and the
//!   WebSocket listener's TCP port open only to those networks and the
//!   peers' last known endpoints.
//! - **The hub host itself.** What comes in from the tunnel for this host
//!   reaches its tunnel addresses, its `--route` LANs and its uplink
//!   addresses only (those its peers reach over the underlay anyway);
//!   its other addresses (a LAN it does not route, Docker's bridges) are
//!   closed to peers.
//! - **Docker's FORWARD chain.** Docker's policy is DROP, and an accept in
//!   our table does not override a drop in another; the same accepts go
//!   into Docker's `DOCKER-USER` chain (or an `ip filter` FORWARD chain
//!   with a drop policy), and the IPv6 ones into its `ip6 filter` twin
//!   where Docker manages `ip6tables`, tagged so that they are found and
//!   removed again.
//!
//! A table is replaced as a whole (add, delete, add in one batch), which
//! also clears one left by a crash, and removed on exit. A running
//! `tunnel` puts it back within seconds when someone flushes the ruleset.

mod guard;
mod nft;
mod plan;

pub use guard::{Guard, Setup, clean_up};
pub use nft::Nftables;
pub use plan::plan;

use ipnetwork::IpNetwork;

/// The kernel's hook a base chain attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Forward,
    Input,
    Postrouting,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// The packet came in on this interface.
    InIface(String),
    /// The packet goes out on this interface.
    OutIface(String),
    /// The packet does not go out on this interface.
    NotOutIface(String),
    SrcNet(IpNetwork),
    DstNet(IpNetwork),
    /// The destination is of the network's family, outside it.
    NotDstNet(IpNetwork),
    /// UDP to this port.
    UdpDport(u16),
    /// TCP to this port.
    TcpDport(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Accept,
    Drop,
    Masquerade,
    /// Source NAT to this address.
    Snat(std::net::IpAddr),
}

/// A rule: all its matches hold, then its action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub action: Action,
}

/// A base chain with policy accept: our rules only ever narrow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    pub hook: Hook,
    /// `filter` or `nat`.
    pub kind: &'static str,
    /// Lower runs first; Docker's iptables rules sit at 0 (filter).
    pub priority: i32,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub chains: Vec<Chain>,
}

/// Rules that go into a chain we do not own (Docker's), at its top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    /// Identifies our rules there, so that they are found and removed.
    pub tag: String,
    /// For Docker's IPv4 chain (`iptables`).
    pub rules: Vec<Rule>,
    /// For its IPv6 chain (`ip6tables`, where Docker manages it).
    pub rules6: Vec<Rule>,
}

impl Foreign {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.rules6.is_empty()
    }
}

/// What a host's table must do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    pub iface: String,
    /// A hub relays between its peers; a site does not.
    pub hub: bool,
    /// LANs behind this host that the tunnel may reach.
    pub routes: Vec<IpNetwork>,
    /// Masquerade what goes from the tunnel to those LANs.
    pub masquerade: bool,
    /// The listen ports and who may send to them, when restricted.
    pub listen: Option<(Vec<Port>, Vec<IpNetwork>)>,
    /// A hub: what peers may reach on the host itself.
    pub input: Option<HubInput>,
    /// Sites in transparent mode with `--snat-public`: what they send to
    /// this hub's own addresses outside the tunnel gets their public
    /// address as its source.
    pub snat: Vec<Snat>,
}

/// A port a listener takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Udp(u16),
    Tcp(u16),
}

/// The hub host's addresses that peers may reach through the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HubInput {
    /// The tunnel's subnets (its own addresses, DNS, the control API).
    pub tunnel: Vec<IpNetwork>,
    /// Its uplink addresses, which peers reach over the underlay anyway.
    pub uplinks: Vec<std::net::IpAddr>,
}

/// One `--snat-public` site, as a hub sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snat {
    /// Its tunnel address.
    pub site: std::net::IpAddr,
    /// Its public address: where its datagrams come from.
    pub public: std::net::IpAddr,
    /// The tunnel's subnet, whose traffic is left alone.
    pub subnet: IpNetwork,
}

/// Our table's name for the endpoint on `iface`.
pub fn table_name(iface: &str) -> String {
    format!("tunnel-{iface}")
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("nftables is not available in this kernel ({0})")]
    Unsupported(std::io::Error),
    #[error("needs root or CAP_NET_ADMIN (nftables refused: {0})")]
    Permission(std::io::Error),
    #[error("nftables: {what}")]
    Netlink {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the tool asks of the host's packet filter.
pub trait Firewall: Send + Sync {
    /// Replaces the table of that name with `table`, atomically.
    fn apply(&self, table: &Table) -> Result<(), FirewallError>;
    /// Removes the table if it exists.
    fn remove(&self, name: &str) -> Result<(), FirewallError>;
    /// Whether the table exists.
    fn exists(&self, name: &str) -> Result<bool, FirewallError>;
    /// Puts `f`'s rules at the top of Docker's `DOCKER-USER` chain (or a
    /// FORWARD chain whose policy drops), of `ip filter` and of
    /// `ip6 filter`, replacing rules with the same tag. False when there
    /// is no such chain in either: nothing to do.
    fn open_docker(&self, f: &Foreign) -> Result<bool, FirewallError>;
    /// Removes the rules tagged `tag` from those chains.
    fn close_docker(&self, tag: &str) -> Result<(), FirewallError>;
    /// Whether `f`'s rules are in those chains (each family's, where it
    /// has any and Docker has that chain).
    fn docker_open(&self, f: &Foreign) -> Result<bool, FirewallError>;
}

#[cfg(test)]
pub mod fake {
    //! An in-memory [`Firewall`].
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct FakeFirewall {
        pub tables: Mutex<BTreeMap<String, Table>>,
        /// Docker's chain, when the host has one: our tagged rules in it.
        pub docker: Mutex<Option<Vec<(String, Rule)>>>,
        /// A kernel without nftables: applying a table fails so.
        pub missing: bool,
    }

    /// One fake seen by the code under test and by the test itself.
    impl<F: Firewall> Firewall for std::sync::Arc<F> {
        fn apply(&self, t: &Table) -> Result<(), FirewallError> {
            (**self).apply(t)
        }
        fn remove(&self, n: &str) -> Result<(), FirewallError> {
            (**self).remove(n)
        }
        fn exists(&self, n: &str) -> Result<bool, FirewallError> {
            (**self).exists(n)
        }
        fn open_docker(&self, f: &Foreign) -> Result<bool, FirewallError> {
            (**self).open_docker(f)
        }
        fn close_docker(&self, t: &str) -> Result<(), FirewallError> {
            (**self).close_docker(t)
        }
        fn docker_open(&self, f: &Foreign) -> Result<bool, FirewallError> {
            (**self).docker_open(f)
        }
    }

    impl Firewall for FakeFirewall {
        fn apply(&self, table: &Table) -> Result<(), FirewallError> {
            if self.missing {
                return Err(FirewallError::Unsupported(
                    std::io::ErrorKind::Unsupported.into(),
                ));
            }
            self.tables
                .lock()
                .unwrap()
                .insert(table.name.clone(), table.clone());
            Ok(())
        }

        fn remove(&self, name: &str) -> Result<(), FirewallError> {
            self.tables.lock().unwrap().remove(name);
            Ok(())
        }

        fn exists(&self, name: &str) -> Result<bool, FirewallError> {
            Ok(self.tables.lock().unwrap().contains_key(name))
        }

        fn open_docker(&self, f: &Foreign) -> Result<bool, FirewallError> {
            let mut d = self.docker.lock().unwrap();
            let Some(chain) = d.as_mut() else {
                return Ok(false);
            };
            chain.retain(|(t, _)| *t != f.tag);
            for (i, r) in f.rules.iter().enumerate() {
                chain.insert(i, (f.tag.clone(), r.clone()));
            }
            Ok(true)
        }

        fn close_docker(&self, tag: &str) -> Result<(), FirewallError> {
            if let Some(chain) = self.docker.lock().unwrap().as_mut() {
                chain.retain(|(t, _)| t != tag);
            }
            Ok(())
        }

        fn docker_open(&self, f: &Foreign) -> Result<bool, FirewallError> {
            Ok(self
                .docker
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|c| c.iter().any(|(t, _)| *t == f.tag)))
        }
    }
}
