//! A node's mesh agent: it keeps a WireGuard peer for every other node in
//! the hub's peer map and drives the path core ([`crate::mesh::Paths`])
//! with what the device's socket and statistics show.
//!
//! Two tasks, so that a hub that does not answer never delays a probe:
//! - the control task asks the hub for the map (at start, when poked, every
//!   [`MAP_POLL`]) and tells it this node's candidates;
//! - the path task answers and sends probes, sets endpoints, and watches
//!   traffic. It starts from the map cached on disk, so a node whose hub is
//!   gone keeps its direct paths; nothing is removed because the hub does
//!   not answer.

use crate::control::auth::Signer;
use crate::control::tunnel::{self, MeshClaim};
use crate::keys::{PrivateKey, PublicKey};
use crate::mesh::paths::{Chosen, Effect, Paths, Timings};
use crate::mesh::wire::{Disco, DiscoKind, NatKind, PairKey};
use crate::mesh::{MeshPeer, PeerMap, relay_addr};
use crate::store::StateDir;
use crate::wg::mesh::{Inbound, MeshSocket};
use crate::wg::{PeerSpec, WgDevice};
use ipnetwork::IpNetwork;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, watch};

/// How often the map is asked for though not poked (a lost poke).
const MAP_POLL: Duration = Duration::from_secs(30);
/// How often candidates and the NAT's behaviour are looked at again.
const CLAIM_EVERY: Duration = Duration::from_secs(60);
/// Device statistics: traffic per peer, the hub's endpoint.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// New peers greeted at once, at most (see `Walker::greet`).
const GREET_AT_MOST: usize = 64;
/// How long relayed traffic from a peer not yet in the map is remembered
/// (the map that has it is on its way).
const UNMATCHED_FOR: Duration = Duration::from_secs(10);
/// Relayed traffic is looked at no more often than this: a bulk transfer
/// through the relay must not wake the path task for every datagram.
const ACTIVITY_EVERY: Duration = Duration::from_millis(100);
/// A stranger's datagrams make a site ask for the map at most this often.
const STRANGER_EVERY: Duration = Duration::from_secs(1);
/// Pongs per peer and second; pings beyond are not answered.
const PONGS_PER_SECOND: u32 = 20;
/// Probes handled between two polls of the paths, at most: enough that
/// a busy site polls rarely, few enough that its answers are not late.
const DISCO_BATCH: usize = 256;

/// `first` and whatever else `rx` holds now, `max` in all at most.
fn drain<T>(first: T, rx: &mut mpsc::Receiver<T>, max: usize) -> Vec<T> {
    let mut out = vec![first];
    while out.len() < max {
        match rx.try_recv() {
            Ok(next) => out.push(next),
            Err(_) => break,
        }
    }
    out
}

/// What `status` shows of the mesh.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshView {
    pub nat: Option<NatKind>,
    pub peers: Vec<PeerPath>,
    /// Path changes so far.
    pub changes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerPath {
    pub public_key: PublicKey,
    pub name: Option<String>,
    pub address: Option<IpAddr>,
    pub chosen: Chosen,
    pub rtt: Option<Duration>,
    /// The wall-clock time of the last pong on the path in use.
    pub last_answer: Option<SystemTime>,
}

/// Held while a LAN's peer is chosen: the agent gives LANs to mesh peers
/// and says so in [`Agent::owned`]; the site gives the rest to the hub's
/// peer. An allowed IP belongs to one peer and moves to whichever peer was
/// set last, so each side reads `owned` and sets its peers under this
/// lock. Without it the hub's peer, set from an `owned` read a moment
/// earlier, takes a LAN just given to a mesh peer and then, told, lets it
/// go: the LAN is on no peer and nothing reaches it.
pub type AllowedLock = Arc<tokio::sync::Mutex<()>>;

/// Everything the agent needs, handed in by the site.
pub struct Agent {
    pub device: Arc<dyn WgDevice>,
    pub socket: Arc<MeshSocket>,
    pub disco: mpsc::Receiver<Inbound>,
    pub private_key: PrivateKey,
    pub hub_key: PublicKey,
    /// The hub's address on the tunnel: its API, and the name of the relay.
    pub hub_address: IpAddr,
    pub api: crate::control::tunnel::HubApi,
    pub own_address: IpAddr,
    pub store: StateDir,
    pub iface: String,
    pub advertise: Option<SocketAddr>,
    /// The tunnel's subnets (never candidates).
    pub tunnel: Vec<IpNetwork>,
    /// Bumped when the hub pokes this node.
    pub pokes: watch::Receiver<u64>,
    /// The LANs now carried by mesh peers: not the hub's to carry.
    pub owned: watch::Sender<Vec<IpNetwork>>,
    /// Held from setting peers' allowed IPs to telling `owned`.
    pub allowed: AllowedLock,
    pub view: watch::Sender<MeshView>,
    /// Told once the first peer map is in the device (cached or the hub's).
    pub first_map: Option<tokio::sync::oneshot::Sender<()>>,
}

fn node_id_of(a: IpAddr) -> u32 {
    crate::mesh::node_id(a).unwrap_or(0)
}

impl Agent {
    pub async fn run(self, stop: impl std::future::Future<Output = ()> + Send + 'static) {
        use futures::FutureExt;
        let Some(hub_pair) = PairKey::derive(&self.private_key, &self.hub_key) else {
            return stop.await;
        };
        let signer = match Signer::new(&self.private_key, &self.hub_key) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("mesh off: {e}");
                return stop.await;
            }
        };
        self.socket.set_node(node_id_of(self.own_address), vec![]);
        let (maps_tx, maps_rx) = mpsc::channel(4);
        let claim = watch::channel(MeshClaim::default());
        let control = Control {
            api: self.api,
            socket: self.socket.clone(),
            signer,
            pokes: self.pokes.clone(),
            claim: claim.1,
            maps: maps_tx,
            pair: hub_pair.clone(),
            me: self.private_key.public_key(),
            store: self.store.clone(),
            iface: self.iface.clone(),
        };
        let stop = stop.boxed().shared();
        let walker = Walker::new(self, hub_pair, claim.0, maps_rx);
        // The control task may be waiting on a hub that is gone: stopping
        // drops that request rather than waiting it out.
        let (stop_a, stop_b) = (stop.clone(), stop.clone());
        let asking = async move {
            tokio::select! {
                _ = control.run(stop_a) => {}
                _ = stop_b => {}
            }
        };
        tokio::join!(asking, walker.run(stop));
    }
}

/// The control task.
struct Control {
    api: crate::control::tunnel::HubApi,
    socket: Arc<MeshSocket>,
    signer: Signer,
    pokes: watch::Receiver<u64>,
    claim: watch::Receiver<MeshClaim>,
    /// The hub's maps as they change; `None`: the hub runs no mesh.
    maps: mpsc::Sender<Option<PeerMap>>,
    pair: PairKey,
    me: PublicKey,
    store: StateDir,
    iface: String,
}

impl Control {
    async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut wait = Duration::ZERO;
        let mut claimed: Option<MeshClaim> = None;
        let mut last_serial: Option<u64> = None;
        let mut last_map: Option<String> = None;
        let mut peers = 0u32;
        let mut last_stranger = Instant::now()
            .checked_sub(STRANGER_EVERY)
            .unwrap_or_else(Instant::now);
        loop {
            let mut poked = false;
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(wait) => {}
                r = self.pokes.changed() => {
                    if r.is_err() { return stop.await }
                    poked = true;
                }
                r = self.claim.changed() => if r.is_err() { return stop.await },
                // A site we do not know yet sends to us: ask at once (but
                // not more than once a second, whoever keeps sending).
                _ = self.socket.stranger(), if last_stranger.elapsed() >= STRANGER_EVERY => {
                    last_stranger = Instant::now();
                }
            }
            if poked {
                // A poke goes to every site at once: with many, spread the
                // asking (4 ms per peer, at most 400 ms) rather than all at
                // once; with few, ask at once, as until both sides of a new
                // pair have each other, their packets are dropped.
                let spread = (4 * peers).clamp(1, 400);
                let jitter = rand_core::RngCore::next_u32(&mut rand_core::OsRng) % spread;
                tokio::time::sleep(Duration::from_millis(u64::from(jitter))).await;
            }
            let claim = self.claim.borrow_and_update().clone();
            if claimed.as_ref() != Some(&claim) {
                match tunnel::claim_mesh(self.api, &self.signer, &claim, Duration::from_secs(5))
                    .await
                {
                    Ok(true) => claimed = Some(claim),
                    Ok(false) => {
                        tracing::info!("the hub runs no mesh: peers are reached through it");
                        claimed = Some(claim);
                    }
                    Err(e) => tracing::debug!("telling the hub our candidates: {e}"),
                }
            }
            wait = match tunnel::fetch_mesh(self.api, Duration::from_secs(5)).await {
                Ok(Some(signed)) => match signed.open(&self.pair, &self.me) {
                    Ok(map) => {
                        // A hub that restarted counts from 0 and has
                        // forgotten our candidates: tell it again.
                        let restarted = last_serial.is_some_and(|s| map.serial < s);
                        if restarted {
                            claimed = None;
                        }
                        last_serial = Some(map.serial);
                        peers = u32::try_from(map.peers.len()).unwrap_or(u32::MAX);
                        // Only what changed beyond the serial is applied and saved.
                        let mut unnumbered = map.clone();
                        unnumbered.serial = 0;
                        let text = serde_json::to_string(&unnumbered).unwrap_or_default();
                        if last_map.as_ref() != Some(&text) {
                            last_map = Some(text);
                            let _ = self.maps.send(Some(map)).await;
                            if let Err(e) = self.store.save_mesh(&self.iface, &signed) {
                                tracing::warn!("caching the peer map: {e}");
                            }
                        }
                        if restarted { Duration::ZERO } else { MAP_POLL }
                    }
                    Err(e) => {
                        tracing::warn!("the hub's peer map: {e}");
                        MAP_POLL
                    }
                },
                Ok(None) => {
                    // Nothing to wait for: the site is ready as it is.
                    let _ = self.maps.try_send(None);
                    MAP_POLL
                }
                Err(e) => {
                    tracing::debug!("asking the hub for the peer map: {e}");
                    Duration::from_secs(2)
                }
            };
        }
    }
}

/// NAT discovery: a ping to each of two hub ports, and what they saw.
#[derive(Default)]
struct NatProbe {
    /// txid → which port (0: WireGuard's, 1: the second one).
    sent: HashMap<[u8; 12], usize>,
    seen: [Option<SocketAddr>; 2],
}

/// The path task.
struct Walker {
    a: Agent,
    hub_pair: PairKey,
    claim: watch::Sender<MeshClaim>,
    maps: mpsc::Receiver<Option<PeerMap>>,
    paths: Paths,
    /// The peers in the device now, as the map gave them.
    installed: HashMap<PublicKey, MeshPeer>,
    /// Relay id → key, for the peers installed.
    ids: HashMap<u32, PublicKey>,
    /// Relay ids whose datagrams crossed the relay before the map had them.
    unmatched: HashMap<u32, Instant>,
    keys: HashMap<PublicKey, PairKey>,
    probe_port: Option<u16>,
    hub_endpoint: Option<SocketAddr>,
    nat: NatProbe,
    traffic: HashMap<PublicKey, (u64, u64)>,
    pongs: HashMap<PublicKey, (Instant, u32)>,
    changes: u64,
    rng: rand_core::OsRng,
    /// When to look at candidates and the NAT again.
    claim_at: Instant,
}

impl Walker {
    fn new(
        a: Agent,
        hub_pair: PairKey,
        claim: watch::Sender<MeshClaim>,
        maps: mpsc::Receiver<Option<PeerMap>>,
    ) -> Walker {
        let skip = [a.iface.as_str()];
        let local = crate::sys::local_networks(&skip, &a.tunnel);
        Walker {
            a,
            hub_pair,
            claim,
            maps,
            paths: Paths::new(Timings::default(), local),
            installed: HashMap::new(),
            ids: HashMap::new(),
            unmatched: HashMap::new(),
            keys: HashMap::new(),
            probe_port: None,
            hub_endpoint: None,
            nat: NatProbe::default(),
            traffic: HashMap::new(),
            pongs: HashMap::new(),
            changes: 0,
            rng: rand_core::OsRng,
            claim_at: Instant::now(),
        }
    }

    async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        // The cached map first: the hub may be gone.
        if let Some(cached) = self.a.store.load_mesh(&self.a.iface) {
            match cached.open(&self.hub_pair, &self.a.private_key.public_key()) {
                Ok(map) => self.apply(map).await,
                Err(e) => tracing::warn!("ignoring the cached peer map: {e}"),
            }
        }
        if !self.installed.is_empty()
            && let Some(t) = self.a.first_map.take()
        {
            let _ = t.send(());
        }
        let mut stats_at = Instant::now();
        let mut activity_at = Instant::now();
        loop {
            let now = Instant::now();
            if now >= stats_at {
                self.stats(now).await;
                stats_at = now + STATS_EVERY;
            }
            if now >= self.claim_at {
                self.claim_at = now + CLAIM_EVERY;
                self.reclaim().await;
            }
            let effects = self.paths.poll(now, &mut self.rng);
            self.act(effects).await;
            self.publish();
            let next = [
                Some(stats_at),
                Some(self.claim_at),
                self.paths.deadline(),
                (activity_at > now).then_some(activity_at),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + STATS_EVERY);
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep_until(next.into()) => {}
                () = self.a.socket.activity(), if now >= activity_at => {
                    activity_at = now + ACTIVITY_EVERY;
                    self.relayed_traffic(now);
                }
                Some(map) = self.maps.recv() => {
                    if let Some(map) = map {
                        self.apply(map).await;
                    }
                    if let Some(t) = self.a.first_map.take() {
                        let _ = t.send(());
                    }
                }
                Some(first) = self.a.disco.recv() => {
                    // Every probe already queued, then one poll: a poll
                    // walks every peer (and so does publishing the view),
                    // so one per datagram made a site with a hundred busy
                    // peers spend its CPU walking them.
                    for (d, from) in drain(first, &mut self.a.disco, DISCO_BATCH) {
                        self.probe_in(&d, from);
                    }
                }
            }
        }
        // The peers go with the device; nothing else to undo.
    }

    /// Installs the map's peers in the device, removes those gone, and
    /// tells the path core.
    async fn apply(&mut self, map: PeerMap) {
        if self.probe_port != map.probe_port {
            // The hub's second port is known now: find out about the NAT.
            self.probe_port = map.probe_port;
            self.claim_at = Instant::now();
        }
        let dev = self.a.device.clone();
        let _held = self.a.allowed.clone().lock_owned().await;
        for gone in self
            .installed
            .keys()
            .filter(|k| !map.peers.iter().any(|p| p.public_key == **k))
            .copied()
            .collect::<Vec<_>>()
        {
            if let Err(e) = dev.remove_peer(&gone).await {
                tracing::warn!("removing mesh peer {gone}: {e}");
            }
            if let Some(id) = self.installed.remove(&gone).as_ref().and_then(MeshPeer::id) {
                self.a.socket.set_direct(id, None);
            }
            self.ids.retain(|_, k| *k != gone);
            self.keys.remove(&gone);
        }
        let mut new = vec![];
        for p in &map.peers {
            let Some(id) = p.id() else { continue };
            if p.public_key == self.a.hub_key || p.public_key == self.a.private_key.public_key() {
                continue;
            }
            let r = match self.installed.get(&p.public_key) {
                None => {
                    dev.upsert_peer(&PeerSpec {
                        public_key: p.public_key,
                        endpoint: Some(relay_addr(id)),
                        allowed_ips: p.allowed_ips(),
                        keepalive: None,
                    })
                    .await
                }
                Some(old) if old.allowed_ips() != p.allowed_ips() => {
                    dev.set_allowed_ips(&p.public_key, &p.allowed_ips()).await
                }
                Some(_) => Ok(()),
            };
            match r {
                Ok(()) => {
                    self.ids.insert(id, p.public_key);
                    if self.installed.insert(p.public_key, p.clone()).is_none()
                        && self
                            .unmatched
                            .remove(&id)
                            .is_some_and(|at| at.elapsed() < UNMATCHED_FOR)
                    {
                        // It sent to us before we had it: what it sent
                        // was dropped. Answer, and look for a direct path.
                        self.paths.on_traffic(&p.public_key, Instant::now());
                        new.extend(p.addresses.first().copied());
                    }
                }
                Err(e) => tracing::warn!("adding mesh peer {}: {e}", p.public_key),
            }
        }
        self.greet(&new).await;
        let peers: Vec<MeshPeer> = self.installed.values().cloned().collect();
        self.a
            .socket
            .set_known(peers.iter().filter_map(MeshPeer::id).collect());
        self.paths.set_peers(&peers, Instant::now());
        let mut owned: Vec<IpNetwork> = peers.iter().flat_map(|p| p.routes.clone()).collect();
        owned.sort();
        owned.dedup();
        self.a.owned.send_if_modified(|o| {
            let changed = *o != owned;
            *o = owned;
            changed
        });
    }

    /// A peer that sent to us before our map had it (it joined a moment
    /// ago) had its handshake dropped, and WireGuard would try again only
    /// after 5 s. An empty datagram to it (the discard port) makes our
    /// side start a handshake now, through the relay.
    async fn greet(&self, new: &[IpAddr]) {
        if new.is_empty() {
            return;
        }
        let Ok(sock) = tokio::net::UdpSocket::bind(SocketAddr::new(self.a.own_address, 0)).await
        else {
            return;
        };
        for a in new.iter().take(GREET_AT_MOST) {
            let _ = sock.send_to(b"", SocketAddr::new(*a, 9)).await;
        }
    }

    /// WireGuard datagrams crossed the relay: someone talks to these peers.
    fn relayed_traffic(&mut self, now: Instant) {
        self.unmatched
            .retain(|_, at| now.saturating_duration_since(*at) < UNMATCHED_FOR);
        for id in self.a.socket.take_active() {
            match self.ids.get(&id).copied() {
                Some(key) => self.paths.on_traffic(&key, now),
                None => {
                    self.unmatched.insert(id, now);
                }
            }
        }
    }

    /// The device's endpoint for a peer chosen direct is where the probes
    /// chose (the socket keeps relayed datagrams from moving it; this is
    /// the check that nothing else did).
    async fn keep_direct(&self, key: &PublicKey, endpoint: Option<SocketAddr>) {
        let Some(Chosen::Direct(a)) = self.paths.chosen(key) else {
            return;
        };
        if endpoint == Some(a) {
            return;
        }
        if let Err(e) = self.a.device.set_endpoint(key, a).await {
            tracing::warn!("setting the path of {key}: {e}");
        }
    }

    fn pair(&mut self, peer: &PublicKey) -> Option<PairKey> {
        if let Some(k) = self.keys.get(peer) {
            return Some(k.clone());
        }
        if !self.installed.contains_key(peer) {
            return None;
        }
        let k = PairKey::derive(&self.a.private_key, peer)?;
        self.keys.insert(*peer, k.clone());
        Some(k)
    }

    /// One probe datagram from the socket.
    fn probe_in(&mut self, d: &[u8], from: SocketAddr) {
        let Some(sender) = Disco::sender(d) else {
            return;
        };
        let now = Instant::now();
        if sender == self.a.hub_key {
            let m = match Disco::decode(d, &self.hub_pair) {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!("mesh: a probe from the hub at {from}: {e}");
                    return;
                }
            };
            tracing::trace!("mesh: {:?} from the hub at {from}", m.kind);
            match m.kind {
                DiscoKind::Pong { observed } => self.nat_seen(m.txid, observed),
                DiscoKind::CallMe { peer, at } => self.paths.on_call_me(&peer, at, now),
                DiscoKind::Ping => {}
            }
            return;
        }
        let Some(key) = self.pair(&sender) else {
            return;
        };
        let Ok(m) = Disco::decode(d, &key) else {
            return;
        };
        tracing::trace!("mesh: {:?} from {sender} at {from}", m.kind);
        match m.kind {
            DiscoKind::Ping => {
                if !self.may_pong(&sender, now) {
                    return;
                }
                let pong = Disco {
                    sender: self.a.private_key.public_key(),
                    txid: m.txid,
                    kind: DiscoKind::Pong { observed: from },
                }
                .encode(&key);
                self.a.socket.send(from, &pong);
                self.paths.on_ping(&sender, from, now);
            }
            DiscoKind::Pong { .. } => self.paths.on_pong(&sender, from, m.txid, now),
            DiscoKind::CallMe { .. } => {}
        }
    }

    fn may_pong(&mut self, peer: &PublicKey, now: Instant) -> bool {
        let (since, n) = self.pongs.entry(*peer).or_insert((now, 0));
        if now.duration_since(*since) >= Duration::from_secs(1) {
            *since = now;
            *n = 0;
        }
        *n += 1;
        *n <= PONGS_PER_SECOND
    }

    async fn act(&mut self, effects: Vec<Effect>) {
        let me = self.a.private_key.public_key();
        for e in effects {
            match e {
                Effect::Ping { peer, to, txid } => {
                    tracing::trace!("mesh: ping {peer} at {to}");
                    if let Some(key) = self.pair(&peer) {
                        let ping = Disco {
                            sender: me,
                            txid,
                            kind: DiscoKind::Ping,
                        }
                        .encode(&key);
                        self.a.socket.send(to, &ping);
                    }
                }
                Effect::CallMe { peer } => {
                    let Some(hub) = self.hub_endpoint else {
                        continue;
                    };
                    let mut txid = [0u8; 12];
                    rand_core::RngCore::fill_bytes(&mut self.rng, &mut txid);
                    let m = Disco {
                        sender: me,
                        txid,
                        kind: DiscoKind::CallMe { peer, at: None },
                    }
                    .encode(&self.hub_pair);
                    self.a.socket.send_raw(hub, &m);
                }
                Effect::SetPath { peer, path } => {
                    let Some(id) = self.installed.get(&peer).and_then(MeshPeer::id) else {
                        continue;
                    };
                    let to = match path {
                        Chosen::Direct(a) => a,
                        Chosen::Relay => relay_addr(id),
                    };
                    let name = self.installed.get(&peer).and_then(|p| p.name.clone());
                    tracing::info!(
                        "mesh: {} now {}",
                        name.unwrap_or_else(|| peer.to_string()),
                        match path {
                            Chosen::Direct(a) => format!("direct {a}"),
                            Chosen::Relay => format!("relayed via {}", self.a.hub_address),
                        }
                    );
                    self.changes += 1;
                    self.a.socket.set_direct(
                        id,
                        match path {
                            Chosen::Direct(a) => Some(a),
                            Chosen::Relay => None,
                        },
                    );
                    if let Err(e) = self.a.device.set_endpoint(&peer, to).await {
                        tracing::warn!("setting the path of {peer}: {e}");
                    }
                }
            }
        }
    }

    /// Traffic per peer, the hub's endpoint, and the mesh peers' allowed
    /// IPs put back where a hub's route change took them.
    async fn stats(&mut self, now: Instant) {
        let Ok(peers) = self.a.device.peers().await else {
            return;
        };
        for p in &peers {
            if p.public_key == self.a.hub_key {
                if p.endpoint != self.hub_endpoint {
                    self.hub_endpoint = p.endpoint;
                    self.a.socket.set_node(
                        node_id_of(self.a.own_address),
                        p.endpoint.into_iter().collect(),
                    );
                }
                continue;
            }
            let Some(want) = self.installed.get(&p.public_key) else {
                continue;
            };
            let mut want = want.allowed_ips();
            let mut have = p.allowed_ips.clone();
            want.sort();
            have.sort();
            if want != have {
                let _held = self.a.allowed.lock().await;
                if let Err(e) = self.a.device.set_allowed_ips(&p.public_key, &want).await {
                    tracing::warn!("mesh peer {}: {e}", p.public_key);
                }
            }
            self.keep_direct(&p.public_key, p.endpoint).await;
            let bytes = (p.rx_bytes, p.tx_bytes);
            if self
                .traffic
                .insert(p.public_key, bytes)
                .is_some_and(|b| b != bytes)
            {
                self.paths.on_traffic(&p.public_key, now);
            }
        }
    }

    /// Looks at this host's addresses again and asks the hub's two ports
    /// where they see us; the control task tells the hub what changed.
    async fn reclaim(&mut self) {
        // The device's port: where its candidates are reached.
        let port = self.a.device.listen_port().await.ok();
        let skip = [self.a.iface.as_str()];
        let mine = crate::sys::local_addresses(&skip, &self.a.tunnel);
        self.paths
            .set_local(crate::sys::local_networks(&skip, &self.a.tunnel));
        if let Some(port) = port {
            let local: Vec<SocketAddr> = mine.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
            let advertise = self.a.advertise;
            self.claim.send_if_modified(|c| {
                let changed = c.local != local || c.advertise != advertise;
                c.local = local;
                c.advertise = advertise;
                changed
            });
        }
        self.nat = NatProbe::default();
        let Some(hub) = self
            .hub_endpoint
            .filter(|e| !crate::transport::is_virtual(e))
        else {
            return;
        };
        if self.claim.borrow().nat.is_none() {
            // Not found out yet (the hub may not know us yet): soon again.
            self.claim_at = Instant::now() + Duration::from_secs(3);
        }
        let me = self.a.private_key.public_key();
        let targets = [
            Some(hub),
            self.probe_port.map(|p| SocketAddr::new(hub.ip(), p)),
        ];
        for (i, to) in targets.into_iter().enumerate() {
            let Some(to) = to else { continue };
            let mut txid = [0u8; 12];
            rand_core::RngCore::fill_bytes(&mut self.rng, &mut txid);
            self.nat.sent.insert(txid, i);
            tracing::trace!("mesh: ping the hub at {to}");
            let ping = Disco {
                sender: me,
                txid,
                kind: DiscoKind::Ping,
            }
            .encode(&self.hub_pair);
            self.a.socket.send_raw(to, &ping);
        }
    }

    fn nat_seen(&mut self, txid: [u8; 12], observed: SocketAddr) {
        let Some(i) = self.nat.sent.remove(&txid) else {
            return;
        };
        self.nat.seen[i] = Some(observed);
        if let [Some(a), Some(b)] = self.nat.seen {
            let skip = [self.a.iface.as_str()];
            let mine = crate::sys::local_addresses(&skip, &self.a.tunnel);
            let kind = NatKind::classify(a, b, &mine);
            self.claim.send_if_modified(|c| {
                let changed = c.nat != Some(kind);
                c.nat = Some(kind);
                changed
            });
        }
    }

    fn publish(&self) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let peers = self
            .paths
            .view()
            .into_iter()
            .map(|v| {
                let p = self.installed.get(&v.peer);
                PeerPath {
                    public_key: v.peer,
                    name: p.and_then(|p| p.name.clone()),
                    address: p.and_then(|p| p.addresses.first().copied()),
                    chosen: v.chosen,
                    rtt: v.rtt,
                    last_answer: v.last_pong.map(|l| wall - now.saturating_duration_since(l)),
                }
            })
            .collect();
        let view = MeshView {
            nat: self.claim.borrow().nat,
            peers,
            changes: self.changes,
        };
        self.a.view.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_waiting_are_taken_together_up_to_the_batch() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 1..=5 {
            tx.send(i).await.unwrap();
        }
        assert_eq!(drain(0, &mut rx, 4), vec![0, 1, 2, 3]);
        assert_eq!(drain(9, &mut rx, 4), vec![9, 4, 5]);
        assert_eq!(drain(7, &mut rx, 4), vec![7]);
    }
}
