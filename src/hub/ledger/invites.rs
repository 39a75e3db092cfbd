//! Invites: minting tokens (each with a fresh invite key) and forgetting
//! them when they expire.

use super::{Ledger, RouteError, unix, validate_routes};
use crate::ipam::IpamError;
use crate::limits::{self, LimitError};
use crate::state::InviteRecord;
use crate::token::Token;
use ipnetwork::IpNetwork;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why tokens were not minted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MintError {
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("the name {0:?} is already taken by a site or an unused token")]
    NameTaken(String),
    #[error("a name belongs to one site: mint named tokens one at a time")]
    NamedBatch,
    #[error(transparent)]
    Routes(#[from] RouteError),
    #[error(transparent)]
    Exhausted(#[from] IpamError),
}

/// What `tunnel token` and `serve --tokens` ask for.
#[derive(Debug, Clone)]
pub struct MintRequest {
    pub count: usize,
    pub ttl: Duration,
    pub endpoint_hint: Option<String>,
    pub name: Option<String>,
    /// Prefixes approved in advance for the site that redeems the token.
    pub routes: Vec<IpNetwork>,
}

impl Ledger {
    /// Issues invites and returns their tokens.
    pub fn mint(&mut self, req: &MintRequest, now: SystemTime) -> Result<Vec<Token>, MintError> {
        let count = limits::check_count(req.count as u64, 0)?;
        let ttl = limits::check_ttl(req.ttl)?;
        if let Some(n) = &req.name {
            limits::check_name(n)?;
            if count > 1 {
                return Err(MintError::NamedBatch);
            }
            if self.name_taken(n) {
                return Err(MintError::NameTaken(n.clone()));
            }
        }
        let expires = unix(now).saturating_add(ttl.as_secs());
        validate_routes(&req.routes, &self.state.subnets().all())?;
        let filter = self.route_filter();
        for r in &req.routes {
            filter.check(r)?;
        }
        let mut tokens = Vec::with_capacity(count);
        for _ in 0..count {
            let address = self.pool.allocate()?;
            let invite_key = self.keys.private_key();
            self.state_mut().invites.push(InviteRecord {
                public_key: invite_key.public_key(),
                address,
                expires,
                redeemed_by: None,
                name: req.name.clone(),
                routes: req.routes.clone(),
            });
            tokens.push(Token {
                server_public_key: self.state.private_key.public_key(),
                invite_key,
                port: self.state.port,
                subnet: self.state.subnet,
                subnet6: self.state.subnet6,
                assigned: address,
                server_address: self.pool.server_address(),
                expires,
                endpoint_hint: req.endpoint_hint.clone(),
                udp: self.offer.udp,
                websocket: self.offer.websocket.clone(),
            });
        }
        Ok(tokens)
    }

    /// When the next invite expires (by the wall clock); `None` when no
    /// invite is out. Redeemed invites count: they stay until they expire.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        let secs = self.state.invites.iter().map(|i| i.expires).min()?;
        Some(UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// Whether an invite has expired by `now`: [`Ledger::prune`] has work.
    pub fn any_expired(&self, now: SystemTime) -> bool {
        let now = unix(now);
        self.state.invites.iter().any(|i| i.expires <= now)
    }

    /// Forgets expired invites; unused ones give their address back.
    pub fn prune(&mut self, now: SystemTime) -> usize {
        if !self.any_expired(now) {
            return 0;
        }
        let now = unix(now);
        let (expired, live): (Vec<_>, Vec<_>) = self
            .state_mut()
            .invites
            .drain(..)
            .partition(|i| i.expires <= now);
        self.state.invites = live;
        for i in &expired {
            if i.redeemed_by.is_none() {
                self.pool.release(i.address);
            }
            self.pending.retain(|p| p.invite != i.public_key);
        }
        expired.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ledger::testkit::*;

    #[test]
    fn mint_allocates_in_order_and_keeps_only_the_public_half() {
        let mut l = ledger();
        let before = l.desired();
        let tokens = mint(&mut l, 2, None);
        assert_eq!(tokens[0].assigned, ip("10.77.0.2"));
        assert_eq!(tokens[1].assigned, ip("10.77.0.3"));
        assert_eq!(tokens[0].server_address, ip("10.77.0.1"));
        assert_eq!(tokens[0].expires, unix(t0()) + 60);
        let ops = diff(&before, &l.desired());
        assert_eq!(ops.len(), 2);
        assert!(
            matches!(&ops[0], Op::Upsert(p) if p.allowed_ips == vec![host_net(ip("10.77.0.2"))] || p.allowed_ips == vec![host_net(ip("10.77.0.3"))])
        );
        let json = serde_json::to_string(l.state()).unwrap();
        assert!(!json.contains(tokens[0].invite_key.to_base64().as_str()));
    }

    #[test]
    fn mint_bounds_and_names() {
        let mut l = ledger();
        let req = |count, ttl: u64, name: Option<&str>| MintRequest {
            count,
            ttl: Duration::from_secs(ttl),
            endpoint_hint: None,
            name: name.map(str::to_owned),
            routes: vec![],
        };
        assert!(matches!(
            l.mint(&req(1001, 60, None), t0()),
            Err(MintError::Limit(_))
        ));
        assert!(matches!(
            l.mint(&req(1, u64::MAX, None), t0()),
            Err(MintError::Limit(_))
        ));
        assert!(matches!(
            l.mint(&req(1, 60, Some("a b")), t0()),
            Err(MintError::Limit(_))
        ));
        assert_eq!(
            l.mint(&req(2, 60, Some("x")), t0()).unwrap_err(),
            MintError::NamedBatch
        );
        l.mint(&req(1, 60, Some("x")), t0()).unwrap();
        assert_eq!(
            l.mint(&req(1, 60, Some("x")), t0()).unwrap_err(),
            MintError::NameTaken("x".into())
        );
        assert!(l.state().invites.len() == 1, "refusals change nothing");
    }

    #[test]
    fn prune_frees_unused_addresses_only() {
        let mut l = ledger();
        let tok = mint(&mut l, 2, None);
        l.redeem(tok[0].assigned, key(), t0(), Instant::now())
            .unwrap();
        let before = l.desired();
        assert!(!l.any_expired(t0() + Duration::from_secs(59)));
        assert!(l.any_expired(t0() + Duration::from_secs(61)));
        assert_eq!(l.prune(t0() + Duration::from_secs(61)), 2);
        assert!(!l.any_expired(t0() + Duration::from_secs(61)));
        let ops = diff(&before, &l.desired());
        assert_eq!(ops.iter().filter(|o| matches!(o, Op::Remove(_))).count(), 2);
        assert!(
            !l.has_pending(),
            "a pending swap of an expired invite is dropped"
        );
        // .3 is free again; .2 stays with the admitted peer.
        assert_eq!(mint(&mut l, 1, None)[0].assigned, ip("10.77.0.3"));
    }

    #[test]
    fn two_ledgers_with_the_same_seed_mint_the_same_invite_keys() {
        let keys = |l: &mut Ledger| -> Vec<PublicKey> {
            mint(l, 3, None)
                .iter()
                .map(|t| t.invite_key.public_key())
                .collect()
        };
        let (mut a, mut b, mut c) = (seeded(42), seeded(42), seeded(43));
        let ka = keys(&mut a);
        assert_eq!(ka, keys(&mut b));
        assert_ne!(ka, keys(&mut c), "another seed, other keys");
        assert_eq!(
            a.state().invites,
            b.state().invites,
            "the same invites in the state too"
        );
    }

    #[test]
    fn an_undone_mint_does_not_mint_the_same_keys_again() {
        // The hub keeps a clone to restore when the device or the disk
        // fails: the restored ledger must not hand out the undone keys.
        let mut l = seeded(5);
        let mut snapshot = l.clone();
        let undone = mint(&mut l, 1, None).remove(0).invite_key.public_key();
        let again = mint(&mut snapshot, 1, None).remove(0);
        assert_eq!(again.assigned, ip("10.77.0.2"), "the address is reused");
        assert_ne!(again.invite_key.public_key(), undone, "the key is not");
    }

    #[test]
    fn the_next_expiry_is_the_first_invites_and_prune_is_due_then() {
        let mut l = ledger();
        assert_eq!(l.next_expiry(), None);
        mint(&mut l, 1, None);
        l.mint(
            &MintRequest {
                count: 1,
                ttl: Duration::from_secs(30),
                endpoint_hint: None,
                name: None,
                routes: vec![],
            },
            t0(),
        )
        .unwrap();
        let first = t0() + Duration::from_secs(30);
        assert_eq!(l.next_expiry(), Some(first));
        assert!(!l.any_expired(first - Duration::from_millis(1)));
        assert!(l.any_expired(first), "due at the deadline, not after");
        assert_eq!(l.prune(first), 1);
        assert_eq!(l.next_expiry(), Some(t0() + Duration::from_secs(60)));
    }
}
