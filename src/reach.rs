//! How a node is reached, as pure data: the hub's WebSocket offer that a
//! token carries, and the path a joined site's datagrams take. The
//! transports that act on it live in `transport`; this module touches no
//! socket, so tokens and state records can hold it.

use serde::{Deserialize, Serialize};

/// How a hub's WebSocket endpoint is reached, as a token carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WsTarget {
    /// TLS by the hub itself on `port` of the server's address, with a
    /// self-signed certificate whose SHA-256 is pinned.
    Pinned {
        port: u16,
        #[serde(with = "hex32")]
        sha256: [u8; 32],
    },
    /// Plain WebSocket on `port` of the server's address (a LAN, or a
    /// reverse proxy that adds TLS itself and is reached through `Url`).
    Plain { port: u16 },
    /// A URL in front of the hub, `ws[s]://host[:port]` (a TLS-terminating
    /// reverse proxy): TLS verified against the system's roots.
    Url { base: String },
}

/// A hub's WebSocket offer: where, and the secret path it answers on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WsOffer {
    pub target: WsTarget,
    /// Hard to guess, like the guide's Traefik path rule; every other path
    /// gets a 404.
    pub path: String,
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        super::unhex32(&s).ok_or_else(|| serde::de::Error::custom("not 64 hex digits"))
    }
}

/// What a hub's tokens offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub udp: bool,
    pub websocket: Option<WsOffer>,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            udp: true,
            websocket: None,
        }
    }
}

/// The path a joined site's datagrams take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "path", rename_all = "lowercase")]
pub enum Path {
    Udp,
    Websocket {
        offer: WsOffer,
        /// `http[s]://[user:pass@]host:port` of the proxy, when it goes through one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proxy: Option<String>,
        /// `--proxy-ca`, for an https:// proxy.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proxy_ca: Option<std::path::PathBuf>,
    },
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Udp => f.write_str("udp"),
            Path::Websocket { offer, proxy, .. } => {
                let scheme = match offer.target {
                    WsTarget::Plain { .. } => "ws",
                    WsTarget::Pinned { .. } => "wss",
                    WsTarget::Url { ref base } if base.starts_with("ws:") => "ws",
                    WsTarget::Url { .. } => "wss",
                };
                match proxy {
                    Some(p) => write!(f, "{scheme} via proxy {}", redact(p)),
                    None => write!(f, "{scheme} direct"),
                }
            }
        }
    }
}

/// A proxy URL without its password, for logs and status.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Lowercase hex, for certificate digests.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    unhex(s)?.try_into().ok()
}

/// Bytes from lowercase or uppercase hex; `None` for anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}
