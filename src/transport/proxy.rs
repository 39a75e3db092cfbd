//! HTTP proxies: which one (`--proxy`, else `HTTPS_PROXY`/`HTTP_PROXY`
//! and their lowercase forms, minus `NO_PROXY`), and a tunnel through it
//! with HTTP CONNECT, with Basic auth from the URL's user and password.
//! An `https://` proxy is spoken to over TLS, checked against the
//! system's roots and `--proxy-ca`.

use super::TransportError;
pub use crate::reach::redact;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::net::IpAddr;

/// An HTTP proxy, `http[s]://[user:pass@]host[:port]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    /// `https://`: TLS to the proxy itself.
    pub tls: bool,
    /// A CA file the proxy's certificate may chain to, beside the
    /// system's roots (`--proxy-ca`).
    pub ca: Option<std::path::PathBuf>,
    /// `Basic ...` for `Proxy-Authorization`.
    auth: Option<String>,
    /// As given, for saving with the site (it may hold a password: the
    /// state file is 0600).
    pub url: String,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proxy({})", redact(&self.url))
    }
}

impl Proxy {
    pub fn parse(text: &str) -> Result<Self, TransportError> {
        let bad = |why: &str| TransportError::BadUrl {
            what: "proxy",
            url: redact(text),
            why: why.to_owned(),
        };
        // `host:port` without a scheme is common in the environment.
        let full = if text.contains("://") {
            text.to_owned()
        } else {
            format!("http://{text}")
        };
        let u = url::Url::parse(&full).map_err(|e| bad(&e.to_string()))?;
        let tls = match u.scheme() {
            "http" => false,
            "https" => true,
            _ => return Err(bad("a proxy URL is http:// or https://")),
        };
        let host = u
            .host_str()
            .ok_or_else(|| bad("no host"))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned();
        let port = u.port().unwrap_or(if tls { 443 } else { 80 });
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let auth = (!u.username().is_empty()).then(|| {
            let creds = format!(
                "{}:{}",
                decode(u.username()),
                decode(u.password().unwrap_or(""))
            );
            format!("Basic {}", STANDARD.encode(creds))
        });
        Ok(Self {
            host,
            port,
            tls,
            ca: None,
            auth,
            url: text.to_owned(),
        })
    }

    /// The same proxy, its certificate also checked against `ca`.
    pub fn trusting(mut self, ca: Option<&std::path::Path>) -> Self {
        self.ca = ca.map(std::path::Path::to_owned);
        self
    }

    /// The proxy for `target_host`: `flag` if given, else the environment
    /// (`https_proxy` for TLS, `http_proxy` for plain WebSocket), unless
    /// `NO_PROXY` exempts the host.
    pub fn for_target(
        flag: Option<&str>,
        target_host: &str,
        tls: bool,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, TransportError> {
        if let Some(f) = flag {
            return Self::parse(f).map(Some);
        }
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| env(n).filter(|v| !v.trim().is_empty()))
        };
        let chosen = if tls {
            var(&["HTTPS_PROXY", "https_proxy"])
        } else {
            var(&["HTTP_PROXY", "http_proxy"])
        };
        let Some(url) = chosen else {
            return Ok(None);
        };
        if let Some(no) = var(&["NO_PROXY", "no_proxy"])
            && exempt(&no, target_host)
        {
            return Ok(None);
        }
        Self::parse(&url).map(Some)
    }

    /// Opens a TCP connection to the proxy and asks it for a tunnel to
    /// `host:port`. The stream then carries the connection to the target.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, TransportError> {
        let proxy = format!("{}:{}", self.host, self.port);
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| TransportError::Connect {
                target: format!("proxy {proxy}"),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let stream: Box<dyn Stream> = if self.tls {
            Box::new(self.tls_to_proxy(stream, &proxy).await?)
        } else {
            Box::new(stream)
        };
        let http = |e: hyper::Error| TransportError::Connect {
            target: format!("proxy {proxy}"),
            source: std::io::Error::other(e),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(conn.with_upgrades());
        let mut req = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri(&target)
            .header(hyper::header::HOST, &target);
        if let Some(a) = &self.auth {
            req = req.header(hyper::header::PROXY_AUTHORIZATION, a);
        }
        let req = req.body(Empty::<Bytes>::new()).expect("a valid request");
        let resp = sender.send_request(req).await.map_err(http)?;
        if !resp.status().is_success() {
            return Err(TransportError::ProxyRefused {
                proxy: redact(&self.url),
                target,
                status: refusal(resp.status(), self.auth.is_some()),
            });
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(http)?;
        Ok(TokioIo::new(upgraded))
    }

    /// TLS to the proxy itself, its certificate checked against the
    /// system's roots and `--proxy-ca`.
    async fn tls_to_proxy(
        &self,
        tcp: tokio::net::TcpStream,
        shown: &str,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, TransportError> {
        let trust = match &self.ca {
            Some(ca) => super::tls::Trust::RootsAnd(ca.clone()),
            None => super::tls::Trust::Roots,
        };
        let name = rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
            TransportError::BadUrl {
                what: "proxy",
                url: redact(&self.url),
                why: e.to_string(),
            }
        })?;
        trust
            .connector()?
            .connect(name, tcp)
            .await
            .map_err(|source| TransportError::Tls {
                target: format!("the proxy {shown} (https://; its certificate is checked against the system's roots and --proxy-ca)"),
                source,
            })
    }
}

/// What the stream to the proxy is: plain TCP, or TLS over it.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// What a proxy's refusal means, in the words of its status.
fn refusal(status: hyper::StatusCode, had_credentials: bool) -> String {
    match status.as_u16() {
        407 if had_credentials => format!(
            "{status}: it does not take the user and password in the proxy URL (Basic); NTLM and Negotiate are not supported"
        ),
        407 => format!(
            "{status}: it wants a login; put it in the proxy URL (user:password@ before the host)"
        ),
        403 => format!("{status}: its rules forbid this destination or port"),
        _ => status.to_string(),
    }
}

/// Whether `NO_PROXY` (comma-separated hosts, `.domain` or `domain`
/// suffixes, IP addresses, CIDR blocks, or `*`) exempts `host`.
pub fn exempt(no_proxy: &str, host: &str) -> bool {
    let host = host
        .trim_matches(|c| c == '[' || c == ']')
        .to_ascii_lowercase();
    let ip: Option<IpAddr> = host.parse().ok();
    no_proxy
        .split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .any(|e| {
            if e == "*" {
                return true;
            }
            // An entry may carry a port; the port does not matter here.
            let e = match e.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => h.to_owned(),
                _ => e,
            };
            if let (Some(ip), Ok(net)) = (ip, e.parse::<ipnetwork::IpNetwork>()) {
                return net.contains(ip);
            }
            let bare = e.trim_start_matches('.');
            host == bare || host.ends_with(&format!(".{bare}"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn proxy_urls() {
        let p = Proxy::parse("http://alice:s%40cret@proxy.lan:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.lan", 3128));
        assert_eq!(
            p.auth.as_deref(),
            Some(format!("Basic {}", STANDARD.encode("alice:s@cret")).as_str())
        );
        assert!(!format!("{p:?}").contains("s%40cret"));
        assert_eq!(redact("http://a:b@h:1"), "http://a:***@h:1/");
        let bare = Proxy::parse("10.0.0.1:8080").unwrap();
        assert_eq!(
            (bare.host.as_str(), bare.port, bare.auth),
            ("10.0.0.1", 8080, None)
        );
        let tls = Proxy::parse("https://proxy.corp").unwrap();
        assert_eq!(
            (tls.host.as_str(), tls.port, tls.tls),
            ("proxy.corp", 443, true)
        );
        assert!(!bare.tls);
        assert!(Proxy::parse("socks5://proxy:1080").is_err());
        assert!(Proxy::parse("http://").is_err());
    }

    #[test]
    fn a_refusal_says_what_the_proxy_wants() {
        use hyper::StatusCode as S;
        assert!(refusal(S::PROXY_AUTHENTICATION_REQUIRED, false).contains("wants a login"));
        assert!(
            refusal(S::PROXY_AUTHENTICATION_REQUIRED, true)
                .contains("NTLM and Negotiate are not supported")
        );
        assert!(refusal(S::FORBIDDEN, false).starts_with("403 Forbidden: its rules forbid"));
        assert_eq!(refusal(S::BAD_GATEWAY, false), "502 Bad Gateway");
    }

    #[test]
    fn the_environment_picks_the_proxy_and_no_proxy_exempts() {
        let vars = [
            ("https_proxy", "http://p:3128"),
            ("HTTP_PROXY", "http://q:3128"),
            ("NO_PROXY", "localhost,.corp.example,10.0.0.0/8,192.168.1.5"),
        ];
        let pick = |host: &str, tls: bool| {
            Proxy::for_target(None, host, tls, env(&vars))
                .unwrap()
                .map(|p| p.host)
        };
        assert_eq!(pick("vpn.example.org", true).as_deref(), Some("p"));
        assert_eq!(pick("vpn.example.org", false).as_deref(), Some("q"));
        assert_eq!(pick("a.corp.example", true), None);
        assert_eq!(pick("corp.example", true), None);
        assert_eq!(pick("10.1.2.3", true), None);
        assert_eq!(pick("192.168.1.5", true), None);
        assert_eq!(pick("192.168.1.6", true).as_deref(), Some("p"));
        // The flag wins over everything.
        let flag =
            Proxy::for_target(Some("http://f:1"), "a.corp.example", true, env(&vars)).unwrap();
        assert_eq!(flag.unwrap().host, "f");
        assert!(exempt("*", "anything"));
        assert!(exempt("host:8080", "host"));
        assert!(!exempt("", "host"));
        assert!(exempt("fd00::/8", "[fd00::1]"));
    }
}
