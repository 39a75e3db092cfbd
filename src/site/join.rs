//! `join`: redeeming a token's invite over the tunnel for a key made
//! here, and switching the device to it ([`establish`]): the join machine,
//! run by its driver against the real device, the hub's API through the
//! tunnel, the WebSocket ways and the store.

use super::drive::{self, World};
use super::invitation::Invitation;
use super::machine::{ANSWER_WITHIN, Chosen, JoinMachine, Way};
use super::{Progress, Route, SiteError, path};
use crate::control::auth::Signer;
use crate::control::tunnel::{Admitted, Declined, Joining};
use crate::control::{CONTROL_PORT, ControlError, Patience, tunnel};
use crate::keys::{PrivateKey, PublicKey};
use crate::net::NetOps;
use crate::state::{Endpoint, JoinedState, PendingJoin};
use crate::store::StateDir;
use crate::token::Token;
use crate::transport::ws::{Connection, Dialer};
use crate::transport::{Path, Relay, TransportError};
use crate::wg::WgDevice;
use async_trait::async_trait;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// What a join works with on this host.
pub struct Joiner<'a> {
    pub inv: &'a Invitation<'a>,
    /// The device, made with the invite key, and with `relay` when
    /// WebSocket is possible.
    pub device: &'a dyn WgDevice,
    pub relay: Option<&'a Arc<Relay>>,
    pub net: &'a dyn NetOps,
    pub store: &'a StateDir,
    /// The key the invite is redeemed for.
    pub own_key: &'a PrivateKey,
}

/// Chooses the way to the hub, redeems the invite over it for our own
/// key, saves the site and switches the device to that key; returns once
/// traffic flows with it, or `deadline` has passed.
pub async fn establish(
    j: &Joiner<'_>,
    progress: &dyn Progress,
    deadline: Instant,
) -> Result<(Route, JoinedState), SiteError> {
    let inv = j.inv;
    let live = Live {
        invite: Signer::new(&inv.token.invite_key, &inv.token.server_public_key)?,
        joining: Joining {
            routes: inv.routes.to_vec(),
            snat_public: inv.snat_public,
            name: Some(
                inv.name
                    .map(str::to_owned)
                    .unwrap_or_else(crate::sys::hostname),
            ),
            default_name: inv.name.is_none(),
        },
        api: tunnel::HubApi::via(
            SocketAddr::new(inv.token.server_address, CONTROL_PORT),
            inv.iface,
        ),
        j,
        dialers: Mutex::default(),
        route: Mutex::default(),
        joined: Mutex::default(),
    };
    let machine = JoinMachine::new(inv.plan(deadline), drive::now());
    drive::drive(machine, &live, progress).await?;
    let route = live.route.into_inner().expect("not poisoned");
    let joined = live.joined.into_inner().expect("not poisoned");
    Ok((
        route.expect("a way is used before the switch"),
        joined.expect("traffic flows only after the switch"),
    ))
}

/// The key for this token, saved before the redeem goes out: a join that
/// crashes and runs again redeems with the same key, which the hub takes
/// again, so a crash never burns the token. `generate` makes a new one.
pub fn own_key(
    store: &StateDir,
    iface: &str,
    token: &Token,
    generate: impl FnOnce() -> PrivateKey,
) -> Result<PrivateKey, SiteError> {
    let invite = token.invite_key.public_key();
    let key = match store.load_pending(iface) {
        Ok(Some(p)) if p.invite == invite => {
            tracing::info!(
                "resuming an interrupted join of this token with the key in {}",
                store.pending_file(iface).display()
            );
            p.private_key
        }
        _ => generate(),
    };
    let pending = PendingJoin {
        invite,
        private_key: key.clone(),
    };
    store.save_pending(iface, &pending)?;
    Ok(key)
}

/// The site as saved before the switch: once the server has our key,
/// losing it would strand this site.
pub(super) fn joined_state(
    inv: &Invitation<'_>,
    path: Path,
    mtu: u32,
    own_key: &PrivateKey,
    admitted: &Admitted,
) -> JoinedState {
    let token = inv.token;
    JoinedState {
        name: admitted.name.clone(),
        private_key: own_key.clone(),
        mtu,
        backend: Some(inv.backend),
        server_public_key: token.server_public_key,
        endpoint: inv.server.to_owned(),
        port: inv.endpoint.port(),
        address: token.assigned_network(),
        server_address: token.server_address,
        subnet: token.subnet,
        subnet6: token.subnet6,
        containers: vec![],
        path,
        routes: inv.routes.to_vec(),
        masquerade: inv.masquerade,
        transparent: inv.transparent,
        snat_public: inv.snat_public,
        attach_label: inv.attach_label.clone(),
        advertise_endpoint: inv.advertise_endpoint,
        listen_port: None,
    }
}

/// The join's world as it is: the device, the hub's API through the
/// tunnel, the WebSocket ways, the store.
struct Live<'a> {
    j: &'a Joiner<'a>,
    /// Signs with the token's invite key.
    invite: Signer,
    joining: Joining,
    api: tunnel::HubApi,
    dialers: Mutex<Vec<Arc<Dialer>>>,
    route: Mutex<Option<Route>>,
    joined: Mutex<Option<JoinedState>>,
}

#[async_trait]
impl World for Live<'_> {
    type Conn = Connection;

    async fn ping(&self, patience: Patience) -> Result<(), ControlError> {
        tunnel::ping(self.api, patience).await
    }

    async fn handshake(&self) -> Result<bool, SiteError> {
        let peers = self.j.device.peers().await?;
        Ok(peers.iter().any(|p| p.last_handshake.is_some()))
    }

    fn ways(&self) -> Result<Vec<Way>, SiteError> {
        let dialers = path::dialers(self.j.inv)?;
        let ways = dialers.iter().map(|d| path::way(self.j.inv, d)).collect();
        *self.dialers.lock().expect("not poisoned") = dialers;
        Ok(ways)
    }

    async fn dial(&self, index: usize, timeout: Duration) -> Result<Connection, TransportError> {
        let dialer = self.dialers.lock().expect("not poisoned")[index].clone();
        dialer.connect(timeout).await
    }

    async fn use_way(&self, chosen: Chosen, conn: Option<Connection>) -> Result<(), SiteError> {
        let route = match chosen {
            Chosen::Udp => Route::udp(self.j.inv.endpoint, self.j.inv.initial_mtu()),
            Chosen::Way(i) => {
                let dialer = self.dialers.lock().expect("not poisoned")[i].clone();
                let relay = self.j.relay.expect("a relay when WebSocket is possible");
                path::use_link(self.j.inv, self.j.device, self.j.net, relay, dialer, conn).await?
            }
        };
        *self.route.lock().expect("not poisoned") = Some(route);
        Ok(())
    }

    async fn redeem(&self, patience: Patience) -> Result<Admitted, Declined> {
        let key = self.j.own_key.public_key();
        let now = SystemTime::now();
        tunnel::redeem_invite_once(self.api, &self.invite, &key, &self.joining, now, patience).await
    }

    fn adjust_clock(&self, hub_time: u64) {
        self.invite.adjust_clock(hub_time, SystemTime::now());
    }

    async fn switch(&self, admitted: Admitted) -> Result<(), SiteError> {
        let (path, mtu) = {
            let route = self.route.lock().expect("not poisoned");
            let route = route.as_ref().expect("a way is used before the switch");
            (route.path.clone(), route.mtu)
        };
        let joined = joined_state(self.j.inv, path, mtu, self.j.own_key, &admitted);
        self.j
            .store
            .save(self.j.inv.iface, &Endpoint::Joined(joined.clone()))?;
        self.j.device.set_private_key(self.j.own_key).await?;
        *self.joined.lock().expect("not poisoned") = Some(joined);
        Ok(())
    }

    fn own_key(&self) -> PublicKey {
        self.j.own_key.public_key()
    }

    fn crash_point(&self, step: &str) -> Result<(), SiteError> {
        crate::sys::crash_point(step);
        Ok(())
    }
}

/// Probes the server's API through the tunnel until it answers or `deadline`.
pub async fn wait_for_flow(api: tunnel::HubApi, deadline: Instant) -> Result<(), ControlError> {
    loop {
        // A connection shows traffic flows; its answer may wait on a busy hub.
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = Patience {
            connect: Duration::from_millis(100).min(left),
            total: ANSWER_WITHIN.min(left),
        };
        match tunnel::ping(api, attempt).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => tracing::debug!("ping: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
