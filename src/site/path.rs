//! How a joining site reaches the hub: UDP when it gets a handshake
//! within a short bound, else one of the WebSocket ways (direct, then
//! through a proxy), staggered; the timing is the join machine's
//! machine's, the ways and the switch to one are here.

use super::invitation::Invitation;
use super::machine::Way;
use super::{Route, SiteError};
use crate::net::NetOps;
use crate::transport::proxy::Proxy;
use crate::transport::ws::{Connection, Dialer};
use crate::transport::{Path, Relay, WS_MTU};
use crate::wg::{WgDevice, WgError};
use std::sync::Arc;

/// The WebSocket dialers to try, in order: direct, then through the
/// environment's proxy (`HTTPS_PROXY`/`HTTP_PROXY`, unless NO_PROXY
/// exempts the server). An explicit `--proxy` is the only way tried.
pub(super) fn dialers(inv: &Invitation<'_>) -> Result<Vec<Arc<Dialer>>, SiteError> {
    let Some(offer) = &inv.token.websocket else {
        return Ok(vec![]);
    };
    let host = inv.endpoint.ip().to_string();
    if let Some(flag) = inv.proxy {
        let proxy = Proxy::parse(flag)?.trusting(inv.proxy_ca);
        return Ok(vec![Arc::new(Dialer::new(offer, &host, Some(proxy))?)]);
    }
    let direct = Dialer::new(offer, &host, None)?;
    let tls = direct.url().starts_with("wss:");
    let proxy = Proxy::for_target(None, direct.host(), tls, |k| std::env::var(k).ok())?
        .map(|p| p.trusting(inv.proxy_ca));
    let mut out = vec![Arc::new(direct)];
    if let Some(p) = proxy {
        out.push(Arc::new(Dialer::new(offer, &host, Some(p))?));
    }
    Ok(out)
}

/// A dialer as the join machine names it.
pub(super) fn way(inv: &Invitation<'_>, dialer: &Dialer) -> Way {
    let offer = inv
        .token
        .websocket
        .clone()
        .expect("a dialer comes from an offer");
    let path = Path::Websocket {
        offer,
        proxy: dialer.proxy().map(|p| p.url.clone()),
        proxy_ca: dialer.proxy().and_then(|p| p.ca.clone()),
    };
    Way {
        shown: dialer.shown(),
        named: format!(
            "{}{}",
            dialer.shown(),
            dialer
                .proxy()
                .map(|p| format!(" via {p:?}"))
                .unwrap_or_default()
        ),
        path: path.to_string(),
    }
}

/// The device's datagrams go over `dialer`'s WebSocket from now on, `conn`
/// its first connection. The device must have been made with `relay`.
pub(super) async fn use_link(
    inv: &Invitation<'_>,
    device: &dyn WgDevice,
    net: &dyn NetOps,
    relay: &Arc<Relay>,
    dialer: Arc<Dialer>,
    conn: Option<Connection>,
) -> Result<Route, SiteError> {
    let offer = inv
        .token
        .websocket
        .clone()
        .expect("a dialer comes from an offer");
    let mtu = inv.mtu.unwrap_or(WS_MTU);
    let route = Route::websocket(offer, dialer, relay.clone(), conn, mtu);
    // A fresh peer with the link's address: the next packet handshakes at
    // once instead of waiting out a UDP attempt's retry timer.
    device.remove_peer(&inv.token.server_public_key).await?;
    device.upsert_peer(&inv.hub(route.endpoint)).await?;
    if mtu != inv.initial_mtu() {
        net.set_mtu(inv.iface, mtu).await.map_err(WgError::from)?;
    }
    Ok(route)
}
