//! The server's bookkeeping: invites, redemption, and the key swap.
//!
//! Redemption happens over the tunnel, authenticated by the invite key: a
//! request from the invite's address can only come from the invite's holder.
//! The swap from invite key to the joiner's own key is done in two steps so
//! that the reply to the redeem request still reaches the joiner:
//! 1. on redeem, the joiner's key is added as a peer *without* allowed IPs
//!    (a handshake needs none) and the state is saved;
//! 2. once that key has completed a handshake (the joiner has switched), the
//!    address moves from the invite to the joiner's key.
//!
//! A redeemed invite stays a peer without allowed IPs until it expires, so
//! that a reused token completes a handshake but gets no answer: the joiner
//! can then say "already used" instead of "server unreachable".

use crate::ipam::{IpamError, Pool};
use crate::keys::{PrivateKey, PublicKey};
use crate::state::{
    ContainerRecord, Endpoint, InviteRecord, PeerRecord, ServerState, StateDir, StateError,
};
use crate::token::Token;
use crate::wg::{PeerSpec, WgDevice, WgError};
use ipnetwork::IpNetwork;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{Mutex, Notify};

/// How long a redeemed key may take to show up before the address moves anyway.
const SWAP_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Wg(#[from] WgError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
}

/// Why a redeem request was refused. The text goes back to the joiner.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RedeemError {
    #[error("no invite is waiting for {0}")]
    NoInvite(IpAddr),
    #[error("this token was already used")]
    AlreadyUsed,
    #[error("this token has expired")]
    Expired,
    #[error("that public key is already in use on this server")]
    KeyInUse,
    #[error("server error: {0}")]
    Internal(String),
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The single-address network of a host: /32 or /128.
pub fn host_net(addr: IpAddr) -> IpNetwork {
    IpNetwork::new(addr, if addr.is_ipv4() { 32 } else { 128 }).expect("full prefix is valid")
}

/// The peers a server device starts with, from its saved state.
pub fn device_peers(state: &ServerState, now: SystemTime) -> Vec<PeerSpec> {
    let now = unix(now);
    let peers = state.peers.iter().map(|p| PeerSpec {
        public_key: p.public_key,
        endpoint: p.endpoint,
        allowed_ips: vec![host_net(p.address)],
        keepalive: None,
    });
    let invites = state
        .invites
        .iter()
        .filter(|i| i.expires > now)
        .map(|i| PeerSpec {
            public_key: i.public_key,
            endpoint: None,
            allowed_ips: if i.redeemed_by.is_some() {
                vec![]
            } else {
                vec![host_net(i.address)]
            },
            keepalive: None,
        });
    let containers = state.containers.iter().map(|c| PeerSpec {
        public_key: c.private_key.public_key(),
        endpoint: None,
        allowed_ips: vec![host_net(c.address)],
        keepalive: None,
    });
    peers.chain(invites).chain(containers).collect()
}

/// Gives each named container of this host an endpoint record (key made
/// here, address from the pool), keeping the ones already saved, so that a
/// restart brings back the same key and address. `iface_of(n)` names the
/// `n`th endpoint's interface.
pub fn ensure_containers(
    state: &mut ServerState,
    names: &[String],
    iface_of: impl Fn(usize) -> String,
) -> Result<(), HubError> {
    let mut pool = pool_of(state)?;
    for (n, name) in names.iter().enumerate() {
        if state.containers.iter().any(|c| &c.container == name) {
            continue;
        }
        let address = pool.allocate()?;
        let mut iface = iface_of(n);
        let mut k = n;
        while state.containers.iter().any(|c| c.iface == iface) {
            k += 1;
            iface = iface_of(k);
        }
        state.containers.push(ContainerRecord {
            container: name.clone(),
            iface,
            private_key: PrivateKey::generate(),
            address,
        });
    }
    Ok(())
}

fn pool_of(state: &ServerState) -> Result<Pool, HubError> {
    let mut pool = Pool::new(state.subnet)?;
    let taken = state
        .peers
        .iter()
        .map(|p| p.address)
        .chain(state.invites.iter().map(|i| i.address))
        .chain(state.containers.iter().map(|c| c.address));
    for a in taken {
        pool.reserve(a);
    }
    Ok(pool)
}

struct Pending {
    invite: PublicKey,
    peer: PublicKey,
    address: IpAddr,
    since: Instant,
}

struct Inner {
    state: ServerState,
    pool: Pool,
    pending: Vec<Pending>,
}

pub struct Hub {
    wg: Arc<dyn WgDevice>,
    store: StateDir,
    iface: String,
    inner: Mutex<Inner>,
    /// Wakes the swap loop as soon as a redeem leaves a swap pending.
    redeemed: Notify,
}

impl Hub {
    pub fn new(
        wg: Arc<dyn WgDevice>,
        store: StateDir,
        iface: &str,
        state: ServerState,
    ) -> Result<Self, HubError> {
        let pool = pool_of(&state)?;
        Ok(Self {
            wg,
            store,
            iface: iface.to_owned(),
            inner: Mutex::new(Inner {
                state,
                pool,
                pending: Vec::new(),
            }),
            redeemed: Notify::new(),
        })
    }

    pub fn server_address(subnet: IpNetwork) -> Result<IpAddr, HubError> {
        Ok(Pool::new(subnet)?.server_address())
    }

    fn save(&self, state: &ServerState) -> Result<(), HubError> {
        Ok(self
            .store
            .save(&self.iface, &Endpoint::Server(state.clone()))?)
    }

    /// Issues `count` invites valid for `ttl` and returns their tokens.
    pub async fn mint(
        &self,
        count: usize,
        ttl: Duration,
        now: SystemTime,
        endpoint_hint: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<Token>, HubError> {
        let mut inner = self.inner.lock().await;
        let expires = unix(now + ttl);
        let mut tokens = Vec::with_capacity(count);
        for _ in 0..count {
            let address = inner.pool.allocate()?;
            let invite_key = PrivateKey::generate();
            self.wg
                .upsert_peer(&PeerSpec {
                    public_key: invite_key.public_key(),
                    endpoint: None,
                    allowed_ips: vec![host_net(address)],
                    keepalive: None,
                })
                .await?;
            inner.state.invites.push(InviteRecord {
                public_key: invite_key.public_key(),
                address,
                expires,
                redeemed_by: None,
                name: name.map(str::to_owned),
            });
            tokens.push(Token {
                server_public_key: inner.state.private_key.public_key(),
                invite_key,
                port: inner.state.port,
                subnet: inner.state.subnet,
                assigned: address,
                server_address: inner.pool.server_address(),
                expires,
                endpoint_hint: endpoint_hint.map(str::to_owned),
            });
        }
        self.save(&inner.state)?;
        Ok(tokens)
    }

    /// Admits `key` in place of the invite held by `src`.
    pub async fn redeem(
        &self,
        src: IpAddr,
        key: PublicKey,
        now: SystemTime,
    ) -> Result<IpNetwork, RedeemError> {
        let mut inner = self.inner.lock().await;
        let now_s = unix(now);
        let subnet = inner.state.subnet;
        let assigned = IpNetwork::new(src, subnet.prefix())
            .map_err(|e| RedeemError::Internal(e.to_string()))?;
        let idx = inner
            .state
            .invites
            .iter()
            .position(|i| i.address == src)
            .ok_or(RedeemError::NoInvite(src))?;
        let invite = inner.state.invites[idx].clone();
        match invite.redeemed_by {
            // A retry after a lost reply: the same key again is fine.
            Some(k) if k == key => return Ok(assigned),
            Some(_) => return Err(RedeemError::AlreadyUsed),
            None => {}
        }
        if invite.expires <= now_s {
            return Err(RedeemError::Expired);
        }
        let taken = key == inner.state.private_key.public_key()
            || inner.state.peers.iter().any(|p| p.public_key == key)
            || inner.state.invites.iter().any(|i| i.public_key == key);
        if taken {
            return Err(RedeemError::KeyInUse);
        }
        let internal = |e: WgError| RedeemError::Internal(e.to_string());
        self.wg
            .upsert_peer(&PeerSpec {
                public_key: key,
                endpoint: None,
                allowed_ips: vec![],
                keepalive: None,
            })
            .await
            .map_err(internal)?;
        inner.state.invites[idx].redeemed_by = Some(key);
        inner.state.peers.push(PeerRecord {
            public_key: key,
            address: src,
            joined_at: now_s,
            name: invite.name.clone(),
            via: None,
            endpoint: None,
        });
        if let Err(e) = self.save(&inner.state) {
            // Undo, so that memory, device and disk agree.
            inner.state.invites[idx].redeemed_by = None;
            inner.state.peers.pop();
            let _ = self.wg.remove_peer(&key).await;
            return Err(RedeemError::Internal(e.to_string()));
        }
        tracing::info!("{src} redeemed its invite; admitting public key {key}");
        inner.pending.push(Pending {
            invite: invite.public_key,
            peer: key,
            address: src,
            since: Instant::now(),
        });
        self.redeemed.notify_one();
        Ok(assigned)
    }

    /// Admits another endpoint of an admitted site (a container on it): the
    /// request comes over the tunnel from the site's own address, which only
    /// the site's key can send from. Idempotent for the same key.
    pub async fn register(
        &self,
        src: IpAddr,
        key: PublicKey,
        name: &str,
        now: SystemTime,
    ) -> Result<IpNetwork, RedeemError> {
        let mut inner = self.inner.lock().await;
        let prefix = inner.state.subnet.prefix();
        let net = |a| IpNetwork::new(a, prefix).map_err(|e| RedeemError::Internal(e.to_string()));
        if !inner
            .state
            .peers
            .iter()
            .any(|p| p.address == src && p.via.is_none())
        {
            return Err(RedeemError::NoInvite(src));
        }
        if let Some(p) = inner.state.peers.iter().find(|p| p.public_key == key) {
            return net(p.address);
        }
        let taken = key == inner.state.private_key.public_key()
            || inner.state.invites.iter().any(|i| i.public_key == key)
            || inner
                .state
                .containers
                .iter()
                .any(|c| c.private_key.public_key() == key);
        if taken {
            return Err(RedeemError::KeyInUse);
        }
        let address = inner
            .pool
            .allocate()
            .map_err(|e| RedeemError::Internal(e.to_string()))?;
        let internal = |e: String| RedeemError::Internal(e);
        if let Err(e) = self
            .wg
            .upsert_peer(&PeerSpec {
                public_key: key,
                endpoint: None,
                allowed_ips: vec![host_net(address)],
                keepalive: None,
            })
            .await
        {
            inner.pool.release(address);
            return Err(internal(e.to_string()));
        }
        inner.state.peers.push(PeerRecord {
            public_key: key,
            address,
            joined_at: unix(now),
            name: Some(name.to_owned()),
            via: Some(src),
            endpoint: None,
        });
        if let Err(e) = self.save(&inner.state) {
            inner.state.peers.pop();
            inner.pool.release(address);
            let _ = self.wg.remove_peer(&key).await;
            return Err(internal(e.to_string()));
        }
        tracing::info!("{src} registered {name} as {address}");
        net(address)
    }

    /// Removes a peer (by name or address) at once, with the endpoints it
    /// registered, or an unused invite; their addresses become free.
    /// Returns what was removed.
    pub async fn revoke(&self, target: &str) -> Result<Vec<String>, HubError> {
        let mut inner = self.inner.lock().await;
        let matches = |name: &Option<String>, addr: &IpAddr| {
            name.as_deref() == Some(target) || addr.to_string() == target
        };
        let sites: Vec<IpAddr> = inner
            .state
            .peers
            .iter()
            .filter(|p| matches(&p.name, &p.address))
            .map(|p| p.address)
            .collect();
        let (gone, kept): (Vec<_>, Vec<_>) =
            inner.state.peers.drain(..).partition(|p| {
                sites.contains(&p.address) || p.via.is_some_and(|v| sites.contains(&v))
            });
        inner.state.peers = kept;
        let (gone_invites, kept_invites): (Vec<_>, Vec<_>) =
            inner.state.invites.drain(..).partition(|i| {
                sites.contains(&i.address)
                    || (i.redeemed_by.is_none() && matches(&i.name, &i.address))
            });
        inner.state.invites = kept_invites;
        let mut removed = Vec::new();
        for p in &gone {
            self.wg.remove_peer(&p.public_key).await?;
            inner.pool.release(p.address);
            removed.push(format!(
                "{} ({})",
                p.address,
                p.name.as_deref().unwrap_or("site")
            ));
        }
        for i in &gone_invites {
            self.wg.remove_peer(&i.public_key).await?;
            inner.pool.release(i.address);
            if i.redeemed_by.is_none() {
                removed.push(format!("{} (unused invite)", i.address));
            }
        }
        inner.pending.retain(|p| !sites.contains(&p.address));
        if !removed.is_empty() {
            self.save(&inner.state)?;
            tracing::info!("revoked {}", removed.join(", "));
        }
        Ok(removed)
    }

    /// A site that stops cleanly says so. Its peer is removed and added
    /// again, which clears the handshake replay state: gotatun stamps
    /// handshakes with TAI64 base 2^62+37 while the kernel and wireguard-go
    /// use 2^62+10, so without this a stock WireGuard taking the site's key
    /// over (`tunnel export`) would be refused for ~27 s as a replay.
    pub async fn leave(&self, src: IpAddr) -> Result<bool, HubError> {
        let inner = self.inner.lock().await;
        let Some(p) = inner
            .state
            .peers
            .iter()
            .find(|p| p.address == src && p.via.is_none())
        else {
            return Ok(false);
        };
        let live = self.wg.peers().await?;
        let endpoint = live
            .iter()
            .find(|l| l.public_key == p.public_key)
            .and_then(|l| l.endpoint);
        self.wg.remove_peer(&p.public_key).await?;
        self.wg
            .upsert_peer(&PeerSpec {
                public_key: p.public_key,
                endpoint: endpoint.or(p.endpoint),
                allowed_ips: vec![host_net(p.address)],
                keepalive: None,
            })
            .await?;
        tracing::info!("{src} left; its peer was reset");
        Ok(true)
    }

    /// Remembers where peers were last seen, saving when that changed.
    pub async fn record_endpoints(&self) -> Result<(), HubError> {
        let live = self.wg.peers().await?;
        let mut inner = self.inner.lock().await;
        let mut changed = false;
        for p in inner.state.peers.iter_mut() {
            if let Some(e) = live
                .iter()
                .find(|l| l.public_key == p.public_key)
                .and_then(|l| l.endpoint)
                && p.endpoint != Some(e)
            {
                p.endpoint = Some(e);
                changed = true;
            }
        }
        if changed {
            self.save(&inner.state)?;
        }
        Ok(())
    }

    /// Saves the current state (e.g. after container endpoints were added).
    pub async fn persist(&self) -> Result<(), HubError> {
        let inner = self.inner.lock().await;
        self.save(&inner.state)
    }

    /// Completes when a redeem has left a swap pending since the last call.
    pub async fn redeemed(&self) {
        self.redeemed.notified().await
    }

    pub async fn has_pending(&self) -> bool {
        !self.inner.lock().await.pending.is_empty()
    }

    /// Moves addresses from redeemed invites to the keys that replaced them,
    /// once those keys have completed a handshake. Returns how many moved.
    pub async fn complete_swaps(&self, now: Instant) -> Result<usize, HubError> {
        let mut inner = self.inner.lock().await;
        if inner.pending.is_empty() {
            return Ok(0);
        }
        let peers = self.wg.peers().await?;
        let ready = |p: &Pending| {
            now.duration_since(p.since) > SWAP_GRACE
                || peers
                    .iter()
                    .any(|s| s.public_key == p.peer && s.last_handshake.is_some())
        };
        let (done, waiting): (Vec<_>, Vec<_>) = inner.pending.drain(..).partition(ready);
        inner.pending = waiting;
        for p in &done {
            self.wg.set_allowed_ips(&p.invite, &[]).await?;
            self.wg
                .set_allowed_ips(&p.peer, &[host_net(p.address)])
                .await?;
            tracing::info!("{} now routes to {}", p.address, p.peer);
        }
        Ok(done.len())
    }

    /// Forgets expired invites: unused ones give their address back.
    pub async fn prune(&self, now: SystemTime) -> Result<usize, HubError> {
        let mut inner = self.inner.lock().await;
        let now = unix(now);
        let (expired, live): (Vec<_>, Vec<_>) = inner
            .state
            .invites
            .drain(..)
            .partition(|i| i.expires <= now);
        inner.state.invites = live;
        for i in &expired {
            self.wg.remove_peer(&i.public_key).await?;
            if i.redeemed_by.is_none() {
                inner.pool.release(i.address);
            }
        }
        if !expired.is_empty() {
            self.save(&inner.state)?;
        }
        Ok(expired.len())
    }

    /// Whether `addr` belongs to an admitted peer or a waiting invite.
    pub async fn knows(&self, addr: IpAddr) -> bool {
        let inner = self.inner.lock().await;
        inner.state.peers.iter().any(|p| p.address == addr)
            || inner.state.invites.iter().any(|i| i.address == addr)
            || inner.state.containers.iter().any(|c| c.address == addr)
    }

    pub fn store(&self) -> &StateDir {
        &self.store
    }

    pub fn device(&self) -> Arc<dyn WgDevice> {
        self.wg.clone()
    }

    pub async fn snapshot(&self) -> ServerState {
        self.inner.lock().await.state.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wg::fake::FakeWg;

    fn setup() -> (tempfile::TempDir, FakeWg, Hub) {
        let tmp = tempfile::tempdir().unwrap();
        let fake = FakeWg::default();
        let state = ServerState {
            private_key: PrivateKey::generate(),
            port: 51820,
            mtu: 1420,
            subnet: "10.77.0.0/24".parse().unwrap(),
            peers: vec![],
            invites: vec![],
            containers: vec![],
        };
        let hub = Hub::new(
            Arc::new(fake.clone()),
            StateDir::new(tmp.path()),
            "wgt0",
            state,
        )
        .unwrap();
        (tmp, fake, hub)
    }

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[tokio::test]
    async fn mint_allocates_in_order_and_persists() {
        let (tmp, fake, hub) = setup();
        let tokens = hub
            .mint(2, Duration::from_secs(3600), t0(), Some("h:1"), None)
            .await
            .unwrap();
        assert_eq!(tokens[0].assigned.to_string(), "10.77.0.2");
        assert_eq!(tokens[1].assigned.to_string(), "10.77.0.3");
        assert_eq!(tokens[0].server_address.to_string(), "10.77.0.1");
        assert_eq!(tokens[0].expires, unix(t0()) + 3600);
        assert_eq!(fake.peers().await.unwrap().len(), 2);
        let saved = StateDir::new(tmp.path())
            .load_server("wgt0")
            .unwrap()
            .unwrap();
        assert_eq!(saved.invites.len(), 2);
        // The state keeps only the invite's public half.
        let text = std::fs::read_to_string(tmp.path().join("wgt0.json")).unwrap();
        assert!(!text.contains(tokens[0].invite_key.to_base64().as_str()));
    }

    #[tokio::test]
    async fn redeem_then_swap_after_handshake() {
        let (_tmp, fake, hub) = setup();
        let tok = hub
            .mint(1, Duration::from_secs(60), t0(), None, None)
            .await
            .unwrap()
            .remove(0);
        let joiner = PrivateKey::generate().public_key();
        let net = hub.redeem(tok.assigned, joiner, t0()).await.unwrap();
        assert_eq!(net.to_string(), "10.77.0.2/24");
        // The reply must still route to the invite: the new key has no address yet.
        assert!(fake.peer(&joiner).unwrap().allowed_ips.is_empty());
        assert_eq!(hub.complete_swaps(Instant::now()).await.unwrap(), 0);
        fake.handshake(&joiner);
        assert_eq!(hub.complete_swaps(Instant::now()).await.unwrap(), 1);
        assert_eq!(
            fake.peer(&joiner).unwrap().allowed_ips,
            vec![host_net(tok.assigned)]
        );
        assert!(
            fake.peer(&tok.invite_key.public_key())
                .unwrap()
                .allowed_ips
                .is_empty()
        );
        assert!(!hub.has_pending().await);
    }

    #[tokio::test]
    async fn reuse_is_refused_but_a_retry_with_the_same_key_is_not() {
        let (_tmp, _fake, hub) = setup();
        let tok = hub
            .mint(1, Duration::from_secs(60), t0(), None, None)
            .await
            .unwrap()
            .remove(0);
        let first = PrivateKey::generate().public_key();
        hub.redeem(tok.assigned, first, t0()).await.unwrap();
        assert!(hub.redeem(tok.assigned, first, t0()).await.is_ok());
        let second = PrivateKey::generate().public_key();
        assert_eq!(
            hub.redeem(tok.assigned, second, t0()).await,
            Err(RedeemError::AlreadyUsed)
        );
    }

    #[tokio::test]
    async fn unknown_address_expired_and_key_conflicts() {
        let (_tmp, _fake, hub) = setup();
        let tok = hub
            .mint(2, Duration::from_secs(60), t0(), None, None)
            .await
            .unwrap();
        let k = PrivateKey::generate().public_key();
        let stranger: IpAddr = "10.77.0.9".parse().unwrap();
        assert_eq!(
            hub.redeem(stranger, k, t0()).await,
            Err(RedeemError::NoInvite(stranger))
        );
        let late = t0() + Duration::from_secs(61);
        assert_eq!(
            hub.redeem(tok[0].assigned, k, late).await,
            Err(RedeemError::Expired)
        );
        let invite2 = tok[1].invite_key.public_key();
        assert_eq!(
            hub.redeem(tok[0].assigned, invite2, t0()).await,
            Err(RedeemError::KeyInUse)
        );
    }

    #[tokio::test]
    async fn prune_frees_unused_addresses_only() {
        let (_tmp, fake, hub) = setup();
        let tok = hub
            .mint(2, Duration::from_secs(60), t0(), None, None)
            .await
            .unwrap();
        let k = PrivateKey::generate().public_key();
        hub.redeem(tok[0].assigned, k, t0()).await.unwrap();
        assert_eq!(hub.prune(t0() + Duration::from_secs(61)).await.unwrap(), 2);
        let peers = fake.peers().await.unwrap();
        assert_eq!(peers.len(), 1, "only the admitted key stays");
        // .3 is free again; .2 stays with the admitted peer.
        let next = hub
            .mint(
                1,
                Duration::from_secs(60),
                t0() + Duration::from_secs(62),
                None,
                None,
            )
            .await
            .unwrap();
        assert_eq!(next[0].assigned.to_string(), "10.77.0.3");
    }

    #[tokio::test]
    async fn containers_get_stable_records_and_sites_register_theirs() {
        let (_tmp, fake, hub) = setup();
        let mut state = hub.snapshot().await;
        let names = vec!["web".to_string(), "db".to_string()];
        ensure_containers(&mut state, &names, |n| format!("wgc{n}")).unwrap();
        let first = state.containers.clone();
        assert_eq!(first[0].address.to_string(), "10.77.0.2");
        assert_eq!(first[1].iface, "wgc1");
        ensure_containers(&mut state, &names, |n| format!("wgc{n}")).unwrap();
        assert_eq!(
            state.containers, first,
            "a restart keeps keys and addresses"
        );

        // A site registers a container over the tunnel, from its own address only.
        let tok = hub
            .mint(1, Duration::from_secs(60), t0(), None, None)
            .await
            .unwrap()
            .remove(0);
        let site = PrivateKey::generate().public_key();
        let cont = PrivateKey::generate().public_key();
        assert_eq!(
            hub.register(tok.assigned, cont, "container cli", t0())
                .await,
            Err(RedeemError::NoInvite(tok.assigned)),
            "an unredeemed invite may not register endpoints"
        );
        hub.redeem(tok.assigned, site, t0()).await.unwrap();
        let addr = hub
            .register(tok.assigned, cont, "container cli", t0())
            .await
            .unwrap();
        assert_eq!(addr.to_string(), "10.77.0.3/24");
        assert_eq!(
            hub.register(tok.assigned, cont, "container cli", t0())
                .await
                .unwrap(),
            addr,
            "idempotent"
        );
        assert_eq!(
            fake.peer(&cont).unwrap().allowed_ips,
            vec![host_net(addr.ip())]
        );
        // A registered container cannot itself register more.
        let other = PrivateKey::generate().public_key();
        assert!(hub.register(addr.ip(), other, "x", t0()).await.is_err());
    }

    #[test]
    fn device_peers_from_state() {
        let k = PrivateKey::generate();
        let inv = PrivateKey::generate().public_key();
        let used = PrivateKey::generate().public_key();
        let state = ServerState {
            private_key: k,
            port: 1,
            mtu: 1420,
            subnet: "10.77.0.0/24".parse().unwrap(),
            peers: vec![PeerRecord {
                public_key: used,
                address: "10.77.0.2".parse().unwrap(),
                joined_at: 0,
                name: None,
                via: None,
                endpoint: None,
            }],
            invites: vec![
                InviteRecord {
                    public_key: inv,
                    address: "10.77.0.3".parse().unwrap(),
                    expires: unix(t0()) + 10,
                    redeemed_by: None,
                    name: None,
                },
                InviteRecord {
                    public_key: PrivateKey::generate().public_key(),
                    address: "10.77.0.2".parse().unwrap(),
                    expires: unix(t0()) + 10,
                    redeemed_by: Some(used),
                    name: None,
                },
                InviteRecord {
                    public_key: PrivateKey::generate().public_key(),
                    address: "10.77.0.4".parse().unwrap(),
                    expires: unix(t0()) - 1,
                    redeemed_by: None,
                    name: None,
                },
            ],
            containers: vec![ContainerRecord {
                container: "web".into(),
                iface: "wgc0".into(),
                private_key: PrivateKey::generate(),
                address: "10.77.0.5".parse().unwrap(),
            }],
        };
        let peers = device_peers(&state, t0());
        assert_eq!(peers.len(), 4);
        assert_eq!(
            peers[3].allowed_ips,
            vec![host_net("10.77.0.5".parse().unwrap())]
        );
        assert_eq!(
            peers[0].allowed_ips,
            vec!["10.77.0.2/32".parse::<IpNetwork>().unwrap()]
        );
        assert_eq!(
            peers[1].allowed_ips,
            vec!["10.77.0.3/32".parse::<IpNetwork>().unwrap()]
        );
        assert!(peers[2].allowed_ips.is_empty());
    }
}
