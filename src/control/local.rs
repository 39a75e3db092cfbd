//! Each running instance's API on `<state-dir>/<iface>.sock` (mode 0600 in
//! the 0700 state directory, so root on this host only): what `status`,
//! `token`, `revoke` and `down` ask of it.

use super::{Call, ControlError, Refusal, decode, exchange_via, refuse};
use crate::status::EndpointStatus;
use async_trait::async_trait;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const STATUS: &str = "/v1/status";
pub const TOKENS: &str = "/v1/tokens";
pub const REVOKE: &str = "/v1/revoke";
pub const DOWN: &str = "/v1/down";
pub const PEERS: &str = "/v1/peers";
pub const APPROVE: &str = "/v1/routes/approve";
pub const REJECT: &str = "/v1/routes/reject";
pub const LANS: &str = "/v1/lans";

/// `tunnel route add|del CIDR`: a LAN behind this host, advertised or
/// withdrawn while it runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LanChange {
    pub prefix: ipnetwork::IpNetwork,
    /// Add (`true`) or withdraw.
    pub add: bool,
    /// `--masquerade`: be a gateway towards the LANs from now on.
    #[serde(default)]
    pub masquerade: bool,
}

impl LanChange {
    /// What a change makes of the LANs `routes` (masquerading or not):
    /// the new set, checked by itself and against the tunnel's `subnets`.
    pub fn apply(
        &self,
        routes: &[ipnetwork::IpNetwork],
        masquerade: bool,
        subnets: &[ipnetwork::IpNetwork],
    ) -> Result<(Vec<ipnetwork::IpNetwork>, bool), String> {
        let change = self;
        let p = change.prefix;
        let mut next = routes.to_vec();
        if change.add {
            if routes.contains(&p) {
                return Err(format!("{p} is already routed through this host"));
            }
            next.push(p);
        } else {
            if change.masquerade {
                return Err("--masquerade goes with route add".to_owned());
            }
            if !routes.contains(&p) {
                return Err(format!(
                    "{p} is not one of this host's LANs ({})",
                    if routes.is_empty() {
                        "it has none".to_owned()
                    } else {
                        routes
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ));
            }
            next.retain(|r| *r != p);
        }
        crate::ipam::check_lans(&next, subnets).map_err(|e| e.to_string())?;
        // Masquerading needs LANs to masquerade towards.
        let masquerade = (masquerade || change.masquerade) && !next.is_empty();
        Ok((next, masquerade))
    }
}

/// The LANs behind this host after a change, and those of them that
/// wait for the hub operator's approval.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LanSet {
    pub routes: Vec<ipnetwork::IpNetwork>,
    pub masquerade: bool,
    #[serde(default)]
    pub pending: Vec<ipnetwork::IpNetwork>,
}

/// `tunnel peer add`'s request: the client's key, made on its device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerRequest {
    pub name: String,
    pub public_key: crate::keys::PublicKey,
    /// `--endpoint`, without which the hub needs one of its own.
    pub endpoint: Option<String>,
}

/// What a stock client's config needs from the hub.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerGrant {
    /// Its tunnel addresses (one per family), with the subnets' prefixes.
    pub addresses: Vec<ipnetwork::IpNetwork>,
    pub server_public_key: crate::keys::PublicKey,
    pub port: u16,
    /// `serve --endpoint`, when it was given.
    pub endpoint_hint: Option<String>,
    /// The tunnel subnet and every advertised LAN.
    pub allowed_ips: Vec<ipnetwork::IpNetwork>,
    pub mtu: u32,
}

/// `tunnel token`'s request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRequest {
    pub count: u64,
    pub ttl_secs: u64,
    pub name: Option<String>,
    /// LANs the redeeming site may advertise without asking (`--route`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<ipnetwork::IpNetwork>,
}

/// `tunnel route approve|reject SITE CIDR`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteDecision {
    /// A site's name or tunnel address.
    pub site: String,
    pub prefix: ipnetwork::IpNetwork,
}

/// What a route decision left: the site, and its LANs still waiting.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteDecided {
    pub site: std::net::IpAddr,
    pub pending: Vec<ipnetwork::IpNetwork>,
}

/// `tunnel revoke`'s request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeRequest {
    /// A name or a tunnel address.
    pub target: String,
}

/// Why the running instance did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("this interface is a joined site; only a server does that (run it on the server)")]
    NotAServer,
    #[error("{0}")]
    Unavailable(String),
}

impl LocalError {
    fn status(&self) -> StatusCode {
        match self {
            LocalError::BadRequest(_) => StatusCode::BAD_REQUEST,
            LocalError::NotFound(_) => StatusCode::NOT_FOUND,
            LocalError::NotAServer => StatusCode::CONFLICT,
            LocalError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// What a running instance answers on its local socket.
#[async_trait]
pub trait LocalApi: Send + Sync {
    /// The live view of its endpoints.
    async fn report(&self) -> Vec<EndpointStatus>;

    /// Mints tokens (servers only). The request is within the limits.
    async fn tokens(&self, _req: TokenRequest) -> Result<Vec<String>, LocalError> {
        Err(LocalError::NotAServer)
    }

    /// Removes a peer by name or address (servers only).
    async fn revoke(&self, _target: &str) -> Result<Vec<String>, LocalError> {
        Err(LocalError::NotAServer)
    }

    /// Admits a stock WireGuard client (servers only).
    async fn add_peer(&self, _req: PeerRequest) -> Result<PeerGrant, LocalError> {
        Err(LocalError::NotAServer)
    }

    /// Approves (`true`) or rejects a site's LAN (servers only).
    async fn decide_route(
        &self,
        _approve: bool,
        _req: RouteDecision,
    ) -> Result<RouteDecided, LocalError> {
        Err(LocalError::NotAServer)
    }

    /// Adds or withdraws a LAN behind this host.
    async fn change_lans(&self, _req: LanChange) -> Result<LanSet, LocalError> {
        Err(LocalError::BadRequest(
            "this endpoint routes no LANs".to_owned(),
        ))
    }
}

type Api = (Arc<dyn LocalApi>, Arc<dyn Fn() + Send + Sync>);

fn local_refusal(e: LocalError) -> Refusal {
    refuse(e.status(), e)
}

async fn status(State((api, _)): State<Api>) -> axum::Json<Vec<EndpointStatus>> {
    axum::Json(api.report().await)
}

async fn tokens(
    State((api, _)): State<Api>,
    body: axum::body::Bytes,
) -> Result<axum::Json<Vec<String>>, Refusal> {
    let req: TokenRequest =
        serde_json::from_slice(&body).map_err(|e| refuse(StatusCode::BAD_REQUEST, e))?;
    crate::limits::check_count(req.count, 1).map_err(|e| refuse(StatusCode::BAD_REQUEST, e))?;
    crate::limits::check_ttl(Duration::from_secs(req.ttl_secs))
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, e))?;
    if let Some(n) = &req.name {
        crate::limits::check_name(n).map_err(|e| refuse(StatusCode::BAD_REQUEST, e))?;
    }
    api.tokens(req).await.map(axum::Json).map_err(local_refusal)
}

async fn revoke(
    State((api, _)): State<Api>,
    body: axum::body::Bytes,
) -> Result<axum::Json<Vec<String>>, Refusal> {
    let req: RevokeRequest =
        serde_json::from_slice(&body).map_err(|e| refuse(StatusCode::BAD_REQUEST, e))?;
    api.revoke(&req.target)
        .await
        .map(axum::Json)
        .map_err(local_refusal)
}

async fn add_peer(
    State((api, _)): State<Api>,
    body: axum::body::Bytes,
) -> Result<axum::Json<PeerGrant>, Refusal> {
    let req: PeerRequest =
        serde_json::from_slice(&body).map_err(|e| refuse(StatusCode::BAD_REQUEST, e))?;
    api.add_peer(req)
        .await
        .map(axum::Json)
        .map_err(local_refusal)
}

async fn decide(
    api: Arc<dyn LocalApi>,
    approve: bool,
    body: &[u8],
) -> Result<axum::Json<RouteDecided>, Refusal> {
    let req: RouteDecision =
        serde_json::from_slice(body).map_err(|e| refuse(StatusCode::BAD_REQUEST, e))?;
    api.decide_route(approve, req)
        .await
        .map(axum::Json)
        .map_err(local_refusal)
}

async fn approve(
    State((api, _)): State<Api>,
    body: axum::body::Bytes,
) -> Result<axum::Json<RouteDecided>, Refusal> {
    decide(api, true, &body).await
}

async fn reject(
    State((api, _)): State<Api>,
    body: axum::body::Bytes,
) -> Result<axum::Json<RouteDecided>, Refusal> {
    decide(api, false, &body).await
}

async fn lans(
    State((api, _)): State<Api>,
    body: axum::body::Bytes,
) -> Result<axum::Json<LanSet>, Refusal> {
    let req: LanChange =
        serde_json::from_slice(&body).map_err(|e| refuse(StatusCode::BAD_REQUEST, e))?;
    api.change_lans(req)
        .await
        .map(axum::Json)
        .map_err(local_refusal)
}

async fn stop(State((_, down)): State<Api>) -> axum::Json<Vec<String>> {
    down();
    axum::Json(vec!["stopping".to_owned()])
}

/// `down` is called for `tunnel down`, and means the same as SIGTERM.
pub fn router(api: Arc<dyn LocalApi>, down: Arc<dyn Fn() + Send + Sync>) -> Router {
    Router::new()
        .route(STATUS, get(status))
        .route(TOKENS, post(tokens))
        .route(REVOKE, post(revoke))
        .route(PEERS, post(add_peer))
        .route(APPROVE, post(approve))
        .route(REJECT, post(reject))
        .route(LANS, post(lans))
        .route(DOWN, post(stop))
        .with_state((api, down))
}

/// Binds the local control socket. A socket that answers means the
/// interface is already served by a running `tunnel`; one that does not is
/// a crash's leftover and is replaced. The process umask (077) makes the
/// socket owner-only from its creation; the mode is then set to 0600.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    let bind_err = |source| ControlError::Bind {
        addr: path.display().to_string(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(bind_err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "a running tunnel already serves this interface (see `tunnel status`)",
            )));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Serves the local API until `shutdown`; removes the socket after.
pub async fn serve(
    listener: tokio::net::UnixListener,
    path: PathBuf,
    api: Arc<dyn LocalApi>,
    down: Arc<dyn Fn() + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    super::server::serve(listener, router(api, down), super::server::LOCAL, shutdown).await;
    let _ = std::fs::remove_file(&path);
}

const TIMEOUT: Duration = Duration::from_secs(10);

async fn call<T: serde::de::DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<T, ControlError> {
    let target = socket.display().to_string();
    let connect = tokio::net::UnixStream::connect(socket);
    let call = Call {
        method,
        path,
        body,
        authorization: None,
    };
    decode(
        &target,
        exchange_via(&target, connect, call, timeout).await?,
    )
}

/// The live status of the instance behind `socket`.
pub async fn status_of(
    socket: &Path,
    timeout: Duration,
) -> Result<Vec<EndpointStatus>, ControlError> {
    call(socket, "GET", STATUS, vec![], timeout).await
}

pub async fn request_tokens(
    socket: &Path,
    req: &TokenRequest,
) -> Result<Vec<String>, ControlError> {
    let body = serde_json::to_vec(req).expect("serializes");
    call(socket, "POST", TOKENS, body, TIMEOUT).await
}

pub async fn request_revoke(socket: &Path, target: &str) -> Result<Vec<String>, ControlError> {
    let body = serde_json::to_vec(&RevokeRequest {
        target: target.to_owned(),
    })
    .expect("serializes");
    call(socket, "POST", REVOKE, body, TIMEOUT).await
}

pub async fn request_peer(socket: &Path, req: &PeerRequest) -> Result<PeerGrant, ControlError> {
    let body = serde_json::to_vec(req).expect("serializes");
    call(socket, "POST", PEERS, body, TIMEOUT).await
}

/// Approves (`true`) or rejects a site's LAN on the hub behind `socket`.
pub async fn request_route(
    socket: &Path,
    approve: bool,
    req: &RouteDecision,
) -> Result<RouteDecided, ControlError> {
    let body = serde_json::to_vec(req).expect("serializes");
    let path = if approve { APPROVE } else { REJECT };
    call(socket, "POST", path, body, TIMEOUT).await
}

/// Adds or withdraws a LAN on the instance behind `socket`.
pub async fn request_lans(socket: &Path, req: &LanChange) -> Result<LanSet, ControlError> {
    let body = serde_json::to_vec(req).expect("serializes");
    call(socket, "POST", LANS, body, TIMEOUT).await
}

pub async fn request_down(socket: &Path) -> Result<(), ControlError> {
    call::<Vec<String>>(socket, "POST", DOWN, vec![], TIMEOUT)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    struct Minter;

    #[async_trait]
    impl LocalApi for Minter {
        async fn report(&self) -> Vec<EndpointStatus> {
            vec![]
        }
        async fn tokens(&self, req: TokenRequest) -> Result<Vec<String>, LocalError> {
            Ok(vec!["tun1_x".to_owned(); req.count as usize])
        }
    }

    struct Site;

    #[async_trait]
    impl LocalApi for Site {
        async fn report(&self) -> Vec<EndpointStatus> {
            vec![]
        }
    }

    async fn post(api: Arc<dyn LocalApi>, path: &str, body: &str) -> (StatusCode, String) {
        let req = hyper::Request::builder()
            .method("POST")
            .uri(path)
            .body(axum::body::Body::from(body.to_owned()))
            .unwrap();
        let resp = router(api, Arc::new(|| {})).oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn token_requests_are_bounded_before_the_api_sees_them() {
        let api: Arc<dyn LocalApi> = Arc::new(Minter);
        let (status, text) = post(
            api.clone(),
            TOKENS,
            r#"{"count": 1000000000, "ttl_secs": 60, "name": null}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        for bad in [
            r#"{"count": 0, "ttl_secs": 60, "name": null}"#,
            r#"{"count": 1, "ttl_secs": 18446744073709551615, "name": null}"#,
            r#"{"count": 1, "ttl_secs": 0, "name": null}"#,
            r#"{"count": 1, "ttl_secs": 60, "name": "a b"}"#,
            r#"{"count": -1, "ttl_secs": 60}"#,
            r#"not json"#,
        ] {
            assert_eq!(
                post(api.clone(), TOKENS, bad).await.0,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
        let (status, text) =
            post(api, TOKENS, r#"{"count": 2, "ttl_secs": 60, "name": null}"#).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(serde_json::from_str::<Vec<String>>(&text).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_site_says_it_mints_and_revokes_nothing() {
        let api: Arc<dyn LocalApi> = Arc::new(Site);
        let (status, text) = post(
            api.clone(),
            TOKENS,
            r#"{"count": 1, "ttl_secs": 60, "name": null}"#,
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(text.contains("joined site"), "{text}");
        let (status, _) = post(api, REVOKE, r#"{"target": "x"}"#).await;
        assert_eq!(status, StatusCode::CONFLICT);
    }
}

#[cfg(test)]
mod lan_tests {
    use super::*;
    use ipnetwork::IpNetwork;

    fn n(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn change(p: &str, add: bool, masquerade: bool) -> LanChange {
        LanChange {
            prefix: n(p),
            add,
            masquerade,
        }
    }

    #[test]
    fn a_change_is_checked_as_at_join() {
        let tunnel = [n("10.77.0.0/24")];
        let lans = [n("192.168.1.0/24")];
        let (next, masq) = change("192.168.2.0/24", true, true)
            .apply(&lans, false, &tunnel)
            .unwrap();
        assert_eq!(
            (next, masq),
            (vec![n("192.168.1.0/24"), n("192.168.2.0/24")], true)
        );
        for (bad, why) in [
            (change("0.0.0.0/0", true, false), "whole internet"),
            (change("10.77.0.0/16", true, false), "tunnel's subnet"),
            (
                change("192.168.1.0/25", true, false),
                "overlaps 192.168.1.0/24",
            ),
            (change("192.168.1.0/24", true, false), "already routed"),
            (
                change("192.168.9.1/24", true, false),
                "not a network address",
            ),
            (
                change("192.168.9.0/24", false, false),
                "not one of this host's LANs",
            ),
            (
                change("192.168.1.0/24", false, true),
                "--masquerade goes with route add",
            ),
        ] {
            let e = bad.apply(&lans, false, &tunnel).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        // The last LAN gone: nothing left to masquerade towards.
        let (next, masq) = change("192.168.1.0/24", false, false)
            .apply(&lans, true, &tunnel)
            .unwrap();
        assert!(next.is_empty() && !masq);
    }
}
