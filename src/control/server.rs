//! Serving an axum router with bounds, so that no client can exhaust the
//! process: at most [`Limits::max_connections`] at once (further ones wait
//! in the kernel's backlog, holding none of our descriptors), at most
//! [`Limits::per_source`] from one address (further ones are closed at
//! once), a deadline for the request headers and one for the whole
//! connection, and a cap on body sizes.
//!
//! The tunnel API's socket is also bound to the tunnel interface
//! ([`bind_on_device`]): a connection that arrives on any other interface
//! (a LAN neighbour routing the tunnel address via the hub, a container on
//! the hub host) never reaches it.

use axum::Router;
use axum::extract::ConnectInfo;
use axum::extract::DefaultBodyLimit;
use axum::serve::Listener;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::ServiceExt;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub per_source: usize,
    /// From accept to the end of the request headers.
    pub header_timeout: Duration,
    /// From accept to the connection's end, whatever it does.
    pub connection_timeout: Duration,
    pub max_body: usize,
}

/// The tunnel API: small signed JSON requests from peers.
pub const TUNNEL: Limits = Limits {
    max_connections: 256,
    per_source: 16,
    header_timeout: Duration::from_secs(5),
    connection_timeout: Duration::from_secs(20),
    max_body: 16 * 1024,
};

/// The local socket: root on this host, status of up to hundreds of peers.
pub const LOCAL: Limits = Limits {
    max_connections: 32,
    per_source: 32,
    header_timeout: Duration::from_secs(5),
    connection_timeout: Duration::from_secs(60),
    max_body: 16 * 1024,
};

/// Where a connection comes from, for the per-source bound.
pub trait Source: Clone + Send + Sync + 'static {
    fn ip(&self) -> Option<IpAddr>;
}

impl Source for SocketAddr {
    fn ip(&self) -> Option<IpAddr> {
        Some(match SocketAddr::ip(self) {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        })
    }
}

impl Source for tokio::net::unix::SocketAddr {
    fn ip(&self) -> Option<IpAddr> {
        None
    }
}

/// Counts open connections per source; a slot is given back on drop.
#[derive(Default, Clone)]
struct PerSource(Arc<Mutex<HashMap<IpAddr, usize>>>);

struct Slot(PerSource, IpAddr);

impl PerSource {
    fn take(&self, ip: IpAddr, max: usize) -> Option<Slot> {
        let mut m = self.0.lock().expect("per-source lock");
        let n = m.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), ip))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.0.0.lock().expect("per-source lock");
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Who a source address counts as for [`Limits::per_source`].
pub type Owner = Arc<dyn Fn(IpAddr) -> IpAddr + Send + Sync>;

/// Serves `app` on `listener` within `limits` until `shutdown` completes.
/// Handlers see the peer's address as `ConnectInfo<L::Addr>`.
pub async fn serve<L>(
    listener: L,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) where
    L: Listener,
    L::Addr: Source,
{
    serve_owned(listener, app, limits, Arc::new(|ip| ip), shutdown).await
}

/// [`serve`], counting each source against the peer that `owner` says
/// carries it: the addresses of a site's LAN all count as that site, so a
/// site cannot open [`Limits::per_source`] connections from each of them.
pub async fn serve_owned<L>(
    mut listener: L,
    app: Router,
    limits: Limits,
    owner: Owner,
    shutdown: impl Future<Output = ()> + Send,
) where
    L: Listener,
    L::Addr: Source,
{
    let app = app.layer(DefaultBodyLimit::max(limits.max_body));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let per_source = PerSource::default();
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => p.expect("never closed"),
        };
        let (io, addr) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        while conns.try_join_next().is_some() {}
        let slot = match addr.ip().map(|ip| owner(ip)) {
            Some(ip) => match per_source.take(ip, limits.per_source) {
                Some(s) => Some(s),
                None => {
                    tracing::debug!(
                        "closing a connection from {ip}: it has {} open",
                        limits.per_source
                    );
                    continue;
                }
            },
            None => None,
        };
        let app = app.clone();
        conns.spawn(async move {
            let _held = (permit, slot);
            let svc = app.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(addr.clone()));
                req
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false)
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
            match tokio::time::timeout(limits.connection_timeout, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("control connection: {e}"),
                Err(_) => tracing::debug!(
                    "control connection closed after {:?}",
                    limits.connection_timeout
                ),
            }
        });
    }
    // Requests are short: give the ones in flight a moment, then stop.
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(1), drain)
        .await
        .is_err()
    {
        conns.shutdown().await;
    }
}

/// A TCP listener on `addr` that only sees connections arriving on
/// interface `iface` (SO_BINDTODEVICE).
pub fn bind_on_device(addr: SocketAddr, iface: &str) -> std::io::Result<tokio::net::TcpListener> {
    use nix::sys::socket::{setsockopt, sockopt::BindToDevice};
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    setsockopt(&socket, BindToDevice, &std::ffi::OsString::from(iface))
        .map_err(std::io::Error::from)?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_source_slots_are_bounded_and_given_back() {
        let p = PerSource::default();
        let ip: IpAddr = "10.77.0.2".parse().unwrap();
        let a = p.take(ip, 2).unwrap();
        let _b = p.take(ip, 2).unwrap();
        assert!(p.take(ip, 2).is_none());
        assert!(
            p.take("10.77.0.3".parse().unwrap(), 2).is_some(),
            "other sources are not affected"
        );
        drop(a);
        assert!(p.take(ip, 2).is_some());
    }

    #[test]
    fn mapped_ipv4_sources_count_as_ipv4() {
        let a: SocketAddr = "[::ffff:10.77.0.2]:5".parse().unwrap();
        assert_eq!(Source::ip(&a), Some("10.77.0.2".parse().unwrap()));
    }
}
