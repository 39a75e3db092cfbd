//! The redemption API: HTTP (axum on the server, hyper on the joiner) over
//! the tunnel itself.
//!
//! The server binds it to its tunnel address only, so nothing outside the
//! tunnel can reach it, and WireGuard's cryptokey routing guarantees that a
//! request from an invite's address comes from the invite's holder.

use crate::hub::{Hub, RedeemError};
use crate::keys::PublicKey;
use crate::status::{EndpointStatus, LocalApi, TokenRequest};
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};

/// The TCP port of the API on the server's tunnel address.
pub const CONTROL_PORT: u16 = 51821;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no answer from {0}")]
    Timeout(String),
    #[error("connecting to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("talking to {target}: {detail}")]
    Http { target: String, detail: String },
    #[error("{path}: {detail}")]
    Local { path: String, detail: String },
    #[error("the server refused: {0}")]
    Refused(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RedeemRequest {
    pub public_key: PublicKey,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub public_key: PublicKey,
    /// What the endpoint is, for the server's records (e.g. "container cli").
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RedeemResponse {
    pub address: IpNetwork,
}

#[derive(Debug, Serialize, Deserialize)]
struct ErrorBody {
    error: String,
}

type Reply<T> = Result<Json<T>, (StatusCode, Json<ErrorBody>)>;

fn refuse(status: StatusCode, e: impl ToString) -> (StatusCode, Json<ErrorBody>) {
    (
        status,
        Json(ErrorBody {
            error: e.to_string(),
        }),
    )
}

/// Normalizes IPv4-mapped IPv6 peers, which a dual-stack listener could report.
fn source(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

async fn redeem(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(req): Json<RedeemRequest>,
) -> Reply<RedeemResponse> {
    let src = source(peer);
    let result = hub.redeem(src, req.public_key, SystemTime::now()).await;
    admission("redeem", src, result)
}

/// The answer to a redeem or registration: the address, or why not.
fn admission(
    what: &str,
    src: IpAddr,
    result: Result<IpNetwork, RedeemError>,
) -> Reply<RedeemResponse> {
    result
        .map(|address| Json(RedeemResponse { address }))
        .map_err(|e| {
            tracing::warn!("refused {what} from {src}: {e}");
            let status = match e {
                RedeemError::NoInvite(_) => StatusCode::FORBIDDEN,
                RedeemError::AlreadyUsed | RedeemError::KeyInUse => StatusCode::CONFLICT,
                RedeemError::Expired => StatusCode::GONE,
                RedeemError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            refuse(status, e)
        })
}

async fn register(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(req): Json<RegisterRequest>,
) -> Reply<RedeemResponse> {
    let src = source(peer);
    let name: String = req
        .name
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect();
    let result = hub
        .register(src, req.public_key, &name, SystemTime::now())
        .await;
    admission("endpoint registration", src, result)
}

async fn left(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<&'static str, (StatusCode, Json<ErrorBody>)> {
    match hub.leave(source(peer)).await {
        Ok(true) => Ok("bye\n"),
        Ok(false) => Err(refuse(StatusCode::FORBIDDEN, "not a site")),
        Err(e) => Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

async fn pong(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<&'static str, (StatusCode, Json<ErrorBody>)> {
    let src = source(peer);
    if hub.knows(src).await {
        Ok("pong\n")
    } else {
        Err(refuse(
            StatusCode::FORBIDDEN,
            format!("{src} is neither a peer nor invited"),
        ))
    }
}

pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/v1/redeem", post(redeem))
        .route("/v1/endpoints", post(register))
        .route("/v1/leave", post(left))
        .route("/v1/ping", get(pong))
        .with_state(hub)
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ControlError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ControlError::Bind { addr, source })
}

/// Serves the API until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(hub).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// One HTTP/1.1 exchange on an open stream.
async fn exchange_on<S>(
    stream: S,
    target: &str,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), ControlError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: &dyn std::fmt::Display| ControlError::Http {
        target: target.to_owned(),
        detail: e.to_string(),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(&e))?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "tunnel")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| http(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| http(&e))?
        .to_bytes();
    Ok((status, bytes))
}

/// Connects with `connect`, then one exchange; all bounded by `timeout`.
async fn exchange_via<S>(
    target: String,
    connect: impl Future<Output = std::io::Result<S>>,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), ControlError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let work = async {
        let stream = connect.await.map_err(|source| ControlError::Connect {
            target: target.clone(),
            source,
        })?;
        exchange_on(stream, &target, method, path, body).await
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ControlError::Timeout(target.clone()))?
}

/// One exchange with the API over the tunnel, bounded by `timeout`.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), ControlError> {
    exchange_via(
        addr.to_string(),
        TcpStream::connect(addr),
        method,
        path,
        body,
        timeout,
    )
    .await
}

/// Binds the local control socket `<state-dir>/<iface>.sock` (0600, in the
/// 0700 state directory). A socket that answers means the interface is
/// already served by a running `tunnel`; one that does not is a crash's
/// leftover and is replaced.
pub fn bind_local(path: &std::path::Path) -> Result<tokio::net::UnixListener, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    let local = |detail: String| ControlError::Local {
        path: path.display().to_string(),
        detail,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(local(
                "a running tunnel already serves this interface (see `tunnel status`)".into(),
            ));
        }
        std::fs::remove_file(path).map_err(|e| local(format!("removing a stale socket: {e}")))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| local(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| local(e.to_string()))?;
    Ok(listener)
}

/// Serves the local API until `shutdown`; removes the socket after. `down`
/// is called for `tunnel down`, and means the same as SIGTERM.
pub async fn serve_local(
    listener: tokio::net::UnixListener,
    path: std::path::PathBuf,
    api: Arc<dyn LocalApi>,
    down: Arc<dyn Fn() + Send + Sync>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    type Api = (Arc<dyn LocalApi>, Arc<dyn Fn() + Send + Sync>);
    async fn status(State((api, _)): State<Api>) -> Json<Vec<EndpointStatus>> {
        Json(api.report().await)
    }
    async fn tokens(
        State((api, _)): State<Api>,
        Json(req): Json<TokenRequest>,
    ) -> Reply<Vec<String>> {
        api.tokens(req)
            .await
            .map(Json)
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, e))
    }
    #[derive(Deserialize)]
    struct Revoke {
        target: String,
    }
    async fn revoke(State((api, _)): State<Api>, Json(req): Json<Revoke>) -> Reply<Vec<String>> {
        match api.revoke(&req.target).await {
            Ok(removed) if removed.is_empty() => Err(refuse(
                StatusCode::NOT_FOUND,
                format!("no peer or invite named or addressed {:?}", req.target),
            )),
            Ok(removed) => Ok(Json(removed)),
            Err(e) => Err(refuse(StatusCode::BAD_REQUEST, e)),
        }
    }
    async fn stop(State((_, down)): State<Api>) -> Json<Vec<String>> {
        down();
        Json(vec!["stopping".to_owned()])
    }
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/tokens", post(tokens))
        .route("/v1/revoke", post(revoke))
        .route("/v1/down", post(stop))
        .with_state((api, down));
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(&path);
    result
}

/// A request to a running instance's local socket, decoded as JSON.
pub async fn local_call<T: serde::de::DeserializeOwned>(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<T, ControlError> {
    let target = socket.display().to_string();
    let connect = tokio::net::UnixStream::connect(socket);
    let (status, bytes) =
        exchange_via(target.clone(), connect, method, path, body, timeout).await?;
    if !status.is_success() {
        return Err(refused(&bytes, status));
    }
    serde_json::from_slice(&bytes).map_err(|e| ControlError::Http {
        target,
        detail: e.to_string(),
    })
}

fn refused(body: &Bytes, status: StatusCode) -> ControlError {
    let msg = serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| format!("HTTP {status}"));
    ControlError::Refused(msg)
}

/// POSTs `body` as JSON over the tunnel and decodes the JSON answer.
async fn post_json<T: serde::de::DeserializeOwned>(
    server: SocketAddr,
    path: &str,
    body: &impl Serialize,
    timeout: Duration,
) -> Result<T, ControlError> {
    let body = serde_json::to_vec(body).expect("serializes");
    let (status, bytes) = exchange(server, "POST", path, Some(body), timeout).await?;
    if !status.is_success() {
        return Err(refused(&bytes, status));
    }
    serde_json::from_slice(&bytes).map_err(|e| ControlError::Http {
        target: server.to_string(),
        detail: e.to_string(),
    })
}

/// Asks the server to admit `key` in place of the invite we hold.
pub async fn redeem_invite(
    server: SocketAddr,
    key: &PublicKey,
    timeout: Duration,
) -> Result<RedeemResponse, ControlError> {
    post_json(
        server,
        "/v1/redeem",
        &RedeemRequest { public_key: *key },
        timeout,
    )
    .await
}

/// Registers another endpoint of this site (a container) with the hub.
pub async fn register_endpoint(
    server: SocketAddr,
    key: &PublicKey,
    name: &str,
    timeout: Duration,
) -> Result<RedeemResponse, ControlError> {
    let req = RegisterRequest {
        public_key: *key,
        name: name.to_owned(),
    };
    post_json(server, "/v1/endpoints", &req, timeout).await
}

/// Tells the hub this site is stopping cleanly (best effort).
pub async fn leave(server: SocketAddr, timeout: Duration) -> Result<(), ControlError> {
    let (status, bytes) = exchange(server, "POST", "/v1/leave", None, timeout).await?;
    if status.is_success() {
        Ok(())
    } else {
        Err(refused(&bytes, status))
    }
}

/// A round trip through the tunnel: proof that traffic flows.
pub async fn ping(server: SocketAddr, timeout: Duration) -> Result<(), ControlError> {
    let (status, bytes) = exchange(server, "GET", "/v1/ping", None, timeout).await?;
    if status.is_success() {
        Ok(())
    } else {
        Err(refused(&bytes, status))
    }
}
