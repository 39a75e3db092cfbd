//! An in-memory [`NetOps`] for unit tests.

use super::{NetError, NetOps, PolicyRule};
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
    /// (destination, link, table) of the routes added.
    pub routes: Mutex<std::collections::BTreeSet<(IpNetwork, String, Option<u32>)>>,
    /// Which link reaches which network (for route lookups).
    pub lan: Mutex<Vec<(IpNetwork, String)>>,
    pub rules: Mutex<Vec<PolicyRule>>,
    pub forwarding6: Mutex<bool>,
    /// When true, sysctl writes fail as inside a container (read-only /proc/sys).
    pub readonly_sysctl: Mutex<bool>,
    /// `accept_ra` of the links that have one set.
    pub accept_ra: Mutex<BTreeMap<String, u8>>,
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

    async fn rename_link(&self, name: &str, to: &str) -> Result<(), NetError> {
        let mut links = self.links.lock().unwrap();
        let link = links
            .remove(name)
            .ok_or_else(|| NetError::NotFound(name.to_owned()))?;
        links.insert(to.to_owned(), link);
        Ok(())
    }

    async fn forwarding(&self, name: &str) -> Result<bool, NetError> {
        let links = self.links.lock().unwrap();
        let link = links
            .get(name)
            .ok_or_else(|| NetError::NotFound(name.to_owned()))?;
        Ok(link.forwarding)
    }

    async fn forwarding6(&self) -> Result<bool, NetError> {
        Ok(*self.forwarding6.lock().unwrap())
    }

    async fn set_forwarding6(&self, on: bool) -> Result<(), NetError> {
        if *self.readonly_sysctl.lock().unwrap() {
            return Err(NetError::Permission("writing forwarding".into()));
        }
        *self.forwarding6.lock().unwrap() = on;
        Ok(())
    }

    async fn ra_links(&self) -> Result<Vec<String>, NetError> {
        Ok(self
            .accept_ra
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, v)| **v == 1)
            .map(|(k, _)| k.clone())
            .collect())
    }

    async fn set_accept_ra(&self, name: &str, value: u8) -> Result<(), NetError> {
        self.accept_ra
            .lock()
            .unwrap()
            .insert(name.to_owned(), value);
        Ok(())
    }

    async fn set_forwarding(&self, name: &str, on: bool) -> Result<(), NetError> {
        let mut links = self.links.lock().unwrap();
        let link = links
            .get_mut(name)
            .ok_or_else(|| NetError::NotFound(name.to_owned()))?;
        link.forwarding = on;
        Ok(())
    }

    async fn add_route(
        &self,
        dst: IpNetwork,
        name: &str,
        table: Option<u32>,
    ) -> Result<(), NetError> {
        self.routes
            .lock()
            .unwrap()
            .insert((dst, name.to_owned(), table));
        Ok(())
    }

    async fn del_route(
        &self,
        dst: IpNetwork,
        name: &str,
        table: Option<u32>,
    ) -> Result<(), NetError> {
        self.routes
            .lock()
            .unwrap()
            .remove(&(dst, name.to_owned(), table));
        Ok(())
    }

    async fn route_iface(&self, to: std::net::IpAddr) -> Result<Option<String>, NetError> {
        Ok(self
            .lan
            .lock()
            .unwrap()
            .iter()
            .find(|(n, _)| n.contains(to))
            .map(|(_, i)| i.clone()))
    }

    async fn host_networks(&self, link: Option<&str>) -> Result<Vec<IpNetwork>, NetError> {
        let links = self.links.lock().unwrap();
        let lan = self.lan.lock().unwrap();
        Ok(links
            .iter()
            .filter(|(n, _)| link.is_none_or(|l| l == n.as_str()))
            .flat_map(|(_, l)| l.addrs.iter().copied())
            .chain(
                lan.iter()
                    .filter(|(_, i)| link.is_none_or(|l| l == i))
                    .map(|(n, _)| *n),
            )
            .collect())
    }

    async fn occupied(&self) -> Result<Vec<super::Occupied>, NetError> {
        let links = self.links.lock().unwrap();
        let routes = self.routes.lock().unwrap();
        let lan = self.lan.lock().unwrap();
        let on = |net: IpNetwork, iface: &str, address: bool| super::Occupied {
            net,
            iface: iface.to_owned(),
            address,
        };
        Ok(links
            .iter()
            .flat_map(|(n, l)| l.addrs.iter().map(move |a| on(*a, n, true)))
            .chain(
                routes
                    .iter()
                    .filter(|(_, _, t)| t.is_none())
                    .map(|(d, i, _)| on(*d, i, false)),
            )
            .chain(lan.iter().map(|(n, i)| on(*n, i, false)))
            .collect())
    }

    async fn add_rule(&self, rule: &PolicyRule) -> Result<(), NetError> {
        let mut rules = self.rules.lock().unwrap();
        if !rules.contains(rule) {
            rules.push(rule.clone());
        }
        Ok(())
    }

    async fn del_rule(&self, rule: &PolicyRule) -> Result<(), NetError> {
        self.rules.lock().unwrap().retain(|r| r != rule);
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
