//! The hub's handlers for the tunnel API ([`crate::control::tunnel`]):
//! axum on the hub's tunnel address.
//!
//! A signed request must also come from the signer's tunnel address, so it
//! travelled through the signer's own WireGuard session. Each route takes
//! the class of key it serves as a type ([`Signed<Invitee>`],
//! [`Signed<SiteKey>`]): a road warrior's key, a used invite, a site's
//! container endpoint or a hub container's key gets a 403 from every
//! route that changes something, whatever it signs.

use super::{
    Advertised, Caller, Denied, Hub, Joining, LeaveError, RedeemError, RegisterError, RouteError,
};
use crate::control::auth::{AuthError, Proof};
use crate::control::tunnel::{
    Admitted, LEAVE, MESH, MeshClaim, PING, REDEEM, REGISTER, RELEASE, ROUTES, RedeemRequest,
    RegisterRequest, ReleaseRequest, RoutesAnswer, RoutesRequest,
};
use crate::control::{self, ControlError, ErrorBody, Refusal, refuse};
use crate::lograte::LogRate;
use crate::mesh::SignedMap;
use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use hyper::body::Bytes;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

fn source(addr: SocketAddr) -> IpAddr {
    control::server::Source::ip(&addr).expect("TCP peers have an address")
}

fn unauthorized(e: AuthError, now: SystemTime) -> Refusal {
    let server_time = matches!(e, AuthError::Skew(_)).then(|| crate::hub::unix(now));
    let status = match e {
        AuthError::Flood => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::UNAUTHORIZED,
    };
    (
        status,
        axum::Json(ErrorBody {
            error: e.to_string(),
            server_time,
        }),
    )
}

/// A class of key, as a type: a route names the one it serves, and a key
/// of any other class is refused before the route runs.
trait Class: Sized {
    /// Who may, as a refusal says it.
    const WHO: &'static str;
    fn of(caller: Caller) -> Option<Self>;
}

/// A token's invite key: it may redeem, and once used, repeat that
/// redeem only.
struct Invitee {
    address: IpAddr,
    used: bool,
}

impl Class for Invitee {
    const WHO: &'static str = "a token's invite key";
    fn of(caller: Caller) -> Option<Self> {
        match caller {
            Caller::Invite { address, used } => Some(Self { address, used }),
            _ => None,
        }
    }
}

/// An admitted site's own key: it manages its own endpoints, asks for
/// routes, leaves.
struct SiteKey {
    address: IpAddr,
}

impl Class for SiteKey {
    const WHO: &'static str = "an admitted site's key";
    fn of(caller: Caller) -> Option<Self> {
        match caller {
            Caller::Site { address } => Some(Self { address }),
            _ => None,
        }
    }
}

/// A request whose signature checked out, that came from the signer's
/// own tunnel address, and whose key is of class `C`: the extractor
/// every changing route starts with.
struct Signed<C> {
    who: C,
    src: IpAddr,
    body: Bytes,
}

impl<C: Class> axum::extract::FromRequest<Arc<Hub>> for Signed<C> {
    type Rejection = Refusal;

    async fn from_request(req: axum::extract::Request, hub: &Arc<Hub>) -> Result<Self, Refusal> {
        let (parts, body) = req.into_parts();
        let src = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| source(c.0))
            .ok_or_else(|| refuse(StatusCode::INTERNAL_SERVER_ERROR, "no peer address"))?;
        let body =
            Bytes::from_request(axum::extract::Request::from_parts(parts.clone(), body), hub)
                .await
                .map_err(|e| refuse(e.status(), e.body_text()))?;
        let (method, path) = (parts.method.as_str(), parts.uri.path());
        let now = SystemTime::now();
        let proof = parts
            .headers
            .get(hyper::header::AUTHORIZATION)
            .ok_or(AuthError::Missing)
            .and_then(|h| h.to_str().map_err(|_| AuthError::Malformed("not text")))
            .and_then(Proof::parse)
            .map_err(|e| unauthorized(e, now))?;
        let caller = hub
            .authenticate(&proof, method, path, &body, now)
            .await
            .map_err(|e| unauthorized(e, now))?;
        let from = caller.address();
        if from != src {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!("the signing key belongs to {from}, not to {src}"),
            ));
        }
        // Refusals are logged by the router, at a bounded rate.
        let Some(who) = C::of(caller) else {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!("{} cannot do this; only {} may", caller.describe(), C::WHO),
            ));
        };
        Ok(Signed { who, src, body })
    }
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| refuse(StatusCode::BAD_REQUEST, e))
}

fn denied<E: std::error::Error + 'static>(
    what: &str,
    src: IpAddr,
    d: Denied<E>,
    status: impl Fn(&E) -> StatusCode,
) -> Refusal {
    match d {
        Denied::Refused(e) => refuse(status(&e), e),
        Denied::Unavailable(e) => {
            tracing::error!("{what} from {src} failed: {:#}", anyhow::Error::from(e));
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the hub cannot make this change now; try again",
            )
        }
    }
}

async fn redeem(
    State(hub): State<Arc<Hub>>,
    Signed { who, src, body }: Signed<Invitee>,
) -> Result<axum::Json<Admitted>, Refusal> {
    let Invitee { address, used } = who;
    let req: RedeemRequest = json(&body)?;
    if used {
        tracing::debug!("{src} repeats a redeem with a used invite");
    }
    let joining = Joining {
        routes: req.routes,
        snat_public: req.snat_public,
        name: req.name,
        default_name: req.default_name,
    };
    hub.redeem(address, req.public_key, joining, SystemTime::now())
        .await
        .map(|r| {
            axum::Json(Admitted {
                address: r.address,
                name: r.name,
                pending: r.pending,
            })
        })
        .map_err(|d| {
            denied("redeem", src, d, |e| match e {
                RedeemError::NoInvite(_) => StatusCode::FORBIDDEN,
                RedeemError::AlreadyUsed | RedeemError::KeyInUse | RedeemError::NameTaken(_) => {
                    StatusCode::CONFLICT
                }
                RedeemError::Name(_) => StatusCode::BAD_REQUEST,
                RedeemError::Routes(RouteError::Taken { .. } | RouteError::Tunnel(..)) => {
                    StatusCode::CONFLICT
                }
                RedeemError::Expired => StatusCode::GONE,
                RedeemError::WeakKey | RedeemError::Routes(_) => StatusCode::BAD_REQUEST,
            })
        })
}

async fn register(
    State(hub): State<Arc<Hub>>,
    Signed { who, src, body }: Signed<SiteKey>,
) -> Result<axum::Json<Admitted>, Refusal> {
    let address = who.address;
    let req: RegisterRequest = json(&body)?;
    hub.register(address, req.public_key, &req.name, SystemTime::now())
        .await
        .map(|address| {
            axum::Json(Admitted {
                address,
                name: None,
                pending: vec![],
            })
        })
        .map_err(|d| {
            denied("endpoint registration", src, d, |e| match e {
                RegisterError::NotASite(_) | RegisterError::Quota(_) => StatusCode::FORBIDDEN,
                RegisterError::Unknown => StatusCode::NOT_FOUND,
                RegisterError::KeyInUse | RegisterError::NameTaken(_) => StatusCode::CONFLICT,
                RegisterError::WeakKey | RegisterError::Name(_) => StatusCode::BAD_REQUEST,
                RegisterError::Exhausted(_) => StatusCode::INSUFFICIENT_STORAGE,
            })
        })
}

async fn release(
    State(hub): State<Arc<Hub>>,
    Signed { who, src, body }: Signed<SiteKey>,
) -> Result<axum::Json<()>, Refusal> {
    let address = who.address;
    let req: ReleaseRequest = json(&body)?;
    hub.release(address, req.public_key)
        .await
        .map(|()| axum::Json(()))
        .map_err(|d| {
            denied("endpoint release", src, d, |e| match e {
                RegisterError::Unknown => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_REQUEST,
            })
        })
}

async fn leave(
    State(hub): State<Arc<Hub>>,
    Signed { who, src, .. }: Signed<SiteKey>,
) -> Result<axum::Json<()>, Refusal> {
    let address = who.address;
    match hub.leave(address).await {
        Ok(()) => Ok(axum::Json(())),
        Err(e @ LeaveError::TooSoon) => Err(refuse(StatusCode::TOO_MANY_REQUESTS, e)),
        Err(e @ LeaveError::NotASite(_)) => Err(refuse(StatusCode::FORBIDDEN, e)),
        Err(e) => {
            tracing::warn!("leave from {src}: {:#}", anyhow::Error::from(e));
            Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "try again"))
        }
    }
}

async fn advertise(
    State(hub): State<Arc<Hub>>,
    Signed { who, src, body }: Signed<SiteKey>,
) -> Result<axum::Json<RoutesAnswer>, Refusal> {
    let req: RoutesRequest = json(&body)?;
    hub.advertise(who.address, req.routes)
        .await
        .map(|pending| axum::Json(RoutesAnswer { pending }))
        .map_err(|d| {
            denied("route advertisement", src, d, |e| match e {
                RouteError::NotASite(_) => StatusCode::FORBIDDEN,
                RouteError::Taken { .. } | RouteError::Tunnel(..) => StatusCode::CONFLICT,
                _ => StatusCode::BAD_REQUEST,
            })
        })
}

async fn routes(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<axum::Json<Vec<Advertised>>, Refusal> {
    let src = source(peer);
    if !hub.is_site(src).await {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            format!("{src} is not an admitted site"),
        ));
    }
    Ok(axum::Json(hub.routes().borrow().clone()))
}

async fn claim_mesh(
    State(hub): State<Arc<Hub>>,
    Signed { who, body, .. }: Signed<SiteKey>,
) -> Result<axum::Json<()>, Refusal> {
    let claim: MeshClaim = json(&body)?;
    if hub.claim_mesh(who.address, claim).await {
        Ok(axum::Json(()))
    } else {
        Err(refuse(StatusCode::NOT_FOUND, "this hub runs no mesh"))
    }
}

/// The asking site's peer map: who it is comes from the tunnel address the
/// request came from, which only its key can send from.
async fn mesh_map(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<axum::Json<SignedMap>, Refusal> {
    let src = source(peer);
    if !hub.is_site(src).await {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            format!("{src} is not an admitted site"),
        ));
    }
    hub.mesh_map(src)
        .await
        .map(axum::Json)
        .ok_or_else(|| refuse(StatusCode::NOT_FOUND, "this hub runs no mesh"))
}

async fn pong(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<&'static str, Refusal> {
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
    let metrics = hub.metrics();
    Router::new()
        .route(REDEEM, post(redeem))
        .route(REGISTER, post(register))
        .route(RELEASE, post(release))
        .route(LEAVE, post(leave))
        .route(PING, get(pong))
        .route(ROUTES, get(routes).post(advertise))
        .route(MESH, get(mesh_map).post(claim_mesh))
        .with_state(hub)
        .layer(axum::middleware::map_response(
            move |res: axum::response::Response| {
                let metrics = metrics.clone();
                async move {
                    // Refusals by reason: the status says which.
                    let s = res.status();
                    if s.is_client_error() || s.is_server_error() {
                        let reason = s
                            .canonical_reason()
                            .unwrap_or("other")
                            .to_ascii_lowercase()
                            .replace(' ', "_");
                        metrics.refused(&reason);
                    }
                    res
                }
            },
        ))
        .layer(axum::middleware::from_fn_with_state(
            LogRate::shared(REFUSAL_LOG_EVERY),
            log_refusal,
        ))
}

/// At most one line per source and status in this long: a peer can make
/// the hub refuse thousands of requests a second.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Logs every refusal (4xx) of the API in one place, so that none goes
/// unlogged (a handler's own 403 or 429 included), each source's kind at a
/// bounded rate.
async fn log_refusal(
    State(rate): State<crate::lograte::Shared<(IpAddr, u16)>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let Some(src) = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| source(c.0))
    else {
        return next.run(req).await;
    };
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let res = next.run(req).await;
    let status = res.status();
    if !status.is_client_error() {
        return res;
    }
    let now = std::time::Instant::now();
    let Some(write) = rate
        .lock()
        .expect("log rate lock")
        .admit((src, status.as_u16()), now)
    else {
        return res;
    };
    // The reason is in the refusal's body; it is small and ours.
    let (parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let reason = serde_json::from_slice::<ErrorBody>(&bytes)
        .map(|b| b.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
    tracing::warn!("refused {method} {path} from {src}: {status}: {reason}{write}");
    axum::response::Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// Binds the API on the hub's tunnel address, for connections that arrive
/// on the tunnel interface only.
pub fn bind(addr: SocketAddr, iface: &str) -> Result<tokio::net::TcpListener, ControlError> {
    control::server::bind_on_device(addr, iface).map_err(|source| ControlError::Bind {
        addr: format!("{addr} on {iface}"),
        source,
    })
}

/// The peer that carries traffic from `ip`: the site whose LAN holds it
/// (longest prefix), else the address itself.
fn owner_of(routes: &[Advertised], ip: IpAddr) -> IpAddr {
    routes
        .iter()
        .filter(|r| r.prefix.contains(ip))
        .max_by_key(|r| r.prefix.prefix())
        .map_or(ip, |r| r.via)
}

/// Serves the API until `shutdown` completes. Connections are bounded per
/// peer: those from a site's LAN count as that site's.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: Arc<Hub>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let routes = hub.routes();
    let owner: control::server::Owner = Arc::new(move |ip| owner_of(&routes.borrow(), ip));
    control::server::serve_owned(
        listener,
        router(hub),
        control::server::TUNNEL,
        owner,
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests;
