//! Container endpoints: each attached container gets its own WireGuard
//! interface, made in this namespace (where its UDP socket stays) and moved
//! into the container's, and follows the container through restarts and
//! re-creation via Docker events.
//!
//! The tool never starts, stops or removes containers; when a container
//! stops, its endpoint keeps its key and address and is re-attached when the
//! container runs again.

use crate::docker::{self, Action, Attached, ContainerRuntime, DockerError, EventKind};
use crate::keys::PrivateKey;
use crate::net::{NetOps, Netlink};
use crate::status::{EndpointStatus, PeerReport, Role, State};
use crate::transport::Relay;
use crate::transport::ws::{Dialer, Link};
use crate::wg::{self, BackendChoice, DeviceSpec, PeerSpec, Placement, WgDevice, WgError};
use futures::StreamExt;
use ipnetwork::IpNetwork;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("attaching {container}")]
    Attach {
        container: String,
        #[source]
        source: WgError,
    },
    #[error("attaching {container}: its network namespace")]
    Namespace {
        container: String,
        #[source]
        source: crate::net::NetError,
    },
    #[error("an endpoint for container {container}: {reason}")]
    Endpoint { container: String, reason: String },
}

/// Where the endpoints of containers attached by label (or by the network
/// driver) come from and go back to: the ledger on a hub, the hub's API on
/// a site. Each has a key made on this host.
#[async_trait::async_trait]
pub trait Endpoints: Send + Sync {
    /// A new endpoint for container `name` (for the network driver when
    /// `driver`: not kept across runs).
    async fn allocate(&self, name: &str, driver: bool) -> Result<EndpointSpec, ContainerError>;
    /// The endpoint's container is `name` (known only once it started).
    async fn rename(&self, spec: &EndpointSpec, name: &str) -> Result<(), ContainerError>;
    /// Gives it back: the container is gone.
    async fn release(&self, spec: &EndpointSpec) -> Result<(), ContainerError>;
}

/// `--attach-label`: containers that carry the label are attached as they
/// start, and their endpoints given back when they are removed.
pub struct ByLabel {
    pub label: docker::Label,
    pub endpoints: Arc<dyn Endpoints>,
}

/// How an endpoint gets into a container, and is checked from inside it:
/// the OS-facing half of attaching, behind a trait so that the follower's
/// decisions are tested with a fake.
#[async_trait::async_trait]
pub trait Placer: Send + Sync {
    /// Creates the device on the host (where its UDP socket stays) and
    /// moves it into the network namespace of `pid`.
    async fn place(
        &self,
        spec: &DeviceSpec,
        container: &str,
        pid: u32,
    ) -> Result<Placed, ContainerError>;
    /// Connects to `target` from inside the namespace of `pid` until it
    /// answers or `timeout` passes; returns how long that took.
    async fn probe(
        &self,
        pid: u32,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<Duration, String>;
}

/// A device in a container, and netlink in the container's namespace.
pub struct Placed {
    pub device: Box<dyn WgDevice>,
    pub net: Arc<dyn NetOps>,
}

/// The real placer: devices made in this namespace with `backend`.
pub struct HostPlacer {
    pub host: Arc<dyn NetOps>,
    pub backend: BackendChoice,
}

impl HostPlacer {
    pub fn shared(host: Arc<dyn NetOps>, backend: BackendChoice) -> Arc<dyn Placer> {
        Arc::new(Self { host, backend })
    }
}

#[async_trait::async_trait]
impl Placer for HostPlacer {
    async fn place(
        &self,
        spec: &DeviceSpec,
        container: &str,
        pid: u32,
    ) -> Result<Placed, ContainerError> {
        let net: Arc<dyn NetOps> = Arc::new(Netlink::connect_in_netns(pid).map_err(|source| {
            ContainerError::Namespace {
                container: container.to_owned(),
                source,
            }
        })?);
        let placement = Placement {
            pid,
            net: net.clone(),
        };
        let device = wg::create(spec, self.backend, self.host.clone(), Some(placement))
            .await
            .map_err(|source| ContainerError::Attach {
                container: container.to_owned(),
                source,
            })?;
        Ok(Placed { device, net })
    }

    async fn probe(
        &self,
        pid: u32,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<Duration, String> {
        probe_from_netns(pid, target, timeout).await
    }
}

/// The container endpoints as status shows them, with their devices while
/// attached, shared between the follower and the local API.
#[derive(Clone, Default)]
pub struct ContainerView(Arc<Mutex<Vec<ViewEntry>>>);

type ViewEntry = (EndpointStatus, Option<Arc<dyn WgDevice>>);

impl ContainerView {
    /// The endpoints, with live handshake and traffic figures where attached.
    pub async fn report(&self) -> Vec<EndpointStatus> {
        let entries = self.0.lock().expect("status lock").clone();
        let mut out = Vec::with_capacity(entries.len());
        for (mut e, device) in entries {
            if let Some(d) = device
                && let Ok(peers) = d.peers().await
            {
                for (report, live) in e.peers.iter_mut().zip(peers.iter()) {
                    let transport = report.transport.take();
                    *report = PeerReport::from_live(live, report.name.clone(), report.address);
                    report.transport = transport;
                    if report
                        .endpoint
                        .as_ref()
                        .is_some_and(crate::transport::is_virtual)
                    {
                        report.endpoint = None;
                    }
                }
            }
            out.push(e);
        }
        out
    }
}

/// One container endpoint, as configured.
#[derive(Debug, Clone)]
pub struct EndpointSpec {
    /// The container's name (re-created containers are found by name).
    pub container: String,
    pub iface: String,
    pub key: PrivateKey,
    pub address: IpNetwork,
    /// Its IPv6 twin in a dual-stack tunnel.
    pub address6: Option<IpNetwork>,
    /// The hub, as this endpoint's only peer.
    pub hub: PeerSpec,
    pub mtu: u32,
    /// The hub's control API: probed from inside the container to make the
    /// first handshake happen now and to prove traffic flows.
    pub probe: SocketAddr,
    /// How to reach the hub's WebSocket, when the site uses one.
    pub link: Option<Arc<Dialer>>,
    /// Attached by label (or the network driver): given back when its
    /// container is removed.
    pub by_label: bool,
}

struct Slot {
    spec: EndpointSpec,
    /// Times attached in this run (the first one is not a re-attach).
    attaches: u32,
    attached: Option<(Attached, Arc<dyn WgDevice>)>,
    /// The endpoint's WebSocket link to the hub, while attached.
    link: Option<Link>,
    /// Netlink in the container's namespace, while attached.
    net: Option<Arc<dyn NetOps>>,
}

pub struct Follower {
    runtime: Arc<dyn ContainerRuntime>,
    placer: Arc<dyn Placer>,
    slots: Vec<Slot>,
    by_label: Option<ByLabel>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// LANs behind other sites, routed through the hub from each container.
    routes: Vec<IpNetwork>,
    /// What status reports, updated on every attach and detach.
    status: ContainerView,
}

/// Connects to the hub's control API from inside the namespace of `pid`,
/// retrying until `timeout`. Runs on its own thread: entering a namespace
/// changes the calling thread, so it is never done on a tokio worker.
pub async fn probe_from_netns(
    pid: u32,
    target: SocketAddr,
    timeout: Duration,
) -> Result<Duration, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            use std::os::fd::AsFd;
            let path = format!("/proc/{pid}/ns/net");
            let ns = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("entering {path}: {e}"))?;
            let start = Instant::now();
            loop {
                match std::net::TcpStream::connect_timeout(&target, Duration::from_millis(100)) {
                    Ok(_) => return Ok(start.elapsed()),
                    Err(e) if start.elapsed() > timeout => {
                        return Err(format!("no answer from {target}: {e}"));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })();
        let _ = tx.send(result);
    });
    rx.await.map_err(|_| "probe thread died".to_owned())?
}

impl Follower {
    pub fn new(
        runtime: Arc<dyn ContainerRuntime>,
        placer: Arc<dyn Placer>,
        specs: Vec<EndpointSpec>,
    ) -> Self {
        let slots = specs
            .into_iter()
            .map(|spec| Slot {
                spec,
                attaches: 0,
                attached: None,
                link: None,
                net: None,
            })
            .collect();
        let me = Self {
            runtime,
            placer,
            slots,
            by_label: None,
            metrics: None,
            routes: vec![],
            status: ContainerView::default(),
        };
        me.publish();
        me
    }

    /// Counts attaches and re-attaches in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Also attaches the containers that carry a label.
    pub fn with_label(mut self, by_label: ByLabel) -> Self {
        self.by_label = Some(by_label);
        self
    }

    /// Attaches the running containers with the label that have no
    /// endpoint yet.
    pub async fn discover(&mut self) -> Result<(), ContainerError> {
        let Some(b) = &self.by_label else {
            return Ok(());
        };
        let names = self.runtime.labelled(&b.label).await?;
        // Labelled endpoints whose containers went while nobody watched.
        let mut i = 0;
        while i < self.slots.len() {
            if self.slots[i].spec.by_label
                && self
                    .runtime
                    .inspect(&self.slots[i].spec.container)
                    .await?
                    .is_none()
            {
                self.drop_slot(i).await;
            } else {
                i += 1;
            }
        }
        let mut first_err = None;
        for name in names {
            if let Err(e) = self.adopt(&name).await {
                tracing::warn!("{e}");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Gives a labelled container an endpoint and attaches it, unless it
    /// has one.
    async fn adopt(&mut self, name: &str) -> Result<(), ContainerError> {
        if self.slots.iter().any(|s| s.spec.container == name) {
            return Ok(());
        }
        let Some(b) = &self.by_label else {
            return Ok(());
        };
        let mut spec = b.endpoints.allocate(name, false).await?;
        spec.by_label = true;
        tracing::info!(
            "container {name} carries the label {}: endpoint {} as {}",
            b.label,
            spec.iface,
            spec.address
        );
        self.slots.push(Slot {
            spec,
            attaches: 0,
            attached: None,
            link: None,
            net: None,
        });
        self.publish();
        self.reconcile(self.slots.len() - 1).await
    }

    /// A labelled container was removed: its endpoint goes too.
    async fn drop_slot(&mut self, i: usize) {
        self.detach(i).await;
        let slot = self.slots.remove(i);
        self.publish();
        if let Some(b) = &self.by_label {
            match b.endpoints.release(&slot.spec).await {
                Ok(()) => tracing::info!(
                    "container {} was removed; its endpoint {} is given back",
                    slot.spec.container,
                    slot.spec.address
                ),
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }

    /// A live view of the container endpoints, for status.
    pub fn status(&self) -> ContainerView {
        self.status.clone()
    }

    fn publish(&self) {
        let all = self
            .slots
            .iter()
            .map(|s| {
                (
                    EndpointStatus {
                        iface: s.spec.iface.clone(),
                        name: None,
                        role: Role::Container,
                        state: if s.attached.is_some() {
                            State::Up
                        } else {
                            State::Down
                        },
                        backend: s.attached.as_ref().map(|(_, d)| d.backend()),
                        address: s.spec.address,
                        address6: s.spec.address6,
                        listen_port: None,
                        public_key: s.spec.key.public_key(),
                        container: Some(s.spec.container.clone()),
                        container_id: s.attached.as_ref().map(|(a, _)| a.id.clone()),
                        server: None,
                        routes: vec![],
                        peers: vec![PeerReport {
                            public_key: s.spec.hub.public_key,
                            name: Some("server".into()),
                            address: Some(s.spec.probe.ip()),
                            endpoint: s.spec.hub.endpoint,
                            last_handshake_secs: None,
                            rx_bytes: 0,
                            tx_bytes: 0,
                            keepalive: s.spec.hub.keepalive,
                            transport: Some(
                                if s.spec.link.is_some() {
                                    "websocket"
                                } else {
                                    "udp"
                                }
                                .into(),
                            ),
                            routes: self.routes.clone(),
                            pending_routes: vec![],
                        }],
                    },
                    s.attached.as_ref().map(|(_, d)| d.clone()),
                )
            })
            .collect();
        *self.status.0.lock().expect("status lock") = all;
    }

    /// Brings every endpoint in line with its container. Errors detach
    /// nothing that was fine; the caller decides whether they are fatal.
    pub async fn reconcile_all(&mut self) -> Result<(), ContainerError> {
        let mut first_err = None;
        for i in 0..self.slots.len() {
            match self.reconcile(i).await {
                // One engine, one answer: the caller says it once.
                Err(e @ ContainerError::Docker(DockerError::Unavailable(_))) => return Err(e),
                Err(e) => {
                    tracing::warn!("{e}");
                    first_err.get_or_insert(e);
                }
                Ok(()) => {}
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn reconcile(&mut self, i: usize) -> Result<(), ContainerError> {
        let name = self.slots[i].spec.container.clone();
        let observed = self.runtime.inspect(&name).await?;
        let attached = self.slots[i].attached.as_ref().map(|(a, _)| a.clone());
        for action in docker::plan(attached.as_ref(), observed.as_ref()) {
            match action {
                Action::Detach => self.detach(i).await,
                Action::Attach { id, pid } => self.attach(i, id, pid).await?,
            }
        }
        Ok(())
    }

    async fn attach(&mut self, i: usize, id: String, pid: u32) -> Result<(), ContainerError> {
        let started = Instant::now();
        let spec = self.slots[i].spec.clone();
        let device_spec = DeviceSpec {
            name: spec.iface.clone(),
            private_key: spec.key.clone(),
            listen_port: 0,
            peers: vec![spec.hub.clone()],
            addresses: std::iter::once(spec.address).chain(spec.address6).collect(),
            mtu: spec.mtu,
            confine: None,
            relay: spec.link.as_ref().map(|_| Relay::new("websocket")),
            quarantine: None,
        };
        let Placed { device, net } = self
            .placer
            .place(&device_spec, &spec.container, pid)
            .await?;
        crate::sys::crash_point("container-attach");
        if let Err(source) =
            route_into(device.as_ref(), net.as_ref(), &spec, &[], &self.routes).await
        {
            let _ = device.destroy().await;
            return Err(ContainerError::Attach {
                container: spec.container.clone(),
                source,
            });
        }
        self.slots[i].net = Some(net);
        // Its own WebSocket link to the hub, when the site uses one: each
        // endpoint is its own WireGuard peer of the hub.
        self.slots[i].link = match (&spec.link, &device_spec.relay) {
            (Some(d), Some(r)) => Some(Link::spawn(d.clone(), r.clone(), None)),
            _ => None,
        };
        self.slots[i].attached = Some((Attached { id, pid }, Arc::from(device)));
        self.slots[i].attaches += 1;
        if let Some(m) = &self.metrics {
            m.attached(&spec.container, self.slots[i].attaches > 1);
        }
        self.publish();
        // The probe makes the first handshake happen now and shows that
        // traffic flows; it runs on its own so that a shutdown or the next
        // event never waits for it.
        let placer = self.placer.clone();
        tokio::spawn(async move {
            match placer.probe(pid, spec.probe, Duration::from_secs(10)).await {
                Ok(_) => tracing::info!(
                    "attached {} to container {} as {} ({} ms to traffic)",
                    spec.iface,
                    spec.container,
                    spec.address,
                    started.elapsed().as_millis()
                ),
                Err(e) => tracing::warn!(
                    "attached {} to container {}, but {e}",
                    spec.iface,
                    spec.container
                ),
            }
        });
        Ok(())
    }

    async fn detach(&mut self, i: usize) {
        self.slots[i].link = None;
        self.slots[i].net = None;
        if let Some((a, device)) = self.slots[i].attached.take() {
            self.publish();
            let container = &self.slots[i].spec.container;
            match device.destroy().await {
                Ok(()) => tracing::info!(
                    "detached {} from container {container} ({})",
                    device.name(),
                    short(&a.id)
                ),
                Err(e) => tracing::warn!(
                    "detaching {} from container {container}: {e}",
                    device.name()
                ),
            }
        }
    }

    /// The LANs behind other sites are now `routes`: every attached
    /// endpoint routes them to the hub.
    pub async fn set_routes(&mut self, routes: Vec<IpNetwork>) {
        if routes == self.routes {
            return;
        }
        for s in &self.slots {
            if let (Some((_, device)), Some(net)) = (&s.attached, &s.net)
                && let Err(e) = route_into(
                    device.as_ref(),
                    net.as_ref(),
                    &s.spec,
                    &self.routes,
                    &routes,
                )
                .await
            {
                tracing::warn!("routing LANs into container {}: {e}", s.spec.container);
            }
        }
        self.routes = routes;
        self.publish();
    }

    pub async fn detach_all(&mut self) {
        for i in 0..self.slots.len() {
            self.detach(i).await;
        }
    }

    async fn on_event(&mut self, ev: docker::ContainerEvent) {
        let hit = self.slots.iter().position(|s| {
            s.spec.container == ev.name || s.attached.as_ref().is_some_and(|(a, _)| a.id == ev.id)
        });
        let Some(i) = hit else {
            let labelled = self
                .by_label
                .as_ref()
                .is_some_and(|b| b.label.matches(&ev.labels));
            if ev.kind == EventKind::Start
                && labelled
                && let Err(e) = self.adopt(&ev.name).await
            {
                tracing::warn!("{e}");
            }
            return;
        };
        tracing::debug!("container {} {:?}", ev.name, ev.kind);
        if ev.kind == EventKind::Destroy && self.slots[i].spec.by_label {
            self.drop_slot(i).await;
            return;
        }
        if ev.kind == EventKind::Die || ev.kind == EventKind::Destroy {
            self.detach(i).await;
        }
        if let Err(e) = self.reconcile(i).await {
            tracing::warn!("{e}");
        }
    }

    /// Follows Docker events, and the LANs in `routes`, until `stop`
    /// completes; reconnects the event stream if the engine restarts.
    pub async fn follow(
        &mut self,
        stop: impl std::future::Future<Output = ()>,
        mut routes: Option<tokio::sync::watch::Receiver<Vec<IpNetwork>>>,
    ) {
        tokio::pin!(stop);
        if let Some(r) = routes.as_mut() {
            let now = r.borrow_and_update().clone();
            self.set_routes(now).await;
        }
        // The engine may go away (restarted, upgraded, killed): one line
        // when it does, one when it is back, and retries that back off in
        // between, never a log line per retry.
        let mut away: Option<Instant> = None;
        let mut backoff = RETRY_FIRST;
        loop {
            let mut events = self.runtime.events();
            // Whatever happened while not listening.
            let mut seen = self.reconcile_all().await;
            if seen.is_ok() {
                seen = self.discover().await;
            }
            match seen {
                Err(ContainerError::Docker(DockerError::Unavailable(e))) => {
                    if away.is_none() {
                        tracing::warn!(
                            "Docker is not reachable ({e}); attached containers keep their endpoints, reconnecting"
                        );
                        away = Some(Instant::now());
                    }
                }
                _ => {
                    if let Some(since) = away.take() {
                        tracing::info!(
                            "Docker answers again after {} s; containers reconciled",
                            since.elapsed().as_secs()
                        );
                    }
                    backoff = RETRY_FIRST;
                }
            }
            if away.is_none() {
                loop {
                    tokio::select! {
                        _ = &mut stop => return,
                        Some(now) = next_routes(&mut routes) => self.set_routes(now).await,
                        ev = events.next() => match ev {
                            Some(Ok(ev)) => self.on_event(ev).await,
                            Some(Err(e)) => {
                                tracing::debug!("Docker events: {e}");
                                break;
                            }
                            None => break,
                        },
                    }
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                Some(now) = next_routes(&mut routes) => self.set_routes(now).await,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }
}

/// How soon the follower tries Docker again after losing it, and at most.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(4);

/// The next value of `routes`; pending forever without one (or once its
/// sender is gone), so a `select!` branch on it simply never fires.
async fn next_routes(
    routes: &mut Option<tokio::sync::watch::Receiver<Vec<IpNetwork>>>,
) -> Option<Vec<IpNetwork>> {
    if let Some(r) = routes
        && r.changed().await.is_ok()
    {
        return Some(r.borrow_and_update().clone());
    }
    std::future::pending().await
}

/// Makes a container's endpoint route `after` (the LANs behind other
/// sites) to the hub instead of `before`: allowed IPs and routes.
async fn route_into(
    device: &dyn WgDevice,
    net: &dyn NetOps,
    spec: &EndpointSpec,
    before: &[IpNetwork],
    after: &[IpNetwork],
) -> Result<(), WgError> {
    if before == after {
        return Ok(());
    }
    let mut allowed = spec.hub.allowed_ips.clone();
    allowed.extend(after.iter().copied());
    device
        .set_allowed_ips(&spec.hub.public_key, &allowed)
        .await?;
    for r in after.iter().filter(|r| !before.contains(r)) {
        net.add_route(*r, &spec.iface, None).await?;
    }
    for r in before.iter().filter(|r| !after.contains(r)) {
        net.del_route(*r, &spec.iface, None).await?;
    }
    Ok(())
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The interface name of the `n`th container endpoint of `iface`: unique on
/// the host (UAPI sockets are shared by all namespaces) and within 15 bytes.
pub fn endpoint_iface(iface: &str, n: usize) -> String {
    let suffix = format!("c{n}");
    let keep = 15 - suffix.len();
    let base: String = iface.chars().take(keep).collect();
    format!("{base}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::fake::FakeRuntime;
    use crate::docker::{ContainerEvent, ContainerInfo};
    use crate::status::State as Up;
    use crate::wg::fake::FakeWg;

    /// Places fake devices and remembers where.
    #[derive(Default)]
    struct FakePlacer {
        placed: Mutex<Vec<(u32, FakeWg)>>,
        net: Arc<crate::net::fake::FakeNet>,
    }

    #[async_trait::async_trait]
    impl Placer for FakePlacer {
        async fn place(
            &self,
            _spec: &DeviceSpec,
            _container: &str,
            pid: u32,
        ) -> Result<Placed, ContainerError> {
            let dev = FakeWg::default();
            self.placed.lock().unwrap().push((pid, dev.clone()));
            Ok(Placed {
                device: Box::new(dev),
                net: self.net.clone(),
            })
        }

        async fn probe(&self, _: u32, _: SocketAddr, _: Duration) -> Result<Duration, String> {
            Ok(Duration::ZERO)
        }
    }

    impl FakePlacer {
        fn pids(&self) -> Vec<u32> {
            self.placed
                .lock()
                .unwrap()
                .iter()
                .map(|(p, _)| *p)
                .collect()
        }

        fn destroyed(&self) -> Vec<bool> {
            self.placed
                .lock()
                .unwrap()
                .iter()
                .map(|(_, d)| d.state.lock().unwrap().destroyed)
                .collect()
        }

        async fn until(&self, what: &str, cond: impl Fn(&Self) -> bool) {
            for _ in 0..500 {
                if cond(self) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            panic!(
                "{what}: placed {:?}, destroyed {:?}",
                self.pids(),
                self.destroyed()
            );
        }
    }

    fn spec(container: &str) -> EndpointSpec {
        EndpointSpec {
            container: container.into(),
            iface: format!("{container}0"),
            key: PrivateKey::generate(),
            address: "10.77.0.5/24".parse().unwrap(),
            address6: None,
            hub: PeerSpec {
                public_key: PrivateKey::generate().public_key(),
                endpoint: None,
                allowed_ips: vec![],
                keepalive: None,
            },
            mtu: 1420,
            probe: "10.77.0.1:51821".parse().unwrap(),
            link: None,
            by_label: false,
        }
    }

    fn info(id: &str, name: &str, pid: Option<u32>) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            name: name.into(),
            pid,
            endpoint_ids: vec![],
        }
    }

    fn event(kind: EventKind, id: &str, name: &str) -> ContainerEvent {
        ContainerEvent {
            kind,
            id: id.into(),
            name: name.into(),
            labels: Default::default(),
        }
    }

    #[tokio::test]
    async fn the_follower_attaches_and_follows_restarts_recreation_and_removal() {
        let rt = Arc::new(FakeRuntime::default());
        rt.set(info("c1", "web", Some(10)));
        rt.set(info("o1", "other", Some(20)));
        let placer = Arc::new(FakePlacer::default());
        let mut f = Follower::new(rt.clone(), placer.clone(), vec![spec("web")]);
        let view = f.status();
        assert_eq!(view.report().await[0].state, Up::Down);
        f.reconcile_all().await.unwrap();
        assert_eq!(placer.pids(), vec![10]);
        let up = view.report().await;
        assert_eq!(up[0].state, Up::Up);
        assert_eq!(up[0].container_id.as_deref(), Some("c1"));

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let lan: IpNetwork = "192.168.7.0/24".parse().unwrap();
        let (routes_tx, routes_rx) = tokio::sync::watch::channel(vec![]);
        let driver = async {
            rt.until_subscribed().await;
            // Another container's events change nothing.
            rt.emit(event(EventKind::Die, "o1", "other"));
            // Stopped: detached, the endpoint kept for later.
            rt.set(info("c1", "web", None));
            rt.emit(event(EventKind::Die, "c1", "web"));
            placer
                .until("detach on die", |p| p.destroyed() == [true])
                .await;
            // Started again in a new namespace: attached there.
            rt.set(info("c1", "web", Some(11)));
            rt.emit(event(EventKind::Start, "c1", "web"));
            placer
                .until("attach on start", |p| p.pids() == [10, 11])
                .await;
            // Removed and re-created under the same name: re-attached.
            rt.remove("web");
            rt.emit(event(EventKind::Destroy, "c1", "web"));
            placer
                .until("detach on destroy", |p| p.destroyed() == [true, true])
                .await;
            rt.set(info("c2", "web", Some(12)));
            rt.emit(event(EventKind::Start, "c2", "web"));
            placer
                .until("attach the new one", |p| p.pids() == [10, 11, 12])
                .await;
            // LANs behind other sites, announced while following, reach
            // the attached container; withdrawn, they are gone again.
            routes_tx.send(vec![lan]).unwrap();
            placer
                .until("route the LAN", |p| {
                    p.net
                        .routes
                        .lock()
                        .unwrap()
                        .contains(&(lan, "web0".into(), None))
                })
                .await;
            routes_tx.send(vec![]).unwrap();
            placer
                .until("withdraw the LAN", |p| {
                    p.net.routes.lock().unwrap().is_empty()
                })
                .await;
            stop.send(()).unwrap();
        };
        tokio::join!(
            f.follow(
                async {
                    let _ = stopped.await;
                },
                Some(routes_rx)
            ),
            driver
        );
        assert_eq!(view.report().await[0].container_id.as_deref(), Some("c2"));
        f.detach_all().await;
        assert_eq!(placer.destroyed(), [true, true, true]);
        assert_eq!(view.report().await[0].state, Up::Down);
    }

    #[tokio::test]
    async fn a_stopped_engine_is_an_error_and_detaches_nothing() {
        let rt = Arc::new(FakeRuntime::default());
        rt.set(info("c1", "web", Some(10)));
        let placer = Arc::new(FakePlacer::default());
        let mut f = Follower::new(rt.clone(), placer.clone(), vec![spec("web")]);
        f.reconcile_all().await.unwrap();
        rt.down();
        assert!(matches!(
            f.reconcile_all().await,
            Err(ContainerError::Docker(DockerError::Unavailable(_)))
        ));
        assert_eq!(placer.destroyed(), [false]);
    }

    #[test]
    fn endpoint_names_fit() {
        assert_eq!(endpoint_iface("wg-tunnel", 0), "wg-tunnelc0");
        assert_eq!(endpoint_iface("a23456789012345", 12).len(), 15);
    }

    /// Endpoints made up on the spot, and the ones given back.
    #[derive(Default)]
    struct FakeEndpoints {
        released: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl Endpoints for FakeEndpoints {
        async fn allocate(
            &self,
            name: &str,
            _driver: bool,
        ) -> Result<EndpointSpec, ContainerError> {
            Ok(spec(name))
        }

        async fn rename(&self, _spec: &EndpointSpec, _name: &str) -> Result<(), ContainerError> {
            Ok(())
        }

        async fn release(&self, spec: &EndpointSpec) -> Result<(), ContainerError> {
            self.released.lock().unwrap().push(spec.container.clone());
            Ok(())
        }
    }

    #[tokio::test]
    async fn labelled_containers_are_attached_as_they_start_and_given_back_when_removed() {
        let rt = Arc::new(FakeRuntime::default());
        let label = docker::Label::parse("tunnel.attach").unwrap();
        let labelled = |name: &str| {
            rt.labels.lock().unwrap().insert(
                name.to_owned(),
                [("tunnel.attach".to_owned(), "1".to_owned())].into(),
            );
        };
        rt.set(info("a1", "a", Some(10)));
        labelled("a");
        rt.set(info("b1", "b", Some(20)));
        let placer = Arc::new(FakePlacer::default());
        let endpoints = Arc::new(FakeEndpoints::default());
        let mut f = Follower::new(rt.clone(), placer.clone(), vec![]).with_label(ByLabel {
            label,
            endpoints: endpoints.clone(),
        });
        f.discover().await.unwrap();
        assert_eq!(placer.pids(), vec![10], "only the labelled one");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let driver = async {
            rt.until_subscribed().await;
            // Started later with the label: attached.
            rt.set(info("c1", "c", Some(30)));
            let mut ev = event(EventKind::Start, "c1", "c");
            ev.labels = [("tunnel.attach".to_owned(), "yes".to_owned())].into();
            rt.emit(ev);
            placer.until("attach c", |p| p.pids() == [10, 30]).await;
            // Started without it: never.
            rt.set(info("d1", "d", Some(40)));
            rt.emit(event(EventKind::Start, "d1", "d"));
            // Removed: detached, and its endpoint given back.
            rt.remove("a");
            rt.emit(event(EventKind::Destroy, "a1", "a"));
            placer
                .until("detach a", |p| p.destroyed() == [true, false])
                .await;
            stop.send(()).unwrap();
        };
        tokio::join!(
            f.follow(
                async {
                    let _ = stopped.await;
                },
                None
            ),
            driver
        );
        assert_eq!(*endpoints.released.lock().unwrap(), ["a"]);
        assert_eq!(placer.pids(), vec![10, 30], "d was never attached");
        let shown: Vec<String> = f
            .status()
            .report()
            .await
            .iter()
            .filter_map(|e| e.container.clone())
            .collect();
        assert_eq!(shown, ["c"]);
    }
}
