//! HTTP proxies: which one (`--proxy`, else `HTTPS_PROXY`/`HTTP_PROXY`
//! and their lowercase forms, minus `NO_PROXY`), and a tunnel through it
//! with HTTP CONNECT, with the URL's user and password: Basic first, and
//! NTLM (v2, through `ntlmclient`) when the proxy refuses that and offers
//! it. An `https://` proxy is spoken to over TLS, checked against the
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
    /// The URL's user (`DOMAIN\user` or `user`) and password, for NTLM.
    login: Option<(String, String)>,
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
        let login = (!u.username().is_empty())
            .then(|| (decode(u.username()), decode(u.password().unwrap_or(""))));
        let auth = login
            .as_ref()
            .map(|(user, pass)| format!("Basic {}", STANDARD.encode(format!("{user}:{pass}"))));
        Ok(Self {
            host,
            port,
            tls,
            ca: None,
            auth,
            login,
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
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut sender = self.open().await?;
        let resp = self
            .send_connect(&mut sender, &target, self.auth.as_deref())
            .await?;
        let offers_ntlm = resp
            .headers()
            .get_all(hyper::header::PROXY_AUTHENTICATE)
            .iter()
            .any(|v| v.as_bytes().starts_with(b"NTLM"));
        let resp = match &self.login {
            Some(login) if resp.status() == 407 && offers_ntlm => {
                drop(resp);
                self.ntlm(&target, login).await?
            }
            _ => resp,
        };
        if !resp.status().is_success() {
            return Err(TransportError::ProxyRefused {
                proxy: redact(&self.url),
                target,
                status: refusal(resp.status(), resp.headers(), self.auth.is_some()),
            });
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(|e| self.http(e))?;
        Ok(TokioIo::new(upgraded))
    }

    fn http(&self, e: hyper::Error) -> TransportError {
        TransportError::Connect {
            target: format!("proxy {}:{}", self.host, self.port),
            source: std::io::Error::other(e),
        }
    }

    /// A new HTTP/1.1 connection to the proxy (TLS for an https:// one).
    async fn open(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, TransportError> {
        let proxy = format!("{}:{}", self.host, self.port);
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
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.http(e))?;
        tokio::spawn(conn.with_upgrades());
        Ok(sender)
    }

    /// `CONNECT target` with `auth` as `Proxy-Authorization`.
    async fn send_connect(
        &self,
        sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        target: &str,
        auth: Option<&str>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, TransportError> {
        sender.ready().await.map_err(|e| self.http(e))?;
        let mut req = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri(target)
            .header(hyper::header::HOST, target);
        if let Some(a) = auth {
            req = req.header(hyper::header::PROXY_AUTHORIZATION, a);
        }
        let req = req.body(Empty::<Bytes>::new()).expect("a valid request");
        sender.send_request(req).await.map_err(|e| self.http(e))
    }

    /// NTLM's three messages on one new connection: our negotiate, the
    /// proxy's challenge (in a 407), our answer; the last response.
    async fn ntlm(
        &self,
        target: &str,
        (user, password): &(String, String),
    ) -> Result<hyper::Response<hyper::body::Incoming>, TransportError> {
        use http_body_util::BodyExt;
        let mut sender = self.open().await?;
        let negotiate = format!("NTLM {}", STANDARD.encode(ntlm::negotiate()));
        let resp = self
            .send_connect(&mut sender, target, Some(&negotiate))
            .await?;
        let challenge = resp
            .headers()
            .get_all(hyper::header::PROXY_AUTHENTICATE)
            .iter()
            .find_map(|v| v.to_str().ok()?.strip_prefix("NTLM ").map(str::to_owned));
        let Some(challenge) = challenge else {
            return Ok(resp);
        };
        // The connection is kept for the answer: read the 407's body off it.
        let _ = resp.into_body().collect().await;
        let answer = STANDARD
            .decode(challenge.trim())
            .ok()
            .and_then(|c| ntlm::answer(&c, user, password))
            .ok_or_else(|| TransportError::ProxyRefused {
                proxy: redact(&self.url),
                target: target.to_owned(),
                status: "407: its NTLM challenge could not be read".to_owned(),
            })?;
        let answer = format!("NTLM {}", STANDARD.encode(answer));
        self.send_connect(&mut sender, target, Some(&answer)).await
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

/// NTLM's messages, through `ntlmclient`: NTLMv2 responses only.
mod ntlm {
    use ntlmclient::{Credentials, Flags, Message, NegotiateMessage};

    /// The workstation name NTLM sends: this host's name.
    fn workstation() -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    }

    /// The first message: what this client speaks.
    pub fn negotiate() -> Vec<u8> {
        Message::Negotiate(NegotiateMessage {
            flags: Flags::NEGOTIATE_UNICODE
                | Flags::REQUEST_TARGET
                | Flags::NEGOTIATE_NTLM
                | Flags::NEGOTIATE_WORKSTATION_SUPPLIED,
            supplied_domain: String::new(),
            supplied_workstation: workstation(),
            os_version: Default::default(),
        })
        .to_bytes()
        .expect("a negotiate message encodes")
    }

    /// The answer to the proxy's `challenge` for `user` (`DOMAIN\\user`
    /// or `user`); `None` when the challenge is not one.
    pub fn answer(challenge: &[u8], user: &str, password: &str) -> Option<Vec<u8>> {
        let (server_challenge, info): ([u8; 8], Vec<u8>) = match Message::try_from(challenge) {
            Ok(Message::Challenge(c)) => (
                c.challenge,
                c.target_information
                    .iter()
                    .flat_map(|e| e.to_bytes())
                    .collect(),
            ),
            // A short challenge, without target information (older
            // servers, squid's test helper), which ntlmclient does not
            // read: its 8 bytes sit at offset 24 of any type 2 message.
            _ if challenge.len() >= 32
                && challenge.starts_with(b"NTLMSSP\0")
                && challenge[8..12] == [2, 0, 0, 0] =>
            {
                (challenge[24..32].try_into().ok()?, vec![])
            }
            _ => return None,
        };
        let (domain, username) = user.split_once('\\').unwrap_or(("", user));
        let creds = Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
            domain: domain.to_owned(),
        };
        let response = ntlmclient::respond_challenge_ntlm_v2(
            server_challenge,
            &info,
            ntlmclient::get_ntlm_time(),
            &creds,
        );
        response
            .to_message(
                &creds,
                &workstation(),
                Flags::NEGOTIATE_UNICODE | Flags::NEGOTIATE_NTLM,
            )
            .to_bytes()
            .ok()
    }
}

/// What the stream to the proxy is: plain TCP, or TLS over it.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// What a proxy's refusal means, in the words of its status and the
/// logins it offers.
fn refusal(status: hyper::StatusCode, headers: &hyper::HeaderMap, had_credentials: bool) -> String {
    let offers = |scheme: &[u8]| {
        headers
            .get_all(hyper::header::PROXY_AUTHENTICATE)
            .iter()
            .any(|v| v.as_bytes().starts_with(scheme))
    };
    match status.as_u16() {
        407 if had_credentials && offers(b"NTLM") => {
            format!("{status}: it refused the user and password in the proxy URL (Basic and NTLM)")
        }
        407 if had_credentials && offers(b"Negotiate") => format!(
            "{status}: it wants Negotiate (Kerberos), which is not supported; ask for Basic or NTLM"
        ),
        407 if had_credentials => {
            format!("{status}: it refused the user and password in the proxy URL")
        }
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
        let none = hyper::HeaderMap::new();
        let offering = |scheme: &str| {
            let mut h = hyper::HeaderMap::new();
            h.append(hyper::header::PROXY_AUTHENTICATE, scheme.parse().unwrap());
            h
        };
        let s407 = S::PROXY_AUTHENTICATION_REQUIRED;
        assert!(refusal(s407, &none, false).contains("wants a login"));
        assert!(refusal(s407, &offering("NTLM"), true).contains("(Basic and NTLM)"));
        assert!(
            refusal(s407, &offering("Negotiate"), true)
                .contains("Negotiate (Kerberos), which is not supported")
        );
        assert!(refusal(S::FORBIDDEN, &none, false).starts_with("403 Forbidden: its rules forbid"));
        assert_eq!(refusal(S::BAD_GATEWAY, &none, false), "502 Bad Gateway");
    }

    #[test]
    fn ntlm_answers_a_challenge_with_the_domain_user_and_an_ntlmv2_response() {
        use ntlmclient::{ChallengeMessage, Flags, Message};
        let negotiate = Message::try_from(ntlm::negotiate().as_slice()).unwrap();
        assert!(matches!(negotiate, Message::Negotiate(_)), "{negotiate:?}");
        let challenge = Message::Challenge(ChallengeMessage {
            target_name: "CORP".into(),
            flags: Flags::NEGOTIATE_UNICODE | Flags::NEGOTIATE_NTLM,
            challenge: [1, 2, 3, 4, 5, 6, 7, 8],
            context: (0, 0),
            target_information: vec![],
            os_version: Default::default(),
        })
        .to_bytes()
        .unwrap();
        let answer = ntlm::answer(&challenge, "CORP\\alice", "s3cret").unwrap();
        let Message::Authenticate(a) = Message::try_from(answer.as_slice()).unwrap() else {
            panic!("not an authenticate message")
        };
        assert_eq!(
            (a.domain_name.as_str(), a.user_name.as_str()),
            ("CORP", "alice")
        );
        // NTLMv2: a 16-byte proof and the client's blob after it.
        assert!(a.ntlm_response.len() > 24, "{}", a.ntlm_response.len());
        assert!(ntlm::answer(b"not ntlm", "alice", "x").is_none());
        // squid's ntlm_fake_auth sends a short challenge: still answered.
        let short = STANDARD
            .decode("TlRMTVNTUAACAAAACQAJAK6qqqoGgggA3LUDlSkOSn0AAAAAAAA6AFdPUktHUk9VUA==")
            .unwrap();
        assert!(ntlm::answer(&short, "alice", "x").is_some());
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
