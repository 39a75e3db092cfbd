//! WebSocket links: the hub's listener (axum over hyper, with or without
//! TLS) and a site's link to it (tokio-tungstenite, directly or through a
//! CONNECT proxy). Each binary message carries one WireGuard datagram.
//!
//! Writes are batched: whatever is queued when the writer wakes goes out
//! with one flush, so a burst costs one TLS record run and one syscall,
//! not one per datagram. Every TCP socket sets TCP_NODELAY (a proxy
//! otherwise adds a Nagle stall to the first packets).

use super::proxy::Proxy;
use super::tls::Trust;
use super::{HUB_LINK, Relay, TransportError, WsOffer, WsTarget, virtual_addr};
use axum::Router;
use axum::extract::ws::{Message as AxumMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as TMessage;
use tower::ServiceExt;

/// A WireGuard datagram is at most 64 KiB; nothing larger is a datagram.
const MAX_MESSAGE: usize = 1 << 16;
/// Sites ping this often, so that proxies see an active connection.
const PING_EVERY: Duration = Duration::from_secs(15);
/// Connections the hub's listener serves at once.
const MAX_CONNECTIONS: usize = 4096;

/// What a link's reader makes of a message.
enum Frame {
    Data(Bytes),
    Close,
    Other,
}

/// The two WebSocket libraries' messages, seen the same way.
trait WsMessage: Sized + Send {
    fn binary(b: Bytes) -> Self;
    fn ping() -> Self;
    fn frame(self) -> Frame;
}

impl WsMessage for AxumMessage {
    fn binary(b: Bytes) -> Self {
        AxumMessage::Binary(b)
    }
    fn ping() -> Self {
        AxumMessage::Ping(Bytes::new())
    }
    fn frame(self) -> Frame {
        match self {
            AxumMessage::Binary(b) => Frame::Data(b),
            AxumMessage::Close(_) => Frame::Close,
            _ => Frame::Other,
        }
    }
}

impl WsMessage for TMessage {
    fn binary(b: Bytes) -> Self {
        TMessage::Binary(b)
    }
    fn ping() -> Self {
        TMessage::Ping(Bytes::new())
    }
    fn frame(self) -> Frame {
        match self {
            TMessage::Binary(b) => Frame::Data(b),
            TMessage::Close(_) => Frame::Close,
            _ => Frame::Other,
        }
    }
}

/// Carries datagrams between one WebSocket and the relay until either
/// side ends; `ping` makes this side ping.
async fn pump<M, S, E>(
    ws: S,
    relay: &Relay,
    addr: SocketAddr,
    mut outbound: mpsc::Receiver<Bytes>,
    ping: Option<Duration>,
) where
    M: WsMessage,
    S: Stream<Item = Result<M, E>> + Sink<M> + Send,
    E: std::fmt::Display,
{
    let (mut sink, mut stream) = ws.split();
    let writer = async {
        let mut ticker = tokio::time::interval(ping.unwrap_or(Duration::from_secs(3600)));
        ticker.tick().await;
        loop {
            tokio::select! {
                first = outbound.recv() => {
                    let Some(first) = first else { return };
                    if sink.feed(M::binary(first)).await.is_err() {
                        return;
                    }
                    // Let a burst that is on its way join this write.
                    tokio::task::yield_now().await;
                    while let Ok(more) = outbound.try_recv() {
                        if sink.feed(M::binary(more)).await.is_err() {
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
                _ = ticker.tick(), if ping.is_some() => {
                    if sink.send(M::ping()).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let reader = async {
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(m) => match m.frame() {
                    Frame::Data(b) if b.len() <= MAX_MESSAGE => relay.deliver(addr, b),
                    Frame::Close => return,
                    _ => {}
                },
                Err(e) => {
                    tracing::debug!("WebSocket link {addr}: {e}");
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
}

// ---- the hub's listener -------------------------------------------------

#[derive(Clone)]
struct Hub {
    relay: Arc<Relay>,
}

async fn upgrade(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> impl IntoResponse {
    ws.max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket: WebSocket| async move {
            let (addr, outbound) = hub.relay.open(Some(peer));
            tracing::debug!("WebSocket link from {peer} as {addr}");
            pump(socket, &hub.relay, addr, outbound, None).await;
            hub.relay.close(&addr);
            tracing::debug!("WebSocket link from {peer} closed");
        })
}

async fn not_found(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: axum::http::Uri,
) -> impl IntoResponse {
    tracing::info!(
        "WebSocket listener: {peer} asked for {}, which is not the tunnel's path",
        uri.path()
    );
    (axum::http::StatusCode::NOT_FOUND, "not found\n")
}

/// Binds the hub's WebSocket listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, TransportError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| TransportError::Connect {
            target: format!("listening on {addr}"),
            source,
        })
}

/// Serves WebSocket links on `path` until `shutdown`: TLS first when
/// `tls` is given; any other path gets a 404.
pub async fn serve(
    listener: TcpListener,
    relay: Arc<Relay>,
    path: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let app = Router::new()
        .route(&path, get(upgrade))
        .fallback(not_found)
        .with_state(Hub { relay });
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => p.expect("never closed"),
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("WebSocket listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let _ = tcp.set_nodelay(true);
        let (app, tls) = (app.clone(), tls.clone());
        conns.spawn(async move {
            let _permit = permit;
            let svc = app.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            });
            let http = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .to_owned();
            let result = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(stream)) => {
                            http.serve_connection(
                                TokioIo::new(stream),
                                TowerToHyperService::new(svc),
                            )
                            .with_upgrades()
                            .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!("TLS from {peer}: {e}");
                            return;
                        }
                        Err(_) => return,
                    }
                }
                None => {
                    http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(svc))
                        .with_upgrades()
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!("WebSocket connection from {peer}: {e}");
            }
        });
    }
    conns.shutdown().await;
}

// ---- a site's link --------------------------------------------------------

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
        write!(f, "Dialer({}, {:?})", self.url(), self.proxy)
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

    /// One connection attempt, bounded by `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<Connection, TransportError> {
        let target = self.url();
        tokio::time::timeout(timeout, self.connect_inner())
            .await
            .map_err(|_| TransportError::Timeout(target))?
    }

    async fn connect_inner(&self) -> Result<Connection, TransportError> {
        let target = self.url();
        let (io, remote): (Box<dyn Io>, Option<SocketAddr>) = match &self.proxy {
            Some(p) => (Box::new(p.connect(&self.host, self.port).await?), None),
            None => {
                let tcp = TcpStream::connect((self.host.as_str(), self.port))
                    .await
                    .map_err(|source| TransportError::Connect {
                        target: target.clone(),
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
                            url: target.clone(),
                            why: e.to_string(),
                        }
                    })?;
                let stream = trust
                    .connector()?
                    .connect(name, io)
                    .await
                    .map_err(|source| {
                        trust.mismatch().unwrap_or(TransportError::Tls {
                            target: target.clone(),
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
                    target: target.clone(),
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
                            tracing::info!("WebSocket link to {} is back", dialer.url());
                        }
                        backoff = Duration::from_millis(100);
                        let outbound = relay.open_at(addr, remote);
                        pump(ws, &relay, addr, outbound, Some(PING_EVERY)).await;
                        relay.close(&addr);
                        tracing::warn!("WebSocket link to {} dropped; reconnecting", dialer.url());
                        failing = true;
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!("WebSocket link to {}: {e}; retrying", dialer.url());
                            failing = true;
                        } else {
                            tracing::debug!("WebSocket link to {}: {e}", dialer.url());
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

    #[tokio::test]
    async fn a_link_carries_datagrams_through_the_listener_and_wrong_paths_get_404() {
        let hub_relay = Relay::new("ws");
        let mut hub_device = hub_relay.attach();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            hub_relay.clone(),
            "/t/secret".into(),
            None,
            async {
                let _ = stopped.await;
            },
        ));

        let offer = WsOffer {
            target: WsTarget::Plain { port },
            path: "/t/secret".into(),
        };
        let site_relay = Relay::new("ws");
        let mut site_device = site_relay.attach();
        let dialer = Arc::new(Dialer::new(&offer, "127.0.0.1", None).unwrap());
        assert_eq!(dialer.url(), format!("ws://127.0.0.1:{port}/t/secret"));
        let _link = Link::spawn(dialer, site_relay.clone(), None);
        let hub_addr = virtual_addr(HUB_LINK);
        // The link is up once the site can send.
        let mut tries = 0;
        while !site_relay.send(&hub_addr, Bytes::from_static(b"hello hub")) {
            tries += 1;
            assert!(tries < 500, "the link never came up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (data, from) = hub_device.recv().await.unwrap();
        assert_eq!(data, Bytes::from_static(b"hello hub"));
        assert!(super::super::is_virtual(&from));
        assert!(hub_relay.send(&from, Bytes::from_static(b"hello site")));
        let (data, from_hub) = site_device.recv().await.unwrap();
        assert_eq!((data.as_ref(), from_hub), (&b"hello site"[..], hub_addr));

        // Any other path: a 404, never a WebSocket.
        let wrong = WsOffer {
            target: WsTarget::Plain { port },
            path: "/t/guess".into(),
        };
        let err = Dialer::new(&wrong, "127.0.0.1", None)
            .unwrap()
            .connect(Duration::from_secs(5))
            .await
            .err()
            .expect("a wrong path is refused");
        assert!(format!("{:?}", err).contains("404"), "{err:?}");
        stop.send(()).unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_pin_mismatch_is_reported_as_such() {
        let tmp = tempfile::tempdir().unwrap();
        let id = super::super::tls::Identity::load_or_create(
            &tmp.path().join("c.pem"),
            vec!["x".into()],
        )
        .unwrap();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = Relay::new("wss");
        let _server = tokio::spawn(serve(
            listener,
            relay,
            "/p".into(),
            Some(id.acceptor().unwrap()),
            std::future::pending(),
        ));
        let good = WsOffer {
            target: WsTarget::Pinned {
                port,
                sha256: id.fingerprint(),
            },
            path: "/p".into(),
        };
        assert!(
            Dialer::new(&good, "127.0.0.1", None)
                .unwrap()
                .connect(Duration::from_secs(5))
                .await
                .is_ok()
        );
        let bad = WsOffer {
            target: WsTarget::Pinned {
                port,
                sha256: [7; 32],
            },
            path: "/p".into(),
        };
        let err = Dialer::new(&bad, "127.0.0.1", None)
            .unwrap()
            .connect(Duration::from_secs(5))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, TransportError::PinMismatch { .. }), "{err}");
        assert!(err.is_input());
    }
}
