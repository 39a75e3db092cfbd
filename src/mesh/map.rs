//! The peer map: what the hub tells one node about the others it may
//! reach directly, authenticated for that node.
//!
//! The map travels as the exact JSON text that was authenticated, beside
//! its tag, so that the receiver checks the bytes it got rather than a
//! re-encoding of them. The tag is a [`PairKey`] MAC between the hub and
//! that node: only the hub (or the node itself) could have made it, so a
//! map from the cache on disk or relayed through anyone else is believed
//! only if it is the hub's.

use super::wire::{NatKind, PairKey};
use crate::keys::PublicKey;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

/// At most this many candidates per node are kept: each one is probed.
pub const MAX_CANDIDATES: usize = 8;

/// One node the receiver may reach directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshPeer {
    pub public_key: PublicKey,
    /// Its tunnel addresses: IPv4 first (its relay id), then IPv6.
    pub addresses: Vec<IpAddr>,
    /// The LANs behind it that the hub approved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNetwork>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where it may be reached: where the hub sees it, its own addresses,
    /// and its `--advertise-endpoint`.
    #[serde(default)]
    pub candidates: Vec<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatKind>,
}

impl MeshPeer {
    pub fn id(&self) -> Option<super::NodeId> {
        self.addresses.iter().find_map(|a| super::node_id(*a))
    }

    /// What the receiver's device routes to this peer.
    pub fn allowed_ips(&self) -> Vec<IpNetwork> {
        let mut out: Vec<IpNetwork> = self
            .addresses
            .iter()
            .map(|a| crate::ipam::host_net(*a))
            .collect();
        out.extend(self.routes.iter().copied());
        out
    }
}

/// The map for one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerMap {
    /// The node it is for.
    pub node: Option<PublicKey>,
    /// Increases with every change the hub makes.
    pub serial: u64,
    pub peers: Vec<MeshPeer>,
    /// The hub's second UDP port, for finding the node's NAT behaviour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_port: Option<u16>,
}

/// A map with the hub's tag for its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedMap {
    /// The map's JSON, exactly as tagged.
    pub map: String,
    /// The tag, hex.
    pub tag: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error("the peer map's tag does not match: not the hub's, or changed")]
    BadTag,
    #[error("the peer map is for another node")]
    OtherNode,
    #[error("the peer map is not valid JSON: {0}")]
    Malformed(String),
}

impl SignedMap {
    /// `map`, tagged with the key between the hub and its node.
    pub fn sign(map: &PeerMap, key: &PairKey) -> SignedMap {
        let text = serde_json::to_string(map).expect("maps serialize");
        let tag = crate::reach::hex(&key.tag(text.as_bytes()));
        SignedMap { map: text, tag }
    }

    /// The map, if `key` made its tag and it is for `node`.
    pub fn open(&self, key: &PairKey, node: &PublicKey) -> Result<PeerMap, MapError> {
        let tag = crate::reach::unhex(&self.tag).ok_or(MapError::BadTag)?;
        if !key.check(self.map.as_bytes(), &tag) {
            return Err(MapError::BadTag);
        }
        let map: PeerMap =
            serde_json::from_str(&self.map).map_err(|e| MapError::Malformed(e.to_string()))?;
        if map.node.as_ref() != Some(node) {
            return Err(MapError::OtherNode);
        }
        Ok(map)
    }
}

/// Whether a claimed candidate is worth probing at all: not loopback,
/// unspecified, multicast or broadcast, not port 0, and not inside the
/// tunnel's own subnets (which would loop through the tunnel).
pub fn plausible(candidate: &SocketAddr, tunnel: &[IpNetwork]) -> bool {
    let ip = candidate.ip();
    let odd = match ip {
        IpAddr::V4(v4) => v4.is_broadcast() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    candidate.port() != 0
        && !ip.is_loopback()
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && !odd
        && !tunnel.iter().any(|n| n.contains(ip))
}

/// The candidates kept of `claimed`: plausible, unique, at most
/// [`MAX_CANDIDATES`], in the order given (best first).
pub fn keep_candidates(claimed: &[SocketAddr], tunnel: &[IpNetwork]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = vec![];
    for c in claimed {
        if plausible(c, tunnel) && !out.contains(c) && out.len() < MAX_CANDIDATES {
            out.push(*c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn map(node: PublicKey) -> PeerMap {
        PeerMap {
            node: Some(node),
            serial: 3,
            peers: vec![MeshPeer {
                public_key: PrivateKey::generate().public_key(),
                addresses: vec!["10.77.0.3".parse().unwrap()],
                routes: vec!["192.168.7.0/24".parse().unwrap()],
                name: Some("b".into()),
                candidates: vec!["198.51.100.7:4242".parse().unwrap()],
                nat: Some(NatKind::EndpointIndependent),
            }],
            probe_port: Some(51822),
        }
    }

    #[test]
    fn a_map_opens_only_for_its_node_with_the_hubs_key() {
        let (hub, node) = (PrivateKey::generate(), PrivateKey::generate());
        let key = PairKey::derive(&hub, &node.public_key()).unwrap();
        let m = map(node.public_key());
        let signed = SignedMap::sign(&m, &key);
        let mine = PairKey::derive(&node, &hub.public_key()).unwrap();
        assert_eq!(signed.open(&mine, &node.public_key()), Ok(m.clone()));

        let mut changed = signed.clone();
        changed.map = changed.map.replace("4242", "4243");
        assert_eq!(
            changed.open(&mine, &node.public_key()),
            Err(MapError::BadTag)
        );
        // Another node's map, even with a good tag, is not this node's.
        let other = PrivateKey::generate();
        let theirs = SignedMap::sign(
            &map(other.public_key()),
            &PairKey::derive(&hub, &node.public_key()).unwrap(),
        );
        assert_eq!(
            theirs.open(&mine, &node.public_key()),
            Err(MapError::OtherNode)
        );
        // Made by anyone but the hub: refused.
        let forged = SignedMap::sign(&m, &PairKey::derive(&other, &node.public_key()).unwrap());
        assert_eq!(
            forged.open(&mine, &node.public_key()),
            Err(MapError::BadTag)
        );
    }

    #[test]
    fn implausible_candidates_are_dropped_and_the_rest_capped() {
        let tunnel: Vec<IpNetwork> = vec!["10.77.0.0/24".parse().unwrap()];
        let claimed: Vec<SocketAddr> = [
            "127.0.0.1:5",
            "0.0.0.0:5",
            "224.0.0.1:5",
            "10.77.0.9:5",
            "192.0.2.1:0",
            "169.254.1.1:5",
            "192.0.2.1:5",
            "192.0.2.1:5",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(
            keep_candidates(&claimed, &tunnel),
            ["192.0.2.1:5".parse::<SocketAddr>().unwrap()]
        );
        let many: Vec<SocketAddr> = (1..50)
            .map(|p| SocketAddr::new("192.0.2.1".parse().unwrap(), p))
            .collect();
        assert_eq!(keep_candidates(&many, &tunnel).len(), MAX_CANDIDATES);
    }
}
