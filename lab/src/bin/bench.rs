//! `make bench`: `tunnel` against its peers, measured in the same run on
//! two namespace hosts joined by a veth pair: iperf3 over the raw veth,
//! over a pair of stock `wireguard-go`, and over `tunnel` (userspace
//! backend); the time from `tunnel join` to the first packet; peak RSS;
//! the WebSocket transport, direct and through tinyproxy, against stock
//! wireguard-go over wstunnel through the same proxy; and how fast
//! `--container` follows Docker (start -> attached, restart -> traffic);
//! and, with the network driver, `docker run --network <tunnel net>` to
//! the first page fetched across, against the same on a Docker bridge;
//! and scale: 250 and 500 sites joining one hub at once (`tunnel_lab::scale`,
//! as `make scale`). Prints the ratios. The sections: `tunnel_lab::bench`.
//!
//! Environment:
//!   TUNNEL_BIN     binary to measure (default: target/release/tunnel)
//!   BENCH_SECONDS  iperf3 duration per measurement (default 5)
//!   BENCH_ONLY     comma list of raw,wggo,tunnel,wss,containers,network,scale (default: all)
//!   BENCH_SCALE    site counts of the scale section (default 250,500)
//!   WSTUNNEL       the wstunnel binary of the WebSocket reference
//!   BENCH_STRICT   1 = exit non-zero when a target is missed
//!   IPERF_EXTRA    extra iperf3 client arguments (e.g. "-P 2")

use tunnel_lab::bench::{Config, run};

fn main() {
    tunnel_lab::plain_panics();
    let cfg = Config::from_env();
    tunnel_lab::needs_root("make bench");
    assert!(
        cfg.bin.exists(),
        "{} not found; run `make build` first",
        cfg.bin.display()
    );
    let missed = run(&cfg);
    for m in &missed {
        eprintln!("error: target missed: {m}");
    }
    if cfg.strict && !missed.is_empty() {
        std::process::exit(1);
    }
}
