//! `--proxy-pac URL|FILE`: the proxy a PAC file (proxy auto-config, a
//! `FindProxyForURL` in JavaScript) picks for the hub's WebSocket URL.
//!
//! The script runs in proxy-watch's sandboxed QuickJS: a time budget, no
//! DNS lookups from the script, no view of this host's addresses. It is
//! fetched over plain HTTP (WPAD's `http://wpad/wpad.dat`, say) or read
//! from a file, at most [`MAX_SCRIPT`] bytes. Of its answer, the first
//! `PROXY`/`HTTPS` entry is taken, or `DIRECT`; SOCKS entries are skipped
//! (SOCKS is not supported).

use super::TransportError;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use proxy_watch::ProxyStep;
use proxy_watch::pac::{PacPolicy, PacScript};
use std::time::Duration;

/// A PAC file larger than this is refused.
pub const MAX_SCRIPT: usize = 1 << 20;
/// Fetching it, and running it, each take at most this long.
const WITHIN: Duration = Duration::from_secs(5);

/// What the script said for the hub's URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// A proxy URL for `--proxy`: `http://host:port` or `https://host:port`.
    Proxy(String),
    Direct,
}

fn err(source: &str, why: impl std::fmt::Display) -> TransportError {
    TransportError::Pac {
        pac: source.to_owned(),
        why: why.to_string(),
    }
}

/// The script at `source`: an `http://` URL, or a file.
pub async fn load(source: &str) -> Result<String, TransportError> {
    let bytes = if source.starts_with("http://") {
        tokio::time::timeout(WITHIN, fetch(source))
            .await
            .map_err(|_| err(source, "no answer within 5 s"))??
    } else if source.contains("://") {
        return Err(err(
            source,
            "only http:// URLs and files are read (fetch an https:// one yourself)",
        ));
    } else {
        let data = std::fs::read(source).map_err(|e| err(source, e))?;
        if data.len() > MAX_SCRIPT {
            return Err(err(source, "larger than 1 MiB"));
        }
        data
    };
    String::from_utf8(bytes).map_err(|_| err(source, "not UTF-8 text"))
}

async fn fetch(source: &str) -> Result<Vec<u8>, TransportError> {
    let url = url::Url::parse(source).map_err(|e| err(source, e))?;
    let host = url
        .host_str()
        .ok_or_else(|| err(source, "no host"))?
        .to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| err(source, e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| err(source, e))?;
    tokio::spawn(conn);
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, url.authority())
        .body(Empty::<Bytes>::new())
        .map_err(|e| err(source, e))?;
    let resp = sender.send_request(req).await.map_err(|e| err(source, e))?;
    if !resp.status().is_success() {
        return Err(err(
            source,
            format!("the server answered {}", resp.status()),
        ));
    }
    let body = Limited::new(resp.into_body(), MAX_SCRIPT)
        .collect()
        .await
        .map_err(|e| err(source, format!("reading it: {e}")))?;
    Ok(body.to_bytes().to_vec())
}

/// What `script` (read from `source`) picks for `target`, the hub's
/// WebSocket URL. Runs the script: call it off the async workers.
pub fn choose(source: &str, script: &str, target: &str) -> Result<Choice, TransportError> {
    let url = proxy_watch::Url::parse(target).map_err(|e| err(source, e))?;
    let policy = PacPolicy::new().with_timeout(Some(WITHIN));
    let steps = proxy_watch::pac::evaluate(&PacScript::new(script), &url, &policy)
        .map_err(|e| err(source, e))?;
    for step in &steps {
        match step {
            ProxyStep::Direct => return Ok(Choice::Direct),
            ProxyStep::Http(e) => return Ok(Choice::Proxy(format!("http://{}", hostport(e)))),
            ProxyStep::Https(e) => {
                return Ok(Choice::Proxy(format!("https://{}", hostport(e))));
            }
            // SOCKS, and whatever later versions add: skipped.
            _ => {}
        }
    }
    Err(err(
        source,
        format!("it names no HTTP proxy and not DIRECT for {target} (SOCKS is not supported)"),
    ))
}

fn hostport(e: &proxy_watch::ProxyEndpoint) -> String {
    format!("{}:{}", e.host, e.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: &str = "wss://192.0.2.1:8443/t/abc";

    #[test]
    fn the_first_http_proxy_or_direct_is_taken_and_socks_skipped() {
        let pac = |body: &str| format!("function FindProxyForURL(url, host) {{ {body} }}");
        let choose = |body: &str| choose("test.pac", &pac(body), TARGET);
        assert_eq!(
            choose(r#"return "SOCKS5 10.0.0.1:1080; PROXY 10.0.0.2:3128; DIRECT";"#).unwrap(),
            Choice::Proxy("http://10.0.0.2:3128".into())
        );
        assert_eq!(
            choose(r#"return "HTTPS proxy.example:443";"#).unwrap(),
            Choice::Proxy("https://proxy.example:443".into())
        );
        // The script sees the URL and the host.
        assert_eq!(
            choose(
                r#"if (host == "192.0.2.1" && url.substring(0, 4) == "wss:") return "DIRECT"; return "PROXY 10.0.0.2:3128";"#
            )
            .unwrap(),
            Choice::Direct
        );
        let e = choose(r#"return "SOCKS 10.0.0.1:1080";"#).unwrap_err();
        assert!(e.to_string().contains("SOCKS is not supported"), "{e}");
        let e = choose("return nope(;").unwrap_err();
        assert!(e.to_string().starts_with("--proxy-pac test.pac: "), "{e}");
        // A script that never ends is stopped.
        let e = choose("while (true) {}").unwrap_err();
        assert!(e.to_string().contains("test.pac"), "{e}");
    }

    #[tokio::test]
    async fn a_script_is_read_from_a_file_or_fetched_over_http() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("proxy.pac");
        let script = r#"function FindProxyForURL(u, h) { return "DIRECT"; }"#;
        std::fs::write(&file, script).unwrap();
        assert_eq!(load(file.to_str().unwrap()).await.unwrap(), script);
        let e = load(dir.path().join("none.pac").to_str().unwrap())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("none.pac"), "{e}");
        assert!(load("https://wpad/wpad.dat").await.is_err());
        // A one-shot HTTP server on loopback.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let served = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            let body = r#"function FindProxyForURL(u, h) { return "PROXY 10.0.0.2:3128"; }"#;
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/x-ns-proxy-autoconfig\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).await.unwrap();
            req
        });
        let fetched = load(&format!("http://{addr}/wpad.dat")).await.unwrap();
        let req = served.await.unwrap();
        assert!(req.starts_with("GET /wpad.dat HTTP/1.1"), "{req}");
        assert_eq!(
            choose("wpad", &fetched, TARGET).unwrap(),
            Choice::Proxy("http://10.0.0.2:3128".into())
        );
    }
}
