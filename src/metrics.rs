//! Prometheus metrics (`--metrics ADDR`, served on `GET /metrics`):
//!
//! - per peer of every endpoint of this host: bytes received and sent,
//!   seconds since its last handshake, changes of its endpoint;
//! - per container: attaches and re-attaches;
//! - join tokens redeemed, and control-API refusals by reason.
//!
//! Peer figures are read from the running endpoints at each scrape (what
//! `tunnel status` shows); events are counted as they happen. Encoded by
//! prometheus-client.
//!
//! Whoever can connect reads them: on loopback that is every local user,
//! not just root. So the listener stays on loopback unless the operator
//! opts in (`--metrics-public`), and peers are labelled by their tunnel
//! address only unless the operator opts in to their keys and names
//! (`--metrics-peers`); see [`Exposure`].

use crate::status::EndpointStatus;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub const DEFAULT_ADDR: &str = "127.0.0.1:9580";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainerLabels {
    container: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// What the metrics show, and to whom: the operator's opt-ins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exposure {
    /// Listen off loopback (`--metrics-public`).
    pub public: bool,
    /// Label the peer series with each peer's public key and name
    /// (`--metrics-peers`).
    pub peers: bool,
}

/// How a peer's series are labelled.
///
/// Without `--metrics-peers` a peer is named by its tunnel address alone.
/// Aggregating all peers into one series would hide the one thing a
/// per-peer metric is for (which site stopped handshaking), and an
/// ordinal or a hash would either move between peers across restarts or
/// let anyone holding a list of keys match them. The address is stable
/// (saved, kept across restarts), reveals neither the key nor the site's
/// name, and tells a local user nothing new: the tunnel's subnet is in
/// the routing table every user can read, and its addresses answer
/// pings. The operator maps it to a site with `tunnel status` (as root).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct PeerLabels {
    iface: String,
    /// The peer's tunnel address; peers without one share `none`.
    address: String,
    /// The public key and the name, with `--metrics-peers` only.
    identity: Option<(String, String)>,
}

impl PeerLabels {
    fn pairs(&self) -> Vec<(String, String)> {
        let mut l = vec![
            ("iface".to_owned(), self.iface.clone()),
            ("address".to_owned(), self.address.clone()),
        ];
        if let Some((peer, name)) = &self.identity {
            l.push(("peer".to_owned(), peer.clone()));
            l.push(("name".to_owned(), name.clone()));
        }
        l
    }
}

/// One peer (or, where labels coincide, several) as the last scrape saw it.
#[derive(Debug, Clone)]
struct PeerSample {
    labels: PeerLabels,
    rx: u64,
    tx: u64,
    handshake_age: Option<u64>,
    endpoint_changes: u64,
}

/// A peer, by interface and public key.
type PeerKey = (String, String);

/// A peer's last endpoint, and how often it changed.
type Roaming = (Option<SocketAddr>, u64);

/// A counter of the peer family: name, help, and where its value comes from.
type PeerCounter = (&'static str, &'static str, fn(&PeerSample) -> u64);

/// What the peer collector encodes: the samples of the last scrape.
#[derive(Debug, Default)]
struct Peers {
    samples: Mutex<Vec<PeerSample>>,
    /// Each peer's last endpoint, and how often it changed.
    endpoints: Mutex<HashMap<PeerKey, Roaming>>,
}

impl prometheus_client::collector::Collector for Peers {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let samples = self.samples.lock().expect("samples lock").clone();
        let labels = |s: &PeerSample| s.labels.pairs();
        let counters: [PeerCounter; 3] = [
            (
                "tunnel_peer_rx_bytes",
                "Bytes received from the peer",
                |s| s.rx,
            ),
            ("tunnel_peer_tx_bytes", "Bytes sent to the peer", |s| s.tx),
            (
                "tunnel_peer_endpoint_changes",
                "Times the peer's endpoint changed (roaming, NAT rebinding)",
                |s| s.endpoint_changes,
            ),
        ];
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for s in &samples {
                let l = labels(s);
                ConstCounter::new(value(s)).encode(family.encode_family(&l)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "tunnel_peer_handshake_age_seconds",
            "Seconds since the last handshake with the peer (absent: never)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for s in samples.iter() {
            if let Some(age) = s.handshake_age {
                let l = labels(s);
                ConstGauge::new(age as i64).encode(family.encode_family(&l)?)?;
            }
        }
        Ok(())
    }
}

/// The metrics of one running `tunnel`.
pub struct Metrics {
    registry: Registry,
    peers: Arc<Peers>,
    redemptions: Counter,
    refusals: Family<ReasonLabels, Counter>,
    attaches: Family<ContainerLabels, Counter>,
    reattaches: Family<ContainerLabels, Counter>,
    path_changes: Counter,
    relayed_bytes: Counter,
    /// The mesh's totals as last sampled, to count on from.
    mesh_seen: std::sync::Mutex<(u64, u64)>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let redemptions = Counter::default();
        let refusals = Family::<ReasonLabels, Counter>::default();
        let attaches = Family::<ContainerLabels, Counter>::default();
        let reattaches = Family::<ContainerLabels, Counter>::default();
        let peers = Arc::new(Peers::default());
        registry.register(
            "tunnel_token_redemptions",
            "Join tokens redeemed on this hub",
            redemptions.clone(),
        );
        registry.register(
            "tunnel_control_refusals",
            "Requests the control API refused, by reason",
            refusals.clone(),
        );
        registry.register(
            "tunnel_container_attaches",
            "Times a container got its endpoint for the first time in this run",
            attaches.clone(),
        );
        registry.register(
            "tunnel_container_reattaches",
            "Times a container got its endpoint back (restarted, re-created)",
            reattaches.clone(),
        );
        let path_changes = Counter::default();
        let relayed_bytes = Counter::default();
        registry.register(
            "tunnel_mesh_path_changes",
            "Times a mesh peer's path changed (relay to direct, direct to relay, one direct address to another)",
            path_changes.clone(),
        );
        registry.register(
            "tunnel_mesh_relayed_bytes",
            "Bytes this hub relayed between sites without decrypting them",
            relayed_bytes.clone(),
        );
        registry.register_collector(Box::new(peers.clone()));
        Arc::new(Self {
            registry,
            peers,
            redemptions,
            refusals,
            attaches,
            reattaches,
            path_changes,
            relayed_bytes,
            mesh_seen: std::sync::Mutex::new((0, 0)),
        })
    }

    pub fn redeemed(&self) {
        self.redemptions.inc();
    }

    pub fn refused(&self, reason: &str) {
        self.refusals
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn attached(&self, container: &str, again: bool) {
        let l = ContainerLabels {
            container: container.to_owned(),
        };
        if again {
            self.reattaches.get_or_create(&l).inc();
        } else {
            self.attaches.get_or_create(&l).inc();
        }
    }

    /// Takes in what the endpoints report now: the peers' figures, and
    /// whether their endpoints moved since last time. Without
    /// `identities`, keys and names are left out of what is kept for
    /// encoding (see [`PeerLabels`]).
    pub fn sample(&self, endpoints: &[EndpointStatus], identities: bool) {
        if let Some(m) = endpoints.first().and_then(|e| e.mesh.as_ref()) {
            let mut last = self.mesh_seen.lock().expect("mesh lock");
            let (changes, bytes) = (m.path_changes.unwrap_or(0), m.relayed_bytes.unwrap_or(0));
            self.path_changes.inc_by(changes.saturating_sub(last.0));
            self.relayed_bytes.inc_by(bytes.saturating_sub(last.1));
            *last = (changes.max(last.0), bytes.max(last.1));
        }
        let mut seen = self.peers.endpoints.lock().expect("endpoints lock");
        let mut samples: Vec<PeerSample> = vec![];
        for e in endpoints {
            for p in &e.peers {
                let key = (e.iface.clone(), p.public_key.to_string());
                let entry = seen.entry(key).or_insert((p.endpoint, 0));
                if p.endpoint.is_some() && entry.0.is_some() && entry.0 != p.endpoint {
                    entry.1 += 1;
                }
                if p.endpoint.is_some() {
                    entry.0 = p.endpoint;
                }
                let labels = PeerLabels {
                    iface: e.iface.clone(),
                    address: p
                        .address
                        .map_or_else(|| "none".to_owned(), |a| a.to_string()),
                    identity: identities
                        .then(|| (p.public_key.to_string(), p.name.clone().unwrap_or_default())),
                };
                let sample = PeerSample {
                    labels,
                    rx: p.rx_bytes,
                    tx: p.tx_bytes,
                    handshake_age: p.last_handshake_secs,
                    endpoint_changes: entry.1,
                };
                // Two series with the same labels are not valid exposition:
                // peers that share them (no address, no identity) are summed.
                match samples.iter_mut().find(|s| s.labels == sample.labels) {
                    Some(s) => {
                        s.rx += sample.rx;
                        s.tx += sample.tx;
                        s.endpoint_changes += sample.endpoint_changes;
                        s.handshake_age = match (s.handshake_age, sample.handshake_age) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                    None => samples.push(sample),
                }
            }
        }
        *self.peers.samples.lock().expect("samples lock") = samples;
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("--metrics {0:?} is not ADDR:PORT")]
    BadAddr(String),
    #[error(
        "--metrics {0} is off loopback, where other hosts could read it; add --metrics-public if that is meant"
    )]
    NotLoopback(SocketAddr),
    #[error("listening for metrics on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub fn parse_addr(s: &str) -> Result<SocketAddr, MetricsError> {
    s.parse().map_err(|_| MetricsError::BadAddr(s.to_owned()))
}

/// Refuses an address off loopback that the operator did not opt in to:
/// checked before anything else, so that a mistaken address changes nothing.
pub fn check(addr: SocketAddr, exposure: Exposure) -> Result<(), MetricsError> {
    if addr.ip().to_canonical().is_loopback() || exposure.public {
        Ok(())
    } else {
        Err(MetricsError::NotLoopback(addr))
    }
}

/// A bound metrics listener, and what its scrapes show.
#[derive(Debug)]
pub struct Listener {
    tcp: tokio::net::TcpListener,
    identities: bool,
}

/// Binds the metrics listener; off loopback (opted in), says who can read it.
pub async fn bind(addr: SocketAddr, exposure: Exposure) -> Result<Listener, MetricsError> {
    check(addr, exposure)?;
    if !addr.ip().to_canonical().is_loopback() {
        let what = if exposure.peers {
            "the peers' keys, names and traffic"
        } else {
            "the peers' addresses and traffic"
        };
        tracing::warn!("metrics on {addr}, off loopback: whoever reaches it sees {what}");
    }
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    Ok(Listener {
        tcp,
        identities: exposure.peers,
    })
}

/// Serves `GET /metrics` until `stop`, sampling `api` at each scrape.
pub async fn serve(
    listener: Listener,
    metrics: Arc<Metrics>,
    api: Arc<dyn crate::control::local::LocalApi>,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    use axum::extract::State;
    use axum::http::header;
    use axum::response::IntoResponse;
    type Scraped = (Arc<Metrics>, Arc<dyn crate::control::local::LocalApi>, bool);
    async fn scrape(State((metrics, api, identities)): State<Scraped>) -> impl IntoResponse {
        metrics.sample(&api.report().await, identities);
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            metrics.encode(),
        )
    }
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state((metrics, api, listener.identities));
    crate::control::server::serve(listener.tcp, app, crate::control::server::TUNNEL, stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use crate::status::{PeerReport, Role, State};

    fn endpoint(rx: u64, endpoint: &str) -> EndpointStatus {
        EndpointStatus {
            iface: "wgt0".into(),
            name: None,
            role: Role::Server,
            state: State::Up,
            backend: None,
            address: "10.77.0.1/24".parse().unwrap(),
            address6: None,
            listen_port: Some(51820),
            listening: vec![],
            public_key: PrivateKey::from_bytes([7; 32]).public_key(),
            container: None,
            container_id: None,
            server: None,
            routes: vec![],
            mesh: None,
            peers: vec![PeerReport {
                public_key: PrivateKey::from_bytes([9; 32]).public_key(),
                name: Some("branch".into()),
                address: Some("10.77.0.2".parse().unwrap()),
                endpoint: Some(endpoint.parse().unwrap()),
                last_handshake_secs: Some(4),
                rx_bytes: rx,
                tx_bytes: 10,
                keepalive: None,
                transport: None,
                routes: vec![],
                pending_routes: vec![],
                path: None,
            }],
        }
    }

    #[test]
    fn peers_events_and_containers_are_exposed_as_openmetrics() {
        let m = Metrics::new();
        m.redeemed();
        m.refused("unauthorized");
        m.refused("unauthorized");
        m.attached("web", false);
        m.attached("web", true);
        m.sample(&[endpoint(100, "192.0.2.1:5000")], true);
        m.sample(&[endpoint(250, "192.0.2.9:5000")], true);
        let text = m.encode();
        for want in [
            "tunnel_token_redemptions_total 1",
            "tunnel_control_refusals_total{reason=\"unauthorized\"} 2",
            "tunnel_container_attaches_total{container=\"web\"} 1",
            "tunnel_container_reattaches_total{container=\"web\"} 1",
            "name=\"branch\"} 250",
            "address=\"10.77.0.2\"",
            &format!("peer=\"{}\"", PrivateKey::from_bytes([9; 32]).public_key()),
            "tunnel_peer_endpoint_changes_total{",
            "tunnel_peer_handshake_age_seconds{",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want}:\n{text}");
        }
        let changes = text
            .lines()
            .find(|l| l.starts_with("tunnel_peer_endpoint_changes_total{"))
            .unwrap();
        assert!(changes.ends_with(" 1"), "{changes}");
    }

    #[test]
    fn without_the_opt_in_peers_are_labelled_by_address_only() {
        let m = Metrics::new();
        m.sample(&[endpoint(100, "192.0.2.1:5000")], false);
        m.sample(&[endpoint(250, "192.0.2.9:5000")], false);
        let text = m.encode();
        let key = PrivateKey::from_bytes([9; 32]).public_key().to_string();
        assert!(!text.contains(&key), "the key leaked:\n{text}");
        assert!(!text.contains("branch"), "the name leaked:\n{text}");
        assert!(!text.contains("peer="), "{text}");
        for want in [
            "tunnel_peer_rx_bytes_total{iface=\"wgt0\",address=\"10.77.0.2\"} 250",
            "tunnel_peer_handshake_age_seconds{iface=\"wgt0\",address=\"10.77.0.2\"} 4",
            // Roaming is still counted per peer, by its key, internally.
            "tunnel_peer_endpoint_changes_total{iface=\"wgt0\",address=\"10.77.0.2\"} 1",
        ] {
            assert!(text.contains(want), "{want}:\n{text}");
        }
    }

    #[test]
    fn peers_without_an_address_share_one_series() {
        let mut e = endpoint(100, "192.0.2.1:5000");
        let mut other = e.peers[0].clone();
        other.public_key = PrivateKey::from_bytes([8; 32]).public_key();
        other.last_handshake_secs = Some(2);
        e.peers.push(other);
        for p in &mut e.peers {
            p.address = None;
        }
        let m = Metrics::new();
        m.sample(&[e.clone()], false);
        let text = m.encode();
        let rx: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tunnel_peer_rx_bytes_total{"))
            .collect();
        assert_eq!(
            rx,
            ["tunnel_peer_rx_bytes_total{iface=\"wgt0\",address=\"none\"} 200"]
        );
        assert!(
            text.contains("tunnel_peer_handshake_age_seconds{iface=\"wgt0\",address=\"none\"} 2")
        );
        // With the opt-in each is its own series again.
        m.sample(&[e], true);
        let text = m.encode();
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("tunnel_peer_rx_bytes_total{"))
                .count(),
            2,
            "{text}"
        );
    }

    #[test]
    fn off_loopback_needs_the_opt_in() {
        let public = Exposure {
            public: true,
            peers: false,
        };
        for ok in [
            "127.0.0.1:9580",
            "127.8.9.1:1",
            "[::1]:9580",
            "[::ffff:127.0.0.1]:1",
        ] {
            let a = parse_addr(ok).unwrap();
            assert!(check(a, Exposure::default()).is_ok(), "{ok}");
        }
        for off in [
            "0.0.0.0:9580",
            "[::]:9580",
            "192.0.2.1:9580",
            "[::ffff:0.0.0.0]:1",
        ] {
            let a = parse_addr(off).unwrap();
            let e = check(a, Exposure::default()).unwrap_err();
            assert!(matches!(e, MetricsError::NotLoopback(_)), "{off}");
            assert!(e.to_string().contains("--metrics-public"), "{e}");
            assert!(check(a, public).is_ok(), "{off}");
        }
    }

    /// The value of the one series that starts with `prefix`, if any.
    fn value(text: &str, prefix: &str) -> Option<String> {
        let mut found = text.lines().filter(|l| l.starts_with(prefix));
        let line = found.next()?;
        assert!(found.next().is_none(), "two series {prefix}:\n{text}");
        line.rsplit(' ').next().map(str::to_owned)
    }

    const CHANGES: &str = "tunnel_peer_endpoint_changes_total{iface=\"wgt0\"";

    #[test]
    fn only_a_move_from_one_known_endpoint_to_another_is_a_change() {
        let m = Metrics::new();
        let at = |now: Option<&str>| {
            let mut e = endpoint(1, "192.0.2.1:5000");
            e.peers[0].endpoint = now.map(|s| s.parse().unwrap());
            m.sample(&[e], false);
            value(&m.encode(), CHANGES).unwrap()
        };
        assert_eq!(
            at(Some("192.0.2.1:5000")),
            "0",
            "the first one is no change"
        );
        // Not known for a while (a device re-made): not a move either, and
        // the last known one is kept.
        assert_eq!(at(None), "0");
        assert_eq!(at(Some("192.0.2.1:5000")), "0");
        assert_eq!(at(Some("192.0.2.1:6000")), "1", "NAT rebinding");
        assert_eq!(at(Some("192.0.2.1:6000")), "1");
        assert_eq!(at(Some("203.0.113.4:6000")), "2");
    }

    #[test]
    fn the_same_key_on_two_interfaces_roams_separately() {
        let m = Metrics::new();
        let on = |iface: &str, ep: &str| {
            let mut e = endpoint(1, ep);
            e.iface = iface.into();
            e
        };
        m.sample(
            &[on("wgt0", "192.0.2.1:1"), on("wgt1", "192.0.2.1:1")],
            false,
        );
        m.sample(
            &[on("wgt0", "192.0.2.1:2"), on("wgt1", "192.0.2.1:1")],
            false,
        );
        let text = m.encode();
        assert_eq!(value(&text, CHANGES).as_deref(), Some("1"));
        assert_eq!(
            value(&text, "tunnel_peer_endpoint_changes_total{iface=\"wgt1\"").as_deref(),
            Some("0")
        );
    }

    #[test]
    fn a_peer_without_a_handshake_has_traffic_series_but_no_age() {
        let mut e = endpoint(100, "192.0.2.1:5000");
        e.peers[0].last_handshake_secs = None;
        let m = Metrics::new();
        m.sample(&[e], false);
        let text = m.encode();
        assert_eq!(
            value(&text, "tunnel_peer_rx_bytes_total{").as_deref(),
            Some("100")
        );
        assert_eq!(value(&text, "tunnel_peer_handshake_age_seconds{"), None);
    }

    #[test]
    fn a_peer_gone_since_the_last_scrape_is_gone_from_the_next() {
        let m = Metrics::new();
        m.sample(&[endpoint(100, "192.0.2.1:5000")], false);
        assert!(value(&m.encode(), "tunnel_peer_rx_bytes_total{").is_some());
        m.sample(&[], false);
        let text = m.encode();
        assert_eq!(value(&text, "tunnel_peer_rx_bytes_total{"), None, "{text}");
        // The families stay, described, for whoever scrapes next.
        assert!(
            text.contains("# TYPE tunnel_peer_rx_bytes counter"),
            "{text}"
        );
    }

    #[test]
    fn refusals_are_counted_per_reason_and_an_address_that_is_none_is_named() {
        let m = Metrics::new();
        m.refused("unauthorized");
        m.refused("rate");
        m.refused("rate");
        let text = m.encode();
        assert_eq!(
            value(&text, "tunnel_control_refusals_total{reason=\"rate\"}").as_deref(),
            Some("2")
        );
        assert_eq!(
            value(
                &text,
                "tunnel_control_refusals_total{reason=\"unauthorized\"}"
            )
            .as_deref(),
            Some("1")
        );
        let e = parse_addr("localhost:9580").unwrap_err();
        assert!(matches!(e, MetricsError::BadAddr(_)), "{e:?}");
        assert!(e.to_string().contains("not ADDR:PORT"), "{e}");
    }
}
