//! The mesh on the WireGuard socket: what the userspace device's
//! transport does with datagrams of ours ([`crate::mesh::wire`]) before
//! WireGuard sees anything.
//!
//! - Probes (disco) are split off and handed to whoever runs the mesh
//!   (the node's path agent, or the hub's responder), with where they
//!   came from.
//! - On a node, a datagram for a peer's relay address
//!   ([`crate::mesh::relay_addr`]) leaves with the relay header, to the
//!   hub; a relayed datagram from the hub arrives as if from the sender's
//!   relay address, so WireGuard takes it as that peer's.
//! - On a hub, a relayed datagram is forwarded as it is to the node it is
//!   for, if it came from where the sender really is (its live WireGuard
//!   endpoint): the hub never decrypts it, and nobody can use the hub to
//!   send to a node in another's name.

use crate::mesh::wire::{MAGIC, RELAY_HEADER, RelayHeader};
use crate::mesh::{NodeId, relay_id};
use crate::transport::{Relay, is_virtual};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;

/// Probes waiting for the agent; beyond this, they are dropped (a flood
/// costs the flooder, not our memory).
const DISCO_QUEUE: usize = 1024;

/// A probe datagram and where it came from.
pub type Inbound = (Bytes, SocketAddr);

/// Sends one datagram on the device's UDP socket without waiting.
pub type SendUdp = Arc<dyn Fn(&[u8], SocketAddr) + Send + Sync>;

#[derive(Default)]
struct Counters {
    relayed_bytes: AtomicU64,
    relayed_packets: AtomicU64,
    refused: AtomicU64,
}

/// The mesh's side of one device's transport.
pub struct MeshSocket {
    hub: bool,
    udp: RwLock<Option<SendUdp>>,
    links: Option<Arc<Relay>>,
    disco: mpsc::Sender<Inbound>,
    /// A node: its own relay id, and where its hub is (where relay
    /// datagrams go and the only source they are taken from).
    own: AtomicU32,
    hub_at: RwLock<Vec<SocketAddr>>,
    /// A hub: where each node is.
    table: RwLock<HashMap<NodeId, SocketAddr>>,
    /// A node: the peers it has; a relayed datagram from another means
    /// the map is behind (a site joined a moment ago), and `strangers`
    /// says so to the agent.
    known: RwLock<std::collections::HashSet<NodeId>>,
    strangers: tokio::sync::Notify,
    /// A node: the peers whose WireGuard datagrams crossed the relay since
    /// the agent last looked. Someone talks to them: that, not a sampled
    /// counter, is what starts a search for a direct path at once.
    active: std::sync::Mutex<std::collections::HashSet<NodeId>>,
    activity: tokio::sync::Notify,
    /// A node: the peers whose path is direct, and where. WireGuard moves
    /// a peer's endpoint to where its last datagram came from: one still
    /// in flight through the relay when both sides went direct would move
    /// it back to the relay, and each side's relayed datagrams would keep
    /// the other there. Relayed datagrams from these peers are handed to
    /// WireGuard as if from the direct address.
    direct: RwLock<HashMap<NodeId, SocketAddr>>,
    counters: Counters,
}

impl std::fmt::Debug for MeshSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshSocket")
            .field("hub", &self.hub)
            .field("own", &self.own.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// What the transport does with a received datagram of ours.
pub enum Verdict {
    /// Taken (a probe for the agent, forwarded, or dropped).
    Taken,
    /// A relayed WireGuard datagram: strip `RELAY_HEADER` bytes and hand it
    /// to WireGuard as coming from `from`.
    Unwrap { from: SocketAddr },
    /// A hub: send the datagram as it is to `to` over UDP. The transport
    /// sends a batch of them as GSO datagrams, as it sends WireGuard's.
    Forward { to: SocketAddr },
}

impl MeshSocket {
    /// A node's or (with `hub`) a hub's; probes arrive on the receiver.
    pub fn new(hub: bool, links: Option<Arc<Relay>>) -> (Arc<MeshSocket>, mpsc::Receiver<Inbound>) {
        let (tx, rx) = mpsc::channel(DISCO_QUEUE);
        (
            Arc::new(MeshSocket {
                hub,
                udp: RwLock::new(None),
                links,
                disco: tx,
                own: AtomicU32::new(0),
                hub_at: RwLock::new(vec![]),
                table: RwLock::new(HashMap::new()),
                known: RwLock::new(std::collections::HashSet::new()),
                strangers: tokio::sync::Notify::new(),
                active: std::sync::Mutex::new(std::collections::HashSet::new()),
                activity: tokio::sync::Notify::new(),
                direct: RwLock::new(HashMap::new()),
                counters: Counters::default(),
            }),
            rx,
        )
    }

    /// The device (re)bound its UDP socket.
    pub fn bound(&self, udp: SendUdp) {
        *self.udp.write().expect("not poisoned") = Some(udp);
    }

    /// A node: its relay id and its hub's endpoints (UDP or WebSocket link).
    pub fn set_node(&self, own: NodeId, hub: Vec<SocketAddr>) {
        self.own.store(own, Ordering::Relaxed);
        *self.hub_at.write().expect("not poisoned") = hub;
    }

    /// A node: the peers in its device.
    pub fn set_known(&self, known: std::collections::HashSet<NodeId>) {
        *self.known.write().expect("not poisoned") = known;
    }

    /// Resolves when a relayed datagram came from a node not in the map.
    pub async fn stranger(&self) {
        self.strangers.notified().await;
    }

    /// Resolves when WireGuard datagrams crossed the relay; [`Self::take_active`]
    /// says for whom.
    pub async fn activity(&self) {
        self.activity.notified().await;
    }

    /// The relay ids whose datagrams crossed the relay since the last call.
    pub fn take_active(&self) -> Vec<NodeId> {
        self.active.lock().expect("not poisoned").drain().collect()
    }

    /// A node: the path to the peer with relay id `id` is direct at `at`,
    /// or (`None`) not.
    pub fn set_direct(&self, id: NodeId, at: Option<SocketAddr>) {
        let mut d = self.direct.write().expect("not poisoned");
        match at {
            Some(a) => d.insert(id, a),
            None => d.remove(&id),
        };
    }

    fn mark_active(&self, id: NodeId) {
        if self.active.lock().expect("not poisoned").insert(id) {
            self.activity.notify_one();
        }
    }

    /// A hub: where each node's WireGuard session lives now.
    pub fn set_table(&self, table: HashMap<NodeId, SocketAddr>) {
        *self.table.write().expect("not poisoned") = table;
    }

    pub fn relayed(&self) -> (u64, u64) {
        (
            self.counters.relayed_packets.load(Ordering::Relaxed),
            self.counters.relayed_bytes.load(Ordering::Relaxed),
        )
    }

    /// Datagrams of ours that were refused (forged relay sources, a full
    /// probe queue).
    pub fn refused(&self) -> u64 {
        self.counters.refused.load(Ordering::Relaxed)
    }

    /// Sends `data` as it is: over UDP, or over the WebSocket link that
    /// `to` stands for. Never waits: a full socket drops, as UDP may.
    pub fn send_raw(&self, to: SocketAddr, data: &[u8]) {
        if is_virtual(&to) {
            if let Some(l) = &self.links {
                l.send(&to, Bytes::copy_from_slice(data));
            }
            return;
        }
        if let Some(udp) = self.udp.read().expect("not poisoned").as_ref() {
            udp(data, to);
        }
    }

    /// Sends `data` (a WireGuard datagram or a probe) to `to`: through
    /// the hub when `to` is a peer's relay address.
    pub fn send(&self, to: SocketAddr, data: &[u8]) {
        match relay_id(&to) {
            Some(dst) => {
                if !crate::mesh::wire::is_ours(data) {
                    self.mark_active(dst);
                }
                let Some(hub) = self.hub_at.read().expect("not poisoned").first().copied() else {
                    return;
                };
                self.send_raw(hub, &self.behind_header(dst, data));
            }
            None => self.send_raw(to, data),
        }
    }

    /// `data` for `to` (a peer's relay address) as it goes to the hub over
    /// UDP, behind the relay header, and the hub's address: the transport
    /// sends these in GSO batches like any other datagram. `None` where
    /// [`MeshSocket::send`] must take it (the hub behind a WebSocket link,
    /// or not known yet) or `to` is no relay address.
    pub fn wrap(&self, to: SocketAddr, data: &[u8]) -> Option<(Vec<u8>, SocketAddr)> {
        let dst = relay_id(&to)?;
        let hub = self
            .hub_at
            .read()
            .expect("not poisoned")
            .first()
            .copied()
            .filter(|h| !is_virtual(h))?;
        if !crate::mesh::wire::is_ours(data) {
            self.mark_active(dst);
        }
        Some((self.behind_header(dst, data), hub))
    }

    /// `data` from this node to node `dst`, as the relay carries it.
    fn behind_header(&self, dst: NodeId, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(RELAY_HEADER + data.len());
        RelayHeader {
            src: self.own.load(Ordering::Relaxed),
            dst,
        }
        .write(&mut out);
        out.extend_from_slice(data);
        out
    }

    /// What to do with a received datagram that starts with our magic.
    pub fn inbound(&self, data: &[u8], from: SocketAddr) -> Verdict {
        debug_assert_eq!(data.first(), Some(&MAGIC));
        if let Some(h) = RelayHeader::parse(data) {
            return if self.hub {
                self.forward(h, data, from)
            } else {
                self.unwrap(h, data, from)
            };
        }
        if self
            .disco
            .try_send((Bytes::copy_from_slice(data), from))
            .is_err()
        {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
        }
        Verdict::Taken
    }

    fn unwrap(&self, h: RelayHeader, data: &[u8], from: SocketAddr) -> Verdict {
        let from_hub = self.hub_at.read().expect("not poisoned").contains(&from);
        if !from_hub || h.dst != self.own.load(Ordering::Relaxed) {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Verdict::Taken;
        }
        let relayed = crate::mesh::relay_addr(h.src);
        if !self.known.read().expect("not poisoned").contains(&h.src) {
            self.strangers.notify_one();
        }
        if crate::mesh::wire::is_ours(&data[RELAY_HEADER..]) {
            // A probe through the relay: the agent's, from the relay address.
            if self
                .disco
                .try_send((Bytes::copy_from_slice(&data[RELAY_HEADER..]), relayed))
                .is_err()
            {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
            }
            return Verdict::Taken;
        }
        self.mark_active(h.src);
        let from = self
            .direct
            .read()
            .expect("not poisoned")
            .get(&h.src)
            .copied()
            .unwrap_or(relayed);
        Verdict::Unwrap { from }
    }

    fn forward(&self, h: RelayHeader, data: &[u8], from: SocketAddr) -> Verdict {
        let (src, dst) = {
            let t = self.table.read().expect("not poisoned");
            (t.get(&h.src).copied(), t.get(&h.dst).copied())
        };
        match (src, dst) {
            (Some(src), Some(dst)) if src == from => {
                self.counters
                    .relayed_packets
                    .fetch_add(1, Ordering::Relaxed);
                self.counters
                    .relayed_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if is_virtual(&dst) {
                    self.send_raw(dst, data);
                    Verdict::Taken
                } else {
                    Verdict::Forward { to: dst }
                }
            }
            _ => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                Verdict::Taken
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relayed(src: NodeId, dst: NodeId, payload: &[u8]) -> Vec<u8> {
        let mut d = vec![];
        RelayHeader { src, dst }.write(&mut d);
        d.extend_from_slice(payload);
        d
    }

    #[tokio::test]
    async fn a_node_wraps_a_relayed_datagram_for_its_hub_over_udp_only() {
        let (node, _rx) = MeshSocket::new(false, None);
        let to = crate::mesh::relay_addr(2);
        // No hub known yet: the caller's send() decides (and drops it).
        assert!(node.wrap(to, b"\x04ciphertext").is_none());
        let hub_at: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        node.set_node(1, vec![hub_at]);
        let (d, at) = node.wrap(to, b"\x04ciphertext").unwrap();
        assert_eq!(at, hub_at);
        assert_eq!(d, relayed(1, 2, b"\x04ciphertext"));
        assert!(
            node.wrap(hub_at, b"\x04ciphertext").is_none(),
            "not a relay address"
        );
        // A hub behind a WebSocket link: not for the UDP socket.
        let link = crate::transport::virtual_addr(7);
        node.set_node(1, vec![link]);
        assert!(node.wrap(to, b"\x04ciphertext").is_none());
    }

    #[tokio::test]
    async fn a_hub_forwards_only_what_comes_from_where_the_sender_is() {
        let (hub, _rx) = MeshSocket::new(true, None);
        let a_at: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b_at: SocketAddr = "127.0.0.1:2".parse().unwrap();
        hub.set_table(HashMap::from([(1, a_at), (2, b_at)]));
        // From where node 1 really is: forwarded as it is, to where node 2
        // is (the transport sends it, in a batch with the others).
        let d = relayed(1, 2, b"\x04ciphertext");
        assert!(matches!(hub.inbound(&d, a_at), Verdict::Forward { to } if to == b_at));
        assert_eq!(hub.relayed(), (1, d.len() as u64));
        // Claiming to be node 1 from elsewhere, or for an unknown node: refused.
        assert!(matches!(
            hub.inbound(&d, "127.0.0.1:9".parse().unwrap()),
            Verdict::Taken
        ));
        assert!(matches!(
            hub.inbound(&relayed(1, 3, b"x"), a_at),
            Verdict::Taken
        ));
        assert_eq!(hub.refused(), 2);
        assert_eq!(hub.relayed().0, 1);
    }

    #[test]
    fn a_node_takes_relayed_datagrams_only_from_its_hub_and_for_itself() {
        let (node, mut rx) = MeshSocket::new(false, None);
        let hub: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        node.set_node(7, vec![hub]);
        let wg = relayed(3, 7, b"\x04ciphertext");
        match node.inbound(&wg, hub) {
            Verdict::Unwrap { from } => assert_eq!(relay_id(&from), Some(3)),
            Verdict::Taken | Verdict::Forward { .. } => {
                panic!("a relayed datagram from the hub is WireGuard's")
            }
        }
        assert!(matches!(
            node.inbound(&wg, "192.0.2.9:51820".parse().unwrap()),
            Verdict::Taken
        ));
        assert!(matches!(
            node.inbound(&relayed(3, 8, b"\x04x"), hub),
            Verdict::Taken
        ));
        assert_eq!(node.refused(), 2);
        // A probe through the relay goes to the agent, from the relay address.
        let mut probe = relayed(3, 7, &[MAGIC, b'D']);
        probe.extend_from_slice(&[0; 70]);
        assert!(matches!(node.inbound(&probe, hub), Verdict::Taken));
        let (_, from) = rx.try_recv().unwrap();
        assert_eq!(relay_id(&from), Some(3));
    }

    #[test]
    fn wireguard_datagrams_across_the_relay_mark_their_peer_active_and_probes_do_not() {
        let (node, _rx) = MeshSocket::new(false, None);
        let hub: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        node.set_node(7, vec![hub]);
        // A probe through the relay, either way: nobody talks yet.
        let mut probe = relayed(3, 7, &[MAGIC, b'D']);
        probe.extend_from_slice(&[0; 70]);
        node.inbound(&probe, hub);
        node.send(crate::mesh::relay_addr(4), &[MAGIC, b'D', 0]);
        assert!(node.take_active().is_empty());
        // WireGuard's datagrams, in and out.
        node.inbound(&relayed(3, 7, b"\x01handshake"), hub);
        node.send(crate::mesh::relay_addr(4), b"\x04data");
        node.send(crate::mesh::relay_addr(4), b"\x04data");
        let mut active = node.take_active();
        active.sort_unstable();
        assert_eq!(active, vec![3, 4]);
        assert!(node.take_active().is_empty(), "taken once");
    }

    #[test]
    fn a_relayed_datagram_from_a_peer_gone_direct_does_not_move_it_back_to_the_relay() {
        let (node, _rx) = MeshSocket::new(false, None);
        let hub: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let direct: SocketAddr = "198.51.100.3:40000".parse().unwrap();
        node.set_node(7, vec![hub]);
        node.set_direct(3, Some(direct));
        match node.inbound(&relayed(3, 7, b"\x04late"), hub) {
            Verdict::Unwrap { from } => assert_eq!(from, direct),
            Verdict::Taken | Verdict::Forward { .. } => panic!("WireGuard's datagram"),
        }
        node.set_direct(3, None);
        match node.inbound(&relayed(3, 7, b"\x04late"), hub) {
            Verdict::Unwrap { from } => assert_eq!(relay_id(&from), Some(3)),
            Verdict::Taken | Verdict::Forward { .. } => panic!("WireGuard's datagram"),
        }
    }

    #[test]
    fn a_probe_flood_is_dropped_not_queued() {
        let (node, _rx) = MeshSocket::new(false, None);
        let probe = [MAGIC, b'D', 1, 2, 3];
        for _ in 0..DISCO_QUEUE + 100 {
            node.inbound(&probe, "192.0.2.9:1".parse().unwrap());
        }
        assert_eq!(node.refused(), 100);
    }
}
