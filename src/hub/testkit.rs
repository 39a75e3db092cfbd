//! What the hub's tests share: a state, a hub on a fake device, a request.

pub use super::*;
pub use crate::keys::PrivateKey;
pub use crate::token::Token;
pub use crate::wg::fake::FakeWg;
pub use std::time::{Duration, SystemTime};

pub fn state() -> ServerState {
    ServerState::new("10.77.0.0/24".parse().unwrap(), 51820, 1420)
}

pub fn setup() -> (tempfile::TempDir, FakeWg, Hub) {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeWg::default();
    let hub = Hub::new(
        Arc::new(fake.clone()),
        None,
        StateDir::new(tmp.path()),
        "wgt0",
        Ledger::new(state(), 4).unwrap(),
    );
    (tmp, fake, hub)
}

pub fn req(count: usize) -> MintRequest {
    MintRequest {
        count,
        ttl: Duration::from_secs(60),
        endpoint_hint: None,
        name: None,
        routes: vec![],
    }
}

/// A joiner that redeemed the hub's first token with key `k`.
pub async fn joined(hub: &Hub) -> (Token, PublicKey) {
    let tok = hub
        .mint(&req(1), SystemTime::now())
        .await
        .unwrap()
        .remove(0);
    let k = PrivateKey::generate().public_key();
    hub.redeem(tok.assigned, k, Joining::default(), SystemTime::now())
        .await
        .unwrap();
    (tok, k)
}
