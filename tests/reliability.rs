//! What a long-running tunnel meets on real hosts, end to end: a partition
//! between the sites, and a site whose underlay address changes. Neither
//! needs a restart.

mod common;

use common::needs_root;
use std::time::{Duration, Instant};

/// Traffic must be back this soon after the network is.
const BACK_WITHIN: Duration = Duration::from_secs(5);

#[test]
#[ignore = "needs root: sudo make test"]
fn a_60_second_partition_heals_without_a_restart() {
    needs_root("partition");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let hub = lab.serve(&a, "a", 1, &[]);
    let site = lab.join(&b, "b", &hub.lines[0], &a, &[]);
    assert!(b.ping("10.77.0.1"));
    // Everything between the sites is dropped for 60 s (both ways, at B).
    let table = format!("part{}", lab.id);
    b.run(&["nft", "add", "table", "inet", &table]);
    for (chain, hook, dir) in [("i", "input", "iifname"), ("o", "output", "oifname")] {
        b.run(&[
            "nft",
            "add",
            "chain",
            "inet",
            &table,
            chain,
            &format!("{{ type filter hook {hook} priority -10; }}"),
        ]);
        b.run(&[
            "nft", "add", "rule", "inet", &table, chain, dir, &b.dev, "drop",
        ]);
    }
    assert!(!b.ping("10.77.0.1"), "the partition lets traffic through");
    std::thread::sleep(Duration::from_secs(60));
    b.run(&["nft", "delete", "table", "inet", &table]);
    let healed = Instant::now();
    let took = b.ping_until("10.77.0.1", healed);
    eprintln!(
        "traffic back {} ms after a 60 s partition healed",
        took.as_millis()
    );
    assert!(took < BACK_WITHIN, "traffic back only after {took:?}");
    // And the hub reaches the site too.
    assert!(a.ping("10.77.0.2"));
    assert!(lab.proc(site.proc).terminate().success());
    assert!(lab.proc(hub.proc).terminate().success());
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_site_whose_underlay_address_changes_is_followed_by_the_hub() {
    needs_root("roaming");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let hub = lab.serve(&a, "a", 1, &[]);
    let site = lab.join(&b, "b", &hub.lines[0], &a, &[]);
    assert!(b.ping("10.77.0.1"));
    // B moves: its old address gone, a new one on its link (removing a
    // primary address takes the secondaries of its subnet with it, so the
    // old one goes first, as a DHCP renumbering would).
    let new_ip = "10.231.0.77";
    b.run(&["ip", "addr", "del", &format!("{}/24", b.ip), "dev", &b.dev]);
    b.run(&["ip", "addr", "add", &format!("{new_ip}/24"), "dev", &b.dev]);
    let moved = Instant::now();
    // The hub sends to B first: it learns B's new address only from B's
    // next packet (keepalive or traffic), as WireGuard roams.
    let took = b.ping_until("10.77.0.1", moved);
    eprintln!(
        "traffic back {} ms after the site's address changed",
        took.as_millis()
    );
    assert!(took < BACK_WITHIN, "traffic back only after {took:?}");
    assert!(a.ping("10.77.0.2"), "the hub does not reach the moved site");
    let st = lab.status(&hub);
    let endpoint = st[0]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["address"] == "10.77.0.2" && p["name"] != "used invite")
        .and_then(|p| p["endpoint"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(endpoint.starts_with(new_ip), "the hub still has {endpoint}");
    assert!(lab.proc(site.proc).terminate().success());
    assert!(lab.proc(hub.proc).terminate().success());
}
