//! Who the hub lets do what, tried as an attacker would: a client that
//! signs its own requests with the documented scheme, against a hub with
//! sites, a road warrior and tokens in namespaces. Each test is a finding
//! of the authorization review (issue 18) and failed on the code before it.

mod common;

use common::needs_root;
use ipnetwork::IpNetwork;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};
use tunnel::control::auth::Signer;
use tunnel::control::{ControlError, tunnel as api};
use tunnel::keys::{PrivateKey, PublicKey};

const HUB_API: &str = "10.77.0.1:51821";

/// A command's words followed by more.
fn with<'a>(head: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
    head.iter().chain(tail).copied().collect()
}

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

/// `routes`, advertised from `host` and signed with `key`: the hub's answer.
fn advertise(
    host: &common::Host,
    key: PrivateKey,
    hub: PublicKey,
    routes: Vec<IpNetwork>,
) -> Result<Vec<IpNetwork>, ControlError> {
    host.block_on(move || async move {
        let signer = Signer::new(&key, &hub).unwrap();
        api::advertise_routes(
            api::HubApi::routed(HUB_API.parse().unwrap()),
            &signer,
            &routes,
            Duration::from_secs(5),
        )
        .await
    })
}

fn refused(r: Result<impl std::fmt::Debug, ControlError>) -> (u16, String) {
    match r {
        Err(ControlError::Refused { status, message }) => (status, message),
        other => panic!("wanted a refusal, got {other:?}"),
    }
}

/// The prefixes the hub's kernel routes into its tunnel.
fn tunnel_routes(host: &common::Host, iface: &str) -> String {
    host.run(&["ip", "route", "show", "dev", iface])
}

/// A stock wireguard-go on `host` with `key`, the hub as its only peer.
fn stock_client(
    lab: &mut common::Lab,
    host: &common::Host,
    hub: &common::Host,
    key: &PrivateKey,
    server: PublicKey,
    address: IpNetwork,
) -> String {
    let wg = lab.iface("x");
    let keyfile = lab.dir.path().join(format!("{wg}.key"));
    std::fs::write(&keyfile, key.to_base64().as_bytes()).unwrap();
    host.run(&["wireguard-go", &wg]);
    host.run(&[
        "wg",
        "set",
        &wg,
        "private-key",
        keyfile.to_str().unwrap(),
        "peer",
        &server.to_string(),
        "endpoint",
        &format!("{}:51820", hub.ip),
        "allowed-ips",
        "10.77.0.0/24",
        "persistent-keepalive",
        "1",
    ]);
    host.run(&["ip", "addr", "add", &address.to_string(), "dev", &wg]);
    host.run(&["ip", "link", "set", &wg, "up"]);
    wg
}

/// Waits until `host` reaches the control API (the handshake is done).
fn reach_api(host: &common::Host) {
    let ok = host.block_on(|| async {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match api::ping(
                api::HubApi::routed(HUB_API.parse().unwrap()),
                Duration::from_secs(1),
            )
            .await
            {
                Ok(()) => return true,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(_) => return false,
            }
        }
    });
    assert!(ok, "the control API never answered");
}

/// Whether a DNS query to the hub gets any answer within a second.
fn dns_answers(host: &common::Host) -> bool {
    host.in_ns(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        // id 7, recursion desired, one question: "hub.tunnel" A IN.
        let mut q = vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["hub", "tunnel"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let mut buf = [0u8; 512];
        (0..2).any(|_| sock.send_to(&q, "10.77.0.1:53").is_ok() && sock.recv_from(&mut buf).is_ok())
    })
    .join()
    .unwrap()
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_site_takes_no_address_range_without_approval_and_none_that_is_not_its_to_take() {
    needs_root("routes_need_approval");
    let mut lab = common::lab(3);
    let (a, b, c) = (lab.host(0), lab.host(1), lab.host(2));
    // The hub's own LAN, directly connected and not routed for peers.
    let _lan = lab.lan(&a, "192.168.77", "10.77.0.0/24");
    let hub = lab.serve(&a, "a", 2, &[]);
    let site_b = lab.join(&b, "b", &hub.lines[0].clone(), &a, &[]);
    let site_c = lab.join(&c, "c", &hub.lines[1].clone(), &a, &[]);
    let (key_c, server) = common::keys(&site_c);
    let c_addr = common::site_address(&site_c);
    assert!(b.ping(&c_addr), "B reaches C before anything");

    // C claims B's public address, the hub's LAN (whole, part, wider) and
    // the hub's own underlay network: refused with the reason, whatever
    // an operator might approve.
    let underlay = IpNetwork::new(a.ip.parse().unwrap(), 24).unwrap();
    let underlay = IpNetwork::new(underlay.network(), 24).unwrap();
    for (prefix, why) in [
        (
            format!("{}/32", b.ip),
            "the address a node reaches the hub from",
        ),
        ("192.168.77.0/24".into(), "a network of the hub's own host"),
        ("192.168.77.0/25".into(), "a network of the hub's own host"),
        ("192.168.0.0/16".into(), "a network of the hub's own host"),
        (underlay.to_string(), "a network of the hub's own host"),
    ] {
        let (status, message) = refused(advertise(&c, key_c.clone(), server, vec![net(&prefix)]));
        assert!(
            status == 400 || status == 409,
            "{prefix}: {status} {message}"
        );
        // In the lab the sites share the hub's underlay network, so B's
        // address is refused as that network (the ledger's tests cover an
        // underlay address elsewhere).
        let why = if message.contains("hub's own host") {
            "a network of the hub's own host"
        } else {
            why
        };
        assert!(message.contains(why), "{prefix}: {message}");
        let out = lab.tunnel(
            &a,
            &with(
                &["route", "approve", &c_addr, &prefix],
                &hub.local("x")[1..],
            ),
        );
        common::failed_with(&out, 2, why);
    }
    // Nothing of it reached the hub's routes or B's.
    assert!(
        !tunnel_routes(&a, &hub.iface).contains(&b.ip),
        "{}",
        a.routes()
    );
    assert!(!b.routes().contains("192.168.77"), "{}", b.routes());
    assert!(
        b.ping("10.77.0.1") && b.ping(&c_addr),
        "B still reaches all"
    );

    // A LAN of its own waits for the operator.
    let pending = advertise(&c, key_c.clone(), server, vec![net("192.168.90.0/24")]).unwrap();
    assert_eq!(pending, [net("192.168.90.0/24")]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(!tunnel_routes(&a, &hub.iface).contains("192.168.90.0/24"));
    assert!(!b.routes().contains("192.168.90.0/24"), "{}", b.routes());
    let shown = lab.tunnel_ok(&a, &["status", "--state-dir", hub.state.to_str().unwrap()]);
    assert!(
        shown.contains("waiting for approval: 192.168.90.0/24"),
        "{shown}"
    );
    // Approved: the hub routes it, and B learns it within seconds.
    let out = lab.decide_route(&hub, &site_c, "approve", "192.168.90.0/24");
    assert!(out.contains("approved 192.168.90.0/24"), "{out}");
    assert!(tunnel_routes(&a, &hub.iface).contains("192.168.90.0/24"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.routes().contains("192.168.90.0/24") {
        assert!(
            Instant::now() < deadline,
            "B never learned the approved LAN"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Rejected: gone again, from the hub and from B.
    lab.decide_route(&hub, &site_c, "reject", "192.168.90.0/24");
    assert!(!tunnel_routes(&a, &hub.iface).contains("192.168.90.0/24"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.routes().contains("192.168.90.0/24") {
        assert!(Instant::now() < deadline, "B kept a rejected LAN");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A typo in the decision: one line, exit 2.
    let out = lab.tunnel(
        &a,
        &with(
            &["route", "approve", "nosuchsite", "192.168.91.0/24"],
            &hub.local("x")[1..],
        ),
    );
    common::failed_with(&out, 2, "no site is named or addressed");
    let out = lab.tunnel(
        &a,
        &with(
            &["route", "approve", &c_addr, "192.168.91.1/24"],
            &hub.local("x")[1..],
        ),
    );
    common::failed_with(&out, 2, "not a network address");
    assert!(lab.proc(hub.proc).running());
    drop(site_b);
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_road_warrior_may_only_ping() {
    needs_root("road_warrior_only_pings");
    let mut lab = common::lab(3);
    let (a, b, r) = (lab.host(0), lab.host(1), lab.host(2));
    let hub = lab.serve(&a, "a", 1, &["--endpoint", &a.ip]);
    lab.join(&b, "b", &hub.lines[0].clone(), &a, &[]);
    let key = PrivateKey::generate();
    let out = lab.tunnel_ok(
        &a,
        &with(
            &hub.local("peer")[..1],
            &[
                "add",
                "phone",
                "--public-key",
                &key.public_key().to_string(),
                "--iface",
                &hub.iface,
                "--state-dir",
                hub.state.to_str().unwrap(),
            ],
        ),
    );
    let address = out
        .lines()
        .find_map(|l| l.strip_prefix("Address = "))
        .and_then(|l| l.split(',').next())
        .unwrap_or_else(|| panic!("no address in {out}"))
        .trim()
        .parse()
        .unwrap();
    let server = common::keys(&hub).1;
    let wg = stock_client(&mut lab, &r, &a, &key, server, address);
    reach_api(&r);

    // Routes, an endpoint of its own, a leave: all refused, whatever it signs.
    let (status, message) = refused(advertise(
        &r,
        key.clone(),
        server,
        vec![net("192.168.9.0/24")],
    ));
    assert_eq!(status, 403, "{message}");
    assert!(message.contains("road warrior"), "{message}");
    let k = key.clone();
    let registered = r.block_on(move || async move {
        let signer = Signer::new(&k, &server).unwrap();
        api::register_endpoint(
            api::HubApi::routed(HUB_API.parse().unwrap()),
            &signer,
            &PrivateKey::generate().public_key(),
            "evil",
            Duration::from_secs(5),
        )
        .await
    });
    assert_eq!(refused(registered).0, 403);
    let listed = r.block_on(|| async {
        api::fetch_routes(
            api::HubApi::routed(HUB_API.parse().unwrap()),
            Duration::from_secs(5),
        )
        .await
    });
    assert_eq!(refused(listed).0, 403, "the LANs are for sites");
    let st = lab.status(&hub).to_string();
    assert!(!st.contains("evil") && !st.contains("192.168.9.0"), "{st}");
    r.run(&["ip", "link", "del", &wg]);
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_used_token_is_worthless_even_from_the_site_itself() {
    needs_root("used_token_worthless");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let hub = lab.serve(&a, "a", 1, &[]);
    let token_text = hub.lines[0].clone();
    let site = lab.join(&b, "b", &token_text, &a, &[]);
    let (own, server) = common::keys(&site);
    let saved = || {
        tunnel::store::StateDir::new(&hub.state)
            .load_server(&hub.iface)
            .unwrap()
            .unwrap()
    };
    let before = saved();

    // A local user on the site read the token from `ps` while join ran,
    // and the site's public key from anywhere: it redeems again, asking
    // for a LAN and SNAT, over the site's own tunnel.
    let token = tunnel::token::Token::decode(&token_text).unwrap();
    let (invite, site_key) = (token.invite_key.clone(), own.public_key());
    let again = b.block_on(move || async move {
        let signer = Signer::new(&invite, &server).unwrap();
        let joining = tunnel::hub::Joining {
            routes: vec!["192.168.99.0/24".parse().unwrap()],
            snat_public: true,
            name: None,
            default_name: true,
        };
        let redeem = api::redeem_invite(
            api::HubApi::routed(HUB_API.parse().unwrap()),
            &signer,
            &site_key,
            &joining,
            Duration::from_secs(5),
        )
        .await;
        let routes = api::advertise_routes(
            api::HubApi::routed(HUB_API.parse().unwrap()),
            &signer,
            &["192.168.98.0/24".parse().unwrap()],
            Duration::from_secs(5),
        )
        .await;
        (redeem, routes)
    });
    let (status, message) = refused(again.0);
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("already used"), "{message}");
    assert_eq!(refused(again.1).0, 403);
    assert_eq!(saved(), before, "nothing changed");
    assert!(!a.routes().contains("192.168.99"), "{}", a.routes());
    // The site itself is unharmed.
    assert!(b.ping("10.77.0.1"));
}

#[test]
#[ignore = "needs root: sudo make test"]
fn an_unused_token_reaches_the_control_api_and_nothing_else() {
    needs_root("unused_token_quarantined");
    let mut lab = common::lab(3);
    let (a, b, x) = (lab.host(0), lab.host(1), lab.host(2));
    let hub = lab.serve(&a, "a", 2, &[]);
    let site = lab.join(&b, "b", &hub.lines[0].clone(), &a, &[]);
    let site_addr = common::site_address(&site);
    let _web = common::WhoAmI::start(&a, "10.77.0.1:8080".parse().unwrap());

    // Stock wireguard-go with the second token's invite key.
    let token = tunnel::token::Token::decode(&hub.lines[1]).unwrap();
    let wg = stock_client(
        &mut lab,
        &x,
        &a,
        &token.invite_key,
        token.server_public_key,
        token.assigned_network(),
    );
    reach_api(&x);
    assert!(!x.ping("10.77.0.1"), "ICMP to the hub");
    assert!(!dns_answers(&x), "the hub's DNS answered an invite");
    assert_eq!(x.curl("http://10.77.0.1:8080/"), None, "another hub port");
    assert!(!x.ping(&site_addr), "forwarded to a site");
    assert!(
        !b.ping(&token.assigned.to_string()),
        "a site reached the invite"
    );
    // The same checks from the site, to show the network is not at fault.
    assert!(b.ping("10.77.0.1"));
    assert!(dns_answers(&b));
    x.run(&["ip", "link", "del", &wg]);

    // Redeemed, the joiner's own key is a site like any other.
    let joined = lab.join(&x, "x", &hub.lines[1].clone(), &a, &[]);
    assert!(x.ping("10.77.0.1") && x.ping(&site_addr));
    assert!(dns_answers(&x));
    drop(joined);
}

#[test]
#[ignore = "needs root: sudo make test"]
fn allow_from_closes_the_websocket_listener_too() {
    needs_root("allow_from_websocket");
    let mut lab = common::lab(3);
    let (a, inside, outside) = (lab.host(0), lab.host(1), lab.host(2));
    let hub = lab.serve(
        &a,
        "a",
        2,
        &[
            "--transport",
            "udp,wss",
            "--wss-listen",
            "[::]:8443",
            "--allow-from",
            &format!("{}/32", inside.ip),
        ],
    );
    // From outside every allowed network: neither UDP nor WebSocket.
    let (o_iface, o_state) = (lab.iface("o"), lab.state_dir("o"));
    let join = lab.spawn(
        &outside,
        &[
            "join",
            &hub.lines[0],
            &a.ip,
            "--iface",
            &o_iface,
            "--state-dir",
            o_state.to_str().unwrap(),
            "--backend",
            "userspace",
            "--transport",
            "wss",
            "--timeout",
            "5s",
        ],
    );
    // A join that got in runs until stopped: give it the time to fail.
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab.proc(join).running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let got_in = lab.proc(join).running() || lab.proc(join).stdout().contains("joined");
    assert!(!got_in, "a host outside --allow-from joined over wss");
    let reached = outside.in_ns({
        let ip = a.ip.clone();
        move || {
            TcpStream::connect_timeout(
                &SocketAddr::new(ip.parse().unwrap(), 8443),
                Duration::from_secs(2),
            )
            .is_ok()
        }
    });
    assert!(!reached.join().unwrap(), "the WebSocket port answered");
    // From inside, over wss, the same token works.
    let site = lab.join(
        &inside,
        "i",
        &hub.lines[0].clone(),
        &a,
        &["--transport", "wss"],
    );
    assert!(site.lines[0].contains("over wss"), "{:?}", site.lines);
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_site_reaches_the_hub_host_only_where_a_route_says_so_and_its_lan_counts_as_it() {
    needs_root("hub_host_input");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    // A service on the hub's LAN address, which the hub does not --route.
    let _lan = lab.lan(&a, "192.168.77", "10.77.0.0/24");
    let _svc = common::WhoAmI::start(&a, "192.168.77.1:8080".parse().unwrap());
    let hub = lab.serve(&a, "a", 1, &["--token-route", "192.168.50.0/24"]);
    let site = lab.join(
        &b,
        "b",
        &hub.lines[0].clone(),
        &a,
        &["--route", "192.168.50.0/24"],
    );
    let (_, hub_key) = common::keys(&site);
    // The site widens its side by hand towards the hub's LAN address.
    b.run(&[
        "wg",
        "set",
        &site.iface,
        "peer",
        &hub_key.to_string(),
        "allowed-ips",
        "10.77.0.0/24,192.168.77.1/32",
    ]);
    b.run(&["ip", "route", "add", "192.168.77.1/32", "dev", &site.iface]);
    assert_eq!(
        b.curl("http://192.168.77.1:8080/"),
        None,
        "a site reached a hub address that no route opens"
    );
    assert!(b.ping("10.77.0.1"), "the hub's tunnel address is open");

    // 40 connections to the control API from 40 addresses of the site's
    // approved LAN: they count as the site, whose cap is 16.
    for i in 10..50 {
        b.run(&[
            "ip",
            "addr",
            "add",
            &format!("192.168.50.{i}/32"),
            "dev",
            "lo",
        ]);
    }
    let held = b
        .in_ns(|| {
            use std::io::Read;
            use std::os::fd::{FromRawFd, IntoRawFd};

            // std cannot connect a bound socket: do it with nix, then wrap.
            let mut streams = vec![];
            for i in 10..50 {
                let s = nix::sys::socket::socket(
                    nix::sys::socket::AddressFamily::Inet,
                    nix::sys::socket::SockType::Stream,
                    nix::sys::socket::SockFlag::empty(),
                    None,
                )
                .unwrap();
                let src = nix::sys::socket::SockaddrIn::new(192, 168, 50, i, 0);
                nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&s), &src).unwrap();
                let dst = nix::sys::socket::SockaddrIn::new(10, 77, 0, 1, 51821);
                if nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&s), &dst).is_ok() {
                    streams.push(unsafe { TcpStream::from_raw_fd(s.into_raw_fd()) });
                }
            }
            std::thread::sleep(Duration::from_secs(1));
            // The hub closes what is over the cap at once: a read sees EOF.
            let mut alive = 0;
            for s in streams.iter_mut() {
                // All within the hub's 5 s header timeout: no waiting here.
                s.set_nonblocking(true).unwrap();
                let mut buf = [0u8; 1];
                if !matches!(s.read(&mut buf), Ok(0)) {
                    alive += 1;
                }
            }
            alive
        })
        .join()
        .unwrap();
    assert!(held <= 16, "{held} connections held from one site's LAN");
    assert!(held > 0, "none held: the test did not reach the API");
}
