//! The joined site's answers on its local socket.

use crate::containers::ContainerView;
use crate::control::local::LocalApi;
use crate::state::{Endpoint, JoinedState};
use crate::status::{EndpointStatus, PeerReport, Role};
use crate::transport::Path;
use crate::wg::WgDevice;
use std::sync::Arc;

/// The joined site's status: live stats of its link to the server.
pub(super) struct SiteApi {
    pub(super) device: Arc<dyn WgDevice>,
    pub(super) path: Path,
    pub(super) joined: JoinedState,
    pub(super) iface: String,
    pub(super) containers: Option<ContainerView>,
    pub(super) driver: Option<Arc<crate::driver::Driver>>,
}

#[async_trait::async_trait]
impl LocalApi for SiteApi {
    async fn report(&self) -> Vec<EndpointStatus> {
        let mut main =
            crate::status::from_state(&self.iface, &Endpoint::Joined(self.joined.clone()))
                .swap_remove(0);
        main.state = crate::status::State::Up;
        main.backend = Some(self.device.backend());
        main.listen_port = self.device.listen_port().await.ok();
        main.peers = self
            .device
            .peers()
            .await
            .unwrap_or_default()
            .iter()
            .map(|p| {
                let mut r = PeerReport::from_live(
                    p,
                    Some("server".into()),
                    Some(self.joined.server_address),
                );
                r.transport = Some(self.path.to_string());
                r.routes = p
                    .allowed_ips
                    .iter()
                    .filter(|n| **n != self.joined.subnet)
                    .copied()
                    .collect();
                if self.path != Path::Udp {
                    r.endpoint = None;
                }
                r
            })
            .collect();
        debug_assert_eq!(main.role, Role::Joined);
        let mut out = vec![main];
        if let Some(c) = &self.containers {
            out.extend(c.report().await);
        }
        if let Some(d) = &self.driver {
            out.extend(d.report().await);
        }
        out
    }
}
