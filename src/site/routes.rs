//! The LANs behind other sites, routed into this site's tunnel as the
//! hub advertises them.

use super::{SiteError, api};
use crate::control::tunnel::Advertised;
use crate::control::{CONTROL_PORT, tunnel};
use crate::net::NetOps;
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
                }
            }
            retry = match tunnel::fetch_routes(api(&self.joined), Duration::from_secs(5)).await {
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
        if remote == self.current {
            return Ok(());
        }
        let mut allowed = self.joined.subnets().all();
        allowed.extend(self.extra.iter().copied());
        allowed.extend(remote.iter().copied());
        self.device
            .set_allowed_ips(&self.joined.server_public_key, &allowed)
            .await?;
        crate::net::sync_routes(self.net.as_ref(), &self.iface, &self.current, remote)
            .await
            .map_err(WgError::Net)?;
        self.current = remote.to_vec();
        Ok(())
    }
}
