//! The plugin socket: where the Docker engine finds the driver, and how
//! a request tells which process sent it (the engine's pid, whose network
//! namespace a joining endpoint's link goes into).

use super::{Driver, DriverError, PLUGIN_DIR};
use crate::docker::ContainerRuntime;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The plugin's socket for `name`.
pub fn socket_path(name: &str) -> PathBuf {
    Path::new(PLUGIN_DIR).join(format!("{name}.sock"))
}

/// Where a plugin request comes from: the Docker engine's pid, from the
/// socket's peer credentials.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub pid: Option<u32>,
}

impl crate::control::server::Source for Peer {
    fn ip(&self) -> Option<IpAddr> {
        None
    }
}

/// A unix listener that tells each connection's peer process.
pub struct PeerListener(tokio::net::UnixListener);

impl axum::serve::Listener for PeerListener {
    type Io = tokio::net::UnixStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((s, _)) => {
                    let pid = s
                        .peer_cred()
                        .ok()
                        .and_then(|c| c.pid())
                        .and_then(|p| u32::try_from(p).ok());
                    return (s, Peer { pid });
                }
                Err(e) => {
                    tracing::debug!("plugin socket: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer { pid: None })
    }
}

/// Binds the plugin socket (0600): a live one means another process
/// serves that name; a dead one is a crash's leftover and is replaced.
pub fn bind(name: &str) -> Result<(PeerListener, PathBuf), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(name);
    let err = |source| DriverError::Socket {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(PLUGIN_DIR).map_err(err)?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(DriverError::InUse(path));
        }
        std::fs::remove_file(&path).map_err(err)?;
    }
    let listener = tokio::net::UnixListener::bind(&path).map_err(err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok((PeerListener(listener), path))
}

/// Serves `driver` as plugin `name` until `shutdown`, and names its
/// endpoints after their containers from `runtime`'s events; the socket is
/// removed after.
pub fn start(
    name: &str,
    driver: &Arc<Driver>,
    runtime: Arc<dyn ContainerRuntime>,
    shutdown: &mut crate::shutdown::Shutdown,
) -> Result<tokio::task::JoinHandle<()>, DriverError> {
    let (listener, path) = bind(name)?;
    tracing::info!(
        "Docker network driver {name} on {}: docker network create -d {name} --ipam-driver {name} NET",
        path.display()
    );
    let router = driver.router();
    let stop = shutdown.waiter();
    let served = tokio::spawn(async move {
        crate::control::server::serve(listener, router, crate::control::server::LOCAL, stop).await;
        let _ = std::fs::remove_file(&path);
    });
    tokio::spawn(
        driver
            .clone()
            .follow(runtime, name.to_owned(), shutdown.waiter()),
    );
    Ok(served)
}
