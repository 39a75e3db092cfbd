//! The raw veth section, and the iperf3 runs that every path's section
//! shares: TCP with 1 and 4 streams each way, UDP with small datagrams,
//! and the CPU the carrying processes spend per GB.

use std::time::Duration;

use super::{Both, Config, Results, die, info};
use crate::{Host, Lab, cpu_seconds, step};

const IPERF_PORT: &str = "5201";

/// The raw veth between the two hosts: what the kernel carries with no
/// tunnel at all, the ceiling of the others.
pub(super) fn raw(lab: &mut Lab, cfg: &Config, r: &mut Results) {
    let a = lab.host(0);
    step(&format!("measuring raw veth throughput (B -> A {})", a.ip));
    r.raw = Some(measure(lab, cfg, &a.ip, &Carrier::default()));
}

/// iperf3 from `client` to `server` at `addr`; Mbit/s received.
/// With `reverse`, the server sends (iperf3 -R).
pub(super) fn iperf(
    lab: &mut Lab,
    cfg: &Config,
    server: &Host,
    client: &Host,
    addr: &str,
    reverse: bool,
) -> f64 {
    let extra: &[&str] = if reverse { &["-R"] } else { &[] };
    let json = iperf_json(lab, cfg, server, client, addr, extra);
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| die(&format!("iperf3 to {addr}: no throughput")));
    let mbps = bps / 1e6;
    info(&format!(
        "{addr}{}: {mbps:.0} Mbit/s",
        if reverse { " (server sends)" } else { "" }
    ));
    mbps
}

/// An iperf3 client to `addr` for `secs` seconds.
fn iperf_client<'a>(addr: &'a str, secs: &'a str) -> Vec<&'a str> {
    vec![
        "iperf3",
        "-c",
        addr,
        "-p",
        IPERF_PORT,
        "-t",
        secs,
        "--connect-timeout",
        "5000",
    ]
}

/// One iperf3 run with `extra` arguments; its JSON report.
fn iperf_json(
    lab: &mut Lab,
    cfg: &Config,
    server: &Host,
    client: &Host,
    addr: &str,
    extra: &[&str],
) -> serde_json::Value {
    let srv = lab.spawn_cmd(server, &["iperf3", "-s", "-1", "-p", IPERF_PORT], &[]);
    server.wait_listening(IPERF_PORT, Duration::from_secs(10));
    let secs = cfg.seconds.to_string();
    let mut args = iperf_client(addr, &secs);
    args.push("-J");
    args.extend_from_slice(extra);
    args.extend(cfg.iperf_extra.iter().map(String::as_str));
    let out = client.exec(&args);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| die(&format!("iperf3 to {addr}: not JSON ({e})")));
    if let Some(e) = json["error"].as_str() {
        die(&format!("iperf3 to {addr}: {e}"));
    }
    lab.proc(srv).wait(Duration::from_secs(10));
    json
}

/// One path's figures: TCP with 1 and 4 streams each way (Mbit/s, B -> A
/// then A -> B), UDP packets per second with 64-byte datagrams, the CPU
/// seconds its processes spent per GB of single-stream TCP, round trips,
/// the size of the receiver's TUN writes and peak memory.
#[derive(Default, Clone, Copy)]
pub(super) struct Path {
    pub(super) tcp1: Both,
    pub(super) tcp4: Both,
    pub(super) udp_pps: f64,
    pub(super) cpu_per_gb: Option<f64>,
    /// Ping round trip B -> A (p50, p99 ms): idle, and while a
    /// single-stream TCP flow fills the path the same way.
    pub(super) ping_idle: (f64, f64),
    pub(super) ping_load: (f64, f64),
    /// Bytes per packet A's TUN took from its process during single-stream
    /// TCP B -> A: a write coalesced per flow (GRO) is one packet of tens
    /// of KB to the kernel, one decrypted packet per write is the MTU.
    pub(super) tun_write: Option<f64>,
    /// Peak RSS (kB) of its two processes after single-stream TCP, as
    /// earlier benchmarks measured it.
    pub(super) rss_tcp1: [Option<u64>; 2],
    /// Peak RSS (kB) of the larger of its two processes after every run.
    pub(super) rss_peak: Option<u64>,
}

/// VmHWM of a process, kB.
fn hwm_kb(pid: u32) -> Option<u64> {
    crate::status_kb(pid, "VmHWM")
}

/// What carries a path: the processes (none for the raw veth: the kernel
/// does) and A's TUN interface (none for the raw veth).
#[derive(Default)]
pub(super) struct Carrier<'a> {
    pub(super) pids: &'a [u32],
    pub(super) tun: Option<&'a str>,
}

/// Measures one path: server `a` at `addr`, client `b`, carried by `by`.
pub(super) fn measure(lab: &mut Lab, cfg: &Config, addr: &str, by: &Carrier) -> Path {
    let (a, b) = (lab.host(0), lab.host(1));
    let pids = by.pids;
    let mbps = |j: &serde_json::Value| {
        j["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6
    };
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let ping_idle = ping(&b, addr);
    let before = cpu(pids);
    let tun_before = by.tun.map(|t| a.link_counters(t));
    let one = iperf_json(lab, cfg, &a, &b, addr, &[]);
    let spent = cpu(pids) - before;
    let tun_write = by.tun.zip(tun_before).map(|(t, before)| {
        let d = a.link_counters(t).since(&before);
        d.rx_bytes as f64 / d.rx_packets.max(1) as f64
    });
    let gb = one["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0) / 1e9;
    let rss_tcp1 = [0, 1].map(|i| pids.get(i).and_then(|p| hwm_kb(*p)));
    let ping_load = ping_under_load(lab, cfg, addr);
    let one_rev = iperf_json(lab, cfg, &a, &b, addr, &["-R"]);
    let four = iperf_json(lab, cfg, &a, &b, addr, &["-P", "4"]);
    let four_rev = iperf_json(lab, cfg, &a, &b, addr, &["-P", "4", "-R"]);
    let udp = iperf_json(lab, cfg, &a, &b, addr, &["-u", "-l", "64", "-b", "0"]);
    let sum = &udp["end"]["sum"];
    let received =
        sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0);
    let path = Path {
        tcp1: (mbps(&one), mbps(&one_rev)),
        tcp4: (mbps(&four), mbps(&four_rev)),
        udp_pps: received / sum["seconds"].as_f64().unwrap_or(1.0).max(0.001),
        cpu_per_gb: (!pids.is_empty() && gb > 0.0).then(|| spent / gb),
        ping_idle,
        ping_load,
        tun_write,
        rss_tcp1,
        rss_peak: pids.iter().filter_map(|p| hwm_kb(*p)).max(),
    };
    info(&format!(
        "{addr}: TCP {:.0}/{:.0} Mbit/s, 4 streams {:.0}/{:.0}, UDP 64 B {:.0} pps{}{}; ping p50/p99 idle {:.2}/{:.2} ms, under load {:.2}/{:.2} ms",
        path.tcp1.0,
        path.tcp1.1,
        path.tcp4.0,
        path.tcp4.1,
        path.udp_pps,
        path.cpu_per_gb
            .map(|c| format!(", {c:.1} CPU s/GB"))
            .unwrap_or_default(),
        path.tun_write
            .map(|w| format!(", {w:.0} B per TUN write"))
            .unwrap_or_default(),
        path.ping_idle.0,
        path.ping_idle.1,
        path.ping_load.0,
        path.ping_load.1,
    ));
    path
}

/// Pings sent for one round-trip figure, 10 ms apart.
const PINGS: usize = 200;

/// Round trips from B to `addr`: (p50, p99) ms of [`PINGS`] pings.
fn ping(b: &Host, addr: &str) -> (f64, f64) {
    let count = PINGS.to_string();
    let out = b.exec(&["ping", "-n", "-c", &count, "-i", "0.01", "-W", "1", addr]);
    let mut rtts: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    if rtts.len() < PINGS / 2 {
        die(&format!("ping {addr}: {} of {PINGS} answered", rtts.len()));
    }
    rtts.sort_by(f64::total_cmp);
    let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

/// Round trips while single-stream TCP from B fills the path to A.
fn ping_under_load(lab: &mut Lab, cfg: &Config, addr: &str) -> (f64, f64) {
    let (a, b) = (lab.host(0), lab.host(1));
    let srv = lab.spawn_cmd(&a, &["iperf3", "-s", "-1", "-p", IPERF_PORT], &[]);
    a.wait_listening(IPERF_PORT, Duration::from_secs(10));
    // Long enough to outlast the pings (200 x 10 ms and the replies).
    let secs = (cfg.seconds.max(4)).to_string();
    let client = lab.spawn_cmd(&b, &iperf_client(addr, &secs), &[]);
    std::thread::sleep(Duration::from_millis(500));
    let rtt = ping(&b, addr);
    lab.proc(client).wait(Duration::from_secs(cfg.seconds + 20));
    lab.proc(srv).wait(Duration::from_secs(10));
    rtt
}
