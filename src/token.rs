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
//!  [endpoint_len:u8 endpoint:utf8] | crc32:u32`, where `A` is 4 bytes
//!  (IPv4) or 16 (IPv6, flag bit 0) and bit 1 says an endpoint hint follows.

use crate::keys::{PrivateKey, PublicKey};
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
const KNOWN_FLAGS: u8 = FLAG_V6 | FLAG_ENDPOINT;

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
    pub assigned: IpAddr,
    pub server_address: IpAddr,
    /// Seconds since the Unix epoch.
    pub expires: u64,
    /// Where the server can be reached, as the server's operator saw it.
    pub endpoint_hint: Option<String>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("server_public_key", &self.server_public_key)
            .field("invite_key", &self.invite_key)
            .field("port", &self.port)
            .field("subnet", &self.subnet)
            .field("assigned", &self.assigned)
            .field("server_address", &self.server_address)
            .field("expires", &self.expires)
            .field("endpoint_hint", &self.endpoint_hint)
            .finish()
    }
}

impl Token {
    /// `None` when the expiry is beyond what the clock can represent: only a
    /// forged token says so.
    pub fn expires_at(&self) -> Option<SystemTime> {
        UNIX_EPOCH.checked_add(Duration::from_secs(self.expires))
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
        let v6 = self.subnet.is_ipv6();
        let mut flags = if v6 { FLAG_V6 } else { 0 };
        if self.endpoint_hint.is_some() {
            flags |= FLAG_ENDPOINT;
        }
        let mut b = zeroize::Zeroizing::new(Vec::with_capacity(160));
        b.push(flags);
        b.extend_from_slice(self.server_public_key.as_bytes());
        b.extend_from_slice(self.invite_key.to_bytes().as_ref());
        b.extend_from_slice(&self.port.to_be_bytes());
        b.push(self.subnet.prefix());
        for a in [self.subnet.network(), self.assigned, self.server_address] {
            push_addr(&mut b, a);
        }
        b.extend_from_slice(&self.expires.to_be_bytes());
        if let Some(hint) = &self.endpoint_hint {
            let bytes = hint.as_bytes();
            let len = bytes.len().min(255);
            b.push(len as u8);
            b.extend_from_slice(&bytes[..len]);
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        format!("{PREFIX}{VERSION}_{}", URL_SAFE_NO_PAD.encode(b.as_slice()))
    }

    pub fn decode(text: &str) -> Result<Self, TokenError> {
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
        let raw = zeroize::Zeroizing::new(match URL_SAFE_NO_PAD.decode(body) {
            Ok(raw) => raw,
            Err(base64::DecodeError::InvalidByte(..)) => {
                return Err(TokenError::Corrupted(
                    "it holds characters that are not base64url",
                ));
            }
            // A cut at an odd place leaves a partial last group: decode the
            // whole groups, and the length checks below report the truncation.
            Err(_) => URL_SAFE_NO_PAD
                .decode(&body[..body.len() - body.len() % 4])
                .map_err(|_| TokenError::Corrupted("it is not valid base64url"))?,
        });
        let flags = *raw
            .first()
            .ok_or(TokenError::Truncated { got: 0, want: 1 })?;
        let alen = if flags & FLAG_V6 != 0 { 16 } else { 4 };
        let fixed = 1 + 32 + 32 + 2 + 1 + 3 * alen + 8;
        let mut want = fixed + 4 + usize::from(flags & FLAG_ENDPOINT != 0);
        if raw.len() < want {
            return Err(TokenError::Truncated {
                got: raw.len(),
                want,
            });
        }
        if flags & FLAG_ENDPOINT != 0 {
            want += raw[fixed] as usize;
        }
        if raw.len() < want {
            return Err(TokenError::Truncated {
                got: raw.len(),
                want,
            });
        }
        if raw.len() > want {
            return Err(TokenError::Corrupted("it is longer than its contents say"));
        }
        let (payload, crc) = raw.split_at(want - 4);
        if crc32fast::hash(payload) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
            return Err(TokenError::Corrupted("the checksum does not match"));
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(TokenError::Invalid(format!("unknown flags {flags:#04x}")));
        }

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
        let endpoint_hint = if flags & FLAG_ENDPOINT != 0 {
            let len = r.take::<1>()[0] as usize;
            let s = std::str::from_utf8(&r.buf[r.pos..r.pos + len])
                .map_err(|_| TokenError::Invalid("endpoint hint is not UTF-8".into()))?;
            Some(s.to_owned())
        } else {
            None
        };

        let subnet = IpNetwork::new(network, prefix)
            .map_err(|_| TokenError::Invalid(format!("prefix /{prefix} is out of range")))?;
        if subnet.network() != network {
            return Err(TokenError::Invalid(format!(
                "{subnet} is not a network address"
            )));
        }
        for (what, a) in [("assigned", assigned), ("server", server_address)] {
            if !subnet.contains(a) {
                return Err(TokenError::Invalid(format!(
                    "{what} address {a} is outside {subnet}"
                )));
            }
        }
        if assigned == server_address {
            return Err(TokenError::Invalid(
                "assigned address equals the server's".into(),
            ));
        }
        if port == 0 {
            return Err(TokenError::Invalid("port 0".into()));
        }
        Ok(Token {
            server_public_key,
            invite_key,
            port,
            subnet,
            assigned,
            server_address,
            expires,
            endpoint_hint,
        })
    }
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
mod tests {
    use super::*;

    fn sample(hint: Option<&str>) -> Token {
        Token {
            server_public_key: PrivateKey::generate().public_key(),
            invite_key: PrivateKey::generate(),
            port: 51820,
            subnet: "10.77.0.0/24".parse().unwrap(),
            assigned: "10.77.0.2".parse().unwrap(),
            server_address: "10.77.0.1".parse().unwrap(),
            expires: 2_000_000_000,
            endpoint_hint: hint.map(str::to_owned),
        }
    }

    #[test]
    fn round_trip_with_and_without_hint() {
        for hint in [None, Some("vpn.example.org:51820")] {
            let t = sample(hint);
            let s = t.encode();
            assert!(s.starts_with("tun1_"));
            assert!(
                s.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
            );
            assert_eq!(Token::decode(&s).unwrap(), t);
        }
    }

    #[test]
    fn round_trip_ipv6() {
        let mut t = sample(None);
        t.subnet = "fd00:77::/64".parse().unwrap();
        t.assigned = "fd00:77::2".parse().unwrap();
        t.server_address = "fd00:77::1".parse().unwrap();
        assert_eq!(Token::decode(&t.encode()).unwrap(), t);
    }

    #[test]
    fn compact() {
        assert!(
            sample(None).encode().len() < 150,
            "{}",
            sample(None).encode().len()
        );
    }

    #[test]
    fn debug_redacts_invite_key() {
        let t = sample(None);
        assert!(!format!("{t:?}").contains(t.invite_key.to_base64().as_str()));
    }

    #[test]
    fn truncated() {
        let s = sample(Some("host:1")).encode();
        for cut in 1..s.len() - "tun1_".len() {
            let err = Token::decode(&s[..s.len() - cut]).unwrap_err();
            assert!(
                matches!(err, TokenError::Truncated { .. }),
                "cut {cut}: {err:?}"
            );
        }
        assert!(matches!(
            Token::decode("tun1_"),
            Err(TokenError::Truncated { .. })
        ));
        assert!(matches!(
            Token::decode(&s[..40]),
            Err(TokenError::Truncated { .. })
        ));
    }

    #[test]
    fn every_flipped_character_is_caught() {
        let s = sample(None).encode();
        let body_start = "tun1_".len();
        for i in body_start..s.len() {
            let mut b = s.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let flipped = String::from_utf8(b).unwrap();
            if flipped == s {
                continue;
            }
            let err = Token::decode(&flipped).unwrap_err();
            assert!(
                matches!(err, TokenError::Corrupted(_) | TokenError::Truncated { .. }),
                "position {i}: {err:?}"
            );
        }
    }

    #[test]
    fn wrong_prefix_and_version() {
        let s = sample(None).encode();
        assert_eq!(
            Token::decode(&s.replacen("tun", "wg", 1)),
            Err(TokenError::NotAToken)
        );
        assert_eq!(Token::decode("hello"), Err(TokenError::NotAToken));
        assert_eq!(Token::decode(""), Err(TokenError::NotAToken));
        assert_eq!(
            Token::decode(&s.replacen("tun1_", "tun2_", 1)),
            Err(TokenError::UnsupportedVersion(2))
        );
        assert_eq!(
            Token::decode(&s.replacen("tun1_", "tunx_", 1)),
            Err(TokenError::NotAToken)
        );
    }

    #[test]
    fn whitespace_around_is_ignored() {
        let t = sample(None);
        assert_eq!(Token::decode(&format!("  {}\n", t.encode())).unwrap(), t);
    }

    #[test]
    fn expiry() {
        let t = sample(None);
        let before = UNIX_EPOCH + Duration::from_secs(1_999_999_999);
        let after = UNIX_EPOCH + Duration::from_secs(2_000_003_600);
        assert!(t.check_expiry(before).is_ok());
        let err = t.check_expiry(after).unwrap_err();
        assert!(
            matches!(&err, TokenError::Expired { ago, .. } if ago == "1h"),
            "{err:?}"
        );
        assert!(err.to_string().contains("2033-05-18T03:33:20Z"), "{err}");
    }

    #[test]
    fn a_forged_far_future_expiry_is_invalid_not_a_panic() {
        let now = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        for expires in [u64::MAX, u64::MAX / 2, 2_000_000_000 + 400 * 24 * 3600] {
            let mut t = sample(None);
            t.expires = expires;
            let t = Token::decode(&t.encode()).unwrap();
            assert!(
                matches!(t.check_expiry(now), Err(TokenError::Invalid(_))),
                "{expires}"
            );
        }
    }

    #[test]
    fn semantic_checks() {
        let mut t = sample(None);
        t.assigned = "10.78.0.2".parse().unwrap();
        assert!(matches!(
            Token::decode(&t.encode()),
            Err(TokenError::Invalid(_))
        ));
    }
}
