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
    #[error("--subnet6 {0} is not an IPv6 subnet")]
    NotIpv6(IpNetwork),
    #[error(
        "--subnet6 {0} is smaller than --subnet {1}: each IPv4 address gets its twin at the same offset; use a /96 or larger, e.g. a /64"
    )]
    Subnet6TooSmall(IpNetwork, IpNetwork),
    #[error("--subnet {0} is IPv6 already: an IPv6-only tunnel needs no --subnet6")]
    Ipv6Only(IpNetwork),
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

/// The tunnel's subnets: the main one (IPv4, or IPv6 for an IPv6-only
/// tunnel), and with dual stack an IPv6 one in which every endpoint has
/// the twin of its main address, at the same offset. Twins need no
/// bookkeeping of their own: the main pool allocates for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnets {
    pub main: IpNetwork,
    pub v6: Option<IpNetwork>,
}

impl Subnets {
    /// Checks that `v6` can hold a twin for every address of `main`.
    pub fn new(main: IpNetwork, v6: Option<IpNetwork>) -> Result<Self, IpamError> {
        if let Some(s6) = v6 {
            if main.is_ipv6() {
                return Err(IpamError::Ipv6Only(main));
            }
            if !s6.is_ipv6() {
                return Err(IpamError::NotIpv6(s6));
            }
            let normalized = IpNetwork::new(s6.network(), s6.prefix()).expect("same prefix");
            if normalized.ip() != s6.ip() {
                return Err(IpamError::NotNetwork(s6, normalized));
            }
            if s6.prefix() > 96 + main.prefix() {
                return Err(IpamError::Subnet6TooSmall(s6, main));
            }
        }
        Ok(Self { main, v6 })
    }

    /// The IPv6 twin of a main address.
    pub fn twin(&self, a: IpAddr) -> Option<IpAddr> {
        let s6 = self.v6?;
        Some(nth(s6, offset(self.main, a)))
    }

    /// An endpoint's interface addresses: `a` with the main prefix, and its twin.
    pub fn interface(&self, a: IpAddr) -> Vec<IpNetwork> {
        let mut out = vec![IpNetwork::new(a, self.main.prefix()).expect("prefix of the subnet")];
        if let (Some(s6), Some(t)) = (self.v6, self.twin(a)) {
            out.push(IpNetwork::new(t, s6.prefix()).expect("prefix of the subnet"));
        }
        out
    }

    /// An endpoint's addresses as allowed IPs: one host route per family.
    pub fn hosts(&self, a: IpAddr) -> Vec<IpNetwork> {
        std::iter::once(a)
            .chain(self.twin(a))
            .map(|a| IpNetwork::new(a, if a.is_ipv4() { 32 } else { 128 }).expect("host prefix"))
            .collect()
    }

    /// Both subnets, for a peer that routes the whole tunnel.
    pub fn all(&self) -> Vec<IpNetwork> {
        std::iter::once(self.main).chain(self.v6).collect()
    }

    /// Whether the tunnel carries IPv6.
    pub fn has_ipv6(&self) -> bool {
        self.main.is_ipv6() || self.v6.is_some()
    }
}

/// A random unique local /64 (RFC 4193: fd00::/8, 40 random bits of
/// global ID, subnet 0).
pub fn random_ula() -> IpNetwork {
    let mut id = [0u8; 5];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
    let mut b = [0u8; 16];
    b[0] = 0xfd;
    b[1..6].copy_from_slice(&id);
    IpNetwork::new(IpAddr::V6(Ipv6Addr::from(b)), 64).expect("a /64")
}

/// LANs one site (or the hub) may advertise.
pub const MAX_LANS: usize = 64;

/// Why a list of LANs is no good by itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LanError {
    #[error("at most {MAX_LANS} routes per site")]
    TooMany,
    #[error("route {0} is not a network address (did you mean {1}?)")]
    NotNetwork(IpNetwork, IpNetwork),
    #[error(
        "route {0} is the whole internet: advertise the LANs behind a site, not a default route"
    )]
    Default(IpNetwork),
    #[error("route {0} is a loopback, link-local, multicast or unspecified range")]
    Special(IpNetwork),
    #[error("route {0} overlaps the tunnel's subnet {1}")]
    Tunnel(IpNetwork, IpNetwork),
    #[error("route {0} overlaps {1}, in the same list")]
    Twin(IpNetwork, IpNetwork),
}

/// Whether two networks share an address.
pub fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

/// Ranges that are never a LAN behind a site: loopback, link-local,
/// multicast, the unspecified address.
pub fn special(r: &IpNetwork) -> bool {
    let specials: [&str; 7] = [
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "::1/128",
        "fe80::/10",
        "ff00::/8",
    ];
    specials
        .iter()
        .map(|s| s.parse::<IpNetwork>().expect("valid"))
        .any(|s| overlaps(r, &s))
        || r.network().is_unspecified()
}

/// What a list of LANs must be by itself: network addresses, no default
/// route, clear of the tunnel's `subnets` and of each other.
pub fn check_lans(routes: &[IpNetwork], subnets: &[IpNetwork]) -> Result<(), LanError> {
    if routes.len() > MAX_LANS {
        return Err(LanError::TooMany);
    }
    for (i, r) in routes.iter().enumerate() {
        let normal = IpNetwork::new(r.network(), r.prefix()).expect("same prefix");
        if normal.ip() != r.ip() {
            return Err(LanError::NotNetwork(*r, normal));
        }
        if r.prefix() == 0 {
            return Err(LanError::Default(*r));
        }
        if special(r) {
            return Err(LanError::Special(*r));
        }
        if let Some(s) = subnets.iter().find(|s| overlaps(r, s)) {
            return Err(LanError::Tunnel(*r, *s));
        }
        if let Some(twin) = routes[..i].iter().find(|o| overlaps(r, o)) {
            return Err(LanError::Twin(*r, *twin));
        }
    }
    Ok(())
}

/// The range a new hub's default subnet is drawn from: RFC 6598's shared
/// address space sits on no LAN (not in home routers, the clouds' default
/// networks, Docker's pools or Kubernetes'), which is why Tailscale uses it.
pub const DEFAULT_RANGE: &str = "100.64.0.0/10";
/// Where it is drawn from instead when the host already uses the shared
/// space (a Tailscale node, a host behind carrier-grade NAT), whose
/// other addresses are not all in the host's main table.
pub const FALLBACK_RANGE: &str = "10.0.0.0/8";

/// A random /24 of [`DEFAULT_RANGE`] (or [`FALLBACK_RANGE`]) that overlaps
/// none of `taken` (the host's addresses and routes): two hubs, or a hub
/// and a joined site, on one host rarely pick the same, and never one the
/// host already has. `None` when 256 draws found nothing free.
pub fn random_subnet(rng: &mut impl rand_core::RngCore, taken: &[IpNetwork]) -> Option<IpNetwork> {
    let overlap = overlaps;
    let shared: IpNetwork = DEFAULT_RANGE.parse().expect("valid");
    let range: IpNetwork = if taken.iter().any(|t| t.prefix() > 0 && overlap(t, &shared)) {
        FALLBACK_RANGE.parse().expect("valid")
    } else {
        shared
    };
    let IpNetwork::V4(r) = range else {
        unreachable!("IPv4 ranges")
    };
    let slots = 1u32 << (24 - r.prefix());
    (0..256).find_map(|_| {
        let base = u32::from(r.network()) + (rng.next_u32() % slots) * 256;
        let candidate = IpNetwork::new(IpAddr::V4(base.into()), 24).expect("a /24");
        (!taken
            .iter()
            .any(|t| t.prefix() > 0 && overlap(t, &candidate)))
        .then_some(candidate)
    })
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

/// The single-address network of a host: /32 or /128.
pub fn host_net(addr: IpAddr) -> IpNetwork {
    IpNetwork::new(addr, if addr.is_ipv4() { 32 } else { 128 }).expect("full prefix is valid")
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
    fn dual_stack_twins_sit_at_the_same_offset() {
        let s = Subnets::new(net("10.77.0.0/24"), Some(net("fd12:3456:789a:1::/64"))).unwrap();
        let a: IpAddr = "10.77.0.5".parse().unwrap();
        assert_eq!(s.twin(a).unwrap().to_string(), "fd12:3456:789a:1::5");
        assert_eq!(
            s.interface(a),
            vec![net("10.77.0.5/24"), net("fd12:3456:789a:1::5/64")]
        );
        assert_eq!(
            s.hosts(a),
            vec![net("10.77.0.5/32"), net("fd12:3456:789a:1::5/128")]
        );
        assert_eq!(s.all().len(), 2);
        let v4 = Subnets::new(net("10.77.0.0/24"), None).unwrap();
        assert_eq!(v4.hosts(a), vec![net("10.77.0.5/32")]);
        assert!(!v4.has_ipv6());
        assert!(Subnets::new(net("fd00::/64"), None).unwrap().has_ipv6());
    }

    #[test]
    fn bad_ipv6_subnets_are_refused() {
        let v4 = net("10.0.0.0/8");
        assert_eq!(
            Subnets::new(v4, Some(net("10.1.0.0/16"))),
            Err(IpamError::NotIpv6(net("10.1.0.0/16")))
        );
        assert!(matches!(
            Subnets::new(v4, Some(net("fd00::/120"))),
            Err(IpamError::Subnet6TooSmall(..))
        ));
        assert!(Subnets::new(v4, Some(net("fd00::/104"))).is_ok());
        assert!(matches!(
            Subnets::new(v4, Some(net("fd00::1/64"))),
            Err(IpamError::NotNetwork(..))
        ));
        assert!(matches!(
            Subnets::new(net("fd00::/64"), Some(net("fd01::/64"))),
            Err(IpamError::Ipv6Only(_))
        ));
    }

    /// A reproducible generator for the draws.
    struct XorShift(u64);

    impl rand_core::RngCore for XorShift {
        fn next_u32(&mut self) -> u32 {
            (self.next_u64() >> 32) as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            rand_core::impls::fill_bytes_via_next(self, dest);
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    #[test]
    fn a_default_subnet_is_a_free_24_of_the_shared_space() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let shared = net(DEFAULT_RANGE);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let s = random_subnet(&mut rng, &[net("0.0.0.0/0"), net("192.168.1.0/24")]).unwrap();
            assert_eq!(s.prefix(), 24);
            assert!(shared.contains(s.network()), "{s}");
            seen.insert(s);
        }
        assert!(seen.len() > 40, "draws repeat: {seen:?}");
        // A host already in the shared space (Tailscale) gets 10/8
        // instead, without what it has there.
        let mut taken = vec![net("100.101.102.103/32"), net("10.0.0.0/9")];
        for _ in 0..50 {
            let s = random_subnet(&mut rng, &taken).unwrap();
            assert!(net("10.128.0.0/9").contains(s.network()), "{s}");
        }
        taken.push(net("10.128.0.0/9"));
        assert_eq!(random_subnet(&mut rng, &taken), None);
    }

    #[test]
    fn random_ulas_are_unique_local_64s() {
        let (a, b) = (random_ula(), random_ula());
        assert_ne!(a, b);
        assert_eq!(a.prefix(), 64);
        assert!(a.to_string().starts_with("fd"), "{a}");
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
