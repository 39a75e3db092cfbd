//! The hub's bookkeeping, pure: decisions over state and time. Nothing
//! here touches a device, a file or a clock; every method takes `now`.
//!
//! What the device should hold follows from the ledger alone
//! ([`Ledger::desired`]), so a change is applied by diffing the desired
//! peers before and after it ([`diff`]), and undone by the reverse diff.
//!
//! The key swap is done in two steps so that the reply to a redeem still
//! reaches the joiner:
//! 1. on redeem, the joiner's key becomes a peer *without* allowed IPs (a
//!    handshake needs none), and a swap is pending;
//! 2. once that key has completed a handshake (the joiner has switched),
//!    the address moves from the invite to it.
//!
//! A redeemed invite stays a peer without allowed IPs until it expires, so
//! that a reused token completes a handshake but gets no answer: the joiner
//! can then say "already used" instead of "server unreachable".
//!
//! One file per concern, each adding its part of `impl Ledger`:
//! [`invites`] (minting tokens, their expiry), [`swaps`] (redeeming an
//! invite and the two-step key swap), [`routes`] (the LANs behind sites
//! and their approval), [`endpoints`] (sites' container endpoints and the
//! hub's own containers), [`road_warriors`] (stock WireGuard clients) and
//! [`revoke`]. What they share lives here: the state, who holds a key, and
//! the peers the device should have.
//!
//! The random source is passed in too ([`KeySource`]): the keys the ledger
//! makes (invite keys, the hub's container keys) come from it, so a test
//! with a seeded source mints the same keys every run.

mod endpoints;
mod invites;
mod keysource;
mod revoke;
mod road_warriors;
mod routes;
mod swaps;
#[cfg(test)]
pub(crate) mod testkit;

pub use crate::control::tunnel::{Advertised, Joining};
pub use crate::ipam::host_net;
pub use endpoints::{RegisterError, ensure_containers, ensure_containers_with};
pub use invites::{MintError, MintRequest};
pub use keysource::KeySource;
pub use revoke::RevokeError;
pub use road_warriors::AdmitError;
pub use routes::{MAX_ROUTES, RouteError, validate_routes};
pub use swaps::{RedeemError, SWAP_GRACE};

use crate::ipam::{IpamError, Pool};
use crate::keys::PublicKey;
use crate::state::{PeerRecord, ServerState};
use crate::wg::{PeerSpec, PeerStatus};
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};
use swaps::Pending;

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Who holds the key that signed a request: the key's class, which
/// decides what it may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The invite key of a token, issued for `address`; `used` once
    /// redeemed (it may then only repeat its own redeem).
    Invite { address: IpAddr, used: bool },
    /// An admitted site.
    Site { address: IpAddr },
    /// An endpoint (a container) that the site at `site` registered.
    Endpoint { address: IpAddr, site: IpAddr },
    /// A stock WireGuard client (`tunnel peer add`).
    RoadWarrior { address: IpAddr },
    /// One of the hub's own container endpoints.
    HubContainer { address: IpAddr },
}

impl Caller {
    /// The tunnel address the key holds.
    pub fn address(&self) -> IpAddr {
        match *self {
            Caller::Invite { address, .. }
            | Caller::Site { address }
            | Caller::Endpoint { address, .. }
            | Caller::RoadWarrior { address }
            | Caller::HubContainer { address } => address,
        }
    }

    /// What the key is, for a refusal.
    pub fn describe(&self) -> &'static str {
        match self {
            Caller::Invite { used: false, .. } => "a token's invite key",
            Caller::Invite { used: true, .. } => "a used token's invite key",
            Caller::Site { .. } => "a site's key",
            Caller::Endpoint { .. } => "a site's container endpoint",
            Caller::RoadWarrior { .. } => "a road warrior's key",
            Caller::HubContainer { .. } => "a hub container's key",
        }
    }
}

/// A change the device must make.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Upsert(PeerSpec),
    SetAllowedIps(PublicKey, Vec<IpNetwork>),
    Remove(PublicKey),
}

/// The ops that take a device from `before` to `after`. Endpoints and
/// keepalives only matter when a peer is added: the device learns them.
pub fn diff(
    before: &BTreeMap<PublicKey, PeerSpec>,
    after: &BTreeMap<PublicKey, PeerSpec>,
) -> Vec<Op> {
    let mut ops = Vec::new();
    // Removals and narrowed peers first, so that an address moving between
    // two peers is never on both.
    for (k, old) in before {
        match after.get(k) {
            None => ops.push(Op::Remove(*k)),
            Some(new) if new.allowed_ips != old.allowed_ips && new.allowed_ips.is_empty() => {
                ops.push(Op::SetAllowedIps(*k, vec![]))
            }
            _ => {}
        }
    }
    for (k, new) in after {
        match before.get(k) {
            None => ops.push(Op::Upsert(new.clone())),
            Some(old) if old.allowed_ips != new.allowed_ips && !new.allowed_ips.is_empty() => {
                ops.push(Op::SetAllowedIps(*k, new.allowed_ips.clone()))
            }
            _ => {}
        }
    }
    ops
}

#[derive(Debug, Clone)]
pub struct Ledger {
    state: ServerState,
    pool: Pool,
    pending: Vec<Pending>,
    /// Endpoints one site may register.
    quota: usize,
    /// Whether `state` changed since [`Ledger::take_changed`]: it must be saved.
    changed: bool,
    /// The transports tokens offer.
    offer: crate::transport::Offer,
    /// The hub host's own networks (its addresses with their prefixes),
    /// which no site may claim.
    host: Vec<IpNetwork>,
    /// Underlay addresses seen on the device that the state does not
    /// hold yet (a joiner before its endpoint is recorded).
    seen: std::collections::BTreeSet<IpAddr>,
    /// Where the keys the ledger makes come from.
    keys: KeySource,
}

fn pool_of(state: &ServerState) -> Result<Pool, IpamError> {
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

impl Ledger {
    /// A ledger over `state`, whose sites may register `quota` endpoints
    /// each; its keys come from the OS's random source ([`Ledger::with_rng`]).
    pub fn new(state: ServerState, quota: usize) -> Result<Self, IpamError> {
        let pool = pool_of(&state)?;
        let mut ledger = Self {
            state,
            pool,
            pending: Vec::new(),
            quota,
            changed: false,
            offer: Default::default(),
            host: vec![],
            seen: Default::default(),
            keys: KeySource::os(),
        };
        // A file from before approvals: what its sites had was accepted
        // then; it stays approved (still subject to the hub's own checks).
        if ledger.state.peers.iter().any(|p| p.approved.is_none()) {
            for p in ledger.state_mut().peers.iter_mut() {
                if p.approved.is_none() {
                    p.approved = Some(p.routes.clone());
                }
            }
        }
        Ok(ledger)
    }

    /// The same ledger, making its keys from `rng` instead of the OS's
    /// random source (a seeded generator in tests).
    #[must_use]
    pub fn with_rng(mut self, rng: impl rand_core::CryptoRngCore + Send + 'static) -> Self {
        self.keys = KeySource::new(rng);
        self
    }

    /// The transports the tokens minted from now on offer.
    pub fn set_offer(&mut self, offer: crate::transport::Offer) {
        self.offer = offer;
    }

    pub fn state(&self) -> &ServerState {
        &self.state
    }

    /// Every change to the saved state goes through here.
    fn state_mut(&mut self) -> &mut ServerState {
        self.changed = true;
        &mut self.state
    }

    /// Whether the saved state changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    pub fn server_address(&self) -> IpAddr {
        self.pool.server_address()
    }

    /// The peers the device should have, by key.
    pub fn desired(&self) -> BTreeMap<PublicKey, PeerSpec> {
        let swapping = |k: &PublicKey| self.pending.iter().any(|p| &p.peer == k);
        let invite_keeps = |k: &PublicKey| self.pending.iter().any(|p| &p.invite == k);
        let spec = |k: PublicKey, endpoint, allowed: Vec<IpNetwork>| {
            (
                k,
                PeerSpec {
                    public_key: k,
                    endpoint,
                    allowed_ips: allowed,
                    keepalive: None,
                },
            )
        };
        let subnets = self.state.subnets();
        let filter = self.route_filter();
        let peers = self.state.peers.iter().map(|p| {
            let allowed = if swapping(&p.public_key) {
                vec![]
            } else {
                let mut a = subnets.hosts(p.address);
                if !p.routes.is_empty() {
                    a.extend(filter.effective(p));
                }
                a
            };
            spec(p.public_key, p.endpoint, allowed)
        });
        let invites = self.state.invites.iter().map(|i| {
            let allowed = if i.redeemed_by.is_none() || invite_keeps(&i.public_key) {
                subnets.hosts(i.address)
            } else {
                vec![]
            };
            spec(i.public_key, None, allowed)
        });
        let containers = self
            .state
            .containers
            .iter()
            .map(|c| spec(c.private_key.public_key(), None, subnets.hosts(c.address)));
        peers.chain(invites).chain(containers).collect()
    }

    /// The tunnel addresses (both families) that invite keys hold: an
    /// unused invite's, and a redeemed one's until the joiner's own key
    /// has taken over. Those keys may reach the control API only.
    pub fn quarantined(&self) -> Vec<IpAddr> {
        let subnets = self.state.subnets();
        self.state
            .invites
            .iter()
            .filter(|i| {
                i.redeemed_by.is_none() || self.pending.iter().any(|p| p.invite == i.public_key)
            })
            .flat_map(|i| subnets.hosts(i.address))
            .map(|n| n.ip())
            .collect()
    }

    /// The one check of whether a key is taken: the server's own, a peer's
    /// (sites and their endpoints), an invite's, or a hub container's.
    pub fn key_in_use(&self, key: &PublicKey) -> bool {
        *key == self.state.private_key.public_key()
            || self.state.peers.iter().any(|p| p.public_key == *key)
            || self.state.invites.iter().any(|i| i.public_key == *key)
            || self
                .state
                .containers
                .iter()
                .any(|c| c.private_key.public_key() == *key)
    }

    /// Whether a key could never authenticate (and so never be admitted).
    fn weak(&self, key: &PublicKey) -> bool {
        self.state.private_key.shared_secret(key).is_none()
    }

    /// Who holds `key`, for authenticating a request signed with it.
    pub fn identify(&self, key: &PublicKey) -> Option<Caller> {
        if let Some(i) = self.state.invites.iter().find(|i| i.public_key == *key) {
            return Some(Caller::Invite {
                address: i.address,
                used: i.redeemed_by.is_some(),
            });
        }
        if let Some(p) = self.state.peers.iter().find(|p| p.public_key == *key) {
            let address = p.address;
            return Some(match p.via {
                Some(site) => Caller::Endpoint { address, site },
                None if p.road_warrior => Caller::RoadWarrior { address },
                None => Caller::Site { address },
            });
        }
        self.state
            .containers
            .iter()
            .find(|c| c.private_key.public_key() == *key)
            .map(|c| Caller::HubContainer { address: c.address })
    }

    /// The admitted site at `addr` (road warriors are not sites).
    pub fn site(&self, addr: IpAddr) -> Option<&PeerRecord> {
        self.state
            .peers
            .iter()
            .find(|p| p.address == addr && p.via.is_none() && !p.road_warrior)
    }

    /// Whether `addr` belongs to an admitted peer, a waiting invite or a
    /// hub container.
    pub fn knows(&self, addr: IpAddr) -> bool {
        self.state.peers.iter().any(|p| p.address == addr)
            || self.state.invites.iter().any(|i| i.address == addr)
            || self.state.containers.iter().any(|c| c.address == addr)
    }

    fn name_taken(&self, name: &str) -> bool {
        self.state.name.as_deref() == Some(name)
            || self
                .state
                .peers
                .iter()
                .any(|p| p.via.is_none() && p.name.as_deref() == Some(name))
            || self
                .state
                .invites
                .iter()
                .any(|i| i.redeemed_by.is_none() && i.name.as_deref() == Some(name))
    }

    /// Whether [`Ledger::record_endpoints`] would change anything.
    pub fn endpoints_moved(&self, live: &[PeerStatus]) -> bool {
        let seen: HashMap<&PublicKey, SocketAddr> = live
            .iter()
            .filter_map(|l| Some((&l.public_key, l.endpoint?)))
            .collect();
        self.state.peers.iter().any(|p| {
            seen.get(&p.public_key)
                .is_some_and(|e| p.endpoint != Some(*e))
        })
    }

    /// Remembers where peers were last seen; true when that changed.
    pub fn record_endpoints(&mut self, live: &[PeerStatus]) -> bool {
        if !self.endpoints_moved(live) {
            return false;
        }
        // What was only seen is now recorded (or gone).
        self.seen.clear();
        let seen: HashMap<PublicKey, SocketAddr> = live
            .iter()
            .filter_map(|l| Some((l.public_key, l.endpoint?)))
            .collect();
        let mut changed = false;
        for p in self.state.peers.iter_mut() {
            if let Some(e) = seen.get(&p.public_key).copied()
                && p.endpoint != Some(e)
            {
                p.endpoint = Some(e);
                changed = true;
            }
        }
        self.changed |= changed;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ledger::testkit::*;

    #[test]
    fn one_key_in_use_check_covers_server_peers_invites_and_containers() {
        let mut l = ledger();
        let mut s = l.state().clone();
        ensure_containers(&mut s, &["web".into()], |n| format!("wgc{n}")).unwrap();
        let container_key = s.containers[0].private_key.public_key();
        let server_key = s.private_key.public_key();
        l = Ledger::new(s, 2).unwrap();
        let (site_addr, site_key) = site(&mut l, None);
        let toks = mint(&mut l, 2, None);
        let other_invite = toks[1].invite_key.public_key();
        for taken in [container_key, server_key, site_key, other_invite] {
            assert_eq!(
                l.redeem(toks[0].assigned, taken, t0(), Instant::now()),
                Err(RedeemError::KeyInUse)
            );
            assert_eq!(
                l.register(site_addr, taken, "x", t0()),
                Err(RegisterError::KeyInUse)
            );
        }
        assert_eq!(
            l.redeem(toks[0].assigned, PublicKey([0; 32]), t0(), Instant::now()),
            Err(RedeemError::WeakKey)
        );
        assert_eq!(
            l.register(site_addr, PublicKey([0; 32]), "x", t0()),
            Err(RegisterError::WeakKey)
        );
    }

    #[test]
    fn identify_tells_invites_from_sites() {
        let mut l = ledger();
        let (site_addr, site_key) = site(&mut l, None);
        let tok = mint(&mut l, 1, None).remove(0);
        let ep = key();
        l.register(site_addr, ep, "web", t0()).unwrap();
        assert_eq!(
            l.identify(&site_key),
            Some(Caller::Site { address: site_addr })
        );
        assert_eq!(
            l.identify(&tok.invite_key.public_key()),
            Some(Caller::Invite {
                address: tok.assigned,
                used: false
            })
        );
        let ep_addr = l
            .state()
            .peers
            .iter()
            .find(|p| p.public_key == ep)
            .unwrap()
            .address;
        assert_eq!(
            l.identify(&ep),
            Some(Caller::Endpoint {
                address: ep_addr,
                site: site_addr
            }),
            "an endpoint is not its site"
        );
        assert_eq!(l.identify(&key()), None);
        let rw = key();
        let rw_addr = l.admit("phone", rw, t0()).unwrap();
        assert_eq!(
            l.identify(&rw),
            Some(Caller::RoadWarrior { address: rw_addr })
        );
        assert!(l.site(rw_addr).is_none(), "a road warrior is not a site");
        let used = mint(&mut l, 1, None).remove(0);
        l.redeem(used.assigned, key(), t0(), Instant::now())
            .unwrap();
        assert_eq!(
            l.identify(&used.invite_key.public_key()),
            Some(Caller::Invite {
                address: used.assigned,
                used: true
            })
        );
    }

    #[test]
    fn record_endpoints_reports_changes() {
        let mut l = ledger();
        let (_, k) = site(&mut l, None);
        let live = |e: &str| PeerStatus {
            public_key: k,
            endpoint: Some(e.parse().unwrap()),
            allowed_ips: vec![],
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            keepalive: None,
        };
        assert!(l.endpoints_moved(&[live("192.0.2.1:5")]));
        assert!(l.record_endpoints(&[live("192.0.2.1:5")]));
        assert!(!l.endpoints_moved(&[live("192.0.2.1:5")]));
        assert!(!l.record_endpoints(&[live("192.0.2.1:5")]));
        assert!(l.endpoints_moved(&[live("192.0.2.1:6")]));
        assert!(l.record_endpoints(&[live("192.0.2.1:6")]));
    }
}
