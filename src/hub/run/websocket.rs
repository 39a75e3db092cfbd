//! The hub's WebSocket side, prepared before the host is touched: the
//! listener bound (so a port in use is refused up front), the secret path
//! made or reused, the certificate made or loaded.

use super::{HubConfig, ServeError};
use crate::state::ServerState;
use crate::store::StateDir;
use crate::transport::tls::Identity;
use crate::transport::{Relay, TransportError, WsOffer, WsTarget};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::net::SocketAddr;
use std::sync::Arc;

/// The WebSocket side of a hub: its listener and how tokens offer it.
pub struct WebSocket {
    pub listener: tokio::net::TcpListener,
    pub relay: Arc<Relay>,
    pub path: String,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub offer: WsOffer,
}

impl WebSocket {
    /// The TCP port the firewall opens for it.
    pub fn port(&self) -> Option<u16> {
        self.listener.local_addr().ok().map(|a| a.port())
    }
}

/// The public URL's `scheme://host[:port]` and path prefix.
pub fn public_url(text: &str) -> Result<(String, String), ServeError> {
    let bad = |why: &str| ServeError::Input(format!("--public-url {text:?}: {why}"));
    let u = url::Url::parse(text).map_err(|e| bad(&e.to_string()))?;
    if !matches!(u.scheme(), "ws" | "wss") {
        return Err(bad("use a ws:// or wss:// URL"));
    }
    let host = u.host_str().ok_or_else(|| bad("no host"))?;
    if u.query().is_some() || u.fragment().is_some() || !u.username().is_empty() {
        return Err(bad("no query, fragment or user, please"));
    }
    let base = match u.port() {
        Some(p) => format!("{}://{host}:{p}", u.scheme()),
        None => format!("{}://{host}", u.scheme()),
    };
    Ok((base, u.path().trim_end_matches('/').to_owned()))
}

/// Binds `--wss-listen`; without IPv6 here, the IPv4 wildcard instead.
async fn bind(at: SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    let listener = match crate::transport::ws::bind(at).await {
        Err(TransportError::Connect { source, .. })
            if source.kind() == std::io::ErrorKind::AddrNotAvailable && at.is_ipv6() =>
        {
            crate::transport::ws::bind(SocketAddr::from(([0, 0, 0, 0], at.port()))).await
        }
        other => other,
    };
    listener.map_err(|e| match e {
        TransportError::Connect { source, .. }
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            ServeError::Input(format!(
                "TCP port {} (--wss-listen) is already in use",
                at.port()
            ))
        }
        other => other.into(),
    })
}

/// The certificate's name: the host of `--endpoint`, else "tunnel".
fn certificate_name(endpoint: Option<&str>) -> String {
    endpoint
        .and_then(|e| e.rsplit_once(':').map(|(h, _)| h).or(Some(e)))
        .unwrap_or("tunnel")
        .trim_matches(|c| c == '[' || c == ']')
        .to_owned()
}

/// Prepares the WebSocket transport, when `--transport` asks for it.
pub async fn prepare(
    config: &HubConfig,
    state: &mut ServerState,
    store: &StateDir,
) -> Result<Option<WebSocket>, ServeError> {
    let t = config.transport;
    if !t.websocket() {
        if config.public_url.is_some() {
            return Err(ServeError::Input(
                "--public-url is for the WebSocket transport; add --transport udp,ws or udp,wss"
                    .into(),
            ));
        }
        return Ok(None);
    }
    let prefix = config.public_url.as_deref().map(public_url).transpose()?;
    let secret = state
        .websocket_secret
        .get_or_insert_with(|| {
            let mut b = [0u8; 18];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
            URL_SAFE_NO_PAD.encode(b)
        })
        .clone();
    let path = format!(
        "{}/{secret}",
        prefix.as_ref().map_or("/tunnel", |(_, p)| p.as_str())
    );
    let listener = bind(config.wss_listen).await?;
    let local = listener
        .local_addr()
        .map_err(|e| ServeError::Io("the WebSocket listener", e))?;
    let tls = if t.wss {
        store.ensure()?;
        let names = vec![certificate_name(config.endpoint.as_deref())];
        let id = Identity::load_or_create(&store.certificate(&config.iface), names)?;
        let acceptor = id.acceptor().map_err(ServeError::Tls)?;
        Some((acceptor, id.fingerprint()))
    } else {
        None
    };
    let target = match (&prefix, &tls) {
        (Some((base, _)), _) => WsTarget::Url { base: base.clone() },
        (None, Some((_, sha256))) => WsTarget::Pinned {
            port: local.port(),
            sha256: *sha256,
        },
        (None, None) => WsTarget::Plain { port: local.port() },
    };
    tracing::info!(
        "WebSocket ({}) on TCP {local}{}",
        if t.wss { "TLS" } else { "plain" },
        match &prefix {
            Some((base, prefix)) => format!(", reached as {base}{prefix}/…"),
            None => String::new(),
        }
    );
    Ok(Some(WebSocket {
        listener,
        relay: Relay::new(if t.wss { "wss" } else { "ws" }),
        offer: WsOffer {
            target,
            path: path.clone(),
        },
        path,
        tls: tls.map(|(a, _)| a),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_url_gives_its_base_and_path() {
        let (base, path) = public_url("wss://vpn.example.org:8443/tunnel/").unwrap();
        assert_eq!(base, "wss://vpn.example.org:8443");
        assert_eq!(path, "/tunnel");
        assert_eq!(public_url("ws://h").unwrap(), ("ws://h".into(), "".into()));
    }

    #[test]
    fn a_public_url_that_is_not_a_websocket_is_refused() {
        for bad in ["https://h/x", "wss://u@h/x", "wss://h/x?q=1", "not a url"] {
            assert!(
                matches!(public_url(bad), Err(ServeError::Input(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_certificate_is_named_after_the_endpoint_host() {
        assert_eq!(
            certificate_name(Some("vpn.example.org:443")),
            "vpn.example.org"
        );
        assert_eq!(certificate_name(Some("[fd00::1]:443")), "fd00::1");
        assert_eq!(certificate_name(Some("host")), "host");
        assert_eq!(certificate_name(None), "tunnel");
    }
}
