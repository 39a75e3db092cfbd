//! Redeeming an invite, and the key swap that follows (see the two steps
//! in the [ledger's overview](super)): which swaps are pending, when one is
//! due, and what a restart resumes.

use super::{Joining, Ledger, RouteError, unix};
use crate::keys::PublicKey;
use crate::limits::{self, LimitError};
use crate::state::PeerRecord;
use ipnetwork::IpNetwork;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

/// How long a redeemed key may take to show up before the address moves anyway.
pub const SWAP_GRACE: Duration = Duration::from_secs(30);

/// Why a redeem was refused. The text goes back to the joiner.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RedeemError {
    #[error("no invite is waiting for {0}")]
    NoInvite(IpAddr),
    #[error("this token was already used")]
    AlreadyUsed,
    #[error("this token has expired")]
    Expired,
    #[error("that public key is already in use on this server")]
    KeyInUse,
    #[error("that public key is a low-order X25519 point and cannot be used")]
    WeakKey,
    #[error(transparent)]
    Routes(#[from] RouteError),
    #[error("the name {0:?} is already taken by another site; join with another --name")]
    NameTaken(String),
    #[error(transparent)]
    Name(#[from] LimitError),
}

#[derive(Debug, Clone)]
pub(super) struct Pending {
    pub(super) invite: PublicKey,
    pub(super) peer: PublicKey,
    pub(super) address: IpAddr,
    pub(super) since: Instant,
}

/// A swap completes once the new key has made a handshake, or once
/// [`SWAP_GRACE`] has passed whatever happened (its deadline,
/// [`Ledger::swap_deadline`]).
fn swap_due(p: &Pending, handshaked: impl Fn(&PublicKey) -> bool, now: Instant) -> bool {
    now >= p.since + SWAP_GRACE || handshaked(&p.peer)
}

impl Ledger {
    /// After a restart: swaps that were under way when the last run
    /// stopped (redeemed, the new key never seen) are under way again, so
    /// the joiner can still come back through its invite key, as a join
    /// that crashed and runs again does. Known peers are not touched.
    pub fn resume_swaps(&mut self, since: Instant) {
        let resumed: Vec<Pending> = self
            .state
            .invites
            .iter()
            .filter_map(|i| {
                let peer = i.redeemed_by?;
                self.state
                    .peers
                    .iter()
                    .any(|p| p.public_key == peer && p.address == i.address && p.endpoint.is_none())
                    .then_some(Pending {
                        invite: i.public_key,
                        peer,
                        address: i.address,
                        since,
                    })
            })
            .filter(|r| !self.pending.iter().any(|p| p.peer == r.peer))
            .collect();
        self.pending.extend(resumed);
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The key that redeemed the invite for `address`, if it was.
    pub fn redeemed_by(&self, address: IpAddr) -> Option<PublicKey> {
        self.state
            .invites
            .iter()
            .find(|i| i.address == address)
            .and_then(|i| i.redeemed_by)
    }

    /// A redeem sent again by a joiner that did not get (or lost) the
    /// answer: it must ask for exactly what it asked before, and then gets
    /// the same answer, the site's name; anything else is a reuse.
    pub fn repeated_redeem(
        &self,
        address: IpAddr,
        joining: &Joining,
    ) -> Result<Option<String>, RedeemError> {
        let p = self.site(address).ok_or(RedeemError::AlreadyUsed)?;
        let same_name = joining.default_name
            || joining.name.is_none()
            || p.name.as_deref() == joining.name.as_deref();
        if p.routes == joining.routes && p.snat_public == joining.snat_public && same_name {
            Ok(p.name.clone())
        } else {
            Err(RedeemError::AlreadyUsed)
        }
    }

    /// Admits `key` in place of the invite for `address`, whose key signed
    /// the request. A retry with the same key (the reply was lost) gets the
    /// same answer.
    pub fn redeem(
        &mut self,
        address: IpAddr,
        key: PublicKey,
        now: SystemTime,
        since: Instant,
    ) -> Result<IpNetwork, RedeemError> {
        let assigned = IpNetwork::new(address, self.state.subnet.prefix())
            .map_err(|_| RedeemError::NoInvite(address))?;
        let idx = self
            .state
            .invites
            .iter()
            .position(|i| i.address == address)
            .ok_or(RedeemError::NoInvite(address))?;
        let invite = self.state.invites[idx].clone();
        match invite.redeemed_by {
            Some(k) if k == key => return Ok(assigned),
            Some(_) => return Err(RedeemError::AlreadyUsed),
            None => {}
        }
        if invite.expires <= unix(now) {
            return Err(RedeemError::Expired);
        }
        if self.key_in_use(&key) {
            return Err(RedeemError::KeyInUse);
        }
        if self.weak(&key) {
            return Err(RedeemError::WeakKey);
        }
        self.state_mut().invites[idx].redeemed_by = Some(key);
        self.state_mut().peers.push(PeerRecord {
            public_key: key,
            address,
            joined_at: unix(now),
            name: invite.name.clone(),
            via: None,
            endpoint: None,
            routes: vec![],
            snat_public: false,
            approved: Some(invite.routes.clone()),
            road_warrior: false,
        });
        self.pending.push(Pending {
            invite: invite.public_key,
            peer: key,
            address,
            since,
        });
        Ok(assigned)
    }

    /// Names the site just admitted at `address`: the name its token was
    /// minted with, else `wanted`. A `wanted` name that another site has is
    /// refused, unless it is only a default (the host name), which then
    /// gets a number (`name-2`, ...). Returns the site's name.
    pub fn name_site(
        &mut self,
        address: IpAddr,
        wanted: Option<&str>,
        default: bool,
    ) -> Result<Option<String>, RedeemError> {
        let idx = self
            .state
            .peers
            .iter()
            .position(|p| p.address == address && p.via.is_none())
            .ok_or(RedeemError::NoInvite(address))?;
        if let Some(n) = &self.state.peers[idx].name {
            return Ok(Some(n.clone()));
        }
        let Some(wanted) = wanted else {
            return Ok(None);
        };
        let name = if default {
            let base = limits::check_name(wanted).unwrap_or("site").to_owned();
            let mut name = base.clone();
            let mut n = 2;
            while self.name_taken(&name) {
                name = format!("{base}-{n}");
                n += 1;
            }
            name
        } else {
            limits::check_name(wanted)?;
            if self.name_taken(wanted) {
                return Err(RedeemError::NameTaken(wanted.to_owned()));
            }
            wanted.to_owned()
        };
        self.state_mut().peers[idx].name = Some(name.clone());
        Ok(Some(name))
    }

    /// Moves addresses from redeemed invites to the keys that replaced
    /// them, once `handshaked(key)` says the key is in use, or after
    /// [`SWAP_GRACE`]. Returns the moves made.
    pub fn complete_swaps(
        &mut self,
        handshaked: impl Fn(&PublicKey) -> bool,
        now: Instant,
    ) -> Vec<(IpAddr, PublicKey)> {
        let (done, waiting): (Vec<_>, Vec<_>) = self
            .pending
            .drain(..)
            .partition(|p| swap_due(p, &handshaked, now));
        self.pending = waiting;
        done.into_iter().map(|p| (p.address, p.peer)).collect()
    }

    /// When the first pending swap completes whatever the device says
    /// (its grace has passed); `None` when none is pending.
    pub fn swap_deadline(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.since + SWAP_GRACE).min()
    }

    /// Whether [`Ledger::complete_swaps`] would move anything.
    pub fn swaps_due(&self, handshaked: impl Fn(&PublicKey) -> bool, now: Instant) -> bool {
        self.pending.iter().any(|p| swap_due(p, &handshaked, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ledger::testkit::*;

    #[test]
    fn redeem_then_swap_after_handshake() {
        let mut l = ledger();
        let tok = mint(&mut l, 1, None).remove(0);
        let invite = tok.invite_key.public_key();
        let joiner = key();
        let before = l.desired();
        let net = l
            .redeem(tok.assigned, joiner, t0(), Instant::now())
            .unwrap();
        assert_eq!(net.to_string(), "10.77.0.2/24");
        // The reply must still route to the invite: the new key has no address yet.
        assert_eq!(
            diff(&before, &l.desired()),
            vec![Op::Upsert(PeerSpec {
                public_key: joiner,
                endpoint: None,
                allowed_ips: vec![],
                keepalive: None
            })]
        );
        assert!(!l.swaps_due(|_| false, Instant::now()));
        assert!(l.complete_swaps(|_| false, Instant::now()).is_empty());
        assert!(l.swaps_due(|k| *k == joiner, Instant::now()));
        assert!(!l.swaps_due(|k| *k == invite, Instant::now()));
        let before = l.desired();
        assert_eq!(l.complete_swaps(|k| *k == joiner, Instant::now()).len(), 1);
        assert!(
            !l.swaps_due(|_| true, Instant::now()),
            "nothing is left pending"
        );
        let ops = diff(&before, &l.desired());
        assert_eq!(
            ops,
            vec![
                Op::SetAllowedIps(invite, vec![]),
                Op::SetAllowedIps(joiner, vec![host_net(tok.assigned)])
            ]
        );
        assert!(!l.has_pending());
        // A swap also completes after the grace period, handshake or not.
        let tok = mint(&mut l, 1, None).remove(0);
        let start = Instant::now();
        l.redeem(tok.assigned, key(), t0(), start).unwrap();
        assert_eq!(l.swap_deadline(), Some(start + SWAP_GRACE));
        let just_before = start + SWAP_GRACE - Duration::from_millis(1);
        assert!(l.complete_swaps(|_| false, just_before).is_empty());
        assert_eq!(l.complete_swaps(|_| false, start + SWAP_GRACE).len(), 1);
        assert_eq!(l.swap_deadline(), None);
    }

    #[test]
    fn reuse_is_refused_but_a_retry_with_the_same_key_is_not() {
        let mut l = ledger();
        let tok = mint(&mut l, 1, None).remove(0);
        let first = key();
        l.redeem(tok.assigned, first, t0(), Instant::now()).unwrap();
        let snapshot = l.state().clone();
        assert!(l.redeem(tok.assigned, first, t0(), Instant::now()).is_ok());
        assert_eq!(l.state(), &snapshot, "a retry changes nothing");
        // A restart before the new key was seen: the invite keeps the
        // address (the joiner can come back through it) until it is.
        let mut restarted = Ledger::new(snapshot.clone(), 2).unwrap();
        restarted.resume_swaps(Instant::now());
        assert!(restarted.has_pending());
        let invite = tok.invite_key.public_key();
        assert!(!restarted.desired()[&invite].allowed_ips.is_empty());
        assert!(restarted.desired()[&first].allowed_ips.is_empty());
        assert!(
            restarted
                .redeem(tok.assigned, first, t0(), Instant::now())
                .is_ok()
        );
        assert_eq!(
            l.redeem(tok.assigned, key(), t0(), Instant::now()),
            Err(RedeemError::AlreadyUsed)
        );
    }

    #[test]
    fn unknown_address_and_expiry() {
        let mut l = ledger();
        let tok = mint(&mut l, 1, None).remove(0);
        let stranger = ip("10.77.0.9");
        assert_eq!(
            l.redeem(stranger, key(), t0(), Instant::now()),
            Err(RedeemError::NoInvite(stranger))
        );
        let late = t0() + Duration::from_secs(61);
        assert_eq!(
            l.redeem(tok.assigned, key(), late, Instant::now()),
            Err(RedeemError::Expired)
        );
    }

    #[test]
    fn sites_are_named_by_token_then_flag_then_numbered_host_name() {
        let mut l = ledger();
        l.state_mut().name = Some("hq".into());
        let (token_named, _) = site(&mut l, Some("paris"));
        assert_eq!(
            l.name_site(token_named, Some("other"), false)
                .unwrap()
                .as_deref(),
            Some("paris"),
            "the token's name wins"
        );
        let (a, _) = site(&mut l, None);
        assert_eq!(
            l.name_site(a, Some("lyon"), false).unwrap().as_deref(),
            Some("lyon")
        );
        let t = mint(&mut l, 1, None).remove(0);
        l.redeem(t.assigned, key(), t0(), Instant::now()).unwrap();
        assert_eq!(
            l.name_site(t.assigned, Some("lyon"), false),
            Err(RedeemError::NameTaken("lyon".into()))
        );
        // The hub's own name counts, and a default name is numbered.
        assert_eq!(
            l.name_site(t.assigned, Some("hq"), true)
                .unwrap()
                .as_deref(),
            Some("hq-2")
        );
    }

    #[test]
    fn invite_addresses_are_quarantined_until_the_joiner_key_takes_over() {
        let mut l = ledger();
        let t = mint(&mut l, 1, None).remove(0);
        assert_eq!(l.quarantined(), [t.assigned]);
        let k = key();
        l.redeem(t.assigned, k, t0(), Instant::now()).unwrap();
        assert_eq!(l.quarantined(), [t.assigned], "the invite still holds it");
        l.complete_swaps(|_| true, Instant::now());
        assert!(l.quarantined().is_empty());
    }

    #[test]
    fn a_repeated_redeem_must_ask_for_the_same() {
        let mut l = ledger();
        let t = mint(&mut l, 1, None).remove(0);
        let k = key();
        l.redeem(t.assigned, k, t0(), Instant::now()).unwrap();
        l.name_site(t.assigned, Some("host"), true).unwrap();
        l.advertise(t.assigned, vec![net("192.168.5.0/24")])
            .unwrap();
        let same = Joining {
            routes: vec![net("192.168.5.0/24")],
            snat_public: false,
            name: Some("host".into()),
            default_name: true,
        };
        assert_eq!(
            l.repeated_redeem(t.assigned, &same),
            Ok(Some("host".into()))
        );
        for other in [
            Joining {
                routes: vec![net("192.168.6.0/24")],
                ..same.clone()
            },
            Joining {
                snat_public: true,
                ..same.clone()
            },
        ] {
            assert_eq!(
                l.repeated_redeem(t.assigned, &other),
                Err(RedeemError::AlreadyUsed)
            );
        }
    }
}
