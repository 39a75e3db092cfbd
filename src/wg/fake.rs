//! An in-memory [`WgDevice`] for unit tests. Handshakes are simulated by the
//! test through [`FakeWg::handshake`].

use super::{BackendKind, PeerSpec, PeerStatus, WgDevice, WgError};
use crate::keys::{PrivateKey, PublicKey};
use async_trait::async_trait;
use ipnetwork::IpNetwork;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct FakeState {
    pub public_key: Option<PublicKey>,
    pub peers: Vec<PeerStatus>,
    pub destroyed: bool,
    /// Peer changes that still succeed before one fails (then all succeed again).
    pub budget: usize,
}

impl Default for FakeState {
    fn default() -> Self {
        Self {
            public_key: None,
            peers: vec![],
            destroyed: false,
            budget: usize::MAX,
        }
    }
}

impl FakeState {
    fn spend(&mut self) -> Result<(), WgError> {
        if self.budget == 0 {
            self.budget = usize::MAX;
            return Err(WgError::Userspace {
                what: "configuring a peer",
                source: "the fake device was told to fail".into(),
            });
        }
        self.budget -= 1;
        Ok(())
    }
}

#[derive(Clone, Default)]
pub struct FakeWg {
    pub state: Arc<Mutex<FakeState>>,
}

impl FakeWg {
    /// The next `n` peer changes succeed, the one after fails, the rest succeed.
    pub fn fail_after(&self, n: usize) {
        self.state.lock().unwrap().budget = n;
    }

    pub fn handshake(&self, key: &PublicKey) {
        let mut s = self.state.lock().unwrap();
        if let Some(p) = s.peers.iter_mut().find(|p| &p.public_key == key) {
            p.last_handshake = Some(Duration::from_secs(1));
        }
    }

    pub fn peer(&self, key: &PublicKey) -> Option<PeerStatus> {
        self.state
            .lock()
            .unwrap()
            .peers
            .iter()
            .find(|p| &p.public_key == key)
            .cloned()
    }
}

#[async_trait]
impl WgDevice for FakeWg {
    fn name(&self) -> &str {
        "fake0"
    }

    fn backend(&self) -> BackendKind {
        BackendKind::Userspace
    }

    async fn set_private_key(&self, key: &PrivateKey) -> Result<(), WgError> {
        self.state.lock().unwrap().public_key = Some(key.public_key());
        Ok(())
    }

    async fn upsert_peer(&self, peer: &PeerSpec) -> Result<(), WgError> {
        let mut s = self.state.lock().unwrap();
        s.spend()?;
        s.peers.retain(|p| p.public_key != peer.public_key);
        for p in s.peers.iter_mut() {
            p.allowed_ips.retain(|ip| !peer.allowed_ips.contains(ip));
        }
        s.peers.push(PeerStatus {
            public_key: peer.public_key,
            endpoint: peer.endpoint,
            allowed_ips: peer.allowed_ips.clone(),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            keepalive: peer.keepalive,
        });
        Ok(())
    }

    async fn set_allowed_ips(&self, key: &PublicKey, ips: &[IpNetwork]) -> Result<(), WgError> {
        let mut s = self.state.lock().unwrap();
        s.spend()?;
        for p in s.peers.iter_mut() {
            if &p.public_key == key {
                p.allowed_ips = ips.to_vec();
            } else {
                // An allowed IP belongs to one peer at a time, as in WireGuard.
                p.allowed_ips.retain(|ip| !ips.contains(ip));
            }
        }
        Ok(())
    }

    async fn remove_peer(&self, key: &PublicKey) -> Result<(), WgError> {
        let mut s = self.state.lock().unwrap();
        s.spend()?;
        s.peers.retain(|p| &p.public_key != key);
        Ok(())
    }

    async fn set_endpoint(&self, key: &PublicKey, endpoint: SocketAddr) -> Result<(), WgError> {
        let mut s = self.state.lock().unwrap();
        s.spend()?;
        if let Some(p) = s.peers.iter_mut().find(|p| &p.public_key == key) {
            p.endpoint = Some(endpoint);
        }
        Ok(())
    }

    async fn peers(&self) -> Result<Vec<PeerStatus>, WgError> {
        Ok(self.state.lock().unwrap().peers.clone())
    }

    async fn listen_port(&self) -> Result<u16, WgError> {
        Ok(51820)
    }

    async fn destroy(&self) -> Result<(), WgError> {
        self.state.lock().unwrap().destroyed = true;
        Ok(())
    }
}
