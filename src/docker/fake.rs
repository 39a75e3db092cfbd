//! An in-memory [`ContainerRuntime`] for unit tests.

use super::{ContainerEvent, ContainerInfo, ContainerRuntime, DockerError};
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use std::sync::Mutex;
use tokio::sync::broadcast;

pub struct FakeRuntime {
    containers: Mutex<Vec<ContainerInfo>>,
    /// Labels by container name.
    pub labels:
        Mutex<std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>>,
    down: Mutex<bool>,
    events: broadcast::Sender<ContainerEvent>,
    /// What `driver_networks` reports, for any driver.
    pub networks: Mutex<Vec<super::DriverNetwork>>,
    /// The containers `start` was asked to start.
    pub started: Mutex<Vec<String>>,
}

impl Default for FakeRuntime {
    fn default() -> Self {
        Self {
            containers: Mutex::default(),
            labels: Mutex::default(),
            down: Mutex::default(),
            events: broadcast::channel(64).0,
            networks: Mutex::default(),
            started: Mutex::default(),
        }
    }
}

impl FakeRuntime {
    pub fn set(&self, info: ContainerInfo) {
        let mut c = self.containers.lock().unwrap();
        c.retain(|x| x.id != info.id && x.name != info.name);
        c.push(info);
    }

    pub fn remove(&self, name: &str) {
        self.containers.lock().unwrap().retain(|x| x.name != name);
    }

    pub fn emit(&self, event: ContainerEvent) {
        let _ = self.events.send(event);
    }

    /// Waits until someone follows the event stream.
    pub async fn until_subscribed(&self) {
        while self.events.receiver_count() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Makes every call fail as if the engine were stopped.
    pub fn down(&self) {
        *self.down.lock().unwrap() = true;
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn inspect(&self, reference: &str) -> Result<Option<ContainerInfo>, DockerError> {
        if *self.down.lock().unwrap() {
            return Err(DockerError::Unavailable("fake engine is down".into()));
        }
        Ok(self
            .containers
            .lock()
            .unwrap()
            .iter()
            .find(|c| {
                c.name == reference
                    || c.id == reference
                    || (reference.len() >= 4 && c.id.starts_with(reference))
            })
            .cloned())
    }

    fn events(&self) -> BoxStream<'static, Result<ContainerEvent, DockerError>> {
        tokio_stream_like(self.events.subscribe())
    }

    async fn by_endpoint(&self, _ids: &[String]) -> Result<Vec<(String, String)>, DockerError> {
        Ok(vec![])
    }

    async fn driver_networks(
        &self,
        _driver: &str,
    ) -> Result<Vec<super::DriverNetwork>, DockerError> {
        if *self.down.lock().unwrap() {
            return Err(DockerError::Unavailable("fake engine is down".into()));
        }
        Ok(self.networks.lock().unwrap().clone())
    }

    async fn start(&self, id: &str) -> Result<(), DockerError> {
        self.started.lock().unwrap().push(id.to_owned());
        Ok(())
    }

    async fn labelled(&self, label: &super::Label) -> Result<Vec<String>, DockerError> {
        let labels = self.labels.lock().unwrap();
        Ok(self
            .containers
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.pid.is_some())
            .filter(|c| labels.get(&c.name).is_some_and(|l| label.matches(l)))
            .map(|c| c.name.clone())
            .collect())
    }
}

fn tokio_stream_like(
    rx: broadcast::Receiver<ContainerEvent>,
) -> BoxStream<'static, Result<ContainerEvent, DockerError>> {
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => return Some((Ok(e), rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .boxed()
}
