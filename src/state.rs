//! The records of persistent state, as pure data: keys, peers,
//! allocations, unused invites, a joined site's settings, and their
//! consistency checks. Reading and writing them is the `store` module's.

use crate::keys::{PrivateKey, PublicKey};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

fn default_mtu() -> u32 {
    1420
}

/// A peer admitted by the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerRecord {
    pub public_key: PublicKey,
    pub address: IpAddr,
    /// Unix seconds.
    pub joined_at: u64,
    /// What it is, when known: the token's --name for a site, or e.g.
    /// "container cli" for a site's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// For an endpoint registered by a site (a container on it): the
    /// site's address. Revoking the site revokes these too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<IpAddr>,
    /// Where the peer was last seen, so that a restarted server can reach
    /// it first instead of waiting for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<std::net::SocketAddr>,
    /// LANs behind a site that it advertises (`join --route`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNetwork>,
    /// A transparent site that asked to keep its public source address
    /// (`join --transparent --snat-public`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snat_public: bool,
    /// The prefixes the hub operator allowed this site to advertise
    /// (`token --route`, `route approve`): an advertised LAN takes effect
    /// only within one of them. `None` in a file saved before approvals
    /// existed; the hub then keeps what the site had ([`PeerRecord::approved`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<Vec<IpNetwork>>,
    /// A stock WireGuard client (`tunnel peer add`): routed like a site,
    /// but it may do nothing on the control API.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub road_warrior: bool,
}

impl PeerRecord {
    /// The prefixes this peer may advertise.
    pub fn approved(&self) -> &[IpNetwork] {
        self.approved.as_deref().unwrap_or_default()
    }

    /// Its advertised LANs within an approved prefix, and the others.
    pub fn split_routes(&self) -> (Vec<IpNetwork>, Vec<IpNetwork>) {
        self.routes
            .iter()
            .partition(|r| covered(self.approved(), r))
    }
}

/// Whether `r` lies within one of `approved`.
pub fn covered(approved: &[IpNetwork], r: &IpNetwork) -> bool {
    approved
        .iter()
        .any(|a| a.is_ipv4() == r.is_ipv4() && a.prefix() <= r.prefix() && a.contains(r.network()))
}

/// A container endpoint of this host: its key is made and kept here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContainerRecord {
    pub container: String,
    pub iface: String,
    pub private_key: PrivateKey,
    pub address: IpAddr,
    /// Attached by label (or the network driver): the endpoint goes when
    /// the container is removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_label: bool,
    /// Made for the network driver: Docker holds it, for this run only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub driver: bool,
}

/// An invite the server issued. Only its public half is kept: the private
/// half lives in the token alone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InviteRecord {
    pub public_key: PublicKey,
    pub address: IpAddr,
    /// Unix seconds.
    pub expires: u64,
    /// Set once redeemed; kept until expiry so that a reuse can be told apart
    /// from an unreachable server.
    #[serde(default)]
    pub redeemed_by: Option<PublicKey>,
    /// Given with `tunnel token --name`; the admitted peer takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Prefixes approved with the token (`token --route`): the site that
    /// redeems it may advertise LANs within them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNetwork>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerState {
    /// The hub's own name (`serve --name`), under which its containers are
    /// found in DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub private_key: PrivateKey,
    pub port: u16,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    pub subnet: IpNetwork,
    /// The IPv6 subnet of a dual-stack tunnel: each endpoint has the twin
    /// of its address there ([`crate::ipam::Subnets`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<IpNetwork>,
    #[serde(default)]
    pub peers: Vec<PeerRecord>,
    #[serde(default)]
    pub invites: Vec<InviteRecord>,
    #[serde(default)]
    pub containers: Vec<ContainerRecord>,
    /// LANs behind the hub itself (`serve --route`), as last started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNetwork>,
    /// The secret part of the WebSocket path, made once so that tokens
    /// and joined sites keep working across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket_secret: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JoinedState {
    /// The site's name on the hub (`join --name`, the token's, or the host
    /// name), under which its containers are found in DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub private_key: PrivateKey,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// As first joined.
    #[serde(default)]
    pub backend: Option<BackendChoice>,
    pub server_public_key: PublicKey,
    /// As given on the command line (`HOST[:PORT]`), resolved again on start.
    pub endpoint: String,
    pub port: u16,
    pub address: IpNetwork,
    pub server_address: IpAddr,
    pub subnet: IpNetwork,
    /// The tunnel's IPv6 subnet when it is dual-stack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<IpNetwork>,
    #[serde(default)]
    pub containers: Vec<ContainerRecord>,
    /// How its datagrams reach the hub (UDP unless it joined over a WebSocket).
    #[serde(default = "udp_path")]
    pub path: crate::reach::Path,
    /// LANs behind this site that it advertises (`--route`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNetwork>,
    /// Whether it masquerades what the tunnel sends to those LANs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub masquerade: bool,
    /// Traffic for the server's public address goes through the tunnel
    /// (`--transparent`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transparent: bool,
    /// The hub gives that traffic this site's public source address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snat_public: bool,
    /// `--attach-label`, followed again by `up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_label: Option<String>,
    /// `--advertise-endpoint`: a port forward to this site, offered to
    /// the mesh's peers as a candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_endpoint: Option<std::net::SocketAddr>,
    /// The UDP port it last ran on, taken again by `up` when free: peers
    /// behind NATs that filter by address find it where they last saw it,
    /// also when the hub cannot tell them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
}

fn udp_path() -> crate::reach::Path {
    crate::reach::Path::Udp
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Endpoint {
    Server(ServerState),
    Joined(JoinedState),
}

impl Endpoint {
    pub fn role(&self) -> &'static str {
        match self {
            Endpoint::Server(_) => "server",
            Endpoint::Joined(_) => "joined",
        }
    }

    /// What serde cannot check: addresses inside the subnet and of its
    /// family, no address twice, values in range. Everything that reads
    /// state may then rely on these, and nothing it loads can panic later.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Endpoint::Server(s) => s.validate(),
            Endpoint::Joined(j) => j.validate(),
        }
    }
}

fn check_mtu(mtu: u32) -> Result<(), String> {
    if (1280..=9000).contains(&mtu) {
        Ok(())
    } else {
        Err(format!("MTU {mtu} is outside 1280-9000"))
    }
}

/// A pool for `subnet`, or why the subnet cannot be one.
fn pool_for(subnet: IpNetwork) -> Result<crate::ipam::Pool, String> {
    crate::ipam::Pool::new(subnet).map_err(|e| e.to_string())
}

/// Checks that `addr` is a host address of the pool's subnet and not yet
/// seen, then marks it seen.
fn claim(
    pool: &crate::ipam::Pool,
    seen: &mut std::collections::BTreeSet<IpAddr>,
    what: &str,
    addr: IpAddr,
) -> Result<(), String> {
    if !pool.contains_host(addr) {
        return Err(format!(
            "{what} address {addr} is not a host address of {}",
            pool.subnet()
        ));
    }
    if !seen.insert(addr) {
        return Err(format!("{what} address {addr} is used twice"));
    }
    Ok(())
}

impl ServerState {
    /// A new hub: a fresh key, no peers yet.
    pub fn new(subnet: IpNetwork, port: u16, mtu: u32) -> Self {
        Self {
            name: None,
            private_key: PrivateKey::generate(),
            port,
            mtu,
            subnet,
            subnet6: None,
            peers: vec![],
            invites: vec![],
            containers: vec![],
            routes: vec![],
            websocket_secret: None,
        }
    }

    pub fn subnets(&self) -> crate::ipam::Subnets {
        crate::ipam::Subnets {
            main: self.subnet,
            v6: self.subnet6,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let pool = pool_for(self.subnet)?;
        crate::ipam::Subnets::new(self.subnet, self.subnet6).map_err(|e| e.to_string())?;
        check_mtu(self.mtu)?;
        if self.port == 0 {
            return Err("listen port 0".into());
        }
        let mut seen = std::collections::BTreeSet::from([pool.server_address()]);
        for p in &self.peers {
            claim(&pool, &mut seen, "peer", p.address)?;
            if let Some(v) = p.via
                && !self.peers.iter().any(|s| s.address == v && s.via.is_none())
            {
                return Err(format!(
                    "peer {} was registered by {v}, which is not a site",
                    p.address
                ));
            }
        }
        for i in &self.invites {
            // A redeemed invite shares its address with the peer it admitted.
            if i.redeemed_by.is_some() {
                if !pool.contains_host(i.address) {
                    return Err(format!(
                        "invite address {} is outside {}",
                        i.address, self.subnet
                    ));
                }
            } else {
                claim(&pool, &mut seen, "invite", i.address)?;
            }
        }
        for c in &self.containers {
            claim(&pool, &mut seen, "container", c.address)?;
            crate::limits::check_ifname(&c.iface)?;
        }
        Ok(())
    }
}

impl JoinedState {
    pub fn subnets(&self) -> crate::ipam::Subnets {
        crate::ipam::Subnets {
            main: self.subnet,
            v6: self.subnet6,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let pool = pool_for(self.subnet)?;
        crate::ipam::Subnets::new(self.subnet, self.subnet6).map_err(|e| e.to_string())?;
        check_mtu(self.mtu)?;
        if self.address.prefix() != self.subnet.prefix() {
            return Err(format!(
                "address {} does not carry the prefix of {}",
                self.address, self.subnet
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        claim(&pool, &mut seen, "server", self.server_address)?;
        claim(&pool, &mut seen, "site", self.address.ip())?;
        for c in &self.containers {
            claim(&pool, &mut seen, "container", c.address)?;
            crate::limits::check_ifname(&c.iface)?;
        }
        if self.port == 0 {
            return Err("server port 0".into());
        }
        Ok(())
    }
}

/// A join under way: the key made here for one token (named by its
/// invite's public key). A join that crashes after sending the redeem and
/// runs again redeems with the same key, which the hub accepts again, so
/// no crash burns a token.
#[derive(Serialize, Deserialize)]
pub struct PendingJoin {
    pub invite: PublicKey,
    pub private_key: PrivateKey,
}

impl std::fmt::Debug for PendingJoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingJoin")
            .field("invite", &self.invite)
            .finish_non_exhaustive()
    }
}

/// Which WireGuard implementation to use; `auto` prefers the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Auto,
    Kernel,
    Userspace,
}

#[cfg(test)]
impl PeerRecord {
    /// A site admitted at `address` with a fresh key and nothing else set:
    /// what tests start from.
    pub fn site(address: &str) -> Self {
        PeerRecord {
            public_key: PrivateKey::generate().public_key(),
            address: address.parse().expect("an address"),
            joined_at: 0,
            name: None,
            via: None,
            endpoint: None,
            routes: vec![],
            snat_public: false,
            approved: Some(vec![]),
            road_warrior: false,
        }
    }
}
