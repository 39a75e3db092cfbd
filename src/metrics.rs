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

/// One peer as the last scrape saw it.
#[derive(Debug, Clone)]
struct PeerSample {
    iface: String,
    peer: String,
    name: String,
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
        let labels = |s: &PeerSample| {
            vec![
                ("iface".to_owned(), s.iface.clone()),
                ("peer".to_owned(), s.peer.clone()),
                ("name".to_owned(), s.name.clone()),
            ]
        };
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
        registry.register_collector(Box::new(peers.clone()));
        Arc::new(Self {
            registry,
            peers,
            redemptions,
            refusals,
            attaches,
            reattaches,
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
    /// whether their endpoints moved since last time.
    pub fn sample(&self, endpoints: &[EndpointStatus]) {
        let mut seen = self.peers.endpoints.lock().expect("endpoints lock");
        let mut samples = vec![];
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
                samples.push(PeerSample {
                    iface: e.iface.clone(),
                    peer: p.public_key.to_string(),
                    name: p.name.clone().unwrap_or_default(),
                    rx: p.rx_bytes,
                    tx: p.tx_bytes,
                    handshake_age: p.last_handshake_secs,
                    endpoint_changes: entry.1,
                });
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

/// Binds the metrics listener; off loopback, says who can read it.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    if !addr.ip().is_loopback() {
        tracing::warn!(
            "metrics on {addr}, off loopback: whoever reaches it sees the peers' keys, names and traffic"
        );
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `GET /metrics` until `stop`, sampling `api` at each scrape.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    api: Arc<dyn crate::control::local::LocalApi>,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    use axum::extract::State;
    use axum::http::header;
    use axum::response::IntoResponse;
    async fn scrape(
        State((metrics, api)): State<(Arc<Metrics>, Arc<dyn crate::control::local::LocalApi>)>,
    ) -> impl IntoResponse {
        metrics.sample(&api.report().await);
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
        .with_state((metrics, api));
    crate::control::server::serve(listener, app, crate::control::server::TUNNEL, stop).await;
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
            public_key: PrivateKey::from_bytes([7; 32]).public_key(),
            container: None,
            container_id: None,
            server: None,
            routes: vec![],
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
        m.sample(&[endpoint(100, "192.0.2.1:5000")]);
        m.sample(&[endpoint(250, "192.0.2.9:5000")]);
        let text = m.encode();
        for want in [
            "tunnel_token_redemptions_total 1",
            "tunnel_control_refusals_total{reason=\"unauthorized\"} 2",
            "tunnel_container_attaches_total{container=\"web\"} 1",
            "tunnel_container_reattaches_total{container=\"web\"} 1",
            "name=\"branch\"} 250",
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
}
