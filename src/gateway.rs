//! What a host changes beyond its tunnel interface: our nftables table
//! (through [`crate::firewall`]), forwarding on the links that need it,
//! and the routing table and policy rules of transparent mode.
//!
//! Every such change is written to a journal in the state directory
//! (`<iface>.host`) before it is made. A clean exit undoes the journal and
//! removes it; the next start undoes what a crash left in it, so a
//! SIGKILL leaves no forwarding switched on and no rule behind for long.

use crate::firewall::{self, Firewall, FirewallError, Policy, Setup};
use crate::net::{NetError, NetOps, PolicyRule};
use crate::store::{StateDir, StateError, write_atomic};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{path}: not a journal of host changes ({source}); remove it once the host is checked")]
    Journal {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// A route in a table of our own (transparent mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRoute {
    pub dst: IpNetwork,
    pub iface: String,
    pub table: u32,
}

/// What this run changed on the host, as saved before each change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// Links whose IPv4 forwarding was off and that we turned on.
    #[serde(default)]
    pub forwarding: Vec<String>,
    /// IPv6 forwarding (host-wide) was off and we turned it on.
    #[serde(default)]
    pub forwarding6: bool,
    /// Links whose `accept_ra` we raised from 1 to 2 so that they keep
    /// their SLAAC addresses while the host forwards IPv6.
    #[serde(default)]
    pub accept_ra: Vec<String>,
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
    #[serde(default)]
    pub routes: Vec<TableRoute>,
}

impl Journal {
    fn is_empty(&self) -> bool {
        *self == Journal::default()
    }
}

/// The journal of one endpoint, kept on disk while it runs.
pub struct Changes {
    journal: Journal,
    path: PathBuf,
}

impl Changes {
    /// Undoes what a previous run of `iface` left (it crashed), then starts
    /// an empty journal.
    pub async fn recover(
        net: &dyn NetOps,
        store: &StateDir,
        iface: &str,
    ) -> Result<Self, GatewayError> {
        let path = store.root().join(format!("{iface}.host"));
        match std::fs::read(&path) {
            Ok(bytes) => {
                let journal: Journal =
                    serde_json::from_slice(&bytes).map_err(|source| GatewayError::Journal {
                        path: path.clone(),
                        source,
                    })?;
                if !journal.is_empty() {
                    tracing::info!(
                        "undoing the host changes a previous run of {iface} left ({})",
                        path.display()
                    );
                }
                let left = Changes {
                    journal,
                    path: path.clone(),
                };
                left.undo(net).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StateError::Io { path, source: e }.into());
            }
        }
        Ok(Changes {
            journal: Journal::default(),
            path,
        })
    }

    fn save(&self) -> Result<(), GatewayError> {
        if let Some(dir) = self.path.parent() {
            StateDir::new(dir).ensure()?;
        }
        let json = serde_json::to_vec_pretty(&self.journal).expect("journal serializes");
        Ok(write_atomic(&self.path, &json)?)
    }

    /// IPv4 forwarding on for each of `links` that lacks it.
    pub async fn enable_forwarding(
        &mut self,
        net: &dyn NetOps,
        links: &[String],
    ) -> Result<(), GatewayError> {
        for l in links {
            if self.journal.forwarding.contains(l) || net.forwarding(l).await? {
                continue;
            }
            self.journal.forwarding.push(l.clone());
            self.save()?;
            net.set_forwarding(l, true).await?;
            tracing::info!("IPv4 forwarding on for {l} (until exit)");
        }
        Ok(())
    }

    /// IPv6 forwarding on, host-wide (Linux has no per-link switch for it).
    pub async fn enable_forwarding6(&mut self, net: &dyn NetOps) -> Result<(), GatewayError> {
        if self.journal.forwarding6 || net.forwarding6().await? {
            return Ok(());
        }
        let ra = net.ra_links().await?;
        self.journal.forwarding6 = true;
        self.journal.accept_ra = ra.clone();
        self.save()?;
        let done = async {
            for l in &ra {
                net.set_accept_ra(l, 2).await?;
            }
            net.set_forwarding6(true).await
        }
        .await;
        match done {
            Ok(()) => {
                tracing::info!("IPv6 forwarding on (until exit)");
                Ok(())
            }
            // Inside a container /proc/sys is read-only: IPv4 still works.
            Err(NetError::Permission(what)) => {
                tracing::warn!(
                    "IPv6 forwarding cannot be turned on here ({what}); IPv6 between the peers of this hub will not flow"
                );
                for l in &ra {
                    let _ = net.set_accept_ra(l, 1).await;
                }
                self.journal.forwarding6 = false;
                self.journal.accept_ra.clear();
                self.save()
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn add_rule(
        &mut self,
        net: &dyn NetOps,
        rule: PolicyRule,
    ) -> Result<(), GatewayError> {
        if !self.journal.rules.contains(&rule) {
            self.journal.rules.push(rule.clone());
            self.save()?;
        }
        Ok(net.add_rule(&rule).await?)
    }

    pub async fn add_route(
        &mut self,
        net: &dyn NetOps,
        route: TableRoute,
    ) -> Result<(), GatewayError> {
        if !self.journal.routes.contains(&route) {
            self.journal.routes.push(route.clone());
            self.save()?;
        }
        Ok(net
            .add_route(route.dst, &route.iface, Some(route.table))
            .await?)
    }

    /// Puts everything back, newest first, and removes the journal. What
    /// cannot be undone is logged: the rest still is.
    pub async fn undo(self, net: &dyn NetOps) {
        let j = &self.journal;
        for r in j.rules.iter().rev() {
            if let Err(e) = net.del_rule(r).await {
                tracing::warn!("removing the policy rule to {}: {e}", r.to);
            }
        }
        for r in j.routes.iter().rev() {
            if let Err(e) = net.del_route(r.dst, &r.iface, Some(r.table)).await {
                tracing::warn!(
                    "removing the route to {} from table {}: {e}",
                    r.dst,
                    r.table
                );
            }
        }
        for l in j.forwarding.iter().rev() {
            match net.set_forwarding(l, false).await {
                Ok(()) | Err(NetError::NotFound(_)) => {}
                Err(e) => tracing::warn!("turning forwarding off again on {l}: {e}"),
            }
        }
        if j.forwarding6
            && let Err(e) = net.set_forwarding6(false).await
        {
            tracing::warn!("turning IPv6 forwarding off again: {e}");
        }
        for l in &j.accept_ra {
            match net.set_accept_ra(l, 1).await {
                Ok(()) | Err(NetError::NotFound(_)) => {}
                Err(e) => tracing::warn!("putting back accept_ra of {l}: {e}"),
            }
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("removing {}: {e}", self.path.display()),
        }
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }
}

/// A host's firewall and forwarding while its endpoint runs.
pub struct Gateway {
    setup: Setup,
    changes: Changes,
    policy: Policy,
}

impl Gateway {
    /// Before the device is made: undoes a crashed run's changes, then
    /// puts the firewall in place, so that nothing is forwarded before it
    /// holds. `tunnel_nets` is what the userspace device keeps to by
    /// itself where nftables is missing.
    pub async fn start(
        fw: Box<dyn Firewall>,
        net: &dyn NetOps,
        store: &StateDir,
        policy: Policy,
        enabled: bool,
        tunnel_nets: &[IpNetwork],
    ) -> Result<Self, GatewayError> {
        let changes = Changes::recover(net, store, &policy.iface).await?;
        let setup = if enabled {
            Setup::start(fw, &policy, true, tunnel_nets)?
        } else {
            // A table a crashed run left is not wanted either.
            if let Err(e) = fw.remove(&firewall::table_name(&policy.iface)) {
                tracing::debug!("removing a stale table: {e}");
            }
            firewall::clean_up(fw.as_ref(), &policy.iface);
            Setup::start(fw, &policy, false, tunnel_nets)?
        };
        Ok(Self {
            setup,
            changes,
            policy,
        })
    }

    /// What the userspace device must drop by itself (no nftables).
    pub fn confine(&self) -> Option<Vec<IpNetwork>> {
        self.setup.confine()
    }

    /// Whether our nftables table holds the policy (not `--firewall off`,
    /// nftables not missing): only then can the policy change live.
    pub fn guarded(&self) -> bool {
        matches!(self.setup, Setup::Guarded(_))
    }

    /// Whether this host may forward between the tunnel and elsewhere:
    /// false only where neither nftables nor the userspace device can
    /// confine it.
    pub fn may_forward(&self, userspace: bool) -> bool {
        !matches!(self.setup, Setup::Fallback(_)) || userspace
    }

    /// Once the device is up: forwarding on the tunnel link (for a hub, or
    /// a site with LANs) and on the links towards the advertised LANs
    /// (their replies come in there). IPv6 too when `v6`.
    pub async fn forward(&mut self, net: &dyn NetOps, v6: bool) -> Result<(), GatewayError> {
        let p = &self.policy;
        if !p.hub && p.routes.is_empty() {
            return Ok(());
        }
        let mut links = vec![p.iface.clone()];
        for r in &p.routes {
            match net.route_iface(r.network()).await? {
                Some(l) if l != p.iface => {
                    if !links.contains(&l) {
                        links.push(l);
                    }
                }
                _ => tracing::warn!(
                    "route {r}: this host has no route to it itself; traffic for it will not get through"
                ),
            }
        }
        let v4 = p.hub || p.routes.iter().any(|r| r.is_ipv4());
        if v4 {
            self.changes.enable_forwarding(net, &links).await?;
        }
        if v6 || p.routes.iter().any(|r| r.is_ipv6()) {
            self.changes.enable_forwarding6(net).await?;
        }
        Ok(())
    }

    /// One housekeeping tick: applies a changed policy (the peers'
    /// endpoints of `--allow-from`), and puts back what someone removed.
    pub fn keep(&mut self, policy: Option<Policy>) {
        let Some(g) = self.setup.guard() else { return };
        if let Some(p) = policy
            && p != self.policy
        {
            match g.update(&p) {
                Ok(()) => self.policy = p,
                Err(e) => tracing::warn!("updating the firewall: {e}"),
            }
        }
        if let Err(e) = g.repair() {
            tracing::warn!("checking the firewall: {e}");
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn changes(&mut self) -> &mut Changes {
        &mut self.changes
    }

    /// Removes the table and undoes every other change.
    pub async fn stop(self, net: &dyn NetOps) {
        self.setup.remove();
        self.changes.undo(net).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::fake::FakeFirewall;
    use crate::net::fake::FakeNet;

    fn policy(routes: &[&str]) -> Policy {
        Policy {
            iface: "wgt0".into(),
            hub: false,
            routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
            masquerade: true,
            ..Default::default()
        }
    }

    fn net() -> FakeNet {
        let net = FakeNet::default();
        for l in ["wgt0", "lan0", "eth0"] {
            net.add_link(l);
        }
        net.lan
            .lock()
            .unwrap()
            .push(("192.168.50.0/24".parse().unwrap(), "lan0".into()));
        net
    }

    fn forwarding(net: &FakeNet) -> Vec<String> {
        net.links
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, l)| l.forwarding)
            .map(|(n, _)| n.clone())
            .collect()
    }

    #[tokio::test]
    async fn a_gateway_forwards_on_the_tunnel_and_its_lan_links_only_and_puts_them_back() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateDir::new(tmp.path());
        let net = net();
        let fw = Box::new(FakeFirewall::default());
        let mut g = Gateway::start(fw, &net, &store, policy(&["192.168.50.0/24"]), true, &[])
            .await
            .unwrap();
        g.forward(&net, false).await.unwrap();
        assert_eq!(forwarding(&net), ["lan0", "wgt0"]);
        assert!(tmp.path().join("wgt0.host").exists());
        g.stop(&net).await;
        assert!(forwarding(&net).is_empty());
        assert!(!tmp.path().join("wgt0.host").exists());
    }

    #[tokio::test]
    async fn a_site_without_routes_forwards_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let net = net();
        let fw = Box::new(FakeFirewall::default());
        let mut g = Gateway::start(fw, &net, &StateDir::new(tmp.path()), policy(&[]), true, &[])
            .await
            .unwrap();
        g.forward(&net, false).await.unwrap();
        assert!(forwarding(&net).is_empty());
        g.stop(&net).await;
    }

    #[tokio::test]
    async fn forwarding_that_was_on_already_stays_on() {
        let tmp = tempfile::tempdir().unwrap();
        let net = net();
        net.links
            .lock()
            .unwrap()
            .get_mut("lan0")
            .unwrap()
            .forwarding = true;
        let fw = Box::new(FakeFirewall::default());
        let store = StateDir::new(tmp.path());
        let mut g = Gateway::start(fw, &net, &store, policy(&["192.168.50.0/24"]), true, &[])
            .await
            .unwrap();
        g.forward(&net, false).await.unwrap();
        g.stop(&net).await;
        assert_eq!(forwarding(&net), ["lan0"]);
    }

    #[tokio::test]
    async fn the_next_start_undoes_what_a_crashed_run_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateDir::new(tmp.path());
        let net = net();
        let rule = PolicyRule {
            priority: 100,
            to: "198.51.100.7/32".parse().unwrap(),
            table: 51820,
            ip_proto: None,
            dport: None,
        };
        {
            let fw = Box::new(FakeFirewall::default());
            let mut g = Gateway::start(fw, &net, &store, policy(&["192.168.50.0/24"]), true, &[])
                .await
                .unwrap();
            g.forward(&net, false).await.unwrap();
            g.changes().add_rule(&net, rule.clone()).await.unwrap();
            g.changes()
                .add_route(
                    &net,
                    TableRoute {
                        dst: rule.to,
                        iface: "wgt0".into(),
                        table: 51820,
                    },
                )
                .await
                .unwrap();
            // Dropped without stop: the process died.
        }
        assert_eq!(forwarding(&net).len(), 2);
        assert_eq!(net.rules.lock().unwrap().len(), 1);
        let changes = Changes::recover(&net, &store, "wgt0").await.unwrap();
        assert!(forwarding(&net).is_empty());
        assert!(net.rules.lock().unwrap().is_empty());
        assert!(net.routes.lock().unwrap().is_empty());
        assert!(changes.journal().is_empty());
    }

    #[tokio::test]
    async fn a_hub_turns_ipv6_forwarding_on_keeping_slaac_and_puts_both_back() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateDir::new(tmp.path());
        let net = net();
        net.accept_ra.lock().unwrap().insert("eth0".into(), 1);
        let hub = Policy {
            hub: true,
            ..policy(&[])
        };
        let fw = Box::new(FakeFirewall::default());
        let mut g = Gateway::start(fw, &net, &store, hub.clone(), true, &[])
            .await
            .unwrap();
        g.forward(&net, true).await.unwrap();
        assert!(*net.forwarding6.lock().unwrap());
        assert_eq!(net.accept_ra.lock().unwrap()["eth0"], 2);
        g.stop(&net).await;
        assert!(!*net.forwarding6.lock().unwrap());
        assert_eq!(net.accept_ra.lock().unwrap()["eth0"], 1);

        // Inside a container /proc/sys is read-only: IPv4 goes on.
        *net.readonly_sysctl.lock().unwrap() = true;
        let fw = Box::new(FakeFirewall::default());
        let mut g = Gateway::start(fw, &net, &store, hub, true, &[])
            .await
            .unwrap();
        g.forward(&net, true).await.unwrap();
        assert!(!*net.forwarding6.lock().unwrap());
        assert!(!g.changes().journal().forwarding6);
        assert_eq!(net.accept_ra.lock().unwrap()["eth0"], 1);
        assert_eq!(forwarding(&net), ["wgt0"]);
        g.stop(&net).await;
    }

    #[tokio::test]
    async fn a_garbled_journal_is_reported_with_its_path() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("wgt0.host"), b"{nope").unwrap();
        let e = Changes::recover(&net(), &StateDir::new(tmp.path()), "wgt0")
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("wgt0.host"), "{e}");
    }

    #[tokio::test]
    async fn with_the_firewall_off_a_crashed_runs_table_and_docker_rules_go() {
        let tmp = tempfile::tempdir().unwrap();
        let net = net();
        let fw = std::sync::Arc::new(FakeFirewall::default());
        let (stale, _) = firewall::plan(&policy(&["192.168.50.0/24"]));
        fw.apply(&stale).unwrap();
        *fw.docker.lock().unwrap() =
            Some(vec![(stale.name.clone(), stale.chains[0].rules[0].clone())]);
        let g = Gateway::start(
            Box::new(fw.clone()),
            &net,
            &StateDir::new(tmp.path()),
            policy(&[]),
            false,
            &[],
        )
        .await
        .unwrap();
        assert!(fw.tables.lock().unwrap().is_empty());
        assert_eq!(*fw.docker.lock().unwrap(), Some(vec![]));
        assert!(g.confine().is_none());
        g.stop(&net).await;
    }

    #[tokio::test]
    async fn without_nftables_only_the_userspace_device_may_forward() {
        let tmp = tempfile::tempdir().unwrap();
        let net = net();
        let store = StateDir::new(tmp.path());
        let missing = Box::new(FakeFirewall {
            missing: true,
            ..Default::default()
        });
        let tunnel: IpNetwork = "10.77.0.0/24".parse().unwrap();
        let g = Gateway::start(missing, &net, &store, policy(&[]), true, &[tunnel])
            .await
            .unwrap();
        assert!(
            !g.may_forward(false),
            "a kernel device would forward unconfined"
        );
        assert!(g.may_forward(true));
        assert_eq!(g.confine(), Some(vec![tunnel]));
        g.stop(&net).await;
        let fw = Box::new(FakeFirewall::default());
        let g = Gateway::start(fw, &net, &store, policy(&[]), true, &[tunnel])
            .await
            .unwrap();
        assert!(g.may_forward(false));
        g.stop(&net).await;
    }

    #[tokio::test]
    async fn keep_applies_a_changed_policy_and_puts_back_a_flushed_table() {
        let tmp = tempfile::tempdir().unwrap();
        let net = net();
        let fw = std::sync::Arc::new(FakeFirewall::default());
        let mut g = Gateway::start(
            Box::new(fw.clone()),
            &net,
            &StateDir::new(tmp.path()),
            policy(&[]),
            true,
            &[],
        )
        .await
        .unwrap();
        fw.tables.lock().unwrap().clear();
        g.keep(None);
        assert!(fw.exists("tunnel-wgt0").unwrap(), "not put back");
        let routed = policy(&["192.168.50.0/24"]);
        g.keep(Some(routed.clone()));
        assert_eq!(g.policy(), &routed);
        assert_eq!(
            fw.tables.lock().unwrap()["tunnel-wgt0"],
            firewall::plan(&routed).0
        );
        g.stop(&net).await;
        assert!(fw.tables.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_route_this_host_cannot_reach_turns_on_no_link_for_it_and_no_ipv6() {
        let tmp = tempfile::tempdir().unwrap();
        let net = net();
        let fw = Box::new(FakeFirewall::default());
        let store = StateDir::new(tmp.path());
        let mut g = Gateway::start(fw, &net, &store, policy(&["10.99.0.0/16"]), true, &[])
            .await
            .unwrap();
        g.forward(&net, false).await.unwrap();
        assert_eq!(forwarding(&net), ["wgt0"]);
        assert!(!*net.forwarding6.lock().unwrap(), "no IPv6 asked for");
        g.stop(&net).await;
        // An IPv6 LAN needs IPv6 forwarding even when the tunnel is not
        // dual-stack.
        let fw = Box::new(FakeFirewall::default());
        let mut g = Gateway::start(fw, &net, &store, policy(&["fd00:50::/64"]), true, &[])
            .await
            .unwrap();
        g.forward(&net, false).await.unwrap();
        assert!(*net.forwarding6.lock().unwrap());
        assert!(forwarding(&net).is_empty(), "no IPv4 to forward");
        g.stop(&net).await;
    }

    #[tokio::test]
    async fn the_journal_holds_each_change_once_and_reads_older_journals() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateDir::new(tmp.path());
        let net = net();
        let mut c = Changes::recover(&net, &store, "wgt0").await.unwrap();
        let rule = PolicyRule {
            priority: 100,
            to: "198.51.100.7/32".parse().unwrap(),
            table: 51820,
            ip_proto: None,
            dport: None,
        };
        c.add_rule(&net, rule.clone()).await.unwrap();
        c.add_rule(&net, rule.clone()).await.unwrap();
        c.enable_forwarding(&net, &["lan0".into(), "lan0".into()])
            .await
            .unwrap();
        assert_eq!(c.journal().rules, [rule]);
        assert_eq!(c.journal().forwarding, ["lan0"]);
        // What is on disk is what is journaled, before it is undone.
        let saved: Journal =
            serde_json::from_slice(&std::fs::read(tmp.path().join("wgt0.host")).unwrap()).unwrap();
        assert_eq!(&saved, c.journal());
        // A journal from a version that knew only forwarding.
        let old: Journal = serde_json::from_str(r#"{"forwarding": ["eth1"]}"#).unwrap();
        assert_eq!(old.forwarding, ["eth1"]);
        assert!(old.rules.is_empty() && !old.forwarding6);
        c.undo(&net).await;
        assert!(!tmp.path().join("wgt0.host").exists());
    }
}
