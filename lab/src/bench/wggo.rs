//! Stock wireguard-go as the yardstick: a pair of it between the two
//! hosts, measured like every path. The WebSocket reference runs the same
//! pair over wstunnel.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::throughput::measure;
use super::{Config, Results, die};
use crate::{Host, Lab, step};

/// A pair of stock wireguard-go: A on `net.1`, B on `net.2`, MTU `mtu`.
/// B sends to `b_to_a` (A's UDP address, or a local relay's); A learns B.
/// Returns A's process and both interfaces.
pub(super) struct WgGo {
    a_proc: usize,
    b_proc: usize,
    ia: String,
    ib: String,
}

pub(super) fn wggo_pair(
    lab: &mut Lab,
    tag: &str,
    net: &str,
    mtu: &str,
    a_port: &str,
    b_to_a: &str,
) -> WgGo {
    let (a, b) = (lab.host(0), lab.host(1));
    let (ia, ib) = (lab.iface(&format!("a{tag}")), lab.iface(&format!("b{tag}")));
    let key = |h: &Host| h.run(&["wg", "genkey"]).trim().to_owned();
    let (ka, kb) = (key(&a), key(&b));
    let public = |k: &str| {
        let mut c = Command::new("wg")
            .arg("pubkey")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin.take().unwrap().write_all(k.as_bytes()).unwrap();
        String::from_utf8(c.wait_with_output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned()
    };
    let (pa, pb) = (public(&ka), public(&kb));
    let env = [("LOG_LEVEL", "error")];
    let a_proc = lab.spawn_cmd(&a, &["wireguard-go", "-f", &ia], &env);
    let b_proc = lab.spawn_cmd(&b, &["wireguard-go", "-f", &ib], &env);
    let sock = |i: &str| PathBuf::from(format!("/var/run/wireguard/{i}.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(sock(&ia).exists() && sock(&ib).exists()) {
        if Instant::now() > deadline {
            die("wireguard-go did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let keyfile = |name: &str, k: &str| {
        let p = lab.dir.path().join(name);
        std::fs::write(&p, k).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (fa, fb) = (
        keyfile(&format!("{ia}.key"), &ka),
        keyfile(&format!("{ib}.key"), &kb),
    );
    a.run(&[
        "wg",
        "set",
        &ia,
        "listen-port",
        a_port,
        "private-key",
        &fa,
        "peer",
        &pb,
        "allowed-ips",
        &format!("{net}.2/32"),
    ]);
    b.run(&[
        "wg",
        "set",
        &ib,
        "private-key",
        &fb,
        "peer",
        &pa,
        "allowed-ips",
        &format!("{net}.1/32"),
        "endpoint",
        b_to_a,
        "persistent-keepalive",
        "25",
    ]);
    for (h, i, me) in [
        (&a, &ia, format!("{net}.1/24")),
        (&b, &ib, format!("{net}.2/24")),
    ] {
        h.run(&["ip", "addr", "add", &me, "dev", i]);
        h.run(&["ip", "link", "set", i, "mtu", mtu, "up"]);
    }
    b.ping_until(&format!("{net}.1"), Instant::now());
    WgGo {
        a_proc,
        b_proc,
        ia,
        ib,
    }
}

impl WgGo {
    pub(super) fn remove(self, lab: &Lab) {
        lab.host(0).run(&["ip", "link", "del", &self.ia]);
        lab.host(1).run(&["ip", "link", "del", &self.ib]);
    }
}

pub(super) fn wireguard_go(lab: &mut Lab, cfg: &Config, r: &mut Results) {
    step("starting a pair of stock wireguard-go");
    let a_ip = lab.host(0).ip;
    let pair = wggo_pair(
        lab,
        "g",
        "10.78.0",
        "1420",
        "51830",
        &format!("{a_ip}:51830"),
    );
    step("measuring wireguard-go (A 10.78.0.1, B 10.78.0.2)");
    let pids = [lab.proc(pair.a_proc).pid(), lab.proc(pair.b_proc).pid()];
    r.wggo = Some(measure(lab, cfg, "10.78.0.1", &pids));
    r.wggo_rss = lab.proc(pair.a_proc).peak_rss_kb();
    pair.remove(lab);
}
