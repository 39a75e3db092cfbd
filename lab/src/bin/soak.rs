//! `make soak`: the reliability soak, 30 minutes by default: iperf3
//! between two sites, container restarts, hub restarts (SIGTERM and
//! SIGKILL in turn), token + join, and RSS and fd samples of every
//! `tunnel` process; fails on a lost peer or on growth past the stated
//! bounds. What it does and its bounds: `tunnel_lab::soak`. The same soak,
//! short, is `tests/soak.rs`.
//!
//! Environment: TUNNEL_BIN (default target/release/tunnel), SOAK_MINUTES
//! (default 30; under CI=true, unset means the 150 s short form), and the
//! overrides of `Config::env_overrides` (SOAK_CONTAINER_EVERY,
//! SOAK_HUB_EVERY, SOAK_JOIN_EVERY, SOAK_SAMPLE_EVERY, SOAK_BACK_WITHIN in
//! seconds, SOAK_WARMUP_SAMPLES, SOAK_RSS_GROWTH_KB, SOAK_FD_GROWTH,
//! SOAK_IPERF_RATE).

use std::path::PathBuf;
use tunnel_lab::soak::{Config, run};
use tunnel_lab::step;

fn main() {
    tunnel_lab::plain_panics();
    tunnel_lab::needs_docker("make soak");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = std::env::var("TUNNEL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target/release/tunnel"));
    assert!(
        bin.exists(),
        "{} not found; run `make build` first",
        bin.display()
    );
    let cfg = Config::from_env(bin);
    step(&format!("soak: {}", cfg.plan()));
    step(&format!("bounds: {}", cfg.bounds()));
    let summary = run(&cfg);
    println!();
    println!("{summary}");
    if !summary.passed() {
        std::process::exit(1);
    }
}
