//! The path core driven by a simulated network: what answers, with which
//! round trip, and when a path breaks.

use super::*;
use crate::keys::PrivateKey;
use std::collections::BTreeMap;

/// Distinct transaction ids; nothing here needs them unpredictable.
struct Rng(u64);

impl RngCore for Rng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let n = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&n[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// A's view of one peer B, and a network that answers A's pings.
struct Sim {
    paths: Paths,
    rng: Rng,
    now: Instant,
    start: Instant,
    peer: PublicKey,
    /// Round trip of each address that answers; absent ones drop pings.
    answers: BTreeMap<SocketAddr, Duration>,
    /// Pongs on their way: (arrival, from, txid).
    inflight: Vec<(Instant, SocketAddr, [u8; 12])>,
    /// Every endpoint A set, with when.
    set: Vec<(Duration, Chosen)>,
    pings: Vec<(Duration, SocketAddr)>,
    call_mes: usize,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn peer(key: PublicKey, candidates: &[&str]) -> MeshPeer {
    MeshPeer {
        public_key: key,
        addresses: vec!["10.77.0.3".parse().unwrap()],
        routes: vec![],
        name: Some("b".into()),
        candidates: candidates.iter().map(|c| addr(c)).collect(),
        nat: None,
    }
}

impl Sim {
    /// A pair whose first packet goes at the start.
    fn new(candidates: &[&str], local: &[&str]) -> Sim {
        let mut s = Sim::quiet(candidates, local);
        s.traffic();
        s
    }

    /// A pair nobody sends anything to.
    fn quiet(candidates: &[&str], local: &[&str]) -> Sim {
        let start = Instant::now();
        let key = PrivateKey::generate().public_key();
        let mut paths = Paths::new(
            Timings::default(),
            local.iter().map(|n| n.parse().unwrap()).collect(),
        );
        paths.set_peers(&[peer(key, candidates)], start);
        let mut answers = BTreeMap::new();
        answers.insert(relay_addr_of(), Duration::from_millis(40));
        Sim {
            paths,
            rng: Rng(7),
            now: start,
            start,
            peer: key,
            answers,
            inflight: vec![],
            set: vec![],
            pings: vec![],
            call_mes: 0,
        }
    }

    fn answer(&mut self, a: &str, rtt_ms: u64) {
        self.answers.insert(addr(a), Duration::from_millis(rtt_ms));
    }

    fn block(&mut self, a: &str) {
        self.answers.remove(&addr(a));
    }

    fn at(&self) -> Duration {
        self.now - self.start
    }

    /// Runs the core and the network for `d`, in 10 ms steps.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            let (due, later): (Vec<_>, Vec<_>) =
                self.inflight.drain(..).partition(|(t, ..)| *t <= self.now);
            self.inflight = later;
            for (_, from, txid) in due {
                self.paths.on_pong(&self.peer, from, txid, self.now);
            }
            for e in self.paths.poll(self.now, &mut self.rng) {
                match e {
                    Effect::Ping { to, txid, .. } => {
                        self.pings.push((self.at(), to));
                        if let Some(rtt) = self.answers.get(&to) {
                            self.inflight.push((self.now + *rtt, to, txid));
                        }
                    }
                    Effect::CallMe { .. } => self.call_mes += 1,
                    Effect::SetPath { path, .. } => self.set.push((self.at(), path)),
                }
            }
            self.now += Duration::from_millis(10);
        }
    }

    fn traffic(&mut self) {
        self.paths.on_traffic(&self.peer, self.now);
    }

    fn chosen(&self) -> Chosen {
        self.paths.chosen(&self.peer).unwrap()
    }
}

fn relay_addr_of() -> SocketAddr {
    crate::mesh::relay_addr(u32::from(std::net::Ipv4Addr::new(10, 77, 0, 3)))
}

#[test]
fn a_peer_starts_relayed_and_goes_direct_only_once_a_pong_proved_the_path() {
    let mut s = Sim::new(&["198.51.100.2:4000"], &[]);
    s.answer("198.51.100.2:4000", 5);
    s.run(Duration::from_millis(1));
    assert_eq!(s.chosen(), Chosen::Relay, "nothing proven yet");
    assert_eq!(s.call_mes, 1, "a relayed peer is asked to call back");
    s.run(Duration::from_millis(100));
    assert_eq!(s.chosen(), Chosen::Direct(addr("198.51.100.2:4000")));
    let (when, _) = s.set[0];
    assert!(
        when >= Duration::from_millis(5),
        "set before the pong: {when:?}"
    );
}

#[test]
fn the_lowest_round_trip_wins_and_a_lan_address_gets_its_bonus() {
    let mut s = Sim::new(&["198.51.100.2:4000", "203.0.113.5:4000"], &[]);
    s.answer("198.51.100.2:4000", 30);
    s.answer("203.0.113.5:4000", 8);
    s.run(Duration::from_millis(500));
    assert_eq!(s.chosen(), Chosen::Direct(addr("203.0.113.5:4000")));

    // A LAN address one millisecond slower still wins: it is on our net.
    let mut s = Sim::new(
        &["198.51.100.2:4000", "192.168.1.7:4000"],
        &["192.168.1.0/24"],
    );
    s.answer("198.51.100.2:4000", 3);
    s.answer("192.168.1.7:4000", 4);
    s.run(Duration::from_millis(500));
    assert_eq!(s.chosen(), Chosen::Direct(addr("192.168.1.7:4000")));
}

#[test]
fn a_slightly_better_path_does_not_replace_the_one_in_use() {
    let mut s = Sim::new(&["198.51.100.2:4000"], &[]);
    s.answer("198.51.100.2:4000", 20);
    s.run(Duration::from_millis(500));
    assert_eq!(s.chosen(), Chosen::Direct(addr("198.51.100.2:4000")));
    // A second address shows up, barely faster: no flapping to it...
    s.paths
        .on_call_me(&s.peer.clone(), Some(addr("203.0.113.5:4000")), s.now);
    s.answer("203.0.113.5:4000", 19);
    s.run(Duration::from_secs(3));
    assert_eq!(s.chosen(), Chosen::Direct(addr("198.51.100.2:4000")));
    assert_eq!(s.set.len(), 1);
    // ...but one clearly faster is taken.
    s.answer("203.0.113.6:4000", 5);
    s.paths
        .on_call_me(&s.peer.clone(), Some(addr("203.0.113.6:4000")), s.now);
    s.run(Duration::from_secs(3));
    assert_eq!(s.chosen(), Chosen::Direct(addr("203.0.113.6:4000")));
}

#[test]
fn a_direct_path_that_stops_answering_falls_back_to_the_relay_within_seven_seconds() {
    let mut s = Sim::new(&["198.51.100.2:4000"], &[]);
    s.answer("198.51.100.2:4000", 5);
    s.run(Duration::from_secs(1));
    assert!(matches!(s.chosen(), Chosen::Direct(_)));
    for _ in 0..30 {
        s.traffic();
        s.run(Duration::from_millis(100));
    }
    let broke = s.at();
    s.block("198.51.100.2:4000");
    for _ in 0..100 {
        s.traffic();
        s.run(Duration::from_millis(100));
        if s.chosen() == Chosen::Relay {
            break;
        }
    }
    assert_eq!(s.chosen(), Chosen::Relay);
    let took = s.set.last().unwrap().0 - broke;
    assert!(took <= Duration::from_secs(7), "fell back after {took:?}");
    // Unblocked, it comes back direct on the next round (traffic flows:
    // within the active re-probe interval).
    s.answer("198.51.100.2:4000", 5);
    for _ in 0..150 {
        s.traffic();
        s.run(Duration::from_millis(100));
    }
    assert!(matches!(s.chosen(), Chosen::Direct(_)));
}

#[test]
fn an_idle_path_survives_one_lost_heartbeat() {
    let mut s = Sim::new(&["198.51.100.2:4000"], &[]);
    s.answer("198.51.100.2:4000", 5);
    s.run(Duration::from_secs(1));
    let direct = s.chosen();
    // One heartbeat lost: the path is pinged again quickly, answers, stays.
    s.run(Duration::from_secs(15));
    s.block("198.51.100.2:4000");
    s.run(Duration::from_secs(6));
    s.answer("198.51.100.2:4000", 5);
    s.run(Duration::from_secs(3));
    assert_eq!(s.chosen(), direct);
    assert_eq!(s.set.len(), 1, "{:?}", s.set);
}

#[test]
fn a_peer_nobody_talks_to_is_never_probed() {
    let mut s = Sim::quiet(&["198.51.100.2:4000"], &[]);
    s.answer("198.51.100.2:4000", 5);
    s.run(Duration::from_secs(120));
    assert!(s.pings.is_empty(), "{:?}", s.pings);
    assert_eq!(s.chosen(), Chosen::Relay);
    // Its first packet starts a round at once.
    s.traffic();
    s.run(Duration::from_millis(100));
    assert!(matches!(s.chosen(), Chosen::Direct(_)));
}

#[test]
fn relayed_peers_are_probed_quickly_at_first_then_seldom_and_not_at_all_once_idle() {
    let mut s = Sim::new(&["198.51.100.2:4000"], &[]);
    let rounds = |s: &Sim, from: u64, to: u64| {
        s.pings
            .iter()
            .filter(|(t, a)| {
                *a == addr("198.51.100.2:4000")
                    && *t >= Duration::from_secs(from)
                    && *t < Duration::from_secs(to)
            })
            .count()
    };
    s.run(Duration::from_secs(300));
    // 0, 1, 3, 7, 15 s: a lost first race costs seconds, not a minute.
    assert_eq!(rounds(&s, 0, 16), 5, "{:?}", s.pings);
    // A minute after the last packet, no more rounds.
    assert_eq!(rounds(&s, 70, 300), 0, "{:?}", s.pings);
    assert_eq!(s.chosen(), Chosen::Relay);
    // While traffic flows, a round at least every 10 s.
    let before = rounds(&s, 0, 1000);
    for _ in 0..300 {
        s.traffic();
        s.run(Duration::from_millis(100));
    }
    let more = rounds(&s, 0, 1000) - before;
    assert!((3..=8).contains(&more), "{more} rounds in 30 s of traffic");
}

#[test]
fn heartbeats_follow_traffic() {
    let mut s = Sim::new(&["198.51.100.2:4000"], &[]);
    s.answer("198.51.100.2:4000", 5);
    // The first packet's traffic is over after 10 s.
    s.run(Duration::from_secs(11));
    let count = |s: &Sim, from: Duration| s.pings.iter().filter(|(t, _)| *t >= from).count();
    let t0 = s.at();
    s.run(Duration::from_secs(30));
    let idle = count(&s, t0);
    let t1 = s.at();
    for _ in 0..300 {
        s.traffic();
        s.run(Duration::from_millis(100));
    }
    let active = count(&s, t1);
    assert!(idle <= 3, "{idle} pings in 30 s idle");
    assert!(active >= 15, "{active} pings in 30 s of traffic");
}

#[test]
fn a_pong_from_elsewhere_or_for_no_ping_changes_nothing() {
    let mut s = Sim::new(&["198.51.100.2:4000"], &[]);
    s.run(Duration::from_millis(20));
    let (_, to) = s.pings[0];
    assert_eq!(to, addr("198.51.100.2:4000"));
    // Forged or stray pongs: no txid of ours, or ours from another address.
    s.paths
        .on_pong(&s.peer.clone(), addr("198.51.100.2:4000"), [9; 12], s.now);
    s.paths
        .on_ping(&s.peer.clone(), addr("203.0.113.66:1"), s.now);
    s.run(Duration::from_millis(20));
    assert_eq!(s.chosen(), Chosen::Relay);
    // A ping from a new address makes it a candidate, probed within a second.
    let probed = s.pings.iter().any(|(_, a)| *a == addr("203.0.113.66:1"));
    s.run(Duration::from_millis(1100));
    assert!(probed || s.pings.iter().any(|(_, a)| *a == addr("203.0.113.66:1")));
}

#[test]
fn a_peer_gone_from_the_map_is_forgotten_and_pending_probes_are_bounded() {
    let mut s = Sim::new(&["198.51.100.2:4000"], &[]);
    s.run(Duration::from_millis(20));
    s.paths.set_peers(&[], s.now);
    assert!(s.paths.view().is_empty());
    assert!(s.paths.poll(s.now, &mut s.rng).is_empty());
    // A flood of "call me" for many peers never holds more than the cap.
    let many: Vec<MeshPeer> = (0..3000)
        .map(|i| {
            let mut p = peer(PrivateKey::generate().public_key(), &["198.51.100.2:4000"]);
            p.addresses = vec![std::net::Ipv4Addr::from(0x0a4d_0000 + i).into()];
            p
        })
        .collect();
    s.paths.set_peers(&many, s.now);
    s.paths.poll(s.now, &mut s.rng);
    assert!(s.paths.pending.len() <= MAX_PENDING);
}
