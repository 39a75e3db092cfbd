//! Proof that a request comes from the holder of a WireGuard static key.
//!
//! A source address is routing, not identity: any process on a site host
//! can connect from the site's tunnel address. So every request that
//! changes the hub carries a MAC keyed from the static-static X25519 secret
//! of the signer's key and the hub's key (`signer private × hub public`,
//! which the hub computes as `hub private × signer public`). Only someone
//! who can read the signer's private key (root on the site, or the holder
//! of a token's invite key) can make one. The MAC is keyed BLAKE2s, the
//! primitive WireGuard itself builds on, over the method, the path, the
//! body, a timestamp and a random nonce:
//!
//! ```text
//! k   = BLAKE2s-MAC(key = DH(signer, hub), "tunnel-control-v1" || signer_pub || hub_pub)
//! mac = BLAKE2s-MAC(key = k, method || 0 || path || 0 || ts_be64 || nonce || BLAKE2s(body))
//! Authorization: Tunnel key=<signer_pub b64>, ts=<unix secs>, nonce=<32 hex>, mac=<b64>
//! ```
//!
//! A request is refused when its timestamp is more than [`WINDOW`] from
//! the hub's clock, and when the same MAC was already seen within the
//! window ([`ReplayGuard`], which remembers each signer's proofs apart, so
//! that one key's flood refuses that key only). A client whose clock is
//! off learns the hub's time from the refusal and signs again ([`Skew`]).

use crate::keys::{PrivateKey, PublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use blake2::digest::{Digest, Mac};
use blake2::{Blake2s256, Blake2sMac256};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How far a request's timestamp may be from the hub's clock.
pub const WINDOW: Duration = Duration::from_secs(120);
/// Distinct signed requests remembered per signing key; more than this
/// many from one key in two windows is that key's flood, refused until its
/// old ones age out. A site signs a few requests a minute (registrations,
/// routes, leave; at most 64 endpoints), so 1,024 in 240 s leaves a wide
/// margin, and a hub with a /24 of flooding keys still holds only ~25 MB.
pub const REPLAY_PER_KEY: usize = 1_024;
const SCHEME: &str = "Tunnel";
const LABEL: &[u8] = b"tunnel-control-v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the request is not signed")]
    Missing,
    #[error("the request's signature header is malformed: {0}")]
    Malformed(&'static str),
    #[error("the signing key is not known to this hub")]
    UnknownKey,
    #[error("the signature does not match")]
    BadMac,
    #[error("the request's clock is {0} s away from the hub's; check the clocks")]
    Skew(i64),
    #[error("the request was already seen (a replay)")]
    Replay,
    #[error("too many signed requests; try again later")]
    Flood,
    #[error("that key cannot sign (a low-order X25519 point)")]
    WeakKey,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn mac_key(secret: &[u8; 32], signer: &PublicKey, hub: &PublicKey) -> zeroize::Zeroizing<[u8; 32]> {
    let mut m = <Blake2sMac256 as Mac>::new_from_slice(secret).expect("32-byte key");
    m.update(LABEL);
    m.update(signer.as_bytes());
    m.update(hub.as_bytes());
    zeroize::Zeroizing::new(m.finalize().into_bytes().into())
}

fn request_mac(
    key: &[u8; 32],
    method: &str,
    path: &str,
    ts: u64,
    nonce: &[u8; 16],
    body: &[u8],
) -> Blake2sMac256 {
    let mut m = <Blake2sMac256 as Mac>::new_from_slice(key).expect("32-byte key");
    m.update(method.as_bytes());
    m.update(&[0]);
    m.update(path.as_bytes());
    m.update(&[0]);
    m.update(&ts.to_be_bytes());
    m.update(nonce);
    m.update(&Blake2s256::digest(body));
    m
}

/// Signs requests to one hub with one key. The derived key is computed
/// once; the private key itself is not kept.
pub struct Signer {
    public: PublicKey,
    key: zeroize::Zeroizing<[u8; 32]>,
    /// Added to this host's clock: the hub's clock minus ours, once learned.
    offset: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.public)
    }
}

impl Signer {
    pub fn new(own: &PrivateKey, hub: &PublicKey) -> Result<Self, AuthError> {
        let public = own.public_key();
        let secret = own.shared_secret(hub).ok_or(AuthError::WeakKey)?;
        Ok(Self {
            public,
            key: mac_key(&secret, &public, hub),
            offset: Default::default(),
        })
    }

    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Uses the hub's clock from now on: `hub_now` is what it reported.
    pub fn adjust_clock(&self, hub_now: u64, now: SystemTime) {
        let offset = hub_now as i64 - unix_secs(now) as i64;
        self.offset
            .store(offset, std::sync::atomic::Ordering::Relaxed);
    }

    /// The `Authorization` header value for this request.
    pub fn sign(&self, method: &str, path: &str, body: &[u8], now: SystemTime) -> String {
        let offset = self.offset.load(std::sync::atomic::Ordering::Relaxed);
        let ts = unix_secs(now).saturating_add_signed(offset);
        let mut nonce = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        let mac = request_mac(&self.key, method, path, ts, &nonce, body)
            .finalize()
            .into_bytes();
        Proof {
            key: self.public,
            ts,
            nonce,
            mac: mac.into(),
        }
        .to_header()
    }
}

/// A parsed `Authorization` header; not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    pub key: PublicKey,
    pub ts: u64,
    pub nonce: [u8; 16],
    pub mac: [u8; 32],
}

impl Proof {
    fn to_header(&self) -> String {
        let nonce: String = self.nonce.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{SCHEME} key={}, ts={}, nonce={nonce}, mac={}",
            self.key,
            self.ts,
            STANDARD.encode(self.mac)
        )
    }

    /// Parses a header value. Never panics, whatever the input.
    pub fn parse(header: &str) -> Result<Self, AuthError> {
        let rest = header
            .strip_prefix(SCHEME)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or(AuthError::Malformed("not the Tunnel scheme"))?;
        let (mut key, mut ts, mut nonce, mut mac) = (None, None, None, None);
        for part in rest.split(',') {
            let (name, value) = part
                .trim()
                .split_once('=')
                .ok_or(AuthError::Malformed("a field without '='"))?;
            let slot = match name {
                "key" => &mut key,
                "ts" => &mut ts,
                "nonce" => &mut nonce,
                "mac" => &mut mac,
                _ => return Err(AuthError::Malformed("an unknown field")),
            };
            if slot.replace(value).is_some() {
                return Err(AuthError::Malformed("a field given twice"));
            }
        }
        let key = PublicKey::from_base64(key.ok_or(AuthError::Malformed("no key"))?)
            .map_err(|_| AuthError::Malformed("key is not a WireGuard public key"))?;
        let ts_text = ts.ok_or(AuthError::Malformed("no ts"))?;
        if ts_text.is_empty() || !ts_text.bytes().all(|c| c.is_ascii_digit()) {
            return Err(AuthError::Malformed("ts is not a number"));
        }
        let ts = ts_text
            .parse()
            .map_err(|_| AuthError::Malformed("ts is out of range"))?;
        let nonce_text = nonce.ok_or(AuthError::Malformed("no nonce"))?;
        let nonce = hex16(nonce_text).ok_or(AuthError::Malformed("nonce is not 32 hex digits"))?;
        let mac_bytes = STANDARD
            .decode(mac.ok_or(AuthError::Malformed("no mac"))?)
            .map_err(|_| AuthError::Malformed("mac is not base64"))?;
        let mac = mac_bytes
            .try_into()
            .map_err(|_| AuthError::Malformed("mac is not 32 bytes"))?;
        Ok(Self {
            key,
            ts,
            nonce,
            mac,
        })
    }

    /// Checks the MAC with the hub's key, then the clock. `hub` is the
    /// hub's private key; the signer's key is `self.key`.
    pub fn verify(
        &self,
        hub: &PrivateKey,
        method: &str,
        path: &str,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), AuthError> {
        let secret = hub.shared_secret(&self.key).ok_or(AuthError::WeakKey)?;
        let key = mac_key(&secret, &self.key, &hub.public_key());
        request_mac(&key, method, path, self.ts, &self.nonce, body)
            .verify_slice(&self.mac)
            .map_err(|_| AuthError::BadMac)?;
        let skew = self.ts as i128 - unix_secs(now) as i128;
        if skew.unsigned_abs() > WINDOW.as_secs() as u128 {
            return Err(AuthError::Skew(
                skew.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
            ));
        }
        Ok(())
    }
}

fn hex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Verified requests seen within the window, so that a captured request
/// cannot be sent again. Only requests with a valid MAC get here, so only
/// a key holder can fill it, and only its own key's share: each signer
/// has its own bounded set, so a flood from one key (a compromised or
/// buggy site) leaves every other site and every new join untouched.
#[derive(Default)]
pub struct ReplayGuard {
    signers: HashMap<PublicKey, Seen>,
    /// When to next drop the signers with nothing left in the window: a
    /// key that signed once (an invite, a site since revoked) would
    /// otherwise keep its entry for as long as the hub runs.
    next_sweep: u64,
}

/// One signer's proofs, oldest first.
#[derive(Default)]
struct Seen {
    macs: HashSet<[u8; 32]>,
    order: VecDeque<([u8; 32], u64)>,
}

impl Seen {
    fn forget_before(&mut self, horizon: u64) {
        while let Some((mac, ts)) = self.order.front().copied() {
            if ts >= horizon {
                break;
            }
            self.order.pop_front();
            self.macs.remove(&mac);
        }
    }
}

impl ReplayGuard {
    /// Records the proof; refuses one already seen, and one more from a
    /// key that already has [`REPLAY_PER_KEY`] in the window.
    pub fn check(&mut self, proof: &Proof, now: SystemTime) -> Result<(), AuthError> {
        let now = unix_secs(now);
        // A proof is only ever accepted within WINDOW of its timestamp, so
        // it can be forgotten once that has passed.
        let horizon = now.saturating_sub(2 * WINDOW.as_secs());
        if now >= self.next_sweep {
            self.signers.retain(|_, seen| {
                seen.forget_before(horizon);
                !seen.order.is_empty()
            });
            self.next_sweep = now.saturating_add(WINDOW.as_secs());
        }
        let seen = self.signers.entry(proof.key).or_default();
        seen.forget_before(horizon);
        if seen.macs.contains(&proof.mac) {
            return Err(AuthError::Replay);
        }
        if seen.macs.len() >= REPLAY_PER_KEY {
            return Err(AuthError::Flood);
        }
        seen.macs.insert(proof.mac);
        seen.order.push_back((proof.mac, now));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn a_signed_request_verifies_with_the_hub_key_only() {
        let (site, hub) = (PrivateKey::generate(), PrivateKey::generate());
        let signer = Signer::new(&site, &hub.public_key()).unwrap();
        let h = signer.sign("POST", "/v1/endpoints", b"{}", at(1000));
        let p = Proof::parse(&h).unwrap();
        assert_eq!(p.key, site.public_key());
        assert_eq!(
            p.verify(&hub, "POST", "/v1/endpoints", b"{}", at(1000)),
            Ok(())
        );
        // Any change to what was signed breaks it.
        assert_eq!(
            p.verify(&hub, "POST", "/v1/endpoints", b"{ }", at(1000)),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            p.verify(&hub, "POST", "/v1/leave", b"{}", at(1000)),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            p.verify(&hub, "GET", "/v1/endpoints", b"{}", at(1000)),
            Err(AuthError::BadMac)
        );
        let other_hub = PrivateKey::generate();
        assert_eq!(
            p.verify(&other_hub, "POST", "/v1/endpoints", b"{}", at(1000)),
            Err(AuthError::BadMac)
        );
        // Someone else's key with this proof's claimed key: no.
        let mut forged = p.clone();
        forged.key = PrivateKey::generate().public_key();
        assert_eq!(
            forged.verify(&hub, "POST", "/v1/endpoints", b"{}", at(1000)),
            Err(AuthError::BadMac)
        );
    }

    #[test]
    fn stale_requests_are_refused_and_a_client_can_adopt_the_hub_clock() {
        let (site, hub) = (PrivateKey::generate(), PrivateKey::generate());
        let signer = Signer::new(&site, &hub.public_key()).unwrap();
        let p = Proof::parse(&signer.sign("POST", "/x", b"", at(1000))).unwrap();
        assert_eq!(p.verify(&hub, "POST", "/x", b"", at(1120)), Ok(()));
        assert_eq!(
            p.verify(&hub, "POST", "/x", b"", at(1121)),
            Err(AuthError::Skew(-121))
        );
        assert_eq!(
            p.verify(&hub, "POST", "/x", b"", at(500)),
            Err(AuthError::Skew(500))
        );
        // Our clock says 1000, the hub's 5000.
        signer.adjust_clock(5000, at(1000));
        let p = Proof::parse(&signer.sign("POST", "/x", b"", at(1001))).unwrap();
        assert_eq!(p.ts, 5001);
        assert_eq!(p.verify(&hub, "POST", "/x", b"", at(5001)), Ok(()));
    }

    #[test]
    fn replays_are_refused_within_the_window_and_forgotten_after() {
        let (site, hub) = (PrivateKey::generate(), PrivateKey::generate());
        let signer = Signer::new(&site, &hub.public_key()).unwrap();
        let mut guard = ReplayGuard::default();
        let p = Proof::parse(&signer.sign("POST", "/x", b"", at(1000))).unwrap();
        assert_eq!(guard.check(&p, at(1000)), Ok(()));
        assert_eq!(guard.check(&p, at(1001)), Err(AuthError::Replay));
        let q = Proof::parse(&signer.sign("POST", "/x", b"", at(1000))).unwrap();
        assert_eq!(
            guard.check(&q, at(1001)),
            Ok(()),
            "a fresh nonce is a new request"
        );
        // Long after, the old entries are gone (and verify() refuses them as stale).
        let r = Proof::parse(&signer.sign("POST", "/x", b"", at(2000))).unwrap();
        assert_eq!(guard.check(&r, at(2000)), Ok(()));
        assert_eq!(guard.signers[&site.public_key()].macs.len(), 1);
    }

    /// A proof by `key` with a MAC of its own; `check` trusts that
    /// `verify` ran, so none is needed here.
    fn proof(key: PublicKey, n: u32) -> Proof {
        let mut mac = [0; 32];
        mac[..4].copy_from_slice(&n.to_be_bytes());
        mac[4..].copy_from_slice(&key.as_bytes()[4..]);
        Proof {
            key,
            ts: 1000,
            nonce: [0; 16],
            mac,
        }
    }

    #[test]
    fn one_keys_flood_refuses_that_key_only_and_ages_out() {
        let (a, b) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let mut guard = ReplayGuard::default();
        for n in 0..REPLAY_PER_KEY as u32 {
            assert_eq!(guard.check(&proof(a, n), at(1000)), Ok(()), "{n}");
        }
        for n in REPLAY_PER_KEY as u32..REPLAY_PER_KEY as u32 + 100 {
            assert_eq!(guard.check(&proof(a, n), at(1001)), Err(AuthError::Flood));
        }
        // A replay is still named as one, full or not.
        assert_eq!(guard.check(&proof(a, 0), at(1001)), Err(AuthError::Replay));
        // Another key is not touched by A's flood.
        assert_eq!(guard.check(&proof(b, 0), at(1001)), Ok(()));
        assert_eq!(guard.check(&proof(b, 0), at(1002)), Err(AuthError::Replay));
        // Within two windows A is still full; after, it signs again.
        let later = 1000 + 2 * WINDOW.as_secs();
        assert_eq!(
            guard.check(&proof(a, 1 << 20), at(later)),
            Err(AuthError::Flood)
        );
        assert_eq!(guard.check(&proof(a, 1 << 20), at(later + 1)), Ok(()));
        assert_eq!(guard.signers[&a].macs.len(), 1);
    }

    #[test]
    fn keys_with_nothing_in_the_window_are_forgotten() {
        let mut guard = ReplayGuard::default();
        for _ in 0..50 {
            let k = PrivateKey::generate().public_key();
            assert_eq!(guard.check(&proof(k, 0), at(1000)), Ok(()));
        }
        assert_eq!(guard.signers.len(), 50);
        // Someone else signs long after: the 50 keys that signed once are gone.
        let c = PrivateKey::generate().public_key();
        assert_eq!(guard.check(&proof(c, 0), at(2000)), Ok(()));
        assert_eq!(guard.signers.len(), 1);
    }

    #[test]
    fn low_order_keys_cannot_sign_or_be_verified() {
        let hub = PrivateKey::generate();
        let weak = PublicKey([0; 32]);
        assert_eq!(
            Signer::new(&PrivateKey::generate(), &weak).unwrap_err(),
            AuthError::WeakKey
        );
        let p = Proof {
            key: weak,
            ts: 1000,
            nonce: [0; 16],
            mac: [0; 32],
        };
        assert_eq!(
            p.verify(&hub, "POST", "/x", b"", at(1000)),
            Err(AuthError::WeakKey)
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        let good = Signer::new(
            &PrivateKey::generate(),
            &PrivateKey::generate().public_key(),
        )
        .unwrap()
        .sign("GET", "/", b"", at(1));
        assert!(Proof::parse(&good).is_ok());
        for bad in [
            "",
            "Bearer x",
            "Tunnel",
            "Tunnel ",
            "Tunnel key=abc",
            &good.replace("ts=1", "ts=-1"),
            &good.replace("ts=1", "ts=99999999999999999999999"),
            &good.replace("nonce=", "nonce=zz"),
            &format!("{good}, ts=2"),
            &format!("{good}, extra=1"),
            &good.replace("mac=", "mac=AAAA"),
        ] {
            assert!(Proof::parse(bad).is_err(), "{bad:?}");
        }
    }
}
