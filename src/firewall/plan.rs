//! The rules that carry out a [`Policy`], as plain data: pure, so that
//! every decision about what a host lets through is tested without root.
//! Within a chain the first match wins: accepts come before the drop that
//! closes what they leave out.

use super::{Action, Chain, Foreign, Hook, Match, Policy, Port, Rule, Table, table_name};
use crate::ipam::host_net;

fn rule(matches: Vec<Match>, action: Action) -> Rule {
    Rule { matches, action }
}

/// The tables and rules that carry out `p`.
pub fn plan(p: &Policy) -> (Table, Foreign) {
    let accepts = forward_accepts(p);
    let mut chains = vec![forward(p, &accepts)];
    chains.extend(masquerade(p));
    chains.extend(snat(p));
    chains.extend(input(p));
    let table = Table {
        name: table_name(&p.iface),
        chains,
    };
    let foreign = docker(&table.name, accepts);
    (table, foreign)
}

/// What may be forwarded through the tunnel: between a hub's peers, and
/// between the tunnel and the LANs this host advertises.
fn forward_accepts(p: &Policy) -> Vec<Rule> {
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
    accepts
}

/// The forward chain: `accepts`, then nothing else in or out of the
/// tunnel. Before Docker's filter rules (priority 0).
fn forward(p: &Policy, accepts: &[Rule]) -> Chain {
    let mut rules = accepts.to_vec();
    rules.push(rule(vec![Match::InIface(p.iface.clone())], Action::Drop));
    rules.push(rule(vec![Match::OutIface(p.iface.clone())], Action::Drop));
    Chain {
        name: "forward",
        hook: Hook::Forward,
        kind: "filter",
        priority: -1,
        rules,
    }
}

/// A gateway's masquerade: from the tunnel towards an advertised LAN.
fn masquerade(p: &Policy) -> Option<Chain> {
    if !p.masquerade || p.routes.is_empty() {
        return None;
    }
    let tun = || p.iface.clone();
    Some(Chain {
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
    })
}

/// `--snat-public` sites: what they send to this hub outside the tunnel's
/// subnet gets their public address. Entries whose families differ are
/// left out (NAT cannot change a packet's family).
fn snat(p: &Policy) -> Option<Chain> {
    let rules: Vec<Rule> = p
        .snat
        .iter()
        .filter(|s| {
            s.site.is_ipv4() == s.public.is_ipv4() && s.site.is_ipv4() == s.subnet.is_ipv4()
        })
        .map(|s| {
            rule(
                vec![
                    Match::InIface(p.iface.clone()),
                    Match::SrcNet(host_net(s.site)),
                    Match::NotDstNet(s.subnet),
                ],
                Action::Snat(s.public),
            )
        })
        .collect();
    // The seed's "firewall for endpoint B": NAT on input, undone on
    // the replies' way out, so that they still go through the tunnel.
    (!rules.is_empty()).then_some(Chain {
        name: "snat",
        hook: Hook::Input,
        kind: "nat",
        priority: 100,
        rules,
    })
}

/// The input chain: what peers may reach on a hub host, and who may send
/// to the listen ports; none when there is neither.
fn input(p: &Policy) -> Option<Chain> {
    let mut rules = hub_input(p);
    rules.extend(listen(p));
    (!rules.is_empty()).then_some(Chain {
        name: "input",
        hook: Hook::Input,
        kind: "filter",
        priority: -1,
        rules,
    })
}

/// A hub host: from the tunnel, its tunnel subnets, its routed LANs and
/// its uplink addresses only.
fn hub_input(p: &Policy) -> Vec<Rule> {
    let Some(input) = &p.input else {
        return vec![];
    };
    let open = input
        .tunnel
        .iter()
        .chain(&p.routes)
        .copied()
        .chain(input.uplinks.iter().map(|a| host_net(*a)));
    let mut rules: Vec<Rule> = open
        .map(|n| {
            rule(
                vec![Match::InIface(p.iface.clone()), Match::DstNet(n)],
                Action::Accept,
            )
        })
        .collect();
    rules.push(rule(vec![Match::InIface(p.iface.clone())], Action::Drop));
    rules
}

/// `--allow-from`: each listen port from those networks, and from nowhere
/// else.
fn listen(p: &Policy) -> Vec<Rule> {
    let Some((ports, allowed)) = &p.listen else {
        return vec![];
    };
    let mut rules = vec![];
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
    rules
}

/// The forwarding accepts again for Docker's FORWARD chains, tagged with
/// our table's name: each family's chain gets the rules that match no
/// network of the other family.
fn docker(tag: &str, accepts: Vec<Rule>) -> Foreign {
    let of = |v6: bool| -> Vec<Rule> {
        accepts
            .iter()
            .filter(|r| {
                !r.matches.iter().any(|m| {
                    matches!(m, Match::SrcNet(n) | Match::DstNet(n) | Match::NotDstNet(n) if n.is_ipv6() != v6)
                })
            })
            .cloned()
            .collect()
    };
    Foreign {
        tag: tag.to_owned(),
        rules: of(false),
        rules6: of(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::{HubInput, Snat};
    use ipnetwork::IpNetwork;

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
        // Tunnel to tunnel matches no network: both families.
        assert_eq!(docker.rules6, docker.rules);
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
        // Each family's rules go to Docker's chain of that family.
        assert_eq!(docker.rules.len(), 2);
        assert_eq!(docker.rules6.len(), 2);
        assert!(docker.rules6.iter().all(|r| {
            r.matches
                .iter()
                .all(|m| !matches!(m, Match::SrcNet(n) | Match::DstNet(n) if n.is_ipv4()))
        }));
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

    fn wg0(p: Policy) -> Policy {
        Policy {
            iface: "wg0".into(),
            ..p
        }
    }

    fn chain<'a>(t: &'a Table, name: &str) -> Option<&'a Chain> {
        t.chains.iter().find(|c| c.name == name)
    }

    #[test]
    fn a_site_without_routes_forwards_nothing_and_has_no_other_chain() {
        let (t, docker) = plan(&wg0(Policy {
            masquerade: true,
            ..Default::default()
        }));
        assert_eq!(t.chains.len(), 1, "{t:?}");
        assert_eq!(
            t.chains[0].rules,
            [
                rule(vec![Match::InIface("wg0".into())], Action::Drop),
                rule(vec![Match::OutIface("wg0".into())], Action::Drop),
            ]
        );
        // Masquerading with nothing to masquerade towards: no nat chain.
        assert!(chain(&t, "postrouting").is_none());
        assert!(docker.rules.is_empty());
        assert_eq!(docker.tag, "tunnel-wg0");
    }

    #[test]
    fn ipv6_routes_go_to_dockers_ipv6_chain_and_not_its_ipv4_one() {
        let v6 = net("fd00:7::/64");
        let (t, docker) = plan(&wg0(Policy {
            routes: vec![v6],
            ..Default::default()
        }));
        let fwd = &chain(&t, "forward").unwrap().rules;
        assert!(fwd.contains(&rule(
            vec![Match::OutIface("wg0".into()), Match::SrcNet(v6)],
            Action::Accept
        )));
        assert!(docker.rules.is_empty(), "{:?}", docker.rules);
        assert_eq!(docker.rules6.len(), 2, "{:?}", docker.rules6);
    }

    #[test]
    fn the_hub_hosts_rules_come_before_the_listen_ports_in_one_input_chain() {
        let (t, _) = plan(&wg0(Policy {
            hub: true,
            input: Some(HubInput {
                tunnel: vec![net("10.77.0.0/24"), net("fd00:77::/64")],
                uplinks: vec!["2001:db8::1".parse().unwrap()],
            }),
            listen: Some((vec![Port::Udp(51820)], vec![])),
            ..Default::default()
        }));
        let inputs: Vec<&Chain> = t.chains.iter().filter(|c| c.hook == Hook::Input).collect();
        assert_eq!(inputs.len(), 1);
        let from_tun = |n: &str| {
            rule(
                vec![Match::InIface("wg0".into()), Match::DstNet(net(n))],
                Action::Accept,
            )
        };
        assert_eq!(
            inputs[0].rules,
            [
                from_tun("10.77.0.0/24"),
                from_tun("fd00:77::/64"),
                // An uplink address is opened as itself, not its network.
                from_tun("2001:db8::1/128"),
                rule(vec![Match::InIface("wg0".into())], Action::Drop),
                // --allow-from with no network: the port is closed to all.
                rule(vec![Match::UdpDport(51820)], Action::Drop),
            ]
        );
    }

    #[test]
    fn an_ipv6_snat_site_gets_its_rule_like_an_ipv4_one() {
        let public: std::net::IpAddr = "2001:db8::9".parse().unwrap();
        let (t, _) = plan(&wg0(Policy {
            hub: true,
            snat: vec![Snat {
                site: "fd00:77::2".parse().unwrap(),
                public,
                subnet: net("fd00:77::/64"),
            }],
            ..Default::default()
        }));
        assert_eq!(
            chain(&t, "snat").unwrap().rules,
            [rule(
                vec![
                    Match::InIface("wg0".into()),
                    Match::SrcNet(net("fd00:77::2/128")),
                    Match::NotDstNet(net("fd00:77::/64")),
                ],
                Action::Snat(public)
            )]
        );
    }

    #[test]
    fn in_every_filter_chain_no_accept_comes_after_a_drop() {
        // Everything at once: first match wins, so an accept behind a
        // drop that matches more would never be reached.
        let (t, _) = plan(&wg0(Policy {
            hub: true,
            routes: vec![net("192.168.7.0/24"), net("fd00:7::/64")],
            masquerade: true,
            listen: Some((
                vec![Port::Udp(51820), Port::Tcp(443)],
                vec![net("198.51.100.0/24")],
            )),
            input: Some(HubInput {
                tunnel: vec![net("10.77.0.0/24")],
                uplinks: vec!["198.51.100.1".parse().unwrap()],
            }),
            ..Default::default()
        }));
        for c in t.chains.iter().filter(|c| c.kind == "filter") {
            assert_eq!(c.priority, -1, "{} runs after Docker's rules", c.name);
            for (i, r) in c.rules.iter().enumerate() {
                if r.action != Action::Drop {
                    continue;
                }
                for later in &c.rules[i + 1..] {
                    let shadowed = later.action == Action::Accept
                        && r.matches.iter().all(|m| later.matches.contains(m));
                    assert!(!shadowed, "{}: {later:?} is behind {r:?}", c.name);
                }
            }
        }
    }
}
