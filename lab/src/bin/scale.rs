//! `make scale`: N sites join one hub at once (see `tunnel_lab::scale`).
//!
//! Environment: SCALE_SITES (comma list, default "250,500"), SCALE_LOG
//! (the processes' RUST_LOG, default "warn"), SCALE_KEEP_LOGS (a directory
//! to copy every process's output and packet counters to), TUNNEL_BIN.

use std::path::PathBuf;

fn main() {
    tunnel_lab::plain_panics();
    tunnel_lab::needs_root("make scale");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = std::env::var("TUNNEL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target/release/tunnel"));
    let sizes: Vec<usize> = std::env::var("SCALE_SITES")
        .unwrap_or_else(|_| "250,500".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let log = std::env::var("SCALE_LOG").unwrap_or_else(|_| "warn".into());
    let keep = std::env::var("SCALE_KEEP_LOGS").ok().map(PathBuf::from);
    let reports: Vec<_> = sizes
        .iter()
        .map(|n| tunnel_lab::scale::run(&bin, *n, &log, keep.as_deref()))
        .collect();
    println!();
    println!("==================== scale ====================");
    for r in &reports {
        println!("{r}");
    }
    if reports.iter().any(|r| !r.failures.is_empty() || !r.cut) {
        std::process::exit(1);
    }
}
