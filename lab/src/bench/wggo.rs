//! The other userspace WireGuards as yardsticks, each a pair between the
//! two hosts, measured like every path: Debian's stock wireguard-go
//! (0.0.20220316, before its offloads), wireguard-go 0.0.20231211 from
//! bookworm-backports (TUN and UDP offloads: what current distributions
//! and Tailscale run) and gotatun-cli 0.10.2 (the library `tunnel`
//! embeds, without our layers). `scripts/bench-peers.sh` installs the
//! latter two into folders of their own. The WebSocket reference runs a
//! stock pair over wstunnel.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::throughput::{Carrier, Path, measure};
use super::{Config, Results, die};
use crate::{Host, Lab, step};

/// A pair of userspace WireGuard daemons (`bin`, run as wireguard-go is:
/// `bin -f IFACE`, configured over its UAPI socket): A on `net.1`, B on
/// `net.2`, MTU `mtu`. B sends to `b_to_a` (A's UDP address, or a local
/// relay's); A learns B.
pub(super) struct WgGo {
    a_proc: usize,
    b_proc: usize,
    ia: String,
    ib: String,
}

pub(super) fn wggo_pair(
    lab: &mut Lab,
    bin: &str,
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
    let log = lab.dir.path().join(format!("{tag}.log"));
    let log = log.to_str().unwrap();
    let env = [
        ("LOG_LEVEL", "error"),
        ("WG_LOG_LEVEL", "error"),
        ("WG_SUDO", "1"),
        ("WG_LOG_FILE", log),
    ];
    let a_proc = lab.spawn_cmd(&a, &[bin, "-f", &ia], &env);
    let b_proc = lab.spawn_cmd(&b, &[bin, "-f", &ib], &env);
    let sock = |i: &str| PathBuf::from(format!("/var/run/wireguard/{i}.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(sock(&ia).exists() && sock(&ib).exists()) {
        if Instant::now() > deadline {
            die(&format!("{bin} did not start"));
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
    /// Deletes both links and stops both daemons (not every daemon exits
    /// when its link goes), freeing the UDP port for the next pair.
    pub(super) fn remove(self, lab: &mut Lab) {
        lab.host(0).run(&["ip", "link", "del", &self.ia]);
        lab.host(1).run(&["ip", "link", "del", &self.ib]);
        for p in [self.a_proc, self.b_proc] {
            lab.proc(p).terminate();
        }
    }
}

/// Which yardstick, and where its binary is.
pub(super) enum Peer {
    Stock,
    Wggo2023(String),
    Gotatun(String),
}

impl Peer {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Peer::Stock => "wireguard-go 0.0.20220316 (Debian stock)",
            Peer::Wggo2023(_) => "wireguard-go 0.0.20231211 (bookworm-backports)",
            Peer::Gotatun(_) => "gotatun-cli 0.10.2",
        }
    }
}

/// The binaries of wireguard-go 0.0.20231211 and gotatun-cli 0.10.2:
/// `WGGO2023_BIN` and `GOTATUN_BIN`, else what `scripts/bench-peers.sh`
/// installs (it runs here, and installs what is missing).
pub(super) fn installed_peers() -> (String, String) {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(w), Some(g)) = (var("WGGO2023_BIN"), var("GOTATUN_BIN")) {
        return (w, g);
    }
    step("installing the benchmark's peers (scripts/bench-peers.sh)");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("scripts/bench-peers.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| die(&format!("scripts/bench-peers.sh: {e}")));
    if !out.status.success() {
        die("scripts/bench-peers.sh failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().map(str::to_owned);
    let (Some(w), Some(g)) = (lines.next(), lines.next()) else {
        die("scripts/bench-peers.sh printed no binaries");
    };
    (
        var("WGGO2023_BIN").unwrap_or(w),
        var("GOTATUN_BIN").unwrap_or(g),
    )
}

/// Measures a pair of `peer` on 10.78.0.0/24 over UDP port 51830.
pub(super) fn userspace(lab: &mut Lab, cfg: &Config, peer: &Peer) -> Path {
    step(&format!("starting a pair of {}", peer.name()));
    let a_ip = lab.host(0).ip;
    let bin = match peer {
        Peer::Stock => "wireguard-go",
        Peer::Wggo2023(b) | Peer::Gotatun(b) => b,
    };
    let pair = wggo_pair(
        lab,
        bin,
        "g",
        "10.78.0",
        "1420",
        "51830",
        &format!("{a_ip}:51830"),
    );
    step(&format!(
        "measuring {} (A 10.78.0.1, B 10.78.0.2)",
        peer.name()
    ));
    let pids = [lab.proc(pair.a_proc).pid(), lab.proc(pair.b_proc).pid()];
    let ia = pair.ia.clone();
    let path = measure(
        lab,
        cfg,
        "10.78.0.1",
        &Carrier {
            pids: &pids,
            tun: Some(&ia),
        },
    );
    pair.remove(lab);
    path
}

/// The three yardsticks that `cfg` asks for, in turn.
pub(super) fn yardsticks(lab: &mut Lab, cfg: &Config, r: &mut Results) {
    if cfg.want("wggo") {
        r.wggo = Some(userspace(lab, cfg, &Peer::Stock));
    }
    if !(cfg.want("wggo2023") || cfg.want("gotatun")) {
        return;
    }
    let (wggo2023, gotatun) = installed_peers();
    if cfg.want("wggo2023") {
        r.wggo2023 = Some(userspace(lab, cfg, &Peer::Wggo2023(wggo2023)));
    }
    if cfg.want("gotatun") {
        r.gotatun = Some(userspace(lab, cfg, &Peer::Gotatun(gotatun)));
    }
}
