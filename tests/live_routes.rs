//! LANs change while everything runs: `tunnel route add|del CIDR` on a
//! site and on the hub, checked as at `join`, followed by the other sites
//! within seconds, and kept for the next start.

mod common;

use common::{Lab, Node, failed_with, needs_root};
use std::process::Output;
use std::time::{Duration, Instant};

/// `tunnel route WORDS --iface I --state-dir S` on `node`'s host.
fn route(lab: &Lab, node: &Node, words: &[&str]) -> Output {
    let mut args = vec!["route"];
    args.extend_from_slice(words);
    args.extend(node.local("x").into_iter().skip(1));
    lab.tunnel(&node.host, &args)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `host` no longer reaches `ip`; the time it took.
fn unreachable_within(host: &common::Host, ip: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    while host
        .exec(&["ping", "-c", "1", "-W", "1", ip])
        .status
        .success()
    {
        assert!(t.elapsed() < limit, "{ip} still answers after {limit:?}");
    }
    t.elapsed()
}

#[test]
#[ignore = "needs root: sudo make test"]
fn lans_are_added_and_withdrawn_on_running_sites_and_hubs() {
    needs_root("live_routes");
    let mut lab = common::lab(3);
    let (h, b, c) = (lab.host(0), lab.host(1), lab.host(2));
    // B's LAN knows no way back to the tunnel (B masquerades); the hub's
    // LAN routes the tunnel through the hub.
    let lan_b = lab.lan(&b, "192.168.70", "198.18.0.0/15");
    let lan_h = lab.lan(&h, "192.168.71", "10.77.0.0/24");
    let hub = lab.serve(&h, "h", 2, &["--token-route", "192.168.70.0/24"]);
    let site_b = lab.join(&b, "b", &hub.lines[0], &h, &[]);
    let _site_c = lab.join(&c, "c", &hub.lines[1], &h, &[]);
    assert!(
        !c.ping(&lan_b.ip),
        "B's LAN is reachable before it is routed"
    );
    let lan_link = {
        let out = b.run(&["ip", "-o", "route", "get", &lan_b.ip]);
        let mut words = out.split_whitespace();
        words.by_ref().find(|w| *w == "dev");
        words.next().expect("a route to B's LAN").to_owned()
    };
    let lan_forwarding_before = b.forwarding(&lan_link);

    // Bad input: one line, exit 2, nothing changed.
    for (cidr, why) in [
        ("0.0.0.0/0", "whole internet"),
        ("10.77.0.0/16", "overlaps the tunnel's subnet"),
        ("192.168.70.1/24", "not a network address"),
        ("127.0.0.0/8", "loopback"),
    ] {
        failed_with(&route(&lab, &site_b, &["add", cidr]), 2, why);
    }
    failed_with(
        &route(&lab, &site_b, &["del", "192.168.70.0/24"]),
        2,
        "not one of this host's LANs",
    );
    let before = lab.status(&site_b);
    assert_eq!(before[0]["routes"], serde_json::json!([]), "{before}");

    // Added on B: C reaches B's LAN through the hub.
    let t = Instant::now();
    let said = ok(&route(
        &lab,
        &site_b,
        &["add", "192.168.70.0/24", "--masquerade"],
    ));
    assert!(said.contains("routing 192.168.70.0/24"), "{said}");
    assert!(!said.contains("waiting"), "{said}");
    let took = c.ping_until(&lan_b.ip, t);
    eprintln!(
        "site route add: C reached B's LAN {} ms after the command began",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(
        lab.status(&site_b)[0]["routes"],
        serde_json::json!(["192.168.70.0/24"])
    );
    // Twice is refused.
    failed_with(
        &route(&lab, &site_b, &["add", "192.168.70.0/24"]),
        2,
        "already routed",
    );

    // The hub's own LAN, added on the hub: B and C reach it.
    let t = Instant::now();
    ok(&route(&lab, &hub, &["add", "192.168.71.0/24"]));
    let took = c.ping_until(&lan_h.ip, t);
    eprintln!(
        "hub route add: C reached the hub's LAN after {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    failed_with(
        &route(&lab, &hub, &["add", "192.168.72.0/24", "--masquerade"]),
        2,
        "serve --masquerade",
    );
    // A site may not take the hub's LAN.
    failed_with(
        &route(&lab, &site_b, &["add", "192.168.71.0/25"]),
        2,
        "the hub refused",
    );

    // Withdrawn: gone for C within seconds, on both.
    ok(&route(&lab, &site_b, &["del", "192.168.70.0/24"]));
    unreachable_within(&c, &lan_b.ip, Duration::from_secs(3));
    ok(&route(&lab, &hub, &["del", "192.168.71.0/24"]));
    unreachable_within(&c, &lan_h.ip, Duration::from_secs(3));

    // Kept for the next start: added again, then SIGKILL (nothing undone),
    // and `up` cleans the crash's leftovers and routes it again.
    ok(&route(
        &lab,
        &site_b,
        &["add", "192.168.70.0/24", "--masquerade"],
    ));
    lab.proc(site_b.proc).kill();
    let saved =
        std::fs::read_to_string(site_b.state.join(format!("{}.json", site_b.iface))).unwrap();
    assert!(saved.contains("192.168.70.0/24"), "{saved}");
    let up = lab.spawn(&b, &site_b.local("up"));
    lab.proc(up).wait_lines(1, common::UP);
    c.ping_until(&lan_b.ip, Instant::now());
    // Stopped cleanly: the table, the masquerade and the LAN link's
    // forwarding that the live change brought are gone again.
    assert!(lab.proc(up).terminate().success());
    assert!(!b.has_nft_table(&format!("tunnel-{}", site_b.iface)));
    assert_eq!(b.forwarding(&lan_link), lan_forwarding_before);
    assert!(!b.has_link(&site_b.iface));
}
