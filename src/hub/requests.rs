//! What peers and the hub operator ask of the hub: each request is one
//! transaction ([`Hub::transact`]), refused whole or made whole.

use super::{
    AdmitError, Caller, Denied, Hub, HubError, Joining, MintError, MintRequest, RedeemError,
    Redeemed, RegisterError, RevokeError, RouteError,
};
use crate::control::auth::{AuthError, Proof};
use crate::keys::PublicKey;
use crate::token::Token;
use crate::wg::PeerSpec;
use ipnetwork::IpNetwork;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

/// How often one site may announce that it leaves (each resets its session).
const LEAVE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LeaveError {
    #[error("{0} is not an admitted site")]
    NotASite(IpAddr),
    #[error("this site announced it leaves less than {}s ago", LEAVE_INTERVAL.as_secs())]
    TooSoon,
    #[error("resetting the site's peer")]
    Hub(#[from] HubError),
}

impl Hub {
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
        self.swap_pending().await;
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

    /// The hub's own LANs (`route add|del` on the hub): saved, then
    /// pushed to every site as any advertised change is.
    pub async fn set_own_routes(&self, routes: Vec<IpNetwork>) -> Result<(), Denied<RouteError>> {
        self.note_underlay().await;
        self.transact(true, |l| l.set_hub_routes(routes)).await
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::testkit::*;

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
        let (tok, k) = joined(&hub).await;
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
