//! How a joining site chooses its path to the hub: UDP when it gets a
//! handshake within a short bound, else WebSocket direct, else through a
//! proxy, staggered.

use super::join::Invitation;
use super::{Progress, Route, SiteError};
use crate::control::{CONTROL_PORT, tunnel};
use crate::net::NetOps;
use crate::transport::ws::{Connection, Dialer};
use crate::transport::{Relay, WS_MTU};
use crate::wg::{WgDevice, WgError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long UDP gets to complete a handshake before `auto` tries WebSocket.
const UDP_BOUND: Duration = Duration::from_millis(1000);
/// After this long without a direct WebSocket, the proxy is tried too.
const STAGGER: Duration = Duration::from_millis(300);

/// Chooses the path: UDP when it gets a handshake within a short bound
/// (or is the only one), else WebSocket direct, else through the proxy.
/// The device must have been made with `relay` when WebSocket is possible.
pub async fn choose_path(
    inv: &Invitation<'_>,
    device: &dyn WgDevice,
    relay: Option<&Arc<Relay>>,
    net: &dyn NetOps,
    progress: &dyn Progress,
    deadline: Instant,
) -> Result<Route, SiteError> {
    let mtu = inv.initial_mtu();
    if !inv.websocket() {
        return Ok(Route::udp(inv.endpoint, mtu));
    }
    if inv.udp() {
        progress.step(&format!("trying UDP to {}", inv.endpoint));
        let api = SocketAddr::new(inv.token.server_address, CONTROL_PORT);
        let until = (Instant::now() + UDP_BOUND).min(deadline);
        while Instant::now() < until {
            // Any packet starts a handshake; the ping's answer is not needed.
            let _ = tunnel::ping(api, Duration::from_millis(100)).await;
            if device
                .peers()
                .await?
                .iter()
                .any(|p| p.last_handshake.is_some())
            {
                return Ok(Route::udp(inv.endpoint, mtu));
            }
        }
        tracing::info!("no WireGuard handshake over UDP within {UDP_BOUND:?}; trying WebSocket");
    }
    let relay = relay.expect("a relay when WebSocket is possible").clone();
    let dialers = inv.dialers()?;
    progress.step(&format!("connecting to {}", dialers[0].shown()));
    let (i, conn) = first_connection(&dialers, deadline).await?;
    let offer = inv.token.websocket.clone().expect("checked above");
    let mtu = inv.mtu.unwrap_or(WS_MTU);
    let route = Route::websocket(offer, dialers[i].clone(), relay, Some(conn), mtu);
    // A fresh peer with the link's address: the next packet handshakes at
    // once instead of waiting out a UDP attempt's retry timer.
    device.remove_peer(&inv.token.server_public_key).await?;
    device.upsert_peer(&inv.hub(route.endpoint)).await?;
    if mtu != inv.initial_mtu() {
        net.set_mtu(inv.iface, mtu).await.map_err(WgError::from)?;
    }
    Ok(route)
}

/// The first dialer to connect; a later one starts when the earlier has
/// failed or has taken longer than [`STAGGER`].
async fn first_connection(
    dialers: &[Arc<Dialer>],
    deadline: Instant,
) -> Result<(usize, Connection), SiteError> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut running = FuturesUnordered::new();
    let attempt = |i: usize| {
        let d = dialers[i].clone();
        async move {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(500));
            (i, d.connect(left).await)
        }
    };
    let mut next = 1;
    running.push(attempt(0));
    let mut errors = Vec::new();
    loop {
        let stagger = tokio::time::sleep(STAGGER);
        tokio::pin!(stagger);
        tokio::select! {
            done = running.next() => match done {
                Some((i, Ok(conn))) => return Ok((i, conn)),
                Some((i, Err(e))) => {
                    tracing::info!("WebSocket via {}: {e}", dialers[i].shown());
                    if e.is_input() {
                        return Err(e.into());
                    }
                    errors.push(format!("{}{}: {e}", dialers[i].shown(), dialers[i].proxy().map(|p| format!(" via {p:?}")).unwrap_or_default()));
                    if next < dialers.len() {
                        running.push(attempt(next));
                        next += 1;
                    } else if running.is_empty() {
                        return Err(SiteError::NoPath(errors.join("; ")));
                    }
                }
                None => return Err(SiteError::NoPath(errors.join("; "))),
            },
            _ = &mut stagger, if next < dialers.len() => {
                running.push(attempt(next));
                next += 1;
            }
        }
    }
}
