//! The mesh, as pure data and decisions: sites talk to each other
//! directly where their NATs let them, and through the hub's relay of
//! ciphertext where not.
//!
//! - [`wire`]: the messages of our own that share the WireGuard UDP socket
//!   (probes, "call me", the relay's header), all starting with a byte that
//!   no WireGuard message starts with, and the keys that authenticate them.
//! - [`map`]: the peer map the hub hands each node, authenticated for it.
//! - [`paths`]: which path each peer takes, a sans-IO core: probe results,
//!   traffic and `now` in; probes to send and endpoints to set out.
//!
//! Nothing here touches a socket or the clock; `node::mesh` runs it.

pub mod map;
pub mod paths;
pub mod wire;

pub use map::{MeshPeer, PeerMap, SignedMap};
pub use paths::{Chosen, Effect, PathView, Paths, Timings};
pub use wire::{Disco, DiscoKind, NatKind, PairKey};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A node's id on the relay: its IPv4 tunnel address, unique in a hub.
pub type NodeId = u32;

pub fn node_id(address: IpAddr) -> Option<NodeId> {
    match address {
        IpAddr::V4(v4) => Some(u32::from(v4)),
        IpAddr::V6(_) => None,
    }
}

pub fn id_addr(id: NodeId) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(id))
}

/// The first segments of the addresses that stand for "this peer through
/// the hub's relay" in the WireGuard device: never routable (100::/64 is
/// the discard prefix), and apart from the WebSocket links' `100::/64`
/// addresses by their fourth segment.
const RELAY_PREFIX: [u16; 4] = [0x100, 0, 0, 0x7e1a];

/// The address that stands for peer `id` through the relay.
pub fn relay_addr(id: NodeId) -> SocketAddr {
    let [p0, p1, p2, p3] = RELAY_PREFIX;
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(
            p0,
            p1,
            p2,
            p3,
            0,
            0,
            (id >> 16) as u16,
            id as u16,
        )),
        2,
    )
}

/// The peer that a relay address stands for.
pub fn relay_id(a: &SocketAddr) -> Option<NodeId> {
    match a.ip() {
        IpAddr::V6(v6) if v6.segments()[..4] == RELAY_PREFIX => {
            let s = v6.segments();
            Some((u32::from(s[6]) << 16) | u32::from(s[7]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_addresses_stand_for_their_node_and_nothing_else() {
        let id = node_id("10.77.0.3".parse().unwrap()).unwrap();
        let a = relay_addr(id);
        assert_eq!(relay_id(&a), Some(id));
        assert_eq!(id_addr(id), "10.77.0.3".parse::<IpAddr>().unwrap());
        // A WebSocket link's address is not a relay address.
        let ws: SocketAddr = "[100::1]:1".parse().unwrap();
        assert_eq!(relay_id(&ws), None);
        assert_eq!(relay_id(&"10.0.0.1:1".parse().unwrap()), None);
    }
}
