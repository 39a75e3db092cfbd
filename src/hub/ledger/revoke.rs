//! Revoking: a site with the endpoints it registered, a road warrior, or
//! an unused token, by name or address, never a guess between several.

use super::Ledger;
use crate::keys::PublicKey;
use crate::state::PeerRecord;
use std::net::IpAddr;

/// Why nothing was revoked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RevokeError {
    #[error("no peer or unused token is named or addressed {0:?}")]
    NotFound(String),
    #[error("{target:?} is ambiguous: it names {}; revoke by address instead", candidates.join(", "))]
    Ambiguous {
        target: String,
        candidates: Vec<String>,
    },
    #[error(
        "{0} is one of this hub's own containers; drop its --container from `tunnel serve` instead"
    )]
    HubContainer(String),
}

impl Ledger {
    /// What `target` (a name or an address) names, as "address (what)".
    fn candidates(&self, target: &str) -> Vec<(IpAddr, String)> {
        let addr: Option<IpAddr> = target.parse().ok();
        let hit = |name: &Option<String>, a: IpAddr| {
            Some(a) == addr || (addr.is_none() && name.as_deref() == Some(target))
        };
        let mut out = Vec::new();
        for p in &self.state.peers {
            if hit(&p.name, p.address) {
                let what = match (p.via, &p.name) {
                    (None, Some(n)) => n.clone(),
                    (None, None) => "site".to_owned(),
                    (Some(v), n) => {
                        format!(
                            "container {} on {}",
                            n.as_deref().unwrap_or("?"),
                            self.site_label(v)
                        )
                    }
                };
                out.push((p.address, what));
            }
        }
        for i in self
            .state
            .invites
            .iter()
            .filter(|i| i.redeemed_by.is_none())
        {
            if hit(&i.name, i.address) {
                let what = match &i.name {
                    Some(n) => format!("unused token {n}"),
                    None => "unused token".to_owned(),
                };
                out.push((i.address, what));
            }
        }
        out
    }

    fn site_label(&self, addr: IpAddr) -> String {
        match self.site(addr).and_then(|s| s.name.as_deref()) {
            Some(n) => n.to_owned(),
            None => format!("site {addr}"),
        }
    }

    /// Removes a peer (by name or address) with the endpoints it
    /// registered, or an unused invite; their addresses become free.
    /// Returns what was removed, as "address (what)".
    pub fn revoke(&mut self, target: &str) -> Result<Vec<String>, RevokeError> {
        let found = self.candidates(target);
        let (addr, what) = match found.as_slice() {
            [] => {
                if let Some(c) = self
                    .state
                    .containers
                    .iter()
                    .find(|c| c.container == target || c.address.to_string() == target)
                {
                    return Err(RevokeError::HubContainer(c.container.clone()));
                }
                return Err(RevokeError::NotFound(target.to_owned()));
            }
            [one] => one.clone(),
            many => {
                return Err(RevokeError::Ambiguous {
                    target: target.to_owned(),
                    candidates: many.iter().map(|(a, w)| format!("{a} ({w})")).collect(),
                });
            }
        };
        let mut removed = vec![format!("{addr} ({what})")];
        let is_site = self.site(addr).is_some();
        let gone = |p: &PeerRecord| p.address == addr || (is_site && p.via == Some(addr));
        let (out, kept): (Vec<_>, Vec<_>) = self.state_mut().peers.drain(..).partition(gone);
        self.state.peers = kept;
        for p in &out {
            self.pool.release(p.address);
            if p.address != addr {
                removed.push(format!(
                    "{} (container {})",
                    p.address,
                    p.name.as_deref().unwrap_or("?")
                ));
            }
        }
        // The invite at that address goes too, used or not.
        self.state.invites.retain(|i| i.address != addr);
        self.pool.release(addr);
        let keys: Vec<PublicKey> = out.iter().map(|p| p.public_key).collect();
        self.pending
            .retain(|p| p.address != addr && !keys.contains(&p.peer));
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ledger::testkit::*;

    #[test]
    fn revoke_removes_a_site_with_its_endpoints_and_refuses_ambiguity() {
        let mut l = Ledger::new(state(), 8).unwrap();
        let (b, _) = site(&mut l, Some("b"));
        let (c, _) = site(&mut l, Some("c"));
        l.register(b, key(), "web", t0()).unwrap();
        l.register(c, key(), "web", t0()).unwrap();
        let before = l.state().clone();
        let err = l.revoke("web").unwrap_err();
        assert!(
            matches!(&err, RevokeError::Ambiguous { candidates, .. } if candidates.len() == 2),
            "{err}"
        );
        assert!(err.to_string().contains("(container web on b)"), "{err}");
        assert_eq!(l.state(), &before, "a refusal changes nothing");
        assert_eq!(l.revoke("nope"), Err(RevokeError::NotFound("nope".into())));

        let desired = l.desired();
        let removed = l.revoke("b").unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert_eq!(removed[0], format!("{b} (b)"));
        let ops = diff(&desired, &l.desired());
        assert_eq!(
            ops.iter().filter(|o| matches!(o, Op::Remove(_))).count(),
            3,
            "site, its endpoint, its used invite: {ops:?}"
        );
        // The other web is now unique; addresses are free again.
        assert_eq!(l.revoke("web").unwrap().len(), 1);
        let t = mint(&mut l, 1, None).remove(0);
        assert_eq!(t.assigned, b);
    }

    #[test]
    fn revoke_cancels_unused_tokens_but_not_hub_containers() {
        let mut s = state();
        ensure_containers(&mut s, &["web".into()], |n| format!("wgc{n}")).unwrap();
        let mut l = Ledger::new(s, 2).unwrap();
        mint(&mut l, 1, Some("branch"));
        assert_eq!(
            l.revoke("branch").unwrap(),
            vec!["10.77.0.3 (unused token branch)".to_string()]
        );
        assert!(l.state().invites.is_empty());
        assert_eq!(
            l.revoke("web"),
            Err(RevokeError::HubContainer("web".into()))
        );
    }
}
