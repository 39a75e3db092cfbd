//! The security model end to end: the control API trusts keys, not source
//! addresses; the hub is not a router for its peers; nothing a peer or a
//! local user sends can take the hub down.

mod common;

use common::{Containers, Lab, Node, needs_docker, needs_root};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};
use tunnel::control::auth::Signer;
use tunnel::control::{ControlError, tunnel as api};
use tunnel::keys::PrivateKey;

const HUB_API: &str = "10.77.0.1:51821";
const NOBODY: [&str; 5] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
];

/// A command's words followed by more.
fn with<'a>(head: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
    head.iter().chain(tail).copied().collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
#[ignore = "needs root: sudo make test"]
fn only_a_sites_key_changes_the_hub_and_sockets_are_owner_only() {
    needs_root("only_a_sites_key_changes_the_hub");
    let mut lab = common::lab(3);
    let (a, b, c) = (lab.host(0), lab.host(1), lab.host(2));
    // Started with a permissive umask: the sockets must not care.
    let hub = lab.serve_via(
        &a,
        "a",
        2,
        &["sh", "-c", "umask 000; exec \"$0\" \"$@\""],
        &[],
    );
    sockets_are_owner_only(&hub);
    let site_b = lab.join(&b, "b", &hub.lines[0].clone(), &a, &[]);
    let site_c = lab.join(&c, "c", &hub.lines[1].clone(), &a, &[]);
    without_the_key_nothing_changes(&site_b);
    signed_requests_are_admitted(&lab, &hub, &site_b, &site_c);
    the_local_api_bounds_a_request(&hub);
    assert!(lab.proc(hub.proc).running());
}

/// The UAPI and control sockets and the state directory are the owner's
/// alone, whatever the umask.
fn sockets_are_owner_only(hub: &Node) {
    let uapi = Path::new("/var/run/wireguard").join(format!("{}.sock", hub.iface));
    let control = hub.state.join(format!("{}.sock", hub.iface));
    assert_eq!(mode(&uapi) & 0o077, 0, "UAPI socket mode {:o}", mode(&uapi));
    assert_eq!(
        mode(&control) & 0o077,
        0,
        "control socket mode {:o}",
        mode(&control)
    );
    assert_eq!(mode(&hub.state) & 0o077, 0);
}

/// Any process on the site can connect from the site's tunnel address;
/// without the site's key it changes nothing, and nobody but root on the
/// site can use its local socket.
fn without_the_key_nothing_changes(site_b: &Node) {
    let b = &site_b.host;
    let body = format!(
        r#"{{"public_key":"{}","name":"evil"}}"#,
        PrivateKey::generate().public_key()
    );
    let url = format!("http://{HUB_API}/v1/endpoints");
    assert_eq!(b.http(&NOBODY, "POST", &url, Some(&body)), "401");
    assert_eq!(
        b.http(
            &NOBODY,
            "POST",
            &format!("http://{HUB_API}/v1/leave"),
            Some("{}")
        ),
        "401"
    );
    assert_eq!(
        b.http(&[], "GET", &format!("http://{HUB_API}/v1/ping"), None),
        "200"
    );
    // A forged signature header is no better.
    let forged = format!(
        "Authorization: Tunnel key={}, ts=1, nonce=00000000000000000000000000000000, mac=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        common::keys(site_b).0.public_key()
    );
    let out = b.exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-m",
        "5",
        "-H",
        &forged,
        "-d",
        &body,
        &url,
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    // Nobody on the hub's own host can use the site's local socket either.
    let sock = site_b.state.join(format!("{}.sock", site_b.iface));
    let out = b.exec(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "curl",
        "-s",
        "-m",
        "5",
        "--unix-socket",
        sock.to_str().unwrap(),
        "http://x/v1/status",
    ]);
    assert!(!out.status.success(), "nobody read the local socket");
}

/// The same request, signed with the site's key, is admitted; names are
/// unique within a site, and a `revoke` by an ambiguous name is refused.
fn signed_requests_are_admitted(lab: &Lab, hub: &Node, site_b: &Node, site_c: &Node) {
    let a = &hub.host;
    let web_b = common::register_as(site_b, "web").expect("a signed registration is admitted");
    assert!(web_b.starts_with("10.77.0."), "{web_b}");
    let st = lab.status(hub).to_string();
    assert!(st.contains("container web"), "{st}");
    assert!(!st.contains("evil"), "{st}");
    // Names are unique within a site, not across sites.
    let again = common::register_as(site_b, "web").unwrap_err();
    assert!(
        matches!(again, ControlError::Refused { status: 409, .. }),
        "{again}"
    );
    let web_c = common::register_as(site_c, "web").expect("another site may have its own web");

    // `revoke web` could mean either: refused, with both listed.
    let out = lab.tunnel(a, &with(&hub.local("revoke"), &["web"]));
    let err = common::failed_with(&out, 2, "ambiguous");
    let ip = |n: &str| n.split('/').next().unwrap().to_owned();
    assert!(
        err.contains(&ip(&web_b)) && err.contains(&ip(&web_c)),
        "{err}"
    );
    let out = lab.tunnel_ok(a, &with(&hub.local("revoke"), &[&ip(&web_c)]));
    assert!(out.contains("container web"), "{out}");
}

/// The local API bounds what it is asked for.
fn the_local_api_bounds_a_request(hub: &Node) {
    let (a, control) = (&hub.host, hub.state.join(format!("{}.sock", hub.iface)));
    let out = a.exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-m",
        "5",
        "--unix-socket",
        control.to_str().unwrap(),
        "-d",
        r#"{"count": 1000000000, "ttl_secs": 60, "name": null}"#,
        "http://x/v1/tokens",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
}

#[test]
#[ignore = "needs root: sudo make test"]
fn the_hub_forwards_between_its_peers_and_nowhere_else() {
    needs_root("the_hub_forwards_only_between_its_peers");
    let mut lab = common::lab(3);
    let (a, b, c) = (lab.host(0), lab.host(1), lab.host(2));
    // A LAN behind the hub that routes the tunnel subnet back through it,
    // on a hub that forwards, as every Docker host does.
    let lan = lab.lan(&a, "192.168.77", "10.77.0.0/24");
    a.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    assert!(a.ping(&lan.ip), "the hub reaches its LAN");

    let hub = lab.serve(&a, "a", 2, &[]);
    let table = format!("tunnel-{}", hub.iface);
    assert!(a.has_nft_table(&table));
    let site_b = lab.join(&b, "b", &hub.lines[0].clone(), &a, &[]);
    lab.join(&c, "c", &hub.lines[1].clone(), &a, &[]);

    // Hub to peer, and peer to peer through the hub, still work.
    assert!(a.ping("10.77.0.2"));
    assert!(b.ping("10.77.0.3"), "peer to peer through the hub");

    // Site B widens its own allowed IPs and routes the LAN into the tunnel.
    let (_, hub_key) = common::keys(&site_b);
    b.run(&[
        "wg",
        "set",
        &site_b.iface,
        "peer",
        &hub_key.to_string(),
        "allowed-ips",
        "10.77.0.0/24,192.168.77.0/24",
    ]);
    b.run(&[
        "ip",
        "route",
        "add",
        "192.168.77.0/24",
        "dev",
        &site_b.iface,
    ]);
    assert!(!b.ping(&lan.ip), "a peer reached the hub's LAN through it");
    // Nor does the LAN get into the tunnel, to peers or to the control API.
    assert!(
        !lan.ping("10.77.0.2"),
        "the LAN reached a peer through the hub"
    );
    assert_eq!(
        lan.http(&[], "GET", &format!("http://{HUB_API}/v1/ping"), None),
        "000"
    );
    // The site itself does reach the API.
    assert_eq!(
        b.http(&[], "GET", &format!("http://{HUB_API}/v1/ping"), None),
        "200"
    );

    // The table is gone after a clean exit ...
    assert!(lab.proc(hub.proc).terminate().success());
    assert!(!a.has_nft_table(&table));
    // ... and after a crash, the next start replaces it, and its exit removes it.
    let again = lab.spawn(&a, &with(&hub.local("serve"), &["--backend", "userspace"]));
    lab.proc(again).wait_log("is up", common::UP);
    lab.proc(again).kill();
    assert!(a.has_nft_table(&table), "SIGKILL leaves the table");
    let third = lab.spawn(&a, &with(&hub.local("serve"), &["--backend", "userspace"]));
    lab.proc(third).wait_log("is up", common::UP);
    let tables = a.run(&["nft", "list", "tables"]);
    assert_eq!(tables.matches(&table).count(), 1, "{tables}");
    assert!(!b.ping(&lan.ip), "confined again after the restart");
    assert!(lab.proc(third).terminate().success());
    assert!(!a.has_nft_table(&table));
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_thousand_idle_connections_do_not_take_the_hub_down() {
    needs_root("idle_connections");
    let mut lab = common::lab(3);
    let (a, b, c) = (lab.host(0), lab.host(1), lab.host(2));
    // The soft limit that systemd services get by default.
    let hub = lab.serve_via(&a, "a", 1, &["prlimit", "--nofile=1024:1024"], &[]);
    lab.join(&b, "b", &hub.lines[0].clone(), &a, &[]);

    // Hold 1,100 idle connections to the control port from the site.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let holder = b.in_ns(move || {
        let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .unwrap()
            .1;
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
            .unwrap();
        let addr: SocketAddr = HUB_API.parse().unwrap();
        let held: Vec<TcpStream> = (0..1100)
            .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
            .collect();
        let n = held.len();
        let _ = rx.recv();
        n
    });
    std::thread::sleep(Duration::from_secs(2));

    // Mint a token, and one that expires at once.
    let token = lab.tunnel_ok(&a, &with(&hub.local("token"), &["--ttl", "10m"]));
    // 3 s: long enough to be listed below on a busy machine, short
    // enough to be pruned while the test waits.
    let short = lab.tunnel_ok(&a, &with(&hub.local("token"), &["--ttl", "3s"]));
    assert!(token.starts_with("tun1_") && short.starts_with("tun1_"));
    let unused = || {
        let st = lab.status(&hub);
        st[0]["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == "unused invite")
            .count()
    };
    assert_eq!(unused(), 2);
    let deadline = Instant::now() + Duration::from_secs(8);
    while unused() > 1 {
        assert!(Instant::now() < deadline, "the 3 s token was never pruned");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        lab.proc(hub.proc).running(),
        "serve died: {}",
        lab.proc(hub.proc).stderr()
    );
    // A new join works while the connections are held.
    let site_c = lab.join(&c, "c", token.trim(), &a, &[]);
    assert!(
        site_c.lines[0].contains("as 10.77.0.3/24"),
        "{:?}",
        site_c.lines
    );
    tx.send(()).unwrap();
    let held = holder.join().unwrap();
    assert!(held > 1000, "only {held} connections were held");
    assert!(lab.proc(hub.proc).running());
}

#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn redeeming_with_a_hub_containers_key_is_refused_and_the_container_keeps_its_traffic() {
    needs_docker("redeem_with_container_key");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let web = format!("tnl{}web", lab.id);
    let page = format!("page-{}", lab.id);
    let mut cs = Containers::default();
    cs.web(&web, &page);
    let hub = lab.serve(&a, "a", 1, &["--container", &web]);
    let st = lab.status(&hub);
    let ep = st
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["container"] == web.as_str())
        .unwrap();
    let web_key = tunnel::keys::PublicKey::from_base64(ep["public_key"].as_str().unwrap()).unwrap();
    let web_ip = common::container_address(&st, &web);

    // A token holder brings up stock wireguard-go with the invite key ...
    let token = tunnel::token::Token::decode(&hub.lines[0]).unwrap();
    let wg = lab.iface("x");
    let keyfile = lab.dir.path().join("invite.key");
    std::fs::write(&keyfile, token.invite_key.to_base64().as_bytes()).unwrap();
    b.run(&["wireguard-go", &wg]);
    b.run(&[
        "wg",
        "set",
        &wg,
        "private-key",
        keyfile.to_str().unwrap(),
        "peer",
        &token.server_public_key.to_string(),
        "endpoint",
        &format!("{}:{}", a.ip, token.port),
        "allowed-ips",
        &token.subnet.to_string(),
        "persistent-keepalive",
        "25",
    ]);
    b.run(&[
        "ip",
        "addr",
        "add",
        &token.assigned_network().to_string(),
        "dev",
        &wg,
    ]);
    b.run(&["ip", "link", "set", &wg, "up"]);

    // ... and redeems it, properly signed, for the hub container's key.
    let (invite, server) = (token.invite_key.clone(), token.server_public_key);
    let refused = b.block_on(move || async move {
        let signer = Signer::new(&invite, &server).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match api::redeem_invite(
                api::HubApi::routed(HUB_API.parse().unwrap()),
                &signer,
                &web_key,
                &Default::default(),
                Duration::from_secs(1),
            )
            .await
            {
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                other => return other,
            }
        }
    });
    match refused {
        Err(ControlError::Refused {
            status: 409,
            message,
        }) => {
            assert!(message.contains("already in use"), "{message}")
        }
        other => panic!("redeem with a container key: {other:?}"),
    }
    // The container still answers through the tunnel (from the hub: an
    // unused invite reaches the control API and nothing else).
    let url = format!("http://{web_ip}/");
    let out = a.exec(&["curl", "-s", "-m", "5", &url]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), page);
    let out = b.exec(&["curl", "-s", "-m", "3", &url]);
    assert!(
        out.stdout.is_empty(),
        "an unused invite reached a container"
    );
    b.run(&["ip", "link", "del", &wg]);
}
