//! The site's mesh agent, made from what the site has: only a userspace
//! device splits probes off its socket, so a kernel-backend site has none
//! and reaches other sites through the hub.

use crate::node::mesh::{Agent, AllowedLock, MeshView};
use crate::state::JoinedState;
use crate::store::StateDir;
use crate::wg::mesh::{Inbound, MeshSocket};
use crate::wg::{BackendKind, WgDevice};
use ipnetwork::IpNetwork;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// The watches between the agent and the rest of the site: pokes from the
/// hub in, the LANs mesh peers carry and the paths for status out.
pub(super) type Links = (
    watch::Receiver<u64>,
    watch::Sender<Vec<IpNetwork>>,
    AllowedLock,
    watch::Sender<MeshView>,
);

pub(super) fn agent(
    device: &Arc<dyn WgDevice>,
    mesh: Option<(Arc<MeshSocket>, mpsc::Receiver<Inbound>)>,
    joined: &JoinedState,
    store: &StateDir,
    iface: &str,
    (pokes, owned, allowed, view): Links,
) -> Option<Agent> {
    let (socket, disco) = mesh?;
    if device.backend() != BackendKind::Userspace {
        tracing::info!("kernel backend: other sites are reached through the hub");
        return None;
    }
    Some(Agent {
        device: device.clone(),
        socket,
        disco,
        private_key: joined.private_key.clone(),
        hub_key: joined.server_public_key,
        hub_address: joined.server_address,
        api: super::api(joined, iface),
        own_address: joined.address.ip(),
        store: store.clone(),
        iface: iface.to_owned(),
        advertise: joined.advertise_endpoint,
        tunnel: joined.subnets().all(),
        pokes,
        owned,
        allowed,
        view,
        first_map: None,
    })
}

/// The agent's run, stopped by `down` or by the sender returned; and what
/// resolves once its first peer map is in the device (never without an
/// agent: at once), so that the site says it is ready only then.
pub(super) fn running(
    agent: Option<Agent>,
    down: impl std::future::Future<Output = ()> + Send + 'static,
) -> (
    impl std::future::Future<Output = ()>,
    impl std::future::Future<Output = ()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (first_map, has_map) = tokio::sync::oneshot::channel::<()>();
    let on = agent.is_some();
    let agent = agent.map(|mut a| {
        a.first_map = Some(first_map);
        a
    });
    let run = async move {
        if let Some(a) = agent {
            a.run(async move {
                tokio::select! {
                    () = down => {}
                    _ = stopped => {}
                }
            })
            .await;
        }
    };
    let ready = async move {
        if on {
            let _ = has_map.await;
        }
    };
    (run, ready, stop)
}
