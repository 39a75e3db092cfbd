//! What time and the device bring to the hub: key swaps that are due,
//! expired invites, peers' endpoints, the host's networks, save retries.

use super::{Hub, HubError, unavailable};
use crate::keys::PublicKey;
use ipnetwork::IpNetwork;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Instant, SystemTime};

impl Hub {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::testkit::*;

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
}
