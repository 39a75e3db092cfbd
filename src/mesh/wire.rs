//! Our messages on the WireGuard socket.
//!
//! Every one starts with [`MAGIC`]: WireGuard's four message types start
//! with a byte of 1 to 4, so a receiver tells them apart by the first byte
//! alone, before WireGuard sees anything.
//!
//! - Relay: `MAGIC 'R' src:u32 dst:u32 datagram`. A WireGuard datagram
//!   between two nodes, through the hub, which reads only the header; the
//!   datagram stays encrypted end to end. 10 bytes, so that a full-size
//!   datagram (1452 bytes at MTU 1420) still fits a 1500-byte IPv4 path.
//! - Disco: `MAGIC 'D' kind sender:[32] txid:[12] body mac:[16]`: pings,
//!   pongs (with the address the ping came from) and "call me" requests.
//!   The MAC is keyed with a [`PairKey`] derived for this purpose from the
//!   two nodes' static X25519 secret; the WireGuard keys themselves never
//!   key anything here.

use crate::keys::{PrivateKey, PublicKey};
use blake2::Blake2sMac;
use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, KeyInit, Mac, Update};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

use super::NodeId;

/// No WireGuard message starts with this byte.
pub const MAGIC: u8 = 0xf7;
const RELAY: u8 = b'R';
const DISCO: u8 = b'D';
pub const RELAY_HEADER: usize = 10;
const MAC_LEN: usize = 16;
const HEAD: usize = 3 + 32 + 12;
const ADDR_LEN: usize = 19;

/// Whether a datagram is ours rather than WireGuard's.
pub fn is_ours(d: &[u8]) -> bool {
    d.first() == Some(&MAGIC)
}

/// The relay's header on a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayHeader {
    pub src: NodeId,
    pub dst: NodeId,
}

impl RelayHeader {
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[MAGIC, RELAY]);
        out.extend_from_slice(&self.src.to_be_bytes());
        out.extend_from_slice(&self.dst.to_be_bytes());
    }

    /// The header of a relayed datagram; `None` for anything else.
    pub fn parse(d: &[u8]) -> Option<RelayHeader> {
        if d.len() <= RELAY_HEADER || d[0] != MAGIC || d[1] != RELAY {
            return None;
        }
        let word = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().expect("4 bytes"));
        Some(RelayHeader {
            src: word(2),
            dst: word(6),
        })
    }
}

/// The key that authenticates probes between two nodes (or a node and
/// its hub): a BLAKE2s MAC of both public keys under their X25519 static
/// secret, with a label of its own, so that it is useless for anything
/// but this and the same from either side.
#[derive(Clone)]
pub struct PairKey([u8; 32]);

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairKey(<redacted>)")
    }
}

impl Drop for PairKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl PairKey {
    /// `None` for a low-order peer key.
    pub fn derive(own: &PrivateKey, peer: &PublicKey) -> Option<PairKey> {
        let shared = own.shared_secret(peer)?;
        let me = own.public_key();
        let (a, b) = if me.as_bytes() <= peer.as_bytes() {
            (me, *peer)
        } else {
            (*peer, me)
        };
        let mut mac =
            <Blake2sMac<blake2::digest::consts::U32> as KeyInit>::new_from_slice(shared.as_ref())
                .expect("a 32-byte key fits BLAKE2s");
        Mac::update(&mut mac, b"tunnel mesh probes v1");
        Mac::update(&mut mac, a.as_bytes());
        Mac::update(&mut mac, b.as_bytes());
        Some(PairKey(mac.finalize_fixed().into()))
    }

    /// A MAC of `data`, 16 bytes.
    pub fn tag(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = <Blake2sMac<U16> as KeyInit>::new_from_slice(&self.0).expect("32 bytes");
        Update::update(&mut mac, data);
        mac.finalize_fixed().into()
    }

    /// Whether `tag` is `data`'s, in constant time.
    pub fn check(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut mac = <Blake2sMac<U16> as KeyInit>::new_from_slice(&self.0).expect("32 bytes");
        Update::update(&mut mac, data);
        mac.verify_slice(tag).is_ok()
    }
}

/// What a disco message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoKind {
    /// "Are you there on this path?"
    Ping,
    /// "Yes; your ping came from `observed`."
    Pong { observed: SocketAddr },
    /// To the hub: "ask `peer` to probe me now". From the hub: "`peer`
    /// asks you to probe it; the hub sees it at `at`".
    CallMe {
        peer: PublicKey,
        at: Option<SocketAddr>,
    },
}

/// A disco message: who sent it, its transaction id, what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disco {
    pub sender: PublicKey,
    pub txid: [u8; 12],
    pub kind: DiscoKind,
}

/// Why a datagram that started with [`MAGIC`] was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("malformed probe message")]
    Malformed,
    #[error("probe message with a bad MAC")]
    BadMac,
}

fn put_addr(out: &mut Vec<u8>, a: Option<SocketAddr>) {
    let Some(a) = a else {
        out.extend_from_slice(&[0; ADDR_LEN]);
        return;
    };
    let (family, ip) = match a.ip() {
        IpAddr::V4(v4) => (4, v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => (6, v6.octets()),
    };
    out.push(family);
    out.extend_from_slice(&ip);
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> Result<Option<SocketAddr>, WireError> {
    let ip: [u8; 16] = b[1..17].try_into().expect("16 bytes");
    let ip6 = std::net::Ipv6Addr::from(ip);
    let port = u16::from_be_bytes([b[17], b[18]]);
    match b[0] {
        0 => Ok(None),
        4 => Ok(Some(SocketAddr::new(
            IpAddr::V4(ip6.to_ipv4_mapped().ok_or(WireError::Malformed)?),
            port,
        ))),
        6 => Ok(Some(SocketAddr::new(IpAddr::V6(ip6), port))),
        _ => Err(WireError::Malformed),
    }
}

impl Disco {
    /// The message, MAC'd with the key of sender and receiver.
    pub fn encode(&self, key: &PairKey) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD + 32 + ADDR_LEN + MAC_LEN);
        let kind = match self.kind {
            DiscoKind::Ping => 1,
            DiscoKind::Pong { .. } => 2,
            DiscoKind::CallMe { .. } => 3,
        };
        out.extend_from_slice(&[MAGIC, DISCO, kind]);
        out.extend_from_slice(self.sender.as_bytes());
        out.extend_from_slice(&self.txid);
        match self.kind {
            DiscoKind::Ping => {}
            DiscoKind::Pong { observed } => put_addr(&mut out, Some(observed)),
            DiscoKind::CallMe { peer, at } => {
                out.extend_from_slice(peer.as_bytes());
                put_addr(&mut out, at);
            }
        }
        let tag = key.tag(&out);
        out.extend_from_slice(&tag);
        out
    }

    /// Who claims to have sent `d`, to find the key to check it with;
    /// `None` when it is not a disco message at all.
    pub fn sender(d: &[u8]) -> Option<PublicKey> {
        if d.len() < HEAD + MAC_LEN || d[0] != MAGIC || d[1] != DISCO {
            return None;
        }
        Some(PublicKey(d[3..35].try_into().expect("32 bytes")))
    }

    /// Checks the MAC with `key`, then parses.
    pub fn decode(d: &[u8], key: &PairKey) -> Result<Disco, WireError> {
        let sender = Disco::sender(d).ok_or(WireError::Malformed)?;
        let (body, tag) = d.split_at(d.len() - MAC_LEN);
        if !key.check(body, tag) {
            return Err(WireError::BadMac);
        }
        let txid: [u8; 12] = body[35..47].try_into().expect("12 bytes");
        let rest = &body[HEAD..];
        let kind = match (body[2], rest.len()) {
            (1, 0) => DiscoKind::Ping,
            (2, ADDR_LEN) => DiscoKind::Pong {
                observed: get_addr(rest)?.ok_or(WireError::Malformed)?,
            },
            (3, 51) => DiscoKind::CallMe {
                peer: PublicKey(rest[..32].try_into().expect("32 bytes")),
                at: get_addr(&rest[32..])?,
            },
            _ => return Err(WireError::Malformed),
        };
        Ok(Disco { sender, txid, kind })
    }
}

/// How this node's NAT maps its UDP socket, found by asking two of the
/// hub's ports where they see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatKind {
    /// Seen at one of its own addresses: no NAT.
    None,
    /// The same public address and port for every destination (most
    /// home routers): direct paths work with most peers.
    EndpointIndependent,
    /// A new port per destination (symmetric NAT): direct paths only
    /// with peers whose NAT is open, else the relay.
    EndpointDependent,
}

impl NatKind {
    /// From where two of the hub's ports saw the same socket.
    pub fn classify(first: SocketAddr, second: SocketAddr, local: &[IpAddr]) -> NatKind {
        if first != second {
            NatKind::EndpointDependent
        } else if local.contains(&first.ip()) {
            NatKind::None
        } else {
            NatKind::EndpointIndependent
        }
    }
}

impl std::fmt::Display for NatKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NatKind::None => "none (public address)",
            NatKind::EndpointIndependent => "endpoint-independent mapping",
            NatKind::EndpointDependent => "endpoint-dependent mapping (symmetric)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (PrivateKey, PrivateKey) {
        (PrivateKey::generate(), PrivateKey::generate())
    }

    #[test]
    fn both_sides_derive_the_same_pair_key_and_others_do_not() {
        let (a, b) = keys();
        let ab = PairKey::derive(&a, &b.public_key()).unwrap();
        let ba = PairKey::derive(&b, &a.public_key()).unwrap();
        assert_eq!(ab.0, ba.0);
        let c = PrivateKey::generate();
        let ac = PairKey::derive(&a, &c.public_key()).unwrap();
        assert_ne!(ab.0, ac.0);
        // Not the static secret itself.
        assert_ne!(ab.0, *a.shared_secret(&b.public_key()).unwrap());
        assert!(!format!("{ab:?}").contains(&format!("{:?}", ab.0[0])));
    }

    #[test]
    fn every_message_round_trips_and_a_changed_byte_is_refused() {
        let (a, b) = keys();
        let key = PairKey::derive(&a, &b.public_key()).unwrap();
        let kinds = [
            DiscoKind::Ping,
            DiscoKind::Pong {
                observed: "198.51.100.7:4242".parse().unwrap(),
            },
            DiscoKind::Pong {
                observed: "[2001:db8::1]:1".parse().unwrap(),
            },
            DiscoKind::CallMe {
                peer: b.public_key(),
                at: Some("203.0.113.9:51820".parse().unwrap()),
            },
            DiscoKind::CallMe {
                peer: b.public_key(),
                at: None,
            },
        ];
        for kind in kinds {
            let m = Disco {
                sender: a.public_key(),
                txid: [7; 12],
                kind,
            };
            let bytes = m.encode(&key);
            assert!(is_ours(&bytes));
            assert_eq!(Disco::sender(&bytes), Some(a.public_key()));
            assert_eq!(Disco::decode(&bytes, &key), Ok(m));
            for i in 0..bytes.len() {
                let mut bad = bytes.clone();
                bad[i] ^= 1;
                assert!(Disco::decode(&bad, &key).is_err(), "byte {i} flipped");
            }
            let other = PairKey::derive(&a, &PrivateKey::generate().public_key()).unwrap();
            assert_eq!(Disco::decode(&bytes, &other), Err(WireError::BadMac));
        }
    }

    #[test]
    fn truncated_or_foreign_datagrams_are_refused_without_panicking() {
        let key = PairKey::derive(&keys().0, &keys().1.public_key()).unwrap();
        for len in 0..120 {
            let d = vec![MAGIC; len];
            let _ = Disco::decode(&d, &key);
            let _ = RelayHeader::parse(&d);
        }
        // A WireGuard handshake initiation is not ours.
        assert!(!is_ours(&[1, 0, 0, 0, 9]));
    }

    #[test]
    fn the_relay_header_round_trips() {
        let h = RelayHeader {
            src: 7,
            dst: 0x0a4d_0003,
        };
        let mut d = vec![];
        h.write(&mut d);
        assert_eq!(d.len(), RELAY_HEADER);
        d.extend_from_slice(b"ciphertext");
        assert_eq!(RelayHeader::parse(&d), Some(h));
        assert_eq!(RelayHeader::parse(&d[..RELAY_HEADER]), None);
    }

    #[test]
    fn nat_kinds_follow_what_two_ports_saw() {
        let a: SocketAddr = "198.51.100.7:4242".parse().unwrap();
        let b: SocketAddr = "198.51.100.7:4243".parse().unwrap();
        assert_eq!(NatKind::classify(a, b, &[]), NatKind::EndpointDependent);
        assert_eq!(NatKind::classify(a, a, &[]), NatKind::EndpointIndependent);
        assert_eq!(NatKind::classify(a, a, &[a.ip()]), NatKind::None);
    }
}
