//! The Docker API through bollard. bollard types stay in this file.
//!
//! Honours `DOCKER_HOST` and negotiates the API version, so older engines
//! (20.10 here) work with a newer client library.

use super::{ContainerEvent, ContainerInfo, ContainerRuntime, DockerError, EventKind, Label};
use async_trait::async_trait;
use bollard::Docker;
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
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

impl Bollard {
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
            Ok(c) => {
                let state = c.state.unwrap_or_default();
                let pid = match (state.running, state.pid) {
                    (Some(true), Some(pid)) if pid > 0 => Some(pid as u32),
                    _ => None,
                };
                Ok(Some(ContainerInfo {
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
                        .collect(),
                }))
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(classify(e)),
        }
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
