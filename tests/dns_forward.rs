//! The hub's resolver beyond the tunnel's names: a name outside the zone
//! is resolved by the hub host's own resolvers (here a stand-in upstream
//! in the hub's namespace, given to it through `ip netns exec`'s
//! /etc/netns/NS/resolv.conf), cached, and only for tunnel peers.

mod common;

use common::{Host, needs_root};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// `/etc/netns/NS/resolv.conf` naming 127.0.0.1, removed again on drop.
struct ResolvConf(std::path::PathBuf);

impl ResolvConf {
    fn new(ns: &str) -> Self {
        let dir = std::path::PathBuf::from(format!("/etc/netns/{ns}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        ResolvConf(dir)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An upstream resolver on 127.0.0.1:53 in `host`: `www.example.test`
/// is 192.0.2.55, every other name NXDOMAIN. Counts the queries it gets.
struct Upstream {
    asked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start(host: &Host) -> Self {
        let asked = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (asked.clone(), stop.clone());
        let ready = std::sync::mpsc::channel();
        host.in_ns(move || {
            let sock = UdpSocket::bind("127.0.0.1:53").unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            ready.0.send(()).unwrap();
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let q = Message::from_vec(&buf[..n]).unwrap();
                a.fetch_add(1, Ordering::Relaxed);
                let mut r = Message::response(q.metadata.id, q.metadata.op_code);
                r.metadata.recursion_available = true;
                r.add_queries(q.queries.clone());
                let name = q.queries[0].name().clone();
                if name.to_ascii() == "www.example.test." {
                    if q.queries[0].query_type() == RecordType::A {
                        r.add_answer(Record::from_rdata(
                            name,
                            300,
                            RData::A(A("192.0.2.55".parse().unwrap())),
                        ));
                    }
                } else {
                    r.metadata.response_code = ResponseCode::NXDomain;
                }
                sock.send_to(&r.to_vec().unwrap(), from).unwrap();
            }
        });
        ready.1.recv_timeout(Duration::from_secs(5)).unwrap();
        Upstream { asked, stop }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Asks `server` for `name`'s A records from `host`: the answer.
fn ask(host: &Host, server: &str, name: &str) -> Message {
    let (server, name) = (server.to_owned(), name.to_owned());
    host.in_ns(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut q = Message::query();
        q.metadata.id = 4242;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(
            Name::from_ascii(&name).unwrap(),
            RecordType::A,
        ));
        sock.send_to(&q.to_vec().unwrap(), (server.as_str(), 53))
            .unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = sock.recv_from(&mut buf).expect("an answer");
        Message::from_vec(&buf[..n]).unwrap()
    })
    .join()
    .unwrap()
}

fn addrs(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
#[ignore = "needs root: sudo make test"]
fn the_hub_resolves_names_beyond_the_tunnel_for_its_peers_only() {
    needs_root("dns_forwarding");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let _conf = ResolvConf::new(&a.ns);
    let upstream = Upstream::start(&a);
    // B has a LAN whose hosts route the tunnel through B: they reach the
    // hub, but are not tunnel peers.
    let lan = lab.lan(&b, "192.168.90", "10.77.0.0/24");
    let hub = lab.serve(&a, "a", 1, &["--token-route", "192.168.90.0/24"]);
    let _site = lab.join(
        &b,
        "b",
        &hub.lines[0],
        &a,
        &["--route", "192.168.90.0/24", "--name", "b"],
    );

    // The tunnel's own names, as before.
    let own = ask(&b, "10.77.0.1", "b.tunnel.");
    assert_eq!(own.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&own), ["10.77.0.2"]);
    assert_eq!(upstream.asked.load(Ordering::Relaxed), 0);

    // A name outside the zone: resolved upstream, then from the cache.
    let www = ask(&b, "10.77.0.1", "www.example.test.");
    assert_eq!(www.metadata.response_code, ResponseCode::NoError, "{www:?}");
    assert_eq!(addrs(&www), ["192.0.2.55"]);
    assert_eq!(www.metadata.id, 4242);
    assert!(www.metadata.recursion_available);
    let asked = upstream.asked.load(Ordering::Relaxed);
    assert!(asked >= 1);
    assert_eq!(
        addrs(&ask(&b, "10.77.0.1", "www.example.test.")),
        ["192.0.2.55"]
    );
    assert_eq!(upstream.asked.load(Ordering::Relaxed), asked, "not cached");
    let gone = ask(&b, "10.77.0.1", "gone.example.test.");
    assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);

    // Not an open resolver: a host on B's LAN reaches the hub's DNS, and
    // gets the tunnel's names but nothing else.
    let from_lan = ask(&lan, "10.77.0.1", "www.example.test.");
    assert_eq!(from_lan.metadata.response_code, ResponseCode::Refused);
    assert_eq!(addrs(&ask(&lan, "10.77.0.1", "b.tunnel.")), ["10.77.0.2"]);
}
