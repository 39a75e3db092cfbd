//! A site's containers: registered with the hub under keys made here,
//! saved with the site, attached by name, by label or by the driver.

use super::{Route, SiteError, api, hub_peer};
use crate::containers::{ContainerError, EndpointSpec, endpoint_iface};
use crate::control::auth::Signer;
use crate::control::{ControlError, tunnel};
use crate::docker::ContainerInfo;
use crate::keys::PrivateKey;
use crate::state::{ContainerRecord, Endpoint, JoinedState};
use crate::store::StateDir;
use crate::transport::ws::Dialer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The endpoint of one of this site's containers: the hub is its peer on
/// the site's route (a WebSocket link of its own when the site uses one).
fn container_spec(joined: &JoinedState, c: &ContainerRecord, route: &Route) -> EndpointSpec {
    spec_for(joined, c, route.endpoint, route.dialer.clone())
}

fn spec_for(
    joined: &JoinedState,
    c: &ContainerRecord,
    hub: SocketAddr,
    link: Option<Arc<Dialer>>,
) -> EndpointSpec {
    let hub_peer = hub_peer(joined, hub);
    let probe = SocketAddr::new(joined.server_address, crate::control::CONTROL_PORT);
    crate::node::endpoint_spec(c, joined.subnets(), joined.mtu, hub_peer, probe, link)
}

/// The endpoints of the containers saved with the site (for `up`).
pub fn saved_containers(joined: &JoinedState, route: &Route) -> Vec<EndpointSpec> {
    joined
        .containers
        .iter()
        .filter(|c| !c.driver)
        .map(|c| container_spec(joined, c, route))
        .collect()
}

/// Registers this site's containers with the hub (each with a key made
/// here), signed with the site's key, and saves them with the site.
pub async fn register_containers(
    joined: &mut JoinedState,
    iface: &str,
    infos: &[ContainerInfo],
    route: &Route,
    store: &StateDir,
) -> Result<Vec<EndpointSpec>, SiteError> {
    let signer = Signer::new(&joined.private_key, &joined.server_public_key)?;
    for (n, info) in infos.iter().enumerate() {
        let key = PrivateKey::generate();
        let got = tunnel::register_endpoint(
            api(joined, iface),
            &signer,
            &key.public_key(),
            &info.name,
            Duration::from_secs(5),
        )
        .await
        .map_err(|source| SiteError::Register {
            name: info.name.clone(),
            source,
        })?;
        joined.containers.push(ContainerRecord {
            container: info.name.clone(),
            iface: endpoint_iface(iface, n),
            private_key: key,
            address: got.address.ip(),
            by_label: false,
            driver: false,
        });
    }
    store.save(iface, &Endpoint::Joined(joined.clone()))?;
    Ok(saved_containers(joined, route))
}

/// A site's containers attached by label or the network driver: each
/// with a key made here, registered with the hub (signed with the site's
/// key) and saved with the site; given back when the container goes.
pub struct SiteEndpoints {
    signer: Signer,
    store: StateDir,
    iface: String,
    joined: tokio::sync::Mutex<JoinedState>,
    hub: SocketAddr,
    link: Option<Arc<Dialer>>,
}

impl SiteEndpoints {
    /// Gives back the network driver's endpoints an earlier run left, when
    /// this run has no driver to take them back.
    pub async fn release_leftovers(&self) {
        let mut joined = self.joined.lock().await;
        let left: Vec<ContainerRecord> = joined
            .containers
            .iter()
            .filter(|c| c.driver)
            .cloned()
            .collect();
        if left.is_empty() {
            return;
        }
        for c in &left {
            if let Err(e) = tunnel::release_endpoint(
                api(&joined, &self.iface),
                &self.signer,
                &c.private_key.public_key(),
                Duration::from_secs(5),
            )
            .await
            {
                tracing::debug!("giving back {}: {e}", c.address);
            }
        }
        joined.containers.retain(|c| !c.driver);
        if let Err(e) = self
            .store
            .save(&self.iface, &Endpoint::Joined(joined.clone()))
        {
            tracing::warn!("{e}");
        }
        tracing::info!(
            "gave back {} network-driver endpoint(s) a previous run left",
            left.len()
        );
    }

    pub fn new(
        joined: &JoinedState,
        iface: &str,
        store: &StateDir,
        route: &Route,
    ) -> Result<Self, SiteError> {
        Ok(Self {
            signer: Signer::new(&joined.private_key, &joined.server_public_key)?,
            store: store.clone(),
            iface: iface.to_owned(),
            joined: tokio::sync::Mutex::new(joined.clone()),
            hub: route.endpoint,
            link: route.dialer.clone(),
        })
    }
}

#[async_trait::async_trait]
impl crate::containers::Endpoints for SiteEndpoints {
    async fn allocate(&self, name: &str, driver: bool) -> Result<EndpointSpec, ContainerError> {
        let fail = |reason: String| ContainerError::Endpoint {
            container: name.to_owned(),
            reason,
        };
        let mut joined = self.joined.lock().await;
        if let Some(c) = joined.containers.iter().find(|c| c.container == name) {
            return Ok(spec_for(&joined, c, self.hub, self.link.clone()));
        }
        let key = PrivateKey::generate();
        let got = tunnel::register_endpoint(
            api(&joined, &self.iface),
            &self.signer,
            &key.public_key(),
            name,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| fail(format!("{:#}", anyhow::Error::from(e))))?;
        let mut n = 0;
        while joined
            .containers
            .iter()
            .any(|c| c.iface == endpoint_iface(&self.iface, n))
        {
            n += 1;
        }
        let record = ContainerRecord {
            container: name.to_owned(),
            iface: endpoint_iface(&self.iface, n),
            private_key: key,
            address: got.address.ip(),
            by_label: !driver,
            driver,
        };
        joined.containers.push(record.clone());
        self.store
            .save(&self.iface, &Endpoint::Joined(joined.clone()))
            .map_err(|e| fail(e.to_string()))?;
        Ok(spec_for(&joined, &record, self.hub, self.link.clone()))
    }

    async fn leftovers(&self) -> Vec<EndpointSpec> {
        let joined = self.joined.lock().await;
        joined
            .containers
            .iter()
            .filter(|c| c.driver)
            .map(|c| spec_for(&joined, c, self.hub, self.link.clone()))
            .collect()
    }

    async fn rename(&self, spec: &EndpointSpec, name: &str) -> Result<(), ContainerError> {
        let mut joined = self.joined.lock().await;
        // Registering the same key under another name renames it.
        tunnel::register_endpoint(
            api(&joined, &self.iface),
            &self.signer,
            &spec.key.public_key(),
            name,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| ContainerError::Endpoint {
            container: name.to_owned(),
            reason: format!("{:#}", anyhow::Error::from(e)),
        })?;
        let key = spec.key.public_key();
        if let Some(c) = joined
            .containers
            .iter_mut()
            .find(|c| c.private_key.public_key() == key)
        {
            c.container = name.to_owned();
        }
        self.store
            .save(&self.iface, &Endpoint::Joined(joined.clone()))
            .map_err(|e| ContainerError::Endpoint {
                container: name.to_owned(),
                reason: e.to_string(),
            })
    }

    async fn release(&self, spec: &EndpointSpec) -> Result<(), ContainerError> {
        let mut joined = self.joined.lock().await;
        match tunnel::release_endpoint(
            api(&joined, &self.iface),
            &self.signer,
            &spec.key.public_key(),
            Duration::from_secs(5),
        )
        .await
        {
            Ok(()) | Err(ControlError::Refused { status: 404, .. }) => {}
            Err(e) => {
                return Err(ContainerError::Endpoint {
                    container: spec.container.clone(),
                    reason: format!("giving it back: {:#}", anyhow::Error::from(e)),
                });
            }
        }
        let key = spec.key.public_key();
        joined
            .containers
            .retain(|c| c.private_key.public_key() != key);
        self.store
            .save(&self.iface, &Endpoint::Joined(joined.clone()))
            .map_err(|e| ContainerError::Endpoint {
                container: spec.container.clone(),
                reason: e.to_string(),
            })
    }
}
