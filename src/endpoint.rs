//! This host's own endpoint device, made in one place for `serve`, `join`
//! and `up`: first whatever a crashed run left behind is removed, then the
//! device is created and configured.

use crate::net::{NetError, NetOps};
use crate::store::StateDir;
use crate::wg::{self, BackendChoice, DeviceSpec, WgDevice, WgError};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("removing what a previous run left behind")]
    Cleanup(#[source] NetError),
    #[error("creating {iface}")]
    Create {
        iface: String,
        #[source]
        source: WgError,
    },
}

/// A `kill -9` leaves a kernel WireGuard link (userspace TUNs die with the
/// process) and the local control socket behind. A socket that no process
/// answers, for an interface whose state we hold, marks such a crash: the
/// link left with it is ours to remove.
pub async fn clean_up_after_crash(
    net: &dyn NetOps,
    store: &StateDir,
    iface: &str,
) -> Result<(), NetError> {
    let socket = store.socket(iface);
    let crashed = socket.exists()
        && std::os::unix::net::UnixStream::connect(&socket).is_err()
        && store.file(iface).exists();
    if crashed && net.link_exists(iface).await? {
        tracing::warn!("removing {iface}, left behind by a previous run that did not stop cleanly");
        net.delete_link(iface).await?;
    }
    Ok(())
}

/// Cleans up after a crash, then creates the device `spec` describes.
pub async fn create(
    spec: &DeviceSpec,
    backend: BackendChoice,
    net: Arc<dyn NetOps>,
    store: &StateDir,
) -> Result<Arc<dyn WgDevice>, EndpointError> {
    clean_up_after_crash(net.as_ref(), store, &spec.name)
        .await
        .map_err(EndpointError::Cleanup)?;
    let device = wg::create(spec, backend, net, None)
        .await
        .map_err(|source| EndpointError::Create {
            iface: spec.name.clone(),
            source,
        })?;
    // The device's name is ours now: no other run can be saving its state.
    store.clean_stale_temps(&spec.name);
    tracing::info!(
        "{} is up ({} backend) as {}",
        spec.name,
        device.backend(),
        spec.addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Arc::from(device))
}
