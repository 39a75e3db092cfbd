//! The hub's own containers: the endpoint each gets (the hub is its peer),
//! and those attached by label or the network driver as transactions.

use super::Hub;
use crate::state::ServerState;
use crate::wg::PeerSpec;
use std::net::IpAddr;
use std::sync::Arc;

/// The endpoint of one of the hub's containers: the hub is its peer, on
/// loopback, as its UDP socket lives in the hub's namespace too.
pub fn container_spec(
    state: &ServerState,
    c: &crate::state::ContainerRecord,
    server_ip: IpAddr,
) -> crate::containers::EndpointSpec {
    let hub = PeerSpec {
        public_key: state.private_key.public_key(),
        endpoint: Some(std::net::SocketAddr::from(([127, 0, 0, 1], state.port))),
        allowed_ips: state.subnets().all(),
        keepalive: Some(crate::wg::KEEPALIVE),
    };
    let probe = std::net::SocketAddr::new(server_ip, crate::control::CONTROL_PORT);
    crate::node::endpoint_spec(c, state.subnets(), state.mtu, hub, probe, None)
}

/// The hub's containers attached by label or the network driver: records
/// in the ledger, made and given back as transactions.
pub struct HubEndpoints {
    pub hub: Arc<Hub>,
    pub iface: String,
}

#[async_trait::async_trait]
impl crate::containers::Endpoints for HubEndpoints {
    async fn allocate(
        &self,
        name: &str,
        driver: bool,
    ) -> Result<crate::containers::EndpointSpec, crate::containers::ContainerError> {
        let iface = self.iface.clone();
        let record = self
            .hub
            .transact(true, |l| {
                l.add_container(name, driver, |n| {
                    crate::containers::endpoint_iface(&iface, n)
                })
            })
            .await
            .map_err(|d| crate::containers::ContainerError::Endpoint {
                container: name.to_owned(),
                reason: format!("{d}"),
            })?;
        let state = self.hub.snapshot().await;
        let server_ip = crate::ipam::Pool::new(state.subnet)
            .map(|p| p.server_address())
            .unwrap_or(state.subnet.ip());
        Ok(container_spec(&state, &record, server_ip))
    }

    async fn rename(
        &self,
        spec: &crate::containers::EndpointSpec,
        name: &str,
    ) -> Result<(), crate::containers::ContainerError> {
        let address = spec.address.ip();
        self.hub
            .transact(true, |l| l.rename_container(address, name))
            .await
            .map_err(|d| crate::containers::ContainerError::Endpoint {
                container: name.to_owned(),
                reason: format!("{d}"),
            })
    }

    async fn leftovers(&self) -> Vec<crate::containers::EndpointSpec> {
        let state = self.hub.snapshot().await;
        let server_ip = crate::ipam::Pool::new(state.subnet)
            .map(|p| p.server_address())
            .unwrap_or(state.subnet.ip());
        state
            .containers
            .iter()
            .filter(|c| c.driver)
            .map(|c| container_spec(&state, c, server_ip))
            .collect()
    }

    async fn release(
        &self,
        spec: &crate::containers::EndpointSpec,
    ) -> Result<(), crate::containers::ContainerError> {
        let address = spec.address.ip();
        self.hub
            .transact(false, |l| {
                if let Some(c) = l.state().containers.iter().find(|c| c.address == address) {
                    let name = c.container.clone();
                    l.remove_container(&name);
                }
                Ok::<_, std::convert::Infallible>(())
            })
            .await
            .map_err(|d| crate::containers::ContainerError::Endpoint {
                container: spec.container.clone(),
                reason: format!("{d}"),
            })
    }
}
