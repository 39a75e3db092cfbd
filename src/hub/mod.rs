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
//!
//! The shell is split by what drives it: [`requests`] (what peers and the
//! operator ask for), [`housekeeping`] (what time and the device's
//! statistics bring: key swaps, invite expiry, endpoints, save retries),
//! and [`containers`] (the hub's own containers as transactions). When
//! housekeeping is due is decided by the sans-IO [`housekeeper`]: the
//! hub's runtime calls [`Hub::housekeep`] and sleeps until the deadline it
//! returns, or until [`Hub::wakeup`] says something sooner came in.

pub mod api;
mod containers;
mod housekeeper;
mod housekeeping;
pub mod http;
pub mod ledger;
pub mod mesh;
mod requests;
pub mod run;
#[cfg(test)]
mod testkit;

pub use containers::{HubEndpoints, container_spec};
pub use housekeeper::{Chore, Housekeeper, SaveNote, Timings};
pub use housekeeping::Housekept;
pub use ledger::{
    AdmitError, Advertised, Caller, Joining, KeySource, Ledger, MintError, MintRequest,
    RedeemError, RegisterError, RevokeError, RouteError, ensure_containers, ensure_containers_with,
    host_net, unix,
};
pub use requests::LeaveError;

use crate::control::auth::ReplayGuard;
use crate::keys::PublicKey;
use crate::state::{Endpoint, ServerState};
use crate::store::{StateDir, StateError};
use crate::wg::{WgDevice, WgError};
use ipnetwork::IpNetwork;
use ledger::{Op, diff};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio::sync::{Mutex, Notify};

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
    /// When housekeeping is due (swaps, expiry, endpoints, save retries,
    /// the firewall), and whether the disk lags behind the state.
    keeper: std::sync::Mutex<Housekeeper>,
    /// Wakes the housekeeping loop when something came in that is due
    /// before the deadline it sleeps until (a redeem left a swap pending).
    wake: Notify,
    /// The addresses the device lets reach the control API only.
    quarantine: Option<Arc<crate::wg::Quarantine>>,
    uplinks: std::sync::Mutex<Uplinks>,
    /// The mesh's rendezvous and relay (userspace hubs).
    mesh: Option<Arc<mesh::HubMesh>>,
    /// The WebSocket listener's links: where each site's connection comes
    /// from.
    ws: Option<Arc<crate::transport::Relay>>,
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
/// takes back the others (where the hub has a host to route on).
async fn sync_routes(
    net: Option<&dyn crate::net::NetOps>,
    iface: &str,
    before: &std::collections::BTreeSet<IpNetwork>,
    after: &std::collections::BTreeSet<IpNetwork>,
) -> Result<(), crate::net::NetError> {
    let Some(net) = net else { return Ok(()) };
    let (before, after): (Vec<_>, Vec<_>) = (
        before.iter().copied().collect(),
        after.iter().copied().collect(),
    );
    crate::net::sync_routes(net, iface, &before, &after).await
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
        let keeper = keeper_for(&ledger, Instant::now(), SystemTime::now());
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
            keeper: std::sync::Mutex::new(keeper),
            wake: Notify::new(),
            quarantine: None,
            uplinks: Default::default(),
            mesh: None,
            ws: None,
        }
    }

    /// The WebSocket links' relay, when the hub listens for them.
    pub fn with_websocket(mut self, relay: Option<Arc<crate::transport::Relay>>) -> Self {
        self.ws = relay;
        self
    }

    /// Where a peer's datagrams come from on the underlay: its UDP
    /// endpoint, or for a WebSocket site the address its connection came
    /// from (the site, its NAT or proxy, or whom a proxy on this host says
    /// it is for).
    pub fn underlay_of(&self, endpoint: SocketAddr) -> Option<IpAddr> {
        if !crate::transport::is_virtual(&endpoint) {
            return Some(endpoint.ip());
        }
        self.ws.as_ref()?.remote_of(&endpoint).map(|r| r.ip())
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
        match (
            self.keeper().handle_saved(Instant::now(), result.is_ok()),
            result,
        ) {
            (SaveNote::Recovered, _) => tracing::info!(
                "the state is saved again in {}",
                self.store.file(&self.iface).display()
            ),
            (SaveNote::Failing, Err(e)) => tracing::error!(
                "cannot save the state ({e}); the tunnel stays up, the file keeps the last saved state, and saving is retried"
            ),
            _ => {}
        }
    }

    /// The housekeeping deadlines. Held briefly, never across an await.
    fn keeper(&self) -> std::sync::MutexGuard<'_, Housekeeper> {
        // The housekeeper's state is a few instants: whatever a panic left
        // there is still a schedule to go on with.
        self.keeper.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the housekeeping loop if what came in is due before the
    /// deadline it sleeps until.
    fn wake_if_sooner(&self) {
        if self.keeper().needs_wake() {
            self.wake.notify_one();
        }
    }

    /// The state changed: the next invite expiry may be another, and the
    /// firewall reads the state back.
    fn note_change(&self, ledger: &Ledger) {
        let now = Instant::now();
        {
            let mut keeper = self.keeper();
            keeper.handle_invites(now, SystemTime::now(), ledger.next_expiry());
            keeper.handle_state_changed(now);
        }
        self.wake_if_sooner();
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
            self.note_change(&ledger);
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

    /// Completes when something came in that housekeeping must see
    /// before the deadline [`Hub::housekeep`] last returned (a redeem left
    /// a swap pending, the state changed), including since the last call.
    pub async fn wakeup(&self) {
        self.wake.notified().await
    }

    /// [`Hub::wakeup`], by the name the housekeeping loop knew it by when
    /// only a redeem woke it.
    pub async fn redeemed(&self) {
        self.wakeup().await
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

    /// The host's network stack, when the hub changes it (not in tests).
    pub fn net(&self) -> Option<Arc<dyn crate::net::NetOps>> {
        self.net.clone()
    }

    pub async fn snapshot(&self) -> ServerState {
        self.ledger.lock().await.state().clone()
    }
}

/// A housekeeper for `ledger` as it is at `now` (the wall clock reading
/// `wall`): its next invite expiry, and the swaps a restart resumed.
fn keeper_for(ledger: &Ledger, now: Instant, wall: SystemTime) -> Housekeeper {
    let mut keeper = Housekeeper::new(now, Timings::default());
    keeper.handle_invites(now, wall, ledger.next_expiry());
    if ledger.has_pending() {
        keeper.handle_redeemed(now, ledger.swap_deadline());
    }
    keeper
}

fn unavailable(d: Denied<std::convert::Infallible>) -> HubError {
    match d {
        Denied::Refused(never) => match never {},
        Denied::Unavailable(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use crate::hub::testkit::*;

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
}
