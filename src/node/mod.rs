//! The node runtime: what a hub and a site both run beside their tunnel,
//! written once.
//!
//! - their containers, by name, by label and through Docker's network
//!   driver ([`Services::start`], [`Services::attach`], [`Services::follow`]);
//! - the local socket and the metrics listener ([`Services::listen`]);
//! - the teardown, in one order: the driver's endpoints, then the
//!   containers', then the listeners, then the device, then the host's
//!   changes ([`Services::stop`], [`remove`]).
//!
//! The roles bring their own parts: the endpoints book that registers a
//! container (the hub's ledger, or a site's requests to its hub), the LANs
//! their containers reach, and the answers on the local socket.

pub mod mesh;

use crate::containers::{
    ByLabel, ContainerError, ContainerView, EndpointSpec, Endpoints, Follower, HostPlacer,
};
use crate::control::ControlError;
use crate::control::local::{self, LocalApi};
use crate::docker::{ContainerRuntime, Label};
use crate::driver::{Driver, DriverError};
use crate::gateway::Gateway;
use crate::metrics::{Listener, Metrics};
use crate::net::NetOps;
use crate::shutdown::Shutdown;
use crate::store::StateDir;
use crate::wg::{BackendChoice, WgDevice, WgError};
use ipnetwork::IpNetwork;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a listener may take to stop once shutdown is under way.
const STOP_WITHIN: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Containers(#[from] ContainerError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// A node's containers, and the engine that runs them.
pub struct Containers {
    pub runtime: Arc<dyn ContainerRuntime>,
    /// The endpoints of the containers named on the command line or saved.
    pub specs: Vec<EndpointSpec>,
    /// `--attach-label`.
    pub label: Option<Label>,
    /// `--docker-driver`: the plugin name.
    pub driver: Option<String>,
}

/// What the node's containers need from the host and the role.
pub struct Context {
    pub net: Arc<dyn NetOps>,
    pub backend: BackendChoice,
    /// The tunnel subnet and the hub's address in it (the driver's IPAM).
    pub subnet: IpNetwork,
    /// The IPv6 subnet of a dual-stack tunnel.
    pub subnet6: Option<IpNetwork>,
    pub server: IpAddr,
    pub metrics: Arc<Metrics>,
}

/// The services a node runs beside its tunnel, until [`Services::stop`].
#[derive(Default)]
pub struct Services {
    follower: Option<Follower>,
    driver: Option<Arc<Driver>>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Services {
    /// Prepares the containers: the follower of those named, by label and
    /// (with `endpoints`, the role's book) the network driver, whose plugin
    /// socket is served from now on. Nothing is attached yet.
    pub fn start(
        containers: Option<Containers>,
        endpoints: Option<Arc<dyn Endpoints>>,
        ctx: &Context,
        lans: watch::Receiver<Vec<IpNetwork>>,
        shutdown: &mut Shutdown,
    ) -> Result<Self, NodeError> {
        let mut me = Services::default();
        let Some(c) = containers else {
            return Ok(me);
        };
        if let (Some(name), Some(e)) = (&c.driver, &endpoints) {
            let d = Driver::new(
                e.clone(),
                ctx.net.clone(),
                ctx.backend,
                crate::ipam::Subnets {
                    main: ctx.subnet,
                    v6: ctx.subnet6,
                },
                ctx.server,
                lans,
            );
            let task = crate::driver::start(name, &d, c.runtime.clone(), shutdown)?;
            me.tasks.push(("network driver", task));
            me.driver = Some(d);
        }
        let mut f = Follower::new(
            c.runtime,
            HostPlacer::shared(ctx.net.clone(), ctx.backend),
            c.specs,
        )
        .with_metrics(ctx.metrics.clone());
        if let (Some(label), Some(endpoints)) = (c.label, endpoints) {
            f = f.with_label(ByLabel { label, endpoints });
        }
        me.follower = Some(f);
        Ok(me)
    }

    /// Attaches the containers that run now: those named (an error stops
    /// the bring-up), then those with the label (an error is logged, as
    /// they are attached when they start anyway).
    pub async fn attach(&mut self) -> Result<(), NodeError> {
        if let Some(f) = self.follower.as_mut() {
            f.reconcile_all().await?;
            if let Err(e) = f.discover().await {
                tracing::warn!("attaching labelled containers: {e}");
            }
        }
        Ok(())
    }

    /// The containers' live view, for status.
    pub fn containers(&self) -> Option<ContainerView> {
        self.follower.as_ref().map(Follower::status)
    }

    pub fn driver(&self) -> Option<Arc<Driver>> {
        self.driver.clone()
    }

    /// Answers on the local socket (and `--metrics`) until shutdown.
    pub fn listen(
        &mut self,
        store: &StateDir,
        iface: &str,
        api: Arc<dyn LocalApi>,
        metrics: Option<(Listener, Arc<Metrics>)>,
        shutdown: &Shutdown,
    ) -> Result<(), NodeError> {
        let socket = store.socket(iface);
        let listener = local::bind(&socket)?;
        if let Some((l, m)) = metrics {
            let task = tokio::spawn(crate::metrics::serve(l, m, api.clone(), shutdown.waiter()));
            self.tasks.push(("metrics", task));
        }
        let task = tokio::spawn(local::serve(
            listener,
            socket,
            api,
            shutdown.trigger_fn(),
            shutdown.waiter(),
        ));
        self.tasks.push(("local control socket", task));
        Ok(())
    }

    /// A task of the role's that stops with the node.
    pub fn spawned(&mut self, what: &'static str, task: JoinHandle<()>) {
        self.tasks.push((what, task));
    }

    /// Follows the containers (started, stopped, renamed, labelled) until
    /// `stop`; they reach the LANs of `lans` as they change.
    pub async fn follow(
        &mut self,
        stop: impl std::future::Future<Output = ()>,
        lans: watch::Receiver<Vec<IpNetwork>>,
    ) {
        match self.follower.as_mut() {
            Some(f) => f.follow(stop, Some(lans)).await,
            None => stop.await,
        }
    }

    /// Detaches everything the node attached: the driver's endpoints, then
    /// the containers'; then waits for the listeners to stop.
    pub async fn stop(&mut self) {
        if let Some(d) = &self.driver {
            d.close().await;
        }
        if let Some(f) = self.follower.as_mut() {
            f.detach_all().await;
        }
        for (what, task) in self.tasks.drain(..) {
            if tokio::time::timeout(STOP_WITHIN, task).await.is_err() {
                tracing::warn!("{what} did not stop in time");
            }
        }
    }
}

/// The endpoint of a container saved in a node's state: its address in
/// the tunnel's subnets, the hub as its only peer, the hub's API to probe.
pub fn endpoint_spec(
    c: &crate::state::ContainerRecord,
    subnets: crate::ipam::Subnets,
    mtu: u32,
    hub: crate::wg::PeerSpec,
    probe: std::net::SocketAddr,
    link: Option<Arc<crate::transport::ws::Dialer>>,
) -> EndpointSpec {
    EndpointSpec {
        container: c.container.clone(),
        iface: c.iface.clone(),
        key: c.private_key.clone(),
        address: IpNetwork::new(c.address, subnets.main.prefix()).expect("prefix of the subnet"),
        address6: subnets.interface(c.address).get(1).copied(),
        hub,
        mtu,
        probe,
        link,
        by_label: c.by_label,
    }
}

/// Removes the node's device, then what it changed on the host.
pub async fn remove(
    device: &dyn WgDevice,
    gateway: Gateway,
    net: &dyn NetOps,
    iface: &str,
) -> Result<(), WgError> {
    let removed = device.destroy().await;
    tracing::info!("{iface} removed");
    gateway.stop(net).await;
    removed
}

/// The prefixes of `routes`, as they change.
pub fn follow_prefixes<T: Send + Sync + 'static>(
    mut routes: watch::Receiver<Vec<T>>,
    prefix: fn(&T) -> IpNetwork,
) -> watch::Receiver<Vec<IpNetwork>> {
    let now = move |r: &Vec<T>| r.iter().map(prefix).collect::<Vec<_>>();
    let (tx, rx) = watch::channel(now(&routes.borrow_and_update()));
    tokio::spawn(async move {
        while routes.changed().await.is_ok() {
            if tx.send(now(&routes.borrow_and_update())).is_err() {
                return;
            }
        }
    });
    rx
}
