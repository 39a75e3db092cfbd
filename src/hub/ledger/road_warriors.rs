//! Road warriors: stock WireGuard clients (a phone, a laptop) admitted by
//! the hub operator with a key made on the device (`tunnel peer add`).
//! They hold an address and nothing else: no LANs, no endpoints.

use super::{Ledger, unix};
use crate::ipam::IpamError;
use crate::keys::PublicKey;
use crate::limits::{self, LimitError};
use crate::state::PeerRecord;
use std::net::IpAddr;
use std::time::SystemTime;

/// Why a stock WireGuard client (`peer add`) was not admitted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmitError {
    #[error(transparent)]
    Name(#[from] LimitError),
    #[error("the name {0:?} is already taken by a site or an unused token")]
    NameTaken(String),
    #[error("that public key is already in use on this server")]
    KeyInUse,
    #[error("that public key is a low-order X25519 point and cannot be used")]
    WeakKey,
    #[error(transparent)]
    Exhausted(#[from] IpamError),
}

impl Ledger {
    /// Admits a stock WireGuard client (a phone, a laptop) under `name`
    /// with a key made on that device: a peer like a site, with no invite
    /// to redeem and no key to swap. Returns its address.
    pub fn admit(
        &mut self,
        name: &str,
        key: PublicKey,
        now: SystemTime,
    ) -> Result<IpAddr, AdmitError> {
        limits::check_name(name)?;
        if self.name_taken(name) {
            return Err(AdmitError::NameTaken(name.to_owned()));
        }
        if self.key_in_use(&key) {
            return Err(AdmitError::KeyInUse);
        }
        if self.weak(&key) {
            return Err(AdmitError::WeakKey);
        }
        let address = self.pool.allocate()?;
        self.state_mut().peers.push(PeerRecord {
            public_key: key,
            address,
            joined_at: unix(now),
            name: Some(name.to_owned()),
            via: None,
            endpoint: None,
            routes: vec![],
            snat_public: false,
            approved: Some(vec![]),
            road_warrior: true,
        });
        Ok(address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ledger::testkit::*;

    #[test]
    fn a_stock_client_is_admitted_once_under_a_free_name_and_revoked_like_a_site() {
        let mut l = ledger();
        let k = key();
        let a = l.admit("phone", k, t0()).unwrap();
        let desired = l.desired();
        assert_eq!(desired[&k].allowed_ips, vec![host_net(a)]);
        assert_eq!(
            l.admit("phone", key(), t0()),
            Err(AdmitError::NameTaken("phone".into()))
        );
        assert_eq!(l.admit("laptop", k, t0()), Err(AdmitError::KeyInUse));
        assert_eq!(
            l.admit("laptop", PublicKey([0; 32]), t0()),
            Err(AdmitError::WeakKey)
        );
        assert!(matches!(
            l.admit("bad name!", key(), t0()),
            Err(AdmitError::Name(_))
        ));
        l.revoke("phone").unwrap();
        assert!(!l.desired().contains_key(&k));
        // The address and the name are free again.
        assert_eq!(l.admit("phone", key(), t0()).unwrap(), a);
    }

    #[test]
    fn a_road_warrior_is_no_site_and_approves_nothing() {
        let mut l = ledger();
        let rw = l.admit("phone", key(), t0()).unwrap();
        assert!(l.site(rw).is_none());
        assert!(matches!(
            l.advertise(rw, vec![net("192.168.9.0/24")]),
            Err(RouteError::NotASite(_))
        ));
        assert!(matches!(
            l.register(rw, key(), "web", t0()),
            Err(RegisterError::NotASite(_))
        ));
        assert!(matches!(
            l.approve("phone", net("192.168.9.0/24")),
            Err(RouteError::RoadWarrior(_))
        ));
    }
}
