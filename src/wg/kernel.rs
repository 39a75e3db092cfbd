//! Kernel WireGuard: a `wireguard` link made with rtnetlink, configured with
//! wireguard-control. Kept small: this machine has no module to test it on,
//! so the translation to wireguard-control's types is what the unit tests cover.

use super::{BackendKind, DeviceSpec, PeerSpec, PeerStatus, WgDevice, WgError};
use crate::keys::{PrivateKey, PublicKey};
use crate::net::NetOps;
use async_trait::async_trait;
use ipnetwork::IpNetwork;
use std::sync::Arc;
use std::time::SystemTime;
use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

pub struct KernelDevice {
    name: String,
    iface: InterfaceName,
    net: Arc<dyn NetOps>,
}

fn key(k: &PublicKey) -> Key {
    Key(*k.as_bytes())
}

/// The wireguard-control form of a peer, replacing its allowed IPs.
pub fn peer_update(spec: &PeerSpec) -> PeerConfigBuilder {
    let mut b = PeerConfigBuilder::new(&key(&spec.public_key)).replace_allowed_ips();
    if let Some(e) = spec.endpoint {
        b = b.set_endpoint(e);
    }
    b = match spec.keepalive {
        Some(k) => b.set_persistent_keepalive_interval(k),
        None => b.unset_persistent_keepalive(),
    };
    for ip in &spec.allowed_ips {
        b = b.add_allowed_ip(ip.ip(), ip.prefix());
    }
    b
}

impl KernelDevice {
    /// Made through `host`; `net` is where the link will live (and is deleted).
    pub async fn create(
        spec: &DeviceSpec,
        host: Arc<dyn NetOps>,
        net: Arc<dyn NetOps>,
    ) -> Result<Self, WgError> {
        let iface: InterfaceName = spec.name.parse().map_err(|e| WgError::Kernel {
            what: "interface name",
            source: format!("{e:?}").into(),
        })?;
        host.create_wireguard(&spec.name).await?;
        let dev = Self {
            name: spec.name.clone(),
            iface,
            net,
        };
        let mut update = DeviceUpdate::new()
            .set_private_key(Key(*spec.private_key.to_bytes()))
            .replace_peers();
        if spec.listen_port != 0 {
            update = update.set_listen_port(spec.listen_port);
        }
        for p in &spec.peers {
            update = update.add_peer(peer_update(p));
        }
        if let Err(e) = dev.apply(update, "configuring the device").await {
            let _ = host.delete_link(&dev.name).await;
            return Err(e);
        }
        Ok(dev)
    }

    async fn apply(&self, update: DeviceUpdate, what: &'static str) -> Result<(), WgError> {
        let iface = self.iface;
        tokio::task::spawn_blocking(move || update.apply(&iface, Backend::Kernel))
            .await
            .expect("blocking task does not panic")
            .map_err(|e| WgError::Kernel {
                what,
                source: e.into(),
            })
    }

    async fn device(&self) -> Result<Device, WgError> {
        let iface = self.iface;
        tokio::task::spawn_blocking(move || Device::get(&iface, Backend::Kernel))
            .await
            .expect("blocking task does not panic")
            .map_err(|e| WgError::Kernel {
                what: "reading the device",
                source: e.into(),
            })
    }
}

#[async_trait]
impl WgDevice for KernelDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn backend(&self) -> BackendKind {
        BackendKind::Kernel
    }

    async fn set_private_key(&self, k: &PrivateKey) -> Result<(), WgError> {
        self.apply(
            DeviceUpdate::new().set_private_key(Key(*k.to_bytes())),
            "setting the key",
        )
        .await
    }

    async fn upsert_peer(&self, peer: &PeerSpec) -> Result<(), WgError> {
        self.apply(
            DeviceUpdate::new().add_peer(peer_update(peer)),
            "configuring a peer",
        )
        .await
    }

    async fn set_allowed_ips(&self, k: &PublicKey, ips: &[IpNetwork]) -> Result<(), WgError> {
        let mut b = PeerConfigBuilder::new(&key(k)).replace_allowed_ips();
        for ip in ips {
            b = b.add_allowed_ip(ip.ip(), ip.prefix());
        }
        self.apply(DeviceUpdate::new().add_peer(b), "setting allowed IPs")
            .await
    }

    async fn set_endpoint(
        &self,
        k: &PublicKey,
        endpoint: std::net::SocketAddr,
    ) -> Result<(), WgError> {
        let b = PeerConfigBuilder::new(&key(k)).set_endpoint(endpoint);
        self.apply(DeviceUpdate::new().add_peer(b), "setting an endpoint")
            .await
    }

    async fn remove_peer(&self, k: &PublicKey) -> Result<(), WgError> {
        self.apply(
            DeviceUpdate::new().remove_peer_by_key(&key(k)),
            "removing a peer",
        )
        .await
    }

    async fn peers(&self) -> Result<Vec<PeerStatus>, WgError> {
        let now = SystemTime::now();
        Ok(self
            .device()
            .await?
            .peers
            .into_iter()
            .map(|p| PeerStatus {
                public_key: PublicKey(p.config.public_key.0),
                endpoint: p.config.endpoint,
                allowed_ips: p
                    .config
                    .allowed_ips
                    .iter()
                    .filter_map(|a| IpNetwork::new(a.address, a.cidr).ok())
                    .collect(),
                last_handshake: p
                    .stats
                    .last_handshake_time
                    .map(|t| now.duration_since(t).unwrap_or_default()),
                rx_bytes: p.stats.rx_bytes,
                tx_bytes: p.stats.tx_bytes,
                keepalive: p.config.persistent_keepalive_interval,
            })
            .collect())
    }

    async fn listen_port(&self) -> Result<u16, WgError> {
        Ok(self.device().await?.listen_port.unwrap_or(0))
    }

    async fn destroy(&self) -> Result<(), WgError> {
        Ok(self.net.delete_link(&self.name).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    #[test]
    fn peer_translation() {
        let pk = PrivateKey::generate().public_key();
        let spec = PeerSpec {
            public_key: pk,
            endpoint: Some("192.0.2.1:51820".parse().unwrap()),
            allowed_ips: vec!["10.77.0.0/24".parse().unwrap()],
            keepalive: Some(25),
        };
        let c = peer_update(&spec).into_peer_config();
        assert_eq!(c.public_key.0, pk.0);
        assert_eq!(c.endpoint, spec.endpoint);
        assert_eq!(c.persistent_keepalive_interval, Some(25));
        assert_eq!(c.allowed_ips.len(), 1);
        assert_eq!(c.allowed_ips[0].address.to_string(), "10.77.0.0");
        assert_eq!(c.allowed_ips[0].cidr, 24);
    }
}
