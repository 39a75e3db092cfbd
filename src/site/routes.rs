//! The LANs behind other sites, routed into this site's tunnel as the
//! hub advertises them.

use super::{SiteError, api};
use crate::control::tunnel::Advertised;
use crate::control::{CONTROL_PORT, tunnel};
use crate::net::NetOps;
use crate::node::mesh::AllowedLock;
use crate::state::JoinedState;
use crate::wg::{WgDevice, WgError};
use ipnetwork::IpNetwork;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How often a site asks the hub for the LANs even when not told they
/// changed (a lost poke, a hub that restarted).
const ROUTES_POLL: Duration = Duration::from_secs(30);

/// The LANs behind other sites and the hub, routed into this site's
/// tunnel: the kernel's routes, the hub peer's allowed IPs, and (through
/// the watch) its containers' endpoints follow what the hub says.
pub(super) struct RouteSync {
    pub(super) device: Arc<dyn WgDevice>,
    pub(super) net: Arc<dyn NetOps>,
    pub(super) iface: String,
    pub(super) joined: JoinedState,
    /// What is routed now.
    pub(super) current: Vec<IpNetwork>,
    /// Allowed through the hub beside the subnet and the LANs: the
    /// server's own address in transparent mode.
    pub(super) extra: Vec<IpNetwork>,
    /// The LANs that mesh peers carry themselves: not allowed through the
    /// hub (a prefix belongs to one peer only).
    pub(super) owned: Option<tokio::sync::watch::Receiver<Vec<IpNetwork>>>,
    /// Held from reading `owned` to setting the hub's peer, as the mesh
    /// holds it from setting its peers to telling `owned`.
    pub(super) allowed: AllowedLock,
    /// Told of every poke from the hub (the mesh follows them too).
    pub(super) pokes: tokio::sync::watch::Sender<u64>,
    pub(super) applied_owned: Vec<IpNetwork>,
}

/// The LANs of `all` that are not behind the site at `own`, sorted.
pub fn remote_routes(all: &[Advertised], own: std::net::IpAddr) -> Vec<IpNetwork> {
    let mut out: Vec<IpNetwork> = all
        .iter()
        .filter(|a| a.via != own)
        .map(|a| a.prefix)
        .collect();
    out.sort();
    out.dedup();
    out
}

impl RouteSync {
    /// Asks the hub for the LANs at start, when it pokes this site's
    /// control port (they changed), and every [`ROUTES_POLL`], until `stop`.
    pub(super) async fn run(
        mut self,
        lans: tokio::sync::watch::Sender<Vec<IpNetwork>>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let own = self.joined.address.ip();
        let hub = self.joined.server_address;
        let poke = match tokio::net::UdpSocket::bind(SocketAddr::new(own, CONTROL_PORT)).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(
                    "listening for route changes on {own}:{CONTROL_PORT}: {e}; polling every {}s instead",
                    ROUTES_POLL.as_secs()
                );
                None
            }
        };
        let mut buf = [0u8; 64];
        let mut retry = Duration::ZERO;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(retry) => {}
                got = async {
                    match &poke {
                        Some(s) => s.recv_from(&mut buf).await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Only the hub tells; anything else is ignored.
                    if !matches!(got, Ok((_, from)) if from.ip() == hub) {
                        continue;
                    }
                    self.pokes.send_modify(|n| *n += 1);
                }
                r = async {
                    match &mut self.owned {
                        Some(o) => o.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if r.is_err() {
                        // The mesh stopped: the hub carries everything again.
                        self.owned = None;
                    }
                    let remote = self.current.clone();
                    if let Err(e) = self.apply(&remote).await {
                        tracing::warn!("routing the LANs {remote:?} into {}: {e}", self.iface);
                    }
                    continue;
                }
            }
            retry =
                match tunnel::fetch_routes(api(&self.joined, &self.iface), Duration::from_secs(5))
                    .await
                {
                    Ok(all) => {
                        let remote = remote_routes(&all, own);
                        if let Err(e) = self.apply(&remote).await {
                            tracing::warn!("routing the LANs {remote:?} into {}: {e}", self.iface);
                            Duration::from_secs(2)
                        } else {
                            lans.send_if_modified(|l| {
                                let changed = *l != remote;
                                *l = remote;
                                changed
                            });
                            ROUTES_POLL
                        }
                    }
                    Err(e) => {
                        tracing::debug!("asking the hub for routes: {e}");
                        Duration::from_secs(2)
                    }
                };
        }
    }

    async fn apply(&mut self, remote: &[IpNetwork]) -> Result<(), SiteError> {
        let _held = self.allowed.clone().lock_owned().await;
        let owned = match &mut self.owned {
            Some(o) => o.borrow_and_update().clone(),
            None => vec![],
        };
        if remote == self.current && owned == self.applied_owned {
            return Ok(());
        }
        let mut allowed = self.joined.subnets().all();
        allowed.extend(self.extra.iter().copied());
        allowed.extend(remote.iter().filter(|r| !owned.contains(r)).copied());
        self.device
            .set_allowed_ips(&self.joined.server_public_key, &allowed)
            .await?;
        crate::net::sync_routes(self.net.as_ref(), &self.iface, &self.current, remote)
            .await
            .map_err(WgError::Net)?;
        self.current = remote.to_vec();
        self.applied_owned = owned;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::tunnel::Advertised;
    use crate::keys::PrivateKey;
    use crate::net::fake::FakeNet;
    use crate::reach::Path;
    use crate::wg::PeerSpec;
    use crate::wg::fake::FakeWg;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn joined() -> JoinedState {
        JoinedState {
            name: Some("b".into()),
            private_key: PrivateKey::generate(),
            mtu: 1420,
            backend: None,
            server_public_key: PrivateKey::generate().public_key(),
            endpoint: "192.0.2.1".into(),
            port: 51820,
            address: net("10.77.0.3/24"),
            server_address: "10.77.0.1".parse().unwrap(),
            subnet: net("10.77.0.0/24"),
            subnet6: None,
            containers: vec![],
            path: Path::Udp,
            routes: vec![],
            masquerade: false,
            transparent: false,
            snat_public: false,
            attach_label: None,
            advertise_endpoint: None,
            listen_port: None,
        }
    }

    /// A site whose hub peer allows the subnet only, and its route sync.
    async fn site(extra: Vec<IpNetwork>) -> (FakeWg, Arc<FakeNet>, RouteSync) {
        let j = joined();
        let device = FakeWg::default();
        let hub = PeerSpec {
            public_key: j.server_public_key,
            endpoint: Some("192.0.2.1:51820".parse().unwrap()),
            allowed_ips: j.subnets().all(),
            keepalive: Some(25),
        };
        device.upsert_peer(&hub).await.unwrap();
        let host = Arc::new(FakeNet::default());
        host.add_link("wgs0");
        let sync = RouteSync {
            device: Arc::new(device.clone()),
            net: host.clone(),
            iface: "wgs0".into(),
            joined: j,
            current: vec![],
            extra,
            owned: None,
            allowed: AllowedLock::default(),
            pokes: tokio::sync::watch::channel(0).0,
            applied_owned: vec![],
        };
        (device, host, sync)
    }

    fn routed(host: &FakeNet) -> Vec<IpNetwork> {
        host.routes.lock().unwrap().iter().map(|r| r.0).collect()
    }

    #[tokio::test]
    async fn the_lans_the_hub_advertises_are_routed_and_allowed_through_it() {
        let server = net("192.0.2.1/32");
        let (device, host, mut sync) = site(vec![server]).await;
        let (a, b) = (net("192.168.1.0/24"), net("192.168.2.0/24"));
        sync.apply(&[a, b]).await.unwrap();
        assert_eq!(routed(&host), [a, b]);
        let hub = device.peer(&sync.joined.server_public_key).unwrap();
        assert_eq!(hub.allowed_ips, [net("10.77.0.0/24"), server, a, b]);
        // One LAN goes: its route and its allowed IPs with it.
        sync.apply(&[b]).await.unwrap();
        assert_eq!(routed(&host), [b]);
        let hub = device.peer(&sync.joined.server_public_key).unwrap();
        assert_eq!(hub.allowed_ips, [net("10.77.0.0/24"), server, b]);
    }

    /// While the mesh gives a LAN to one of its peers (holding the lock
    /// from setting the peer to telling `owned`), the hub's peer is not set
    /// from what `owned` said before: that would take the LAN from the mesh
    /// peer, and the next apply would leave it on no peer at all.
    #[tokio::test]
    async fn the_hub_peer_waits_while_the_mesh_gives_a_lan_to_its_peer() {
        let (device, _host, mut sync) = site(vec![]).await;
        let lan = net("192.168.70.0/24");
        let (owned, told) = tokio::sync::watch::channel(vec![]);
        sync.owned = Some(told);
        let peer = PrivateKey::generate().public_key();
        let own = net("10.77.0.4/32");
        device
            .upsert_peer(&PeerSpec {
                public_key: peer,
                endpoint: None,
                allowed_ips: vec![own],
                keepalive: None,
            })
            .await
            .unwrap();
        // The mesh, mid-apply: its peer has the LAN, `owned` does not say so.
        let held = sync.allowed.clone().lock_owned().await;
        device.set_allowed_ips(&peer, &[own, lan]).await.unwrap();
        let hub = sync.joined.server_public_key;
        let routing = tokio::spawn(async move { sync.apply(&[lan]).await });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !routing.is_finished(),
            "the hub's peer was set while the mesh held the lock"
        );
        owned.send(vec![lan]).unwrap();
        drop(held);
        routing.await.unwrap().unwrap();
        assert_eq!(device.peer(&peer).unwrap().allowed_ips, [own, lan]);
        assert!(!device.peer(&hub).unwrap().allowed_ips.contains(&lan));
    }

    #[tokio::test]
    async fn the_same_lans_again_change_nothing() {
        let (device, host, mut sync) = site(vec![]).await;
        let a = net("192.168.1.0/24");
        sync.apply(&[a]).await.unwrap();
        host.routes.lock().unwrap().clear();
        device.fail_after(0);
        // Neither the device nor the host is asked again.
        sync.apply(&[a]).await.unwrap();
        assert!(routed(&host).is_empty());
    }

    #[test]
    fn a_site_leaves_out_its_own_lans_and_duplicates() {
        let own = "10.77.0.3".parse().unwrap();
        let other = "10.77.0.4".parse().unwrap();
        let all = [
            Advertised {
                prefix: net("192.168.9.0/24"),
                via: other,
            },
            Advertised {
                prefix: net("192.168.3.0/24"),
                via: own,
            },
            Advertised {
                prefix: net("192.168.1.0/24"),
                via: other,
            },
            Advertised {
                prefix: net("192.168.9.0/24"),
                via: other,
            },
        ];
        assert_eq!(
            remote_routes(&all, own),
            [net("192.168.1.0/24"), net("192.168.9.0/24")]
        );
    }
}
