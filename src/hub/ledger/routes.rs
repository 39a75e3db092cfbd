//! The LANs behind sites: what a site may advertise, what the hub operator
//! approved, and what takes effect. A route takes effect only within an
//! approval, and never where it would capture the hub's own networks, a
//! node's underlay address (the tunnel would swallow its own packets) or
//! the tunnel itself, whatever was approved.

use super::{Advertised, Ledger};
use crate::state::{PeerRecord, covered};
use ipnetwork::IpNetwork;
use std::net::IpAddr;

/// Why advertised routes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("{0} is not an admitted site")]
    NotASite(IpAddr),
    #[error("route {0} is not a network address (did you mean {1}?)")]
    NotNetwork(IpNetwork, IpNetwork),
    #[error(
        "route {0} is the whole internet: advertise the LANs behind a site, not a default route"
    )]
    Default(IpNetwork),
    #[error("route {0} overlaps the tunnel's subnet {1}")]
    Tunnel(IpNetwork, IpNetwork),
    #[error("route {route} overlaps {other}, which {owner} advertises")]
    Taken {
        route: IpNetwork,
        other: IpNetwork,
        owner: String,
    },
    #[error("at most {MAX_ROUTES} routes per site")]
    TooMany,
    #[error("route {0} is a loopback, link-local, multicast or unspecified range")]
    Special(IpNetwork),
    #[error("route {0} overlaps {1}, a network of the hub's own host")]
    HubNetwork(IpNetwork, IpNetwork),
    #[error("route {0} covers {1}, the address a node reaches the hub from")]
    Underlay(IpNetwork, IpAddr),
    #[error("no site is named or addressed {0:?}")]
    UnknownSite(String),
    #[error("{0} is a road warrior (tunnel peer add): only sites advertise LANs")]
    RoadWarrior(String),
    #[error("{site} neither advertises nor is approved for anything within {prefix}")]
    NothingToReject { site: String, prefix: IpNetwork },
}

/// Routes one site (or the hub) may advertise.
pub use crate::ipam::MAX_LANS as MAX_ROUTES;

use crate::ipam::{overlaps, special};

/// The network of an address with its prefix (`10.1.2.3/24` -> `10.1.2.0/24`).
fn network_of(n: &IpNetwork) -> IpNetwork {
    IpNetwork::new(n.network(), n.prefix()).expect("same prefix")
}

/// What a list of routes must be by itself: network addresses, no default
/// route, clear of the tunnel's `subnet` and of each other.
pub fn validate_routes(routes: &[IpNetwork], subnets: &[IpNetwork]) -> Result<(), RouteError> {
    use crate::ipam::LanError as L;
    crate::ipam::check_lans(routes, subnets).map_err(|e| match e {
        L::TooMany => RouteError::TooMany,
        L::NotNetwork(r, n) => RouteError::NotNetwork(r, n),
        L::Default(r) => RouteError::Default(r),
        L::Special(r) => RouteError::Special(r),
        L::Tunnel(r, s) => RouteError::Tunnel(r, s),
        L::Twin(route, other) => RouteError::Taken {
            route,
            other,
            owner: "this same list".to_owned(),
        },
    })
}

/// What decides which of a site's advertised LANs take effect, computed
/// once for a pass over all peers.
pub(super) struct RouteFilter<'a> {
    host: &'a [IpNetwork],
    underlay: std::collections::BTreeSet<IpAddr>,
}

impl RouteFilter<'_> {
    /// Whatever the approval: not the hub's networks, not a node's
    /// underlay address.
    pub(super) fn check(&self, r: &IpNetwork) -> Result<(), RouteError> {
        if let Some(h) = self.host.iter().find(|h| overlaps(r, h)) {
            return Err(RouteError::HubNetwork(*r, *h));
        }
        if let Some(a) = self.underlay.iter().find(|a| r.contains(**a)) {
            return Err(RouteError::Underlay(*r, *a));
        }
        Ok(())
    }

    /// The routes of `p` that take effect: approved and allowed.
    pub(super) fn effective(&self, p: &PeerRecord) -> Vec<IpNetwork> {
        p.routes
            .iter()
            .filter(|r| covered(p.approved(), r) && self.check(r).is_ok())
            .copied()
            .collect()
    }
}

impl Ledger {
    /// The hub host's own addresses with their prefixes: no site may
    /// advertise a LAN that overlaps them.
    pub fn set_host_networks(&mut self, nets: &[IpNetwork]) {
        self.host = self.host_view(nets);
    }

    /// Whether `nets` would change what [`Ledger::set_host_networks`] holds.
    pub fn host_networks_differ(&self, nets: &[IpNetwork]) -> bool {
        self.host != self.host_view(nets)
    }

    fn host_view(&self, nets: &[IpNetwork]) -> Vec<IpNetwork> {
        let mut host: Vec<IpNetwork> = nets
            .iter()
            .map(network_of)
            // The tunnel's subnets are checked on their own; loopback is special.
            .filter(|n| !self.state.subnets().all().iter().any(|s| overlaps(n, s)) && !special(n))
            .collect();
        host.sort();
        host.dedup();
        host
    }

    /// Underlay addresses the device sees peers at (live endpoints).
    pub fn note_underlay(&mut self, addrs: impl IntoIterator<Item = IpAddr>) {
        self.seen.extend(addrs);
    }

    pub(super) fn route_filter(&self) -> RouteFilter<'_> {
        let underlay = self
            .state
            .peers
            .iter()
            .filter_map(|p| p.endpoint)
            .filter(|e| !crate::transport::is_virtual(e))
            .map(|e| e.ip())
            .chain(self.seen.iter().copied())
            .collect();
        RouteFilter {
            host: &self.host,
            underlay,
        }
    }

    /// The advertised LANs of the site at `site` that wait for the hub
    /// operator (or that the hub refuses now).
    pub fn pending_routes(&self, site: IpAddr) -> Vec<IpNetwork> {
        let Some(p) = self.site(site) else {
            return vec![];
        };
        let on = self.route_filter().effective(p);
        p.routes
            .iter()
            .filter(|r| !on.contains(r))
            .copied()
            .collect()
    }

    /// A peer's advertised LANs that take effect.
    pub fn effective_routes(&self, p: &PeerRecord) -> Vec<IpNetwork> {
        self.route_filter().effective(p)
    }

    /// Checks `routes` for `owner` (a site's address, or `None` for the
    /// hub): network addresses, not the tunnel, not another's.
    fn check_routes(&self, owner: Option<IpAddr>, routes: &[IpNetwork]) -> Result<(), RouteError> {
        validate_routes(routes, &self.state.subnets().all())?;
        if owner.is_some() {
            let filter = self.route_filter();
            for r in routes {
                filter.check(r)?;
            }
        }
        let mut others: Vec<(IpNetwork, String)> = Vec::new();
        if owner.is_some() {
            others.extend(self.state.routes.iter().map(|r| (*r, "the hub".to_owned())));
        }
        for p in self.state.peers.iter().filter(|p| Some(p.address) != owner) {
            let who = match &p.name {
                Some(n) => format!("site {n} ({})", p.address),
                None => format!("site {}", p.address),
            };
            others.extend(p.routes.iter().map(|r| (*r, who.clone())));
        }
        for r in routes {
            if let Some((other, owner)) = others.iter().find(|(o, _)| overlaps(r, o)) {
                return Err(RouteError::Taken {
                    route: *r,
                    other: *other,
                    owner: owner.clone(),
                });
            }
        }
        Ok(())
    }

    /// The LANs behind the site at `site` are now `routes`; they take
    /// effect where approved ([`Ledger::approve`]).
    pub fn advertise(&mut self, site: IpAddr, routes: Vec<IpNetwork>) -> Result<(), RouteError> {
        if self.site(site).is_none() {
            return Err(RouteError::NotASite(site));
        }
        self.check_routes(Some(site), &routes)?;
        let p = self
            .state
            .peers
            .iter()
            .position(|p| p.address == site && p.via.is_none())
            .expect("checked above");
        if self.state.peers[p].routes != routes {
            self.state_mut().peers[p].routes = routes;
        }
        Ok(())
    }

    /// Whether the site at `site` wants its public source address on what
    /// it sends to the hub's own addresses.
    pub fn set_snat_public(&mut self, site: IpAddr, on: bool) -> Result<(), RouteError> {
        let p = self
            .state
            .peers
            .iter()
            .position(|p| p.address == site && p.via.is_none())
            .ok_or(RouteError::NotASite(site))?;
        if self.state.peers[p].snat_public != on {
            self.state_mut().peers[p].snat_public = on;
        }
        Ok(())
    }

    /// The hub's own LANs (`serve --route`).
    pub fn set_hub_routes(&mut self, routes: Vec<IpNetwork>) -> Result<(), RouteError> {
        self.check_routes(None, &routes)?;
        if self.state.routes != routes {
            self.state_mut().routes = routes;
        }
        Ok(())
    }

    /// Every LAN in effect: the hub's, then the sites' approved ones.
    pub fn advertised(&self) -> Vec<Advertised> {
        let hub = self.server_address();
        let filter = self.route_filter();
        self.state
            .routes
            .iter()
            .map(|r| Advertised {
                prefix: *r,
                via: hub,
            })
            .chain(
                self.state
                    .peers
                    .iter()
                    .filter(|p| !p.routes.is_empty())
                    .flat_map(|p| {
                        filter.effective(p).into_iter().map(|r| Advertised {
                            prefix: r,
                            via: p.address,
                        })
                    }),
            )
            .collect()
    }

    /// The LANs behind sites in effect: the hub routes them into the tunnel.
    pub fn site_routes(&self) -> std::collections::BTreeSet<IpNetwork> {
        let filter = self.route_filter();
        self.state
            .peers
            .iter()
            .filter(|p| !p.routes.is_empty())
            .flat_map(|p| filter.effective(p))
            .collect()
    }

    /// The site named or addressed `target`.
    fn find_site(&self, target: &str) -> Result<usize, RouteError> {
        let addr: Option<IpAddr> = target.parse().ok();
        let hits: Vec<usize> = self
            .state
            .peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.via.is_none())
            .filter(|(_, p)| match addr {
                Some(a) => p.address == a,
                None => p.name.as_deref() == Some(target),
            })
            .map(|(i, _)| i)
            .collect();
        match hits.as_slice() {
            [i] if self.state.peers[*i].road_warrior => {
                Err(RouteError::RoadWarrior(target.to_owned()))
            }
            [i] => Ok(*i),
            _ => Err(RouteError::UnknownSite(target.to_owned())),
        }
    }

    /// The hub operator allows the site `target` to advertise LANs within
    /// `prefix` (`tunnel route approve`). Refused, whatever the operator
    /// says, where no site could have it ([`validate_routes`], the hub's
    /// own networks, nodes' underlay addresses) or another has it.
    /// Returns the site's address.
    pub fn approve(&mut self, target: &str, prefix: IpNetwork) -> Result<IpAddr, RouteError> {
        let i = self.find_site(target)?;
        let site = self.state.peers[i].address;
        self.check_routes(Some(site), &[prefix])?;
        let p = &self.state.peers[i];
        if !covered(p.approved(), &prefix) {
            let mut approved: Vec<IpNetwork> = p
                .approved()
                .iter()
                .filter(|a| !covered(&[prefix], a))
                .copied()
                .collect();
            approved.push(prefix);
            self.state_mut().peers[i].approved = Some(approved);
        }
        Ok(site)
    }

    /// Withdraws what the site `target` advertises or was approved for
    /// within `prefix` (`tunnel route reject`). Returns the site's address.
    pub fn reject(&mut self, target: &str, prefix: IpNetwork) -> Result<IpAddr, RouteError> {
        let i = self.find_site(target)?;
        let p = &self.state.peers[i];
        let within = |r: &IpNetwork| covered(&[prefix], r);
        if !p.routes.iter().any(within) && !p.approved().iter().any(within) {
            return Err(RouteError::NothingToReject {
                site: target.to_owned(),
                prefix,
            });
        }
        let routes = p.routes.iter().filter(|r| !within(r)).copied().collect();
        let approved = p
            .approved()
            .iter()
            .filter(|r| !within(r))
            .copied()
            .collect();
        let site = p.address;
        let p = &mut self.state_mut().peers[i];
        p.routes = routes;
        p.approved = Some(approved);
        Ok(site)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ledger::testkit::*;

    #[test]
    fn advertised_lans_take_effect_only_within_an_approval() {
        let mut l = ledger();
        let (a, _) = site(&mut l, Some("a"));
        l.advertise(a, vec![net("192.168.50.0/24"), net("192.168.60.0/24")])
            .unwrap();
        assert!(routed(&l).is_empty(), "nothing approved yet");
        assert_eq!(l.pending_routes(a).len(), 2);
        assert!(l.desired().values().all(|p| p.allowed_ips.len() <= 1));
        // By name, a wider prefix covers the narrower one asked for.
        l.approve("a", net("192.168.48.0/21")).unwrap();
        assert_eq!(routed(&l), [net("192.168.50.0/24")]);
        assert_eq!(l.pending_routes(a), [net("192.168.60.0/24")]);
        assert_eq!(l.advertised().len(), 1);
        // By address.
        l.approve(&a.to_string(), net("192.168.60.0/24")).unwrap();
        assert_eq!(routed(&l).len(), 2);
        // Rejecting withdraws the route and its approval.
        l.reject("a", net("192.168.60.0/24")).unwrap();
        assert_eq!(routed(&l), [net("192.168.50.0/24")]);
        assert_eq!(l.state().peers[0].routes, [net("192.168.50.0/24")]);
        assert!(matches!(
            l.reject("a", net("10.9.0.0/16")),
            Err(RouteError::NothingToReject { .. })
        ));
        assert!(matches!(
            l.approve("nobody", net("10.9.0.0/16")),
            Err(RouteError::UnknownSite(_))
        ));
    }

    #[test]
    fn no_approval_gives_a_site_the_hubs_networks_a_nodes_underlay_or_the_tunnel() {
        let mut l = ledger();
        l.set_host_networks(&[
            net("192.168.1.5/24"),
            net("10.77.0.1/24"),
            net("127.0.0.1/8"),
        ]);
        let (a, _) = site(&mut l, Some("a"));
        let (b, kb) = site(&mut l, Some("b"));
        // b is seen at 198.51.100.7.
        l.record_endpoints(&[PeerStatus {
            public_key: kb,
            endpoint: Some("198.51.100.7:40000".parse().unwrap()),
            allowed_ips: vec![],
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            keepalive: None,
        }]);
        for (prefix, want) in [
            ("198.51.100.7/32", "the address a node reaches the hub from"),
            ("198.51.100.0/24", "the address a node reaches the hub from"),
            ("192.168.1.0/24", "a network of the hub's own host"),
            ("192.168.1.128/25", "a network of the hub's own host"),
            ("192.168.0.0/16", "a network of the hub's own host"),
            ("10.77.0.0/16", "overlaps the tunnel's subnet"),
            ("0.0.0.0/0", "whole internet"),
            ("127.0.0.0/8", "loopback"),
            ("224.0.0.0/8", "multicast"),
        ] {
            let err = l.approve("a", net(prefix)).unwrap_err().to_string();
            assert!(err.contains(want), "{prefix}: {err}");
            let err = l.advertise(a, vec![net(prefix)]).unwrap_err().to_string();
            assert!(err.contains(want), "{prefix}: {err}");
        }
        assert!(l.state().peers.iter().all(|p| p.approved().is_empty()));
        // A token cannot approve them in advance either.
        let err = l
            .mint(
                &MintRequest {
                    count: 1,
                    ttl: Duration::from_secs(60),
                    endpoint_hint: None,
                    name: None,
                    routes: vec![net("192.168.1.0/24")],
                },
                t0(),
            )
            .unwrap_err();
        assert!(
            matches!(err, MintError::Routes(RouteError::HubNetwork(..))),
            "{err}"
        );
        // A route saved before a node was seen inside it stops taking effect.
        l.advertise(b, vec![net("203.0.113.0/24")]).unwrap();
        l.approve("b", net("203.0.113.0/24")).unwrap();
        assert_eq!(routed(&l), [net("203.0.113.0/24")]);
        l.note_underlay([ip("203.0.113.9")]);
        assert!(routed(&l).is_empty());
        assert_eq!(l.pending_routes(b), [net("203.0.113.0/24")]);
    }

    #[test]
    fn a_saved_state_from_before_approvals_keeps_its_routes() {
        let mut l = ledger();
        let (a, _) = site(&mut l, Some("a"));
        l.advertise(a, vec![net("192.168.50.0/24")]).unwrap();
        let mut old = l.state().clone();
        old.peers[0].approved = None;
        let l = Ledger::new(old, 2).unwrap();
        assert_eq!(routed(&l), [net("192.168.50.0/24")]);
        assert_eq!(l.state().peers[0].approved(), [net("192.168.50.0/24")]);
    }
}
