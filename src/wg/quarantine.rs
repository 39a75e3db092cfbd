//! Tunnel addresses held by keys that are not yet trusted: a token's
//! invite key, before the joiner's own key replaces it. Such a key may
//! reach one service, the hub's control API over TCP, and nothing else: no
//! forwarding to other peers, no DNS, no other port of the hub.
//!
//! The userspace device checks every decrypted packet whose source is
//! held here, and every packet it would send to such an address (only
//! the hub's own tunnel addresses may). It is a set lookup per packet and
//! nothing while no address is held, so it costs the data path nothing
//! when no token is outstanding. Doing it in the device rather than in
//! nftables keeps the rule count flat however many tokens are out (one
//! rule per address would slow every forwarded packet on a hub with a
//! thousand unused tokens), and holds where nftables is missing or off.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

const IPPROTO_TCP: u8 = 6;

/// The addresses held by invite keys, and the one service they may reach.
#[derive(Debug)]
pub struct Quarantine {
    held: RwLock<HashSet<IpAddr>>,
    /// Whether `held` is non-empty: the fast path reads only this.
    any: AtomicBool,
    /// The hub's own tunnel addresses, where the service listens.
    service: Vec<IpAddr>,
    port: u16,
}

/// Source, destination, protocol and destination port of an IP packet;
/// the port only for an unfragmented (first-fragment) TCP or UDP packet
/// without IPv6 extension headers.
fn flow(p: &[u8]) -> Option<(IpAddr, IpAddr, u8, Option<u16>)> {
    let port = |at: usize| {
        p.get(at + 2..at + 4)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let src = IpAddr::from(<[u8; 4]>::try_from(&p[12..16]).ok()?);
            let dst = IpAddr::from(<[u8; 4]>::try_from(&p[16..20]).ok()?);
            let fragment = u16::from_be_bytes([p[6], p[7]]) & 0x1fff != 0;
            let dport = (ihl >= 20 && !fragment).then(|| port(ihl)).flatten();
            Some((src, dst, p[9], dport))
        }
        6 if p.len() >= 40 => {
            let src = IpAddr::from(<[u8; 16]>::try_from(&p[8..24]).ok()?);
            let dst = IpAddr::from(<[u8; 16]>::try_from(&p[24..40]).ok()?);
            Some((src, dst, p[6], port(40)))
        }
        _ => None,
    }
}

impl Quarantine {
    /// `service`: the hub's tunnel addresses; `port`: its control API's.
    pub fn new(service: Vec<IpAddr>, port: u16) -> Self {
        Self {
            held: Default::default(),
            any: AtomicBool::new(false),
            service,
            port,
        }
    }

    /// The addresses held by untrusted keys are now `addrs`.
    pub fn set(&self, addrs: impl IntoIterator<Item = IpAddr>) {
        let mut held = self.held.write().expect("quarantine lock");
        *held = addrs.into_iter().collect();
        self.any.store(!held.is_empty(), Ordering::Release);
    }

    /// Whether any address is held: when not, nothing needs a look (the
    /// data path asks this before it parses a packet's addresses).
    pub fn active(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Whether a packet from `src` must be checked.
    pub fn holds(&self, src: IpAddr) -> bool {
        self.any.load(Ordering::Acquire)
            && self.held.read().expect("quarantine lock").contains(&src)
    }

    /// Whether a decrypted packet may go on: anything from an address not
    /// held, and from a held one only TCP to the control API.
    pub fn admits(&self, packet: &[u8]) -> bool {
        let Some((src, dst, proto, dport)) = flow(packet) else {
            return !self.any.load(Ordering::Acquire);
        };
        !self.holds(src)
            || (proto == IPPROTO_TCP && dport == Some(self.port) && self.service.contains(&dst))
    }

    /// Whether a packet may be sent to `dst`: to a held address only from
    /// the hub itself (its control API's answers), never forwarded there.
    pub fn delivers(&self, src: Option<IpAddr>, dst: Option<IpAddr>) -> bool {
        match dst {
            Some(d) if self.holds(d) => src.is_some_and(|s| self.service.contains(&s)),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    fn q() -> Quarantine {
        let q = Quarantine::new(vec!["10.77.0.1".parse().unwrap()], 51821);
        q.set(["10.77.0.5".parse().unwrap()]);
        q
    }

    #[test]
    fn an_invite_reaches_the_control_api_over_tcp_and_nothing_else() {
        let q = q();
        let (hub, invite, site) = ([10, 77, 0, 1], [10, 77, 0, 5], [10, 77, 0, 2]);
        assert!(q.admits(&v4(invite, hub, 6, 51821)));
        for (dst, proto, port) in [
            (hub, 17, 53),                // the hub's DNS
            (hub, 6, 53),                 // DNS over TCP
            (hub, 17, 51821),             // UDP to the control port
            (hub, 6, 22),                 // another service of the hub
            (site, 6, 51821),             // forwarded to another peer
            ([192, 168, 1, 5], 6, 51821), // the hub host's LAN address
        ] {
            assert!(
                !q.admits(&v4(invite, dst, proto, port)),
                "{dst:?} {proto} {port}"
            );
        }
        // Others are not touched.
        assert!(q.admits(&v4(site, hub, 17, 53)));
        // A later fragment carries no port: refused from a held address.
        let mut frag = v4(invite, hub, 6, 51821);
        frag[7] = 1;
        assert!(!q.admits(&frag));
        // Garbage is refused while anything is held.
        assert!(!q.admits(&[0x45, 0]));
    }

    #[test]
    fn only_the_hub_sends_to_a_held_address_and_an_empty_set_is_free() {
        let q = q();
        let (hub, invite, site) = (
            Some("10.77.0.1".parse().unwrap()),
            Some("10.77.0.5".parse().unwrap()),
            Some("10.77.0.2".parse().unwrap()),
        );
        assert!(q.delivers(hub, invite));
        assert!(!q.delivers(site, invite));
        assert!(q.delivers(site, hub));
        q.set([]);
        assert!(q.delivers(site, invite));
        assert!(q.admits(&v4([10, 77, 0, 5], [10, 77, 0, 2], 17, 53)));
        assert!(q.admits(&[0x45, 0]), "nothing held: not our business");
    }

    #[test]
    fn ipv6_twins_are_checked_too() {
        let hub6: IpAddr = "fd00::1".parse().unwrap();
        let inv6: IpAddr = "fd00::5".parse().unwrap();
        let q = Quarantine::new(vec![hub6], 51821);
        q.set([inv6]);
        let packet = |dst: IpAddr, proto: u8, port: u16| {
            let mut p = vec![0u8; 60];
            p[0] = 0x60;
            p[6] = proto;
            if let (IpAddr::V6(s), IpAddr::V6(d)) = (inv6, dst) {
                p[8..24].copy_from_slice(&s.octets());
                p[24..40].copy_from_slice(&d.octets());
            }
            p[42..44].copy_from_slice(&port.to_be_bytes());
            p
        };
        assert!(q.admits(&packet(hub6, 6, 51821)));
        assert!(!q.admits(&packet(hub6, 17, 53)));
        assert!(!q.admits(&packet("fd00::2".parse().unwrap(), 6, 51821)));
    }
}
