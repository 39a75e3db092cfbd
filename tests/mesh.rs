//! The mesh end to end, in the NAT lab ([`NatLab`]): sites behind
//! different NATs find direct paths through the hub's rendezvous, relay
//! what cannot go direct without the hub reading it, and keep their direct
//! paths when the hub is gone. Asserted with the links' own counters, not
//! only with what `status` says.

mod common;

use common::{
    BIN, Nat, NatLab, bulk, needs_root, path_to, pings, rtt_to, status_json, wait_path,
};
use std::net::SocketAddr;
use std::time::Duration;

/// How long a feasible pair may take to go direct in a test (the bench
/// measures the real figure).
const DIRECT: Duration = Duration::from_secs(15);
const MB: usize = 1 << 20;

fn tunnel_addr(a: &str, port: u16) -> SocketAddr {
    SocketAddr::new(a.parse().unwrap(), port)
}

#[test]
#[ignore = "needs root: sudo make test"]
fn two_sites_behind_masquerading_nats_go_direct_and_bulk_skips_the_hub() {
    needs_root("two_sites_behind_masquerading_nats_go_direct_and_bulk_skips_the_hub");
    let mut nl = NatLab::new(BIN, None);
    let (_ra, ha) = nl.site(Nat::Masquerade);
    let (_rb, hb) = nl.site(Nat::Masquerade);
    let hub = nl.mesh_hub(2, &[]);
    let a = nl.mesh_join(&ha, "a", &hub.lines[0].clone(), &[]);
    let b = nl.mesh_join(&hb, "b", &hub.lines[1].clone(), &[]);
    // Traffic starts over the relay or direct; either way it flows at once.
    assert!(pings(&ha, &b.address, 3, "0.2") >= 2, "no traffic a -> b");
    wait_path(&nl.lab, &a.node, &b.address, "direct", DIRECT);
    wait_path(&nl.lab, &b.node, &a.address, "direct", DIRECT);
    // The path is B's router's public mapping, not the hub.
    let p = path_to(&nl.lab, &a.node, &b.address).unwrap();
    assert!(p.starts_with("direct 198.18.0."), "{p}");
    let before = nl.hub_link();
    let got = bulk(&ha, &hb, tunnel_addr(&b.address, 5201), 20 * MB);
    let crossed = nl.hub_link().since(&before);
    assert_eq!(got, 20 * MB);
    assert!(
        crossed.bytes() < MB as u64,
        "{} bytes of a 20 MB direct transfer crossed the hub's link",
        crossed.bytes()
    );
    let s = status_json(&nl.lab, &a.node);
    assert_eq!(s["mesh"]["direct"], true, "{s}");
    let nat = common::until("the NAT's behaviour in status", || {
        status_json(&nl.lab, &a.node)["mesh"]["nat"]
            .as_str()
            .map(str::to_owned)
    });
    assert_eq!(nat, "endpoint-independent mapping");
}
