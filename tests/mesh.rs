//! The mesh end to end, in the NAT lab ([`NatLab`]): sites behind
//! different NATs find direct paths through the hub's rendezvous, relay
//! what cannot go direct without the hub reading it, and keep their direct
//! paths when the hub is gone. Asserted with the links' own counters, not
//! only with what `status` says.

mod common;

use common::{BIN, Nat, NatLab, bulk, needs_root, path_to, pings, rtt_to, status_json, wait_path};
use std::net::SocketAddr;
use std::time::Duration;

/// How long a feasible pair may take to go direct in a test (the bench
/// measures the real figure).
const DIRECT: Duration = Duration::from_secs(15);
const MB: usize = 1 << 20;

/// Waits until `from` reaches `to` through the tunnel. The first packets
/// of a pair may be lost for a moment: until both sites have the other in
/// their maps, one side drops what the other sends.
fn reach(from: &common::Host, to: &str) {
    common::until(&format!("{} reaching {to}", from.ns), || {
        (pings(from, to, 1, "0.2") == 1).then_some(())
    });
}

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
    reach(&ha, &b.address);
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

/// Every kind of NAT in one mesh: each feasible pair goes direct, the rest
/// stay on the relay and still carry traffic, which the hub forwards
/// without it ever appearing in clear on its tunnel interface.
#[test]
#[ignore = "needs root: sudo make test"]
fn each_nat_pair_goes_direct_where_it_can_and_relays_the_rest_unread() {
    needs_root("each_nat_pair_goes_direct_where_it_can_and_relays_the_rest_unread");
    let mut nl = NatLab::new(BIN, None);
    let home = nl.router(Nat::Masquerade);
    let hosts = [
        ("m1", nl.site_behind(&home)),
        ("m2", nl.site_behind(&home)),
        ("f", nl.site(Nat::FullCone).1),
        ("s1", nl.site(Nat::Symmetric).1),
        ("s2", nl.site(Nat::Symmetric).1),
        ("d", nl.double_nat().1),
    ];
    let hub = nl.mesh_hub(hosts.len(), &[]);
    let sites: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(i, (tag, h))| {
            let token = hub.lines[i].clone();
            (*tag, h.clone(), nl.mesh_join(h, tag, &token, &[]))
        })
        .collect();
    // Symmetric NAT against anything but an open (full-cone) one cannot
    // go direct; everything else can.
    let feasible = |a: &str, b: &str| {
        let sym = |x: &str| x.starts_with('s');
        !(sym(a) && b != "f" || sym(b) && a != "f")
    };
    // Traffic between every pair, both ways, over whatever path there is.
    for (i, (_, ha, _)) in sites.iter().enumerate() {
        for (_, _, b) in &sites[i + 1..] {
            reach(ha, &b.address);
        }
    }
    for (i, (ta, _, a)) in sites.iter().enumerate() {
        for (tb, _, b) in &sites[i + 1..] {
            if feasible(ta, tb) {
                wait_path(&nl.lab, &a.node, &b.address, "direct", DIRECT);
                wait_path(&nl.lab, &b.node, &a.address, "direct", DIRECT);
            }
        }
    }
    // Sites behind one router find each other on their LAN.
    let lan = path_to(&nl.lab, &sites[0].2.node, &sites[1].2.address).unwrap();
    assert!(lan.starts_with("direct 192.168."), "m1 -> m2: {lan}");
    // The infeasible ones are still relayed after the probes had their go,
    // and traffic flows there.
    std::thread::sleep(Duration::from_secs(3));
    for (i, (ta, ha, a)) in sites.iter().enumerate() {
        for (tb, _, b) in &sites[i + 1..] {
            if !feasible(ta, tb) {
                let p = path_to(&nl.lab, &a.node, &b.address).unwrap_or_default();
                assert!(
                    p.starts_with("relay"),
                    "{ta} -> {tb} should be relayed: {p}"
                );
                assert!(
                    pings(ha, &b.address, 5, "0.2") >= 4,
                    "{ta} -> {tb} lost pings"
                );
            }
        }
    }
    // A relayed bulk transfer crosses the hub's link but never its tunnel
    // interface, where it would be in clear.
    let (s1, s2) = (&sites[3], &sites[4]);
    let tun_before = nl.hub.link_counters(&hub.iface);
    let link_before = nl.hub_link();
    let got = bulk(&s1.1, &s2.1, tunnel_addr(&s2.2.address, 5202), 5 * MB);
    assert_eq!(got, 5 * MB);
    let tun = nl.hub.link_counters(&hub.iface).since(&tun_before);
    let link = nl.hub_link().since(&link_before);
    assert!(
        link.bytes() > 10 * MB as u64,
        "the relay carried {} B",
        link.bytes()
    );
    assert!(
        tun.bytes() < MB as u64,
        "{} B of a relayed transfer showed on the hub's tunnel interface",
        tun.bytes()
    );
    let hub_status = status_json(&nl.lab, &hub);
    assert!(
        hub_status["mesh"]["relayed_bytes"].as_u64().unwrap_or(0) > 5 * MB as u64,
        "{hub_status}"
    );
    // NAT behaviour as the sites found it.
    let nat = |i: usize| {
        common::until("the NAT's behaviour in status", || {
            status_json(&nl.lab, &sites[i].2.node)["mesh"]["nat"]
                .as_str()
                .map(str::to_owned)
        })
    };
    assert_eq!(nat(3), "endpoint-dependent mapping (symmetric)");
    assert_eq!(nat(5), "endpoint-independent mapping");
}

/// Runs `ping -i 0.2` from `host` to `to` in the background for `secs`.
fn background_pings(nl: &mut NatLab, host: &common::Host, to: &str, secs: u32) -> usize {
    let count = (secs * 5).to_string();
    nl.lab.spawn_cmd(
        host,
        &["ping", "-i", "0.2", "-W", "1", "-c", &count, "-q", to],
        &[],
    )
}

/// The replies of a finished background ping.
fn replies(nl: &mut NatLab, proc: usize) -> (u32, u32) {
    let p = nl.lab.proc(proc);
    let _ = p.child.wait();
    let out = p.stdout();
    let field = |suffix: &str| {
        out.split(',')
            .find_map(|f| f.trim().strip_suffix(suffix).map(|n| n.trim().to_owned()))
            .and_then(|n| n.split_whitespace().last().map(str::to_owned))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field(" packets transmitted"), field(" received"))
}

/// The hub killed: direct pairs go on as if nothing happened, relayed
/// ones wait; the hub back, the relayed ones come back, and no site joins
/// again.
#[test]
#[ignore = "needs root: sudo make test"]
fn direct_pairs_outlive_a_killed_hub_and_a_restarted_hub_takes_the_mesh_back() {
    needs_root("direct_pairs_outlive_a_killed_hub_and_a_restarted_hub_takes_the_mesh_back");
    let mut nl = NatLab::new(BIN, None);
    let ha = nl.site(Nat::Masquerade).1;
    let hb = nl.site(Nat::FullCone).1;
    let hs1 = nl.site(Nat::Symmetric).1;
    let hs2 = nl.site(Nat::Symmetric).1;
    let hub = nl.mesh_hub(4, &[]);
    let a = nl.mesh_join(&ha, "a", &hub.lines[0].clone(), &[]);
    let b = nl.mesh_join(&hb, "b", &hub.lines[1].clone(), &[]);
    let s1 = nl.mesh_join(&hs1, "s1", &hub.lines[2].clone(), &[]);
    let s2 = nl.mesh_join(&hs2, "s2", &hub.lines[3].clone(), &[]);
    reach(&ha, &b.address);
    wait_path(&nl.lab, &a.node, &b.address, "direct", DIRECT);
    wait_path(&nl.lab, &b.node, &a.address, "direct", DIRECT);
    reach(&hs1, &s2.address);

    nl.lab.proc(hub.proc).kill();
    let during = background_pings(&mut nl, &ha, &b.address, 60);
    // The relayed pair has nothing to go through now.
    assert_eq!(
        pings(&hs1, &s2.address, 3, "0.3"),
        0,
        "relayed without a hub?"
    );
    let (sent, got) = replies(&mut nl, during);
    assert!(sent >= 290, "{sent} pings sent");
    assert!(
        sent - got <= 3,
        "the direct pair lost {} of {sent} pings in a minute without the hub",
        sent - got
    );
    assert!(
        path_to(&nl.lab, &a.node, &b.address)
            .unwrap()
            .starts_with("direct")
    );

    nl.lab.serve_again(&hub, &[]);
    common::until("the relayed pair back through the restarted hub", || {
        (pings(&hs1, &s2.address, 1, "0.2") == 1).then_some(())
    });
    for (i, s) in [&a, &b, &s1, &s2].iter().enumerate() {
        assert!(nl.lab.proc(s.node.proc).running(), "site {i} stopped");
    }
    // Nothing joined again: the hub still knows exactly four sites.
    let hub_status = status_json(&nl.lab, &hub);
    let sites = hub_status["peers"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter(|p| p["name"] != "unused invite" && p["name"] != "used invite")
                .count()
        })
        .unwrap_or(0);
    assert_eq!(sites, 4, "{hub_status}");
}

/// A direct path blocked mid-transfer falls back to the relay within 7 s,
/// traffic going on, and comes back once unblocked.
#[test]
#[ignore = "needs root: sudo make test"]
fn a_blocked_direct_path_falls_back_to_the_relay_within_seven_seconds_and_comes_back() {
    needs_root("a_blocked_direct_path_falls_back_to_the_relay_within_seven_seconds_and_comes_back");
    let mut nl = NatLab::new(BIN, None);
    let (ra, ha) = nl.site(Nat::Masquerade);
    let (rb, hb) = nl.site(Nat::Masquerade);
    let hub = nl.mesh_hub(2, &[]);
    let a = nl.mesh_join(&ha, "a", &hub.lines[0].clone(), &[]);
    let b = nl.mesh_join(&hb, "b", &hub.lines[1].clone(), &[]);
    reach(&ha, &b.address);
    wait_path(&nl.lab, &a.node, &b.address, "direct", DIRECT);
    let flow = background_pings(&mut nl, &ha, &b.address, 40);
    std::thread::sleep(Duration::from_secs(2));
    let blocked = nl.block(&ra, &rb);
    let fell = wait_path(
        &nl.lab,
        &a.node,
        &b.address,
        "relay",
        Duration::from_secs(15),
    );
    assert!(
        fell <= Duration::from_secs(7),
        "fell back to the relay after {fell:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    blocked.unblock();
    wait_path(
        &nl.lab,
        &a.node,
        &b.address,
        "direct",
        Duration::from_secs(25),
    );
    let (sent, got) = replies(&mut nl, flow);
    // Lost: what went into the blocked path until the fallback, no more.
    assert!(
        sent - got <= 7 * 5 + 2,
        "{} of {sent} pings lost around a fallback taking {fell:?}",
        sent - got
    );
    let _ = (rtt_to(&nl.lab, &a.node, &b.address), &b);
}

/// The data plane outlives the hub across a restart too: a site brought
/// up again while the hub is gone takes its peers from the map it cached
/// (0600), its old port, and goes direct again.
#[test]
#[ignore = "needs root: sudo make test"]
fn a_site_brought_up_while_the_hub_is_down_goes_direct_from_its_cached_map() {
    needs_root("a_site_brought_up_while_the_hub_is_down_goes_direct_from_its_cached_map");
    use std::os::unix::fs::PermissionsExt;
    let mut nl = NatLab::new(BIN, None);
    let ha = nl.site(Nat::Masquerade).1;
    let hb = nl.site(Nat::Masquerade).1;
    let hub = nl.mesh_hub(2, &[]);
    let a = nl.mesh_join(&ha, "a", &hub.lines[0].clone(), &[]);
    let b = nl.mesh_join(&hb, "b", &hub.lines[1].clone(), &[]);
    reach(&hb, &a.address);
    wait_path(&nl.lab, &b.node, &a.address, "direct", DIRECT);
    let cache = b.node.state.join(format!("{}.mesh", b.node.iface));
    let mode = std::fs::metadata(&cache)
        .expect("a cached map")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{}", cache.display());

    nl.lab.proc(hub.proc).kill();
    assert!(nl.lab.proc(b.node.proc).terminate().success());
    let mut args = b.node.local("up");
    args.extend(["--timeout", "2s"]);
    let up = nl.lab.spawn(&hb, &args);
    nl.lab.proc(up).wait_lines(1, common::UP);
    common::until("traffic from the site brought up without its hub", || {
        (pings(&hb, &a.address, 1, "0.2") == 1).then_some(())
    });
    let p = path_to(&nl.lab, &b.node, &a.address).unwrap_or_default();
    assert!(p.starts_with("direct"), "{p}");
    assert!(nl.lab.proc(up).terminate().success());
}

/// A site whose network lets no UDP out reaches the hub over WebSocket;
/// its pairs go through the relay over that link, encrypted end to end.
#[test]
#[ignore = "needs root: sudo make test"]
fn a_site_without_udp_is_relayed_over_its_websocket() {
    needs_root("a_site_without_udp_is_relayed_over_its_websocket");
    let mut nl = NatLab::new(BIN, None);
    let (rw, hw) = nl.site(Nat::Masquerade);
    let ha = nl.site(Nat::Masquerade).1;
    // Only TCP leaves the WebSocket site's network.
    common::nft(
        &rw.ns,
        "table inet noudp {\n chain out {\n type filter hook forward priority filter; policy accept;\n meta l4proto udp drop\n }\n}\n",
    );
    let hub = nl.mesh_hub(2, &["--transport", "udp,wss", "--wss-listen", "[::]:8443"]);
    let a = nl.mesh_join(&ha, "a", &hub.lines[0].clone(), &[]);
    let w = nl.mesh_join(&hw, "w", &hub.lines[1].clone(), &["--transport", "wss"]);
    reach(&hw, &a.address);
    reach(&ha, &w.address);
    std::thread::sleep(Duration::from_secs(3));
    let p = path_to(&nl.lab, &a.node, &w.address).unwrap_or_default();
    assert!(p.starts_with("relay"), "{p}");
    let tun_before = nl.hub.link_counters(&hub.iface);
    assert_eq!(
        bulk(&ha, &hw, tunnel_addr(&w.address, 5203), 2 * MB),
        2 * MB
    );
    let tun = nl.hub.link_counters(&hub.iface).since(&tun_before);
    assert!(
        tun.bytes() < MB as u64 / 2,
        "{} B in clear on the hub",
        tun.bytes()
    );
    let s = status_json(&nl.lab, &hub);
    assert!(
        s["mesh"]["relayed_bytes"].as_u64().unwrap_or(0) > 2 * MB as u64,
        "{s}"
    );
}
