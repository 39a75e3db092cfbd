//! The random source the ledger makes keys from (invite keys, the hub's
//! container keys). It is handed in like the clock: the OS's in the
//! running hub ([`KeySource::os`], what [`Ledger::new`](super::Ledger::new)
//! uses), a seeded one in tests, which then mint the same keys every run.

use crate::keys::PrivateKey;
use rand_core::{CryptoRngCore, OsRng};
use std::sync::{Arc, Mutex};

/// A cryptographic random source for the ledger's keys.
///
/// Clones share one generator. The hub clones the ledger before every
/// change to restore it if the device or the disk fails; with a copy of
/// the generator's state the restored ledger would make the same keys
/// again as the change that was undone. Sharing means the random stream
/// never rewinds.
#[derive(Clone)]
pub struct KeySource(Arc<Mutex<dyn CryptoRngCore + Send>>);

impl KeySource {
    /// The operating system's random source.
    pub fn os() -> Self {
        Self::new(OsRng)
    }

    pub fn new(rng: impl CryptoRngCore + Send + 'static) -> Self {
        Self(Arc::new(Mutex::new(rng)))
    }

    /// A fresh private key.
    pub fn private_key(&self) -> PrivateKey {
        // A panic while drawing bytes leaves no half-made state behind in
        // the generator that matters: go on with it.
        let mut rng = self.0.lock().unwrap_or_else(|e| e.into_inner());
        PrivateKey::from_rng(&mut *rng)
    }
}

impl Default for KeySource {
    fn default() -> Self {
        Self::os()
    }
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeySource")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ledger::testkit::Seeded;

    #[test]
    fn a_seed_gives_the_same_keys_and_another_seed_others() {
        let (a, b, c) = (
            KeySource::new(Seeded::new(1)),
            KeySource::new(Seeded::new(1)),
            KeySource::new(Seeded::new(2)),
        );
        let ka: Vec<_> = (0..3).map(|_| a.private_key().public_key()).collect();
        let kb: Vec<_> = (0..3).map(|_| b.private_key().public_key()).collect();
        assert_eq!(ka, kb);
        assert_ne!(ka[0], ka[1], "one source does not repeat itself");
        assert_ne!(c.private_key().public_key(), ka[0]);
    }

    #[test]
    fn clones_share_one_stream() {
        let a = KeySource::new(Seeded::new(7));
        let fresh = KeySource::new(Seeded::new(7));
        let first = a.clone().private_key().public_key();
        assert_eq!(first, fresh.private_key().public_key());
        assert_ne!(
            a.private_key().public_key(),
            first,
            "the clone drew from the same stream"
        );
    }
}
