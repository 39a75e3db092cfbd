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
//!   with a drop policy), tagged so that they are found and removed again.
//!
//! A table is replaced as a whole (add, delete, add in one batch), which
//! also clears one left by a crash, and removed on exit. A running
//! `tunnel` puts it back within seconds when someone flushes the ruleset.

mod nft;

pub use nft::Nftables;

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

fn rule(matches: Vec<Match>, action: Action) -> Rule {
    Rule { matches, action }
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
    pub rules: Vec<Rule>,
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

/// The tables and rules that carry out `p`.
pub fn plan(p: &Policy) -> (Table, Foreign) {
    let tun = || p.iface.clone();
    let mut accepts = vec![];
    if p.hub {
        accepts.push(rule(
            vec![Match::InIface(tun()), Match::OutIface(tun())],
            Action::Accept,
        ));
    }
    for r in &p.routes {
        accepts.push(rule(
            vec![Match::InIface(tun()), Match::DstNet(*r)],
            Action::Accept,
        ));
        accepts.push(rule(
            vec![Match::OutIface(tun()), Match::SrcNet(*r)],
            Action::Accept,
        ));
    }
    let mut forward = accepts.clone();
    forward.push(rule(vec![Match::InIface(tun())], Action::Drop));
    forward.push(rule(vec![Match::OutIface(tun())], Action::Drop));
    let mut chains = vec![Chain {
        name: "forward",
        hook: Hook::Forward,
        kind: "filter",
        priority: -1,
        rules: forward,
    }];
    if p.masquerade && !p.routes.is_empty() {
        chains.push(Chain {
            name: "postrouting",
            hook: Hook::Postrouting,
            kind: "nat",
            priority: 100,
            rules: p
                .routes
                .iter()
                .map(|r| {
                    rule(
                        vec![
                            Match::InIface(tun()),
                            Match::NotOutIface(tun()),
                            Match::DstNet(*r),
                        ],
                        Action::Masquerade,
                    )
                })
                .collect(),
        });
    }
    let snat: Vec<Rule> = p
        .snat
        .iter()
        .filter(|s| {
            s.site.is_ipv4() == s.public.is_ipv4() && s.site.is_ipv4() == s.subnet.is_ipv4()
        })
        .map(|s| {
            rule(
                vec![
                    Match::InIface(tun()),
                    Match::SrcNet(crate::ipam::host_net(s.site)),
                    Match::NotDstNet(s.subnet),
                ],
                Action::Snat(s.public),
            )
        })
        .collect();
    if !snat.is_empty() {
        // The seed's "firewall for endpoint B": NAT on input, undone on
        // the replies' way out, so that they still go through the tunnel.
        chains.push(Chain {
            name: "snat",
            hook: Hook::Input,
            kind: "nat",
            priority: 100,
            rules: snat,
        });
    }
    let mut rules: Vec<Rule> = vec![];
    if let Some(input) = &p.input {
        let open = input
            .tunnel
            .iter()
            .chain(&p.routes)
            .copied()
            .chain(input.uplinks.iter().map(|a| crate::ipam::host_net(*a)));
        for n in open {
            rules.push(rule(
                vec![Match::InIface(tun()), Match::DstNet(n)],
                Action::Accept,
            ));
        }
        rules.push(rule(vec![Match::InIface(tun())], Action::Drop));
    }
    if let Some((ports, allowed)) = &p.listen {
        for port in ports {
            let m = match *port {
                Port::Udp(n) => Match::UdpDport(n),
                Port::Tcp(n) => Match::TcpDport(n),
            };
            for n in allowed {
                rules.push(rule(vec![m.clone(), Match::SrcNet(*n)], Action::Accept));
            }
            rules.push(rule(vec![m], Action::Drop));
        }
    }
    if !rules.is_empty() {
        chains.push(Chain {
            name: "input",
            hook: Hook::Input,
            kind: "filter",
            priority: -1,
            rules,
        });
    }
    let table = Table {
        name: table_name(&p.iface),
        chains,
    };
    let foreign = Foreign {
        tag: table.name.clone(),
        // Docker's chains are IPv4 (`ip filter`): its rules for the v4 routes.
        rules: accepts
            .into_iter()
            .filter(|r| {
                !r.matches
                    .iter()
                    .any(|m| matches!(m, Match::SrcNet(n) | Match::DstNet(n) if n.is_ipv6()))
            })
            .collect(),
    };
    (table, foreign)
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
    /// Puts `f`'s rules at the top of Docker's `DOCKER-USER` chain (or an
    /// `ip filter` FORWARD chain whose policy drops), replacing rules with
    /// the same tag. False when there is no such chain: nothing to do.
    fn open_docker(&self, f: &Foreign) -> Result<bool, FirewallError>;
    /// Removes the rules tagged `tag` from those chains.
    fn close_docker(&self, tag: &str) -> Result<(), FirewallError>;
    /// Whether rules tagged `tag` are in those chains.
    fn docker_open(&self, tag: &str) -> Result<bool, FirewallError>;
}

/// A host's rules while it runs: applied, checked, put back, removed.
pub struct Guard {
    fw: Box<dyn Firewall>,
    table: Table,
    foreign: Foreign,
    /// Whether Docker's chain held our rules when last applied.
    docker: bool,
}

impl Guard {
    /// Applies the plan for `policy`.
    pub fn apply(fw: Box<dyn Firewall>, policy: &Policy) -> Result<Self, FirewallError> {
        let (table, foreign) = plan(policy);
        fw.apply(&table)?;
        let docker = if foreign.rules.is_empty() {
            fw.close_docker(&foreign.tag)?;
            false
        } else {
            fw.open_docker(&foreign)?
        };
        if docker {
            tracing::info!(
                "opened Docker's FORWARD chain (DOCKER-USER) for the tunnel's own forwarding"
            );
        }
        Ok(Self {
            fw,
            table,
            foreign,
            docker,
        })
    }

    /// Applies a changed policy (routes, endpoints) when it differs.
    pub fn update(&mut self, policy: &Policy) -> Result<(), FirewallError> {
        let (table, foreign) = plan(policy);
        if table != self.table {
            self.fw.apply(&table)?;
            self.table = table;
        }
        if foreign != self.foreign {
            self.docker = if foreign.rules.is_empty() {
                self.fw.close_docker(&foreign.tag)?;
                false
            } else {
                self.fw.open_docker(&foreign)?
            };
            self.foreign = foreign;
        }
        Ok(())
    }

    /// Puts back what someone removed (`nft flush ruleset`, a firewalld
    /// reload, Docker restarting); true when something was missing.
    pub fn repair(&mut self) -> Result<bool, FirewallError> {
        let mut repaired = false;
        if !self.fw.exists(&self.table.name)? {
            tracing::warn!(
                "nftables table {} was removed from outside; putting it back",
                self.table.name
            );
            self.fw.apply(&self.table)?;
            repaired = true;
        }
        if !self.foreign.rules.is_empty() && !self.fw.docker_open(&self.foreign.tag)? {
            // Docker's chain may have been created since, or flushed.
            if self.fw.open_docker(&self.foreign)? {
                if self.docker {
                    tracing::warn!(
                        "our rules in Docker's DOCKER-USER chain were removed; putting them back"
                    );
                } else {
                    tracing::info!("Docker's FORWARD chain appeared; opened it for the tunnel");
                }
                self.docker = true;
                repaired = true;
            }
        }
        Ok(repaired)
    }

    pub fn table_name(&self) -> &str {
        &self.table.name
    }

    /// Removes everything this guard added.
    pub fn remove(self) {
        if let Err(e) = self.fw.remove(&self.table.name) {
            tracing::warn!("removing nftables table {}: {e}", self.table.name);
        }
        if let Err(e) = self.fw.close_docker(&self.foreign.tag) {
            tracing::warn!("removing our rules from Docker's chain: {e}");
        }
    }
}

/// A host's firewall as it starts.
pub enum Setup {
    /// Our table is in place (and Docker's chain opened, if there is one).
    Guarded(Guard),
    /// nftables is missing: the userspace device drops what leaves or
    /// enters these networks itself.
    Fallback(Vec<IpNetwork>),
    /// `--firewall off`.
    Off,
}

impl Setup {
    /// Applies `policy` unless the firewall is off; where nftables is
    /// missing, says so once and falls back to the userspace device
    /// confining the tunnel to `tunnel_nets` and the policy's routes.
    pub fn start(
        fw: Box<dyn Firewall>,
        policy: &Policy,
        enabled: bool,
        tunnel_nets: &[IpNetwork],
    ) -> Result<Self, FirewallError> {
        if !enabled {
            tracing::warn!(
                "--firewall off: no forwarding confinement, no masquerade rules, no port restriction"
            );
            return Ok(Setup::Off);
        }
        clean_up(fw.as_ref(), &policy.iface);
        match Guard::apply(fw, policy) {
            Ok(g) => Ok(Setup::Guarded(g)),
            Err(FirewallError::Unsupported(e)) => {
                tracing::warn!(
                    "nftables is not available here ({e}); the userspace device itself drops packets between the tunnel and other networks, and masquerading and --allow-from are off"
                );
                let mut nets = tunnel_nets.to_vec();
                nets.extend(policy.routes.iter().copied());
                Ok(Setup::Fallback(nets))
            }
            Err(e) => Err(e),
        }
    }

    /// What the userspace device must drop by itself.
    pub fn confine(&self) -> Option<Vec<IpNetwork>> {
        match self {
            Setup::Fallback(nets) => Some(nets.clone()),
            _ => None,
        }
    }

    pub fn guard(&mut self) -> Option<&mut Guard> {
        match self {
            Setup::Guarded(g) => Some(g),
            _ => None,
        }
    }

    /// Removes what it added.
    pub fn remove(self) {
        if let Setup::Guarded(g) = self {
            g.remove();
        }
    }
}

/// Removes what a crashed run with this interface left (the table is
/// replaced anyway; Docker's chain is not ours to replace).
pub fn clean_up(fw: &dyn Firewall, iface: &str) {
    let name = table_name(iface);
    let _ = fw.close_docker(&name);
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
    }

    impl Firewall for FakeFirewall {
        fn apply(&self, table: &Table) -> Result<(), FirewallError> {
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

        fn docker_open(&self, tag: &str) -> Result<bool, FirewallError> {
            Ok(self
                .docker
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|c| c.iter().any(|(t, _)| t == tag)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeFirewall;
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn the_hub_forwards_only_between_its_tunnel_peers() {
        let (t, docker) = plan(&Policy {
            iface: "wg-tunnel".into(),
            hub: true,
            ..Default::default()
        });
        assert_eq!(t.name, "tunnel-wg-tunnel");
        assert_eq!(t.chains.len(), 1);
        let chain = &t.chains[0];
        assert_eq!(chain.hook, Hook::Forward);
        assert!(chain.priority < 0, "before Docker's filter rules");
        // First match wins: tunnel to tunnel is accepted, then anything
        // else in or out of the tunnel is dropped.
        assert_eq!(chain.rules[0].action, Action::Accept);
        assert_eq!(chain.rules[0].matches.len(), 2);
        assert!(chain.rules[1..].iter().all(|r| r.action == Action::Drop));
        assert_eq!(docker.rules, vec![chain.rules[0].clone()]);
    }

    #[test]
    fn a_gateway_site_opens_its_routes_only_and_masquerades_towards_them() {
        let (t, docker) = plan(&Policy {
            iface: "wg0".into(),
            hub: false,
            routes: vec![net("192.168.7.0/24"), net("fd00:7::/64")],
            masquerade: true,
            ..Default::default()
        });
        let fwd = &t.chains[0].rules;
        assert!(
            !fwd.iter()
                .any(|r| r.matches
                    == vec![Match::InIface("wg0".into()), Match::OutIface("wg0".into())]),
            "a site does not relay tunnel to tunnel"
        );
        assert!(fwd.contains(&rule(
            vec![
                Match::InIface("wg0".into()),
                Match::DstNet(net("192.168.7.0/24"))
            ],
            Action::Accept
        )));
        assert_eq!(fwd.last().unwrap().action, Action::Drop);
        let nat = t.chains.iter().find(|c| c.kind == "nat").unwrap();
        assert_eq!(nat.hook, Hook::Postrouting);
        assert_eq!(nat.rules.len(), 2);
        assert!(nat.rules.iter().all(|r| r.action == Action::Masquerade));
        // Docker's chains are IPv4 only.
        assert_eq!(docker.rules.len(), 2);
    }

    #[test]
    fn the_listen_port_is_restricted_when_asked() {
        let (t, _) = plan(&Policy {
            iface: "wg0".into(),
            hub: true,
            listen: Some((
                vec![Port::Udp(51820), Port::Tcp(443)],
                vec![net("198.51.100.0/24"), net("203.0.113.9/32")],
            )),
            ..Default::default()
        });
        let input = t.chains.iter().find(|c| c.hook == Hook::Input).unwrap();
        assert_eq!(input.rules.len(), 6);
        assert_eq!(
            input.rules[2],
            rule(vec![Match::UdpDport(51820)], Action::Drop)
        );
        // The WebSocket listener too.
        assert_eq!(
            input.rules[3],
            rule(
                vec![Match::TcpDport(443), Match::SrcNet(net("198.51.100.0/24"))],
                Action::Accept
            )
        );
        assert_eq!(
            input.rules[5],
            rule(vec![Match::TcpDport(443)], Action::Drop)
        );
    }

    #[test]
    fn peers_reach_the_hub_host_at_its_tunnel_routed_and_uplink_addresses_only() {
        let (t, _) = plan(&Policy {
            iface: "wg0".into(),
            hub: true,
            routes: vec![net("192.168.70.0/24")],
            input: Some(HubInput {
                tunnel: vec![net("10.77.0.0/24")],
                uplinks: vec!["198.51.100.1".parse().unwrap()],
            }),
            ..Default::default()
        });
        let input = t.chains.iter().find(|c| c.hook == Hook::Input).unwrap();
        let accepted: Vec<&Match> = input
            .rules
            .iter()
            .filter(|r| r.action == Action::Accept)
            .map(|r| &r.matches[1])
            .collect();
        assert_eq!(
            accepted,
            [
                &Match::DstNet(net("10.77.0.0/24")),
                &Match::DstNet(net("192.168.70.0/24")),
                &Match::DstNet(net("198.51.100.1/32")),
            ]
        );
        assert_eq!(
            input.rules.last().unwrap(),
            &rule(vec![Match::InIface("wg0".into())], Action::Drop)
        );
        // A site keeps its host to itself: no input rules.
        let (t, _) = plan(&Policy {
            iface: "wg0".into(),
            ..Default::default()
        });
        assert!(t.chains.iter().all(|c| c.hook != Hook::Input));
    }

    #[test]
    fn snat_public_sites_get_their_public_source_for_the_hubs_own_addresses_only() {
        let site: std::net::IpAddr = "10.77.0.2".parse().unwrap();
        let public: std::net::IpAddr = "198.51.100.1".parse().unwrap();
        let (t, _) = plan(&Policy {
            iface: "wg0".into(),
            hub: true,
            snat: vec![
                Snat {
                    site,
                    public,
                    subnet: net("10.77.0.0/24"),
                },
                // Families that do not match are left out.
                Snat {
                    site,
                    public: "2001:db8::1".parse().unwrap(),
                    subnet: net("10.77.0.0/24"),
                },
            ],
            ..Default::default()
        });
        let snat = t.chains.iter().find(|c| c.name == "snat").unwrap();
        assert_eq!((snat.hook, snat.kind), (Hook::Input, "nat"));
        assert_eq!(
            snat.rules,
            [rule(
                vec![
                    Match::InIface("wg0".into()),
                    Match::SrcNet(net("10.77.0.2/32")),
                    Match::NotDstNet(net("10.77.0.0/24")),
                ],
                Action::Snat(public)
            )]
        );
        let (t, _) = plan(&Policy {
            iface: "wg0".into(),
            hub: true,
            ..Default::default()
        });
        assert!(t.chains.iter().all(|c| c.name != "snat"));
    }

    #[test]
    fn the_guard_repairs_a_flushed_ruleset_and_removes_all_on_exit() {
        let fw = std::sync::Arc::new(FakeFirewall::default());
        *fw.docker.lock().unwrap() = Some(vec![]);
        struct Shared(std::sync::Arc<FakeFirewall>);
        impl Firewall for Shared {
            fn apply(&self, t: &Table) -> Result<(), FirewallError> {
                self.0.apply(t)
            }
            fn remove(&self, n: &str) -> Result<(), FirewallError> {
                self.0.remove(n)
            }
            fn exists(&self, n: &str) -> Result<bool, FirewallError> {
                self.0.exists(n)
            }
            fn open_docker(&self, f: &Foreign) -> Result<bool, FirewallError> {
                self.0.open_docker(f)
            }
            fn close_docker(&self, t: &str) -> Result<(), FirewallError> {
                self.0.close_docker(t)
            }
            fn docker_open(&self, t: &str) -> Result<bool, FirewallError> {
                self.0.docker_open(t)
            }
        }
        let policy = Policy {
            iface: "wg0".into(),
            hub: true,
            ..Default::default()
        };
        let mut g = Guard::apply(Box::new(Shared(fw.clone())), &policy).unwrap();
        assert!(fw.exists("tunnel-wg0").unwrap() && fw.docker_open("tunnel-wg0").unwrap());
        assert!(!g.repair().unwrap(), "nothing to repair");
        // nft flush ruleset: both gone.
        fw.tables.lock().unwrap().clear();
        fw.docker.lock().unwrap().as_mut().unwrap().clear();
        assert!(g.repair().unwrap());
        assert!(fw.exists("tunnel-wg0").unwrap() && fw.docker_open("tunnel-wg0").unwrap());
        g.update(&Policy {
            routes: vec![net("192.168.7.0/24")],
            ..policy
        })
        .unwrap();
        assert_eq!(fw.docker.lock().unwrap().as_ref().unwrap().len(), 3);
        g.remove();
        assert!(!fw.exists("tunnel-wg0").unwrap());
        assert!(fw.docker.lock().unwrap().as_ref().unwrap().is_empty());
    }
}
