//! `join`: redeeming a token's invite over the tunnel for a key made
//! here, and switching the device to it.

use super::{Progress, Route, SiteError};
use crate::control::auth::Signer;
use crate::control::tunnel::Joining;
use crate::control::{CONTROL_PORT, ControlError, Patience, tunnel};
use crate::keys::PrivateKey;
use crate::state::{Endpoint, JoinedState};
use crate::store::StateDir;
use crate::token::Token;
use crate::transport::proxy::Proxy;
use crate::transport::ws::Dialer;
use crate::transport::{JoinTransport, Path, Relay, UDP_MTU, WS_MTU};
use crate::wg::{BackendChoice, DeviceSpec, KEEPALIVE, PeerSpec, WgDevice};
use ipnetwork::IpNetwork;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// After a handshake with the invite key, how long without a connection to
/// the API means the server knows the invite but no longer admits it. Long
/// enough for a hub busy admitting hundreds to accept our connection.
const USED_AFTER: Duration = Duration::from_secs(6);
/// How long a request the hub has taken may wait for its answer before it
/// is asked again (the hub answers the same request the same way).
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// What a token and the command line say about the site being joined.
pub struct Invitation<'a> {
    pub token: &'a Token,
    /// The server as the user gave it (`HOST[:PORT]`), kept for `up`.
    pub server: &'a str,
    pub endpoint: SocketAddr,
    pub iface: &'a str,
    /// As given with `--mtu`; otherwise it follows the transport.
    pub mtu: Option<u32>,
    pub backend: BackendChoice,
    pub transport: JoinTransport,
    /// `--proxy`, which wins over the environment.
    pub proxy: Option<&'a str>,
    /// How long the whole bring-up may take.
    pub timeout: Duration,
    /// The LANs behind this site, advertised with the redeem.
    pub routes: &'a [IpNetwork],
    pub masquerade: bool,
    /// `--transparent`, and `--snat-public` with it.
    pub transparent: bool,
    pub snat_public: bool,
    /// `--name`, else the host name (which the hub may number).
    pub name: Option<&'a str>,
    /// `--attach-label`, saved for `up`.
    pub attach_label: Option<String>,
}

impl Invitation<'_> {
    /// Whether WebSocket is among the ways to try.
    pub fn websocket(&self) -> bool {
        self.token.websocket.is_some() && self.transport != JoinTransport::Udp
    }

    /// Whether UDP is among the ways to try.
    pub fn udp(&self) -> bool {
        self.token.udp && self.transport != JoinTransport::Wss
    }

    /// Checks the choice against the token before anything is touched.
    pub fn check(&self) -> Result<(), SiteError> {
        match self.transport {
            JoinTransport::Wss if self.token.websocket.is_none() => Err(SiteError::Refused(
                "the token offers no WebSocket transport (serve with --transport udp,wss)".into(),
            )),
            JoinTransport::Udp if !self.token.udp => Err(SiteError::Refused(
                "the server takes no UDP (the token offers WebSocket only)".into(),
            )),
            _ => Ok(()),
        }
    }

    pub(super) fn initial_mtu(&self) -> u32 {
        self.mtu
            .unwrap_or(if self.udp() { UDP_MTU } else { WS_MTU })
    }

    /// The device to bring up first: the invite key, the hub as its peer,
    /// with a relay for WebSocket links when they may be needed.
    pub fn device_spec(&self, relay: Option<Arc<Relay>>) -> DeviceSpec {
        DeviceSpec {
            name: self.iface.to_owned(),
            private_key: self.token.invite_key.clone(),
            listen_port: 0,
            peers: vec![self.hub(self.endpoint)],
            addresses: self.token.subnets().interface(self.token.assigned),
            mtu: self.initial_mtu(),
            confine: None,
            relay,
            quarantine: None,
        }
    }

    pub(super) fn hub(&self, endpoint: SocketAddr) -> PeerSpec {
        PeerSpec {
            public_key: self.token.server_public_key,
            endpoint: Some(endpoint),
            allowed_ips: self.token.subnets().all(),
            keepalive: Some(KEEPALIVE),
        }
    }

    /// The WebSocket dialers to try, in order: direct, then through the
    /// environment's proxy (`HTTPS_PROXY`/`HTTP_PROXY`, unless NO_PROXY
    /// exempts the server). An explicit `--proxy` is the only way tried.
    pub(super) fn dialers(&self) -> Result<Vec<Arc<Dialer>>, SiteError> {
        let Some(offer) = &self.token.websocket else {
            return Ok(vec![]);
        };
        let host = self.endpoint.ip().to_string();
        if let Some(flag) = self.proxy {
            let proxy = Proxy::parse(flag)?;
            return Ok(vec![Arc::new(Dialer::new(offer, &host, Some(proxy))?)]);
        }
        let direct = Dialer::new(offer, &host, None)?;
        let tls = direct.url().starts_with("wss:");
        let proxy = Proxy::for_target(None, direct.host(), tls, |k| std::env::var(k).ok())?;
        let mut out = vec![Arc::new(direct)];
        if let Some(p) = proxy {
            out.push(Arc::new(Dialer::new(offer, &host, Some(p))?));
        }
        Ok(out)
    }
}

/// Redeems the invite over the tunnel for `own_key`, saves the site, and
/// switches the device to `own_key`; returns once traffic flows with it.
pub async fn redeem_and_switch(
    inv: &Invitation<'_>,
    route: &Route,
    own_key: &PrivateKey,
    device: &dyn WgDevice,
    store: &StateDir,
    progress: &dyn Progress,
    deadline: Instant,
) -> Result<JoinedState, SiteError> {
    let token = inv.token;
    let endpoint = inv.endpoint;
    let api = SocketAddr::new(token.server_address, CONTROL_PORT);
    if route.path != Path::Udp {
        progress.step(&format!("handshaking over {}", route.path));
    }
    let invite = Signer::new(&token.invite_key, &token.server_public_key)?;

    if route.path == Path::Udp {
        progress.step(&format!("handshaking with {endpoint}"));
    }
    let mut handshake_at: Option<Instant> = None;
    // Once a connection is made the invite still routes, so the token is
    // not used, whatever the hub's load.
    let mut reached = false;
    crate::sys::crash_point("redeem-sending");
    let redeemed = loop {
        // Connecting is retried quickly (the first packets may wait for the
        // handshake); once connected, the hub may be busy with hundreds of
        // joiners, so the answer is waited for longer, though not for ever:
        // a lost answer costs TCP seconds of backoff, while asking again
        // gets the same admission at once.
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = Patience {
            connect: Duration::from_millis(700).min(left),
            total: ANSWER_WITHIN.min(left),
        };
        let joining = Joining {
            routes: inv.routes.to_vec(),
            snat_public: inv.snat_public,
            name: Some(
                inv.name
                    .map(str::to_owned)
                    .unwrap_or_else(crate::sys::hostname),
            ),
            default_name: inv.name.is_none(),
        };
        match tunnel::redeem_invite(api, &invite, &own_key.public_key(), &joining, attempt).await {
            Ok(r) => break r,
            Err(e) if !e.is_transient() => {
                let why = match e {
                    ControlError::Refused { message, .. } => message,
                    other => other.to_string(),
                };
                return Err(SiteError::Refused(why));
            }
            Err(e) => {
                reached |= e.connected();
                tracing::debug!("redeem attempt: {e}");
            }
        }
        if handshake_at.is_none()
            && device
                .peers()
                .await?
                .iter()
                .any(|p| p.last_handshake.is_some())
        {
            handshake_at = Some(Instant::now());
            progress.step("redeeming the invite");
        }
        if !reached && handshake_at.is_some_and(|t| t.elapsed() > USED_AFTER) {
            return Err(SiteError::AlreadyUsed(endpoint));
        }
        if Instant::now() >= deadline {
            return Err(SiteError::Unreachable {
                endpoint,
                timeout: humantime::format_duration(inv.timeout).to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    crate::sys::crash_point("redeem-answered");
    if !redeemed.pending.is_empty() {
        let who = redeemed
            .name
            .clone()
            .unwrap_or_else(|| token.assigned.to_string());
        for p in &redeemed.pending {
            tracing::warn!(
                "route {p} waits for the hub operator's approval (on the hub: tunnel route approve {who} {p})"
            );
        }
    }
    if redeemed.address != token.assigned_network() {
        return Err(SiteError::Mismatch {
            got: redeemed.address,
            want: token.assigned_network(),
        });
    }

    // Saved before the switch: once the server has our key, losing it would
    // strand this site.
    let joined = JoinedState {
        name: redeemed.name.clone(),
        private_key: own_key.clone(),
        mtu: route.mtu,
        backend: Some(inv.backend),
        server_public_key: token.server_public_key,
        endpoint: inv.server.to_owned(),
        port: endpoint.port(),
        address: token.assigned_network(),
        server_address: token.server_address,
        subnet: token.subnet,
        subnet6: token.subnet6,
        containers: vec![],
        path: route.path.clone(),
        routes: inv.routes.to_vec(),
        masquerade: inv.masquerade,
        transparent: inv.transparent,
        snat_public: inv.snat_public,
        attach_label: inv.attach_label.clone(),
    };
    store.save(inv.iface, &Endpoint::Joined(joined.clone()))?;
    device.set_private_key(own_key).await?;
    crate::sys::crash_point("key-swapped");
    tracing::info!(
        "invite redeemed; now using this host's own key {}",
        own_key.public_key()
    );

    progress.step("waiting for traffic with our own key");
    wait_for_flow(api, deadline)
        .await
        .map_err(SiteError::NoFlow)?;
    Ok(joined)
}

/// Probes the server's API through the tunnel until it answers or `deadline`.
pub async fn wait_for_flow(api: SocketAddr, deadline: Instant) -> Result<(), ControlError> {
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
