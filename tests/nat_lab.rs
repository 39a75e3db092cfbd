//! The NAT lab (`tunnel_lab::NatLab`) that the mesh's NAT traversal is
//! tested in: each kind of NAT behaves as named, with real UDP. An echo
//! server in the hub's namespace answers each datagram with its source as
//! the hub sees it, i.e. the site's public mapping; a site sends from one
//! fixed port to two ports of the hub and compares what was seen.

mod common;

use common::{Host, Nat, NatLab, needs_root};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const HUB: &str = "198.18.0.1";
/// The hub's echo ports.
const ECHO: [u16; 2] = [7001, 7002];
/// A port of the hub that no site has sent to.
const STRANGER: u16 = 7003;
/// The port every site sends from.
const SITE: u16 = 5000;
/// How long a datagram that should not arrive is waited for.
const QUIET: Duration = Duration::from_millis(500);

/// Echo servers on the hub's [`ECHO`] ports; stop when dropped.
struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Echo {
    fn start(hub: &Host) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        // Bound before this returns: no datagram can come too early.
        let threads = ECHO
            .iter()
            .map(|&port| {
                let sock = hub.udp_socket(port);
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1500];
                    while !stop.load(Ordering::SeqCst) {
                        if let Ok((_, from)) = sock.recv_from(&mut buf) {
                            let _ = sock.send_to(from.to_string().as_bytes(), from);
                        }
                    }
                })
            })
            .collect();
        Echo { stop, threads }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn hub(port: u16) -> SocketAddr {
    SocketAddr::new(HUB.parse().unwrap(), port)
}

/// `sock`'s mapping as the hub's echo on `port` sees it (retried: the
/// first datagram may wait for ARP on three links).
fn observed(sock: &UdpSocket, port: u16) -> SocketAddr {
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 1500];
    for _ in 0..10 {
        sock.send_to(b"who am i", hub(port)).unwrap();
        // Late answers from another port or attempt are skipped.
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if from == hub(port) {
                return std::str::from_utf8(&buf[..n]).unwrap().parse().unwrap();
            }
        }
    }
    panic!("no answer from the hub's port {port}");
}

/// Whether a datagram `what` reaches `sock` within [`QUIET`] (other
/// datagrams are skipped); gives its source.
fn receives(sock: &UdpSocket, what: &[u8]) -> Option<SocketAddr> {
    let until = Instant::now() + QUIET;
    let mut buf = [0u8; 1500];
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match sock.recv_from(&mut buf) {
            Ok((n, from)) if &buf[..n] == what => return Some(from),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Sends `what` from `from` to `to` until it reaches `sock` (a few tries:
/// the first may wait for ARP); gives its source as `sock` saw it.
fn reaches(from: &UdpSocket, to: SocketAddr, sock: &UdpSocket, what: &[u8]) -> Option<SocketAddr> {
    (0..3).find_map(|_| {
        from.send_to(what, to).unwrap();
        receives(sock, what)
    })
}

/// The namespaces of lab `id` that `ip netns list` still shows.
fn namespaces_of(id: &str) -> Vec<String> {
    let prefix = format!("tnl{id}");
    common::sh(&["ip", "netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        // tnl12 must not claim tnl123's namespaces: ours go on with a letter.
        .filter(|ns| {
            ns.strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_alphabetic()))
        })
        .map(str::to_owned)
        .collect()
}

/// A site behind `nat`'s mapping for the two echo ports, checked to be on
/// the router's public address.
fn mappings(nat: Nat) -> (SocketAddr, SocketAddr) {
    let mut net = NatLab::new(common::BIN, None);
    let (router, site) = net.site(nat);
    let _echo = Echo::start(&net.hub);
    let sock = site.udp_socket(SITE);
    let seen = (observed(&sock, ECHO[0]), observed(&sock, ECHO[1]));
    for s in [seen.0, seen.1] {
        assert_eq!(s.ip().to_string(), router.public, "{nat:?}");
    }
    seen
}

#[test]
#[ignore = "needs root: sudo make test"]
fn masquerade_and_full_cone_map_a_port_the_same_for_every_destination() {
    needs_root("nat_lab endpoint-independent mapping");
    for nat in [Nat::Masquerade, Nat::FullCone] {
        let (a, b) = mappings(nat);
        assert_eq!(a, b, "{nat:?} mapped one port differently per destination");
    }
}

#[test]
#[ignore = "needs root: sudo make test"]
fn symmetric_maps_each_destination_to_a_new_port() {
    needs_root("nat_lab symmetric");
    let (a, b) = mappings(Nat::Symmetric);
    assert_ne!(a.port(), b.port(), "one port for two destinations");
}

#[test]
#[ignore = "needs root: sudo make test"]
fn full_cone_lets_strangers_in_and_masquerade_does_not() {
    needs_root("nat_lab filtering");
    let mut net = NatLab::new(common::BIN, None);
    let _echo = Echo::start(&net.hub);
    let stranger = net.hub.udp_socket(STRANGER);
    // Another router's site is a stranger too, from another address.
    let (_, other) = net.site(Nat::Masquerade);
    let other = other.udp_socket(SITE);
    for (nat, gets_in) in [(Nat::FullCone, true), (Nat::Masquerade, false)] {
        let (_, site) = net.site(nat);
        let sock = site.udp_socket(SITE);
        let mapping = observed(&sock, ECHO[0]);
        for (who, from) in [
            ("the hub's other port", &stranger),
            ("another site", &other),
        ] {
            let what = format!("from {who} to {nat:?}");
            let got = reaches(from, mapping, &sock, what.as_bytes());
            assert_eq!(got.is_some(), gets_in, "{what}: {got:?}");
        }
        // The mapping itself still works.
        assert_eq!(observed(&sock, ECHO[0]), mapping, "{nat:?}");
    }
}

#[test]
#[ignore = "needs root: sudo make test"]
fn full_cone_sends_each_mapping_to_its_own_site() {
    needs_root("nat_lab full cone, two sites");
    let mut net = NatLab::new(common::BIN, None);
    let (router, a) = net.site(Nat::FullCone);
    let b = net.site_behind(&router);
    let _echo = Echo::start(&net.hub);
    // Both from the same port: the second cannot keep it on the router.
    let (sa, sb) = (a.udp_socket(SITE), b.udp_socket(SITE));
    let (ma, mb) = (observed(&sa, ECHO[0]), observed(&sb, ECHO[0]));
    assert_ne!(ma, mb, "two sites on one mapping");
    let stranger = net.hub.udp_socket(STRANGER);
    for (sock, mapping, to) in [(&sa, ma, "a"), (&sb, mb, "b")] {
        let what = format!("to {to}");
        let got = reaches(&stranger, mapping, sock, what.as_bytes());
        assert_eq!(got, Some(hub(STRANGER)), "{what} at {mapping}");
    }
}

#[test]
#[ignore = "needs root: sudo make test"]
fn double_nat_maps_a_port_the_same_for_every_destination() {
    needs_root("nat_lab double NAT");
    let mut net = NatLab::new(common::BIN, None);
    let (home, site) = net.double_nat();
    let carrier = home.upstream.as_deref().expect("a carrier");
    assert!(home.wan.starts_with("100.64."), "{}", home.wan);
    assert_eq!(home.public, carrier.wan);
    let _echo = Echo::start(&net.hub);
    let sock = site.udp_socket(SITE);
    let (a, b) = (observed(&sock, ECHO[0]), observed(&sock, ECHO[1]));
    assert_eq!(a.ip().to_string(), carrier.public);
    assert_eq!(a, b, "mapped one port differently per destination");
}

#[test]
#[ignore = "needs root: sudo make test"]
fn two_sites_behind_one_router_reach_each_other_by_lan_address() {
    needs_root("nat_lab shared LAN");
    let mut net = NatLab::new(common::BIN, None);
    let (router, a) = net.site(Nat::Masquerade);
    let b = net.site_behind(&router);
    assert_eq!(a.ip, format!("{}.2", router.lan_prefix));
    assert_eq!(b.ip, format!("{}.3", router.lan_prefix));
    let (sa, sb) = (a.udp_socket(SITE), b.udp_socket(SITE));
    let to_b = SocketAddr::new(b.ip.parse().unwrap(), SITE);
    let from = reaches(&sa, to_b, &sb, b"neighbour").expect("a reaches b on the LAN");
    // Not translated: the LAN is the router's bridge, not its WAN.
    assert_eq!(from, SocketAddr::new(a.ip.parse().unwrap(), SITE));
    // Both go out through the same public address.
    let _echo = Echo::start(&net.hub);
    for s in [&sa, &sb] {
        assert_eq!(observed(s, ECHO[0]).ip().to_string(), router.public);
    }
}

#[test]
#[ignore = "needs root: sudo make test"]
fn block_cuts_two_routers_apart_but_not_from_the_hub() {
    needs_root("nat_lab block");
    let mut net = NatLab::new(common::BIN, None);
    let (ra, a) = net.site(Nat::FullCone);
    let (rb, b) = net.site(Nat::FullCone);
    let _echo = Echo::start(&net.hub);
    let (sa, sb) = (a.udp_socket(SITE), b.udp_socket(SITE));
    let (ma, mb) = (observed(&sa, ECHO[0]), observed(&sb, ECHO[0]));
    let from = reaches(&sa, mb, &sb, b"before").expect("a reaches b's mapping");
    assert_eq!(from, ma, "b sees a at its mapping");
    let blocked = net.block(&ra, &rb);
    assert_eq!(reaches(&sa, mb, &sb, b"during a to b"), None);
    assert_eq!(reaches(&sb, ma, &sa, b"during b to a"), None);
    assert_eq!(observed(&sa, ECHO[1]), ma, "a still reaches the hub");
    assert_eq!(observed(&sb, ECHO[1]), mb, "b still reaches the hub");
    blocked.unblock();
    assert!(reaches(&sa, mb, &sb, b"after a to b").is_some());
    assert!(reaches(&sb, ma, &sa, b"after b to a").is_some());
}

#[test]
#[ignore = "needs root: sudo make test"]
fn hub_delay_shows_in_a_round_trip_and_the_hub_link_counts_it() {
    needs_root("nat_lab delay");
    let delay = Duration::from_millis(40);
    let mut net = NatLab::new(common::BIN, Some(delay));
    let (_, site) = net.site(Nat::Masquerade);
    let _echo = Echo::start(&net.hub);
    let sock = site.udp_socket(SITE);
    observed(&sock, ECHO[0]); // ARP resolved, the flow mapped.
    let before = net.hub_link();
    let since = Instant::now();
    observed(&sock, ECHO[0]);
    let rtt = since.elapsed();
    println!("round trip {rtt:?} with {delay:?} each way");
    // The delay is on both directions of the hub's link.
    assert!(
        rtt >= 2 * delay,
        "round trip {rtt:?} with {delay:?} each way"
    );
    // Not much more either (generous: the tests run side by side).
    assert!(rtt < 2 * delay + Duration::from_secs(1), "{rtt:?}");
    let used = net.hub_link().since(&before);
    assert!(used.rx_packets >= 1 && used.tx_packets >= 1, "{used:?}");
    assert!(used.rx_bytes >= 8 + 28 && used.tx_bytes >= 28, "{used:?}");
    // The site's own link counted the same exchange.
    assert!(site.link_counters(&site.dev).tx_packets >= 2);
}

#[test]
#[ignore = "needs root: sudo make test"]
fn dropping_the_lab_removes_its_namespaces_even_after_a_panic() {
    needs_root("nat_lab cleanup");
    let lab_id = std::sync::Mutex::new(String::new());
    let failed = std::panic::catch_unwind(|| {
        let mut net = NatLab::new(common::BIN, Some(Duration::from_millis(5)));
        let (a, _) = net.site(Nat::FullCone);
        let (b, _) = net.double_nat();
        let _blocked = net.block(&a, &b);
        // internet, hub, 3 routers, 2 sites.
        assert_eq!(namespaces_of(&net.lab.id).len(), 7);
        *lab_id.lock().unwrap() = net.lab.id.clone();
        panic!("a test failing on purpose with its NAT lab up");
    });
    assert!(failed.is_err());
    let id = lab_id.into_inner().unwrap();
    assert_eq!(namespaces_of(&id), Vec::<String>::new());
}
