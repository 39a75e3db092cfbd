//! The hub's part in the mesh: the rendezvous and the relay of last resort.
//!
//! - Sites tell it their candidates (`POST /v1/mesh`); it hands each site
//!   the peer map of the others (`GET /v1/mesh`), tagged for that site,
//!   and pokes every site when any of it changes.
//! - It answers probes on its WireGuard port and on a second port with the
//!   address it saw them from: a site that is seen at two ports from one
//!   socket is behind an endpoint-independent NAT.
//! - It forwards "call me" from one site to another, so that both send at
//!   once and open their NATs.
//! - It keeps the relay's table of where each site is now (the device's
//!   live endpoints): relayed datagrams are forwarded by the transport
//!   ([`crate::wg::mesh`]) without being decrypted.
//!
//! Kernel-backend hubs have no transport of ours: they run no mesh, and
//! their sites stay routed through them.

use super::Hub;
use crate::control::tunnel::MeshClaim;
use crate::keys::{PrivateKey, PublicKey};
use crate::mesh::map::keep_candidates;
use crate::mesh::wire::{Disco, DiscoKind, PairKey};
use crate::mesh::{MeshPeer, NodeId, PeerMap, SignedMap, node_id};
use crate::state::ServerState;
use crate::wg::mesh::{Inbound, MeshSocket};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// How often the relay table follows the device's endpoints.
const TABLE_EVERY: Duration = Duration::from_millis(500);
/// Probes and "call me" per site and second, beyond which it is ignored.
const PER_SECOND: u32 = 20;

pub struct HubMesh {
    socket: Arc<MeshSocket>,
    /// Probes from the device, and the second port: taken by [`run`].
    inbox: Mutex<Option<(mpsc::Receiver<Inbound>, tokio::net::UdpSocket)>>,
    private_key: PrivateKey,
    probe_port: u16,
    claims: Mutex<HashMap<IpAddr, MeshClaim>>,
    /// Where each site is now, as the device sees it.
    live: Mutex<HashMap<IpAddr, SocketAddr>>,
    /// Bumped whenever a map may have changed.
    serial: watch::Sender<u64>,
    keys: Mutex<HashMap<PublicKey, PairKey>>,
    budget: Mutex<HashMap<PublicKey, (Instant, u32)>>,
    /// The tunnel's subnets (never candidates).
    tunnel: Vec<ipnetwork::IpNetwork>,
    /// Everyone's entry as of a serial: made once per change, not once per
    /// site asking (a change makes every site ask).
    everyone: Mutex<Option<(u64, Arc<Everyone>)>>,
}

/// Every site that takes part, as one map entry each.
pub struct Everyone {
    nodes: HashMap<IpAddr, PublicKey>,
    peers: Vec<(IpAddr, MeshPeer)>,
}

impl Everyone {
    /// The map for the site at `me`: everyone else.
    pub fn map_for(&self, me: IpAddr, serial: u64, probe_port: u16) -> Option<PeerMap> {
        let node = *self.nodes.get(&me)?;
        Some(PeerMap {
            node: Some(node),
            serial,
            peers: self
                .peers
                .iter()
                .filter(|(a, _)| *a != me)
                .map(|(_, p)| p.clone())
                .collect(),
            probe_port: Some(probe_port),
        })
    }
}

impl HubMesh {
    /// Binds the second port (any free one, dual-stack where the host has
    /// IPv6); `None` when no port can be had: then the hub runs no mesh.
    pub async fn start(
        socket: Arc<MeshSocket>,
        disco: mpsc::Receiver<Inbound>,
        private_key: PrivateKey,
        tunnel: Vec<ipnetwork::IpNetwork>,
    ) -> Option<Arc<Self>> {
        let probe = match tokio::net::UdpSocket::bind("[::]:0").await {
            Ok(s) => s,
            Err(_) => match tokio::net::UdpSocket::bind("0.0.0.0:0").await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(
                        "no UDP port for the mesh's probes ({e}): sites stay routed through this hub"
                    );
                    return None;
                }
            },
        };
        let port = probe.local_addr().ok()?.port();
        tracing::info!("mesh: probes on UDP port {port} beside the WireGuard port");
        Some(HubMesh::new(
            socket,
            private_key,
            port,
            Some((disco, probe)),
            tunnel,
        ))
    }

    pub(crate) fn new(
        socket: Arc<MeshSocket>,
        private_key: PrivateKey,
        probe_port: u16,
        inbox: Option<(mpsc::Receiver<Inbound>, tokio::net::UdpSocket)>,
        tunnel: Vec<ipnetwork::IpNetwork>,
    ) -> Arc<Self> {
        Arc::new(HubMesh {
            socket,
            inbox: Mutex::new(inbox),
            private_key,
            probe_port,
            claims: Mutex::default(),
            live: Mutex::default(),
            serial: watch::channel(0).0,
            keys: Mutex::default(),
            budget: Mutex::default(),
            tunnel,
            everyone: Mutex::default(),
        })
    }

    pub fn serial(&self) -> watch::Receiver<u64> {
        self.serial.subscribe()
    }

    pub fn probe_port(&self) -> u16 {
        self.probe_port
    }

    /// How many sites take part.
    pub fn sites(&self) -> usize {
        self.claims.lock().expect("not poisoned").len()
    }

    /// Relayed datagrams and bytes so far.
    pub fn relayed(&self) -> (u64, u64) {
        self.socket.relayed()
    }

    fn bump(&self) {
        self.serial.send_modify(|s| *s += 1);
    }

    fn pair_key(&self, peer: &PublicKey) -> Option<PairKey> {
        let mut keys = self.keys.lock().expect("not poisoned");
        if let Some(k) = keys.get(peer) {
            return Some(k.clone());
        }
        let k = PairKey::derive(&self.private_key, peer)?;
        keys.insert(*peer, k.clone());
        Some(k)
    }

    /// Whether `peer` may send one more probe this second.
    fn within_budget(&self, peer: &PublicKey, now: Instant) -> bool {
        let mut b = self.budget.lock().expect("not poisoned");
        let (since, n) = b.entry(*peer).or_insert((now, 0));
        if now.duration_since(*since) >= Duration::from_secs(1) {
            *since = now;
            *n = 0;
        }
        *n += 1;
        *n <= PER_SECOND
    }
}

/// Every site that takes part (it told its candidates), with where it
/// may be reached: where the hub sees it first, then its port forward,
/// then its own addresses.
pub fn everyone(
    state: &ServerState,
    claims: &HashMap<IpAddr, MeshClaim>,
    live: &HashMap<IpAddr, SocketAddr>,
    routes: &[super::Advertised],
) -> Everyone {
    let subnets = state.subnets();
    let tunnel = subnets.all();
    let sites = state
        .peers
        .iter()
        .filter(|p| p.via.is_none() && !p.road_warrior);
    let nodes = sites.clone().map(|p| (p.address, p.public_key)).collect();
    let peers = sites
        .filter_map(|p| {
            let claim = claims.get(&p.address)?;
            let mut candidates: Vec<SocketAddr> = vec![];
            candidates.extend(
                live.get(&p.address)
                    .filter(|e| !crate::transport::is_virtual(e)),
            );
            candidates.extend(claim.advertise);
            candidates.extend(claim.local.iter().copied());
            Some((
                p.address,
                MeshPeer {
                    public_key: p.public_key,
                    addresses: std::iter::once(p.address)
                        .chain(subnets.twin(p.address))
                        .collect(),
                    routes: routes
                        .iter()
                        .filter(|a| a.via == p.address)
                        .map(|a| a.prefix)
                        .collect(),
                    name: p.name.clone(),
                    candidates: keep_candidates(&candidates, &tunnel),
                    nat: claim.nat,
                },
            ))
        })
        .collect();
    Everyone { nodes, peers }
}

impl Hub {
    pub fn with_mesh(mut self, mesh: Option<Arc<HubMesh>>) -> Self {
        self.mesh = mesh;
        self
    }

    pub fn mesh(&self) -> Option<&Arc<HubMesh>> {
        self.mesh.as_ref()
    }

    /// A site's candidates; `false` when this hub runs no mesh.
    pub async fn claim_mesh(&self, site: IpAddr, claim: MeshClaim) -> bool {
        let Some(mesh) = &self.mesh else { return false };
        let tunnel = &mesh.tunnel;
        let claim = MeshClaim {
            local: keep_candidates(&claim.local, tunnel),
            advertise: claim
                .advertise
                .filter(|a| crate::mesh::map::plausible(a, tunnel)),
            nat: claim.nat,
        };
        let changed = mesh
            .claims
            .lock()
            .expect("not poisoned")
            .insert(site, claim.clone())
            .is_none_or(|old| old != claim);
        if changed {
            mesh.bump();
        }
        true
    }

    /// The map for the site at `site`, tagged for it.
    pub async fn mesh_map(&self, site: IpAddr) -> Option<SignedMap> {
        let mesh = self.mesh.as_ref()?;
        let serial = *mesh.serial.borrow();
        let cached = mesh
            .everyone
            .lock()
            .expect("not poisoned")
            .as_ref()
            .filter(|(s, _)| *s == serial)
            .map(|(_, e)| e.clone());
        let all = match cached {
            Some(e) => e,
            None => {
                let state = self.snapshot().await;
                let routes = self.routes().borrow().clone();
                let e = {
                    let claims = mesh.claims.lock().expect("not poisoned");
                    let live = mesh.live.lock().expect("not poisoned");
                    Arc::new(everyone(&state, &claims, &live, &routes))
                };
                *mesh.everyone.lock().expect("not poisoned") = Some((serial, e.clone()));
                e
            }
        };
        let map = all.map_for(site, serial, mesh.probe_port)?;
        let key = mesh.pair_key(map.node.as_ref()?)?;
        Some(SignedMap::sign(&map, &key))
    }
}

/// Keeps the relay table and the live endpoints current, answers probes
/// and forwards "call me", until `stop`.
pub async fn run(hub: Arc<Hub>, stop: impl std::future::Future<Output = ()>) {
    let Some(mesh) = hub.mesh().cloned() else {
        return stop.await;
    };
    let Some((mut disco, probe)) = mesh.inbox.lock().expect("not poisoned").take() else {
        return stop.await;
    };
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(TABLE_EVERY);
    let mut changes = hub.changes();
    let mut routes = hub.routes();
    let mut sites: HashMap<PublicKey, IpAddr> = HashMap::new();
    let mut buf = vec![0u8; 1500];
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {
                sites = follow_endpoints(&hub, &mesh).await;
            }
            r = changes.changed() => {
                // A site that joined is in no map until it claims; one that
                // left or was revoked goes from every map at once.
                if r.is_err() { return stop.await }
                sites = follow_endpoints(&hub, &mesh).await;
            }
            r = routes.changed() => {
                if r.is_err() { return stop.await }
                mesh.bump();
            }
            Some((d, from)) = disco.recv() => {
                answer(&mesh, &sites, &d, from, Reply::Device);
            }
            r = probe.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    let from = unmap(from);
                    if let Some(reply) = answer(&mesh, &sites, &buf[..n], from, Reply::Probe) {
                        let _ = probe.send_to(&reply, from).await;
                    }
                }
            }
        }
    }
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    }
}

/// Reads the device's live endpoints into the relay table and the map;
/// returns the sites by key.
async fn follow_endpoints(hub: &Hub, mesh: &HubMesh) -> HashMap<PublicKey, IpAddr> {
    let state = hub.snapshot().await;
    let Ok(peers) = hub.device().peers().await else {
        return HashMap::new();
    };
    let by_key: HashMap<PublicKey, IpAddr> = state
        .peers
        .iter()
        .filter(|p| p.via.is_none() && !p.road_warrior)
        .map(|p| (p.public_key, p.address))
        .collect();
    let mut table: HashMap<NodeId, SocketAddr> = HashMap::new();
    let mut live: HashMap<IpAddr, SocketAddr> = HashMap::new();
    for p in peers {
        if let (Some(addr), Some(e)) = (by_key.get(&p.public_key), p.endpoint) {
            live.insert(*addr, e);
            if let Some(id) = node_id(*addr) {
                table.insert(id, e);
            }
        }
    }
    mesh.socket.set_table(table);
    let changed = {
        let mut claims = mesh.claims.lock().expect("not poisoned");
        let before = claims.len();
        claims.retain(|a, _| by_key.values().any(|s| s == a));
        let gone = claims.len() != before;
        let mut old = mesh.live.lock().expect("not poisoned");
        let moved = live
            .iter()
            .any(|(a, e)| claims.contains_key(a) && old.get(a) != Some(e));
        *old = live;
        moved || gone
    };
    if changed {
        mesh.bump();
    }
    by_key
}

/// Which of the hub's sockets a probe came in on.
#[derive(Clone, Copy)]
enum Reply {
    /// The WireGuard socket: the transport sends the answer.
    Device,
    /// The second port: the caller sends it.
    Probe,
}

/// Answers one probe; returns what the caller sends back (second port).
fn answer(
    mesh: &HubMesh,
    sites: &HashMap<PublicKey, IpAddr>,
    d: &[u8],
    from: SocketAddr,
    via: Reply,
) -> Option<Vec<u8>> {
    let sender = Disco::sender(d)?;
    // Only admitted sites are answered: no key exchange for strangers.
    if !sites.contains_key(&sender) {
        tracing::trace!("mesh: a probe from {from} in the name of {sender}, not a site");
        return None;
    }
    if !mesh.within_budget(&sender, Instant::now()) {
        return None;
    }
    let key = mesh.pair_key(&sender)?;
    let msg = match Disco::decode(d, &key) {
        Ok(m) => m,
        // Within the sender's budget, so this cannot flood the log.
        Err(e) => {
            tracing::debug!("probe from {from}: {e}");
            return None;
        }
    };
    let me = mesh.private_key.public_key();
    tracing::trace!("mesh: {:?} from {from}", msg.kind);
    match msg.kind {
        DiscoKind::Ping => {
            let pong = Disco {
                sender: me,
                txid: msg.txid,
                kind: DiscoKind::Pong { observed: from },
            }
            .encode(&key);
            match via {
                Reply::Device => {
                    mesh.socket.send_raw(from, &pong);
                    None
                }
                Reply::Probe => Some(pong),
            }
        }
        DiscoKind::CallMe { peer, .. } => {
            // Only between sites, to where the other one is now.
            sites.get(&peer)?;
            let to = {
                let live = mesh.live.lock().expect("not poisoned");
                *live.get(sites.get(&peer)?)?
            };
            let theirs = mesh.pair_key(&peer)?;
            let at = (!crate::transport::is_virtual(&from)).then_some(from);
            let fwd = Disco {
                sender: me,
                txid: msg.txid,
                kind: DiscoKind::CallMe {
                    peer: msg.sender,
                    at,
                },
            }
            .encode(&theirs);
            mesh.socket.send_raw(to, &fwd);
            None
        }
        DiscoKind::Pong { .. } => None,
    }
}
