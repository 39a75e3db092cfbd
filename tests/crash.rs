//! Crashes at every step of the join flow: `join` (and separately `serve`)
//! is killed with SIGKILL at an exact step, through the test builds' crash
//! hook (`TUNNEL_TEST_CRASH_AT`, compiled only with debug assertions), and
//! running the same `join` again with the same token brings the site up.
//! No crash burns a token, and nothing is left behind.

mod common;

use common::{Host, Lab, Node, needs_root};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

const CRASH: &str = "TUNNEL_TEST_CRASH_AT";

/// `tunnel join` as `Lab::join` runs it for `tag`, but killed at `step`;
/// returns once it died of SIGKILL.
fn join_crashing(lab: &mut Lab, b: &Host, a: &Host, tag: &str, token: &str, step: &str) {
    let (iface, state) = (lab.iface(tag), lab.state_dir(tag));
    let args = [
        "join",
        token,
        &a.ip,
        "--iface",
        &iface,
        "--state-dir",
        state.to_str().unwrap(),
        "--backend",
        "userspace",
        "--timeout",
        "10s",
    ];
    let p = lab.spawn_env(b, &args, &[(CRASH, step)]);
    let status = lab.proc(p).wait(Duration::from_secs(20));
    assert_eq!(
        status.signal(),
        Some(9),
        "join was to die of SIGKILL at {step}: {status}\n{}",
        lab.proc(p).stderr()
    );
}

/// What a site must not leave behind once stopped.
fn left_behind(node: &Node) -> Vec<String> {
    let mut left = vec![];
    if node.host.has_link(&node.iface) {
        left.push(format!("link {}", node.iface));
    }
    let uapi = format!("/var/run/wireguard/{}.sock", node.iface);
    if std::path::Path::new(&uapi).exists() {
        left.push(uapi);
    }
    let pending = node.state.join(format!("{}.joining", node.iface));
    if pending.exists() {
        left.push(pending.display().to_string());
    }
    if node.host.has_nft_table(&format!("tunnel-{}", node.iface)) {
        left.push(format!("nftables table of {}", node.iface));
    }
    left
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_join_killed_at_any_step_joins_when_run_again_with_the_same_token() {
    needs_root("join_crash_steps");
    for step in [
        "token-parsed",
        "iface-created",
        "redeem-sending",
        "redeem-answered",
        "key-swapped",
    ] {
        let mut lab = common::lab(2);
        let (a, b) = (lab.host(0), lab.host(1));
        let hub = lab.serve(&a, "a", 1, &[]);
        let token = hub.lines[0].clone();
        join_crashing(&mut lab, &b, &a, "b", &token, step);
        // The same command again, without the hook.
        let site = lab.join(&b, "b", &token, &a, &["--timeout", "10s"]);
        assert!(
            b.ping("10.77.0.1"),
            "after a crash at {step}, the second join does not carry traffic: {:?}",
            site.lines
        );
        assert!(lab.proc(site.proc).terminate().success(), "{step}");
        let left = left_behind(&site);
        assert!(left.is_empty(), "after a crash at {step}: {left:?}");
        // And `up` brings it back from what was saved.
        let up = lab.spawn(&b, &site.local("up"));
        lab.proc(up).wait_lines(1, common::UP);
        assert!(b.ping("10.77.0.1"), "up after a crash at {step}");
        assert!(lab.proc(up).terminate().success());
        assert!(lab.proc(hub.proc).terminate().success());
    }
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_hub_killed_at_any_step_of_a_join_admits_the_site_after_its_restart() {
    needs_root("serve_crash");
    // The hub's side of the join flow: the redeem arrived (nothing saved),
    // the redemption saved but not answered, the joiner's new key seen but
    // its address not yet moved to it, and the address moved.
    for step in [
        "hub-redeem-received",
        "hub-redeemed",
        "hub-swap-due",
        "hub-swapped",
    ] {
        let mut lab = common::lab(2);
        let (a, b) = (lab.host(0), lab.host(1));
        let crash = format!("{CRASH}={step}");
        let hub = lab.serve_via(&a, "a", 1, &["env", &crash], &[]);
        let token = hub.lines[0].clone();
        // The join kills the hub at that step, and then gives up.
        let out = lab.join_output(&b, "b", &token, &a.ip, &["--timeout", "4s"]);
        assert!(!out.status.success(), "{step}: the join got in");
        let status = lab.proc(hub.proc).wait(Duration::from_secs(10));
        assert_eq!(status.signal(), Some(9), "the hub was to die at {step}");
        // The hub comes back from its state, with nothing of the killed run
        // in its way; the same join, run again, is in.
        let again = lab.serve_again(&hub, &[]);
        let site = lab.join(&b, "b", &token, &a, &["--timeout", "10s"]);
        assert!(b.ping("10.77.0.1"), "{step}: {:?}", site.lines);
        let hub_status = lab.status(&hub);
        let peers = hub_status[0]["peers"].to_string();
        assert!(peers.contains("10.77.0.2"), "{step}: {peers}");
        assert!(lab.proc(site.proc).terminate().success(), "{step}");
        assert!(lab.proc(again).terminate().success(), "{step}");
        for node in [&site, &hub] {
            let left = left_behind(node);
            assert!(left.is_empty(), "{step}: {left:?}");
        }
    }
}

#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn a_join_killed_during_a_container_attach_attaches_it_when_run_again() {
    common::needs_docker("join_crash_container");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let (web, cli) = (format!("tc{}web", lab.id), format!("tc{}cli", lab.id));
    let mut cs = common::Containers::default();
    cs.web(&web, "crash-page");
    cs.run(&cli, &["sleep", "3600"]);
    let hub = lab.serve(&a, "a", 1, &["--container", &web]);
    let token = hub.lines[0].clone();
    let (iface, state) = (lab.iface("b"), lab.state_dir("b"));
    let args = [
        "join",
        &token,
        &a.ip,
        "--iface",
        &iface,
        "--state-dir",
        state.to_str().unwrap(),
        "--backend",
        "userspace",
        "--container",
        &cli,
    ];
    let p = lab.spawn_env(&b, &args, &[(CRASH, "container-attach")]);
    let status = lab.proc(p).wait(Duration::from_secs(20));
    assert_eq!(status.signal(), Some(9), "{}", lab.proc(p).stderr());
    // Run again: the site and its container come up; the container's
    // interface left by the crash is replaced, not doubled.
    let site = lab.join(&b, "b", &token, &a, &["--container", &cli]);
    let url = format!(
        "http://{}/",
        common::container_address(&lab.status(&hub), &web)
    );
    common::until("the container fetches across after the crash", || {
        common::fetch(&cli, &url).filter(|p| p == "crash-page")
    });
    assert!(lab.proc(site.proc).terminate().success());
    assert!(left_behind(&site).is_empty(), "{:?}", left_behind(&site));
    let links = common::docker_ok(&["exec", &cli, "ip", "-o", "link"]);
    assert!(
        !links.contains("wt"),
        "the container keeps a tunnel link: {links}"
    );
    assert!(lab.proc(hub.proc).terminate().success());
}
