//! The bounds of the hub's WebSocket listener ([`Limits`]) and the
//! accounting that keeps them: a connection takes a place in the total
//! and one in its source's count, and holds both ([`Admission`]) for its
//! whole life, upgraded or not.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Connections the hub's listener serves at once, at most.
const MAX_CONNECTIONS: usize = 4096;

/// The bounds of the hub's WebSocket listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections at once, upgraded or not; further ones wait in the
    /// kernel's backlog, holding none of our descriptors.
    pub total: usize,
    /// Connections at once from one address (an IPv6 /64 counts as one
    /// address); further ones are closed at once, so that one host
    /// cannot take the places of all others.
    pub per_source: usize,
    /// The same from a loopback address: a reverse proxy on this host
    /// (`--public-url`) makes every link come from there.
    pub per_loopback: usize,
    /// From accept to the upgrade (TLS, the request, the answer).
    pub handshake: Duration,
    /// The hub pings each link this often...
    pub ping_every: Duration,
    /// ...and closes one that sent nothing, not even a pong, for this long.
    pub idle: Duration,
}

impl Limits {
    /// For this process. The total leaves half the descriptors to the
    /// rest of the hub (tunnels, control connections, state files): with
    /// the 1,024 that services get when nothing raised the limit, 512.
    ///
    /// 128 per address: a site opens one link, and one for each of its
    /// containers, at most 1 + 64 (`--endpoints-per-site`'s default), so
    /// two full sites fit behind one NAT address, while one address holds
    /// at most 1/32 of 4,096 places. Loopback gets the total: a reverse proxy
    /// on this host carries every site's links. A proxy on another
    /// address gets 128 like any other address.
    ///
    /// Idle: sites ping every 15 s and answer the hub's pings, so 60 s of
    /// silence is a dead link or a client that only holds a place.
    pub fn hub() -> Self {
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX))
            .unwrap_or(1024);
        Self::for_descriptors(nofile)
    }

    /// [`Limits::hub`] for a process that may open `nofile` descriptors.
    fn for_descriptors(nofile: usize) -> Self {
        let total = (nofile / 2).clamp(64, MAX_CONNECTIONS);
        Limits {
            total,
            per_source: 128,
            per_loopback: total,
            handshake: Duration::from_secs(10),
            ping_every: Duration::from_secs(20),
            idle: Duration::from_secs(60),
        }
    }
}

/// A connection's places in the total and in its source's count; given
/// back when dropped.
pub(super) struct Admission {
    pub(super) _permit: tokio::sync::OwnedSemaphorePermit,
    pub(super) _slot: Slot,
}

/// Hands a connection's [`Admission`] to the handler, so that an upgraded
/// link keeps it for its whole life: hyper ends the connection's task
/// when it hands the socket over, and a link that gave its places back
/// then would be bounded by nothing.
#[derive(Clone)]
pub(super) struct Pass(pub(super) Arc<Mutex<Option<Admission>>>);

impl Pass {
    pub(super) fn take(&self) -> Option<Admission> {
        self.0.lock().expect("pass lock").take()
    }
}

/// Open connections per source; a [`Slot`] is given back on drop.
#[derive(Default, Clone)]
pub(super) struct Sources(Arc<Mutex<HashMap<IpAddr, usize>>>);

pub(super) struct Slot(Sources, IpAddr);

impl Sources {
    /// A place for a connection from `peer`, unless its source is full.
    pub(super) fn take(&self, peer: IpAddr, limits: &Limits) -> Option<Slot> {
        let (key, max) = source(peer, limits);
        let mut m = self.0.lock().expect("sources lock");
        let n = m.entry(key).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), key))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.0.0.lock().expect("sources lock");
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// What `peer` counts as, and its cap: an IPv4-mapped address is its
/// IPv4 address; an IPv6 address its /64, which one host often holds whole.
fn source(peer: IpAddr, limits: &Limits) -> (IpAddr, usize) {
    let ip = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    };
    if ip.is_loopback() {
        return (ip, limits.per_loopback);
    }
    let key = match ip {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    };
    (key, limits.per_source)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_source: usize, per_loopback: usize) -> Limits {
        Limits {
            per_source,
            per_loopback,
            ..Limits::for_descriptors(1024)
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Open connections that `sources` counts for the source of `peer`.
    fn open(sources: &Sources, peer: &str) -> usize {
        let (key, _) = source(ip(peer), &limits(1, 1));
        sources.0.lock().unwrap().get(&key).copied().unwrap_or(0)
    }

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64_and_loopback_has_its_own_cap() {
        let limits = limits(3, 9);
        let at = |s: &str| source(ip(s), &limits);
        assert_eq!(at("2001:db8::1").0, at("2001:db8::ffff:1").0);
        assert_ne!(at("2001:db8::1").0, at("2001:db8:0:1::1").0);
        assert_eq!(at("::ffff:192.0.2.7"), at("192.0.2.7"));
        assert_eq!(at("192.0.2.7").1, 3);
        assert_eq!(at("2001:db8::1").1, 3);
        assert_eq!(at("127.0.0.1").1, 9);
        assert_eq!(at("::1").1, 9);
        assert_eq!(at("::ffff:127.0.0.1").1, 9);
    }

    #[test]
    fn the_hub_takes_half_the_descriptors_within_bounds_and_loopback_gets_all() {
        let l = Limits::for_descriptors(1024);
        assert_eq!((l.total, l.per_source, l.per_loopback), (512, 128, 512));
        // Few descriptors: still a usable listener.
        assert_eq!(Limits::for_descriptors(10).total, 64);
        // Many: capped, so that the hub's memory stays bounded.
        let big = Limits::for_descriptors(1 << 20);
        assert_eq!(
            (big.total, big.per_loopback),
            (MAX_CONNECTIONS, MAX_CONNECTIONS)
        );
        assert!(
            l.idle > l.ping_every,
            "a link is pinged before it counts as idle"
        );
    }

    #[test]
    fn a_source_gets_its_cap_and_no_more_and_others_are_not_affected() {
        let sources = Sources::default();
        let l = limits(2, 5);
        let a = sources.take(ip("192.0.2.7"), &l).expect("first");
        let _b = sources.take(ip("192.0.2.7"), &l).expect("second");
        assert!(
            sources.take(ip("192.0.2.7"), &l).is_none(),
            "a third got in"
        );
        // The IPv4-mapped form is the same source.
        assert!(sources.take(ip("::ffff:192.0.2.7"), &l).is_none());
        let _c = sources.take(ip("192.0.2.8"), &l).expect("another address");
        assert_eq!(open(&sources, "192.0.2.7"), 2);
        // A slot given back is a place again.
        drop(a);
        assert_eq!(open(&sources, "192.0.2.7"), 1);
        assert!(sources.take(ip("192.0.2.7"), &l).is_some());
    }

    #[test]
    fn one_ipv6_64_shares_a_count_and_loopback_has_the_larger_cap() {
        let sources = Sources::default();
        let l = limits(1, 3);
        let _a = sources.take(ip("2001:db8::1"), &l).unwrap();
        assert!(
            sources.take(ip("2001:db8::2"), &l).is_none(),
            "another address of the same /64 got a second place"
        );
        assert!(sources.take(ip("2001:db8:0:1::1"), &l).is_some());
        let held: Vec<Slot> = (0..3)
            .map(|_| sources.take(ip("127.0.0.1"), &l).expect("loopback"))
            .collect();
        assert!(
            sources.take(ip("::1"), &l).is_some(),
            "::1 is its own source"
        );
        assert!(sources.take(ip("127.0.0.1"), &l).is_none());
        drop(held);
        assert_eq!(open(&sources, "127.0.0.1"), 0);
    }

    #[test]
    fn sources_that_closed_everything_are_forgotten() {
        let sources = Sources::default();
        let l = limits(4, 4);
        let slots: Vec<Slot> = (1..=50)
            .map(|i| sources.take(ip(&format!("198.51.100.{i}")), &l).unwrap())
            .collect();
        assert_eq!(sources.0.lock().unwrap().len(), 50);
        drop(slots);
        // A scan from many addresses leaves no entry per address behind.
        assert!(sources.0.lock().unwrap().is_empty());
    }

    #[test]
    fn an_admission_is_handed_over_once_and_gives_both_places_back_when_dropped() {
        let total = Arc::new(tokio::sync::Semaphore::new(1));
        let sources = Sources::default();
        let l = limits(1, 1);
        let pass = Pass(Arc::new(Mutex::new(Some(Admission {
            _permit: total.clone().try_acquire_owned().unwrap(),
            _slot: sources.take(ip("192.0.2.1"), &l).unwrap(),
        }))));
        assert_eq!(total.available_permits(), 0);
        let held = pass.clone().take().expect("the handler gets it");
        assert!(pass.take().is_none(), "handed over twice");
        assert_eq!(open(&sources, "192.0.2.1"), 1);
        drop(held);
        assert_eq!(total.available_permits(), 1);
        assert_eq!(open(&sources, "192.0.2.1"), 0);
    }
}
