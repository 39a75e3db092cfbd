//! What the lab's own programs (bench, demo, soak, scale) share: one
//! `error:` line for a failure, and the demos' binary, Docker and log level.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::{needs_root, step};

/// For the lab's own programs (bench, demo): a failure panics, so that the
/// lab unwinds and cleans up, and is shown as one `error:` line.
pub fn plain_panics() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("failed");
        eprintln!("error: {msg}");
    }));
}

/// What a demo runs: the `tunnel` binary (TUNNEL_BIN, else the release
/// build), and whether it uses Docker (DEMO_CONTAINERS, default 1), whose
/// engine and image are then made sure of. Needs root.
pub fn demo_setup(what: &str) -> (PathBuf, bool) {
    plain_panics();
    needs_root(what);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = std::env::var("TUNNEL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target/release/tunnel"));
    assert!(
        bin.exists(),
        "{} not found; run `make build` first",
        bin.display()
    );
    let with_containers = std::env::var("DEMO_CONTAINERS").as_deref() != Ok("0");
    if with_containers {
        step("making sure a Docker engine and the local image are there (scripts/docker-env.sh)");
        let ok = Command::new("bash")
            .arg(root.join("scripts/docker-env.sh"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "scripts/docker-env.sh failed");
    }
    (bin, with_containers)
}

/// The log filter of a demo's `tunnel` processes: info, or debug with
/// TUNNEL_VERBOSE=1.
pub fn demo_log() -> String {
    if std::env::var("TUNNEL_VERBOSE").as_deref() == Ok("1") {
        "tunnel=debug,warn".into()
    } else {
        "info".into()
    }
}
