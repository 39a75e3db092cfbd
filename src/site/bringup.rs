//! Bringing a site up, once the command has checked its input: with a
//! token ([`Site::join`]) or from its saved state ([`Site::up`]). Both make
//! the gateway and the device, change the host, and undo all of it when a
//! step fails; what they return runs with [`super::run`].

use super::invitation::Invitation;
use super::join::{Joiner, establish, own_key};
use super::{
    Containers, Progress, Route, Site, SiteError, api, hub_peer, prepare_host, register_containers,
    saved_containers, site_gateway, site_policy, start_gateway, wait_for_flow,
};
use crate::docker::{ContainerInfo, ContainerRuntime, Label};
use crate::firewall::Firewall;
use crate::gateway::Gateway;
use crate::keys::PrivateKey;
use crate::net::NetOps;
use crate::state::JoinedState;
use crate::store::StateDir;
use crate::transport::Relay;
use crate::wg::mesh::MeshSocket;
use crate::wg::{BackendChoice, DeviceSpec, WgDevice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A join, as the command line and the token say it.
pub struct JoinConfig<'a> {
    pub inv: Invitation<'a>,
    /// When the command started: `--timeout` counts from then.
    pub started: Instant,
    pub store: StateDir,
    pub net: Arc<dyn NetOps>,
    /// The host's firewall (nftables), and whether `--firewall on` keeps
    /// our table in it.
    pub nft: Box<dyn Firewall>,
    pub firewall: bool,
    /// The engine, and the containers named on the command line, when
    /// any are named or a label or the driver is asked for.
    pub docker: Option<(Arc<dyn ContainerRuntime>, Vec<ContainerInfo>)>,
    /// `--attach-label`.
    pub label: Option<Label>,
    /// `--docker-driver`.
    pub driver: Option<String>,
    /// `--metrics`, bound.
    pub metrics: Option<crate::metrics::Listener>,
}

/// A saved site to bring back, as the command line and its state say.
pub struct UpConfig {
    pub joined: JoinedState,
    pub iface: String,
    pub store: StateDir,
    pub net: Arc<dyn NetOps>,
    pub backend: BackendChoice,
    /// The server, resolved from what was saved.
    pub endpoint: SocketAddr,
    /// The saved route, with the relay its device needs for a WebSocket
    /// ([`super::saved_route`]).
    pub route: Route,
    pub relay: Option<Arc<Relay>>,
    /// As for a join.
    pub nft: Box<dyn Firewall>,
    pub firewall: bool,
    /// When the command started, and how long to wait for the server
    /// before reporting it (the tunnel stays up either way).
    pub started: Instant,
    pub timeout: Duration,
    /// The engine, when containers are saved or a label or the driver is
    /// asked for.
    pub runtime: Option<Arc<dyn ContainerRuntime>>,
    pub label: Option<Label>,
    pub driver: Option<String>,
    pub metrics: Option<crate::metrics::Listener>,
}

/// A site that is up, to be run; and what the command prints about it.
pub struct Ready {
    pub site: Site,
    pub containers: Option<Containers>,
    /// When traffic first flowed, after the start; `None` when the server
    /// does not answer yet (`up` goes on without it).
    pub first_packet: Option<Duration>,
}

/// Makes the device `spec` describes, confined by `gateway`; the gateway
/// is stopped again when that fails.
async fn raise(
    mut spec: DeviceSpec,
    backend: BackendChoice,
    gateway: Gateway,
    net: &Arc<dyn NetOps>,
    store: &StateDir,
) -> Result<(Arc<dyn WgDevice>, Gateway), SiteError> {
    spec.confine = gateway.confine();
    match crate::endpoint::create(&spec, backend, net.clone(), store).await {
        Ok(d) => Ok((d, gateway)),
        Err(e) => {
            gateway.stop(net.as_ref()).await;
            Err(e.into())
        }
    }
}

/// The device of a saved site (`up`): its key, its address, the hub as
/// its peer on `route`.
fn saved_spec(
    joined: &JoinedState,
    iface: &str,
    route: &super::Route,
    relay: Option<Arc<Relay>>,
    mesh: Arc<MeshSocket>,
) -> DeviceSpec {
    // The port it last had, where peers last saw it (any other if taken).
    let port = joined
        .listen_port
        .filter(|p| crate::wg::check_port_free(*p).is_ok())
        .unwrap_or(0);
    DeviceSpec {
        name: iface.to_owned(),
        private_key: joined.private_key.clone(),
        listen_port: port,
        peers: vec![hub_peer(joined, route.endpoint)],
        addresses: joined.subnets().interface(joined.address.ip()),
        mtu: joined.mtu,
        confine: None,
        relay,
        quarantine: None,
        mesh: Some(mesh),
        udp: true,
    }
}

/// What a joined site has once admitted: its route, its state, and what
/// changed on the host for it.
struct Admitted {
    route: Route,
    joined: JoinedState,
    first_packet: Duration,
    transparent: Option<ipnetwork::IpNetwork>,
    containers: Option<Containers>,
}

impl Site {
    /// Joins with a token: the gateway, the device with the invite key,
    /// our own key (resumed when a join of this token was interrupted),
    /// the join itself, the host's changes, the containers. On any error
    /// all of it is undone.
    pub async fn join(config: JoinConfig<'_>, progress: &dyn Progress) -> Result<Ready, SiteError> {
        let JoinConfig {
            inv,
            started,
            store,
            net,
            nft,
            firewall,
            docker,
            label,
            driver,
            metrics,
        } = config;
        let iface = inv.iface;
        let relay = inv.websocket().then(|| Relay::new("websocket"));
        let gateway = start_gateway(net.as_ref(), nft, &store, &inv, firewall).await?;
        let (mesh, disco) = MeshSocket::new(false, relay.clone());
        let mut spec = inv.device_spec(relay.clone());
        spec.mesh = Some(mesh.clone());
        let (device, mut gateway) = raise(spec, inv.backend, gateway, &net, &store).await?;
        crate::sys::crash_point("iface-created");
        let own = match own_key(&store, iface, inv.token, PrivateKey::generate) {
            Ok(k) => k,
            Err(e) => {
                let _ = device.destroy().await;
                gateway.stop(net.as_ref()).await;
                return Err(e);
            }
        };
        let steps = JoinSteps {
            inv: &inv,
            device: device.as_ref(),
            net: net.as_ref(),
            relay: relay.as_ref(),
            store: &store,
            progress,
            started,
        };
        let admitted = match steps.run(&own, &mut gateway, docker, label, driver).await {
            Ok(a) => {
                store.remove_pending(iface);
                a
            }
            Err(e) => {
                // Refused by the server: the saved key is of no more use.
                // (AlreadyUsed is the joiner's guess from a handshake
                // without an answer, which a crashed hub also gives: the
                // key stays.)
                if matches!(e, SiteError::Refused(_)) {
                    store.remove_pending(iface);
                }
                progress.done();
                if let Err(t) = device.destroy().await {
                    tracing::warn!("removing {iface}: {t}");
                }
                gateway.stop(net.as_ref()).await;
                return Err(e);
            }
        };
        let site = Site {
            device,
            route: admitted.route,
            net,
            joined: admitted.joined,
            iface: iface.to_owned(),
            backend: inv.backend,
            store,
            gateway,
            transparent: admitted.transparent,
            metrics,
            mesh: Some((mesh, disco)),
        };
        Ok(Ready {
            site,
            containers: admitted.containers,
            first_packet: Some(admitted.first_packet),
        })
    }

    /// Brings a saved site back: the gateway, the device with the site's
    /// own key, the host's changes (undone when a step fails); then waits
    /// for the server up to the timeout, and goes on without it.
    pub async fn up(config: UpConfig, progress: &dyn Progress) -> Result<Ready, SiteError> {
        let UpConfig {
            joined,
            iface,
            store,
            net,
            backend,
            endpoint,
            route,
            relay,
            nft,
            firewall,
            started,
            timeout,
            runtime,
            label,
            driver,
            metrics,
        } = config;
        let policy = site_policy(&iface, &joined.routes, joined.masquerade);
        let gateway = site_gateway(
            net.as_ref(),
            nft,
            &store,
            joined.subnets(),
            policy,
            firewall,
        )
        .await?;
        let (mesh, disco) = MeshSocket::new(false, relay.clone());
        let spec = saved_spec(&joined, &iface, &route, relay.clone(), mesh.clone());
        let (device, mut gateway) = raise(spec, backend, gateway, &net, &store).await?;
        let host = prepare_host(
            &mut gateway,
            net.as_ref(),
            device.as_ref(),
            &joined,
            &iface,
            endpoint,
            &route,
        )
        .await;
        let transparent = match host {
            Ok(t) => t,
            Err(e) => {
                let _ = device.destroy().await;
                gateway.stop(net.as_ref()).await;
                return Err(e);
            }
        };
        progress.step(&format!("waiting for the server at {endpoint}"));
        let first_packet = match wait_for_flow(api(&joined, &iface), started + timeout).await {
            Ok(()) => Some(started.elapsed()),
            Err(e) => {
                tracing::warn!(
                    "the server does not answer yet ({e}); the tunnel stays up and connects when it does"
                );
                None
            }
        };
        let containers = runtime.map(|runtime| Containers {
            runtime,
            specs: saved_containers(&joined, &route),
            label,
            driver,
        });
        let site = Site {
            device,
            route,
            net,
            joined,
            iface,
            backend,
            store,
            gateway,
            transparent,
            metrics,
            mesh: Some((mesh, disco)),
        };
        Ok(Ready {
            site,
            containers,
            first_packet,
        })
    }
}

/// The steps of a join that need undoing when one fails.
struct JoinSteps<'a> {
    inv: &'a Invitation<'a>,
    device: &'a dyn WgDevice,
    net: &'a dyn NetOps,
    relay: Option<&'a Arc<Relay>>,
    store: &'a StateDir,
    progress: &'a dyn Progress,
    started: Instant,
}

impl JoinSteps<'_> {
    async fn run(
        &self,
        own: &PrivateKey,
        gateway: &mut Gateway,
        docker: Option<(Arc<dyn ContainerRuntime>, Vec<ContainerInfo>)>,
        label: Option<Label>,
        driver: Option<String>,
    ) -> Result<Admitted, SiteError> {
        let inv = self.inv;
        let deadline = self.started + inv.timeout;
        let joiner = Joiner {
            inv,
            device: self.device,
            relay: self.relay,
            net: self.net,
            store: self.store,
            own_key: own,
        };
        let (route, mut joined) = establish(&joiner, self.progress, deadline).await?;
        let first_packet = self.started.elapsed();
        let transparent = prepare_host(
            gateway,
            self.net,
            self.device,
            &joined,
            inv.iface,
            inv.endpoint,
            &route,
        )
        .await?;
        let containers = match docker {
            Some((runtime, infos)) => {
                self.progress.step("registering containers");
                let specs =
                    register_containers(&mut joined, inv.iface, &infos, &route, self.store).await?;
                Some(Containers {
                    runtime,
                    specs,
                    label,
                    driver,
                })
            }
            None => None,
        };
        Ok(Admitted {
            route,
            joined,
            first_packet,
            transparent,
            containers,
        })
    }
}
