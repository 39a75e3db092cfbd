//! A host's rules while it runs: applied from a [`Policy`], changed when
//! the policy changes, put back when someone removes them, removed on
//! exit; and the fallback where nftables is missing.

use super::{Firewall, FirewallError, Foreign, Policy, Table, plan, table_name};
use ipnetwork::IpNetwork;

/// A host's rules while it runs: applied, checked, put back, removed.
pub struct Guard {
    fw: Box<dyn Firewall>,
    table: Table,
    foreign: Foreign,
    /// Whether Docker's chain held our rules when last applied.
    docker: bool,
}

impl Guard {
    /// Applies the plan for `policy`.
    pub fn apply(fw: Box<dyn Firewall>, policy: &Policy) -> Result<Self, FirewallError> {
        let (table, foreign) = plan(policy);
        fw.apply(&table)?;
        let docker = if foreign.is_empty() {
            fw.close_docker(&foreign.tag)?;
            false
        } else {
            fw.open_docker(&foreign)?
        };
        if docker {
            tracing::info!(
                "opened Docker's FORWARD chain (DOCKER-USER) for the tunnel's own forwarding"
            );
        }
        Ok(Self {
            fw,
            table,
            foreign,
            docker,
        })
    }

    /// Applies a changed policy (routes, endpoints) when it differs.
    pub fn update(&mut self, policy: &Policy) -> Result<(), FirewallError> {
        let (table, foreign) = plan(policy);
        if table != self.table {
            self.fw.apply(&table)?;
            self.table = table;
        }
        if foreign != self.foreign {
            self.docker = if foreign.is_empty() {
                self.fw.close_docker(&foreign.tag)?;
                false
            } else {
                self.fw.open_docker(&foreign)?
            };
            self.foreign = foreign;
        }
        Ok(())
    }

    /// Puts back what someone removed (`nft flush ruleset`, a firewalld
    /// reload, Docker restarting); true when something was missing.
    pub fn repair(&mut self) -> Result<bool, FirewallError> {
        let mut repaired = false;
        if !self.fw.exists(&self.table.name)? {
            tracing::warn!(
                "nftables table {} was removed from outside; putting it back",
                self.table.name
            );
            self.fw.apply(&self.table)?;
            repaired = true;
        }
        if !self.foreign.is_empty() && !self.fw.docker_open(&self.foreign)? {
            // Docker's chain may have been created since, or flushed.
            if self.fw.open_docker(&self.foreign)? {
                if self.docker {
                    tracing::warn!(
                        "our rules in Docker's DOCKER-USER chain were removed; putting them back"
                    );
                } else {
                    tracing::info!("Docker's FORWARD chain appeared; opened it for the tunnel");
                }
                self.docker = true;
                repaired = true;
            }
        }
        Ok(repaired)
    }

    pub fn table_name(&self) -> &str {
        &self.table.name
    }

    /// Removes everything this guard added.
    pub fn remove(self) {
        if let Err(e) = self.fw.remove(&self.table.name) {
            tracing::warn!("removing nftables table {}: {e}", self.table.name);
        }
        if let Err(e) = self.fw.close_docker(&self.foreign.tag) {
            tracing::warn!("removing our rules from Docker's chain: {e}");
        }
    }
}

/// A host's firewall as it starts.
pub enum Setup {
    /// Our table is in place (and Docker's chain opened, if there is one).
    Guarded(Guard),
    /// nftables is missing: the userspace device drops what leaves or
    /// enters these networks itself.
    Fallback(Vec<IpNetwork>),
    /// `--firewall off`.
    Off,
}

impl Setup {
    /// Applies `policy` unless the firewall is off; where nftables is
    /// missing, says so once and falls back to the userspace device
    /// confining the tunnel to `tunnel_nets` and the policy's routes.
    pub fn start(
        fw: Box<dyn Firewall>,
        policy: &Policy,
        enabled: bool,
        tunnel_nets: &[IpNetwork],
    ) -> Result<Self, FirewallError> {
        if !enabled {
            tracing::warn!(
                "--firewall off: no forwarding confinement, no masquerade rules, no port restriction"
            );
            return Ok(Setup::Off);
        }
        clean_up(fw.as_ref(), &policy.iface);
        match Guard::apply(fw, policy) {
            Ok(g) => Ok(Setup::Guarded(g)),
            Err(FirewallError::Unsupported(e)) => {
                tracing::warn!(
                    "nftables is not available here ({e}); the userspace device itself drops packets between the tunnel and other networks, and masquerading and --allow-from are off"
                );
                let mut nets = tunnel_nets.to_vec();
                nets.extend(policy.routes.iter().copied());
                Ok(Setup::Fallback(nets))
            }
            Err(e) => Err(e),
        }
    }

    /// What the userspace device must drop by itself.
    pub fn confine(&self) -> Option<Vec<IpNetwork>> {
        match self {
            Setup::Fallback(nets) => Some(nets.clone()),
            _ => None,
        }
    }

    pub fn guard(&mut self) -> Option<&mut Guard> {
        match self {
            Setup::Guarded(g) => Some(g),
            _ => None,
        }
    }

    /// Removes what it added.
    pub fn remove(self) {
        if let Setup::Guarded(g) = self {
            g.remove();
        }
    }
}

/// Removes what a crashed run with this interface left (the table is
/// replaced anyway; Docker's chain is not ours to replace).
pub fn clean_up(fw: &dyn Firewall, iface: &str) {
    let name = table_name(iface);
    let _ = fw.close_docker(&name);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::Rule;
    use crate::firewall::fake::FakeFirewall;
    use std::sync::Arc;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn the_guard_repairs_a_flushed_ruleset_and_removes_all_on_exit() {
        let fw = std::sync::Arc::new(FakeFirewall::default());
        *fw.docker.lock().unwrap() = Some(vec![]);
        let policy = Policy {
            iface: "wg0".into(),
            hub: true,
            ..Default::default()
        };
        let mut g = Guard::apply(Box::new(fw.clone()), &policy).unwrap();
        assert!(fw.exists("tunnel-wg0").unwrap() && fw.docker_open(&ours()).unwrap());
        assert!(!g.repair().unwrap(), "nothing to repair");
        // nft flush ruleset: both gone.
        fw.tables.lock().unwrap().clear();
        fw.docker.lock().unwrap().as_mut().unwrap().clear();
        assert!(g.repair().unwrap());
        assert!(fw.exists("tunnel-wg0").unwrap() && fw.docker_open(&ours()).unwrap());
        g.update(&Policy {
            routes: vec![net("192.168.7.0/24")],
            ..policy
        })
        .unwrap();
        assert_eq!(fw.docker.lock().unwrap().as_ref().unwrap().len(), 3);
        g.remove();
        assert!(!fw.exists("tunnel-wg0").unwrap());
        assert!(fw.docker.lock().unwrap().as_ref().unwrap().is_empty());
    }

    /// Our rules' tag, as Docker's chain is searched for it.
    fn ours() -> Foreign {
        Foreign {
            tag: "tunnel-wg0".into(),
            rules: vec![],
            rules6: vec![],
        }
    }

    fn hub() -> Policy {
        Policy {
            iface: "wg0".into(),
            hub: true,
            ..Default::default()
        }
    }

    #[test]
    fn without_dockers_chain_nothing_is_opened_and_one_that_appears_later_is() {
        let fw = Arc::new(FakeFirewall::default());
        let mut g = Guard::apply(Box::new(fw.clone()), &hub()).unwrap();
        assert!(fw.exists("tunnel-wg0").unwrap());
        assert!(!g.repair().unwrap(), "no chain: nothing to repair");
        // Docker started after us.
        *fw.docker.lock().unwrap() = Some(vec![]);
        assert!(g.repair().unwrap());
        assert!(fw.docker_open(&ours()).unwrap());
        g.remove();
        assert!(!fw.docker_open(&ours()).unwrap());
    }

    #[test]
    fn an_update_writes_only_what_changed() {
        let fw = Arc::new(FakeFirewall::default());
        let mut g = Guard::apply(Box::new(fw.clone()), &hub()).unwrap();
        // Gone behind the guard's back: the same policy again does not
        // write it (only repair does), a changed one does.
        fw.tables.lock().unwrap().clear();
        g.update(&hub()).unwrap();
        assert!(
            !fw.exists("tunnel-wg0").unwrap(),
            "an unchanged table was written"
        );
        let routed = Policy {
            routes: vec![net("192.168.7.0/24")],
            ..hub()
        };
        g.update(&routed).unwrap();
        let written = fw.tables.lock().unwrap()["tunnel-wg0"].clone();
        assert_eq!(written, plan(&routed).0);
    }

    #[test]
    fn where_nftables_is_missing_the_device_confines_the_tunnel_and_its_routes() {
        let fw = FakeFirewall {
            missing: true,
            ..Default::default()
        };
        let policy = Policy {
            routes: vec![net("192.168.7.0/24")],
            ..hub()
        };
        let mut s = Setup::start(Box::new(fw), &policy, true, &[net("10.77.0.0/24")]).unwrap();
        assert_eq!(
            s.confine(),
            Some(vec![net("10.77.0.0/24"), net("192.168.7.0/24")])
        );
        assert!(s.guard().is_none());
    }

    #[test]
    fn with_the_firewall_off_nothing_is_applied_and_nothing_confined() {
        let fw = Arc::new(FakeFirewall::default());
        let mut s = Setup::start(Box::new(fw.clone()), &hub(), false, &[]).unwrap();
        assert!(matches!(s, Setup::Off));
        assert!(s.confine().is_none() && s.guard().is_none());
        assert!(fw.tables.lock().unwrap().is_empty());
    }

    #[test]
    fn a_start_clears_a_crashed_runs_rules_from_dockers_chain_and_only_ours() {
        let fw = Arc::new(FakeFirewall::default());
        let stale = Rule {
            matches: vec![],
            action: crate::firewall::Action::Accept,
        };
        *fw.docker.lock().unwrap() = Some(vec![
            ("tunnel-wg0".into(), stale.clone()),
            ("tunnel-wg1".into(), stale.clone()),
        ]);
        // A site without routes has nothing to put there.
        let site = Policy {
            iface: "wg0".into(),
            ..Default::default()
        };
        let s = Setup::start(Box::new(fw.clone()), &site, true, &[]).unwrap();
        assert!(matches!(s, Setup::Guarded(_)));
        assert_eq!(
            *fw.docker.lock().unwrap(),
            Some(vec![("tunnel-wg1".to_owned(), stale)])
        );
    }
}
