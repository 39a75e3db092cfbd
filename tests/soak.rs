//! The soak's short form (`make soak` is the long one): for 150 s, iperf3
//! between two sites while containers restart every 10 s, the hub every
//! 45 s (SIGTERM, SIGKILL, SIGTERM) and a new site joins every 30 s, with
//! RSS and fds sampled every 5 s. It fails on a lost peer or on growth
//! past the bounds of `tunnel_lab::soak`. Its own test binary, so that
//! nothing else runs beside it and its timings mean something.

mod common;

use tunnel_lab::soak::{Config, run};

#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn a_short_soak_loses_no_peer_and_does_not_grow() {
    common::needs_docker("soak");
    // The SOAK_* overrides apply, so that a bound can be tried by hand.
    let cfg = Config::short(common::BIN).env_overrides();
    let summary = run(&cfg);
    eprintln!("{summary}");
    assert!(summary.passed(), "the soak failed:\n{summary}");
}
