//! The lab of `tunnel`: "hosts" made of network namespaces on one shared
//! link, the real `tunnel` binary running in them, and Docker containers.
//! Written once, and used by the end-to-end tests, the benchmark
//! (`make bench`) and the demo (`make demo`). Everything a [`Lab`] (or
//! [`Containers`]) creates is removed when it drops, also when the test or
//! the run fails. Addresses are only ever inside the namespaces it makes.
//!
//! Tests that need root, namespaces or Docker are `#[ignore]`d with the
//! reason, so that a plain `cargo test` reports them as ignored; `make
//! test` runs them with `--include-ignored`, and then [`needs_root`] and
//! [`needs_docker`] fail a test whose prerequisites are missing, never
//! skip it.
//!
//! One file per part, each re-exported here so that users name
//! `tunnel_lab::X` whatever file X lives in: `host` (a namespace and what
//! runs inside it), `lab` (laying hosts out, and the clean-up), `nat` (an
//! internet with a hub and sites behind NAT routers of known kinds; its
//! hub's latency is a `delay` line), `node`
//! (`serve` and `join`), `process`, `docker`, and `programs` (what the
//! bench and demos share); `scale` and `soak` are runs of their own.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod bench;
mod delay;
mod docker;
mod host;
mod lab;
mod mesh;
mod nat;
mod node;
mod process;
mod programs;
pub mod scale;
pub mod soak;

pub use docker::{
    Containers, Network, container_address, container_address6, docker, docker_ok, fetch,
};
pub use host::{Host, LinkCounters, WhoAmI, handshake_ages, tcp_exchange};
pub use lab::Lab;
pub use mesh::{MeshSite, bulk, path_to, pings, rtt_to, status_json, wait_path};
pub use nat::{Blocked, Nat, NatLab, Router};
pub use node::{Node, site_address};
pub use process::{Proc, cpu_seconds, failed_with, fd_count, status_kb};
pub use programs::{demo_log, demo_setup, plain_panics};

/// The longest any bring-up may take in a test.
pub const UP: Duration = Duration::from_secs(30);
pub const IMAGE: &str = "tunnel-test-busybox:latest";
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn missing_for_netns() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root");
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun");
    }
    if Command::new("ip")
        .arg("-V")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        missing.push("iproute2 (ip)");
    }
    missing
}

/// Fails the test unless it can make namespaces and TUN devices. Tests
/// that call this are `#[ignore = "needs root: sudo make test"]`.
pub fn needs_root(test: &str) {
    let missing = missing_for_netns();
    assert!(
        missing.is_empty(),
        "{test} cannot run here: missing {} (run as root: sudo make test)",
        missing.join(", ")
    );
}

/// Fails the test unless a Docker engine answers and has the test image
/// (`scripts/docker-env.sh` provides both).
pub fn needs_docker(test: &str) {
    needs_root(test);
    let engine = docker(&["info", "--format", "{{.ServerVersion}}"])
        .status
        .success();
    assert!(
        engine,
        "{test} cannot run here: no Docker engine answers (run scripts/docker-env.sh as root)"
    );
    assert!(
        docker(&["image", "inspect", IMAGE]).status.success(),
        "{test} cannot run here: no image {IMAGE} (run scripts/docker-env.sh as root)"
    );
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Loads `rules` (an nftables ruleset) into namespace `ns` with `nft -f -`,
/// panicking if nft refuses them.
pub fn nft(ns: &str, rules: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .expect("write to nft");
    let out = child.wait_with_output().expect("wait for nft");
    assert!(
        out.status.success(),
        "nft in {ns} refused:\n{rules}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A unique short id for names: namespaces, interfaces (15 bytes max).
pub fn unique() -> String {
    format!(
        "{}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A step of a demo or the benchmark, on stdout.
pub fn step(s: &str) {
    println!("==> {s}");
}

/// Command output under a step, indented.
pub fn indent(s: &str) {
    for l in s.lines() {
        println!("    {l}");
    }
}

/// Retries `f` until it gives `Some`, panicking with `what` after [`UP`].
pub fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let since = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(since.elapsed() < UP, "{what} after {UP:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
