//! nftables rules of our own, in one table per interface
//! (`inet tunnel-<iface>`), beside whatever else the host runs (Docker's
//! iptables rules, firewalld). The rules are planned here as plain data
//! ([`Table`], pure and tested without root) and written by [`Nftables`]
//! over netlink in one atomic batch; nothing runs `nft` or `iptables`.
//!
//! The hub is not a router for its peers: its forward chain accepts
//! tunnel-to-tunnel traffic and drops everything else that enters or
//! leaves the tunnel interface ([`confinement`]). Linux decides IPv4
//! forwarding by the incoming interface, so without this, every peer, and
//! every unredeemed invite, could reach the hub's LAN, its Docker bridges
//! and the internet through it on any host with `ip_forward=1` (every
//! Docker host).
//!
//! A table is replaced as a whole (add, delete, add in one batch), which
//! also clears one left by a crash, and removed on exit.

mod nft;

pub use nft::Nftables;

/// The kernel's hook a base chain attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Forward,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// The packet came in on this interface.
    InIface(String),
    /// The packet goes out on this interface.
    OutIface(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Accept,
    Drop,
}

/// A rule: all its matches hold, then its action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub action: Action,
}

/// A base chain of type filter, policy accept: our rules only ever narrow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    pub hook: Hook,
    /// Lower runs first; Docker's iptables rules sit at 0 (filter).
    pub priority: i32,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub chains: Vec<Chain>,
}

/// Our table's name for the endpoint on `iface`.
pub fn table_name(iface: &str) -> String {
    format!("tunnel-{iface}")
}

/// The hub's forwarding: between its own tunnel peers only.
pub fn confinement(iface: &str) -> Table {
    let rule = |matches: Vec<Match>, action| Rule { matches, action };
    let tun = || iface.to_owned();
    Table {
        name: table_name(iface),
        chains: vec![Chain {
            name: "forward",
            hook: Hook::Forward,
            priority: -1,
            rules: vec![
                rule(
                    vec![Match::InIface(tun()), Match::OutIface(tun())],
                    Action::Accept,
                ),
                rule(vec![Match::InIface(tun())], Action::Drop),
                rule(vec![Match::OutIface(tun())], Action::Drop),
            ],
        }],
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("nftables is not available in this kernel ({0})")]
    Unsupported(std::io::Error),
    #[error("needs root or CAP_NET_ADMIN (nftables refused: {0})")]
    Permission(std::io::Error),
    #[error("nftables: {what}")]
    Netlink {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the tool asks of the host's packet filter.
pub trait Firewall: Send + Sync {
    /// Replaces the table of that name with `table`, atomically.
    fn apply(&self, table: &Table) -> Result<(), FirewallError>;
    /// Removes the table if it exists.
    fn remove(&self, name: &str) -> Result<(), FirewallError>;
    /// Whether the table exists.
    fn exists(&self, name: &str) -> Result<bool, FirewallError>;
}

#[cfg(test)]
pub mod fake {
    //! An in-memory [`Firewall`].
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct FakeFirewall {
        pub tables: Mutex<BTreeMap<String, Table>>,
    }

    impl Firewall for FakeFirewall {
        fn apply(&self, table: &Table) -> Result<(), FirewallError> {
            self.tables
                .lock()
                .unwrap()
                .insert(table.name.clone(), table.clone());
            Ok(())
        }

        fn remove(&self, name: &str) -> Result<(), FirewallError> {
            self.tables.lock().unwrap().remove(name);
            Ok(())
        }

        fn exists(&self, name: &str) -> Result<bool, FirewallError> {
            Ok(self.tables.lock().unwrap().contains_key(name))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_forwards_only_between_its_tunnel_peers() {
        let t = confinement("wg-tunnel");
        assert_eq!(t.name, "tunnel-wg-tunnel");
        let chain = &t.chains[0];
        assert_eq!(chain.hook, Hook::Forward);
        assert!(chain.priority < 0, "before Docker's filter rules");
        // First match wins: tunnel to tunnel is accepted, then anything
        // else in or out of the tunnel is dropped.
        assert_eq!(chain.rules[0].action, Action::Accept);
        assert_eq!(chain.rules[0].matches.len(), 2);
        assert!(chain.rules[1..].iter().all(|r| r.action == Action::Drop));
    }
}
