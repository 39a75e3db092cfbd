//! The hub's API over the tunnel, as both sides see it on the wire: the
//! paths, the request and answer types, and the site's client (hyper).
//! Who serves it is not known here: the hub's handlers live in
//! `hub::http`.
//!
//! - `POST /v1/redeem` (signed with a token's invite key): admit the
//!   joiner's own key in place of the invite.
//! - `POST /v1/endpoints` (signed with a site's key): admit one more
//!   endpoint of that site (a container).
//! - `POST /v1/leave` (signed with a site's key): the site stops cleanly.
//! - `GET /v1/ping`: a round trip through the tunnel; changes nothing.

use super::auth::Signer;
use super::{Call, ControlError, Patience, decode, exchange_via, refused};
use crate::keys::PublicKey;
use hyper::StatusCode;
use hyper::body::Bytes;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};
use tokio::net::TcpStream;

pub const REDEEM: &str = "/v1/redeem";
pub const REGISTER: &str = "/v1/endpoints";
pub const LEAVE: &str = "/v1/leave";
pub const PING: &str = "/v1/ping";
pub const ROUTES: &str = "/v1/routes";
pub const RELEASE: &str = "/v1/endpoints/release";
pub const MESH: &str = "/v1/mesh";

/// What the hub sends to each site's control port (UDP, through the
/// tunnel) when the advertised LANs change; the site then asks for them.
pub const ROUTES_POKE: &[u8] = b"tunnel: routes changed";

/// Where a site may be reached directly, beside where the hub sees it;
/// replaces what it claimed before. The hub keeps only plausible
/// addresses, and probes prove or disprove every one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshClaim {
    /// Its own addresses (not Docker's, not the tunnel's), with its port.
    #[serde(default)]
    pub local: Vec<SocketAddr>,
    /// `--advertise-endpoint`: a port forward to it.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// What it found out about its NAT.
    #[serde(default)]
    pub nat: Option<crate::mesh::NatKind>,
}

/// A site's LANs (`join --route`); replaces what it advertised before.
#[derive(Debug, Serialize, Deserialize)]
pub struct RoutesRequest {
    pub routes: Vec<IpNetwork>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RedeemRequest {
    /// The joiner's own key, which replaces the invite's.
    pub public_key: PublicKey,
    /// The LANs behind the joiner (`join --route`).
    #[serde(default)]
    pub routes: Vec<IpNetwork>,
    /// `join --transparent --snat-public`.
    #[serde(default)]
    pub snat_public: bool,
    /// The site's name (`join --name`, or the host name).
    #[serde(default)]
    pub name: Option<String>,
    /// The name is only the host name: the hub may number it.
    #[serde(default)]
    pub default_name: bool,
}

/// An endpoint a site gives back (its container was removed).
#[derive(Debug, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub public_key: PublicKey,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub public_key: PublicKey,
    /// The container's name; unique within the site.
    pub name: String,
}

/// The answer to a redeem or a registration.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Admitted {
    pub address: IpNetwork,
    /// The site's name on the hub (redeem only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The site's LANs that wait for the hub operator's approval (redeem only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<IpNetwork>,
}

/// The answer to a site's routes: what of them waits for approval.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RoutesAnswer {
    #[serde(default)]
    pub pending: Vec<IpNetwork>,
}

/// What a joiner asks for beside its admission.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Joining {
    /// The LANs behind it.
    pub routes: Vec<IpNetwork>,
    /// Transparent mode with its public source address kept.
    pub snat_public: bool,
    /// The name it asks for (the hub may number a default one).
    pub name: Option<String>,
    /// That name is only a default (the host name).
    pub default_name: bool,
}

/// A LAN someone advertises, as sites learn it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertised {
    pub prefix: IpNetwork,
    /// The tunnel address of the site behind which it is (the hub's for its own).
    pub via: IpAddr,
}

/// The hub's API as a node reaches it: its address in the tunnel, and
/// the tunnel interface its requests must leave through. Bound to the
/// device, a request never takes another interface's route to the same
/// address (two tunnels on one host with the same subnet: the redeem
/// would reach the other hub, which refuses the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubApi {
    pub addr: SocketAddr,
    device: Option<([u8; 16], u8)>,
}

impl HubApi {
    /// Leaving through the interface named `iface`.
    pub fn via(addr: SocketAddr, iface: &str) -> Self {
        let mut name = [0u8; 16];
        // Interface names are at most 15 bytes (checked before any
        // interface is made); a longer one is not bound.
        let device = (iface.len() < name.len()).then(|| {
            name[..iface.len()].copy_from_slice(iface.as_bytes());
            (name, iface.len() as u8)
        });
        HubApi { addr, device }
    }

    /// Wherever the routing table sends it (tests, and callers that
    /// have no interface of their own).
    pub fn routed(addr: SocketAddr) -> Self {
        HubApi { addr, device: None }
    }

    pub fn device(&self) -> Option<&[u8]> {
        self.device.as_ref().map(|(n, len)| &n[..usize::from(*len)])
    }

    async fn connect(self) -> std::io::Result<TcpStream> {
        let socket = if self.addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(dev) = self.device() {
            // SO_BINDTODEVICE needs CAP_NET_RAW; without it (a `status`
            // by a user) the routing table decides.
            if let Err(e) = socket.bind_device(Some(dev)) {
                tracing::debug!(
                    "binding to {}: {e}; connecting without",
                    String::from_utf8_lossy(dev)
                );
            }
        }
        socket.connect(self.addr).await
    }
}

impl std::fmt::Display for HubApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.addr)
    }
}

async fn exchange(
    api: HubApi,
    call: Call<'_>,
    patience: impl Into<Patience>,
) -> Result<(StatusCode, Bytes), ControlError> {
    let target = api.to_string();
    exchange_via(&target, api.connect(), call, patience).await
}

/// A signed request the hub did not take; with the hub's clock when what
/// it refused was our timestamp (a 401 that says the hub's time), so that
/// the caller can adjust the signer and sign again.
#[derive(Debug)]
pub struct Declined {
    pub error: ControlError,
    pub hub_time: Option<u64>,
}

impl From<ControlError> for Declined {
    fn from(error: ControlError) -> Self {
        Declined {
            error,
            hub_time: None,
        }
    }
}

/// A signed POST, signed once at `now`; never signed again.
async fn signed_post_once<T: serde::de::DeserializeOwned>(
    api: HubApi,
    signer: &Signer,
    path: &str,
    body: &[u8],
    now: SystemTime,
    patience: Patience,
) -> Result<T, Declined> {
    let call = Call {
        method: "POST",
        path,
        body: body.to_vec(),
        authorization: Some(signer.sign("POST", path, body, now)),
    };
    let (status, bytes) = exchange(api, call, patience).await?;
    if status == StatusCode::UNAUTHORIZED {
        let (error, hub_time) = refused(status, &bytes);
        return Err(Declined { error, hub_time });
    }
    Ok(decode(&api.to_string(), (status, bytes))?)
}

/// A signed POST; signs again once with the hub's clock if ours is off.
async fn signed_post<T: serde::de::DeserializeOwned>(
    api: HubApi,
    signer: &Signer,
    path: &str,
    body: &impl Serialize,
    patience: impl Into<Patience>,
) -> Result<T, ControlError> {
    let patience = patience.into();
    let body = serde_json::to_vec(body).expect("request types serialize");
    match signed_post_once(api, signer, path, &body, SystemTime::now(), patience).await {
        Err(Declined {
            hub_time: Some(t), ..
        }) => {
            tracing::warn!("this host's clock is off from the hub's; using the hub's time");
            signer.adjust_clock(t, SystemTime::now());
            signed_post_once(api, signer, path, &body, SystemTime::now(), patience)
                .await
                .map_err(|d| d.error)
        }
        other => other.map_err(|d| d.error),
    }
}

/// Asks the hub to admit `key` in place of the invite that `invite` signs with.
pub async fn redeem_invite(
    api: HubApi,
    invite: &Signer,
    key: &PublicKey,
    joining: &Joining,
    patience: impl Into<Patience>,
) -> Result<Admitted, ControlError> {
    let req = redeem_request(key, joining);
    signed_post(api, invite, REDEEM, &req, patience).await
}

/// The same, signed once at `now` and never again: a refusal of our clock
/// comes back with the hub's time ([`Declined::hub_time`]), for the join
/// to decide on (it adjusts the signer and asks again).
pub async fn redeem_invite_once(
    api: HubApi,
    invite: &Signer,
    key: &PublicKey,
    joining: &Joining,
    now: SystemTime,
    patience: Patience,
) -> Result<Admitted, Declined> {
    let req = redeem_request(key, joining);
    let body = serde_json::to_vec(&req).expect("request types serialize");
    signed_post_once(api, invite, REDEEM, &body, now, patience).await
}

fn redeem_request(key: &PublicKey, joining: &Joining) -> RedeemRequest {
    RedeemRequest {
        public_key: *key,
        routes: joining.routes.clone(),
        snat_public: joining.snat_public,
        name: joining.name.clone(),
        default_name: joining.default_name,
    }
}

/// Registers another endpoint of this site (a container) with the hub.
pub async fn register_endpoint(
    api: HubApi,
    site: &Signer,
    key: &PublicKey,
    name: &str,
    timeout: Duration,
) -> Result<Admitted, ControlError> {
    let req = RegisterRequest {
        public_key: *key,
        name: name.to_owned(),
    };
    signed_post(api, site, REGISTER, &req, timeout).await
}

/// Gives an endpoint of this site back to the hub (its container is gone).
pub async fn release_endpoint(
    api: HubApi,
    site: &Signer,
    key: &PublicKey,
    timeout: Duration,
) -> Result<(), ControlError> {
    let req = ReleaseRequest { public_key: *key };
    signed_post::<()>(api, site, RELEASE, &req, timeout).await
}

/// Tells the hub this site is stopping cleanly (best effort).
pub async fn leave_hub(api: HubApi, site: &Signer, timeout: Duration) -> Result<(), ControlError> {
    signed_post::<()>(api, site, LEAVE, &serde_json::json!({}), timeout).await
}

/// Tells the hub which LANs are behind this site; returns those that
/// wait for the hub operator's approval.
pub async fn advertise_routes(
    api: HubApi,
    site: &Signer,
    routes: &[IpNetwork],
    timeout: Duration,
) -> Result<Vec<IpNetwork>, ControlError> {
    let req = RoutesRequest {
        routes: routes.to_vec(),
    };
    signed_post::<RoutesAnswer>(api, site, ROUTES, &req, timeout)
        .await
        .map(|a| a.pending)
}

/// Every LAN the hub and the sites advertise.
pub async fn fetch_routes(api: HubApi, timeout: Duration) -> Result<Vec<Advertised>, ControlError> {
    let call = Call {
        method: "GET",
        path: ROUTES,
        body: vec![],
        authorization: None,
    };
    decode(&api.to_string(), exchange(api, call, timeout).await?)
}

/// Tells the hub where this site may be reached directly. `false` when
/// the hub runs no mesh (a kernel-backend hub, or an older one).
pub async fn claim_mesh(
    api: HubApi,
    site: &Signer,
    claim: &MeshClaim,
    timeout: Duration,
) -> Result<bool, ControlError> {
    match signed_post::<()>(api, site, MESH, claim, timeout).await {
        Ok(()) => Ok(true),
        Err(ControlError::Refused { status: 404, .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// This site's peer map, as the hub tagged it; `None` when the hub runs
/// no mesh.
pub async fn fetch_mesh(
    api: HubApi,
    timeout: Duration,
) -> Result<Option<crate::mesh::SignedMap>, ControlError> {
    let call = Call {
        method: "GET",
        path: MESH,
        body: vec![],
        authorization: None,
    };
    match decode(&api.to_string(), exchange(api, call, timeout).await?) {
        Ok(m) => Ok(Some(m)),
        Err(ControlError::Refused { status: 404, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A round trip through the tunnel: proof that traffic flows.
pub async fn ping(api: HubApi, patience: impl Into<Patience>) -> Result<(), ControlError> {
    let call = Call {
        method: "GET",
        path: PING,
        body: vec![],
        authorization: None,
    };
    let (status, bytes) = exchange(api, call, patience).await?;
    if status.is_success() {
        Ok(())
    } else {
        Err(refused(status, &bytes).0)
    }
}
