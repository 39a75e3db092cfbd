//! The follower: keeps every container endpoint in line with its
//! container. It reconciles what Docker says against what is attached
//! ([`crate::docker::plan`]), follows Docker's events and reconnects to
//! the engine when it goes away, adopts containers that carry the label
//! and gives their endpoints back when they are removed, and routes the
//! LANs behind other sites into every attached container.

use super::place::{Placed, Placer};
use super::view::ContainerView;
use super::{ByLabel, ContainerError, EndpointSpec};
use crate::docker::{self, Action, Attached, ContainerRuntime, DockerError, EventKind};
use crate::net::NetOps;
use crate::transport::Relay;
use crate::transport::ws::Link;
use crate::wg::{DeviceSpec, WgDevice, WgError};
use futures::StreamExt;
use ipnetwork::IpNetwork;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        self.status.publish(
            self.slots.iter().map(|s| (&s.spec, s.attached.as_ref())),
            &self.routes,
        );
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
            mesh: None,
            udp: true,
        };
        let Placed { device, net } = self
            .placer
            .place(&device_spec, &spec.container, pid)
            .await?;
        crate::sys::crash_point("container-attach");
        if let Err(source) = route_into(
            device.as_ref(),
            net.as_ref(),
            &spec.iface,
            &spec,
            &[],
            &self.routes,
        )
        .await
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
                    &s.spec.iface,
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
/// sites) to the hub instead of `before`: allowed IPs, and routes through
/// its link `link` in the container (`net`).
pub async fn route_into(
    device: &dyn WgDevice,
    net: &dyn NetOps,
    link: &str,
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
        net.add_route(*r, link, None).await?;
    }
    for r in before.iter().filter(|r| !after.contains(r)) {
        net.del_route(*r, link, None).await?;
    }
    Ok(())
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
