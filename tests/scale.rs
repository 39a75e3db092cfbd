//! 300 sites join one hub at once, each with the default timeout: all get
//! in, the hub stays up and lists them, and a revoke cuts one off at once.
//! `make scale` runs the same with 250 and 500 and prints the figures.
//!
//! This test runs the release build, as a deployment does: the debug
//! build's unoptimised code takes seven times the CPU per join (70 ms
//! against 10), and 300 of them share two cores with the hub here, so with
//! it the test would measure the build rather than the tool.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn release_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "tunnel"])
        .current_dir(&root)
        .status()
        .expect("running cargo build --release");
    assert!(status.success(), "cargo build --release failed");
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"))
        .join("release/tunnel")
}

#[test]
#[ignore = "needs root: sudo make test"]
fn three_hundred_sites_join_one_hub_at_once() {
    common::needs_root("scale");
    let bin = release_binary();
    let report = tunnel_lab::scale::run(&bin, 300, "warn", None);
    println!("{report}");
    assert!(report.failures.is_empty(), "{report}");
    assert_eq!(report.joined, 300, "{report}");
    assert!(report.cut, "{report}");
}
