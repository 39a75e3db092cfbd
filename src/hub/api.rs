//! What a running hub answers on its local socket: live status (peer
//! stats named from the ledger), tokens and revocation.

use super::{AdmitError, Denied, Hub, MintError, MintRequest, RevokeError, RouteError};
use crate::containers::ContainerView;
use crate::control::local::{
    LocalApi, LocalError, PeerGrant, PeerRequest, RouteDecided, RouteDecision, TokenRequest,
};
use crate::state::Endpoint;
use crate::status::{self, EndpointStatus, PeerReport};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub struct HubApi {
    pub hub: Arc<Hub>,
    pub iface: String,
    pub endpoint_hint: Option<String>,
    pub containers: Option<ContainerView>,
    /// The WebSocket links, to name the peers that use them.
    pub relay: Option<Arc<crate::transport::Relay>>,
    /// The network driver, whose endpoints status shows too.
    pub driver: Option<Arc<crate::driver::Driver>>,
    /// What the hub listens on, for `status`; no UDP port for a hub on
    /// WebSocket only.
    pub listening: Vec<String>,
    pub udp: bool,
}

fn unavailable<E: std::error::Error>(d: Denied<E>) -> LocalError {
    match d {
        Denied::Refused(e) => LocalError::BadRequest(e.to_string()),
        Denied::Unavailable(e) => LocalError::Unavailable(format!("{:#}", anyhow::Error::from(e))),
    }
}

#[async_trait::async_trait]
impl LocalApi for HubApi {
    async fn report(&self) -> Vec<EndpointStatus> {
        let state = self.hub.snapshot().await;
        let device = self.hub.device();
        let mut main =
            status::from_state(&self.iface, &Endpoint::Server(state.clone())).swap_remove(0);
        main.state = status::State::Up;
        main.backend = Some(device.backend());
        main.listening = self.listening.clone();
        if !self.udp {
            main.listen_port = None;
        }
        main.mesh = Some(match self.hub.mesh() {
            Some(m) => {
                let (packets, bytes) = m.relayed();
                status::MeshReport {
                    direct: true,
                    note: Some(format!(
                        "rendezvous and relay (ciphertext only); probes on UDP port {}; road warriors are routed through this hub",
                        m.probe_port()
                    )),
                    relayed_packets: Some(packets),
                    relayed_bytes: Some(bytes),
                    ..Default::default()
                }
            }
            None => status::MeshReport {
                direct: false,
                note: Some(match device.backend() {
                    crate::wg::BackendKind::Kernel => {
                        "kernel backend: no relay, sites are routed through this hub".into()
                    }
                    crate::wg::BackendKind::Userspace => {
                        "--no-mesh: sites are routed through this hub".into()
                    }
                }),
                ..Default::default()
            },
        });
        let live = device.peers().await.unwrap_or_default();
        let split = self.hub.route_split().await;
        main.peers = live
            .iter()
            .map(|p| {
                let (mut routes, mut pending) = (vec![], vec![]);
                let (name, address) = if let Some(r) =
                    state.peers.iter().find(|r| r.public_key == p.public_key)
                {
                    if let Some((on, waiting)) = split.get(&r.public_key) {
                        (routes, pending) = (on.clone(), waiting.clone());
                    }
                    (status::peer_name(r), Some(r.address))
                } else if let Some(c) = state
                    .containers
                    .iter()
                    .find(|c| c.private_key.public_key() == p.public_key)
                {
                    (format!("container {}", c.container), Some(c.address))
                } else if let Some(i) = state.invites.iter().find(|i| i.public_key == p.public_key)
                {
                    let what = if i.redeemed_by.is_some() {
                        "used invite"
                    } else {
                        "unused invite"
                    };
                    (what.to_owned(), Some(i.address))
                } else {
                    ("unknown".to_owned(), None)
                };
                let mut r = PeerReport::from_live(p, Some(name), address);
                r.routes = routes;
                r.pending_routes = pending;
                match (&self.relay, r.endpoint) {
                    (Some(relay), Some(e)) if crate::transport::is_virtual(&e) => {
                        r.transport = Some(relay.kind().to_owned());
                        r.endpoint = relay.remote_of(&e);
                    }
                    (_, Some(_)) => r.transport = Some("udp".to_owned()),
                    _ => {}
                }
                r
            })
            .collect();
        let mut out = vec![main];
        if let Some(c) = &self.containers {
            out.extend(c.report().await);
        }
        if let Some(d) = &self.driver {
            out.extend(d.report().await);
        }
        out
    }

    async fn tokens(&self, req: TokenRequest) -> Result<Vec<String>, LocalError> {
        let req = MintRequest {
            count: usize::try_from(req.count).unwrap_or(usize::MAX),
            ttl: Duration::from_secs(req.ttl_secs),
            endpoint_hint: self.endpoint_hint.clone(),
            name: req.name,
            routes: req.routes,
        };
        let tokens = self
            .hub
            .mint(&req, SystemTime::now())
            .await
            .map_err(|d| match d {
                Denied::Refused(e @ MintError::Exhausted(_)) => {
                    LocalError::Unavailable(e.to_string())
                }
                d => unavailable(d),
            })?;
        Ok(tokens.iter().map(|t| t.encode()).collect())
    }

    async fn add_peer(&self, req: PeerRequest) -> Result<PeerGrant, LocalError> {
        if req.endpoint.is_none() && self.endpoint_hint.is_none() {
            return Err(LocalError::BadRequest(
                "this server was started without --endpoint: give the address clients reach it at with --endpoint HOST[:PORT]".into(),
            ));
        }
        let address = self
            .hub
            .admit(&req.name, req.public_key, SystemTime::now())
            .await
            .map_err(|d| match d {
                Denied::Refused(e @ AdmitError::Exhausted(_)) => {
                    LocalError::Unavailable(e.to_string())
                }
                d => unavailable(d),
            })?;
        let state = self.hub.snapshot().await;
        let mut allowed_ips = state.subnets().all();
        allowed_ips.extend(self.hub.routes().borrow().iter().map(|a| a.prefix));
        Ok(PeerGrant {
            addresses: state.subnets().interface(address),
            server_public_key: state.private_key.public_key(),
            port: state.port,
            endpoint_hint: self.endpoint_hint.clone(),
            allowed_ips,
            mtu: state.mtu,
        })
    }

    async fn decide_route(
        &self,
        approve: bool,
        req: RouteDecision,
    ) -> Result<RouteDecided, LocalError> {
        let not_found = |d: Denied<RouteError>| match d {
            Denied::Refused(e @ RouteError::UnknownSite(_)) => LocalError::NotFound(e.to_string()),
            d => unavailable(d),
        };
        let site = if approve {
            self.hub
                .approve(&req.site, req.prefix)
                .await
                .map_err(not_found)?
                .0
        } else {
            self.hub
                .reject(&req.site, req.prefix)
                .await
                .map_err(not_found)?
        };
        Ok(RouteDecided {
            site,
            pending: self.hub.pending_routes(site).await,
        })
    }

    async fn change_lans(
        &self,
        req: crate::control::local::LanChange,
    ) -> Result<crate::control::local::LanSet, LocalError> {
        if req.masquerade {
            return Err(LocalError::BadRequest(
                "a hub masquerades towards its LANs with serve --masquerade; route add --masquerade is for sites"
                    .to_owned(),
            ));
        }
        let state = self.hub.snapshot().await;
        let (next, _) = req
            .apply(&state.routes, false, &state.subnets().all())
            .map_err(LocalError::BadRequest)?;
        self.hub
            .set_own_routes(next.clone())
            .await
            .map_err(|d| match d {
                Denied::Refused(e) => LocalError::BadRequest(e.to_string()),
                d => unavailable(d),
            })?;
        let verb = if req.add {
            "now routes"
        } else {
            "no longer routes"
        };
        tracing::info!("{} {verb} {}", self.iface, req.prefix);
        Ok(crate::control::local::LanSet {
            routes: next,
            masquerade: false,
            pending: vec![],
        })
    }

    async fn revoke(&self, target: &str) -> Result<Vec<String>, LocalError> {
        self.hub.revoke(target).await.map_err(|d| match d {
            Denied::Refused(e @ RevokeError::NotFound(_)) => LocalError::NotFound(e.to_string()),
            d => unavailable(d),
        })
    }
}
