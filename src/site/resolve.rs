//! The server's address as the user gives it (`HOST[:PORT]`), resolved.

use super::SiteError;
use std::net::{IpAddr, SocketAddr};

/// `HOST`, `HOST:PORT`, `IPv6` or `[IPv6]:PORT`, resolved to one address;
/// whatever is wrong with it is the input's fault.
pub async fn resolve(server: &str, default_port: u16) -> Result<SocketAddr, SiteError> {
    if let Ok(sa) = server.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = server
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<IpAddr>()
    {
        return Ok(SocketAddr::new(ip, default_port));
    }
    let (host, port) = match server.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| SiteError::input(format!("{server:?}: {p:?} is not a port")))?;
            (h, port)
        }
        _ => (server, default_port),
    };
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
    if !valid {
        return Err(SiteError::input(format!("{server:?} is not HOST[:PORT]")));
    }
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| SiteError::input(format!("cannot resolve {host}: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| SiteError::input(format!("{host} has no address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn server_address_forms() {
        assert_eq!(
            resolve("192.0.2.1", 51820).await.unwrap().to_string(),
            "192.0.2.1:51820"
        );
        assert_eq!(
            resolve("192.0.2.1:1234", 51820).await.unwrap().to_string(),
            "192.0.2.1:1234"
        );
        assert_eq!(
            resolve("fd00::1", 5).await.unwrap().to_string(),
            "[fd00::1]:5"
        );
        assert_eq!(
            resolve("[fd00::1]:7", 5).await.unwrap().to_string(),
            "[fd00::1]:7"
        );
        assert_eq!(resolve("localhost:9", 5).await.unwrap().port(), 9);
        for bad in ["", "a b", "host:0", "host:x", "192.0.2.1:99999"] {
            let e = resolve(bad, 5).await.unwrap_err();
            assert!(e.is_input(), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn bad_addresses_say_what_is_wrong_in_one_line() {
        let e = resolve("host:x", 5).await.unwrap_err();
        assert_eq!(e.to_string(), r#""host:x": "x" is not a port"#);
        let e = resolve("a b", 5).await.unwrap_err();
        assert_eq!(e.to_string(), r#""a b" is not HOST[:PORT]"#);
        assert!(std::error::Error::source(&e).is_none());
    }
}
