//! `make bench`: `tunnel` against its peers, measured in the same run on
//! two namespace hosts joined by a veth pair. One file per section, in the
//! order they run: [`throughput`] (the raw veth, and the iperf3 runs every
//! path shares), [`wggo`] (both wireguard-gos and gotatun-cli), [`tunnel`] (the userspace
//! backend and join -> first packet), [`websocket`] (wss direct and
//! through tinyproxy, against wireguard-go over wstunnel), [`containers`]
//! (`--container` following Docker), [`network`] (the Docker network
//! driver against a bridge), [`mesh`] (direct paths through NATs) and
//! [`scale`] (many sites at once); then
//! [`summary`] prints the table and the ratios against the targets.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use crate::{Lab, Node, step};

mod containers;
mod mesh;
mod network;
mod scale;
mod summary;
mod throughput;
mod tunnel;
mod websocket;
mod wggo;

use throughput::Path;

/// The page the web containers serve, to tell it from an error page.
const PAGE: &str = "bench-page";

fn info(s: &str) {
    println!("    {s}");
}

/// Fails the run; the lab is unwound, so everything is cleaned up.
fn die(s: &str) -> ! {
    panic!("{s}")
}

/// What to measure and how, from the environment (see `make bench`).
pub struct Config {
    /// The `tunnel` binary measured.
    pub bin: PathBuf,
    seconds: u64,
    only: Vec<String>,
    /// Whether a missed target fails the run.
    pub strict: bool,
    iperf_extra: Vec<String>,
}

impl Config {
    /// TUNNEL_BIN, BENCH_SECONDS, BENCH_ONLY, BENCH_STRICT and
    /// IPERF_EXTRA, each with its default when unset or empty.
    pub fn from_env() -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            bin: var("TUNNEL_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target/release/tunnel")),
            seconds: var("BENCH_SECONDS")
                .and_then(|s| s.parse().ok())
                .unwrap_or(5),
            only: var("BENCH_ONLY")
                .unwrap_or_else(|| {
                    "raw,wggo,wggo2023,gotatun,tunnel,wss,containers,network,mesh,scale".into()
                })
                .split(',')
                .map(str::to_owned)
                .collect(),
            strict: var("BENCH_STRICT").as_deref() == Some("1"),
            iperf_extra: var("IPERF_EXTRA")
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
        }
    }

    fn want(&self, what: &str) -> bool {
        self.only.iter().any(|o| o == what)
    }
}

/// Throughput both ways: (client -> server, server -> client), Mbit/s.
type Both = (f64, f64);

/// What the sections measured, for the summary.
#[derive(Default)]
struct Results {
    raw: Option<Path>,
    /// Debian's stock wireguard-go, 0.0.20220316.
    wggo: Option<Path>,
    /// wireguard-go 0.0.20231211 (bookworm-backports), with offloads.
    wggo2023: Option<Path>,
    /// gotatun-cli 0.10.2 from crates.io.
    gotatun: Option<Path>,
    tunnel: Option<Path>,
    join_reported_ms: Option<u128>,
    join_measured_ms: Option<u128>,
    serve_rss: Option<u64>,
    join_rss: Option<u64>,
    attach_after_ms: Option<u128>,
    attach_total_ms: Option<u128>,
    restarts: Vec<(u128, u128)>,
    fetch_ms: Option<u128>,
    /// `docker run --network` -> page, ms: tunnel by address, by name, and
    /// a Docker bridge network.
    first_page: Vec<u128>,
    first_page_by_name: Vec<u128>,
    first_page_bridge: Vec<u128>,
    wss_direct: Option<Both>,
    wss_proxy: Option<Both>,
    wss_join_ms: Option<u128>,
    reference: Option<Both>,
    reference_note: Option<String>,
    problems: Vec<String>,
}

/// Stops a node with SIGTERM and checks it left nothing behind.
fn stop(lab: &mut Lab, node: &Node, r: &mut Results) {
    let status = lab.proc(node.proc).terminate();
    if !status.success() {
        r.problems
            .push(format!("{} exited with {status} after SIGTERM", node.iface));
    }
    if node.host.has_link(&node.iface) {
        r.problems.push(format!(
            "interface {} still exists after shutdown",
            node.iface
        ));
    }
    if PathBuf::from(format!("/var/run/wireguard/{}.sock", node.iface)).exists() {
        r.problems.push(format!(
            "UAPI socket of {} still exists after shutdown",
            node.iface
        ));
    }
}

/// Runs the sections `cfg` asks for and prints the summary; returns the
/// targets missed. Panics (the lab cleaned up) when `tunnel` did not run
/// or stop cleanly.
pub fn run(cfg: &Config) -> Vec<String> {
    if cfg.want("containers") || cfg.want("network") {
        ensure_docker();
    }
    let mut lab = Lab::new(&cfg.bin, 2);
    lab.log = "info".into();
    let (a, b) = (lab.host(0), lab.host(1));
    step(&format!(
        "two namespace sites: A {} and B {}, a veth pair between them",
        a.ip, b.ip
    ));
    b.ping_until(&a.ip, Instant::now());
    let mut r = Results::default();
    two_site_sections(&mut lab, cfg, &mut r);
    let mut missed = summary::summary(cfg, &r);
    drop(lab);
    if !r.problems.is_empty() {
        die("tunnel did not run or shut down cleanly");
    }
    if cfg.want("mesh") {
        // Labs of its own, once the two-host one is gone.
        missed.extend(mesh::mesh(cfg));
    }
    if cfg.want("scale") {
        // A lab of its own, once the two-host one is gone.
        missed.extend(scale::scale(cfg));
    }
    missed
}

/// The sections that share the two-host lab, in order.
fn two_site_sections(lab: &mut Lab, cfg: &Config, r: &mut Results) {
    if cfg.want("raw") {
        throughput::raw(lab, cfg, r);
    }
    wggo::yardsticks(lab, cfg, r);
    if cfg.want("tunnel") {
        tunnel::tunnel(lab, cfg, r);
    }
    if cfg.want("wss") {
        websocket::websocket(lab, cfg, r);
    }
    if cfg.want("containers") {
        containers::containers(lab, r);
    }
    if cfg.want("network") {
        network::network(lab, r);
    }
}

/// The Docker sections need an engine and the test image; the script that
/// sets both up is idempotent, so it runs only when one is missing.
fn ensure_docker() {
    let ready = crate::docker(&["info"]).status.success()
        && crate::docker(&["image", "inspect", crate::IMAGE])
            .status
            .success();
    if ready {
        return;
    }
    step("no Docker engine or no test image: running scripts/docker-env.sh");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let ok = Command::new("bash")
        .arg(root.join("scripts/docker-env.sh"))
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        die("scripts/docker-env.sh failed");
    }
}
