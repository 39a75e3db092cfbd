//! Endpoints: the containers a site registers behind it, and the hub's own
//! containers (named on the command line, by label, or through the network
//! driver), whose keys the hub makes.

use super::{KeySource, Ledger, pool_of, unix};
use crate::ipam::IpamError;
use crate::keys::PublicKey;
use crate::limits::{self, LimitError};
use crate::state::{ContainerRecord, PeerRecord, ServerState};
use ipnetwork::IpNetwork;
use std::net::IpAddr;
use std::time::SystemTime;

/// Why a site's registration of an endpoint was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    #[error("{0} is not an admitted site")]
    NotASite(IpAddr),
    #[error("that public key is already in use on this server")]
    KeyInUse,
    #[error("that public key is a low-order X25519 point and cannot be used")]
    WeakKey,
    #[error("this site already has an endpoint named {0:?} with another key")]
    NameTaken(String),
    #[error("this site has reached its quota of {0} endpoints")]
    Quota(usize),
    #[error(transparent)]
    Name(#[from] LimitError),
    #[error(transparent)]
    Exhausted(#[from] IpamError),
    #[error("this site has no such endpoint")]
    Unknown,
}

/// Gives each named container of this host an endpoint record (key made
/// here, address from the pool), keeping the ones already saved, so that a
/// restart brings back the same key and address. `iface_of(n)` names the
/// `n`th endpoint's interface. The keys come from the OS's random source.
pub fn ensure_containers(
    state: &mut ServerState,
    names: &[String],
    iface_of: impl Fn(usize) -> String,
) -> Result<(), IpamError> {
    ensure_containers_with(state, names, iface_of, &KeySource::os())
}

/// [`ensure_containers`] with the keys from `keys`.
pub fn ensure_containers_with(
    state: &mut ServerState,
    names: &[String],
    iface_of: impl Fn(usize) -> String,
    keys: &KeySource,
) -> Result<(), IpamError> {
    let mut pool = pool_of(state)?;
    for (n, name) in names.iter().enumerate() {
        if state.containers.iter().any(|c| &c.container == name) {
            continue;
        }
        let address = pool.allocate()?;
        let mut iface = iface_of(n);
        let mut k = n;
        while state.containers.iter().any(|c| c.iface == iface) {
            k += 1;
            iface = iface_of(k);
        }
        state.containers.push(ContainerRecord {
            container: name.clone(),
            iface,
            private_key: keys.private_key(),
            address,
            by_label: false,
            driver: false,
        });
    }
    Ok(())
}

impl Ledger {
    /// A new endpoint for the hub's container `name` (attached by label or
    /// the network driver), on an interface named by `iface_of`; the one it
    /// has when it has one.
    pub fn add_container(
        &mut self,
        name: &str,
        driver: bool,
        iface_of: impl Fn(usize) -> String,
    ) -> Result<ContainerRecord, IpamError> {
        if let Some(c) = self.state.containers.iter().find(|c| c.container == name) {
            return Ok(c.clone());
        }
        let address = self.pool.allocate()?;
        let mut n = 0;
        let mut iface = iface_of(n);
        while self.state.containers.iter().any(|c| c.iface == iface) {
            n += 1;
            iface = iface_of(n);
        }
        let record = ContainerRecord {
            container: name.to_owned(),
            iface,
            private_key: self.keys.private_key(),
            address,
            by_label: !driver,
            driver,
        };
        self.state_mut().containers.push(record.clone());
        Ok(record)
    }

    /// The hub's container endpoint at `address` belongs to container `name`.
    pub fn rename_container(&mut self, address: IpAddr, name: &str) -> Result<(), RegisterError> {
        limits::check_name(name)?;
        if self
            .state
            .containers
            .iter()
            .any(|c| c.container == name && c.address != address)
        {
            return Err(RegisterError::NameTaken(name.to_owned()));
        }
        let i = self
            .state
            .containers
            .iter()
            .position(|c| c.address == address)
            .ok_or(RegisterError::Unknown)?;
        if self.state.containers[i].container != name {
            self.state_mut().containers[i].container = name.to_owned();
        }
        Ok(())
    }

    /// The hub's container `name` is gone: its endpoint and address too.
    pub fn remove_container(&mut self, name: &str) {
        if let Some(i) = self
            .state
            .containers
            .iter()
            .position(|c| c.container == name)
        {
            let c = self.state_mut().containers.remove(i);
            self.pool.release(c.address);
        }
    }

    /// Gives back the endpoint `key` of the site at `site` (its container
    /// was removed): the peer goes and its address is free again.
    pub fn release(&mut self, site: IpAddr, key: &PublicKey) -> Result<IpAddr, RegisterError> {
        let idx = self
            .state
            .peers
            .iter()
            .position(|p| p.public_key == *key && p.via == Some(site))
            .ok_or(RegisterError::Unknown)?;
        let p = self.state_mut().peers.remove(idx);
        self.pool.release(p.address);
        Ok(p.address)
    }

    /// Admits another endpoint (a container) of the site at `site`.
    /// Idempotent for the same key and name.
    pub fn register(
        &mut self,
        site: IpAddr,
        key: PublicKey,
        name: &str,
        now: SystemTime,
    ) -> Result<IpNetwork, RegisterError> {
        let prefix = self.state.subnet.prefix();
        let net = |a| IpNetwork::new(a, prefix).expect("an address of the subnet");
        if self.site(site).is_none() {
            return Err(RegisterError::NotASite(site));
        }
        limits::check_name(name)?;
        if let Some(i) = self.state.peers.iter().position(|p| p.public_key == key) {
            let p = &self.state.peers[i];
            if p.via != Some(site) {
                return Err(RegisterError::KeyInUse);
            }
            if p.name.as_deref() == Some(name) {
                return Ok(net(p.address));
            }
            // The same endpoint under a new name (its container is known
            // by name only once it started).
            if self
                .state
                .peers
                .iter()
                .any(|o| o.via == Some(site) && o.name.as_deref() == Some(name))
            {
                return Err(RegisterError::NameTaken(name.to_owned()));
            }
            let address = p.address;
            self.state_mut().peers[i].name = Some(name.to_owned());
            return Ok(net(address));
        }
        if self.key_in_use(&key) {
            return Err(RegisterError::KeyInUse);
        }
        if self.weak(&key) {
            return Err(RegisterError::WeakKey);
        }
        let mine = self.state.peers.iter().filter(|p| p.via == Some(site));
        let mut count = 0;
        for p in mine {
            if p.name.as_deref() == Some(name) {
                return Err(RegisterError::NameTaken(name.to_owned()));
            }
            count += 1;
        }
        if count >= self.quota {
            return Err(RegisterError::Quota(self.quota));
        }
        let address = self.pool.allocate()?;
        self.state_mut().peers.push(PeerRecord {
            public_key: key,
            address,
            joined_at: unix(now),
            name: Some(name.to_owned()),
            via: Some(site),
            endpoint: None,
            routes: vec![],
            snat_public: false,
            approved: Some(vec![]),
            road_warrior: false,
        });
        Ok(net(address))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ledger::testkit::*;

    #[test]
    fn register_quota_names_and_idempotence() {
        let mut l = ledger();
        let (site_addr, _) = site(&mut l, Some("b"));
        let k1 = key();
        let a1 = l.register(site_addr, k1, "web", t0()).unwrap();
        assert_eq!(
            l.register(site_addr, k1, "web", t0()).unwrap(),
            a1,
            "idempotent"
        );
        assert_eq!(
            l.register(site_addr, key(), "web", t0()),
            Err(RegisterError::NameTaken("web".into()))
        );
        // The same key under a new name renames the endpoint.
        assert_eq!(l.register(site_addr, k1, "db", t0()).unwrap(), a1);
        assert_eq!(
            l.register(site_addr, k1, "db", t0()).unwrap(),
            a1,
            "idempotent under the new name"
        );
        l.register(site_addr, key(), "web", t0()).unwrap();
        assert_eq!(
            l.register(site_addr, key(), "cache", t0()),
            Err(RegisterError::Quota(2))
        );
        assert!(matches!(
            l.register(site_addr, key(), "bad name", t0()),
            Err(RegisterError::Name(_))
        ));
        // Only sites register; not an invite's address, not an endpoint's.
        let tok = mint(&mut l, 1, None).remove(0);
        assert_eq!(
            l.register(tok.assigned, key(), "x", t0()),
            Err(RegisterError::NotASite(tok.assigned))
        );
        assert_eq!(
            l.register(a1.ip(), key(), "x", t0()),
            Err(RegisterError::NotASite(a1.ip()))
        );
    }

    #[test]
    fn containers_get_stable_records() {
        let mut s = state();
        let names = vec!["web".to_string(), "db".to_string()];
        ensure_containers(&mut s, &names, |n| format!("wgc{n}")).unwrap();
        let first = s.containers.clone();
        assert_eq!(first[0].address, ip("10.77.0.2"));
        assert_eq!(first[1].iface, "wgc1");
        ensure_containers(&mut s, &names, |n| format!("wgc{n}")).unwrap();
        assert_eq!(s.containers, first, "a restart keeps keys and addresses");
    }

    #[test]
    fn a_released_endpoint_frees_its_address() {
        let mut l = ledger();
        let (s, _) = site(&mut l, None);
        let k = key();
        let a = l.register(s, k, "web", t0()).unwrap();
        assert_eq!(l.release(ip("10.77.0.9"), &k), Err(RegisterError::Unknown));
        assert_eq!(l.release(s, &k).unwrap(), a.ip());
        assert!(!l.desired().contains_key(&k));
        assert_eq!(l.register(s, key(), "web", t0()).unwrap(), a);
    }

    #[test]
    fn container_keys_come_from_the_random_source_given() {
        let names = vec!["web".to_string(), "db".to_string()];
        let made = |seed| {
            let mut s = state();
            ensure_containers_with(
                &mut s,
                &names,
                |n| format!("wgc{n}"),
                &KeySource::new(Seeded::new(seed)),
            )
            .unwrap();
            s.containers
        };
        assert_eq!(made(9), made(9));
        assert_ne!(made(9)[0].private_key, made(10)[0].private_key);
        // So do those the hub adds while it runs.
        let added = |seed| {
            seeded(seed)
                .add_container("cache", false, |n| format!("wgc{n}"))
                .unwrap()
                .private_key
        };
        assert_eq!(added(3), added(3));
        assert_ne!(added(3), added(4));
    }
}
