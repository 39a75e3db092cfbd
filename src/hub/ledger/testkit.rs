//! What the ledger's (and the hub's) tests share: a state, a ledger, a
//! fixed wall clock, a seeded random source, and the steps that bring a
//! site in.

pub use super::*;
pub use crate::keys::{PrivateKey, PublicKey};
pub use crate::state::ServerState;
pub use crate::token::Token;
pub use crate::wg::{PeerSpec, PeerStatus};
pub use ipnetwork::IpNetwork;
pub use std::net::IpAddr;
pub use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub fn state() -> ServerState {
    ServerState::new("10.77.0.0/24".parse().unwrap(), 51820, 1420)
}

pub fn ledger() -> Ledger {
    Ledger::new(state(), 2).unwrap()
}

pub fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

pub fn mint(l: &mut Ledger, count: usize, name: Option<&str>) -> Vec<Token> {
    l.mint(
        &MintRequest {
            count,
            ttl: Duration::from_secs(60),
            endpoint_hint: None,
            name: name.map(str::to_owned),
            routes: vec![],
        },
        t0(),
    )
    .unwrap()
}

pub fn key() -> PublicKey {
    PrivateKey::generate().public_key()
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A site admitted and swapped in at .2 (from a first token).
pub fn site(l: &mut Ledger, name: Option<&str>) -> (IpAddr, PublicKey) {
    let t = mint(l, 1, name).remove(0);
    let k = key();
    l.redeem(t.assigned, k, t0(), Instant::now()).unwrap();
    l.complete_swaps(|_| true, Instant::now());
    (t.assigned, k)
}

pub fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

pub fn routed(l: &Ledger) -> Vec<IpNetwork> {
    l.site_routes().into_iter().collect()
}

/// A deterministic random source for tests: BLAKE2b over a seed and a
/// counter, so that a seed gives the same keys every run.
pub struct Seeded {
    seed: u64,
    counter: u64,
    block: [u8; 64],
    used: usize,
}

impl Seeded {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            counter: 0,
            block: [0; 64],
            used: 64,
        }
    }
}

impl rand_core::RngCore for Seeded {
    fn next_u32(&mut self) -> u32 {
        rand_core::impls::next_u32_via_fill(self)
    }

    fn next_u64(&mut self) -> u64 {
        rand_core::impls::next_u64_via_fill(self)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        use blake2::Digest;
        for b in dest {
            if self.used == self.block.len() {
                let mut h = blake2::Blake2b512::new();
                h.update(self.seed.to_le_bytes());
                h.update(self.counter.to_le_bytes());
                self.block.copy_from_slice(&h.finalize());
                self.counter += 1;
                self.used = 0;
            }
            *b = self.block[self.used];
            self.used += 1;
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// Unpredictable to no one who knows the seed: for tests only.
impl rand_core::CryptoRng for Seeded {}

/// A ledger like [`ledger`] whose keys come from `Seeded::new(seed)`.
pub fn seeded(seed: u64) -> Ledger {
    ledger().with_rng(Seeded::new(seed))
}
