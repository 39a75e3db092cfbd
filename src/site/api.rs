//! The joined site's answers on its local socket.

use crate::containers::ContainerView;
use crate::control::local::LocalApi;
use crate::mesh::Chosen;
use crate::node::mesh::PeerPath;
use crate::state::{Endpoint, JoinedState};
use crate::status::{EndpointStatus, MeshReport, PathReport, PeerReport, Role};
use crate::transport::Path;
use crate::wg::BackendKind;
use crate::wg::WgDevice;
use std::sync::Arc;
use std::time::SystemTime;

/// The joined site's status: live stats of its link to the server.
pub(super) struct SiteApi {
    pub(super) device: Arc<dyn WgDevice>,
    pub(super) path: Path,
    pub(super) joined: JoinedState,
    pub(super) iface: String,
    pub(super) containers: Option<ContainerView>,
    pub(super) driver: Option<Arc<crate::driver::Driver>>,
    /// The mesh's paths, when this site takes part.
    pub(super) mesh: Option<tokio::sync::watch::Receiver<crate::node::mesh::MeshView>>,
    /// Its LANs, which `route add|del` change.
    pub(super) lans: Arc<super::lans::Lans>,
}

#[async_trait::async_trait]
impl LocalApi for SiteApi {
    async fn change_lans(
        &self,
        req: crate::control::local::LanChange,
    ) -> Result<crate::control::local::LanSet, crate::control::local::LocalError> {
        self.lans.change(req).await
    }

    async fn report(&self) -> Vec<EndpointStatus> {
        let mut main =
            crate::status::from_state(&self.iface, &Endpoint::Joined(self.joined.clone()))
                .swap_remove(0);
        main.state = crate::status::State::Up;
        main.routes = self.lans.routes();
        main.backend = Some(self.device.backend());
        main.listen_port = self.device.listen_port().await.ok();
        let view = self.mesh.as_ref().map(|m| m.borrow().clone());
        main.mesh = Some(match &view {
            Some(v) => MeshReport {
                direct: true,
                nat: v.nat.map(|n| n.to_string()),
                path_changes: Some(v.changes),
                ..MeshReport::default()
            },
            None => MeshReport {
                direct: false,
                note: Some(if self.device.backend() == BackendKind::Kernel {
                    "kernel backend: other sites are reached through the hub".to_owned()
                } else {
                    "the hub runs no mesh: other sites are reached through it".to_owned()
                }),
                ..MeshReport::default()
            },
        });
        let now = SystemTime::now();
        let paths: Vec<PeerPath> = view.map(|v| v.peers).unwrap_or_default();
        main.peers = self
            .device
            .peers()
            .await
            .unwrap_or_default()
            .iter()
            .map(|p| {
                if let Some(m) = paths.iter().find(|m| m.public_key == p.public_key) {
                    let mut r = PeerReport::from_live(p, m.name.clone(), m.address);
                    r.transport = Some("udp".into());
                    // Its LANs: what it carries beside its own addresses.
                    r.routes = p
                        .allowed_ips
                        .iter()
                        .filter(|n| n.prefix() < if n.is_ipv4() { 32 } else { 128 })
                        .copied()
                        .collect();
                    r.path = Some(PathReport {
                        path: match m.chosen {
                            Chosen::Direct(a) => format!("direct {a}"),
                            Chosen::Relay => format!("relay via {}", self.joined.server_address),
                        },
                        rtt_ms: m.rtt.map(|d| d.as_secs_f64() * 1000.0),
                        last_answer_secs: m
                            .last_answer
                            .map(|t| now.duration_since(t).unwrap_or_default().as_secs()),
                    });
                    if m.chosen == Chosen::Relay {
                        r.endpoint = None;
                    }
                    return r;
                }
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
