//! What `tunnel status` reports: the model (stable JSON), how a running
//! instance fills it, how saved state fills it when nothing runs, and the
//! human-readable rendering.

use crate::ipam::Subnets;
use crate::keys::PublicKey;
use crate::state::Endpoint;
use crate::wg::{BackendKind, PeerStatus};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

/// What an endpoint is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Server,
    Joined,
    Container,
}

/// Whether a `tunnel` process runs it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Up,
    Down,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Server => "server",
            Role::Joined => "joined",
            Role::Container => "container",
        })
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Up => "up",
            State::Down => "down",
        })
    }
}

/// One WireGuard endpoint: the host's own, or one inside a container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointStatus {
    pub iface: String,
    /// The hub's or site's name on the tunnel (its DNS name's first label).
    #[serde(default)]
    pub name: Option<String>,
    pub role: Role,
    /// Up while a `tunnel` process runs it.
    pub state: State,
    /// Absent when down.
    pub backend: Option<BackendKind>,
    pub address: IpNetwork,
    /// Its IPv6 address in a dual-stack tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<IpNetwork>,
    pub listen_port: Option<u16>,
    /// What a running hub listens on (`UDP 51820`, `WebSocket ... on TCP ...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listening: Vec<String>,
    pub public_key: PublicKey,
    /// For container endpoints: the container's name.
    pub container: Option<String>,
    /// For container endpoints: the id of the container it is attached to now.
    pub container_id: Option<String>,
    /// For joined sites: the server as given to `join`.
    pub server: Option<String>,
    /// The LANs behind this host that it advertises.
    #[serde(default)]
    pub routes: Vec<IpNetwork>,
    /// Its part in the mesh: direct paths, or why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshReport>,
    pub peers: Vec<PeerReport>,
}

/// An endpoint's part in the mesh.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MeshReport {
    /// Whether it makes direct paths to other sites.
    pub direct: bool,
    /// How its NAT maps its socket, as it found out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<String>,
    /// Why not, or what it does for the others (a hub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// A hub: datagrams and bytes relayed between sites, unread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed_packets: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed_bytes: Option<u64>,
    /// A site: how often a peer's path changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_changes: Option<u64>,
}

/// The path a mesh peer's datagrams take now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PathReport {
    /// "direct ADDR:PORT" or "relay via HUB".
    pub path: String,
    /// Round trip of the path in use, as the probes measure it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Seconds since a probe on that path was last answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_answer_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerReport {
    pub public_key: PublicKey,
    /// What the peer is: "server", "site", "container web", "invite", ...
    pub name: Option<String>,
    pub address: Option<IpAddr>,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub keepalive: Option<u16>,
    /// How its datagrams travel: "udp", "wss", "ws direct", "wss via proxy ...".
    #[serde(default)]
    pub transport: Option<String>,
    /// The LANs routed through this peer: a site's own, or (seen from a
    /// site) those behind the hub and the other sites.
    #[serde(default)]
    pub routes: Vec<IpNetwork>,
    /// A site's LANs that wait for the hub operator's approval (`tunnel
    /// route approve`), or that the hub refuses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_routes: Vec<IpNetwork>,
    /// A mesh peer's path; absent for the hub and peers outside the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathReport>,
}

impl PeerReport {
    pub fn from_live(p: &PeerStatus, name: Option<String>, address: Option<IpAddr>) -> Self {
        Self {
            public_key: p.public_key,
            name,
            address: address.or_else(|| p.allowed_ips.first().map(|n| n.ip())),
            endpoint: p.endpoint,
            last_handshake_secs: p.last_handshake.map(|d| d.as_secs()),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            keepalive: p.keepalive,
            transport: None,
            routes: vec![],
            pending_routes: vec![],
            path: None,
        }
    }

    fn saved(public_key: PublicKey, name: &str, address: Option<IpAddr>) -> Self {
        Self {
            public_key,
            name: Some(name.to_owned()),
            address,
            endpoint: None,
            last_handshake_secs: None,
            rx_bytes: 0,
            tx_bytes: 0,
            keepalive: None,
            transport: None,
            routes: vec![],
            pending_routes: vec![],
            path: None,
        }
    }
}

/// How status names a hub's peer: a site by its name, a site's container
/// as "container NAME".
pub fn peer_name(p: &crate::state::PeerRecord) -> String {
    match (p.via, p.name.as_deref()) {
        (Some(_), Some(n)) => format!("container {n}"),
        (Some(_), None) => "container".to_owned(),
        (None, Some(n)) => n.to_owned(),
        (None, None) => "site".to_owned(),
    }
}

/// The endpoints of a saved state, all marked down.
pub fn from_state(iface: &str, endpoint: &Endpoint) -> Vec<EndpointStatus> {
    let down = |iface: &str, role: Role, subnets: Subnets, a: IpAddr, key: PublicKey| {
        let addrs = subnets.interface(a);
        EndpointStatus {
            iface: iface.to_owned(),
            name: None,
            role,
            state: State::Down,
            backend: None,
            address: addrs[0],
            address6: addrs.get(1).copied(),
            listen_port: None,
            listening: vec![],
            public_key: key,
            container: None,
            container_id: None,
            server: None,
            routes: vec![],
            mesh: None,
            peers: vec![],
        }
    };
    // Saved state is validated when loaded: its addresses fit its subnet.
    match endpoint {
        Endpoint::Server(s) => {
            let server_ip = crate::ipam::Pool::new(s.subnet)
                .map(|p| p.server_address())
                .unwrap_or(s.subnet.ip());
            let mut main = down(
                iface,
                Role::Server,
                s.subnets(),
                server_ip,
                s.private_key.public_key(),
            );
            main.listen_port = Some(s.port);
            main.name = s.name.clone();
            main.routes = s.routes.clone();
            main.peers = s
                .peers
                .iter()
                .map(|p| {
                    let mut r = PeerReport::saved(p.public_key, &peer_name(p), Some(p.address));
                    (r.routes, r.pending_routes) = p.split_routes();
                    r
                })
                .chain(s.containers.iter().map(|c| {
                    PeerReport::saved(
                        c.private_key.public_key(),
                        &format!("container {}", c.container),
                        Some(c.address),
                    )
                }))
                .collect();
            let mut out = vec![main];
            for c in &s.containers {
                let mut e = down(
                    &c.iface,
                    Role::Container,
                    s.subnets(),
                    c.address,
                    c.private_key.public_key(),
                );
                e.container = Some(c.container.clone());
                out.push(e);
            }
            out
        }
        Endpoint::Joined(j) => {
            let mut main = down(
                iface,
                Role::Joined,
                j.subnets(),
                j.address.ip(),
                j.private_key.public_key(),
            );
            main.server = Some(j.endpoint.clone());
            main.name = j.name.clone();
            main.routes = j.routes.clone();
            main.peers = vec![PeerReport::saved(
                j.server_public_key,
                "server",
                Some(j.server_address),
            )];
            let mut out = vec![main];
            for c in &j.containers {
                let mut e = down(
                    &c.iface,
                    Role::Container,
                    j.subnets(),
                    c.address,
                    c.private_key.public_key(),
                );
                e.container = Some(c.container.clone());
                out.push(e);
            }
            out
        }
    }
}

/// How recent a handshake must be for `status --check`: WireGuard renews
/// a session every two minutes while packets flow (and keepalives flow
/// every 25 s), so a working link is never older than this.
pub const FRESH_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(180);

/// What `status --check` makes of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ok(String),
    Failing(String),
    /// A container endpoint whose container is stopped: it has no link to
    /// check, and the user stopped it.
    NotCounted(String),
}

/// Judges one endpoint. `hub_answers`: for a joined site, whether the hub
/// answered over the tunnel just now (a stopped hub fails the check at
/// once, not when the last handshake ages out).
pub fn health(e: &EndpointStatus, hub_answers: Option<bool>) -> Health {
    let fresh = |secs: Option<u64>| secs.is_some_and(|s| s <= FRESH_HANDSHAKE.as_secs());
    match (e.role, e.state) {
        (Role::Container, State::Down) => Health::NotCounted("container not running".into()),
        (_, State::Down) => Health::Failing("not running".into()),
        (Role::Server, State::Up) => {
            let live = e
                .peers
                .iter()
                .filter(|p| fresh(p.last_handshake_secs))
                .count();
            Health::Ok(format!(
                "serving, {live} of {} peer(s) with a handshake in the last {} s",
                e.peers.len(),
                FRESH_HANDSHAKE.as_secs()
            ))
        }
        (Role::Joined | Role::Container, State::Up) => {
            let last = e.peers.iter().filter_map(|p| p.last_handshake_secs).min();
            match (last, hub_answers) {
                (None, _) => Health::Failing("no handshake with the server yet".into()),
                (Some(s), _) if !fresh(Some(s)) => {
                    Health::Failing(format!("last handshake with the server {s} s ago"))
                }
                (Some(s), Some(false)) => Health::Failing(format!(
                    "the server does not answer over the tunnel (last handshake {s} s ago)"
                )),
                (Some(s), _) => Health::Ok(format!("handshake with the server {s} s ago")),
            }
        }
    }
}

fn ago(secs: Option<u64>) -> String {
    match secs {
        Some(s) => format!("{}s ago", s),
        None => "never".to_owned(),
    }
}

fn list(nets: &[IpNetwork]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The mesh's line of an endpoint.
fn mesh_line(m: &MeshReport) -> String {
    let mut parts = vec![];
    parts.push(
        if m.direct {
            "direct paths"
        } else {
            "no direct paths"
        }
        .to_owned(),
    );
    if let Some(n) = &m.nat {
        parts.push(format!("NAT: {n}"));
    }
    if let Some(n) = &m.note {
        parts.push(n.clone());
    }
    if let (Some(p), Some(b)) = (m.relayed_packets, m.relayed_bytes) {
        parts.push(format!("relayed {p} datagrams, {b} B"));
    }
    if let Some(c) = m.path_changes {
        parts.push(format!("{c} path changes"));
    }
    parts.join("; ")
}

/// The human-readable form.
/// How a container endpoint is attached: its container's short id, or
/// Docker's network driver.
fn attached_as(e: &EndpointStatus) -> &str {
    match e.container_id.as_deref() {
        Some(i) => &i[..i.len().min(12)],
        None if e.state == State::Up => "network driver",
        None => "not attached",
    }
}

pub fn render(endpoints: &[EndpointStatus]) -> String {
    if endpoints.is_empty() {
        return "no endpoints (nothing in the state directory)\n".to_owned();
    }
    let mut out = String::new();
    for e in endpoints {
        let _ = write!(out, "{} ({}, {}", e.iface, e.role, e.state);
        if let Some(b) = &e.backend {
            let _ = write!(out, ", {b}");
        }
        let _ = writeln!(out, ")");
        if let Some(n) = &e.name {
            let _ = writeln!(out, "  name:       {n}");
        }
        match e.address6 {
            Some(a6) => {
                let _ = writeln!(out, "  address:    {}, {a6}", e.address);
            }
            None => {
                let _ = writeln!(out, "  address:    {}", e.address);
            }
        }
        if let Some(p) = e.listen_port {
            let _ = writeln!(out, "  listen port: {p}");
        }
        if !e.listening.is_empty() {
            let _ = writeln!(out, "  listens on: {}", e.listening.join(", "));
        }
        let _ = writeln!(out, "  public key: {}", e.public_key);
        if let Some(c) = &e.container {
            let _ = writeln!(out, "  container:  {c} ({})", attached_as(e));
        }
        if let Some(s) = &e.server {
            let _ = writeln!(out, "  server:     {s}");
        }
        if !e.routes.is_empty() {
            let _ = writeln!(out, "  routes:     {}", list(&e.routes));
        }
        if let Some(m) = &e.mesh {
            let _ = writeln!(out, "  mesh:       {}", mesh_line(m));
        }
        for p in &e.peers {
            let _ = writeln!(
                out,
                "  peer {} ({}): endpoint {}{}, handshake {}, rx {} B, tx {} B{}",
                p.address
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into()),
                p.name.as_deref().unwrap_or("?"),
                p.endpoint
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into()),
                p.transport
                    .as_deref()
                    .filter(|t| *t != "udp")
                    .map(|t| format!(" over {t}"))
                    .unwrap_or_default(),
                ago(p.last_handshake_secs),
                p.rx_bytes,
                p.tx_bytes,
                p.keepalive
                    .map(|k| format!(", keepalive {k}s"))
                    .unwrap_or_default()
            );
            if !p.routes.is_empty() {
                let _ = writeln!(out, "    routes {}", list(&p.routes));
            }
            if let Some(path) = &p.path {
                let _ = writeln!(
                    out,
                    "    path {}{}, last answer {}",
                    path.path,
                    path.rtt_ms
                        .map(|r| format!(", rtt {r:.1} ms"))
                        .unwrap_or_default(),
                    ago(path.last_answer_secs)
                );
            }
            if !p.pending_routes.is_empty() {
                let who = p.name.clone().unwrap_or_else(|| {
                    p.address
                        .map_or_else(|| "SITE".to_owned(), |a| a.to_string())
                });
                for r in &p.pending_routes {
                    let _ = writeln!(
                        out,
                        "    waiting for approval: {r} (tunnel route approve {who} {r})"
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use crate::state::{ContainerRecord, PeerRecord, ServerState};

    fn live(role: Role, state: State, handshakes: &[Option<u64>]) -> EndpointStatus {
        let server = ServerState {
            name: None,
            private_key: PrivateKey::generate(),
            port: 51820,
            mtu: 1420,
            subnet: "10.77.0.0/24".parse().unwrap(),
            subnet6: None,
            peers: vec![],
            invites: vec![],
            containers: vec![],
            routes: vec![],
            websocket_secret: None,
        };
        let mut e = from_state("wgt0", &Endpoint::Server(server)).swap_remove(0);
        e.role = role;
        e.state = state;
        e.peers = handshakes
            .iter()
            .map(|h| {
                let mut p = PeerReport::saved(PrivateKey::generate().public_key(), "x", None);
                p.last_handshake_secs = *h;
                p
            })
            .collect();
        e
    }

    #[test]
    fn the_health_check_wants_a_fresh_handshake_and_an_answering_hub() {
        let ok = |h: Health| matches!(h, Health::Ok(_));
        let failing = |h: Health| matches!(h, Health::Failing(_));
        // A site: fresh handshake and the hub answers.
        assert!(ok(health(
            &live(Role::Joined, State::Up, &[Some(30)]),
            Some(true)
        )));
        assert!(ok(health(
            &live(Role::Joined, State::Up, &[Some(180)]),
            Some(true)
        )));
        assert!(failing(health(
            &live(Role::Joined, State::Up, &[Some(181)]),
            Some(true)
        )));
        assert!(failing(health(
            &live(Role::Joined, State::Up, &[None]),
            Some(true)
        )));
        assert!(failing(health(&live(Role::Joined, State::Up, &[]), None)));
        // The hub stopped a moment ago: the handshake is fresh, the check fails.
        assert!(failing(health(
            &live(Role::Joined, State::Up, &[Some(5)]),
            Some(false)
        )));
        assert!(failing(health(&live(Role::Joined, State::Down, &[]), None)));
        // A hub is healthy while it runs, with or without peers.
        assert!(ok(health(&live(Role::Server, State::Up, &[]), None)));
        assert!(ok(health(
            &live(Role::Server, State::Up, &[None, Some(999)]),
            None
        )));
        assert!(failing(health(&live(Role::Server, State::Down, &[]), None)));
        // Containers: a stopped one is not counted, a running one needs its handshake.
        assert!(ok(health(
            &live(Role::Container, State::Up, &[Some(10)]),
            None
        )));
        assert!(failing(health(
            &live(Role::Container, State::Up, &[Some(600)]),
            None
        )));
        assert!(matches!(
            health(&live(Role::Container, State::Down, &[]), None),
            Health::NotCounted(_)
        ));
    }

    #[test]
    fn saved_server_with_a_container_reports_down() {
        let state = ServerState {
            name: None,
            private_key: PrivateKey::generate(),
            port: 51820,
            mtu: 1420,
            subnet: "10.77.0.0/24".parse().unwrap(),
            subnet6: None,
            peers: vec![PeerRecord::site("10.77.0.3")],
            invites: vec![],
            containers: vec![ContainerRecord {
                container: "web".into(),
                iface: "wg-tunnelc0".into(),
                private_key: PrivateKey::generate(),
                address: "10.77.0.2".parse().unwrap(),
                by_label: false,
                driver: false,
            }],
            routes: vec![],
            websocket_secret: None,
        };
        let eps = from_state("wg-tunnel", &Endpoint::Server(state));
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].address.to_string(), "10.77.0.1/24");
        assert_eq!(eps[0].state, State::Down);
        assert_eq!(eps[0].peers.len(), 2);
        assert_eq!(eps[1].container.as_deref(), Some("web"));
        let text = render(&eps);
        assert!(text.contains("wg-tunnelc0 (container, down)"), "{text}");
        assert!(text.contains("container:  web (not attached)"), "{text}");
        // The JSON is the documented shape.
        let json = serde_json::to_value(&eps).unwrap();
        assert_eq!(json[1]["container"], "web");
        assert_eq!(json[0]["role"], "server");
        assert_eq!(json[0]["state"], "down");
        assert!(json[0]["peers"][0]["last_handshake_secs"].is_null());
    }

    fn joined() -> crate::state::JoinedState {
        crate::state::JoinedState {
            name: Some("branch".into()),
            private_key: PrivateKey::generate(),
            mtu: 1420,
            backend: None,
            server_public_key: PrivateKey::generate().public_key(),
            endpoint: "vpn.example.org:51820".into(),
            port: 51820,
            address: "10.77.0.2/24".parse().unwrap(),
            server_address: "10.77.0.1".parse().unwrap(),
            subnet: "10.77.0.0/24".parse().unwrap(),
            subnet6: Some("fd00:77::/64".parse().unwrap()),
            containers: vec![ContainerRecord {
                container: "db".into(),
                iface: "wgtc0".into(),
                private_key: PrivateKey::generate(),
                address: "10.77.0.9".parse().unwrap(),
                by_label: false,
                driver: false,
            }],
            path: crate::reach::Path::Udp,
            routes: vec!["192.168.7.0/24".parse().unwrap()],
            masquerade: false,
            transparent: false,
            snat_public: false,
            attach_label: None,
            advertise_endpoint: None,
            listen_port: None,
        }
    }

    fn record(name: Option<&str>, via: Option<&str>) -> PeerRecord {
        PeerRecord {
            public_key: PrivateKey::generate().public_key(),
            address: "10.77.0.3".parse().unwrap(),
            joined_at: 0,
            name: name.map(str::to_owned),
            via: via.map(|v| v.parse().unwrap()),
            endpoint: None,
            routes: vec![],
            snat_public: false,
            approved: Some(vec![]),
            road_warrior: false,
        }
    }

    #[test]
    fn a_hubs_peer_is_named_as_a_site_or_as_a_sites_container() {
        assert_eq!(peer_name(&record(Some("branch"), None)), "branch");
        assert_eq!(peer_name(&record(None, None)), "site");
        assert_eq!(
            peer_name(&record(Some("db"), Some("10.77.0.2"))),
            "container db"
        );
        assert_eq!(peer_name(&record(None, Some("10.77.0.2"))), "container");
    }

    #[test]
    fn a_saved_site_reports_its_server_its_twin_address_and_its_containers_down() {
        let j = joined();
        let server_key = j.server_public_key;
        let eps = from_state("wgt0", &Endpoint::Joined(j));
        let [site, db] = eps.as_slice() else {
            panic!("{eps:?}")
        };
        assert_eq!((site.role, site.state), (Role::Joined, State::Down));
        assert_eq!(site.name.as_deref(), Some("branch"));
        assert_eq!(site.server.as_deref(), Some("vpn.example.org:51820"));
        assert_eq!(site.address6.unwrap().to_string(), "fd00:77::2/64");
        assert_eq!(site.routes.len(), 1);
        assert_eq!(site.listen_port, None);
        let [hub] = site.peers.as_slice() else {
            panic!("{:?}", site.peers)
        };
        assert_eq!(hub.public_key, server_key);
        assert_eq!(hub.name.as_deref(), Some("server"));
        assert_eq!(hub.address, Some("10.77.0.1".parse().unwrap()));
        assert_eq!((db.iface.as_str(), db.role), ("wgtc0", Role::Container));
        assert_eq!(db.address.to_string(), "10.77.0.9/24");
        assert_eq!(db.address6.unwrap().to_string(), "fd00:77::9/64");
        assert!(db.peers.is_empty());
    }

    #[test]
    fn a_saved_hubs_peers_show_approved_and_pending_routes_apart() {
        let mut state = ServerState::new("10.77.0.0/24".parse().unwrap(), 51820, 1420);
        let mut p = record(Some("branch"), None);
        p.routes = vec![
            "192.168.7.0/24".parse().unwrap(),
            "172.27.88.0/24".parse().unwrap(),
        ];
        p.approved = Some(vec!["192.168.0.0/16".parse().unwrap()]);
        state.peers.push(p);
        let eps = from_state("wgt0", &Endpoint::Server(state));
        let peer = &eps[0].peers[0];
        assert_eq!(
            peer.routes,
            ["192.168.7.0/24".parse::<IpNetwork>().unwrap()]
        );
        assert_eq!(
            peer.pending_routes,
            ["172.27.88.0/24".parse::<IpNetwork>().unwrap()]
        );
        assert_eq!(eps[0].listen_port, Some(51820));
    }

    #[test]
    fn the_text_shows_transport_keepalive_routes_and_how_to_approve_a_route() {
        let mut e = live(Role::Server, State::Up, &[Some(12)]);
        e.backend = Some(BackendKind::Userspace);
        e.address6 = Some("fd00:77::1/64".parse().unwrap());
        let p = &mut e.peers[0];
        p.name = Some("branch".into());
        p.address = Some("10.77.0.3".parse().unwrap());
        p.endpoint = Some("198.51.100.7:40000".parse().unwrap());
        p.transport = Some("wss via proxy 10.0.0.1:3128".into());
        p.keepalive = Some(25);
        p.rx_bytes = 5;
        p.tx_bytes = 7;
        p.routes = vec!["192.168.7.0/24".parse().unwrap()];
        p.pending_routes = vec!["172.27.88.0/24".parse().unwrap()];
        let text = render(&[e]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("wgt0 (server, up, "), "{text}");
        assert!(
            text.contains("  address:    10.77.0.1/24, fd00:77::1/64\n"),
            "{text}"
        );
        assert!(text.contains("  listen port: 51820\n"), "{text}");
        assert!(
            text.contains(
                "  peer 10.77.0.3 (branch): endpoint 198.51.100.7:40000 over wss via proxy 10.0.0.1:3128, handshake 12s ago, rx 5 B, tx 7 B, keepalive 25s\n"
            ),
            "{text}"
        );
        assert!(text.contains("    routes 192.168.7.0/24\n"), "{text}");
        assert!(
            text.contains(
                "    waiting for approval: 172.27.88.0/24 (tunnel route approve branch 172.27.88.0/24)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_text_leaves_out_udp_and_what_is_unknown() {
        let mut e = live(Role::Joined, State::Up, &[None]);
        e.container = Some("web".into());
        e.container_id = Some("0123456789abcdef0123".into());
        let p = &mut e.peers[0];
        p.name = None;
        p.transport = Some("udp".into());
        p.pending_routes = vec!["172.27.88.0/24".parse().unwrap()];
        let text = render(&[e]);
        assert!(
            text.contains("  peer - (?): endpoint -, handshake never, rx 0 B, tx 0 B\n"),
            "{text}"
        );
        // A container id is shown short, as docker ps does.
        assert!(
            text.contains("  container:  web (0123456789ab)\n"),
            "{text}"
        );
        // No name, no address: the approval hint has a placeholder.
        assert!(text.contains("route approve SITE 172.27.88.0/24"), "{text}");
        assert_eq!(
            render(&[]),
            "no endpoints (nothing in the state directory)\n"
        );
    }

    #[test]
    fn the_json_leaves_out_empty_optional_fields_and_reads_older_reports() {
        let e = live(Role::Server, State::Up, &[Some(1)]);
        let json = serde_json::to_value(&e).unwrap();
        assert!(json.get("address6").is_none(), "{json}");
        assert!(json["peers"][0].get("pending_routes").is_none(), "{json}");
        // A report from before names, routes and transports: still read.
        let mut old = json.clone();
        let obj = old.as_object_mut().unwrap();
        obj.remove("name");
        obj.remove("routes");
        let peer = old["peers"][0].as_object_mut().unwrap();
        peer.remove("transport");
        peer.remove("routes");
        let back: EndpointStatus = serde_json::from_value(old).unwrap();
        assert_eq!(back.name, None);
        assert!(back.routes.is_empty() && back.peers[0].transport.is_none());
        assert_eq!(serde_json::from_value::<EndpointStatus>(json).unwrap(), e);
    }
}
