//! What the ledger's tests share: a state, a ledger, a fixed wall clock,
//! and the steps that bring a site in.

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
