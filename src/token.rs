//! Join tokens: pure encoding and decoding, no I/O.
//!
//! A token is `tun1_` followed by base64url (no padding) of a fixed binary
//! layout and a CRC-32 of it. The CRC catches copy-paste damage; it is not a
//! signature: what makes a token trustworthy is that only the server knows
//! which invite keys it issued, and it admits each one once.
//!
//! Layout of version 1 (all integers big-endian):
//! `flags:u8 | server_pub:32 | invite_priv:32 | port:u16 | prefix:u8 |
//!  subnet:A | assigned:A | server_addr:A | expires_unix:u64 |
//!  [prefix6:u8 subnet6:16] | [endpoint_len:u8 endpoint:utf8] | [websocket]
//!  | crc32:u32`, where `A` is 4 bytes (IPv4) or 16 (IPv6, flag bit 0),
//!  bit 1 says an endpoint hint follows, bit 2 that a WebSocket offer
//!  follows, bit 3 that the server takes no UDP, and bit 4 that the tunnel
//!  is dual-stack with that IPv6 subnet (addresses there are the twins of
//!  the IPv4 ones, [`crate::ipam::Subnets`]). The WebSocket offer is `kind:u8` then, for kind 1
//!  (TLS by the hub, pinned) `port:u16 sha256:32`, for kind 2 (plain)
//!  `port:u16`, for kind 3 (a URL in front of the hub) `len:u8 url:utf8`;
//!  then `path_len:u8 path:utf8`.

use crate::keys::{PrivateKey, PublicKey};
use crate::reach::{WsOffer, WsTarget};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ipnetwork::IpNetwork;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const PREFIX: &str = "tun";
pub const VERSION: u32 = 1;
const FLAG_V6: u8 = 1;
const FLAG_ENDPOINT: u8 = 2;
const FLAG_WS: u8 = 4;
const FLAG_NO_UDP: u8 = 8;
const FLAG_SUBNET6: u8 = 16;
const KNOWN_FLAGS: u8 = FLAG_V6 | FLAG_ENDPOINT | FLAG_WS | FLAG_NO_UDP | FLAG_SUBNET6;
const WS_PINNED: u8 = 1;
const WS_PLAIN: u8 = 2;
const WS_URL: u8 = 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "not a join token: a token starts with \"tun1_\" (copy the whole line `tunnel serve` printed)"
    )]
    NotAToken,
    #[error(
        "unsupported token version {0}: this tunnel understands version {VERSION}; upgrade tunnel on this host"
    )]
    UnsupportedVersion(u32),
    #[error("the token is truncated: {got} of {want} bytes; copy the whole line")]
    Truncated { got: usize, want: usize },
    #[error("the token is corrupted: {0}; copy it again from the server")]
    Corrupted(&'static str),
    #[error("the token is invalid: {0}")]
    Invalid(String),
    #[error("the token expired at {at} ({ago} ago); ask the server for a new one (`tunnel token`)")]
    Expired { at: String, ago: String },
}

/// Everything a joiner needs, and nothing about any other peer.
#[derive(Clone, PartialEq)]
pub struct Token {
    pub server_public_key: PublicKey,
    /// The single-use invite key. It admits its holder as `assigned` until redeemed.
    pub invite_key: PrivateKey,
    pub port: u16,
    pub subnet: IpNetwork,
    /// The IPv6 subnet of a dual-stack tunnel.
    pub subnet6: Option<IpNetwork>,
    pub assigned: IpAddr,
    pub server_address: IpAddr,
    /// Seconds since the Unix epoch.
    pub expires: u64,
    /// Where the server can be reached, as the server's operator saw it.
    pub endpoint_hint: Option<String>,
    /// Whether the server takes WireGuard over UDP.
    pub udp: bool,
    /// Where the server takes WireGuard over WebSocket, if it does.
    pub websocket: Option<WsOffer>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("server_public_key", &self.server_public_key)
            .field("invite_key", &self.invite_key)
            .field("port", &self.port)
            .field("subnet", &self.subnet)
            .field("subnet6", &self.subnet6)
            .field("assigned", &self.assigned)
            .field("server_address", &self.server_address)
            .field("expires", &self.expires)
            .field("endpoint_hint", &self.endpoint_hint)
            .field("udp", &self.udp)
            .field("websocket", &self.websocket)
            .finish()
    }
}

impl Token {
    /// `None` when the expiry is beyond what the clock can represent: only a
    /// forged token says so.
    pub fn expires_at(&self) -> Option<SystemTime> {
        UNIX_EPOCH.checked_add(Duration::from_secs(self.expires))
    }

    pub fn subnets(&self) -> crate::ipam::Subnets {
        crate::ipam::Subnets {
            main: self.subnet,
            v6: self.subnet6,
        }
    }

    /// The token's address with the subnet's prefix, as configured on the joiner.
    pub fn assigned_network(&self) -> IpNetwork {
        IpNetwork::new(self.assigned, self.subnet.prefix()).expect("prefix checked on decode")
    }

    /// Refuses an expired token, and one that claims to stay valid longer
    /// than any server mints (a forgery: the CRC is not a MAC).
    pub fn check_expiry(&self, now: SystemTime) -> Result<(), TokenError> {
        let latest = now
            .checked_add(crate::limits::MAX_TOKEN_TTL + Duration::from_secs(24 * 3600))
            .unwrap_or(now);
        let at = match self.expires_at() {
            Some(at) if at <= latest => at,
            _ => {
                return Err(TokenError::Invalid(format!(
                    "it claims to stay valid until {} s after 1970, beyond the longest TTL a server grants ({})",
                    self.expires,
                    humantime::format_duration(crate::limits::MAX_TOKEN_TTL)
                )));
            }
        };
        match now.duration_since(at) {
            Ok(ago) => Err(TokenError::Expired {
                at: humantime::format_rfc3339_seconds(at).to_string(),
                ago: humantime::format_duration(Duration::from_secs(ago.as_secs())).to_string(),
            }),
            Err(_) => Ok(()),
        }
    }

    pub fn encode(&self) -> String {
        let mut b = zeroize::Zeroizing::new(Vec::with_capacity(160));
        b.push(self.flags());
        b.extend_from_slice(self.server_public_key.as_bytes());
        b.extend_from_slice(self.invite_key.to_bytes().as_ref());
        b.extend_from_slice(&self.port.to_be_bytes());
        b.push(self.subnet.prefix());
        for a in [self.subnet.network(), self.assigned, self.server_address] {
            push_addr(&mut b, a);
        }
        b.extend_from_slice(&self.expires.to_be_bytes());
        if let Some(s6) = self.subnet6 {
            b.push(s6.prefix());
            push_addr(&mut b, s6.network());
        }
        if let Some(hint) = &self.endpoint_hint {
            push_str(&mut b, hint);
        }
        if let Some(ws) = &self.websocket {
            push_websocket(&mut b, ws);
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        format!("{PREFIX}{VERSION}_{}", URL_SAFE_NO_PAD.encode(b.as_slice()))
    }

    /// The flags byte: the address family and which optional parts follow.
    fn flags(&self) -> u8 {
        let mut flags = if self.subnet.is_ipv6() { FLAG_V6 } else { 0 };
        if self.endpoint_hint.is_some() {
            flags |= FLAG_ENDPOINT;
        }
        if self.websocket.is_some() {
            flags |= FLAG_WS;
        }
        if !self.udp {
            flags |= FLAG_NO_UDP;
        }
        if self.subnet6.is_some() {
            flags |= FLAG_SUBNET6;
        }
        flags
    }

    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let raw = unwrap_text(text)?;
        let want = layout_len(&raw)?;
        if raw.len() > want {
            return Err(TokenError::Corrupted("it is longer than its contents say"));
        }
        let (payload, crc) = raw.split_at(want - 4);
        if crc32fast::hash(payload) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
            return Err(TokenError::Corrupted("the checksum does not match"));
        }
        let flags = payload[0];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(TokenError::Invalid(format!("unknown flags {flags:#04x}")));
        }
        let token = read(payload)?;
        token.check()?;
        Ok(token)
    }

    /// What no server mints, beyond what [`read`] refuses: addresses
    /// outside the subnet or equal, subnets that do not pair, port 0.
    fn check(&self) -> Result<(), TokenError> {
        let subnet = self.subnet;
        for (what, a) in [("assigned", self.assigned), ("server", self.server_address)] {
            if !subnet.contains(a) {
                return Err(TokenError::Invalid(format!(
                    "{what} address {a} is outside {subnet}"
                )));
            }
        }
        crate::ipam::Subnets::new(subnet, self.subnet6)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        if self.assigned == self.server_address {
            return Err(TokenError::Invalid(
                "assigned address equals the server's".into(),
            ));
        }
        if self.port == 0 {
            return Err(TokenError::Invalid("port 0".into()));
        }
        Ok(())
    }
}

/// The binary token inside `text`: the prefix and version checked, the
/// base64url decoded.
fn unwrap_text(text: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, TokenError> {
    let text = text.trim();
    let rest = text.strip_prefix(PREFIX).ok_or(TokenError::NotAToken)?;
    let (version, body) = rest.split_once('_').ok_or(TokenError::NotAToken)?;
    if version.is_empty() || !version.bytes().all(|c| c.is_ascii_digit()) {
        return Err(TokenError::NotAToken);
    }
    let version: u32 = version
        .parse()
        .map_err(|_| TokenError::UnsupportedVersion(u32::MAX))?;
    if version != VERSION {
        return Err(TokenError::UnsupportedVersion(version));
    }
    Ok(zeroize::Zeroizing::new(
        match URL_SAFE_NO_PAD.decode(body) {
            Ok(raw) => raw,
            Err(base64::DecodeError::InvalidByte(..)) => {
                return Err(TokenError::Corrupted(
                    "it holds characters that are not base64url",
                ));
            }
            // A cut at an odd place leaves a partial last group: decode the
            // whole groups, and the length checks report the truncation.
            Err(_) => URL_SAFE_NO_PAD
                .decode(&body[..body.len() - body.len() % 4])
                .map_err(|_| TokenError::Corrupted("it is not valid base64url"))?,
        },
    ))
}

/// The fields of `payload` (the token without its CRC), whose layout
/// [`layout_len`] checked: every read is in bounds.
fn read(payload: &[u8]) -> Result<Token, TokenError> {
    let flags = payload[0];
    let alen = if flags & FLAG_V6 != 0 { 16 } else { 4 };
    let mut r = Reader {
        buf: payload,
        pos: 1,
    };
    let server_public_key = PublicKey(r.take::<32>());
    let invite_key = PrivateKey::from_bytes(r.take::<32>());
    let port = u16::from_be_bytes(r.take::<2>());
    let prefix = r.take::<1>()[0];
    let network = r.addr(alen);
    let assigned = r.addr(alen);
    let server_address = r.addr(alen);
    let expires = u64::from_be_bytes(r.take::<8>());
    let subnet6 = if flags & FLAG_SUBNET6 != 0 {
        let prefix6 = r.take::<1>()[0];
        let network6 = r.addr(16);
        Some(network_of(network6, prefix6, "IPv6 prefix")?)
    } else {
        None
    };
    let endpoint_hint = if flags & FLAG_ENDPOINT != 0 {
        Some(r.text("endpoint hint")?)
    } else {
        None
    };
    let websocket = if flags & FLAG_WS != 0 {
        Some(read_websocket(&mut r)?)
    } else {
        None
    };
    let udp = flags & FLAG_NO_UDP == 0;
    if !udp && websocket.is_none() {
        return Err(TokenError::Invalid("it offers no transport".into()));
    }
    let subnet = network_of(network, prefix, "prefix")?;
    if subnet.network() != network {
        return Err(TokenError::Invalid(format!(
            "{subnet} is not a network address"
        )));
    }
    Ok(Token {
        server_public_key,
        invite_key,
        port,
        subnet,
        subnet6,
        assigned,
        server_address,
        expires,
        endpoint_hint,
        udp,
        websocket,
    })
}

/// `address/prefix`, or what is wrong with the prefix.
fn network_of(address: IpAddr, prefix: u8, what: &str) -> Result<IpNetwork, TokenError> {
    IpNetwork::new(address, prefix)
        .map_err(|_| TokenError::Invalid(format!("{what} /{prefix} is out of range")))
}

/// The WebSocket offer: its target, then a path a URL can hold.
fn read_websocket(r: &mut Reader<'_>) -> Result<WsOffer, TokenError> {
    let target = match r.take::<1>()[0] {
        WS_PINNED => WsTarget::Pinned {
            port: u16::from_be_bytes(r.take::<2>()),
            sha256: r.take::<32>(),
        },
        WS_PLAIN => WsTarget::Plain {
            port: u16::from_be_bytes(r.take::<2>()),
        },
        _ => WsTarget::Url {
            base: r.text("WebSocket URL")?,
        },
    };
    let path = r.text("WebSocket path")?;
    if !path.starts_with('/') || path.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(TokenError::Invalid(format!("WebSocket path {path:?}")));
    }
    if let WsTarget::Pinned { port: 0, .. } | WsTarget::Plain { port: 0 } = target {
        return Err(TokenError::Invalid("WebSocket port 0".into()));
    }
    Ok(WsOffer { target, path })
}

fn push_websocket(b: &mut Vec<u8>, ws: &WsOffer) {
    match &ws.target {
        WsTarget::Pinned { port, sha256 } => {
            b.push(WS_PINNED);
            b.extend_from_slice(&port.to_be_bytes());
            b.extend_from_slice(sha256);
        }
        WsTarget::Plain { port } => {
            b.push(WS_PLAIN);
            b.extend_from_slice(&port.to_be_bytes());
        }
        WsTarget::Url { base } => {
            b.push(WS_URL);
            push_str(b, base);
        }
    }
    push_str(b, &ws.path);
}

/// A length-prefixed string: at most 255 bytes.
fn push_str(b: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let len = bytes.len().min(255);
    b.push(len as u8);
    b.extend_from_slice(&bytes[..len]);
}

/// The whole token's length, CRC included, as its contents say; reports
/// a truncation as soon as a length field or a field is missing.
fn layout_len(raw: &[u8]) -> Result<usize, TokenError> {
    let need = |want: usize| {
        if raw.len() < want {
            Err(TokenError::Truncated {
                got: raw.len(),
                want,
            })
        } else {
            Ok(())
        }
    };
    need(1)?;
    let flags = raw[0];
    let alen = if flags & FLAG_V6 != 0 { 16 } else { 4 };
    let mut at = 1 + 32 + 32 + 2 + 1 + 3 * alen + 8;
    if flags & FLAG_SUBNET6 != 0 {
        at += 1 + 16;
    }
    // A length byte at `at`, then that many bytes.
    let string = |at: &mut usize| -> Result<(), TokenError> {
        need(*at + 1 + 4)?;
        *at += 1 + raw[*at] as usize;
        Ok(())
    };
    if flags & FLAG_ENDPOINT != 0 {
        string(&mut at)?;
    }
    if flags & FLAG_WS != 0 {
        need(at + 1 + 4)?;
        let kind = raw[at];
        at += 1;
        match kind {
            WS_PINNED => at += 2 + 32,
            WS_PLAIN => at += 2,
            WS_URL => string(&mut at)?,
            _ => {
                need(at + 4)?;
                return Err(TokenError::Invalid(format!(
                    "unknown WebSocket kind {kind}"
                )));
            }
        }
        string(&mut at)?;
    }
    need(at + 4)?;
    Ok(at + 4)
}

fn push_addr(b: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => b.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => b.extend_from_slice(&a.octets()),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn text(&mut self, what: &str) -> Result<String, TokenError> {
        let len = self.take::<1>()[0] as usize;
        let s = std::str::from_utf8(&self.buf[self.pos..self.pos + len])
            .map_err(|_| TokenError::Invalid(format!("{what} is not UTF-8")))?;
        self.pos += len;
        Ok(s.to_owned())
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let out = self.buf[self.pos..self.pos + N]
            .try_into()
            .expect("length checked");
        self.pos += N;
        out
    }

    fn addr(&mut self, len: usize) -> IpAddr {
        if len == 4 {
            IpAddr::V4(Ipv4Addr::from(self.take::<4>()))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.take::<16>()))
        }
    }
}

#[cfg(test)]
mod tests;
