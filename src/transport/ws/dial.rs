//! A site's link to its hub's WebSocket: [`Dialer`] (tokio-tungstenite,
//! directly or through a CONNECT proxy, with TLS pinned or against the
//! system's roots) and [`Link`], which keeps it up.

use super::pump::{MAX_MESSAGE, pump};
use crate::transport::proxy::Proxy;
use crate::transport::tls::Trust;
use crate::transport::{HUB_LINK, Relay, TransportError, WsOffer, WsTarget, virtual_addr};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Sites ping this often, so that proxies see an active connection.
const PING_EVERY: Duration = Duration::from_secs(15);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Stream_ = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// A connected WebSocket to the hub, not yet carrying datagrams.
pub struct Connection {
    ws: Stream_,
    remote: Option<SocketAddr>,
}

/// How a site reaches its hub's WebSocket.
pub struct Dialer {
    host: String,
    port: u16,
    path: String,
    tls: Option<Trust>,
    proxy: Option<Proxy>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dialer({}, {:?})", self.shown(), self.proxy)
    }
}

impl Dialer {
    /// For `offer`, on the server at `server_host` (pinned and plain
    /// targets are on the server's own address).
    pub fn new(
        offer: &WsOffer,
        server_host: &str,
        proxy: Option<Proxy>,
    ) -> Result<Self, TransportError> {
        let (host, port, tls) = match &offer.target {
            WsTarget::Pinned { port, sha256 } => {
                (server_host.to_owned(), *port, Some(Trust::pinned(*sha256)))
            }
            WsTarget::Plain { port } => (server_host.to_owned(), *port, None),
            WsTarget::Url { base } => {
                let bad = |why: &str| TransportError::BadUrl {
                    what: "WebSocket",
                    url: base.clone(),
                    why: why.to_owned(),
                };
                let u = url::Url::parse(base).map_err(|e| bad(&e.to_string()))?;
                let tls = match u.scheme() {
                    "wss" => Some(Trust::Roots),
                    "ws" => None,
                    _ => return Err(bad("the scheme is not ws or wss")),
                };
                let host = u.host_str().ok_or_else(|| bad("no host"))?;
                let port =
                    u.port_or_known_default()
                        .unwrap_or(if tls.is_some() { 443 } else { 80 });
                (
                    host.trim_matches(|c| c == '[' || c == ']').to_owned(),
                    port,
                    tls,
                )
            }
        };
        Ok(Self {
            host,
            port,
            path: offer.path.clone(),
            tls,
            proxy,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn proxy(&self) -> Option<&Proxy> {
        self.proxy.as_ref()
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}{}", self.port, self.path)
    }

    /// The URL with its secret path segment left out, for messages and
    /// logs: the secret is in every token and must not be in a log.
    pub fn shown(&self) -> String {
        let url = self.url();
        let path = self.path.trim_end_matches('/');
        match path.rfind('/') {
            Some(i) if i + 1 < path.len() => {
                format!("{}{}/…", &url[..url.len() - self.path.len()], &path[..i])
            }
            _ => url,
        }
    }

    /// One connection attempt, bounded by `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<Connection, TransportError> {
        let target = self.shown();
        tokio::time::timeout(timeout, self.connect_inner())
            .await
            .map_err(|_| TransportError::Timeout(target))?
    }

    async fn connect_inner(&self) -> Result<Connection, TransportError> {
        let target = self.url();
        let shown = self.shown();
        let (io, remote): (Box<dyn Io>, Option<SocketAddr>) = match &self.proxy {
            Some(p) => (Box::new(p.connect(&self.host, self.port).await?), None),
            None => {
                let tcp = TcpStream::connect((self.host.as_str(), self.port))
                    .await
                    .map_err(|source| TransportError::Connect {
                        target: shown.clone(),
                        source,
                    })?;
                let _ = tcp.set_nodelay(true);
                let remote = tcp.peer_addr().ok();
                (Box::new(tcp), remote)
            }
        };
        let io: Box<dyn Io> = match &self.tls {
            Some(trust) => {
                let name =
                    rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
                        TransportError::BadUrl {
                            what: "WebSocket",
                            url: shown.clone(),
                            why: e.to_string(),
                        }
                    })?;
                let stream = trust
                    .connector()?
                    .connect(name, io)
                    .await
                    .map_err(|source| {
                        trust.mismatch().unwrap_or(TransportError::Tls {
                            target: shown.clone(),
                            source,
                        })
                    })?;
                Box::new(stream)
            }
            None => io,
        };
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(target.as_str(), io, Some(config))
                .await
                .map_err(|e| TransportError::Upgrade {
                    target: shown.clone(),
                    source: Box::new(e),
                })?;
        Ok(Connection { ws, remote })
    }
}

/// A site's link to its hub, kept up until dropped: reconnects with
/// jittered backoff when the connection drops (a proxy restart, an idle
/// timeout); WireGuard's own retransmission covers the gap.
pub struct Link {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link {
    /// Starts the link, with `first` as its first connection if the
    /// caller already made one.
    pub fn spawn(dialer: Arc<Dialer>, relay: Arc<Relay>, first: Option<Connection>) -> Self {
        let task = tokio::spawn(async move {
            let addr = virtual_addr(HUB_LINK);
            let mut next = first;
            let mut backoff = Duration::from_millis(100);
            let mut failing = false;
            loop {
                let conn = match next.take() {
                    Some(c) => Ok(c),
                    None => dialer.connect(Duration::from_secs(10)).await,
                };
                match conn {
                    Ok(Connection { ws, remote }) => {
                        if failing {
                            tracing::info!("WebSocket link to {} is back", dialer.shown());
                        }
                        backoff = Duration::from_millis(100);
                        let outbound = relay.open_at(addr, remote);
                        pump(ws, &relay, addr, outbound, Some(PING_EVERY), None).await;
                        relay.close(&addr);
                        tracing::warn!(
                            "WebSocket link to {} dropped; reconnecting",
                            dialer.shown()
                        );
                        failing = true;
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!("WebSocket link to {}: {e}; retrying", dialer.shown());
                            failing = true;
                        } else {
                            tracing::debug!("WebSocket link to {}: {e}", dialer.shown());
                        }
                        let jitter = rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 100;
                        tokio::time::sleep(backoff + Duration::from_millis(u64::from(jitter)))
                            .await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        Link { task }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialer(target: WsTarget, path: &str) -> Result<Dialer, TransportError> {
        let offer = WsOffer {
            target,
            path: path.into(),
        };
        Dialer::new(&offer, "203.0.113.5", None)
    }

    fn url(base: &str) -> Result<Dialer, TransportError> {
        dialer(WsTarget::Url { base: base.into() }, "/t/Zq0xVbN3")
    }

    #[test]
    fn a_url_target_takes_its_host_and_the_schemes_default_port() {
        let d = url("wss://vpn.example.org").unwrap();
        assert_eq!(d.host(), "vpn.example.org");
        assert_eq!(d.url(), "wss://vpn.example.org:443/t/Zq0xVbN3");
        assert!(d.tls.is_some());
        let d = url("ws://vpn.example.org").unwrap();
        assert_eq!(d.url(), "ws://vpn.example.org:80/t/Zq0xVbN3");
        assert!(d.tls.is_none());
        let d = url("wss://vpn.example.org:8443/ignored").unwrap();
        assert_eq!(d.url(), "wss://vpn.example.org:8443/t/Zq0xVbN3");
    }

    #[test]
    fn an_ipv6_host_is_bare_for_connecting_and_bracketed_in_the_url() {
        let d = url("wss://[2001:db8::7]:9443").unwrap();
        assert_eq!(d.host(), "2001:db8::7");
        assert_eq!(d.url(), "wss://[2001:db8::7]:9443/t/Zq0xVbN3");
        let d = Dialer::new(
            &WsOffer {
                target: WsTarget::Plain { port: 8080 },
                path: "/p/q".into(),
            },
            "2001:db8::1",
            None,
        )
        .unwrap();
        assert_eq!(d.url(), "ws://[2001:db8::1]:8080/p/q");
    }

    #[test]
    fn pinned_and_plain_targets_are_on_the_servers_own_address() {
        let d = dialer(
            WsTarget::Pinned {
                port: 443,
                sha256: [1; 32],
            },
            "/t/x",
        )
        .unwrap();
        assert_eq!(d.url(), "wss://203.0.113.5:443/t/x");
        let d = dialer(WsTarget::Plain { port: 80 }, "/t/x").unwrap();
        assert_eq!(d.url(), "ws://203.0.113.5:80/t/x");
        assert!(d.proxy().is_none());
    }

    #[test]
    fn a_url_that_is_not_a_websocket_url_is_refused_with_the_reason() {
        for (base, why) in [
            ("https://vpn.example.org", "not ws or wss"),
            ("vpn.example.org", "relative URL"),
            ("wss://", "host"),
        ] {
            let e = url(base).unwrap_err();
            assert!(
                matches!(&e, TransportError::BadUrl { url, .. } if url == base),
                "{base}: {e:?}"
            );
            assert!(e.to_string().contains(why), "{base}: {e}");
        }
    }

    #[test]
    fn the_shown_url_leaves_out_the_last_path_segment_only() {
        let shown = |path: &str| dialer(WsTarget::Plain { port: 80 }, path).unwrap().shown();
        assert_eq!(shown("/t/secret"), "ws://203.0.113.5:80/t/…");
        assert_eq!(shown("/t/secret/"), "ws://203.0.113.5:80/t/…");
        assert_eq!(shown("/secret"), "ws://203.0.113.5:80/…");
        // Nothing to hide.
        assert_eq!(shown("/"), "ws://203.0.113.5:80/");
        let d = dialer(WsTarget::Plain { port: 80 }, "/t/secret").unwrap();
        assert!(!format!("{d:?}").contains("secret"), "{d:?}");
    }
}
