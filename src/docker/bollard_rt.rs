//! The Docker API through bollard. bollard types stay in this file.
//!
//! Honours `DOCKER_HOST` and negotiates the API version, so older engines
//! (20.10 here) work with a newer client library.

use super::{
    ContainerEvent, ContainerInfo, ContainerRuntime, DockerError, DriverNetwork, EventKind, Label,
    Member,
};
use async_trait::async_trait;
use bollard::Docker;
use bollard::query_parameters::{
    EventsOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
};
use futures::StreamExt;
use futures::stream::BoxStream;
use std::collections::HashMap;

pub struct Bollard {
    docker: Docker,
}

fn classify(e: bollard::errors::Error) -> DockerError {
    use bollard::errors::Error as E;
    match e {
        E::DockerResponseServerError {
            status_code: 404, ..
        } => DockerError::Api("not found".into()),
        E::DockerResponseServerError {
            status_code,
            message,
        } => DockerError::Api(format!("{status_code}: {message}")),
        other => DockerError::Unavailable(other.to_string()),
    }
}

/// What the tool keeps of an inspected container.
fn info(c: bollard::models::ContainerInspectResponse) -> ContainerInfo {
    let state = c.state.unwrap_or_default();
    let pid = match (state.running, state.pid) {
        (Some(true), Some(pid)) if pid > 0 => Some(pid as u32),
        _ => None,
    };
    ContainerInfo {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        pid,
        endpoint_ids: c
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default()
            .into_values()
            .filter_map(|e| e.endpoint_id)
            .filter(|e| !e.is_empty())
            .collect(),
    }
}

impl Bollard {
    /// Container `id` as a member of network `network`; `None` when it
    /// went meanwhile.
    async fn member(&self, id: &str, network: &str) -> Result<Option<Member>, DockerError> {
        let c = match self.docker.inspect_container(id, None).await {
            Ok(c) => c,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(None),
            Err(e) => return Err(classify(e)),
        };
        let error = c
            .state
            .as_ref()
            .and_then(|s| s.error.clone())
            .filter(|e| !e.is_empty());
        let settings = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref())
            .and_then(|n| n.get(network));
        let endpoint = settings.and_then(|e| {
            let id = e.endpoint_id.clone().filter(|i| !i.is_empty())?;
            let ip = e.ip_address.as_deref()?.parse().ok()?;
            Some((id, ip))
        });
        let address6 = settings
            .and_then(|e| e.global_ipv6_address.as_deref())
            .and_then(|a| a.parse().ok());
        let container = info(c);
        let endpoint = endpoint.filter(|_| container.pid.is_some());
        Ok(Some(Member {
            container,
            endpoint,
            address6,
            error,
        }))
    }

    /// Connects (`DOCKER_HOST` or the default socket) and checks the engine answers.
    pub async fn connect() -> Result<Self, DockerError> {
        let docker =
            Docker::connect_with_defaults().map_err(|e| DockerError::Unavailable(e.to_string()))?;
        let docker = docker.negotiate_version().await.map_err(classify)?;
        docker.ping().await.map_err(classify)?;
        Ok(Self { docker })
    }
}

#[async_trait]
impl ContainerRuntime for Bollard {
    async fn inspect(&self, reference: &str) -> Result<Option<ContainerInfo>, DockerError> {
        match self.docker.inspect_container(reference, None).await {
            Ok(c) => Ok(Some(info(c))),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(classify(e)),
        }
    }

    async fn driver_networks(&self, driver: &str) -> Result<Vec<DriverNetwork>, DockerError> {
        let filters = HashMap::from([("driver", vec![driver])]);
        let options = ListNetworksOptionsBuilder::new().filters(&filters).build();
        let found = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(classify)?;
        let mut out = vec![];
        for n in found {
            if n.driver.as_deref() != Some(driver) {
                continue;
            }
            let (Some(id), Some(name)) = (n.id, n.name) else {
                continue;
            };
            // A created container that never started has the network's
            // name only (its network id is empty).
            let filters = HashMap::from([("network", vec![id.clone(), name.clone()])]);
            let options = ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build();
            let containers = self
                .docker
                .list_containers(Some(options))
                .await
                .map_err(classify)?;
            let mut members = vec![];
            for c in containers.into_iter().filter_map(|c| c.id) {
                if let Some(m) = self.member(&c, &name).await? {
                    members.push(m);
                }
            }
            out.push(DriverNetwork {
                id,
                name,
                options: n.options.unwrap_or_default().into_iter().collect(),
                members,
            });
        }
        Ok(out)
    }

    async fn start(&self, id: &str) -> Result<(), DockerError> {
        self.docker
            .start_container(id, None)
            .await
            .map_err(classify)
    }

    async fn labelled(&self, label: &Label) -> Result<Vec<String>, DockerError> {
        let filters = HashMap::from([("label", vec![label.filter()])]);
        let options = ListContainersOptionsBuilder::new()
            .filters(&filters)
            .build();
        let found = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(classify)?;
        Ok(found
            .into_iter()
            .filter_map(|c| c.names?.into_iter().next())
            .map(|n| n.trim_start_matches('/').to_owned())
            .collect())
    }

    async fn by_endpoint(&self, ids: &[String]) -> Result<Vec<(String, String)>, DockerError> {
        let found = self
            .docker
            .list_containers(None::<bollard::query_parameters::ListContainersOptions>)
            .await
            .map_err(classify)?;
        let mut out = vec![];
        for c in found {
            let name = c
                .names
                .and_then(|n| n.into_iter().next())
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_owned();
            let networks = c
                .network_settings
                .and_then(|n| n.networks)
                .unwrap_or_default();
            for e in networks.into_values().filter_map(|e| e.endpoint_id) {
                if ids.contains(&e) {
                    out.push((e, name.clone()));
                }
            }
        }
        Ok(out)
    }

    fn events(&self) -> BoxStream<'static, Result<ContainerEvent, DockerError>> {
        let filters = HashMap::from([
            ("type", vec!["container"]),
            ("event", vec!["start", "die", "destroy"]),
        ]);
        let options = EventsOptionsBuilder::new().filters(&filters).build();
        self.docker
            .events(Some(options))
            .filter_map(|m| async move {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => return Some(Err(classify(e))),
                };
                let kind = match m.action.as_deref() {
                    Some("start") => EventKind::Start,
                    Some("die") => EventKind::Die,
                    Some("destroy") => EventKind::Destroy,
                    _ => return None,
                };
                let actor = m.actor?;
                let mut labels: std::collections::BTreeMap<String, String> =
                    actor.attributes.unwrap_or_default().into_iter().collect();
                let name = labels.remove("name").unwrap_or_default();
                Some(Ok(ContainerEvent {
                    kind,
                    id: actor.id.unwrap_or_default(),
                    name,
                    labels,
                }))
            })
            .boxed()
    }
}
