//! The hub's WebSocket listener: axum over hyper, with or without TLS,
//! within [`Limits`]: a connection waits for a place in the total, is
//! closed at once when its source has none left, and has
//! [`Limits::handshake`] to become a WebSocket; a link is pinged and
//! closed when nothing comes back.

use super::limits::{Admission, Limits, Pass, Sources};
use super::pump::{MAX_MESSAGE, pump};
use super::wrong_paths::WrongPaths;
use crate::transport::{Relay, TransportError};
use axum::Router;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tower::ServiceExt;

/// A hub link's read buffer. tungstenite's default (128 KiB) is resident
/// from the first read on, and made a link cost about 150 KB, idle or not;
/// 16 KiB still takes a dozen full-size datagrams per read.
const HUB_READ_BUFFER: usize = 16 * 1024;
/// Requests for other paths are summed up in one log line this often.
const WRONG_PATHS_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct Hub {
    relay: Arc<Relay>,
    limits: Limits,
    wrong: Arc<WrongPaths>,
}

async fn upgrade(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    axum::Extension(pass): axum::Extension<Pass>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> impl IntoResponse {
    let admission = pass.take();
    let limits = hub.limits;
    // A reverse proxy on this host says whom it forwards for; nobody
    // else is believed.
    // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let source = match forwarded_for(&headers) {
        Some(ip) if peer.ip().is_loopback() => SocketAddr::new(ip.to_canonical(), 0),
        _ => peer,
    };
    ws.max_message_size(MAX_MESSAGE)
        .read_buffer_size(HUB_READ_BUFFER)
        .on_upgrade(move |socket: WebSocket| async move {
            let _admission = admission;
            let (addr, outbound) = hub.relay.open(Some(source));
            tracing::debug!("WebSocket link from {peer} as {addr}");
            pump(
                socket,
                &hub.relay,
                addr,
                outbound,
                Some(limits.ping_every),
                Some(limits.idle),
            )
            .await;
            hub.relay.close(&addr);
            tracing::debug!("WebSocket link from {peer} closed");
        })
}

async fn not_found(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: axum::http::Uri,
) -> impl IntoResponse {
    if let Some(line) = hub.wrong.note(peer, uri.path(), Instant::now()) {
        tracing::info!("{line}");
    }
    (axum::http::StatusCode::NOT_FOUND, "not found\n")
}

/// Whom a reverse proxy forwards the request for: the last address of
/// `X-Forwarded-For` (the one that proxy added), else `X-Real-IP`, else
/// the last `for=` of RFC 7239's `Forwarded`.
fn forwarded_for(headers: &axum::http::HeaderMap) -> Option<std::net::IpAddr> {
    let last = |name: &str| -> Option<String> {
        let all: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        all.join(",")
            .rsplit(',')
            .map(str::trim)
            .find(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let parse = |s: &str| -> Option<std::net::IpAddr> {
        let s = s.trim().trim_matches('"');
        if let Ok(ip) = s.parse() {
            return Some(ip);
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Some(sa.ip());
        }
        // `[2001:db8::1]` without a port.
        s.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
    };
    if let Some(ip) = last("x-forwarded-for").as_deref().and_then(parse) {
        return Some(ip);
    }
    if let Some(ip) = last("x-real-ip").as_deref().and_then(parse) {
        return Some(ip);
    }
    let forwarded = last("forwarded")?;
    forwarded
        .split(';')
        .find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            k.trim().eq_ignore_ascii_case("for").then_some(v)
        })
        .and_then(parse)
}

/// Binds the hub's WebSocket listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, TransportError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| TransportError::Connect {
            target: format!("listening on {addr}"),
            source,
        })
}

/// Serves WebSocket links on `path` until `shutdown`, within
/// [`Limits::hub`]: TLS first when `tls` is given; any other path gets a
/// 404.
pub async fn serve(
    listener: TcpListener,
    relay: Arc<Relay>,
    path: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    serve_within(listener, relay, path, tls, Limits::hub(), shutdown).await
}

/// [`serve`] within `limits`.
pub async fn serve_within(
    listener: TcpListener,
    relay: Arc<Relay>,
    path: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    tracing::debug!("WebSocket listener: {limits:?}");
    let wrong = Arc::new(WrongPaths::new(&path, WRONG_PATHS_EVERY));
    let app = Router::new()
        .route(&path, get(upgrade))
        .fallback(not_found)
        .with_state(Hub {
            relay,
            limits,
            wrong: wrong.clone(),
        });
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.total));
    let sources = Sources::default();
    let mut conns = tokio::task::JoinSet::new();
    conns.spawn(async move {
        loop {
            tokio::time::sleep(WRONG_PATHS_EVERY / 4).await;
            if let Some(line) = wrong.summary(Instant::now()) {
                tracing::info!("{line}");
            }
        }
    });
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => p.expect("never closed"),
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("WebSocket listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let Some(slot) = sources.take(peer.ip(), &limits) else {
            tracing::debug!(
                "WebSocket listener: closing a connection from {peer}: its address has all its places"
            );
            continue;
        };
        let pass = Pass(Arc::new(Mutex::new(Some(Admission {
            _permit: permit,
            _slot: slot,
        }))));
        let _ = tcp.set_nodelay(true);
        conns.spawn(handshake(app.clone(), tls.clone(), tcp, peer, pass, limits));
    }
    conns.shutdown().await;
}

/// Serves one accepted connection until hyper hands its upgraded socket
/// over, within [`Limits::handshake`]; `pass` goes to the handler, so the
/// link keeps the connection's places.
async fn handshake(
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    pass: Pass,
    limits: Limits,
) {
    let held = pass.clone();
    let svc = app.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(held.clone());
        req
    });
    let http = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake)
        .to_owned();
    // The connection's future ends when hyper hands an upgraded
    // socket over, so this bounds everything before the upgrade
    // (requests kept alive included) and nothing after it.
    let serve = async {
        match tls {
            Some(acceptor) => match acceptor.accept(tcp).await {
                Ok(stream) => {
                    http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                        .with_upgrades()
                        .await
                }
                Err(e) => {
                    tracing::debug!("TLS from {peer}: {e}");
                    Ok(())
                }
            },
            None => {
                http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(svc))
                    .with_upgrades()
                    .await
            }
        }
    };
    match tokio::time::timeout(limits.handshake, serve).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("WebSocket connection from {peer}: {e}"),
        Err(_) => tracing::debug!(
            "WebSocket connection from {peer}: no upgrade within {:?}",
            limits.handshake
        ),
    }
}

#[cfg(test)]
mod forwarded_tests {
    use super::forwarded_for;
    use axum::http::HeaderMap;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_nearest_proxys_word_is_taken_in_each_header_spelling() {
        let ip = |s: &str| Some(s.parse().unwrap());
        // The last X-Forwarded-For entry is the one our proxy added.
        let h = headers(&[("x-forwarded-for", "198.51.100.9, 203.0.113.7")]);
        assert_eq!(forwarded_for(&h), ip("203.0.113.7"));
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.9"),
            ("x-forwarded-for", "203.0.113.8"),
        ]);
        assert_eq!(forwarded_for(&h), ip("203.0.113.8"));
        assert_eq!(
            forwarded_for(&headers(&[("x-real-ip", "2001:db8::7")])),
            ip("2001:db8::7")
        );
        let h = headers(&[(
            "forwarded",
            r#"for=192.0.2.1, for="[2001:db8::1]:4711";proto=https"#,
        )]);
        assert_eq!(forwarded_for(&h), ip("2001:db8::1"));
        assert_eq!(
            forwarded_for(&headers(&[("forwarded", "for=unknown")])),
            None
        );
        assert_eq!(forwarded_for(&HeaderMap::new()), None);
        assert_eq!(
            forwarded_for(&headers(&[("x-forwarded-for", "not an address")])),
            None
        );
    }
}
