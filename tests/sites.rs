//! Several sites the guides' way (seeds 001, 002, 004), end to end in
//! namespaces: LANs behind sites, gateways that masquerade, the hub's
//! firewall living beside Docker's, the port restriction, and nothing left
//! behind on exit or after a SIGKILL.

mod common;

use common::{
    Containers, Host, Lab, Node, WhoAmI, container_address, container_address6, fetch,
    needs_docker, needs_root, until,
};
use std::time::{Duration, Instant};

const UP: Duration = common::UP;
const LAN: &str = "192.168.50";

/// The link that `host` sends packets for `ip` out of.
fn link_to(host: &Host, ip: &str) -> String {
    let out = host.run(&["ip", "-o", "route", "get", ip]);
    let mut words = out.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == "dev")
        .and_then(|_| words.next())
        .unwrap_or_else(|| panic!("no route to {ip}: {out}"))
        .to_owned()
}

/// What `iptables-nft` shows of a chain (it must still be able to read it:
/// Docker manages its rules with it).
fn iptables(host: &Host, chain: &str) -> String {
    host.run(&["iptables", "-S", chain])
}

/// The host's nftables ruleset holds nothing of ours, and forwarding is
/// off again on `links`.
fn left_clean(host: &Host, node: &Node, links: &[&str]) {
    assert!(
        !host.has_nft_table(&format!("tunnel-{}", node.iface)),
        "table left in {}",
        host.ns
    );
    for l in links {
        assert!(
            !host.forwarding(l),
            "forwarding left on for {l} in {}",
            host.ns
        );
    }
    assert!(
        !node.state.join(format!("{}.host", node.iface)).exists(),
        "journal of host changes left"
    );
}

/// A web container serving a page, and a client container, for lab `lab`:
/// (the containers, web, cli, page).
fn web_and_cli(lab: &common::Lab) -> (Containers, String, String, String) {
    let (web, cli) = (format!("tnl{}web", lab.id), format!("tnl{}cli", lab.id));
    let page = format!("page-{}", lab.id);
    let mut cs = Containers::default();
    cs.web(&web, &page);
    cs.run(&cli, &["sleep", "3600"]);
    (cs, web, cli, page)
}

fn url(ip: &str) -> String {
    format!("http://{ip}:8080/")
}

#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn three_sites_and_two_containers_reach_a_lan_behind_a_masquerading_gateway() {
    needs_docker("three_sites_and_two_containers");
    let mut lab = common::lab(4);
    let (h, a, b, c) = (lab.host(0), lab.host(1), lab.host(2), lab.host(3));
    // The LAN host has no route back to the tunnel: only masquerading
    // gets replies home.
    let lan = lab.lan(&c, LAN, "198.18.0.0/15");
    let _whoami = WhoAmI::start(&lan, format!("{}:8080", lan.ip).parse().unwrap());
    a_docker_host(&h);
    let (_cs, web, cli, page) = web_and_cli(&lab);

    let hub = lab.serve(&h, "h", 4, &["--container", &web]);
    let site_a = lab.join(&a, "a", &hub.lines[0], &h, &["--container", &cli]);
    let site_b = lab.join(&b, "b", &hub.lines[1], &h, &[]);

    // Containers on the hub and on site A talk through the hub, whose
    // FORWARD policy is DROP.
    let web_ip = container_address(&lab.status(&hub), &web);
    let web_url = format!("http://{web_ip}/");
    until("cli cannot fetch from web through a Docker hub", || {
        (fetch(&cli, &web_url).as_deref() == Some(page.as_str())).then_some(())
    });
    let docker_user = iptables(&h, "DOCKER-USER");
    assert!(docker_user.contains(&hub.iface), "{docker_user}");

    without_route_the_lan_is_out_of_reach(&mut lab, &hub.lines[2], &site_b, &lan);

    // With --route and --masquerade, C is the LAN's gateway.
    let lan_link = link_to(&c, &lan.ip);
    let site_c = lab.join(
        &c,
        "d",
        &hub.lines[3],
        &h,
        &["--route", &format!("{LAN}.0/24"), "--masquerade"],
    );
    the_route_waits_for_approval(&lab, &hub, &b);
    lab.decide_route(&hub, &site_c, "approve", &format!("{LAN}.0/24"));
    the_lan_is_reached_through_the_gateway(&hub, &site_b, &cli, &lan);
    status_shows_the_route(&lab, &hub, &site_c);
    // C forwards for that prefix only: its other networks stay closed.
    c.run(&["ip", "addr", "add", "192.168.51.1/24", "dev", "lo"]);
    b.run(&[
        "ip",
        "route",
        "add",
        "192.168.51.0/24",
        "dev",
        &site_b.iface,
    ]);
    assert!(
        !b.ping("192.168.51.1"),
        "C forwards beyond its advertised LAN"
    );
    everything_goes_on_exit(&mut lab, &hub, [&site_a, &site_b, &site_c], &lan_link);
}

/// The hub is a Docker host: FORWARD drops what no rule accepts, and
/// DOCKER-USER is where users' rules go. (The lab's "internet" bridge
/// lives in the hub's namespace; Docker's br_netfilter would send its
/// frames through FORWARD too, which a real hub does not have.)
fn a_docker_host(h: &Host) {
    h.run(&["sysctl", "-qew", "net.bridge.bridge-nf-call-iptables=0"]);
    for args in [
        &["iptables", "-N", "DOCKER-USER"][..],
        &["iptables", "-A", "DOCKER-USER", "-j", "RETURN"],
        &["iptables", "-A", "FORWARD", "-j", "DOCKER-USER"],
        &["iptables", "-P", "FORWARD", "DROP"],
    ] {
        h.run(args);
    }
}

/// Site C (the LAN's gateway) joins with `token` but without --route: its
/// LAN stays out of reach of site B, though C forwards in general (as a
/// Docker host does); then it goes down again.
fn without_route_the_lan_is_out_of_reach(lab: &mut Lab, token: &str, site_b: &Node, lan: &Host) {
    let (h, b, c) = (lab.host(0), &site_b.host, lab.host(3));
    c.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let plain_c = lab.join(&c, "c", token, &h, &[]);
    assert!(!b.routes().contains(LAN), "{}", b.routes());
    // Even a route added by hand on B leads nowhere: the hub has none.
    b.run(&[
        "ip",
        "route",
        "add",
        &format!("{LAN}.0/24"),
        "dev",
        &site_b.iface,
    ]);
    assert_eq!(
        b.curl(&url(&lan.ip)),
        None,
        "the LAN is reachable without --route"
    );
    b.run(&[
        "ip",
        "route",
        "del",
        &format!("{LAN}.0/24"),
        "dev",
        &site_b.iface,
    ]);
    c.run(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    lab.tunnel_ok(&c, &plain_c.local("down"));
    lab.proc(plain_c.proc).wait(UP);
}

/// Asked for, not yet approved: the hub routes nothing and says so.
fn the_route_waits_for_approval(lab: &Lab, hub: &Node, b: &Host) {
    std::thread::sleep(Duration::from_secs(1));
    assert!(!b.routes().contains(LAN), "{}", b.routes());
    let waiting = lab.status(hub)[0]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["pending_routes"].as_array().cloned().unwrap_or_default())
        .collect::<Vec<_>>();
    assert_eq!(
        waiting,
        [format!("{LAN}.0/24")],
        "status shows the waiting prefix"
    );
    let shown = lab.tunnel_ok(
        &hub.host,
        &["status", "--state-dir", hub.state.to_str().unwrap()],
    );
    assert!(shown.contains("waiting for approval"), "{shown}");
}

/// Approved: site B and the container `cli` reach the LAN host, which
/// sees the gateway's address, and the hub routes the LAN to C.
fn the_lan_is_reached_through_the_gateway(hub: &Node, site_b: &Node, cli: &str, lan: &Host) {
    let (h, b) = (&hub.host, &site_b.host);
    let gateway = format!("{LAN}.1");
    let seen_from_b = until("B does not reach the LAN host", || b.curl(&url(&lan.ip)));
    assert_eq!(
        seen_from_b, gateway,
        "the LAN host saw B's address, not the gateway's"
    );
    assert!(
        b.routes()
            .contains(&format!("{LAN}.0/24 dev {}", site_b.iface)),
        "{}",
        b.routes()
    );
    let seen_from_cli = until("the container on A does not reach the LAN host", || {
        fetch(cli, &url(&lan.ip))
    });
    assert_eq!(seen_from_cli, gateway);
    // The hub's routing table sends the LAN to C through the tunnel.
    assert!(
        h.routes()
            .contains(&format!("{LAN}.0/24 dev {}", hub.iface)),
        "{}",
        h.routes()
    );
}

/// status shows each site's routes, on the hub and on the site.
fn status_shows_the_route(lab: &Lab, hub: &Node, site_c: &Node) {
    let st = lab.status(hub);
    let routes: Vec<&serde_json::Value> = st[0]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["routes"].as_array().unwrap().is_empty())
        .collect();
    assert_eq!(routes.len(), 1, "{st}");
    assert_eq!(routes[0]["routes"][0], format!("{LAN}.0/24"));
    let text = lab.tunnel_ok(
        &hub.host,
        &["status", "--state-dir", hub.state.to_str().unwrap()],
    );
    assert!(text.contains(&format!("routes {LAN}.0/24")), "{text}");
    assert_eq!(lab.status(site_c)[0]["routes"][0], format!("{LAN}.0/24"));
}

/// Everything goes on exit, of the hub and its sites A, B and C: C's
/// table and forwarding on `lan_link`, the hub's rules in DOCKER-USER. A site that is down keeps its LAN (it
/// comes back with `up`); revoked, its LAN leaves the hub and the other
/// sites.
fn everything_goes_on_exit(
    lab: &mut Lab,
    hub: &Node,
    [site_a, site_b, site_c]: [&Node; 3],
    lan_link: &str,
) {
    let (h, b, c) = (&hub.host, &site_b.host, &site_c.host);
    lab.tunnel_ok(c, &site_c.local("down"));
    assert!(lab.proc(site_c.proc).wait(UP).success());
    left_clean(c, site_c, &[lan_link]);
    assert!(
        b.routes().contains(&format!("{LAN}.0/24")),
        "{}",
        b.routes()
    );
    let c_address = lab.status(site_c)[0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut revoke = hub.local("revoke");
    revoke.push(&c_address);
    lab.tunnel_ok(h, &revoke);
    until("the LAN's route stays on B", || {
        (!b.routes().contains(&format!("{LAN}.0/24"))).then_some(())
    });
    until("the LAN's route stays on the hub", || {
        (!h.routes().contains(&format!("{LAN}.0/24"))).then_some(())
    });
    for n in [site_a, site_b] {
        lab.tunnel_ok(&n.host, &n.local("down"));
        assert!(lab.proc(n.proc).wait(UP).success());
    }
    lab.tunnel_ok(h, &hub.local("down"));
    assert!(lab.proc(hub.proc).wait(UP).success());
    left_clean(h, hub, &[]);
    let docker_user = iptables(h, "DOCKER-USER");
    assert!(!docker_user.contains(&hub.iface), "{docker_user}");
}

#[test]
#[ignore = "needs root: sudo make test"]
fn the_firewall_is_repaired_after_a_flush_and_a_crash_is_cleaned_at_the_next_start() {
    needs_root("the_firewall_is_repaired");
    let mut lab = common::lab(2);
    let (h, s) = (lab.host(0), lab.host(1));
    let hub = lab.serve(&h, "h", 1, &[]);
    let site = lab.join(&s, "s", &hub.lines[0], &h, &[]);
    let table = format!("tunnel-{}", hub.iface);
    assert!(h.has_nft_table(&table));
    assert!(h.forwarding(&hub.iface));

    h.run(&["nft", "flush", "ruleset"]);
    let flushed = Instant::now();
    until("the table is not put back", || {
        h.has_nft_table(&table).then_some(())
    });
    eprintln!(
        "table back {} ms after the flush",
        flushed.elapsed().as_millis()
    );
    lab.proc(hub.proc).wait_log("was removed from outside", UP);
    s.ping_until("10.77.0.1", Instant::now());

    // SIGKILL: the table and the journal stay, until the next start.
    lab.proc(hub.proc).kill();
    assert!(h.has_nft_table(&table));
    assert!(hub.state.join(format!("{}.host", hub.iface)).exists());
    let again = lab.serve_again(&hub, &[]);
    assert!(h.has_nft_table(&table));
    s.ping_until("10.77.0.1", Instant::now());
    lab.tunnel_ok(&h, &hub.local("down"));
    assert!(lab.proc(again).wait(UP).success());
    left_clean(&h, &hub, &[]);
    lab.proc(site.proc).terminate();
}

#[test]
#[ignore = "needs root: sudo make test"]
fn allow_from_keeps_the_port_to_known_peers_and_listed_networks() {
    needs_root("allow_from_keeps_the_port");
    let mut lab = common::lab(4);
    let (h, a, b, c) = (lab.host(0), lab.host(1), lab.host(2), lab.host(3));
    // A joins an open hub, which remembers where A is.
    let hub = lab.serve(&h, "h", 3, &[]);
    let site_a = lab.join(&a, "a", &hub.lines[0], &h, &[]);
    lab.tunnel_ok(&h, &hub.local("down"));
    lab.proc(hub.proc).wait(UP);

    // Restarted with the port restricted to C's address: A (a known peer)
    // and C get through, B does not.
    let cidr = format!("{}/32", c.ip);
    let again = lab.serve_again(&hub, &["--allow-from", &cidr]);
    a.ping_until("10.77.0.1", Instant::now());
    let out = lab.join_output(&b, "b", &hub.lines[1], &h.ip, &["--timeout", "3s"]);
    common::failed_with(&out, 1, "no WireGuard handshake");
    let site_c = lab.join(&c, "c", &hub.lines[2], &h, &[]);
    assert!(site_c.lines[0].contains("joined"), "{:?}", site_c.lines);
    lab.tunnel_ok(&h, &hub.local("down"));
    assert!(lab.proc(again).wait(UP).success());
    left_clean(&h, &hub, &[]);
    drop(site_a);
}

/// `ip rule` and table 51820 of `host`, for the leave-no-trace checks.
fn policy_routing(host: &Host) -> (String, String) {
    (
        host.run(&["ip", "rule", "show"]),
        // A table with no route does not exist: empty, as for `ip`'s error.
        String::from_utf8_lossy(&host.exec(&["ip", "route", "show", "table", "51820"]).stdout)
            .into_owned(),
    )
}

#[test]
#[ignore = "needs root: sudo make test"]
fn transparent_mode_tunnels_the_servers_public_address_while_up_and_only_then() {
    needs_root("transparent_mode");
    let mut lab = common::lab(3);
    let (h, s, p) = (lab.host(0), lab.host(1), lab.host(2));
    let _whoami = WhoAmI::start(&h, format!("{}:8080", h.ip).parse().unwrap());
    let public = url(&h.ip);
    let before = policy_routing(&s);
    assert_eq!(
        s.curl(&public).as_deref(),
        Some(s.ip.as_str()),
        "direct before"
    );

    let hub = lab.serve(&h, "h", 2, &[]);
    let site = lab.join(&s, "s", &hub.lines[0], &h, &["--transparent"]);
    let tunnel_ip = lab.status(&site)[0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    // The server sees the site's tunnel address: the request went through
    // the tunnel, while the tunnel's own UDP still goes direct.
    assert_eq!(s.curl(&public), Some(tunnel_ip.clone()));
    let (rules, table) = policy_routing(&s);
    assert!(
        rules.contains(&format!("to {} ipproto udp dport 51820 lookup main", h.ip)),
        "{rules}"
    );
    assert!(
        table.contains(&format!("{} dev {}", h.ip, site.iface)),
        "{table}"
    );

    // --snat-public: through the tunnel too, with the site's public source.
    // Direct TCP to the server is dropped on that site, so an answer
    // proves the tunnel carried it.
    let snat = lab.join(
        &p,
        "p",
        &hub.lines[1],
        &h,
        &["--transparent", "--snat-public"],
    );
    p.run(&[
        "iptables", "-A", "OUTPUT", "-o", &p.dev, "-p", "tcp", "--dport", "8080", "-j", "DROP",
    ]);
    let seen = until("the --snat-public site does not get through", || {
        p.curl(&public)
    });
    assert_eq!(
        seen, p.ip,
        "the server did not see the site's public address"
    );
    lab.tunnel_ok(&p, &snat.local("down"));
    lab.proc(snat.proc).wait(UP);

    // Down: direct again, and nothing of it left.
    lab.tunnel_ok(&s, &site.local("down"));
    assert!(lab.proc(site.proc).wait(UP).success());
    assert_eq!(
        s.curl(&public).as_deref(),
        Some(s.ip.as_str()),
        "direct after down"
    );
    assert_eq!(policy_routing(&s), before);

    // `up` brings transparent mode back from the saved state; after a
    // SIGKILL the next start removes what was left.
    let up = lab.spawn(&s, &site.local("up"));
    lab.proc(up).wait_lines(1, UP);
    assert_eq!(s.curl(&public), Some(tunnel_ip.clone()));
    lab.proc(up).kill();
    assert_ne!(
        policy_routing(&s).0,
        before.0,
        "the rules were gone before the next start"
    );
    let again = lab.spawn(&s, &site.local("up"));
    lab.proc(again).wait_lines(1, UP);
    assert_eq!(s.curl(&public), Some(tunnel_ip));
    lab.tunnel_ok(&s, &site.local("down"));
    assert!(lab.proc(again).wait(UP).success());
    assert_eq!(policy_routing(&s), before);
    left_clean(&s, &site, &[]);
}

#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn a_stock_wireguard_client_from_peer_add_reaches_a_hub_container_and_a_site_lan() {
    needs_docker("a_stock_wireguard_client");
    let mut lab = common::lab(3);
    let (h, c, r) = (lab.host(0), lab.host(1), lab.host(2));
    let lan = lab.lan(&c, LAN, "198.18.0.0/15");
    let _whoami = WhoAmI::start(&lan, format!("{}:8080", lan.ip).parse().unwrap());
    let web = format!("tnl{}web", lab.id);
    let page = format!("page-{}", lab.id);
    let mut cs = Containers::default();
    cs.web(&web, &page);
    let hub = lab.serve(
        &h,
        "h",
        1,
        &[
            "--container",
            &web,
            "--endpoint",
            &h.ip,
            "--token-route",
            &format!("{LAN}.0/24"),
        ],
    );
    let _site = lab.join(
        &c,
        "c",
        &hub.lines[0],
        &h,
        &["--route", &format!("{LAN}.0/24"), "--masquerade"],
    );

    let (conf, private) = a_config_without_the_private_key(&lab, &hub, &r);
    a_qr_code_without_the_private_key(&lab, &hub);
    let iface = lab.iface("r");
    stock_client_from(&lab, &r, &iface, &conf, &private);

    let web_ip = common::container_address(&lab.status(&hub), &web);
    r.ping_until(&web_ip, Instant::now());
    let got = until("the client does not get the container's page", || {
        r.curl(&format!("http://{web_ip}/"))
    });
    assert_eq!(got, page);
    let seen = until("the client does not reach the LAN behind C", || {
        r.curl(&url(&lan.ip))
    });
    assert_eq!(seen, format!("{LAN}.1"));

    // It shows in status, and is revoked like any other peer.
    let st = lab.status(&hub);
    assert!(
        st[0]["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "phone"),
        "{st}"
    );
    let mut revoke = hub.local("revoke");
    revoke.push("phone");
    lab.tunnel_ok(&h, &revoke);
    assert!(!r.ping(&web_ip), "a revoked client still gets through");
    r.run(&["ip", "link", "del", &iface]);
}

/// The client's key is made on the client (`r`); the hub only sees its
/// public half, and `peer add`'s config has every line but the private
/// key. The config and that private key.
fn a_config_without_the_private_key(lab: &Lab, hub: &Node, r: &Host) -> (String, String) {
    let h = &hub.host;
    let private = r.run(&["wg", "genkey"]).trim().to_owned();
    let keyfile = lab.dir.path().join("rw.key");
    std::fs::write(&keyfile, &private).unwrap();
    let public = r
        .run(&["sh", "-c", &format!("wg pubkey < {}", keyfile.display())])
        .trim()
        .to_owned();
    let conf = lab.tunnel_ok(
        h,
        &[
            "peer",
            "add",
            "phone",
            "--public-key",
            &public,
            "--iface",
            &hub.iface,
            "--state-dir",
            hub.state.to_str().unwrap(),
        ],
    );
    assert!(!conf.lines().any(|l| l.starts_with("PrivateKey")), "{conf}");
    let allowed = conf
        .lines()
        .find_map(|l| l.strip_prefix("AllowedIPs = "))
        .unwrap_or_else(|| panic!("no AllowedIPs: {conf}"));
    // The tunnel's subnets (dual stack by default) and the LAN behind C.
    let allowed: Vec<&str> = allowed.split(", ").collect();
    assert_eq!(allowed.len(), 3, "{conf}");
    assert_eq!(allowed[0], "10.77.0.0/24");
    assert!(
        allowed[1].starts_with("fd") && allowed[1].ends_with("/64"),
        "{conf}"
    );
    assert_eq!(allowed[2], format!("{LAN}.0/24"));
    assert!(conf.contains("PersistentKeepalive = 25"), "{conf}");
    (conf, private)
}

/// `peer add --qr` draws the config, and a generated key stays out of it.
fn a_qr_code_without_the_private_key(lab: &Lab, hub: &Node) {
    let h = &hub.host;
    let qr = lab.tunnel_ok(
        h,
        &[
            "peer",
            "add",
            "phone2",
            "--allow-generated-key",
            "--qr",
            "--iface",
            &hub.iface,
            "--state-dir",
            hub.state.to_str().unwrap(),
        ],
    );
    assert!(
        qr.contains('\u{2588}') && !qr.contains("PrivateKey"),
        "{qr}"
    );
}

/// A stock wireguard-go as `iface` on `r`, configured from `conf` and its
/// own key only (what wg-quick would do, by hand).
fn stock_client_from(lab: &Lab, r: &Host, iface: &str, conf: &str, private: &str) {
    let full = conf.replace(
        "# PrivateKey = <the private key made on this device>",
        &format!("PrivateKey = {private}"),
    );
    let file = lab.dir.path().join(format!("{iface}.conf"));
    std::fs::write(&file, &full).unwrap();
    let stripped = common::sh(&["wg-quick", "strip", file.to_str().unwrap()]);
    let plain = lab.dir.path().join("rw-plain.conf");
    std::fs::write(&plain, stripped).unwrap();
    let field = |k: &str| {
        conf.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .trim()
            .to_owned()
    };
    r.run(&["wireguard-go", iface]);
    r.run(&["wg", "setconf", iface, plain.to_str().unwrap()]);
    for a in field("Address = ").split(", ") {
        r.run(&["ip", "address", "add", a, "dev", iface]);
    }
    r.run(&["ip", "link", "set", iface, "mtu", &field("MTU = "), "up"]);
    r.run(&["ip", "route", "add", &format!("{LAN}.0/24"), "dev", iface]);
}

fn address6(status: &serde_json::Value) -> String {
    status[0]["address6"]
        .as_str()
        .unwrap_or_else(|| panic!("no IPv6 address: {status}"))
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn a_dual_stack_tunnel_carries_ipv6_between_sites_and_containers() {
    needs_docker("a_dual_stack_tunnel");
    let mut lab = common::lab(2);
    let (h, s) = (lab.host(0), lab.host(1));
    let (_cs, web, cli, page) = web_and_cli(&lab);
    // Dual stack is the default: a random ULA /64 beside 10.77.0.0/24.
    let hub = lab.serve(&h, "h", 1, &["--container", &web]);
    let site = lab.join(&s, "s", &hub.lines[0], &h, &["--container", &cli]);
    let hub_st = lab.status(&hub);
    let (hub6, web6) = (address6(&hub_st), container_address6(&hub_st, &web));
    assert!(hub6.starts_with("fd"), "{hub6}");
    let site6 = address6(&lab.status(&site));
    let cli6 = container_address6(&lab.status(&site), &cli);

    assert!(
        s.exec(&["ping", "-6", "-c", "1", "-W", "2", &hub6])
            .status
            .success()
    );
    assert!(
        h.exec(&["ping", "-6", "-c", "1", "-W", "2", &site6])
            .status
            .success()
    );
    let web_url = format!("http://[{web6}]/");
    assert_eq!(
        until("the site does not get web's page over IPv6", || s
            .curl(&web_url)),
        page
    );
    assert_eq!(
        until("cli does not get web's page over IPv6", || fetch(
            &cli, &web_url
        )),
        page
    );
    let ping = common::docker(&["exec", &cli, "ping", "-6", "-c", "1", "-W", "2", &site6]);
    assert!(ping.status.success(), "cli cannot ping its site over IPv6");
    assert!(
        h.exec(&["ping", "-6", "-c", "1", "-W", "2", &cli6])
            .status
            .success(),
        "the hub cannot ping the site's container over IPv6"
    );
    let text = lab.tunnel_ok(&h, &["status", "--state-dir", hub.state.to_str().unwrap()]);
    assert!(
        text.contains(&format!("address:    10.77.0.1/24, {hub6}/64")),
        "{text}"
    );
}

#[test]
#[ignore = "needs root: sudo make test"]
fn an_ipv6_only_tunnel_over_an_ipv6_only_transport() {
    needs_root("an_ipv6_only_tunnel");
    let mut lab = common::lab(2);
    let (h, s) = (lab.host(0), lab.host(1));
    // The "internet" between them is IPv6 only for the tunnel.
    for (host, a) in [(&h, "fd99::1/64"), (&s, "fd99::2/64")] {
        host.run(&["ip", "addr", "add", a, "dev", &host.dev, "nodad"]);
    }
    let hub = lab.serve(&h, "h", 1, &["--subnet", "fd00:77::/64"]);
    let iface = lab.iface("s");
    let state = lab.state_dir("s");
    let join = lab.spawn(
        &s,
        &[
            "join",
            &hub.lines[0],
            "[fd99::1]:51820",
            "--iface",
            &iface,
            "--state-dir",
            state.to_str().unwrap(),
            "--backend",
            "userspace",
        ],
    );
    let summary = lab.proc(join).wait_lines(1, UP);
    assert!(summary[0].contains("as fd00:77::2/64"), "{summary:?}");
    assert!(summary[0].contains("at [fd99::1]:51820"), "{summary:?}");
    assert!(
        s.exec(&["ping", "-6", "-c", "1", "-W", "2", "fd00:77::1"])
            .status
            .success()
    );
    let _whoami = WhoAmI::start(&h, "[fd00:77::1]:8080".parse().unwrap());
    assert_eq!(
        s.curl("http://[fd00:77::1]:8080/").as_deref(),
        Some("fd00:77::2")
    );
    // No IPv4 anywhere in the tunnel.
    assert!(
        !s.run(&["ip", "-4", "addr", "show", "dev", &iface])
            .contains("inet ")
    );
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_gateway_killed_with_sigkill_is_put_back_by_its_next_start() {
    needs_root("a_gateway_killed_with_sigkill");
    let mut lab = common::lab(2);
    let (h, s) = (lab.host(0), lab.host(1));
    let lan = lab.lan(&s, "192.168.60", "198.18.0.0/15");
    let lan_link = link_to(&s, &lan.ip);
    let _whoami = WhoAmI::start(&lan, format!("{}:8080", lan.ip).parse().unwrap());
    let hub = lab.serve(&h, "h", 1, &["--token-route", "192.168.60.0/24"]);
    let site = lab.join(
        &s,
        "s",
        &hub.lines[0],
        &h,
        &["--route", "192.168.60.0/24", "--masquerade"],
    );
    assert!(s.forwarding(&lan_link));
    assert!(s.has_nft_table(&format!("tunnel-{}", site.iface)));
    lab.proc(site.proc).kill();
    // What the kernel does not undo by itself stays until the next start.
    assert!(
        s.forwarding(&lan_link),
        "forwarding was not on to begin with"
    );
    let up = lab.spawn(&s, &site.local("up"));
    lab.proc(up).wait_lines(1, UP);
    let seen = until("the hub cannot reach the LAN again", || {
        h.curl(&format!("http://{}:8080/", lan.ip))
    });
    assert_eq!(seen, "192.168.60.1");
    lab.tunnel_ok(&s, &site.local("down"));
    assert!(lab.proc(up).wait(UP).success());
    left_clean(&s, &site, &[&lan_link]);
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_random_port_is_kept_and_firewall_off_leaves_nftables_alone() {
    needs_root("a_random_port_is_kept");
    let mut lab = common::lab(2);
    let (h, s) = (lab.host(0), lab.host(1));
    let hub = lab.serve(&h, "h", 1, &["--port", "random", "--firewall", "off"]);
    lab.proc(hub.proc)
        .wait_log("--firewall off: no forwarding confinement", UP);
    assert!(!h.has_nft_table(&format!("tunnel-{}", hub.iface)));
    let port = lab.status(&hub)[0]["listen_port"].as_u64().unwrap();
    assert!((49152..=65535).contains(&port), "{port}");
    // The token carries the port: join needs only the address.
    let site = lab.join(&s, "s", &hub.lines[0], &h, &[]);
    assert!(
        site.lines[0].contains(&format!(":{port} over udp")),
        "{:?}",
        site.lines
    );
    lab.tunnel_ok(&h, &hub.local("down"));
    lab.proc(hub.proc).wait(UP);
    // Kept in state: the next start listens there again.
    let again = lab.serve_again(&hub, &[]);
    assert_eq!(lab.status(&hub)[0]["listen_port"].as_u64(), Some(port));
    s.ping_until("10.77.0.1", Instant::now());
    lab.tunnel_ok(&h, &hub.local("down"));
    assert!(lab.proc(again).wait(UP).success());
}

#[test]
#[ignore = "needs root: sudo make test"]
fn the_hubs_own_lan_is_reached_from_a_site() {
    needs_root("the_hubs_own_lan");
    let mut lab = common::lab(2);
    let (h, s) = (lab.host(0), lab.host(1));
    let lan = lab.lan(&h, "192.168.70", "198.18.0.0/15");
    let _whoami = WhoAmI::start(&lan, format!("{}:8080", lan.ip).parse().unwrap());
    let hub = lab.serve(&h, "h", 1, &["--route", "192.168.70.0/24", "--masquerade"]);
    let _site = lab.join(&s, "s", &hub.lines[0], &h, &[]);
    let seen = until("the site does not reach the hub's LAN", || {
        s.curl(&format!("http://{}:8080/", lan.ip))
    });
    assert_eq!(seen, "192.168.70.1");
    assert_eq!(lab.status(&hub)[0]["routes"][0], "192.168.70.0/24");
}
