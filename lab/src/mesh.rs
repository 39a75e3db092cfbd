//! What the mesh's tests and benchmark share: a hub and sites in a
//! [`NatLab`], each site's paths as its `status --json` reports them, and
//! bulk TCP between two sites' tunnel addresses.

use crate::{Host, Lab, NatLab, Node, UP, site_address};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A site in the mesh lab.
#[derive(Clone, Debug)]
pub struct MeshSite {
    pub node: Node,
    pub address: String,
}

impl NatLab {
    /// `tunnel serve` on the hub with `tokens` tokens.
    pub fn mesh_hub(&mut self, tokens: usize, extra: &[&str]) -> Node {
        let hub = self.hub.clone();
        self.lab.serve(&hub, "hub", tokens, extra)
    }

    /// `tunnel join` on `host` with `token`.
    pub fn mesh_join(&mut self, host: &Host, tag: &str, token: &str, extra: &[&str]) -> MeshSite {
        let hub = self.hub.clone();
        let node = self.lab.join(host, tag, token, &hub, extra);
        let address = site_address(&node);
        MeshSite { node, address }
    }
}

/// The site's status as JSON (its main endpoint).
pub fn status_json(lab: &Lab, site: &Node) -> serde_json::Value {
    let state = site.state.to_str().expect("a UTF-8 path");
    let out = lab.tunnel_ok(&site.host, &["status", "--state-dir", state, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
    v.as_array()
        .and_then(|a| a.first().cloned())
        .unwrap_or(serde_json::Value::Null)
}

/// The path `site` reports to the peer at tunnel address `peer`, e.g.
/// "direct 198.18.0.3:40123" or "relay via 10.77.0.1".
pub fn path_to(lab: &Lab, site: &Node, peer: &str) -> Option<String> {
    let s = status_json(lab, site);
    s["peers"].as_array()?.iter().find_map(|p| {
        (p["address"].as_str() == Some(peer))
            .then(|| p["path"]["path"].as_str().map(str::to_owned))
            .flatten()
    })
}

/// The round trip `site` measured on its path to `peer`, in ms.
pub fn rtt_to(lab: &Lab, site: &Node, peer: &str) -> Option<f64> {
    let s = status_json(lab, site);
    s["peers"].as_array()?.iter().find_map(|p| {
        (p["address"].as_str() == Some(peer))
            .then(|| p["path"]["rtt_ms"].as_f64())
            .flatten()
    })
}

/// Waits until `site`'s path to `peer` starts with `prefix` ("direct",
/// "relay"); returns how long it took. Panics after `within`.
pub fn wait_path(lab: &Lab, site: &Node, peer: &str, prefix: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let p = path_to(lab, site, peer);
        if p.as_deref().is_some_and(|p| p.starts_with(prefix)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{}: path to {peer} is {p:?}, not {prefix}, after {within:?}\n{}",
            site.iface,
            serde_json::to_string_pretty(&status_json(lab, site)).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `bytes` over TCP from `from` to `to` at `addr`; returns the
/// bytes the receiver counted.
pub fn bulk(from: &Host, to: &Host, addr: SocketAddr, bytes: usize) -> usize {
    let listener = to
        .in_ns(move || TcpListener::bind(addr).expect("bind in the receiver"))
        .join()
        .expect("namespace thread");
    let recv = std::thread::spawn(move || {
        listener.set_nonblocking(false).ok();
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(UP)).ok();
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0;
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    });
    from.in_ns(move || {
        let mut s = TcpStream::connect_timeout(&addr, UP).expect("connect");
        let chunk = vec![0x5au8; 1 << 16];
        let mut left = bytes;
        while left > 0 {
            let k = left.min(chunk.len());
            s.write_all(&chunk[..k]).expect("send");
            left -= k;
        }
    })
    .join()
    .expect("namespace thread");
    recv.join().expect("receiver")
}

/// Pings `to` from `host` `count` times `interval` apart; the replies.
pub fn pings(host: &Host, to: &str, count: u32, interval: &str) -> u32 {
    let out = host.exec(&[
        "ping",
        "-c",
        &count.to_string(),
        "-i",
        interval,
        "-W",
        "1",
        "-q",
        to,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(',')
        .find_map(|p| p.trim().strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}
