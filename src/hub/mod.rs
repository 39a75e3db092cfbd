//! The hub: its [`ledger`] (pure bookkeeping) applied to a WireGuard
//! device and saved.
//!
//! Every change is one transaction: the ledger decides, the device gets
//! the diff of desired peers, and the state is saved. A refused or failed
//! change leaves ledger, device and disk as they were. Changes that grant
//! something (tokens, admissions) must be saved before they are answered;
//! the others (revocations, expiry, swaps, endpoints) take effect at once,
//! and a failed save of them is logged and retried, so that a full or
//! read-only disk never takes the tunnel down.

pub mod api;
pub mod http;
pub mod ledger;
pub mod run;

pub use ledger::{
    AdmitError, Advertised, Caller, Joining, Ledger, MintError, MintRequest, RedeemError,
    RegisterError, RevokeError, RouteError, ensure_containers, host_net, unix,
};

use crate::control::auth::{AuthError, Proof, ReplayGuard};
use crate::keys::PublicKey;
use crate::state::{Endpoint, ServerState};
use crate::store::{StateDir, StateError};
use crate::token::Token;
use crate::wg::{PeerSpec, WgDevice, WgError};
use ipnetwork::IpNetwork;
use ledger::{Op, diff};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{Mutex, Notify};

/// How often one site may announce that it leaves (each resets its session).
const LEAVE_INTERVAL: Duration = Duration::from_secs(5);
/// How often a failing save is logged again.
const SAVE_NAG: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("changing the WireGuard device")]
    Wg(#[from] WgError),
    #[error("saving the hub's state")]
    State(#[from] StateError),
    #[error("routing an advertised LAN into the tunnel")]
    Net(#[from] crate::net::NetError),
}

/// A hub operation that did not happen: refused by the ledger, or the
/// device or disk failed (and the change was undone).
#[derive(Debug, thiserror::Error)]
pub enum Denied<E: std::error::Error + 'static> {
    #[error(transparent)]
    Refused(E),
    #[error("the hub cannot make this change now")]
    Unavailable(#[source] HubError),
}

#[derive(Debug, thiserror::Error)]
pub enum LeaveError {
    #[error("{0} is not an admitted site")]
    NotASite(IpAddr),
    #[error("this site announced it leaves less than {}s ago", LEAVE_INTERVAL.as_secs())]
    TooSoon,
    #[error("resetting the site's peer")]
    Hub(#[from] HubError),
}

pub struct Hub {
    wg: Arc<dyn WgDevice>,
    /// Where the hub routes the LANs behind sites into the tunnel (none in
    /// tests that do not route).
    net: Option<Arc<dyn crate::net::NetOps>>,
    /// Every advertised LAN, as sites and the hub's containers learn them.
    routes: tokio::sync::watch::Sender<Vec<Advertised>>,
    /// Bumped on every change to the state (names follow it).
    changes: tokio::sync::watch::Sender<u64>,
    metrics: Arc<crate::metrics::Metrics>,
    store: StateDir,
    iface: String,
    ledger: Mutex<Ledger>,
    replay: std::sync::Mutex<ReplayGuard>,
    leaves: std::sync::Mutex<HashMap<PublicKey, Instant>>,
    /// The last failed save and when it was last logged; `None` when the
    /// disk holds the current state.
    unsaved: std::sync::Mutex<Option<Instant>>,
    /// Wakes the swap loop as soon as a redeem leaves a swap pending.
    redeemed: Notify,
    /// The addresses the device lets reach the control API only.
    quarantine: Option<Arc<crate::wg::Quarantine>>,
    uplinks: std::sync::Mutex<Uplinks>,
}

/// The links through which the hub reaches its peers' endpoints.
#[derive(Default)]
struct Uplinks {
    /// Each peer endpoint's address, and the link it is routed through.
    via: HashMap<IpAddr, Option<String>>,
    /// This host's addresses on those links.
    addrs: Vec<IpAddr>,
}

/// What a redeem gave the joiner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemed {
    pub address: IpNetwork,
    /// The site's name on the hub.
    pub name: Option<String>,
    /// Its advertised LANs that wait for the hub operator's approval.
    pub pending: Vec<IpNetwork>,
}

async fn apply(wg: &dyn WgDevice, ops: &[Op]) -> Result<(), WgError> {
    for op in ops {
        match op {
            Op::Upsert(spec) => wg.upsert_peer(spec).await?,
            Op::SetAllowedIps(k, ips) => wg.set_allowed_ips(k, ips).await?,
            Op::Remove(k) => wg.remove_peer(k).await?,
        }
    }
    Ok(())
}

/// Undoes what may have been applied of a change; an op that was never
/// applied fails harmlessly here.
async fn undo(wg: &dyn WgDevice, ops: &[Op]) {
    for op in ops {
        let _ = apply(wg, std::slice::from_ref(op)).await;
    }
}

/// Routes the LANs of `after` that `before` lacked into the tunnel, and
/// takes back the others.
async fn sync_routes(
    net: Option<&dyn crate::net::NetOps>,
    iface: &str,
    before: &std::collections::BTreeSet<IpNetwork>,
    after: &std::collections::BTreeSet<IpNetwork>,
) -> Result<(), crate::net::NetError> {
    let Some(net) = net else { return Ok(()) };
    for r in after.difference(before) {
        net.add_route(*r, iface, None).await?;
    }
    for r in before.difference(after) {
        net.del_route(*r, iface, None).await?;
    }
    Ok(())
}

/// The endpoint of one of the hub's containers: the hub is its peer, on
/// loopback, as its UDP socket lives in the hub's namespace too.
pub fn container_spec(
    state: &ServerState,
    c: &crate::state::ContainerRecord,
    server_ip: IpAddr,
) -> crate::containers::EndpointSpec {
    crate::containers::EndpointSpec {
        container: c.container.clone(),
        iface: c.iface.clone(),
        key: c.private_key.clone(),
        address: IpNetwork::new(c.address, state.subnet.prefix()).expect("prefix of the subnet"),
        address6: state.subnets().interface(c.address).get(1).copied(),
        hub: PeerSpec {
            public_key: state.private_key.public_key(),
            endpoint: Some(std::net::SocketAddr::from(([127, 0, 0, 1], state.port))),
            allowed_ips: state.subnets().all(),
            keepalive: Some(crate::wg::KEEPALIVE),
        },
        mtu: state.mtu,
        probe: std::net::SocketAddr::new(server_ip, crate::control::CONTROL_PORT),
        link: None,
        by_label: c.by_label,
    }
}

/// The hub's containers attached by label or the network driver: records
/// in the ledger, made and given back as transactions.
pub struct HubEndpoints {
    pub hub: Arc<Hub>,
    pub iface: String,
}

#[async_trait::async_trait]
impl crate::containers::Endpoints for HubEndpoints {
    async fn allocate(
        &self,
        name: &str,
        driver: bool,
    ) -> Result<crate::containers::EndpointSpec, crate::containers::ContainerError> {
        let iface = self.iface.clone();
        let record = self
            .hub
            .transact(true, |l| {
                l.add_container(name, driver, |n| {
                    crate::containers::endpoint_iface(&iface, n)
                })
            })
            .await
            .map_err(|d| crate::containers::ContainerError::Endpoint {
                container: name.to_owned(),
                reason: format!("{d}"),
            })?;
        let state = self.hub.snapshot().await;
        let server_ip = crate::ipam::Pool::new(state.subnet)
            .map(|p| p.server_address())
            .unwrap_or(state.subnet.ip());
        Ok(container_spec(&state, &record, server_ip))
    }

    async fn rename(
        &self,
        spec: &crate::containers::EndpointSpec,
        name: &str,
    ) -> Result<(), crate::containers::ContainerError> {
        let address = spec.address.ip();
        self.hub
            .transact(true, |l| l.rename_container(address, name))
            .await
            .map_err(|d| crate::containers::ContainerError::Endpoint {
                container: name.to_owned(),
                reason: format!("{d}"),
            })
    }

    async fn release(
        &self,
        spec: &crate::containers::EndpointSpec,
    ) -> Result<(), crate::containers::ContainerError> {
        let address = spec.address.ip();
        self.hub
            .transact(false, |l| {
                if let Some(c) = l.state().containers.iter().find(|c| c.address == address) {
                    let name = c.container.clone();
                    l.remove_container(&name);
                }
                Ok::<_, std::convert::Infallible>(())
            })
            .await
            .map_err(|d| crate::containers::ContainerError::Endpoint {
                container: spec.container.clone(),
                reason: format!("{d}"),
            })
    }
}

impl Hub {
    /// `net` is where the hub's interface is (routes to sites' LANs go there).
    pub fn new(
        wg: Arc<dyn WgDevice>,
        net: Option<Arc<dyn crate::net::NetOps>>,
        store: StateDir,
        iface: &str,
        ledger: Ledger,
    ) -> Self {
        let (routes, _) = tokio::sync::watch::channel(ledger.advertised());
        Self {
            wg,
            net,
            routes,
            changes: tokio::sync::watch::channel(0).0,
            metrics: crate::metrics::Metrics::new(),
            store,
            iface: iface.to_owned(),
            ledger: Mutex::new(ledger),
            replay: Default::default(),
            leaves: Default::default(),
            unsaved: Default::default(),
            redeemed: Notify::new(),
            quarantine: None,
            uplinks: Default::default(),
        }
    }

    /// Keeps `q` holding the addresses of untrusted keys (invites), as the
    /// ledger changes; the device it was given to enforces it.
    pub async fn with_quarantine(mut self, q: Arc<crate::wg::Quarantine>) -> Self {
        q.set(self.ledger.lock().await.quarantined());
        self.quarantine = Some(q);
        self
    }

    fn save(&self, state: &ServerState) -> Result<(), StateError> {
        let save = || {
            self.store
                .save(&self.iface, &Endpoint::Server(state.clone()))
        };
        // An fsync can take long on a busy disk: the other workers go on
        // moving packets meanwhile.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(save),
            _ => save(),
        }
    }

    fn saved(&self, result: Result<(), StateError>) {
        let mut unsaved = self.unsaved.lock().expect("unsaved lock");
        match result {
            Ok(()) => {
                if unsaved.take().is_some() {
                    tracing::info!(
                        "the state is saved again in {}",
                        self.store.file(&self.iface).display()
                    );
                }
            }
            Err(e) => {
                let nag = unsaved.is_none_or(|at| at.elapsed() >= SAVE_NAG);
                if nag {
                    tracing::error!(
                        "cannot save the state ({e}); the tunnel stays up, the file keeps the last saved state, and saving is retried"
                    );
                    *unsaved = Some(Instant::now());
                }
            }
        }
    }

    /// Runs `decide` on the ledger and makes the device and the disk
    /// follow, all or nothing. `durable`: the change must be on disk
    /// before it counts.
    async fn transact<T, E: std::error::Error + 'static>(
        &self,
        durable: bool,
        decide: impl FnOnce(&mut Ledger) -> Result<T, E>,
    ) -> Result<T, Denied<E>> {
        let mut ledger = self.ledger.lock().await;
        let snapshot = ledger.clone();
        let before = ledger.desired();
        let value = match decide(&mut ledger) {
            Ok(v) => v,
            Err(e) => {
                *ledger = snapshot;
                return Err(Denied::Refused(e));
            }
        };
        let after = ledger.desired();
        let ops = diff(&before, &after);
        let (routes_before, routes_after) = (snapshot.site_routes(), ledger.site_routes());
        let undo_all = async || {
            undo(self.wg.as_ref(), &diff(&after, &before)).await;
            let _ = sync_routes(
                self.net.as_deref(),
                &self.iface,
                &routes_after,
                &routes_before,
            )
            .await;
        };
        if let Err(e) = apply(self.wg.as_ref(), &ops).await {
            undo_all().await;
            *ledger = snapshot;
            return Err(Denied::Unavailable(e.into()));
        }
        if let Err(e) = sync_routes(
            self.net.as_deref(),
            &self.iface,
            &routes_before,
            &routes_after,
        )
        .await
        {
            undo_all().await;
            *ledger = snapshot;
            return Err(Denied::Unavailable(e.into()));
        }
        if ledger.take_changed() {
            let saved = self.save(ledger.state());
            if durable && let Err(e) = saved {
                undo_all().await;
                *ledger = snapshot;
                return Err(Denied::Unavailable(e.into()));
            }
            self.saved(saved);
            self.changes.send_modify(|n| *n += 1);
        }
        if let Some(q) = &self.quarantine {
            q.set(ledger.quarantined());
        }
        let advertised = ledger.advertised();
        self.routes.send_if_modified(|r| {
            let changed = *r != advertised;
            *r = advertised;
            changed
        });
        Ok(value)
    }

    /// Who signed a request, once its proof checks out: the MAC with this
    /// hub's key, the clock, and that it was not seen before.
    pub async fn authenticate(
        &self,
        proof: &Proof,
        method: &str,
        path: &str,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Caller, AuthError> {
        let ledger = self.ledger.lock().await;
        let caller = ledger.identify(&proof.key).ok_or(AuthError::UnknownKey)?;
        proof.verify(&ledger.state().private_key, method, path, body, now)?;
        drop(ledger);
        self.replay.lock().expect("replay lock").check(proof, now)?;
        Ok(caller)
    }

    /// Issues invites and returns their tokens; saved before they are.
    pub async fn mint(
        &self,
        req: &MintRequest,
        now: SystemTime,
    ) -> Result<Vec<Token>, Denied<MintError>> {
        self.transact(true, |l| l.mint(req, now)).await
    }

    /// Admits `key` in place of the invite for `address`.
    /// Admits the joiner of the invite for `address` with its own `key`,
    /// and the LANs behind it, all or nothing.
    pub async fn redeem(
        &self,
        address: IpAddr,
        key: PublicKey,
        joining: Joining,
        now: SystemTime,
    ) -> Result<Redeemed, Denied<RedeemError>> {
        let shown: Vec<String> = joining.routes.iter().map(|r| r.to_string()).collect();
        crate::sys::crash_point("hub-redeem-received");
        if !joining.routes.is_empty() {
            self.note_underlay().await;
        }
        let (net, name, again) = self
            .transact(true, |l| {
                // The same joiner asking again (its answer was lost, or it
                // crashed and runs again): the same answer, nothing changed.
                if l.redeemed_by(address) == Some(key) {
                    let name = l.repeated_redeem(address, &joining)?;
                    let net = IpNetwork::new(address, l.state().subnet.prefix())
                        .map_err(|_| RedeemError::NoInvite(address))?;
                    return Ok((net, name, true));
                }
                let net = l.redeem(address, key, now, Instant::now())?;
                let name = l.name_site(address, joining.name.as_deref(), joining.default_name)?;
                l.advertise(address, joining.routes)?;
                l.set_snat_public(address, joining.snat_public)?;
                Ok::<_, RedeemError>((net, name, false))
            })
            .await?;
        let pending = self.ledger.lock().await.pending_routes(address);
        let redeemed = Redeemed {
            address: net,
            name,
            pending,
        };
        if again {
            tracing::info!("{address} asked again for its redeem; answered the same");
            return Ok(redeemed);
        }
        // Saved, not yet answered.
        crate::sys::crash_point("hub-redeemed");
        let name = &redeemed.name;
        match &name {
            Some(n) => tracing::info!(
                "{address} redeemed its invite as site {n}; admitting public key {key}"
            ),
            None => tracing::info!("{address} redeemed its invite; admitting public key {key}"),
        }
        if !shown.is_empty() {
            tracing::info!("{address} advertises {}", shown.join(", "));
        }
        self.log_pending(address, &redeemed.pending);
        self.metrics.redeemed();
        self.redeemed.notify_one();
        Ok(redeemed)
    }

    fn log_pending(&self, site: IpAddr, pending: &[IpNetwork]) {
        for r in pending {
            tracing::warn!(
                "{site} asks to route {r}; it waits for approval: tunnel route approve {site} {r}"
            );
        }
    }

    /// Tells the ledger where the device sees its peers now, so that no
    /// site claims a node's underlay address before it is recorded.
    async fn note_underlay(&self) {
        if let Ok(live) = self.wg.peers().await {
            let addrs: Vec<IpAddr> = live
                .iter()
                .filter_map(|p| p.endpoint)
                .filter(|e| !crate::transport::is_virtual(e))
                .map(|e| e.ip())
                .collect();
            self.ledger.lock().await.note_underlay(addrs);
        }
    }

    /// The hub host's own networks, which no site may claim.
    pub async fn set_host_networks(&self, nets: &[IpNetwork]) -> Result<(), HubError> {
        self.transact(false, |l| {
            l.set_host_networks(nets);
            Ok::<_, std::convert::Infallible>(())
        })
        .await
        .map_err(unavailable)
    }

    /// Reads the host's networks again (a Docker network made since, an
    /// address added) and applies them when they changed; finds the
    /// uplinks again ([`Hub::uplink_addresses`]).
    pub async fn refresh_host(&self) {
        let Some(net) = &self.net else { return };
        match net.host_networks(None).await {
            Ok(nets) if self.ledger.lock().await.host_networks_differ(&nets) => {
                if let Err(e) = self.set_host_networks(&nets).await {
                    tracing::warn!("applying this host's networks: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("reading this host's addresses: {e}"),
        }
        let ips: HashSet<IpAddr> = self
            .ledger
            .lock()
            .await
            .state()
            .peers
            .iter()
            .filter_map(|p| p.endpoint)
            .filter(|e| !crate::transport::is_virtual(e))
            .map(|e| e.ip())
            .collect();
        let known: HashMap<IpAddr, Option<String>> =
            self.uplinks.lock().expect("uplinks lock").via.clone();
        let mut via = HashMap::new();
        for ip in ips {
            let link = match known.get(&ip) {
                Some(l) => l.clone(),
                None => net.route_iface(ip).await.ok().flatten(),
            };
            via.insert(ip, link);
        }
        let links: std::collections::BTreeSet<&String> = via
            .values()
            .flatten()
            .filter(|l| **l != self.iface)
            .collect();
        let mut addrs = vec![];
        for l in links {
            if let Ok(nets) = net.host_networks(Some(l)).await {
                addrs.extend(nets.iter().map(|n| n.ip()));
            }
        }
        addrs.sort();
        addrs.dedup();
        let mut u = self.uplinks.lock().expect("uplinks lock");
        u.via = via;
        u.addrs = addrs;
    }

    /// This host's addresses on the links it reaches its peers through:
    /// what peers reach over the underlay anyway, and so may reach through
    /// the tunnel too (transparent sites do). Its other addresses (a LAN
    /// that is not a --route, Docker's bridges) are closed to peers.
    pub fn uplink_addresses(&self) -> Vec<IpAddr> {
        self.uplinks.lock().expect("uplinks lock").addrs.clone()
    }

    /// The hub operator allows the site `target` LANs within `prefix`.
    /// Returns the site's address and what of its LANs still waits.
    pub async fn approve(
        &self,
        target: &str,
        prefix: IpNetwork,
    ) -> Result<(IpAddr, Vec<IpNetwork>), Denied<RouteError>> {
        self.note_underlay().await;
        let site = self.transact(true, |l| l.approve(target, prefix)).await?;
        tracing::info!("approved {prefix} for {target} ({site})");
        Ok((site, self.ledger.lock().await.pending_routes(site)))
    }

    /// Withdraws what the site `target` has within `prefix`.
    pub async fn reject(
        &self,
        target: &str,
        prefix: IpNetwork,
    ) -> Result<IpAddr, Denied<RouteError>> {
        let site = self.transact(false, |l| l.reject(target, prefix)).await?;
        tracing::info!("rejected {prefix} for {target} ({site})");
        Ok(site)
    }

    /// Admits an endpoint (a container) of the site at `site`.
    pub async fn register(
        &self,
        site: IpAddr,
        key: PublicKey,
        name: &str,
        now: SystemTime,
    ) -> Result<IpNetwork, Denied<RegisterError>> {
        let net = self
            .transact(true, |l| l.register(site, key, name, now))
            .await?;
        tracing::info!("{site} registered container {name} as {net}");
        Ok(net)
    }

    /// Takes back the endpoint `key` of the site at `site`.
    pub async fn release(&self, site: IpAddr, key: PublicKey) -> Result<(), Denied<RegisterError>> {
        let address = self.transact(false, |l| l.release(site, &key)).await?;
        tracing::info!("{site} gave back its endpoint {address}");
        Ok(())
    }

    /// The LANs behind the site at `site` are now `routes`.
    /// Returns those that wait for the hub operator's approval.
    pub async fn advertise(
        &self,
        site: IpAddr,
        routes: Vec<IpNetwork>,
    ) -> Result<Vec<IpNetwork>, Denied<RouteError>> {
        let shown: Vec<String> = routes.iter().map(|r| r.to_string()).collect();
        if !routes.is_empty() {
            self.note_underlay().await;
        }
        self.transact(true, |l| l.advertise(site, routes)).await?;
        if !shown.is_empty() {
            tracing::info!("{site} advertises {}", shown.join(", "));
        }
        let pending = self.ledger.lock().await.pending_routes(site);
        self.log_pending(site, &pending);
        Ok(pending)
    }

    /// The hub's own LANs.
    pub async fn set_hub_routes(&self, routes: Vec<IpNetwork>) -> Result<(), Denied<RouteError>> {
        self.transact(true, |l| l.set_hub_routes(routes)).await
    }

    /// This hub's metrics.
    pub fn metrics(&self) -> Arc<crate::metrics::Metrics> {
        self.metrics.clone()
    }

    /// Changes to the state, as they happen.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Every advertised LAN, now and as it changes.
    pub fn routes(&self) -> tokio::sync::watch::Receiver<Vec<Advertised>> {
        self.routes.subscribe()
    }

    /// Routes what the saved state holds (at start: the device is new).
    pub async fn route_saved(&self) -> Result<(), HubError> {
        let routes = self.ledger.lock().await.site_routes();
        sync_routes(
            self.net.as_deref(),
            &self.iface,
            &Default::default(),
            &routes,
        )
        .await?;
        Ok(())
    }

    /// Admits a stock WireGuard client under `name` (`tunnel peer add`).
    pub async fn admit(
        &self,
        name: &str,
        key: PublicKey,
        now: SystemTime,
    ) -> Result<IpAddr, Denied<AdmitError>> {
        let address = self.transact(true, |l| l.admit(name, key, now)).await?;
        tracing::info!("admitted {name} (a stock WireGuard client) as {address}, public key {key}");
        Ok(address)
    }

    /// Removes a peer (by name or address) at once.
    pub async fn revoke(&self, target: &str) -> Result<Vec<String>, Denied<RevokeError>> {
        let removed = self.transact(false, |l| l.revoke(target)).await?;
        tracing::info!("revoked {}", removed.join(", "));
        Ok(removed)
    }

    /// Forgets expired invites.
    pub async fn prune(&self, now: SystemTime) -> Result<usize, HubError> {
        if !self.ledger.lock().await.any_expired(now) {
            return Ok(0);
        }
        self.transact(false, |l| Ok::<_, std::convert::Infallible>(l.prune(now)))
            .await
            .map_err(unavailable)
    }

    /// Moves addresses from redeemed invites to the keys that replaced
    /// them, once those keys have completed a handshake. Returns how many.
    pub async fn complete_swaps(&self, now: Instant) -> Result<usize, HubError> {
        if !self.ledger.lock().await.has_pending() {
            return Ok(0);
        }
        let live = self.wg.peers().await?;
        let handshaked: HashSet<PublicKey> = live
            .iter()
            .filter(|p| p.last_handshake.is_some())
            .map(|p| p.public_key)
            .collect();
        // This runs every few milliseconds while hundreds may be joining: a
        // transaction (a copy of the ledger, two peer sets) only when a swap
        // is due.
        if !self
            .ledger
            .lock()
            .await
            .swaps_due(|k| handshaked.contains(k), now)
        {
            return Ok(0);
        }
        crate::sys::crash_point("hub-swap-due");
        let moved = self
            .transact(false, |l| {
                Ok::<_, std::convert::Infallible>(l.complete_swaps(|k| handshaked.contains(k), now))
            })
            .await
            .map_err(unavailable)?;
        crate::sys::crash_point("hub-swapped");
        for (address, key) in &moved {
            tracing::info!("{address} now routes to {key}");
        }
        Ok(moved.len())
    }

    /// Remembers where peers were last seen, saving when that changed.
    pub async fn record_endpoints(&self) -> Result<(), HubError> {
        let mut live = self.wg.peers().await?;
        // A WebSocket link's address means nothing after a restart.
        live.retain(|p| !p.endpoint.is_some_and(|e| crate::transport::is_virtual(&e)));
        if !self.ledger.lock().await.endpoints_moved(&live) {
            return Ok(());
        }
        self.transact(false, |l| {
            Ok::<_, std::convert::Infallible>(l.record_endpoints(&live))
        })
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    /// Saves again after a failed save; a no-op when nothing is unsaved.
    pub async fn retry_save(&self) {
        if self.unsaved.lock().expect("unsaved lock").is_none() {
            return;
        }
        let ledger = self.ledger.lock().await;
        let result = self.save(ledger.state());
        self.saved(result);
    }

    /// A site that stops cleanly says so. Its peer is removed and added
    /// again, which clears the handshake replay state: gotatun stamps
    /// handshakes with TAI64 base 2^62+37 while the kernel and wireguard-go
    /// use 2^62+10, so without this a stock WireGuard taking the site's key
    /// over (`tunnel export`) would be refused for ~27 s as a replay.
    pub async fn leave(&self, site: IpAddr) -> Result<(), LeaveError> {
        let ledger = self.ledger.lock().await;
        let p = ledger.site(site).ok_or(LeaveError::NotASite(site))?.clone();
        {
            let mut leaves = self.leaves.lock().expect("leaves lock");
            let now = Instant::now();
            if leaves
                .get(&p.public_key)
                .is_some_and(|at| now.duration_since(*at) < LEAVE_INTERVAL)
            {
                return Err(LeaveError::TooSoon);
            }
            leaves.retain(|_, at| now.duration_since(*at) < LEAVE_INTERVAL);
            leaves.insert(p.public_key, now);
        }
        let live = self.wg.peers().await.map_err(HubError::from)?;
        let endpoint = live
            .iter()
            .find(|l| l.public_key == p.public_key)
            .and_then(|l| l.endpoint);
        let spec = ledger
            .desired()
            .remove(&p.public_key)
            .expect("a site is a desired peer");
        self.wg
            .remove_peer(&p.public_key)
            .await
            .map_err(HubError::from)?;
        self.wg
            .upsert_peer(&PeerSpec {
                endpoint: endpoint.or(p.endpoint),
                ..spec
            })
            .await
            .map_err(HubError::from)?;
        tracing::info!("{site} left; its peer was reset");
        Ok(())
    }

    /// Completes when a redeem has left a swap pending since the last call.
    pub async fn redeemed(&self) {
        self.redeemed.notified().await
    }

    pub async fn has_pending(&self) -> bool {
        self.ledger.lock().await.has_pending()
    }

    /// Whether `addr` belongs to an admitted peer, a waiting invite or a
    /// hub container.
    pub async fn knows(&self, addr: IpAddr) -> bool {
        self.ledger.lock().await.knows(addr)
    }

    /// Whether `addr` is an admitted site's (not a road warrior's, not an
    /// invite's, not an endpoint's).
    pub async fn is_site(&self, addr: IpAddr) -> bool {
        self.ledger.lock().await.site(addr).is_some()
    }

    /// Each site with LANs: those in effect, and those that wait.
    pub async fn route_split(&self) -> HashMap<PublicKey, (Vec<IpNetwork>, Vec<IpNetwork>)> {
        let ledger = self.ledger.lock().await;
        ledger
            .state()
            .peers
            .iter()
            .filter(|p| !p.routes.is_empty())
            .map(|p| {
                let on = ledger.effective_routes(p);
                let waiting = p
                    .routes
                    .iter()
                    .filter(|r| !on.contains(r))
                    .copied()
                    .collect();
                (p.public_key, (on, waiting))
            })
            .collect()
    }

    /// The advertised LANs of the site at `site` that are not in effect.
    pub async fn pending_routes(&self, site: IpAddr) -> Vec<IpNetwork> {
        self.ledger.lock().await.pending_routes(site)
    }

    pub fn store(&self) -> &StateDir {
        &self.store
    }

    pub fn device(&self) -> Arc<dyn WgDevice> {
        self.wg.clone()
    }

    pub async fn snapshot(&self) -> ServerState {
        self.ledger.lock().await.state().clone()
    }
}

fn unavailable(d: Denied<std::convert::Infallible>) -> HubError {
    match d {
        Denied::Refused(never) => match never {},
        Denied::Unavailable(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use crate::wg::fake::FakeWg;

    fn state() -> ServerState {
        ServerState::new("10.77.0.0/24".parse().unwrap(), 51820, 1420)
    }

    fn setup() -> (tempfile::TempDir, FakeWg, Hub) {
        let tmp = tempfile::tempdir().unwrap();
        let fake = FakeWg::default();
        let hub = Hub::new(
            Arc::new(fake.clone()),
            None,
            StateDir::new(tmp.path()),
            "wgt0",
            Ledger::new(state(), 4).unwrap(),
        );
        (tmp, fake, hub)
    }

    fn req(count: usize) -> MintRequest {
        MintRequest {
            count,
            ttl: Duration::from_secs(60),
            endpoint_hint: None,
            name: None,
            routes: vec![],
        }
    }

    #[tokio::test]
    async fn changes_reach_the_device_and_the_disk() {
        let (tmp, fake, hub) = setup();
        let tok = hub
            .mint(&req(1), SystemTime::now())
            .await
            .unwrap()
            .remove(0);
        assert_eq!(fake.peers().await.unwrap().len(), 1);
        let saved = StateDir::new(tmp.path())
            .load_server("wgt0")
            .unwrap()
            .unwrap();
        assert_eq!(saved.invites.len(), 1);
        let k = PrivateKey::generate().public_key();
        hub.redeem(tok.assigned, k, Joining::default(), SystemTime::now())
            .await
            .unwrap();
        assert!(fake.peer(&k).unwrap().allowed_ips.is_empty());
        fake.handshake(&k);
        assert_eq!(hub.complete_swaps(Instant::now()).await.unwrap(), 1);
        assert_eq!(
            fake.peer(&k).unwrap().allowed_ips,
            vec![host_net(tok.assigned)]
        );
    }

    #[tokio::test]
    async fn a_site_lan_is_routed_into_the_hub_interface_until_the_site_is_revoked() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = FakeWg::default();
        let net = Arc::new(crate::net::fake::FakeNet::default());
        net.add_link("wgt0");
        let hub = Hub::new(
            Arc::new(fake.clone()),
            Some(net.clone()),
            StateDir::new(tmp.path()),
            "wgt0",
            Ledger::new(state(), 4).unwrap(),
        );
        let lan: IpNetwork = "192.168.50.0/24".parse().unwrap();
        let tok = hub
            .mint(
                &MintRequest {
                    routes: vec![lan],
                    ..req(1)
                },
                SystemTime::now(),
            )
            .await
            .unwrap()
            .remove(0);
        let k = PrivateKey::generate().public_key();
        hub.redeem(
            tok.assigned,
            k,
            Joining {
                routes: vec![lan],
                ..Default::default()
            },
            SystemTime::now(),
        )
        .await
        .unwrap();
        assert!(
            net.routes
                .lock()
                .unwrap()
                .contains(&(lan, "wgt0".into(), None))
        );
        fake.handshake(&k);
        hub.complete_swaps(Instant::now()).await.unwrap();
        assert_eq!(
            fake.peer(&k).unwrap().allowed_ips,
            vec![host_net(tok.assigned), lan]
        );
        // A restarted hub routes what it saved.
        let again = Hub::new(
            Arc::new(FakeWg::default()),
            Some(net.clone()),
            StateDir::new(tmp.path()),
            "wgt0",
            Ledger::new(hub.snapshot().await, 4).unwrap(),
        );
        net.routes.lock().unwrap().clear();
        again.route_saved().await.unwrap();
        assert!(
            net.routes
                .lock()
                .unwrap()
                .contains(&(lan, "wgt0".into(), None))
        );
        hub.revoke(&tok.assigned.to_string()).await.unwrap();
        assert!(net.routes.lock().unwrap().is_empty());
        assert!(hub.routes().borrow().is_empty());
    }

    #[tokio::test]
    async fn a_device_failure_undoes_the_whole_change() {
        let (tmp, fake, hub) = setup();
        hub.mint(&req(1), SystemTime::now()).await.unwrap();
        let before_state = hub.snapshot().await;
        let before_peers = fake.peers().await.unwrap();
        // The second of three upserts fails.
        fake.fail_after(1);
        let err = hub.mint(&req(3), SystemTime::now()).await.unwrap_err();
        assert!(
            matches!(err, Denied::Unavailable(HubError::Wg(_))),
            "{err:?}"
        );
        assert_eq!(hub.snapshot().await, before_state);
        assert_eq!(fake.peers().await.unwrap(), before_peers);
        let saved = StateDir::new(tmp.path())
            .load_server("wgt0")
            .unwrap()
            .unwrap();
        assert_eq!(saved, before_state);
    }

    #[tokio::test]
    async fn a_failed_save_refuses_grants_but_keeps_revocations() {
        let (tmp, fake, hub) = setup();
        let toks = hub.mint(&req(2), SystemTime::now()).await.unwrap();
        let on_disk = std::fs::read(tmp.path().join("wgt0.json")).unwrap();
        // A directory where the state file goes: every save fails, even as root.
        let dir = StateDir::new(tmp.path().join("wgt0.json").join("x"));
        let hub = Hub::new(
            hub.device(),
            None,
            dir,
            "wgt0",
            Ledger::new(hub.snapshot().await, 4).unwrap(),
        );
        let k = PrivateKey::generate().public_key();
        let err = hub
            .redeem(toks[0].assigned, k, Joining::default(), SystemTime::now())
            .await
            .unwrap_err();
        assert!(
            matches!(err, Denied::Unavailable(HubError::State(_))),
            "{err:?}"
        );
        assert!(fake.peer(&k).is_none(), "the admission was undone");
        // A revocation takes effect although it cannot be saved.
        let removed = hub.revoke(&toks[1].assigned.to_string()).await.unwrap();
        assert_eq!(removed.len(), 1);
        assert!(fake.peer(&toks[1].invite_key.public_key()).is_none());
        assert_eq!(
            std::fs::read(tmp.path().join("wgt0.json")).unwrap(),
            on_disk
        );
        assert!(hub.unsaved.lock().unwrap().is_some());
    }

    #[tokio::test]
    async fn authentication_knows_invites_and_sites_and_refuses_replays() {
        use crate::control::auth::Signer;
        let (_tmp, _fake, hub) = setup();
        let server = hub.snapshot().await.private_key.public_key();
        let tok = hub
            .mint(&req(1), SystemTime::now())
            .await
            .unwrap()
            .remove(0);
        let now = SystemTime::now();
        let signer = Signer::new(&tok.invite_key, &server).unwrap();
        let header = signer.sign("POST", "/v1/redeem", b"{}", now);
        let proof = Proof::parse(&header).unwrap();
        assert_eq!(
            hub.authenticate(&proof, "POST", "/v1/redeem", b"{}", now)
                .await,
            Ok(Caller::Invite {
                address: tok.assigned,
                used: false
            })
        );
        assert_eq!(
            hub.authenticate(&proof, "POST", "/v1/redeem", b"{}", now)
                .await,
            Err(AuthError::Replay)
        );
        let stranger = Signer::new(&PrivateKey::generate(), &server).unwrap();
        let proof = Proof::parse(&stranger.sign("POST", "/v1/redeem", b"{}", now)).unwrap();
        assert_eq!(
            hub.authenticate(&proof, "POST", "/v1/redeem", b"{}", now)
                .await,
            Err(AuthError::UnknownKey)
        );
    }

    #[tokio::test]
    async fn leave_is_rate_limited() {
        let (_tmp, fake, hub) = setup();
        let tok = hub
            .mint(&req(1), SystemTime::now())
            .await
            .unwrap()
            .remove(0);
        let k = PrivateKey::generate().public_key();
        hub.redeem(tok.assigned, k, Joining::default(), SystemTime::now())
            .await
            .unwrap();
        fake.handshake(&k);
        hub.complete_swaps(Instant::now()).await.unwrap();
        hub.leave(tok.assigned).await.unwrap();
        assert_eq!(
            fake.peer(&k).unwrap().allowed_ips,
            vec![host_net(tok.assigned)]
        );
        assert!(matches!(
            hub.leave(tok.assigned).await,
            Err(LeaveError::TooSoon)
        ));
        let stranger: IpAddr = "10.77.0.9".parse().unwrap();
        assert!(matches!(
            hub.leave(stranger).await,
            Err(LeaveError::NotASite(_))
        ));
    }
}
