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

pub use crate::control::tunnel::{Advertised, Joining};
pub use crate::ipam::host_net;
use crate::ipam::{IpamError, Pool};
use crate::keys::{PrivateKey, PublicKey};
use crate::limits::{self, LimitError};
use crate::state::{ContainerRecord, InviteRecord, PeerRecord, ServerState, covered};
use crate::token::Token;
use crate::wg::{PeerSpec, PeerStatus};
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a redeemed key may take to show up before the address moves anyway.
pub const SWAP_GRACE: Duration = Duration::from_secs(30);

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a redeem was refused. The text goes back to the joiner.
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
    #[error("that public key is a low-order X25519 point and cannot be used")]
    WeakKey,
    #[error(transparent)]
    Routes(#[from] RouteError),
    #[error("the name {0:?} is already taken by another site; join with another --name")]
    NameTaken(String),
    #[error(transparent)]
    Name(#[from] LimitError),
}

/// Why a site's registration of an endpoint was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    #[error("{0} is not an admitted site")]
    NotASite(IpAddr),
    #[error("that public key is already in use on this server")]
    KeyInUse,
    #[error("that public key is a low-order X25519 point and cannot be used")]
    WeakKey,
    #[error("this site already has an endpoint named {0:?} with another key")]
    NameTaken(String),
    #[error("this site has reached its quota of {0} endpoints")]
    Quota(usize),
    #[error(transparent)]
    Name(#[from] LimitError),
    #[error(transparent)]
    Exhausted(#[from] IpamError),
    #[error("this site has no such endpoint")]
    Unknown,
}

/// Why a stock WireGuard client (`peer add`) was not admitted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmitError {
    #[error(transparent)]
    Name(#[from] LimitError),
    #[error("the name {0:?} is already taken by a site or an unused token")]
    NameTaken(String),
    #[error("that public key is already in use on this server")]
    KeyInUse,
    #[error("that public key is a low-order X25519 point and cannot be used")]
    WeakKey,
    #[error(transparent)]
    Exhausted(#[from] IpamError),
}

/// Why tokens were not minted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MintError {
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("the name {0:?} is already taken by a site or an unused token")]
    NameTaken(String),
    #[error("a name belongs to one site: mint named tokens one at a time")]
    NamedBatch,
    #[error(transparent)]
    Routes(#[from] RouteError),
    #[error(transparent)]
    Exhausted(#[from] IpamError),
}

/// Why nothing was revoked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RevokeError {
    #[error("no peer or unused token is named or addressed {0:?}")]
    NotFound(String),
    #[error("{target:?} is ambiguous: it names {}; revoke by address instead", candidates.join(", "))]
    Ambiguous {
        target: String,
        candidates: Vec<String>,
    },
    #[error(
        "{0} is one of this hub's own containers; drop its --container from `tunnel serve` instead"
    )]
    HubContainer(String),
}

/// Why advertised routes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("{0} is not an admitted site")]
    NotASite(IpAddr),
    #[error("route {0} is not a network address (did you mean {1}?)")]
    NotNetwork(IpNetwork, IpNetwork),
    #[error(
        "route {0} is the whole internet: advertise the LANs behind a site, not a default route"
    )]
    Default(IpNetwork),
    #[error("route {0} overlaps the tunnel's subnet {1}")]
    Tunnel(IpNetwork, IpNetwork),
    #[error("route {route} overlaps {other}, which {owner} advertises")]
    Taken {
        route: IpNetwork,
        other: IpNetwork,
        owner: String,
    },
    #[error("at most {MAX_ROUTES} routes per site")]
    TooMany,
    #[error("route {0} is a loopback, link-local, multicast or unspecified range")]
    Special(IpNetwork),
    #[error("route {0} overlaps {1}, a network of the hub's own host")]
    HubNetwork(IpNetwork, IpNetwork),
    #[error("route {0} covers {1}, the address a node reaches the hub from")]
    Underlay(IpNetwork, IpAddr),
    #[error("no site is named or addressed {0:?}")]
    UnknownSite(String),
    #[error("{0} is a road warrior (tunnel peer add): only sites advertise LANs")]
    RoadWarrior(String),
    #[error("{site} neither advertises nor is approved for anything within {prefix}")]
    NothingToReject { site: String, prefix: IpNetwork },
}

/// Routes one site (or the hub) may advertise.
pub const MAX_ROUTES: usize = 64;

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

/// Ranges that are never a LAN behind a site: loopback, link-local,
/// multicast, the unspecified address.
fn special(r: &IpNetwork) -> bool {
    let specials: [&str; 7] = [
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "::1/128",
        "fe80::/10",
        "ff00::/8",
    ];
    specials
        .iter()
        .map(|s| s.parse::<IpNetwork>().expect("valid"))
        .any(|s| overlaps(r, &s))
        || r.network().is_unspecified()
}

/// The network of an address with its prefix (`10.1.2.3/24` -> `10.1.2.0/24`).
fn network_of(n: &IpNetwork) -> IpNetwork {
    IpNetwork::new(n.network(), n.prefix()).expect("same prefix")
}

/// What a list of routes must be by itself: network addresses, no default
/// route, clear of the tunnel's `subnet` and of each other.
pub fn validate_routes(routes: &[IpNetwork], subnets: &[IpNetwork]) -> Result<(), RouteError> {
    if routes.len() > MAX_ROUTES {
        return Err(RouteError::TooMany);
    }
    for (i, r) in routes.iter().enumerate() {
        let normal = IpNetwork::new(r.network(), r.prefix()).expect("same prefix");
        if normal.ip() != r.ip() {
            return Err(RouteError::NotNetwork(*r, normal));
        }
        if r.prefix() == 0 {
            return Err(RouteError::Default(*r));
        }
        if special(r) {
            return Err(RouteError::Special(*r));
        }
        if let Some(s) = subnets.iter().find(|s| overlaps(r, s)) {
            return Err(RouteError::Tunnel(*r, *s));
        }
        if let Some(twin) = routes[..i].iter().find(|o| overlaps(r, o)) {
            return Err(RouteError::Taken {
                route: *r,
                other: *twin,
                owner: "this same list".to_owned(),
            });
        }
    }
    Ok(())
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

/// What `tunnel token` and `serve --tokens` ask for.
#[derive(Debug, Clone)]
pub struct MintRequest {
    pub count: usize,
    pub ttl: Duration,
    pub endpoint_hint: Option<String>,
    pub name: Option<String>,
    /// Prefixes approved in advance for the site that redeems the token.
    pub routes: Vec<IpNetwork>,
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
struct Pending {
    invite: PublicKey,
    peer: PublicKey,
    address: IpAddr,
    since: Instant,
}

/// A swap completes once the new key has made a handshake, or after
/// [`SWAP_GRACE`] whatever happened.
fn swap_due(p: &Pending, handshaked: impl Fn(&PublicKey) -> bool, now: Instant) -> bool {
    now.duration_since(p.since) > SWAP_GRACE || handshaked(&p.peer)
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
}

/// What decides which of a site's advertised LANs take effect, computed
/// once for a pass over all peers.
struct RouteFilter<'a> {
    host: &'a [IpNetwork],
    underlay: std::collections::BTreeSet<IpAddr>,
}

impl RouteFilter<'_> {
    /// Whatever the approval: not the hub's networks, not a node's
    /// underlay address.
    fn check(&self, r: &IpNetwork) -> Result<(), RouteError> {
        if let Some(h) = self.host.iter().find(|h| overlaps(r, h)) {
            return Err(RouteError::HubNetwork(*r, *h));
        }
        if let Some(a) = self.underlay.iter().find(|a| r.contains(**a)) {
            return Err(RouteError::Underlay(*r, *a));
        }
        Ok(())
    }

    /// The routes of `p` that take effect: approved and allowed.
    fn effective(&self, p: &PeerRecord) -> Vec<IpNetwork> {
        p.routes
            .iter()
            .filter(|r| covered(p.approved(), r) && self.check(r).is_ok())
            .copied()
            .collect()
    }
}

/// Gives each named container of this host an endpoint record (key made
/// here, address from the pool), keeping the ones already saved, so that a
/// restart brings back the same key and address. `iface_of(n)` names the
/// `n`th endpoint's interface.
pub fn ensure_containers(
    state: &mut ServerState,
    names: &[String],
    iface_of: impl Fn(usize) -> String,
) -> Result<(), IpamError> {
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
            by_label: false,
            driver: false,
        });
    }
    Ok(())
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

    /// The hub host's own addresses with their prefixes: no site may
    /// advertise a LAN that overlaps them.
    pub fn set_host_networks(&mut self, nets: &[IpNetwork]) {
        self.host = self.host_view(nets);
    }

    /// Whether `nets` would change what [`Ledger::set_host_networks`] holds.
    pub fn host_networks_differ(&self, nets: &[IpNetwork]) -> bool {
        self.host != self.host_view(nets)
    }

    fn host_view(&self, nets: &[IpNetwork]) -> Vec<IpNetwork> {
        let mut host: Vec<IpNetwork> = nets
            .iter()
            .map(network_of)
            // The tunnel's subnets are checked on their own; loopback is special.
            .filter(|n| !self.state.subnets().all().iter().any(|s| overlaps(n, s)) && !special(n))
            .collect();
        host.sort();
        host.dedup();
        host
    }

    /// Underlay addresses the device sees peers at (live endpoints).
    pub fn note_underlay(&mut self, addrs: impl IntoIterator<Item = IpAddr>) {
        self.seen.extend(addrs);
    }

    fn route_filter(&self) -> RouteFilter<'_> {
        let underlay = self
            .state
            .peers
            .iter()
            .filter_map(|p| p.endpoint)
            .filter(|e| !crate::transport::is_virtual(e))
            .map(|e| e.ip())
            .chain(self.seen.iter().copied())
            .collect();
        RouteFilter {
            host: &self.host,
            underlay,
        }
    }

    /// The advertised LANs of the site at `site` that wait for the hub
    /// operator (or that the hub refuses now).
    pub fn pending_routes(&self, site: IpAddr) -> Vec<IpNetwork> {
        let Some(p) = self.site(site) else {
            return vec![];
        };
        let on = self.route_filter().effective(p);
        p.routes
            .iter()
            .filter(|r| !on.contains(r))
            .copied()
            .collect()
    }

    /// A peer's advertised LANs that take effect.
    pub fn effective_routes(&self, p: &PeerRecord) -> Vec<IpNetwork> {
        self.route_filter().effective(p)
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

    /// After a restart: swaps that were under way when the last run
    /// stopped (redeemed, the new key never seen) are under way again, so
    /// the joiner can still come back through its invite key, as a join
    /// that crashed and runs again does. Known peers are not touched.
    pub fn resume_swaps(&mut self, since: Instant) {
        let resumed: Vec<Pending> = self
            .state
            .invites
            .iter()
            .filter_map(|i| {
                let peer = i.redeemed_by?;
                self.state
                    .peers
                    .iter()
                    .any(|p| p.public_key == peer && p.address == i.address && p.endpoint.is_none())
                    .then_some(Pending {
                        invite: i.public_key,
                        peer,
                        address: i.address,
                        since,
                    })
            })
            .filter(|r| !self.pending.iter().any(|p| p.peer == r.peer))
            .collect();
        self.pending.extend(resumed);
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
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

    /// Checks `routes` for `owner` (a site's address, or `None` for the
    /// hub): network addresses, not the tunnel, not another's.
    fn check_routes(&self, owner: Option<IpAddr>, routes: &[IpNetwork]) -> Result<(), RouteError> {
        validate_routes(routes, &self.state.subnets().all())?;
        if owner.is_some() {
            let filter = self.route_filter();
            for r in routes {
                filter.check(r)?;
            }
        }
        let mut others: Vec<(IpNetwork, String)> = Vec::new();
        if owner.is_some() {
            others.extend(self.state.routes.iter().map(|r| (*r, "the hub".to_owned())));
        }
        for p in self.state.peers.iter().filter(|p| Some(p.address) != owner) {
            let who = match &p.name {
                Some(n) => format!("site {n} ({})", p.address),
                None => format!("site {}", p.address),
            };
            others.extend(p.routes.iter().map(|r| (*r, who.clone())));
        }
        for r in routes {
            if let Some((other, owner)) = others.iter().find(|(o, _)| overlaps(r, o)) {
                return Err(RouteError::Taken {
                    route: *r,
                    other: *other,
                    owner: owner.clone(),
                });
            }
        }
        Ok(())
    }

    /// The LANs behind the site at `site` are now `routes`; they take
    /// effect where approved ([`Ledger::approve`]).
    pub fn advertise(&mut self, site: IpAddr, routes: Vec<IpNetwork>) -> Result<(), RouteError> {
        if self.site(site).is_none() {
            return Err(RouteError::NotASite(site));
        }
        self.check_routes(Some(site), &routes)?;
        let p = self
            .state
            .peers
            .iter()
            .position(|p| p.address == site && p.via.is_none())
            .expect("checked above");
        if self.state.peers[p].routes != routes {
            self.state_mut().peers[p].routes = routes;
        }
        Ok(())
    }

    /// Whether the site at `site` wants its public source address on what
    /// it sends to the hub's own addresses.
    pub fn set_snat_public(&mut self, site: IpAddr, on: bool) -> Result<(), RouteError> {
        let p = self
            .state
            .peers
            .iter()
            .position(|p| p.address == site && p.via.is_none())
            .ok_or(RouteError::NotASite(site))?;
        if self.state.peers[p].snat_public != on {
            self.state_mut().peers[p].snat_public = on;
        }
        Ok(())
    }

    /// The hub's own LANs (`serve --route`).
    pub fn set_hub_routes(&mut self, routes: Vec<IpNetwork>) -> Result<(), RouteError> {
        self.check_routes(None, &routes)?;
        if self.state.routes != routes {
            self.state_mut().routes = routes;
        }
        Ok(())
    }

    /// Every LAN in effect: the hub's, then the sites' approved ones.
    pub fn advertised(&self) -> Vec<Advertised> {
        let hub = self.server_address();
        let filter = self.route_filter();
        self.state
            .routes
            .iter()
            .map(|r| Advertised {
                prefix: *r,
                via: hub,
            })
            .chain(
                self.state
                    .peers
                    .iter()
                    .filter(|p| !p.routes.is_empty())
                    .flat_map(|p| {
                        filter.effective(p).into_iter().map(|r| Advertised {
                            prefix: r,
                            via: p.address,
                        })
                    }),
            )
            .collect()
    }

    /// The LANs behind sites in effect: the hub routes them into the tunnel.
    pub fn site_routes(&self) -> std::collections::BTreeSet<IpNetwork> {
        let filter = self.route_filter();
        self.state
            .peers
            .iter()
            .filter(|p| !p.routes.is_empty())
            .flat_map(|p| filter.effective(p))
            .collect()
    }

    /// The site named or addressed `target`.
    fn find_site(&self, target: &str) -> Result<usize, RouteError> {
        let addr: Option<IpAddr> = target.parse().ok();
        let hits: Vec<usize> = self
            .state
            .peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.via.is_none())
            .filter(|(_, p)| match addr {
                Some(a) => p.address == a,
                None => p.name.as_deref() == Some(target),
            })
            .map(|(i, _)| i)
            .collect();
        match hits.as_slice() {
            [i] if self.state.peers[*i].road_warrior => {
                Err(RouteError::RoadWarrior(target.to_owned()))
            }
            [i] => Ok(*i),
            _ => Err(RouteError::UnknownSite(target.to_owned())),
        }
    }

    /// The hub operator allows the site `target` to advertise LANs within
    /// `prefix` (`tunnel route approve`). Refused, whatever the operator
    /// says, where no site could have it ([`validate_routes`], the hub's
    /// own networks, nodes' underlay addresses) or another has it.
    /// Returns the site's address.
    pub fn approve(&mut self, target: &str, prefix: IpNetwork) -> Result<IpAddr, RouteError> {
        let i = self.find_site(target)?;
        let site = self.state.peers[i].address;
        self.check_routes(Some(site), &[prefix])?;
        let p = &self.state.peers[i];
        if !covered(p.approved(), &prefix) {
            let mut approved: Vec<IpNetwork> = p
                .approved()
                .iter()
                .filter(|a| !covered(&[prefix], a))
                .copied()
                .collect();
            approved.push(prefix);
            self.state_mut().peers[i].approved = Some(approved);
        }
        Ok(site)
    }

    /// Withdraws what the site `target` advertises or was approved for
    /// within `prefix` (`tunnel route reject`). Returns the site's address.
    pub fn reject(&mut self, target: &str, prefix: IpNetwork) -> Result<IpAddr, RouteError> {
        let i = self.find_site(target)?;
        let p = &self.state.peers[i];
        let within = |r: &IpNetwork| covered(&[prefix], r);
        if !p.routes.iter().any(within) && !p.approved().iter().any(within) {
            return Err(RouteError::NothingToReject {
                site: target.to_owned(),
                prefix,
            });
        }
        let routes = p.routes.iter().filter(|r| !within(r)).copied().collect();
        let approved = p
            .approved()
            .iter()
            .filter(|r| !within(r))
            .copied()
            .collect();
        let site = p.address;
        let p = &mut self.state_mut().peers[i];
        p.routes = routes;
        p.approved = Some(approved);
        Ok(site)
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

    /// The key that redeemed the invite for `address`, if it was.
    pub fn redeemed_by(&self, address: IpAddr) -> Option<PublicKey> {
        self.state
            .invites
            .iter()
            .find(|i| i.address == address)
            .and_then(|i| i.redeemed_by)
    }

    /// A redeem sent again by a joiner that did not get (or lost) the
    /// answer: it must ask for exactly what it asked before, and then gets
    /// the same answer, the site's name; anything else is a reuse.
    pub fn repeated_redeem(
        &self,
        address: IpAddr,
        joining: &Joining,
    ) -> Result<Option<String>, RedeemError> {
        let p = self.site(address).ok_or(RedeemError::AlreadyUsed)?;
        let same_name = joining.default_name
            || joining.name.is_none()
            || p.name.as_deref() == joining.name.as_deref();
        if p.routes == joining.routes && p.snat_public == joining.snat_public && same_name {
            Ok(p.name.clone())
        } else {
            Err(RedeemError::AlreadyUsed)
        }
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

    /// Issues invites and returns their tokens.
    pub fn mint(&mut self, req: &MintRequest, now: SystemTime) -> Result<Vec<Token>, MintError> {
        let count = limits::check_count(req.count as u64, 0)?;
        let ttl = limits::check_ttl(req.ttl)?;
        if let Some(n) = &req.name {
            limits::check_name(n)?;
            if count > 1 {
                return Err(MintError::NamedBatch);
            }
            if self.name_taken(n) {
                return Err(MintError::NameTaken(n.clone()));
            }
        }
        let expires = unix(now).saturating_add(ttl.as_secs());
        validate_routes(&req.routes, &self.state.subnets().all())?;
        let filter = self.route_filter();
        for r in &req.routes {
            filter.check(r)?;
        }
        let mut tokens = Vec::with_capacity(count);
        for _ in 0..count {
            let address = self.pool.allocate()?;
            let invite_key = PrivateKey::generate();
            self.state_mut().invites.push(InviteRecord {
                public_key: invite_key.public_key(),
                address,
                expires,
                redeemed_by: None,
                name: req.name.clone(),
                routes: req.routes.clone(),
            });
            tokens.push(Token {
                server_public_key: self.state.private_key.public_key(),
                invite_key,
                port: self.state.port,
                subnet: self.state.subnet,
                subnet6: self.state.subnet6,
                assigned: address,
                server_address: self.pool.server_address(),
                expires,
                endpoint_hint: req.endpoint_hint.clone(),
                udp: self.offer.udp,
                websocket: self.offer.websocket.clone(),
            });
        }
        Ok(tokens)
    }

    /// Admits `key` in place of the invite for `address`, whose key signed
    /// the request. A retry with the same key (the reply was lost) gets the
    /// same answer.
    pub fn redeem(
        &mut self,
        address: IpAddr,
        key: PublicKey,
        now: SystemTime,
        since: Instant,
    ) -> Result<IpNetwork, RedeemError> {
        let assigned = IpNetwork::new(address, self.state.subnet.prefix())
            .map_err(|_| RedeemError::NoInvite(address))?;
        let idx = self
            .state
            .invites
            .iter()
            .position(|i| i.address == address)
            .ok_or(RedeemError::NoInvite(address))?;
        let invite = self.state.invites[idx].clone();
        match invite.redeemed_by {
            Some(k) if k == key => return Ok(assigned),
            Some(_) => return Err(RedeemError::AlreadyUsed),
            None => {}
        }
        if invite.expires <= unix(now) {
            return Err(RedeemError::Expired);
        }
        if self.key_in_use(&key) {
            return Err(RedeemError::KeyInUse);
        }
        if self.weak(&key) {
            return Err(RedeemError::WeakKey);
        }
        self.state_mut().invites[idx].redeemed_by = Some(key);
        self.state_mut().peers.push(PeerRecord {
            public_key: key,
            address,
            joined_at: unix(now),
            name: invite.name.clone(),
            via: None,
            endpoint: None,
            routes: vec![],
            snat_public: false,
            approved: Some(invite.routes.clone()),
            road_warrior: false,
        });
        self.pending.push(Pending {
            invite: invite.public_key,
            peer: key,
            address,
            since,
        });
        Ok(assigned)
    }

    /// Names the site just admitted at `address`: the name its token was
    /// minted with, else `wanted`. A `wanted` name that another site has is
    /// refused, unless it is only a default (the host name), which then
    /// gets a number (`name-2`, ...). Returns the site's name.
    pub fn name_site(
        &mut self,
        address: IpAddr,
        wanted: Option<&str>,
        default: bool,
    ) -> Result<Option<String>, RedeemError> {
        let idx = self
            .state
            .peers
            .iter()
            .position(|p| p.address == address && p.via.is_none())
            .ok_or(RedeemError::NoInvite(address))?;
        if let Some(n) = &self.state.peers[idx].name {
            return Ok(Some(n.clone()));
        }
        let Some(wanted) = wanted else {
            return Ok(None);
        };
        let name = if default {
            let base = limits::check_name(wanted).unwrap_or("site").to_owned();
            let mut name = base.clone();
            let mut n = 2;
            while self.name_taken(&name) {
                name = format!("{base}-{n}");
                n += 1;
            }
            name
        } else {
            limits::check_name(wanted)?;
            if self.name_taken(wanted) {
                return Err(RedeemError::NameTaken(wanted.to_owned()));
            }
            wanted.to_owned()
        };
        self.state_mut().peers[idx].name = Some(name.clone());
        Ok(Some(name))
    }

    /// A new endpoint for the hub's container `name` (attached by label or
    /// the network driver), on an interface named by `iface_of`; the one it
    /// has when it has one.
    pub fn add_container(
        &mut self,
        name: &str,
        driver: bool,
        iface_of: impl Fn(usize) -> String,
    ) -> Result<ContainerRecord, IpamError> {
        if let Some(c) = self.state.containers.iter().find(|c| c.container == name) {
            return Ok(c.clone());
        }
        let address = self.pool.allocate()?;
        let mut n = 0;
        let mut iface = iface_of(n);
        while self.state.containers.iter().any(|c| c.iface == iface) {
            n += 1;
            iface = iface_of(n);
        }
        let record = ContainerRecord {
            container: name.to_owned(),
            iface,
            private_key: PrivateKey::generate(),
            address,
            by_label: !driver,
            driver,
        };
        self.state_mut().containers.push(record.clone());
        Ok(record)
    }

    /// The hub's container endpoint at `address` belongs to container `name`.
    pub fn rename_container(&mut self, address: IpAddr, name: &str) -> Result<(), RegisterError> {
        limits::check_name(name)?;
        if self
            .state
            .containers
            .iter()
            .any(|c| c.container == name && c.address != address)
        {
            return Err(RegisterError::NameTaken(name.to_owned()));
        }
        let i = self
            .state
            .containers
            .iter()
            .position(|c| c.address == address)
            .ok_or(RegisterError::Unknown)?;
        if self.state.containers[i].container != name {
            self.state_mut().containers[i].container = name.to_owned();
        }
        Ok(())
    }

    /// The hub's container `name` is gone: its endpoint and address too.
    pub fn remove_container(&mut self, name: &str) {
        if let Some(i) = self
            .state
            .containers
            .iter()
            .position(|c| c.container == name)
        {
            let c = self.state_mut().containers.remove(i);
            self.pool.release(c.address);
        }
    }

    /// Gives back the endpoint `key` of the site at `site` (its container
    /// was removed): the peer goes and its address is free again.
    pub fn release(&mut self, site: IpAddr, key: &PublicKey) -> Result<IpAddr, RegisterError> {
        let idx = self
            .state
            .peers
            .iter()
            .position(|p| p.public_key == *key && p.via == Some(site))
            .ok_or(RegisterError::Unknown)?;
        let p = self.state_mut().peers.remove(idx);
        self.pool.release(p.address);
        Ok(p.address)
    }

    /// Admits a stock WireGuard client (a phone, a laptop) under `name`
    /// with a key made on that device: a peer like a site, with no invite
    /// to redeem and no key to swap. Returns its address.
    pub fn admit(
        &mut self,
        name: &str,
        key: PublicKey,
        now: SystemTime,
    ) -> Result<IpAddr, AdmitError> {
        limits::check_name(name)?;
        if self.name_taken(name) {
            return Err(AdmitError::NameTaken(name.to_owned()));
        }
        if self.key_in_use(&key) {
            return Err(AdmitError::KeyInUse);
        }
        if self.weak(&key) {
            return Err(AdmitError::WeakKey);
        }
        let address = self.pool.allocate()?;
        self.state_mut().peers.push(PeerRecord {
            public_key: key,
            address,
            joined_at: unix(now),
            name: Some(name.to_owned()),
            via: None,
            endpoint: None,
            routes: vec![],
            snat_public: false,
            approved: Some(vec![]),
            road_warrior: true,
        });
        Ok(address)
    }

    /// Admits another endpoint (a container) of the site at `site`.
    /// Idempotent for the same key and name.
    pub fn register(
        &mut self,
        site: IpAddr,
        key: PublicKey,
        name: &str,
        now: SystemTime,
    ) -> Result<IpNetwork, RegisterError> {
        let prefix = self.state.subnet.prefix();
        let net = |a| IpNetwork::new(a, prefix).expect("an address of the subnet");
        if self.site(site).is_none() {
            return Err(RegisterError::NotASite(site));
        }
        limits::check_name(name)?;
        if let Some(i) = self.state.peers.iter().position(|p| p.public_key == key) {
            let p = &self.state.peers[i];
            if p.via != Some(site) {
                return Err(RegisterError::KeyInUse);
            }
            if p.name.as_deref() == Some(name) {
                return Ok(net(p.address));
            }
            // The same endpoint under a new name (its container is known
            // by name only once it started).
            if self
                .state
                .peers
                .iter()
                .any(|o| o.via == Some(site) && o.name.as_deref() == Some(name))
            {
                return Err(RegisterError::NameTaken(name.to_owned()));
            }
            let address = p.address;
            self.state_mut().peers[i].name = Some(name.to_owned());
            return Ok(net(address));
        }
        if self.key_in_use(&key) {
            return Err(RegisterError::KeyInUse);
        }
        if self.weak(&key) {
            return Err(RegisterError::WeakKey);
        }
        let mine = self.state.peers.iter().filter(|p| p.via == Some(site));
        let mut count = 0;
        for p in mine {
            if p.name.as_deref() == Some(name) {
                return Err(RegisterError::NameTaken(name.to_owned()));
            }
            count += 1;
        }
        if count >= self.quota {
            return Err(RegisterError::Quota(self.quota));
        }
        let address = self.pool.allocate()?;
        self.state_mut().peers.push(PeerRecord {
            public_key: key,
            address,
            joined_at: unix(now),
            name: Some(name.to_owned()),
            via: Some(site),
            endpoint: None,
            routes: vec![],
            snat_public: false,
            approved: Some(vec![]),
            road_warrior: false,
        });
        Ok(net(address))
    }

    /// What `target` (a name or an address) names, as "address (what)".
    fn candidates(&self, target: &str) -> Vec<(IpAddr, String)> {
        let addr: Option<IpAddr> = target.parse().ok();
        let hit = |name: &Option<String>, a: IpAddr| {
            Some(a) == addr || (addr.is_none() && name.as_deref() == Some(target))
        };
        let mut out = Vec::new();
        for p in &self.state.peers {
            if hit(&p.name, p.address) {
                let what = match (p.via, &p.name) {
                    (None, Some(n)) => n.clone(),
                    (None, None) => "site".to_owned(),
                    (Some(v), n) => {
                        format!(
                            "container {} on {}",
                            n.as_deref().unwrap_or("?"),
                            self.site_label(v)
                        )
                    }
                };
                out.push((p.address, what));
            }
        }
        for i in self
            .state
            .invites
            .iter()
            .filter(|i| i.redeemed_by.is_none())
        {
            if hit(&i.name, i.address) {
                let what = match &i.name {
                    Some(n) => format!("unused token {n}"),
                    None => "unused token".to_owned(),
                };
                out.push((i.address, what));
            }
        }
        out
    }

    fn site_label(&self, addr: IpAddr) -> String {
        match self.site(addr).and_then(|s| s.name.as_deref()) {
            Some(n) => n.to_owned(),
            None => format!("site {addr}"),
        }
    }

    /// Removes a peer (by name or address) with the endpoints it
    /// registered, or an unused invite; their addresses become free.
    /// Returns what was removed, as "address (what)".
    pub fn revoke(&mut self, target: &str) -> Result<Vec<String>, RevokeError> {
        let found = self.candidates(target);
        let (addr, what) = match found.as_slice() {
            [] => {
                if let Some(c) = self
                    .state
                    .containers
                    .iter()
                    .find(|c| c.container == target || c.address.to_string() == target)
                {
                    return Err(RevokeError::HubContainer(c.container.clone()));
                }
                return Err(RevokeError::NotFound(target.to_owned()));
            }
            [one] => one.clone(),
            many => {
                return Err(RevokeError::Ambiguous {
                    target: target.to_owned(),
                    candidates: many.iter().map(|(a, w)| format!("{a} ({w})")).collect(),
                });
            }
        };
        let mut removed = vec![format!("{addr} ({what})")];
        let is_site = self.site(addr).is_some();
        let gone = |p: &PeerRecord| p.address == addr || (is_site && p.via == Some(addr));
        let (out, kept): (Vec<_>, Vec<_>) = self.state_mut().peers.drain(..).partition(gone);
        self.state.peers = kept;
        for p in &out {
            self.pool.release(p.address);
            if p.address != addr {
                removed.push(format!(
                    "{} (container {})",
                    p.address,
                    p.name.as_deref().unwrap_or("?")
                ));
            }
        }
        // The invite at that address goes too, used or not.
        self.state.invites.retain(|i| i.address != addr);
        self.pool.release(addr);
        let keys: Vec<PublicKey> = out.iter().map(|p| p.public_key).collect();
        self.pending
            .retain(|p| p.address != addr && !keys.contains(&p.peer));
        Ok(removed)
    }

    /// Forgets expired invites; unused ones give their address back.
    /// Whether an invite has expired by `now`: [`Ledger::prune`] has work.
    pub fn any_expired(&self, now: SystemTime) -> bool {
        let now = unix(now);
        self.state.invites.iter().any(|i| i.expires <= now)
    }

    pub fn prune(&mut self, now: SystemTime) -> usize {
        if !self.any_expired(now) {
            return 0;
        }
        let now = unix(now);
        let (expired, live): (Vec<_>, Vec<_>) = self
            .state_mut()
            .invites
            .drain(..)
            .partition(|i| i.expires <= now);
        self.state.invites = live;
        for i in &expired {
            if i.redeemed_by.is_none() {
                self.pool.release(i.address);
            }
            self.pending.retain(|p| p.invite != i.public_key);
        }
        expired.len()
    }

    /// Moves addresses from redeemed invites to the keys that replaced
    /// them, once `handshaked(key)` says the key is in use, or after
    /// [`SWAP_GRACE`]. Returns the moves made.
    pub fn complete_swaps(
        &mut self,
        handshaked: impl Fn(&PublicKey) -> bool,
        now: Instant,
    ) -> Vec<(IpAddr, PublicKey)> {
        let (done, waiting): (Vec<_>, Vec<_>) = self
            .pending
            .drain(..)
            .partition(|p| swap_due(p, &handshaked, now));
        self.pending = waiting;
        done.into_iter().map(|p| (p.address, p.peer)).collect()
    }

    /// Whether [`Ledger::complete_swaps`] would move anything.
    pub fn swaps_due(&self, handshaked: impl Fn(&PublicKey) -> bool, now: Instant) -> bool {
        self.pending.iter().any(|p| swap_due(p, &handshaked, now))
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

    fn state() -> ServerState {
        ServerState::new("10.77.0.0/24".parse().unwrap(), 51820, 1420)
    }

    fn ledger() -> Ledger {
        Ledger::new(state(), 2).unwrap()
    }

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn mint(l: &mut Ledger, count: usize, name: Option<&str>) -> Vec<Token> {
        l.mint(
            &MintRequest {
                count,
                ttl: Duration::from_secs(60),
                endpoint_hint: None,
                name: name.map(str::to_owned),
                routes: vec![],
            },
            t0(),
        )
        .unwrap()
    }

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A site admitted and swapped in at .2 (from a first token).
    fn site(l: &mut Ledger, name: Option<&str>) -> (IpAddr, PublicKey) {
        let t = mint(l, 1, name).remove(0);
        let k = key();
        l.redeem(t.assigned, k, t0(), Instant::now()).unwrap();
        l.complete_swaps(|_| true, Instant::now());
        (t.assigned, k)
    }

    #[test]
    fn mint_allocates_in_order_and_keeps_only_the_public_half() {
        let mut l = ledger();
        let before = l.desired();
        let tokens = mint(&mut l, 2, None);
        assert_eq!(tokens[0].assigned, ip("10.77.0.2"));
        assert_eq!(tokens[1].assigned, ip("10.77.0.3"));
        assert_eq!(tokens[0].server_address, ip("10.77.0.1"));
        assert_eq!(tokens[0].expires, unix(t0()) + 60);
        let ops = diff(&before, &l.desired());
        assert_eq!(ops.len(), 2);
        assert!(
            matches!(&ops[0], Op::Upsert(p) if p.allowed_ips == vec![host_net(ip("10.77.0.2"))] || p.allowed_ips == vec![host_net(ip("10.77.0.3"))])
        );
        let json = serde_json::to_string(l.state()).unwrap();
        assert!(!json.contains(tokens[0].invite_key.to_base64().as_str()));
    }

    #[test]
    fn mint_bounds_and_names() {
        let mut l = ledger();
        let req = |count, ttl: u64, name: Option<&str>| MintRequest {
            count,
            ttl: Duration::from_secs(ttl),
            endpoint_hint: None,
            name: name.map(str::to_owned),
            routes: vec![],
        };
        assert!(matches!(
            l.mint(&req(1001, 60, None), t0()),
            Err(MintError::Limit(_))
        ));
        assert!(matches!(
            l.mint(&req(1, u64::MAX, None), t0()),
            Err(MintError::Limit(_))
        ));
        assert!(matches!(
            l.mint(&req(1, 60, Some("a b")), t0()),
            Err(MintError::Limit(_))
        ));
        assert_eq!(
            l.mint(&req(2, 60, Some("x")), t0()).unwrap_err(),
            MintError::NamedBatch
        );
        l.mint(&req(1, 60, Some("x")), t0()).unwrap();
        assert_eq!(
            l.mint(&req(1, 60, Some("x")), t0()).unwrap_err(),
            MintError::NameTaken("x".into())
        );
        assert!(l.state().invites.len() == 1, "refusals change nothing");
    }

    #[test]
    fn redeem_then_swap_after_handshake() {
        let mut l = ledger();
        let tok = mint(&mut l, 1, None).remove(0);
        let invite = tok.invite_key.public_key();
        let joiner = key();
        let before = l.desired();
        let net = l
            .redeem(tok.assigned, joiner, t0(), Instant::now())
            .unwrap();
        assert_eq!(net.to_string(), "10.77.0.2/24");
        // The reply must still route to the invite: the new key has no address yet.
        assert_eq!(
            diff(&before, &l.desired()),
            vec![Op::Upsert(PeerSpec {
                public_key: joiner,
                endpoint: None,
                allowed_ips: vec![],
                keepalive: None
            })]
        );
        assert!(!l.swaps_due(|_| false, Instant::now()));
        assert!(l.complete_swaps(|_| false, Instant::now()).is_empty());
        assert!(l.swaps_due(|k| *k == joiner, Instant::now()));
        assert!(!l.swaps_due(|k| *k == invite, Instant::now()));
        let before = l.desired();
        assert_eq!(l.complete_swaps(|k| *k == joiner, Instant::now()).len(), 1);
        assert!(
            !l.swaps_due(|_| true, Instant::now()),
            "nothing is left pending"
        );
        let ops = diff(&before, &l.desired());
        assert_eq!(
            ops,
            vec![
                Op::SetAllowedIps(invite, vec![]),
                Op::SetAllowedIps(joiner, vec![host_net(tok.assigned)])
            ]
        );
        assert!(!l.has_pending());
        // A swap also completes after the grace period, handshake or not.
        let tok = mint(&mut l, 1, None).remove(0);
        let start = Instant::now();
        l.redeem(tok.assigned, key(), t0(), start).unwrap();
        assert!(l.complete_swaps(|_| false, start + SWAP_GRACE).is_empty());
        assert_eq!(
            l.complete_swaps(|_| false, start + SWAP_GRACE + Duration::from_secs(1))
                .len(),
            1
        );
    }

    #[test]
    fn reuse_is_refused_but_a_retry_with_the_same_key_is_not() {
        let mut l = ledger();
        let tok = mint(&mut l, 1, None).remove(0);
        let first = key();
        l.redeem(tok.assigned, first, t0(), Instant::now()).unwrap();
        let snapshot = l.state().clone();
        assert!(l.redeem(tok.assigned, first, t0(), Instant::now()).is_ok());
        assert_eq!(l.state(), &snapshot, "a retry changes nothing");
        // A restart before the new key was seen: the invite keeps the
        // address (the joiner can come back through it) until it is.
        let mut restarted = Ledger::new(snapshot.clone(), 2).unwrap();
        restarted.resume_swaps(Instant::now());
        assert!(restarted.has_pending());
        let invite = tok.invite_key.public_key();
        assert!(!restarted.desired()[&invite].allowed_ips.is_empty());
        assert!(restarted.desired()[&first].allowed_ips.is_empty());
        assert!(
            restarted
                .redeem(tok.assigned, first, t0(), Instant::now())
                .is_ok()
        );
        assert_eq!(
            l.redeem(tok.assigned, key(), t0(), Instant::now()),
            Err(RedeemError::AlreadyUsed)
        );
    }

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
    fn unknown_address_and_expiry() {
        let mut l = ledger();
        let tok = mint(&mut l, 1, None).remove(0);
        let stranger = ip("10.77.0.9");
        assert_eq!(
            l.redeem(stranger, key(), t0(), Instant::now()),
            Err(RedeemError::NoInvite(stranger))
        );
        let late = t0() + Duration::from_secs(61);
        assert_eq!(
            l.redeem(tok.assigned, key(), late, Instant::now()),
            Err(RedeemError::Expired)
        );
    }

    #[test]
    fn register_quota_names_and_idempotence() {
        let mut l = ledger();
        let (site_addr, _) = site(&mut l, Some("b"));
        let k1 = key();
        let a1 = l.register(site_addr, k1, "web", t0()).unwrap();
        assert_eq!(
            l.register(site_addr, k1, "web", t0()).unwrap(),
            a1,
            "idempotent"
        );
        assert_eq!(
            l.register(site_addr, key(), "web", t0()),
            Err(RegisterError::NameTaken("web".into()))
        );
        // The same key under a new name renames the endpoint.
        assert_eq!(l.register(site_addr, k1, "db", t0()).unwrap(), a1);
        assert_eq!(
            l.register(site_addr, k1, "db", t0()).unwrap(),
            a1,
            "idempotent under the new name"
        );
        l.register(site_addr, key(), "web", t0()).unwrap();
        assert_eq!(
            l.register(site_addr, key(), "cache", t0()),
            Err(RegisterError::Quota(2))
        );
        assert!(matches!(
            l.register(site_addr, key(), "bad name", t0()),
            Err(RegisterError::Name(_))
        ));
        // Only sites register; not an invite's address, not an endpoint's.
        let tok = mint(&mut l, 1, None).remove(0);
        assert_eq!(
            l.register(tok.assigned, key(), "x", t0()),
            Err(RegisterError::NotASite(tok.assigned))
        );
        assert_eq!(
            l.register(a1.ip(), key(), "x", t0()),
            Err(RegisterError::NotASite(a1.ip()))
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
    fn revoke_removes_a_site_with_its_endpoints_and_refuses_ambiguity() {
        let mut l = Ledger::new(state(), 8).unwrap();
        let (b, _) = site(&mut l, Some("b"));
        let (c, _) = site(&mut l, Some("c"));
        l.register(b, key(), "web", t0()).unwrap();
        l.register(c, key(), "web", t0()).unwrap();
        let before = l.state().clone();
        let err = l.revoke("web").unwrap_err();
        assert!(
            matches!(&err, RevokeError::Ambiguous { candidates, .. } if candidates.len() == 2),
            "{err}"
        );
        assert!(err.to_string().contains("(container web on b)"), "{err}");
        assert_eq!(l.state(), &before, "a refusal changes nothing");
        assert_eq!(l.revoke("nope"), Err(RevokeError::NotFound("nope".into())));

        let desired = l.desired();
        let removed = l.revoke("b").unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert_eq!(removed[0], format!("{b} (b)"));
        let ops = diff(&desired, &l.desired());
        assert_eq!(
            ops.iter().filter(|o| matches!(o, Op::Remove(_))).count(),
            3,
            "site, its endpoint, its used invite: {ops:?}"
        );
        // The other web is now unique; addresses are free again.
        assert_eq!(l.revoke("web").unwrap().len(), 1);
        let t = mint(&mut l, 1, None).remove(0);
        assert_eq!(t.assigned, b);
    }

    #[test]
    fn revoke_cancels_unused_tokens_but_not_hub_containers() {
        let mut s = state();
        ensure_containers(&mut s, &["web".into()], |n| format!("wgc{n}")).unwrap();
        let mut l = Ledger::new(s, 2).unwrap();
        mint(&mut l, 1, Some("branch"));
        assert_eq!(
            l.revoke("branch").unwrap(),
            vec!["10.77.0.3 (unused token branch)".to_string()]
        );
        assert!(l.state().invites.is_empty());
        assert_eq!(
            l.revoke("web"),
            Err(RevokeError::HubContainer("web".into()))
        );
    }

    #[test]
    fn prune_frees_unused_addresses_only() {
        let mut l = ledger();
        let tok = mint(&mut l, 2, None);
        l.redeem(tok[0].assigned, key(), t0(), Instant::now())
            .unwrap();
        let before = l.desired();
        assert!(!l.any_expired(t0() + Duration::from_secs(59)));
        assert!(l.any_expired(t0() + Duration::from_secs(61)));
        assert_eq!(l.prune(t0() + Duration::from_secs(61)), 2);
        assert!(!l.any_expired(t0() + Duration::from_secs(61)));
        let ops = diff(&before, &l.desired());
        assert_eq!(ops.iter().filter(|o| matches!(o, Op::Remove(_))).count(), 2);
        assert!(
            !l.has_pending(),
            "a pending swap of an expired invite is dropped"
        );
        // .3 is free again; .2 stays with the admitted peer.
        assert_eq!(mint(&mut l, 1, None)[0].assigned, ip("10.77.0.3"));
    }

    #[test]
    fn containers_get_stable_records() {
        let mut s = state();
        let names = vec!["web".to_string(), "db".to_string()];
        ensure_containers(&mut s, &names, |n| format!("wgc{n}")).unwrap();
        let first = s.containers.clone();
        assert_eq!(first[0].address, ip("10.77.0.2"));
        assert_eq!(first[1].iface, "wgc1");
        ensure_containers(&mut s, &names, |n| format!("wgc{n}")).unwrap();
        assert_eq!(s.containers, first, "a restart keeps keys and addresses");
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

    #[test]
    fn a_stock_client_is_admitted_once_under_a_free_name_and_revoked_like_a_site() {
        let mut l = ledger();
        let k = key();
        let a = l.admit("phone", k, t0()).unwrap();
        let desired = l.desired();
        assert_eq!(desired[&k].allowed_ips, vec![host_net(a)]);
        assert_eq!(
            l.admit("phone", key(), t0()),
            Err(AdmitError::NameTaken("phone".into()))
        );
        assert_eq!(l.admit("laptop", k, t0()), Err(AdmitError::KeyInUse));
        assert_eq!(
            l.admit("laptop", PublicKey([0; 32]), t0()),
            Err(AdmitError::WeakKey)
        );
        assert!(matches!(
            l.admit("bad name!", key(), t0()),
            Err(AdmitError::Name(_))
        ));
        l.revoke("phone").unwrap();
        assert!(!l.desired().contains_key(&k));
        // The address and the name are free again.
        assert_eq!(l.admit("phone", key(), t0()).unwrap(), a);
    }

    #[test]
    fn sites_are_named_by_token_then_flag_then_numbered_host_name() {
        let mut l = ledger();
        l.state_mut().name = Some("hq".into());
        let (token_named, _) = site(&mut l, Some("paris"));
        assert_eq!(
            l.name_site(token_named, Some("other"), false)
                .unwrap()
                .as_deref(),
            Some("paris"),
            "the token's name wins"
        );
        let (a, _) = site(&mut l, None);
        assert_eq!(
            l.name_site(a, Some("lyon"), false).unwrap().as_deref(),
            Some("lyon")
        );
        let t = mint(&mut l, 1, None).remove(0);
        l.redeem(t.assigned, key(), t0(), Instant::now()).unwrap();
        assert_eq!(
            l.name_site(t.assigned, Some("lyon"), false),
            Err(RedeemError::NameTaken("lyon".into()))
        );
        // The hub's own name counts, and a default name is numbered.
        assert_eq!(
            l.name_site(t.assigned, Some("hq"), true)
                .unwrap()
                .as_deref(),
            Some("hq-2")
        );
    }

    #[test]
    fn a_released_endpoint_frees_its_address() {
        let mut l = ledger();
        let (s, _) = site(&mut l, None);
        let k = key();
        let a = l.register(s, k, "web", t0()).unwrap();
        assert_eq!(l.release(ip("10.77.0.9"), &k), Err(RegisterError::Unknown));
        assert_eq!(l.release(s, &k).unwrap(), a.ip());
        assert!(!l.desired().contains_key(&k));
        assert_eq!(l.register(s, key(), "web", t0()).unwrap(), a);
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn routed(l: &Ledger) -> Vec<IpNetwork> {
        l.site_routes().into_iter().collect()
    }

    #[test]
    fn advertised_lans_take_effect_only_within_an_approval() {
        let mut l = ledger();
        let (a, _) = site(&mut l, Some("a"));
        l.advertise(a, vec![net("192.168.50.0/24"), net("192.168.60.0/24")])
            .unwrap();
        assert!(routed(&l).is_empty(), "nothing approved yet");
        assert_eq!(l.pending_routes(a).len(), 2);
        assert!(l.desired().values().all(|p| p.allowed_ips.len() <= 1));
        // By name, a wider prefix covers the narrower one asked for.
        l.approve("a", net("192.168.48.0/21")).unwrap();
        assert_eq!(routed(&l), [net("192.168.50.0/24")]);
        assert_eq!(l.pending_routes(a), [net("192.168.60.0/24")]);
        assert_eq!(l.advertised().len(), 1);
        // By address.
        l.approve(&a.to_string(), net("192.168.60.0/24")).unwrap();
        assert_eq!(routed(&l).len(), 2);
        // Rejecting withdraws the route and its approval.
        l.reject("a", net("192.168.60.0/24")).unwrap();
        assert_eq!(routed(&l), [net("192.168.50.0/24")]);
        assert_eq!(l.state().peers[0].routes, [net("192.168.50.0/24")]);
        assert!(matches!(
            l.reject("a", net("10.9.0.0/16")),
            Err(RouteError::NothingToReject { .. })
        ));
        assert!(matches!(
            l.approve("nobody", net("10.9.0.0/16")),
            Err(RouteError::UnknownSite(_))
        ));
    }

    #[test]
    fn no_approval_gives_a_site_the_hubs_networks_a_nodes_underlay_or_the_tunnel() {
        let mut l = ledger();
        l.set_host_networks(&[
            net("192.168.1.5/24"),
            net("10.77.0.1/24"),
            net("127.0.0.1/8"),
        ]);
        let (a, _) = site(&mut l, Some("a"));
        let (b, kb) = site(&mut l, Some("b"));
        // b is seen at 198.51.100.7.
        l.record_endpoints(&[PeerStatus {
            public_key: kb,
            endpoint: Some("198.51.100.7:40000".parse().unwrap()),
            allowed_ips: vec![],
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            keepalive: None,
        }]);
        for (prefix, want) in [
            ("198.51.100.7/32", "the address a node reaches the hub from"),
            ("198.51.100.0/24", "the address a node reaches the hub from"),
            ("192.168.1.0/24", "a network of the hub's own host"),
            ("192.168.1.128/25", "a network of the hub's own host"),
            ("192.168.0.0/16", "a network of the hub's own host"),
            ("10.77.0.0/16", "overlaps the tunnel's subnet"),
            ("0.0.0.0/0", "whole internet"),
            ("127.0.0.0/8", "loopback"),
            ("224.0.0.0/8", "multicast"),
        ] {
            let err = l.approve("a", net(prefix)).unwrap_err().to_string();
            assert!(err.contains(want), "{prefix}: {err}");
            let err = l.advertise(a, vec![net(prefix)]).unwrap_err().to_string();
            assert!(err.contains(want), "{prefix}: {err}");
        }
        assert!(l.state().peers.iter().all(|p| p.approved().is_empty()));
        // A token cannot approve them in advance either.
        let err = l
            .mint(
                &MintRequest {
                    count: 1,
                    ttl: Duration::from_secs(60),
                    endpoint_hint: None,
                    name: None,
                    routes: vec![net("192.168.1.0/24")],
                },
                t0(),
            )
            .unwrap_err();
        assert!(
            matches!(err, MintError::Routes(RouteError::HubNetwork(..))),
            "{err}"
        );
        // A route saved before a node was seen inside it stops taking effect.
        l.advertise(b, vec![net("203.0.113.0/24")]).unwrap();
        l.approve("b", net("203.0.113.0/24")).unwrap();
        assert_eq!(routed(&l), [net("203.0.113.0/24")]);
        l.note_underlay([ip("203.0.113.9")]);
        assert!(routed(&l).is_empty());
        assert_eq!(l.pending_routes(b), [net("203.0.113.0/24")]);
    }

    #[test]
    fn a_road_warrior_is_no_site_and_approves_nothing() {
        let mut l = ledger();
        let rw = l.admit("phone", key(), t0()).unwrap();
        assert!(l.site(rw).is_none());
        assert!(matches!(
            l.advertise(rw, vec![net("192.168.9.0/24")]),
            Err(RouteError::NotASite(_))
        ));
        assert!(matches!(
            l.register(rw, key(), "web", t0()),
            Err(RegisterError::NotASite(_))
        ));
        assert!(matches!(
            l.approve("phone", net("192.168.9.0/24")),
            Err(RouteError::RoadWarrior(_))
        ));
    }

    #[test]
    fn a_saved_state_from_before_approvals_keeps_its_routes() {
        let mut l = ledger();
        let (a, _) = site(&mut l, Some("a"));
        l.advertise(a, vec![net("192.168.50.0/24")]).unwrap();
        let mut old = l.state().clone();
        old.peers[0].approved = None;
        let l = Ledger::new(old, 2).unwrap();
        assert_eq!(routed(&l), [net("192.168.50.0/24")]);
        assert_eq!(l.state().peers[0].approved(), [net("192.168.50.0/24")]);
    }

    #[test]
    fn invite_addresses_are_quarantined_until_the_joiner_key_takes_over() {
        let mut l = ledger();
        let t = mint(&mut l, 1, None).remove(0);
        assert_eq!(l.quarantined(), [t.assigned]);
        let k = key();
        l.redeem(t.assigned, k, t0(), Instant::now()).unwrap();
        assert_eq!(l.quarantined(), [t.assigned], "the invite still holds it");
        l.complete_swaps(|_| true, Instant::now());
        assert!(l.quarantined().is_empty());
    }

    #[test]
    fn a_repeated_redeem_must_ask_for_the_same() {
        let mut l = ledger();
        let t = mint(&mut l, 1, None).remove(0);
        let k = key();
        l.redeem(t.assigned, k, t0(), Instant::now()).unwrap();
        l.name_site(t.assigned, Some("host"), true).unwrap();
        l.advertise(t.assigned, vec![net("192.168.5.0/24")])
            .unwrap();
        let same = Joining {
            routes: vec![net("192.168.5.0/24")],
            snat_public: false,
            name: Some("host".into()),
            default_name: true,
        };
        assert_eq!(
            l.repeated_redeem(t.assigned, &same),
            Ok(Some("host".into()))
        );
        for other in [
            Joining {
                routes: vec![net("192.168.6.0/24")],
                ..same.clone()
            },
            Joining {
                snat_public: true,
                ..same.clone()
            },
        ] {
            assert_eq!(
                l.repeated_redeem(t.assigned, &other),
                Err(RedeemError::AlreadyUsed)
            );
        }
    }
}
