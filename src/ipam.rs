//! Address allocation inside the tunnel subnet.
//!
//! The server takes the first host address; joined endpoints get the lowest
//! free host address after it. IPv4 skips the network and broadcast
//! addresses; IPv6 skips only the subnet-router anycast address (`::0`).

use ipnetwork::IpNetwork;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error("subnet {0} is too small: it needs room for the server and at least one peer")]
    TooSmall(IpNetwork),
    #[error("subnet {0} has no free address left (all {1} host addresses are allocated)")]
    Exhausted(IpNetwork, u128),
    #[error("subnet {0} is not a network address (did you mean {1}?)")]
    NotNetwork(IpNetwork, IpNetwork),
}

/// A tunnel subnet and the addresses taken in it.
#[derive(Debug, Clone)]
pub struct Pool {
    subnet: IpNetwork,
    taken: BTreeSet<IpAddr>,
}

impl Pool {
    /// Checks that `subnet` is a network address with room for a server and a peer.
    pub fn new(subnet: IpNetwork) -> Result<Self, IpamError> {
        let normalized = IpNetwork::new(subnet.network(), subnet.prefix()).expect("same prefix");
        if normalized.ip() != subnet.ip() {
            return Err(IpamError::NotNetwork(subnet, normalized));
        }
        if host_count(subnet) < 2 {
            return Err(IpamError::TooSmall(subnet));
        }
        Ok(Self {
            subnet,
            taken: BTreeSet::new(),
        })
    }

    pub fn subnet(&self) -> IpNetwork {
        self.subnet
    }

    /// The server's own tunnel address: the first host address.
    pub fn server_address(&self) -> IpAddr {
        nth(self.subnet, 1)
    }

    /// Marks an address as taken (peers and invites loaded from state).
    pub fn reserve(&mut self, addr: IpAddr) {
        self.taken.insert(addr);
    }

    pub fn release(&mut self, addr: IpAddr) {
        self.taken.remove(&addr);
    }

    pub fn contains_host(&self, addr: IpAddr) -> bool {
        self.subnet.contains(addr) && {
            let off = offset(self.subnet, addr);
            off >= 1 && off <= host_count(self.subnet)
        }
    }

    /// The lowest free host address after the server's, reserved on return.
    pub fn allocate(&mut self) -> Result<IpAddr, IpamError> {
        let hosts = host_count(self.subnet);
        for i in 2..=hosts {
            let addr = nth(self.subnet, i);
            if !self.taken.contains(&addr) {
                self.taken.insert(addr);
                return Ok(addr);
            }
        }
        Err(IpamError::Exhausted(self.subnet, hosts))
    }
}

/// Number of usable host addresses (offsets `1..=count`).
fn host_count(subnet: IpNetwork) -> u128 {
    match subnet {
        IpNetwork::V4(n) => {
            let size = 1u128 << (32 - n.prefix() as u32);
            size.saturating_sub(2)
        }
        IpNetwork::V6(n) => {
            let bits = 128 - n.prefix() as u32;
            if bits >= 127 {
                u128::MAX / 2
            } else {
                (1u128 << bits) - 1
            }
        }
    }
}

fn nth(subnet: IpNetwork, i: u128) -> IpAddr {
    match subnet {
        IpNetwork::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) + i as u32)),
        IpNetwork::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) + i)),
    }
}

fn offset(subnet: IpNetwork, addr: IpAddr) -> u128 {
    match (subnet, addr) {
        (IpNetwork::V4(n), IpAddr::V4(a)) => (u32::from(a) - u32::from(n.network())) as u128,
        (IpNetwork::V6(n), IpAddr::V6(a)) => u128::from(a) - u128::from(n.network()),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn server_first_then_peers_in_order() {
        let mut p = Pool::new(net("10.77.0.0/24")).unwrap();
        assert_eq!(p.server_address().to_string(), "10.77.0.1");
        assert_eq!(p.allocate().unwrap().to_string(), "10.77.0.2");
        assert_eq!(p.allocate().unwrap().to_string(), "10.77.0.3");
        p.release("10.77.0.2".parse().unwrap());
        assert_eq!(p.allocate().unwrap().to_string(), "10.77.0.2");
        assert_eq!(p.allocate().unwrap().to_string(), "10.77.0.4");
    }

    #[test]
    fn reserved_addresses_are_skipped() {
        let mut p = Pool::new(net("10.77.0.0/24")).unwrap();
        p.reserve("10.77.0.2".parse().unwrap());
        assert_eq!(p.allocate().unwrap().to_string(), "10.77.0.3");
    }

    #[test]
    fn exhaustion_is_reported() {
        // /29: hosts .1-.6; server .1, peers .2-.6.
        let mut p = Pool::new(net("10.9.0.0/29")).unwrap();
        for want in 2..=6 {
            assert_eq!(p.allocate().unwrap().to_string(), format!("10.9.0.{want}"));
        }
        assert_eq!(
            p.allocate(),
            Err(IpamError::Exhausted(net("10.9.0.0/29"), 6))
        );
    }

    #[test]
    fn tiny_and_unaligned_subnets_are_refused() {
        assert!(matches!(
            Pool::new(net("10.9.0.0/31")),
            Err(IpamError::TooSmall(_))
        ));
        assert!(matches!(
            Pool::new(net("10.9.0.0/32")),
            Err(IpamError::TooSmall(_))
        ));
        assert!(matches!(
            Pool::new(net("10.9.0.5/24")),
            Err(IpamError::NotNetwork(..))
        ));
        assert!(Pool::new(net("10.9.0.0/30")).is_ok());
    }

    #[test]
    fn ipv6_ula() {
        let mut p = Pool::new(net("fd00:77::/64")).unwrap();
        assert_eq!(p.server_address().to_string(), "fd00:77::1");
        assert_eq!(p.allocate().unwrap().to_string(), "fd00:77::2");
        assert!(p.contains_host("fd00:77::2".parse().unwrap()));
        assert!(!p.contains_host("fd00:78::2".parse().unwrap()));
    }
}
