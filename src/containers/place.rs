//! How an endpoint gets into a container: the device made on the host,
//! where its UDP socket stays, and moved into the container's network
//! namespace; and the probe from inside that namespace that makes the
//! first handshake happen and shows that traffic flows.

use super::ContainerError;
use crate::net::{NetOps, Netlink};
use crate::wg::{self, BackendChoice, DeviceSpec, Placement, WgDevice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How an endpoint gets into a container, and is checked from inside it:
/// the OS-facing half of attaching, behind a trait so that the follower's
/// decisions are tested with a fake.
#[async_trait::async_trait]
pub trait Placer: Send + Sync {
    /// Creates the device on the host (where its UDP socket stays) and
    /// moves it into the network namespace of `pid`.
    async fn place(
        &self,
        spec: &DeviceSpec,
        container: &str,
        pid: u32,
    ) -> Result<Placed, ContainerError>;
    /// Connects to `target` from inside the namespace of `pid` until it
    /// answers or `timeout` passes; returns how long that took.
    async fn probe(
        &self,
        pid: u32,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<Duration, String>;
}

/// A device in a container, and netlink in the container's namespace.
pub struct Placed {
    pub device: Box<dyn WgDevice>,
    pub net: Arc<dyn NetOps>,
}

/// The real placer: devices made in this namespace with `backend`.
pub struct HostPlacer {
    pub host: Arc<dyn NetOps>,
    pub backend: BackendChoice,
}

impl HostPlacer {
    pub fn shared(host: Arc<dyn NetOps>, backend: BackendChoice) -> Arc<dyn Placer> {
        Arc::new(Self { host, backend })
    }
}

#[async_trait::async_trait]
impl Placer for HostPlacer {
    async fn place(
        &self,
        spec: &DeviceSpec,
        container: &str,
        pid: u32,
    ) -> Result<Placed, ContainerError> {
        let net: Arc<dyn NetOps> = Arc::new(Netlink::connect_in_netns(pid).map_err(|source| {
            ContainerError::Namespace {
                container: container.to_owned(),
                source,
            }
        })?);
        let placement = Placement {
            pid,
            net: net.clone(),
        };
        let device = wg::create(spec, self.backend, self.host.clone(), Some(placement))
            .await
            .map_err(|source| ContainerError::Attach {
                container: container.to_owned(),
                source,
            })?;
        Ok(Placed { device, net })
    }

    async fn probe(
        &self,
        pid: u32,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<Duration, String> {
        probe_from_netns(pid, target, timeout).await
    }
}

/// Connects to the hub's control API from inside the namespace of `pid`,
/// retrying until `timeout`. Runs on its own thread: entering a namespace
/// changes the calling thread, so it is never done on a tokio worker.
pub async fn probe_from_netns(
    pid: u32,
    target: SocketAddr,
    timeout: Duration,
) -> Result<Duration, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            use std::os::fd::AsFd;
            let path = format!("/proc/{pid}/ns/net");
            let ns = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("entering {path}: {e}"))?;
            let start = Instant::now();
            loop {
                match std::net::TcpStream::connect_timeout(&target, Duration::from_millis(100)) {
                    Ok(_) => return Ok(start.elapsed()),
                    Err(e) if start.elapsed() > timeout => {
                        return Err(format!("no answer from {target}: {e}"));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })();
        let _ = tx.send(result);
    });
    rx.await.map_err(|_| "probe thread died".to_owned())?
}
