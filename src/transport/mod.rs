//! How WireGuard datagrams travel: UDP, or WebSocket messages (one
//! datagram per binary message) over TCP, with TLS, directly or through an
//! HTTP CONNECT proxy, for networks that pass nothing else (seed 000).
//!
//! The userspace device keeps its UDP socket and also carries WebSocket
//! peers, in-process: a [`Relay`] sits between the device and the
//! WebSocket links. Each link has a *virtual address* from the IPv6
//! discard prefix `100::/64` (RFC 6666), which no real peer ever has:
//! WireGuard learns it as the peer's endpoint from authenticated packets,
//! like any roaming address, and the device's sends to it go to the link.
//! So one device, one key and one set of peers serve UDP and WebSocket
//! peers at once, and a site that reconnects simply roams to its new link.
//!
//! - [`ws`]: the hub's WebSocket listener and a site's link, which
//!   reconnects with jittered backoff and pings so that idle proxies keep it.
//! - [`tls`]: the hub's self-signed certificate (pinned by the token) and
//!   the client configurations (pinned, or the system's roots).
//! - [`proxy`]: `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` and `--proxy`, and
//!   HTTP CONNECT with Basic auth.

pub mod pac;
pub mod proxy;
pub mod tls;
pub mod ws;

pub use crate::reach::{Offer, Path, WsOffer, WsTarget};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc;

/// Interface MTU over UDP on a 1500-byte IPv4 path.
pub const UDP_MTU: u32 = 1420;
/// Over a WebSocket: 1500 - 20 (IP) - 20 (TCP) - 20 (TLS) - 8 - 32 (WireGuard),
/// as seed 000 computes it, so a tunnelled packet never needs splitting
/// where a proxy or a middlebox re-packetizes the stream.
pub const WS_MTU: u32 = 1400;

/// Datagrams queued towards the device or one link before new ones are
/// dropped, as a full UDP socket buffer drops them.
const QUEUE: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0:?} is not a transport (use udp, wss or ws)")]
    Unknown(String),
    #[error("{what}: {url:?} is not a usable URL: {why}")]
    BadUrl {
        what: &'static str,
        url: String,
        why: String,
    },
    #[error("connecting to {target}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no connection to {0} within the time allowed")]
    Timeout(String),
    #[error("--proxy-pac {pac}: {why}")]
    Pac { pac: String, why: String },
    #[error("the proxy {proxy} refused CONNECT to {target}: {status}")]
    ProxyRefused {
        proxy: String,
        target: String,
        status: String,
    },
    #[error(
        "the server's TLS certificate does not match the token's pin (expected SHA-256 {expected}, got {got}): this is not the server that made the token, or something intercepts the connection"
    )]
    PinMismatch { expected: String, got: String },
    #[error("TLS with {target}")]
    Tls {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the WebSocket upgrade at {target} failed")]
    Upgrade {
        target: String,
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    #[error("{path}: the TLS certificate")]
    Certificate {
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl TransportError {
    /// The user's input is at fault (a URL, a token's pin), not the network.
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            TransportError::Unknown(_)
                | TransportError::BadUrl { .. }
                | TransportError::PinMismatch { .. }
        )
    }
}

/// What `--transport` asks for on `serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeTransports {
    pub udp: bool,
    /// WebSocket with TLS by the hub.
    pub wss: bool,
    /// Plain WebSocket (behind a TLS-terminating reverse proxy).
    pub ws: bool,
}

impl ServeTransports {
    pub fn parse(s: &str) -> Result<Self, TransportError> {
        let mut t = ServeTransports {
            udp: false,
            wss: false,
            ws: false,
        };
        for part in s.split(',').map(str::trim) {
            match part {
                "udp" => t.udp = true,
                "wss" => t.wss = true,
                "ws" => t.ws = true,
                other => return Err(TransportError::Unknown(other.to_owned())),
            }
        }
        if t.wss && t.ws {
            return Err(TransportError::Unknown(
                "wss and ws together (the WebSocket listener is either TLS or plain)".into(),
            ));
        }
        Ok(t)
    }

    pub fn websocket(&self) -> bool {
        self.wss || self.ws
    }
}

/// What `--transport` asks for on `join`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinTransport {
    /// UDP first; WebSocket direct, then through the proxy, if UDP gets no handshake.
    Auto,
    Udp,
    /// WebSocket (with TLS unless the token says plain).
    Wss,
}

/// The virtual address of link `n`: `[100::n]:1`, never a real peer's.
pub fn virtual_addr(n: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, n)), 1)
}

/// Whether `a` is a WebSocket link's virtual address.
pub fn is_virtual(a: &SocketAddr) -> bool {
    match a.ip() {
        IpAddr::V6(v6) => v6.segments()[..4] == [0x100, 0, 0, 0],
        IpAddr::V4(_) => false,
    }
}

/// A site's one link to its hub uses this address.
pub const HUB_LINK: u16 = 1;

struct Link {
    tx: mpsc::Sender<Bytes>,
    /// Who is at the other end of the TCP connection (a site, or a proxy).
    remote: Option<SocketAddr>,
}

/// Between a device and its WebSocket links: datagrams from links go to
/// the device (with the link's virtual address as source), and the
/// device's datagrams to a virtual address go to that link.
#[derive(Default)]
pub struct Relay {
    inbound: RwLock<Option<mpsc::Sender<(Bytes, SocketAddr)>>>,
    links: RwLock<HashMap<SocketAddr, Link>>,
    next: AtomicU16,
    dropped: std::sync::atomic::AtomicU64,
    /// What a link on this relay is, for status: "wss", "ws".
    kind: Mutex<&'static str>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Relay({}, {} links)", self.kind(), self.links())
    }
}

impl Relay {
    pub fn new(kind: &'static str) -> Arc<Self> {
        let r = Relay {
            next: AtomicU16::new(HUB_LINK + 1),
            ..Default::default()
        };
        *r.kind.lock().expect("kind lock") = kind;
        Arc::new(r)
    }

    pub fn kind(&self) -> &'static str {
        *self.kind.lock().expect("kind lock")
    }

    /// The device (re)binds: datagrams from links go to the returned
    /// receiver from now on.
    pub fn attach(&self) -> mpsc::Receiver<(Bytes, SocketAddr)> {
        let (tx, rx) = mpsc::channel(QUEUE);
        *self.inbound.write().expect("relay lock") = Some(tx);
        rx
    }

    /// A datagram from link `from`, to the device.
    pub fn deliver(&self, from: SocketAddr, data: Bytes) {
        let inbound = self.inbound.read().expect("relay lock");
        if let Some(tx) = inbound.as_ref()
            && tx.try_send((data, from)).is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A datagram from the device to link `to`; false when there is no
    /// such link now (the datagram is dropped, as UDP would drop it).
    pub fn send(&self, to: &SocketAddr, data: Bytes) -> bool {
        let links = self.links.read().expect("relay lock");
        match links.get(to) {
            Some(l) => {
                if l.tx.try_send(data).is_err() {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            None => false,
        }
    }

    /// A new link (a hub's accepted connection): its virtual address and
    /// the datagrams to write to it.
    pub fn open(&self, remote: Option<SocketAddr>) -> (SocketAddr, mpsc::Receiver<Bytes>) {
        let mut links = self.links.write().expect("relay lock");
        // Skip addresses still in use when the counter wraps.
        let addr = loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let a = virtual_addr(n.max(HUB_LINK + 1));
            if !links.contains_key(&a) {
                break a;
            }
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        links.insert(addr, Link { tx, remote });
        (addr, rx)
    }

    /// The link at a fixed address (a site's link to its hub), replacing
    /// the previous connection's.
    pub fn open_at(&self, addr: SocketAddr, remote: Option<SocketAddr>) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(QUEUE);
        self.links
            .write()
            .expect("relay lock")
            .insert(addr, Link { tx, remote });
        rx
    }

    pub fn close(&self, addr: &SocketAddr) {
        self.links.write().expect("relay lock").remove(addr);
    }

    /// The TCP peer behind a virtual address, for status.
    pub fn remote_of(&self, addr: &SocketAddr) -> Option<SocketAddr> {
        self.links
            .read()
            .expect("relay lock")
            .get(addr)
            .and_then(|l| l.remote)
    }

    pub fn links(&self) -> usize {
        self.links.read().expect("relay lock").len()
    }

    /// Datagrams dropped because a queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_addresses_are_never_real_ones() {
        assert!(is_virtual(&virtual_addr(7)));
        assert!(!is_virtual(&"10.0.0.1:5".parse().unwrap()));
        assert!(!is_virtual(&"[2001:db8::1]:5".parse().unwrap()));
        assert!(!is_virtual(&"[fd00::100]:5".parse().unwrap()));
    }

    #[tokio::test]
    async fn the_relay_carries_datagrams_both_ways_and_drops_for_missing_links() {
        let relay = Relay::new("wss");
        let mut device = relay.attach();
        let (a, mut to_a) = relay.open(Some("10.0.0.9:4000".parse().unwrap()));
        let (b, _to_b) = relay.open(None);
        assert_ne!(a, b);
        relay.deliver(a, Bytes::from_static(b"from a"));
        assert_eq!(
            device.recv().await.unwrap(),
            (Bytes::from_static(b"from a"), a)
        );
        assert!(relay.send(&a, Bytes::from_static(b"to a")));
        assert_eq!(to_a.recv().await.unwrap(), Bytes::from_static(b"to a"));
        assert_eq!(relay.remote_of(&a), Some("10.0.0.9:4000".parse().unwrap()));
        relay.close(&a);
        assert!(!relay.send(&a, Bytes::from_static(b"gone")));
        // A rebind replaces the device's receiver.
        let mut again = relay.attach();
        relay.deliver(b, Bytes::from_static(b"x"));
        assert_eq!(again.recv().await.unwrap().1, b);
        assert_eq!(device.try_recv().ok(), None);
    }

    #[test]
    fn serve_transports_parse() {
        let t = ServeTransports::parse("udp,wss").unwrap();
        assert!(t.udp && t.wss && !t.ws && t.websocket());
        assert!(ServeTransports::parse("tcp").is_err());
        assert!(ServeTransports::parse("ws,wss").is_err());
        assert!(!ServeTransports::parse("udp").unwrap().websocket());
    }
}
