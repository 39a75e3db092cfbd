//! WebSocket links: the hub's listener (axum over hyper, with or without
//! TLS) and a site's link to it (tokio-tungstenite, directly or through a
//! CONNECT proxy). Each binary message carries one WireGuard datagram.
//!
//! The hub's listener is bounded, so that links cannot exhaust its
//! descriptors or memory (see [`Limits`]): a connection holds its place
//! in the total and in its source's count for its whole life, upgraded or
//! not; it has [`Limits::handshake`] to become a WebSocket; a link is
//! pinged and closed when nothing comes back.
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
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as TMessage;
use tower::ServiceExt;

/// A WireGuard datagram is at most 64 KiB; nothing larger is a datagram.
const MAX_MESSAGE: usize = 1 << 16;
/// Sites ping this often, so that proxies see an active connection.
const PING_EVERY: Duration = Duration::from_secs(15);
/// Connections the hub's listener serves at once, at most.
const MAX_CONNECTIONS: usize = 4096;
/// A hub link's read buffer. tungstenite's default (128 KiB) is resident
/// from the first read on, and made a link cost about 150 KB, idle or not;
/// 16 KiB still takes a dozen full-size datagrams per read.
const HUB_READ_BUFFER: usize = 16 * 1024;
/// Requests for other paths are summed up in one log line this often.
const WRONG_PATHS_EVERY: Duration = Duration::from_secs(60);

/// The bounds of the hub's WebSocket listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections at once, upgraded or not; further ones wait in the
    /// kernel's backlog, holding none of our descriptors.
    pub total: usize,
    /// Connections at once from one address (an IPv6 /64 counts as one
    /// address); further ones are closed at once, so that one host
    /// cannot take the places of all others.
    pub per_source: usize,
    /// The same from a loopback address: a reverse proxy on this host
    /// (`--public-url`) makes every link come from there.
    pub per_loopback: usize,
    /// From accept to the upgrade (TLS, the request, the answer).
    pub handshake: Duration,
    /// The hub pings each link this often...
    pub ping_every: Duration,
    /// ...and closes one that sent nothing, not even a pong, for this long.
    pub idle: Duration,
}

impl Limits {
    /// For this process. The total leaves half the descriptors to the
    /// rest of the hub (tunnels, control connections, state files): with
    /// the 1,024 that services get when nothing raised the limit, 512.
    ///
    /// 128 per address: a site opens one link, and one for each of its
    /// containers, at most 1 + 64 (`--endpoints-per-site`'s default), so
    /// two full sites fit behind one NAT address, while one address holds
    /// at most 1/32 of 4,096 places. Loopback gets the total: a reverse proxy
    /// on this host carries every site's links. A proxy on another
    /// address gets 128 like any other address.
    ///
    /// Idle: sites ping every 15 s and answer the hub's pings, so 60 s of
    /// silence is a dead link or a client that only holds a place.
    pub fn hub() -> Self {
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX))
            .unwrap_or(1024);
        let total = (nofile / 2).clamp(64, MAX_CONNECTIONS);
        Limits {
            total,
            per_source: 128,
            per_loopback: total,
            handshake: Duration::from_secs(10),
            ping_every: Duration::from_secs(20),
            idle: Duration::from_secs(60),
        }
    }
}

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
/// side ends; `ping` makes this side ping; `idle` ends the link when
/// nothing at all (data, ping, pong) came for that long.
async fn pump<M, S, E>(
    ws: S,
    relay: &Relay,
    addr: SocketAddr,
    mut outbound: mpsc::Receiver<Bytes>,
    ping: Option<Duration>,
    idle: Option<Duration>,
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
    // A flag rather than a timer reset per message: a busy link costs a
    // store per datagram, and the watchdog wakes four times per `idle`.
    let heard = AtomicBool::new(false);
    let reader = async {
        while let Some(msg) = stream.next().await {
            heard.store(true, Ordering::Relaxed);
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
    // Closes a link that has been silent for four checks in a row, so
    // after `idle` to 1.25 x `idle` of silence.
    let watchdog = async {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        let mut quiet = 0;
        loop {
            tokio::time::sleep(idle / 4).await;
            if heard.swap(false, Ordering::Relaxed) {
                quiet = 0;
            } else {
                quiet += 1;
                if quiet == 4 {
                    tracing::debug!("WebSocket link {addr}: nothing heard for {idle:?}; closing");
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
        _ = watchdog => {}
    }
}

// ---- the hub's listener -------------------------------------------------

#[derive(Clone)]
struct Hub {
    relay: Arc<Relay>,
    limits: Limits,
    wrong: Arc<WrongPaths>,
}

/// A connection's places in the total and in its source's count; given
/// back when dropped.
struct Admission {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _slot: Slot,
}

/// Hands a connection's [`Admission`] to the handler, so that an upgraded
/// link keeps it for its whole life: hyper ends the connection's task
/// when it hands the socket over, and a link that gave its places back
/// then would be bounded by nothing.
#[derive(Clone)]
struct Pass(Arc<Mutex<Option<Admission>>>);

impl Pass {
    fn take(&self) -> Option<Admission> {
        self.0.lock().expect("pass lock").take()
    }
}

/// Open connections per source; a [`Slot`] is given back on drop.
#[derive(Default, Clone)]
struct Sources(Arc<Mutex<HashMap<IpAddr, usize>>>);

struct Slot(Sources, IpAddr);

impl Sources {
    /// A place for a connection from `peer`, unless its source is full.
    fn take(&self, peer: IpAddr, limits: &Limits) -> Option<Slot> {
        let (key, max) = source(peer, limits);
        let mut m = self.0.lock().expect("sources lock");
        let n = m.entry(key).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), key))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.0.0.lock().expect("sources lock");
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// What `peer` counts as, and its cap: an IPv4-mapped address is its
/// IPv4 address; an IPv6 address its /64, which one host often holds whole.
fn source(peer: IpAddr, limits: &Limits) -> (IpAddr, usize) {
    let ip = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    };
    if ip.is_loopback() {
        return (ip, limits.per_loopback);
    }
    let key = match ip {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    };
    (key, limits.per_source)
}

/// Requests for other paths. Anything on a public port is scanned, so
/// one line at most per `every`: the first request in full, the rest as
/// a count. The tunnel's secret never appears in a line, not even inside
/// a requested path.
struct WrongPaths {
    secret: String,
    every: Duration,
    state: Mutex<WrongState>,
}

#[derive(Default)]
struct WrongState {
    last_line: Option<Instant>,
    unlogged: u64,
}

impl WrongPaths {
    fn new(path: &str, every: Duration) -> Self {
        WrongPaths {
            secret: path.rsplit('/').next().unwrap_or_default().to_owned(),
            every,
            state: Mutex::default(),
        }
    }

    /// The line to log for a request for `path` from `peer` at `now`, if
    /// one is due.
    fn note(&self, peer: SocketAddr, path: &str, now: Instant) -> Option<String> {
        let mut st = self.state.lock().expect("wrong paths lock");
        if st
            .last_line
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            st.unlogged += 1;
            return None;
        }
        st.last_line = Some(now);
        let more = std::mem::take(&mut st.unlogged);
        let mut shown = if self.secret.is_empty() {
            path.to_owned()
        } else {
            path.replace(&self.secret, "…")
        };
        if let Some((cut, _)) = shown.char_indices().nth(64) {
            shown.truncate(cut);
            shown.push('…');
        }
        Some(format!(
            "WebSocket listener: {peer} asked for {shown:?}, which is not the tunnel's path{}",
            if more > 0 {
                format!(" ({more} more such requests since the last line)")
            } else {
                String::new()
            }
        ))
    }

    /// The count of requests not logged yet, if a line is due at `now`.
    fn summary(&self, now: Instant) -> Option<String> {
        let mut st = self.state.lock().expect("wrong paths lock");
        if st.unlogged == 0
            || st
                .last_line
                .is_some_and(|t| now.duration_since(t) < self.every)
        {
            return None;
        }
        st.last_line = Some(now);
        let more = std::mem::take(&mut st.unlogged);
        Some(format!(
            "WebSocket listener: {more} more requests for paths which are not the tunnel's path"
        ))
    }
}

async fn upgrade(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    axum::Extension(pass): axum::Extension<Pass>,
    ws: WebSocketUpgrade,
) -> impl IntoResponse {
    let admission = pass.take();
    let limits = hub.limits;
    ws.max_message_size(MAX_MESSAGE)
        .read_buffer_size(HUB_READ_BUFFER)
        .on_upgrade(move |socket: WebSocket| async move {
            let _admission = admission;
            let (addr, outbound) = hub.relay.open(Some(peer));
            tracing::debug!("WebSocket link from {peer} as {addr}");
            pump(
                socket,
                &hub.relay,
                addr,
                outbound,
                Some(limits.ping_every),
                Some(limits.idle),
            )
            .await;
            hub.relay.close(&addr);
            tracing::debug!("WebSocket link from {peer} closed");
        })
}

async fn not_found(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: axum::http::Uri,
) -> impl IntoResponse {
    if let Some(line) = hub.wrong.note(peer, uri.path(), Instant::now()) {
        tracing::info!("{line}");
    }
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

/// Serves WebSocket links on `path` until `shutdown`, within
/// [`Limits::hub`]: TLS first when `tls` is given; any other path gets a
/// 404.
pub async fn serve(
    listener: TcpListener,
    relay: Arc<Relay>,
    path: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    serve_within(listener, relay, path, tls, Limits::hub(), shutdown).await
}

/// [`serve`] within `limits`.
pub async fn serve_within(
    listener: TcpListener,
    relay: Arc<Relay>,
    path: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    tracing::debug!("WebSocket listener: {limits:?}");
    let wrong = Arc::new(WrongPaths::new(&path, WRONG_PATHS_EVERY));
    let app = Router::new()
        .route(&path, get(upgrade))
        .fallback(not_found)
        .with_state(Hub {
            relay,
            limits,
            wrong: wrong.clone(),
        });
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.total));
    let sources = Sources::default();
    let mut conns = tokio::task::JoinSet::new();
    conns.spawn(async move {
        loop {
            tokio::time::sleep(WRONG_PATHS_EVERY / 4).await;
            if let Some(line) = wrong.summary(Instant::now()) {
                tracing::info!("{line}");
            }
        }
    });
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
        let Some(slot) = sources.take(peer.ip(), &limits) else {
            tracing::debug!(
                "WebSocket listener: closing a connection from {peer}: its address has all its places"
            );
            continue;
        };
        let pass = Pass(Arc::new(Mutex::new(Some(Admission {
            _permit: permit,
            _slot: slot,
        }))));
        let _ = tcp.set_nodelay(true);
        let (app, tls) = (app.clone(), tls.clone());
        conns.spawn(async move {
            let held = pass.clone();
            let svc = app.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(held.clone());
                req
            });
            let http = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.handshake)
                .to_owned();
            // The connection's future ends when hyper hands an upgraded
            // socket over, so this bounds everything before the upgrade
            // (requests kept alive included) and nothing after it.
            let handshake = async {
                match tls {
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(stream) => {
                            http.serve_connection(
                                TokioIo::new(stream),
                                TowerToHyperService::new(svc),
                            )
                            .with_upgrades()
                            .await
                        }
                        Err(e) => {
                            tracing::debug!("TLS from {peer}: {e}");
                            Ok(())
                        }
                    },
                    None => {
                        http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(svc))
                            .with_upgrades()
                            .await
                    }
                }
            };
            match tokio::time::timeout(limits.handshake, handshake).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("WebSocket connection from {peer}: {e}"),
                Err(_) => tracing::debug!(
                    "WebSocket connection from {peer}: no upgrade within {:?}",
                    limits.handshake
                ),
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
    use std::time::Instant;

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
        assert_eq!(dialer.shown(), format!("ws://127.0.0.1:{port}/t/…"));
        assert!(!format!("{dialer:?}").contains("secret"));
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

    /// Bounds that no test reaches unless it means to.
    fn roomy() -> Limits {
        Limits {
            total: 64,
            per_source: 64,
            per_loopback: 64,
            handshake: Duration::from_secs(5),
            ping_every: Duration::from_secs(3600),
            idle: Duration::from_secs(3600),
        }
    }

    const PATH: &str = "/t/secret";

    /// A listener on 127.0.0.1 within `limits`; its port and relay.
    async fn hub(limits: Limits) -> (u16, Arc<Relay>) {
        let relay = Relay::new("ws");
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve_within(
            listener,
            relay.clone(),
            PATH.into(),
            None,
            limits,
            std::future::pending(),
        ));
        (port, relay)
    }

    /// A TCP connection from loopback address `from` that has sent an
    /// upgrade request for `path`.
    async fn ask(from: &str, port: u16, path: &str) -> TcpStream {
        use tokio::io::AsyncWriteExt;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut tcp = socket
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        // The hub may have closed a refused connection already.
        let _ = tcp.write_all(request.as_bytes()).await;
        tcp
    }

    /// The answer's status line; an error when the hub closed first.
    async fn answer(tcp: &mut TcpStream) -> std::io::Result<String> {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if tcp.read(&mut b).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        Ok(head.lines().next().unwrap_or_default().to_owned())
    }

    /// A WebSocket made by hand that never answers a ping and sends
    /// nothing, or the error that refused it.
    async fn idle_link(from: &str, port: u16) -> std::io::Result<TcpStream> {
        let mut tcp = ask(from, port, PATH).await;
        let status = answer(&mut tcp).await?;
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        Ok(tcp)
    }

    /// Reads until the hub closes `tcp`, at most `within`; what came and
    /// when the end came, or `None` if it stayed open.
    async fn until_closed(tcp: &mut TcpStream, within: Duration) -> Option<(Vec<u8>, Duration)> {
        use tokio::io::AsyncReadExt;
        let start = Instant::now();
        let mut got = Vec::new();
        let read = async {
            let mut buf = [0u8; 1024];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(within, read).await.ok()?;
        Some((got, start.elapsed()))
    }

    async fn links_become(relay: &Relay, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while relay.links() != n {
            assert!(
                Instant::now() < deadline,
                "{} links, not {n}, after 2 s",
                relay.links()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn the_per_source_cap_refuses_one_address_and_not_another() {
        let (port, relay) = hub(Limits {
            per_loopback: 2,
            ..roomy()
        })
        .await;
        let first = idle_link("127.0.0.1", port).await.unwrap();
        let _second = idle_link("127.0.0.1", port).await.unwrap();
        let third = idle_link("127.0.0.1", port).await;
        assert!(third.is_err(), "a third link from one address got in");
        let _other = idle_link("127.0.0.2", port)
            .await
            .expect("another address is not affected");
        links_become(&relay, 3).await;
        // A closed link gives its place back.
        drop(first);
        links_become(&relay, 2).await;
        let _again = idle_link("127.0.0.1", port)
            .await
            .expect("the place of a closed link is free again");
    }

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64_and_loopback_has_its_own_cap() {
        let limits = Limits {
            per_source: 3,
            per_loopback: 9,
            ..roomy()
        };
        let at = |s: &str| source(s.parse().unwrap(), &limits);
        assert_eq!(at("2001:db8::1").0, at("2001:db8::ffff:1").0);
        assert_ne!(at("2001:db8::1").0, at("2001:db8:0:1::1").0);
        assert_eq!(at("::ffff:192.0.2.7"), at("192.0.2.7"));
        assert_eq!(at("192.0.2.7").1, 3);
        assert_eq!(at("2001:db8::1").1, 3);
        assert_eq!(at("127.0.0.1").1, 9);
        assert_eq!(at("::1").1, 9);
        assert_eq!(at("::ffff:127.0.0.1").1, 9);
    }

    #[tokio::test]
    async fn an_idle_link_is_pinged_and_then_closed() {
        let idle = Duration::from_millis(400);
        let (port, relay) = hub(Limits {
            ping_every: Duration::from_millis(100),
            idle,
            ..roomy()
        })
        .await;
        let start = Instant::now();
        let mut tcp = idle_link("127.0.0.1", port).await.unwrap();
        links_become(&relay, 1).await;
        let (got, _) = until_closed(&mut tcp, Duration::from_secs(2))
            .await
            .expect("an idle link is still open after 2 s");
        let after = start.elapsed();
        assert!(
            after >= idle * 3 / 4,
            "closed after {after:?}, before it was idle"
        );
        // A ping with an empty payload, unmasked from the server.
        assert!(
            got.windows(2).any(|w| w == [0x89, 0x00]),
            "the hub never pinged: {got:?}"
        );
        links_become(&relay, 0).await;
    }

    #[tokio::test]
    async fn a_link_that_answers_pings_or_carries_data_stays() {
        let idle = Duration::from_millis(400);
        let (port, relay) = hub(Limits {
            ping_every: Duration::from_millis(100),
            idle,
            ..roomy()
        })
        .await;
        let mut device = relay.attach();
        let url = format!("ws://127.0.0.1:{port}{PATH}");
        // One reads all the time, and so answers the hub's pings, but
        // sends nothing of its own.
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (answering, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
            .await
            .unwrap();
        let reader = tokio::spawn(async move {
            let mut answering = answering;
            while let Some(Ok(_)) = answering.next().await {}
        });
        // The other sends data and never reads, so it never pongs.
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut sending, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
            .await
            .unwrap();
        links_become(&relay, 2).await;
        let start = Instant::now();
        while start.elapsed() < idle * 3 {
            sending
                .send(TMessage::Binary(Bytes::from_static(b"data")))
                .await
                .expect("the sending link was closed");
            let (data, _) = device.recv().await.unwrap();
            assert_eq!(data.as_ref(), b"data");
            tokio::time::sleep(idle / 8).await;
        }
        assert!(!reader.is_finished(), "the answering link was closed");
        assert_eq!(relay.links(), 2);
    }

    #[tokio::test]
    async fn an_upgraded_link_keeps_its_place_until_it_closes() {
        let (port, relay) = hub(Limits {
            total: 2,
            ..roomy()
        })
        .await;
        let first = idle_link("127.0.0.1", port).await.unwrap();
        let _second = idle_link("127.0.0.2", port).await.unwrap();
        links_become(&relay, 2).await;
        // The listener is full: a third waits, unanswered.
        let mut third = ask("127.0.0.3", port, PATH).await;
        let waited = tokio::time::timeout(Duration::from_millis(500), answer(&mut third)).await;
        assert!(waited.is_err(), "a third link got an answer: {waited:?}");
        // A link that ends gives its place to the one waiting.
        drop(first);
        let status = tokio::time::timeout(Duration::from_secs(2), answer(&mut third))
            .await
            .expect("the waiting link got no place when one closed")
            .unwrap();
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        links_become(&relay, 2).await;
    }

    #[tokio::test]
    async fn a_connection_that_does_not_upgrade_in_time_is_closed_and_gives_its_place_back() {
        let (port, _relay) = hub(Limits {
            per_loopback: 1,
            handshake: Duration::from_millis(300),
            ..roomy()
        })
        .await;
        // Silent from the start: it holds the address's one place...
        let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            idle_link("127.0.0.1", port).await.is_err(),
            "the address had a second place"
        );
        // ...until the hub closes it.
        until_closed(&mut silent, Duration::from_secs(2))
            .await
            .expect("a silent connection is still open after 2 s");
        // Half a request, then nothing: the same.
        let mut half = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut half, b"GET /t/secret HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        until_closed(&mut half, Duration::from_secs(2))
            .await
            .expect("a half request is still open after 2 s");
        // A 404, then the connection kept alive and unused: the same.
        let mut wrong = ask("127.0.0.1", port, "/t/guess").await;
        let status = answer(&mut wrong).await.unwrap();
        assert!(status.starts_with("HTTP/1.1 404"), "{status}");
        until_closed(&mut wrong, Duration::from_secs(2))
            .await
            .expect("a kept-alive connection is still open after 2 s");
        let _link = idle_link("127.0.0.1", port)
            .await
            .expect("the place was not given back");
    }

    #[test]
    fn wrong_paths_are_summed_up_and_never_show_the_secret() {
        let secret = "Zq0xVbN3kLmP7rT2wYc9Ea";
        let w = WrongPaths::new(&format!("/tunnel/{secret}"), Duration::from_secs(60));
        let peer: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let first = w
            .note(peer, "/wp-login.php", t0)
            .expect("the first is logged");
        assert!(first.contains("192.0.2.7:4000") && first.contains("/wp-login.php"));
        assert!(first.contains("which is not the tunnel's path"), "{first}");
        // Within the minute: counted, not logged.
        for i in 1..=3 {
            assert_eq!(w.note(peer, "/x", t0 + s(i)), None);
        }
        assert_eq!(w.summary(t0 + s(30)), None);
        let sum = w.summary(t0 + s(61)).expect("the count is logged");
        assert!(sum.contains("3 more"), "{sum}");
        // The count started again; the next line is due a minute later.
        assert_eq!(w.note(peer, "/y", t0 + s(62)), None);
        assert_eq!(w.summary(t0 + s(100)), None);
        let near = format!("/tunnel/{secret}/");
        let line = w.note(peer, &near, t0 + s(122)).expect("due again");
        assert!(line.contains("1 more"), "{line}");
        assert!(!line.contains(secret), "{line}");
        assert!(line.contains("/tunnel/…/"), "{line}");
        assert_eq!(w.summary(t0 + s(200)), None, "nothing left to count");
        // A long path is cut.
        let long = w.note(peer, &"/a".repeat(500), t0 + s(300)).unwrap();
        assert!(long.len() < 300, "{long}");
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
