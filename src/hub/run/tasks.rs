//! What a running hub does beside answering requests: it greets its peers
//! after a restart, tells sites when the advertised LANs change, and keeps
//! its DNS zone equal to its state.

use crate::control::CONTROL_PORT;
use crate::control::tunnel::ROUTES_POKE;
use crate::hub::Hub;
use crate::state::ServerState;
use crate::transport::is_virtual;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// After a restart, peers' sessions are gone on this side only; they would
/// notice after their rekey timeout (~15 s). A packet to each peer seen
/// before makes this side handshake with it now.
pub async fn nudge_known_peers(server_ip: IpAddr, state: &ServerState) {
    let Ok(sock) = tokio::net::UdpSocket::bind(SocketAddr::new(server_ip, 0)).await else {
        return;
    };
    // Sites on a WebSocket reconnect by themselves.
    for p in state
        .peers
        .iter()
        .filter(|p| p.endpoint.is_some_and(|e| !is_virtual(&e)))
    {
        // The discard port: the packet only has to enter the tunnel.
        let _ = sock.send_to(b"", SocketAddr::new(p.address, 9)).await;
    }
}

/// Tells every site when the advertised LANs change: a datagram to its
/// control port, through the tunnel, after which it asks for them.
pub async fn poke_sites(
    hub: Arc<Hub>,
    server_ip: IpAddr,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut routes = hub.routes();
    let mut mesh = hub.mesh().map(|m| m.serial());
    let mut last_poke = std::time::Instant::now();
    tokio::pin!(stop);
    let sock = match tokio::net::UdpSocket::bind(SocketAddr::new(server_ip, 0)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("sites will learn route changes within a minute only: {e}");
            return stop.await;
        }
    };
    // At start, a datagram to every peer, sites and their containers: with
    // no session yet, it makes the device start a handshake with each at
    // its saved endpoint, so that a restarted hub is back with all of them
    // at once. Otherwise a site's container, whose side still holds the old
    // session, waits out WireGuard's 15 s before it starts one itself.
    for p in hub.snapshot().await.peers {
        let to = SocketAddr::new(p.address, CONTROL_PORT);
        if let Err(e) = sock.send_to(ROUTES_POKE, to).await {
            tracing::debug!("greeting {to}: {e}");
        }
    }
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = routes.changed() => if r.is_err() { return stop.await },
            r = async {
                match &mut mesh {
                    Some(m) => m.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if r.is_err() { return stop.await }
                // Changes come in bursts (a site claims, then its endpoint
                // shows; a hundred sites join at once): one poke for the
                // burst, and at most two a second, each making every site
                // ask for its map.
                // Every poke costs each site a map of all the others: with
                // many sites, fewer pokes (a second apart at 100 sites).
                let sites = hub.mesh().map_or(0, |m| m.sites()) as u64;
                let every = std::time::Duration::from_millis(500.max(10 * sites));
                let since = last_poke.elapsed();
                let wait = std::time::Duration::from_millis(100).max(every.saturating_sub(since));
                tokio::time::sleep(wait).await;
                last_poke = std::time::Instant::now();
                if let Some(m) = &mut mesh {
                    m.borrow_and_update();
                }
            }
        }
        let state = hub.snapshot().await;
        for p in state.peers.iter().filter(|p| p.via.is_none()) {
            let to = SocketAddr::new(p.address, CONTROL_PORT);
            if let Err(e) = sock.send_to(ROUTES_POKE, to).await {
                tracing::debug!("telling {to} about new routes: {e}");
            }
        }
    }
}

/// Keeps the DNS zone equal to the hub's state: rebuilt on every change.
pub async fn follow_names(
    hub: Arc<Hub>,
    origin: hickory_proto::rr::Name,
    zone: tokio::sync::watch::Sender<Arc<crate::dns::Zone>>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut changes = hub.changes();
    tokio::pin!(stop);
    loop {
        let state = hub.snapshot().await;
        let z = crate::dns::Zone::from_state(&state, &origin);
        tracing::debug!("DNS zone {origin}: {} names", z.len());
        zone.send_replace(Arc::new(z));
        tokio::select! {
            _ = &mut stop => return,
            r = changes.changed() => if r.is_err() { return stop.await },
        }
    }
}
