//! An in-memory [`NetOps`] for unit tests.

use super::{NetError, NetOps};
use async_trait::async_trait;
use ipnetwork::IpNetwork;
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct FakeLink {
    pub wireguard: bool,
    pub addrs: Vec<IpNetwork>,
    pub mtu: Option<u32>,
    pub up: bool,
    /// The pid whose namespace it was moved into.
    pub netns_pid: Option<u32>,
    pub forwarding: bool,
}

#[derive(Default)]
pub struct FakeNet {
    pub links: Mutex<BTreeMap<String, FakeLink>>,
    /// When false, `create_wireguard` fails like a kernel without the module.
    pub kernel_wireguard: bool,
}

impl FakeNet {
    pub fn add_link(&self, name: &str) {
        self.links
            .lock()
            .unwrap()
            .insert(name.to_owned(), FakeLink::default());
    }
}

#[async_trait]
impl NetOps for FakeNet {
    async fn link_exists(&self, name: &str) -> Result<bool, NetError> {
        Ok(self.links.lock().unwrap().contains_key(name))
    }

    async fn create_wireguard(&self, name: &str) -> Result<(), NetError> {
        if !self.kernel_wireguard {
            return Err(NetError::NotSupported("Operation not supported".into()));
        }
        let mut links = self.links.lock().unwrap();
        if links.contains_key(name) {
            return Err(NetError::Exists(name.to_owned()));
        }
        links.insert(
            name.to_owned(),
            FakeLink {
                wireguard: true,
                ..Default::default()
            },
        );
        Ok(())
    }

    async fn configure(&self, name: &str, addrs: &[IpNetwork], mtu: u32) -> Result<(), NetError> {
        let mut links = self.links.lock().unwrap();
        let link = links
            .get_mut(name)
            .ok_or_else(|| NetError::NotFound(name.to_owned()))?;
        link.addrs.extend_from_slice(addrs);
        link.mtu = Some(mtu);
        link.up = true;
        Ok(())
    }

    async fn move_to_netns(&self, name: &str, pid: u32) -> Result<(), NetError> {
        let mut links = self.links.lock().unwrap();
        let link = links
            .get_mut(name)
            .ok_or_else(|| NetError::NotFound(name.to_owned()))?;
        link.netns_pid = Some(pid);
        Ok(())
    }

    async fn enable_forwarding(&self, name: &str) -> Result<(), NetError> {
        let mut links = self.links.lock().unwrap();
        let link = links
            .get_mut(name)
            .ok_or_else(|| NetError::NotFound(name.to_owned()))?;
        link.forwarding = true;
        Ok(())
    }

    async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), NetError> {
        let mut links = self.links.lock().unwrap();
        let link = links
            .get_mut(name)
            .ok_or_else(|| NetError::NotFound(name.to_owned()))?;
        link.mtu = Some(mtu);
        Ok(())
    }

    async fn delete_link(&self, name: &str) -> Result<(), NetError> {
        self.links
            .lock()
            .unwrap()
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| NetError::NotFound(name.to_owned()))
    }
}
