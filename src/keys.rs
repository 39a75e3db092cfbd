//! WireGuard keys: private keys are zeroized on drop and never shown in `Debug`.
//!
//! Keys are X25519 (`x25519-dalek`); the text form is standard base64, as
//! `wg(8)` uses, so that `wg show` output and our output agree.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand_core::{CryptoRngCore, OsRng};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use x25519_dalek::StaticSecret;

/// Errors from parsing keys.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("a WireGuard key is 32 bytes of base64 (44 characters ending in '=')")]
    Malformed,
}

/// A private key. Zeroized on drop (`x25519-dalek`'s `zeroize` feature);
/// `Debug` prints only the matching public key.
#[derive(Clone)]
pub struct PrivateKey {
    secret: StaticSecret,
    /// Computed once: deriving it is a scalar multiplication (about as
    /// costly as a Diffie-Hellman), and the mesh names itself by it in
    /// every probe it answers.
    public: PublicKey,
}

impl PrivateKey {
    fn new(secret: StaticSecret) -> Self {
        let public = PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes());
        Self { secret, public }
    }

    /// A new random key from the OS RNG.
    pub fn generate() -> Self {
        Self::new(StaticSecret::random_from_rng(OsRng))
    }

    /// A new key from `rng`: pure code is handed its random source (a
    /// seeded one in tests) instead of reaching for the OS's.
    pub fn from_rng(rng: &mut (impl CryptoRngCore + ?Sized)) -> Self {
        Self::new(StaticSecret::random_from_rng(rng))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self::new(StaticSecret::from(bytes))
    }

    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The raw secret, for the WireGuard backends and the token encoder only.
    pub fn to_bytes(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.secret.to_bytes())
    }

    /// The static-static X25519 secret with `peer`, as WireGuard's
    /// handshake also computes it. `None` for a low-order `peer` key, whose
    /// "secret" anyone could compute.
    pub fn shared_secret(&self, peer: &PublicKey) -> Option<zeroize::Zeroizing<[u8; 32]>> {
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer.0));
        shared
            .was_contributory()
            .then(|| zeroize::Zeroizing::new(*shared.as_bytes()))
    }

    pub fn as_secret(&self) -> &StaticSecret {
        &self.secret
    }

    /// The base64 text form, for state files and `tunnel export` only.
    pub fn to_base64(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(STANDARD.encode(self.to_bytes().as_ref()))
    }

    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        Ok(Self::from_bytes(decode32(s)?))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        // Comparing public keys avoids a non-constant-time compare of secrets.
        self.public_key() == other.public_key()
    }
}

impl Serialize for PrivateKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PrivateKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = zeroize::Zeroizing::new(String::deserialize(d)?);
        Self::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

/// A public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        Ok(Self(decode32(s)?))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes =
        zeroize::Zeroizing::new(STANDARD.decode(s.trim()).map_err(|_| KeyError::Malformed)?);
    bytes.as_slice().try_into().map_err(|_| KeyError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let k = PrivateKey::generate();
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(k.to_base64().as_str()));
        assert!(dbg.contains(&k.public_key().to_string()));
    }

    #[test]
    fn shared_secret_agrees_and_refuses_low_order_keys() {
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        assert_eq!(
            *a.shared_secret(&b.public_key()).unwrap(),
            *b.shared_secret(&a.public_key()).unwrap()
        );
        // The identity point (all zeros) and a point of order 8.
        assert!(a.shared_secret(&PublicKey([0; 32])).is_none());
        let mut order8 = [0u8; 32];
        order8[0] = 1;
        assert!(a.shared_secret(&PublicKey(order8)).is_none());
    }

    #[test]
    fn public_key_is_rfc_7748s() {
        // RFC 7748, 6.1: Alice's key pair. The public half is computed
        // once, when the key is made; every way of making one must agree.
        let hex = |s: &str| -> [u8; 32] {
            let v: Vec<u8> = (0..64)
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect();
            v.try_into().unwrap()
        };
        let secret = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = PublicKey(hex(
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
        ));
        let k = PrivateKey::from_bytes(secret);
        assert_eq!(k.public_key(), public);
        assert_eq!(k.clone().public_key(), public);
        assert_eq!(
            PrivateKey::from_base64(&k.to_base64())
                .unwrap()
                .public_key(),
            public
        );
        let json = serde_json::to_string(&k).unwrap();
        let back: PrivateKey = serde_json::from_str(&json).unwrap();
        assert_eq!(back.public_key(), public);
    }

    #[test]
    fn base64_round_trip_matches_wg_format() {
        let k = PrivateKey::generate();
        let text = k.to_base64();
        assert_eq!(text.len(), 44);
        assert_eq!(PrivateKey::from_base64(&text).unwrap(), k);
        let p = k.public_key();
        assert_eq!(PublicKey::from_base64(&p.to_string()).unwrap(), p);
        assert_eq!(PublicKey::from_base64("abc"), Err(KeyError::Malformed));
    }
}
