//! What time and the device bring to the hub: key swaps that are due,
//! expired invites, peers' endpoints, the host's networks, save retries.
//! [`Hub::housekeep`] does what the [`Housekeeper`](super::Housekeeper)
//! says is due and tells the caller when to come back.

use super::{Chore, Hub, HubError, unavailable};
use crate::keys::PublicKey;
use ipnetwork::IpNetwork;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Instant, SystemTime};

/// What a round of housekeeping leaves to its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Housekept {
    /// When to call [`Hub::housekeep`] again, unless [`Hub::wakeup`]
    /// completes first.
    pub next: Instant,
    /// The firewall policy is to be read again and applied: the hub does
    /// not own the firewall, its runtime does.
    pub check_firewall: bool,
}

/// An error with its causes, as `{:#}` shows an `anyhow` chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

impl Hub {
    /// One round of housekeeping at `now` (the wall clock reading `wall`):
    /// the swaps, endpoint recordings, prunes, save retries that are due.
    /// Nothing here may stop the hub: a failure is logged, and the chore
    /// comes round again.
    pub async fn housekeep(&self, now: Instant, wall: SystemTime) -> Housekept {
        self.keeper().disarm();
        let mut check_firewall = false;
        // Each chore handed out is scheduled past `now`, so this ends after
        // one of each at most; the bound only guards against a mistake.
        for _ in 0..16 {
            let chore = self.keeper().poll_action(now);
            match chore {
                None => break,
                Some(Chore::CompleteSwaps) => self.swap_round(now).await,
                Some(Chore::RecordEndpoints) => {
                    if let Err(e) = self.record_endpoints().await {
                        tracing::warn!("recording peer endpoints: {}", chain(&e));
                    }
                    self.refresh_host().await;
                }
                Some(Chore::Prune) => self.prune_round(now, wall).await,
                Some(Chore::RetrySave) => self.retry_save().await,
                Some(Chore::CheckFirewall) => check_firewall = true,
            }
        }
        Housekept {
            next: self.keeper().arm(),
            check_firewall,
        }
    }

    /// Completes the swaps that are due and tells the housekeeper what is
    /// left.
    async fn swap_round(&self, now: Instant) {
        let swapped = match self.complete_swaps(now).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("completing key swaps: {}", chain(&e));
                0
            }
        };
        let grace = self.ledger.lock().await.swap_deadline();
        self.keeper().handle_swaps(now, swapped, grace);
    }

    async fn prune_round(&self, now: Instant, wall: SystemTime) {
        match self.prune(wall).await {
            Ok(_) => {
                let next = self.ledger.lock().await.next_expiry();
                self.keeper().handle_invites(now, wall, next);
            }
            Err(e) => {
                tracing::warn!("removing expired invites: {}", chain(&e));
                self.keeper().handle_prune_failed(now);
            }
        }
    }

    /// A redeem left a swap pending: the device is to be watched for the
    /// joiner's handshake now.
    pub(super) async fn swap_pending(&self) {
        let grace = self.ledger.lock().await.swap_deadline();
        self.keeper().handle_redeemed(Instant::now(), grace);
        self.wake_if_sooner();
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
        let mut ips: HashSet<IpAddr> = self
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
        ips.extend(
            self.websocket_sources()
                .await
                .into_values()
                .filter(|ip| !ip.is_loopback()),
        );
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

    /// The connected WebSocket sites' underlay addresses, by tunnel
    /// address: whom their connections come from; loopback for a proxy on
    /// this host that does not say whom for.
    /// (The ledger does not keep a link's address: it means nothing
    /// after a restart; the device's live peers have it.)
    pub async fn websocket_sources(&self) -> std::collections::BTreeMap<IpAddr, IpAddr> {
        let Ok(live) = self.wg.peers().await else {
            return Default::default();
        };
        let ledger = self.ledger.lock().await;
        live.iter()
            .filter_map(|l| {
                let e = l.endpoint.filter(crate::transport::is_virtual)?;
                let from = self.underlay_of(e)?;
                let p = ledger
                    .state()
                    .peers
                    .iter()
                    .find(|p| p.public_key == l.public_key)?;
                Some((p.address, from))
            })
            .collect()
    }

    /// This host's addresses on the links it reaches its peers through:
    /// what peers reach over the underlay anyway, and so may reach through
    /// the tunnel too (transparent sites do). Its other addresses (a LAN
    /// that is not a --route, Docker's bridges) are closed to peers.
    pub fn uplink_addresses(&self) -> Vec<IpAddr> {
        self.uplinks.lock().expect("uplinks lock").addrs.clone()
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
        if !self.keeper().unsaved() {
            return;
        }
        let ledger = self.ledger.lock().await;
        let result = self.save(ledger.state());
        self.saved(result);
    }
}

#[cfg(test)]
mod tests {
    //! Simulations: the fake device, and a clock that is real `Instant`s
    //! moved forward by the test, as the runtime's loop would sleep.
    use super::*;
    use crate::hub::testkit::*;
    use crate::wg::WgDevice;

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
        assert!(hub.keeper().unsaved());
    }

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    fn seen_at(fake: &FakeWg, k: &PublicKey, at: &str) {
        let mut s = fake.state.lock().unwrap();
        let p = s.peers.iter_mut().find(|p| &p.public_key == k).unwrap();
        p.endpoint = Some(at.parse().unwrap());
    }

    #[tokio::test]
    async fn a_swap_completes_in_the_round_after_the_handshake_and_its_endpoint_is_saved() {
        let (_tmp, fake, hub) = setup();
        let (tok, k) = joined(&hub).await;
        let (t, w) = (Instant::now() + 100 * MS, SystemTime::now());
        let round = hub.housekeep(t, w).await;
        assert_eq!(round.next, t + 20 * MS, "the device is watched closely");
        assert!(fake.peer(&k).unwrap().allowed_ips.is_empty());
        fake.handshake(&k);
        seen_at(&fake, &k, "192.0.2.7:40000");
        let round = hub.housekeep(t + 20 * MS, w).await;
        assert_eq!(
            fake.peer(&k).unwrap().allowed_ips,
            vec![host_net(tok.assigned)]
        );
        assert_eq!(
            hub.snapshot().await.peers[0].endpoint,
            Some("192.0.2.7:40000".parse().unwrap()),
            "recorded at once, not in 10 s"
        );
        assert!(round.next >= t + 40 * MS + 900 * MS, "no more quick polls");
    }

    #[tokio::test]
    async fn without_a_handshake_the_swap_completes_at_its_grace() {
        let (_tmp, fake, hub) = setup();
        let (tok, k) = joined(&hub).await;
        let (t, w) = (Instant::now(), SystemTime::now());
        let round = hub.housekeep(t, w).await;
        assert!(round.next <= t + ledger::SWAP_GRACE);
        hub.housekeep(t + ledger::SWAP_GRACE - S, w).await;
        assert!(fake.peer(&k).unwrap().allowed_ips.is_empty());
        hub.housekeep(t + ledger::SWAP_GRACE, w).await;
        assert_eq!(
            fake.peer(&k).unwrap().allowed_ips,
            vec![host_net(tok.assigned)]
        );
        assert!(!hub.has_pending().await);
    }

    #[tokio::test]
    async fn a_restarted_hub_watches_the_swaps_it_resumed() {
        let (_tmp, _fake, hub) = setup();
        let (tok, k) = joined(&hub).await;
        let mut ledger = Ledger::new(hub.snapshot().await, 4).unwrap();
        ledger.resume_swaps(Instant::now());
        let fake = FakeWg::default();
        for spec in ledger.desired().values() {
            fake.upsert_peer(spec).await.unwrap();
        }
        let tmp = tempfile::tempdir().unwrap();
        let again = Hub::new(
            Arc::new(fake.clone()),
            None,
            StateDir::new(tmp.path()),
            "wgt0",
            ledger,
        );
        fake.handshake(&k);
        again.housekeep(Instant::now(), SystemTime::now()).await;
        assert_eq!(
            fake.peer(&k).unwrap().allowed_ips,
            vec![host_net(tok.assigned)]
        );
    }

    /// Runs the loop as the runtime does: from deadline to deadline,
    /// until `done` or `limit`. Returns when `done` held.
    async fn run_until(
        hub: &Hub,
        (t, w): (Instant, SystemTime),
        limit: Duration,
        done: impl AsyncFn() -> bool,
    ) -> Option<Duration> {
        let mut at = t;
        while at <= t + limit {
            let round = hub.housekeep(at, w + at.duration_since(t)).await;
            if done().await {
                return Some(at.duration_since(t));
            }
            at = round.next;
        }
        None
    }

    #[tokio::test]
    async fn an_unused_invite_leaves_the_device_when_it_expires() {
        let (_tmp, fake, hub) = setup();
        let tok = hub
            .mint(&req(1), SystemTime::now())
            .await
            .unwrap()
            .remove(0);
        let invite = tok.invite_key.public_key();
        let start = (Instant::now(), SystemTime::now());
        let gone = run_until(&hub, start, 120 * S, async || fake.peer(&invite).is_none())
            .await
            .expect("pruned");
        // The token said 60 s (whole seconds of the wall clock).
        assert!(gone >= 59 * S && gone <= 61 * S, "{gone:?}");
        assert!(hub.snapshot().await.invites.is_empty());
    }

    #[tokio::test]
    async fn a_prune_the_device_refuses_is_tried_again_a_second_later() {
        let (_tmp, fake, hub) = setup();
        let tok = hub
            .mint(&req(1), SystemTime::now())
            .await
            .unwrap()
            .remove(0);
        let invite = tok.invite_key.public_key();
        let (t, w) = (Instant::now(), SystemTime::now());
        fake.fail_after(0);
        hub.housekeep(t + 61 * S, w + 61 * S).await;
        assert!(fake.peer(&invite).is_some(), "the device refused");
        // The device would take it now, but the retry waits.
        hub.housekeep(t + 61 * S + 500 * MS, w + 61 * S).await;
        assert!(fake.peer(&invite).is_some());
        hub.housekeep(t + 62 * S, w + 62 * S).await;
        assert!(fake.peer(&invite).is_none());
    }

    #[tokio::test]
    async fn a_failed_save_is_retried_with_backoff_until_the_disk_takes_it() {
        let (tmp, _fake, hub) = setup();
        let toks = hub.mint(&req(1), SystemTime::now()).await.unwrap();
        // A file where the state directory goes: every save fails.
        let file = tmp.path().join("wgt0.json");
        let hub = Hub::new(
            hub.device(),
            None,
            StateDir::new(file.join("x")),
            "wgt0",
            Ledger::new(hub.snapshot().await, 4).unwrap(),
        );
        hub.revoke(&toks[0].assigned.to_string()).await.unwrap();
        assert!(hub.keeper().unsaved());
        let (t, w) = (Instant::now(), SystemTime::now());
        hub.housekeep(t + S, w).await;
        assert!(hub.keeper().unsaved(), "the disk still refuses");
        // The disk is fixed; the next try is 2 s after the last.
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir_all(file.join("x")).unwrap();
        hub.housekeep(t + 2 * S, w).await;
        assert!(hub.keeper().unsaved(), "not yet: backing off");
        hub.housekeep(t + 3 * S, w).await;
        assert!(!hub.keeper().unsaved());
        let saved = StateDir::new(file.join("x")).load_server("wgt0").unwrap();
        assert!(saved.unwrap().invites.is_empty(), "the revocation is saved");
    }

    #[tokio::test]
    async fn endpoints_are_recorded_every_10s() {
        let (_tmp, fake, hub) = setup();
        let k = PrivateKey::generate().public_key();
        hub.admit("phone", k, SystemTime::now()).await.unwrap();
        seen_at(&fake, &k, "198.51.100.4:5000");
        let (t, w) = (Instant::now(), SystemTime::now());
        hub.housekeep(t + 5 * S, w).await;
        assert_eq!(hub.snapshot().await.peers[0].endpoint, None);
        hub.housekeep(t + 10 * S, w).await;
        assert_eq!(
            hub.snapshot().await.peers[0].endpoint,
            Some("198.51.100.4:5000".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn the_firewall_is_read_again_after_a_change_and_once_a_second() {
        let (_tmp, _fake, hub) = setup();
        let (t, w) = (Instant::now(), SystemTime::now());
        assert!(!hub.housekeep(t, w).await.check_firewall);
        let k = PrivateKey::generate().public_key();
        hub.admit("phone", k, SystemTime::now()).await.unwrap();
        assert!(hub.housekeep(t + 100 * MS, w).await.check_firewall);
        assert!(!hub.housekeep(t + 200 * MS, w).await.check_firewall);
        assert!(hub.housekeep(t + 1200 * MS, w).await.check_firewall);
    }

    #[tokio::test]
    async fn a_redeem_wakes_the_sleeping_loop_and_nothing_else_does() {
        let (_tmp, _fake, hub) = setup();
        let tok = hub
            .mint(&req(1), SystemTime::now())
            .await
            .unwrap()
            .remove(0);
        // The round after the mint: it sleeps for a second now.
        let round = hub
            .housekeep(Instant::now() + 100 * MS, SystemTime::now())
            .await;
        assert!(round.check_firewall);
        let woken = async || tokio::time::timeout(50 * MS, hub.wakeup()).await.is_ok();
        assert!(!woken().await, "asleep until its deadline");
        let k = PrivateKey::generate().public_key();
        hub.redeem(tok.assigned, k, Joining::default(), SystemTime::now())
            .await
            .unwrap();
        assert!(woken().await, "a joiner waits for its swap");
    }
}
