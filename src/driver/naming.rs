//! Docker tells a network driver nothing about containers: an endpoint
//! is renamed after its container once that starts, from the engine's
//! events (and, at start, from what runs already), for DNS.

use super::Driver;
use crate::docker::ContainerRuntime;
use futures::StreamExt;
use std::sync::Arc;

impl Driver {
    /// Names each new endpoint after its container once it starts (Docker
    /// does not tell drivers), until `stop`.
    pub async fn follow(
        self: Arc<Self>,
        runtime: Arc<dyn ContainerRuntime>,
        plugin: String,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        tokio::select! {
            _ = &mut stop => return,
            _ = self.resume(runtime.as_ref(), &plugin) => {}
        }
        let mut lans = self.routes.clone();
        loop {
            let mut events = runtime.events();
            self.name_all(runtime.as_ref()).await;
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    ev = events.next() => match ev {
                        Some(Ok(ev)) if ev.kind == crate::docker::EventKind::Start => {
                            self.name_from(runtime.as_ref(), &ev.id).await;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!("Docker events: {e}; retrying");
                            break;
                        }
                        None => break,
                    },
                    Ok(()) = lans.changed() => {
                        let now = lans.borrow_and_update().clone();
                        self.set_lans(&now).await;
                    }
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }

    async fn name_all(&self, runtime: &dyn ContainerRuntime) {
        let unnamed: Vec<String> = {
            let book = self.book.lock().await;
            book.endpoints
                .iter()
                .filter(|(_, e)| !e.named && e.device.is_some())
                .map(|(id, _)| id.clone())
                .collect()
        };
        if unnamed.is_empty() {
            return;
        }
        if let Ok(names) = runtime.by_endpoint(&unnamed).await {
            for (endpoint, name) in names {
                let pid = match runtime.inspect(&name).await {
                    Ok(Some(info)) => info.pid,
                    _ => None,
                };
                self.rename(&endpoint, &name, pid).await;
            }
        }
    }

    async fn name_from(&self, runtime: &dyn ContainerRuntime, container: &str) {
        let Ok(Some(info)) = runtime.inspect(container).await else {
            return;
        };
        for endpoint in &info.endpoint_ids {
            self.rename(endpoint, &info.name, info.pid).await;
        }
    }

    /// Names the endpoint after its container (`pid`, while it runs).
    async fn rename(&self, endpoint: &str, name: &str, pid: Option<u32>) {
        let spec = {
            let book = self.book.lock().await;
            match book.endpoints.get(endpoint) {
                Some(e) if !e.named => e.spec.clone(),
                _ => return,
            }
        };
        match self.endpoints.rename(&spec, name).await {
            Ok(()) => {
                tracing::info!(
                    "container {name} is on the tunnel network as {}",
                    spec.address
                );
                let mut book = self.book.lock().await;
                if let Some(e) = book.endpoints.get_mut(endpoint) {
                    e.named = true;
                    e.spec.container = name.to_owned();
                    e.pid = e.pid.or(pid);
                }
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
}
