//! Day-2 operations end to end: restarts after SIGKILL on either side,
//! status, tokens from a running server, revoke, down, and handing an
//! endpoint over to stock wireguard-go with `tunnel export`.

mod common;

use common::{Lab, Node, needs_root};
use std::time::{Duration, Instant};

const UP: Duration = common::UP;

/// A hub in host 0 and a site joined from host 1, in a lab of `hosts`.
fn sites(hosts: usize) -> (Lab, Node, Node) {
    let mut lab = common::lab(hosts);
    let (a, b) = (lab.host(0), lab.host(1));
    let hub = lab.serve(&a, "a", 1, &[]);
    let site = lab.join(&b, "b", &hub.lines[0], &a, &[]);
    (lab, hub, site)
}

/// A command's words followed by more.
fn with<'a>(head: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
    head.iter().chain(tail).copied().collect()
}

#[test]
#[ignore = "needs root: sudo make test"]
fn either_side_killed_and_restarted_resumes_without_a_new_token() {
    needs_root("restart_after_sigkill");
    let (mut lab, hub, site) = sites(2);
    let (a, b) = (hub.host.clone(), site.host.clone());
    assert!(b.ping("10.77.0.1"));

    // SIGKILL the server, start it again: same key, no token, traffic resumes.
    lab.proc(hub.proc).kill();
    let t = Instant::now();
    let again = lab.spawn(&a, &with(&hub.local("serve"), &["--backend", "userspace"]));
    let took = b.ping_until("10.77.0.1", t);
    eprintln!(
        "server killed and restarted: traffic from the joined site resumed {} ms after the restart began",
        took.as_millis()
    );
    assert!(
        lab.proc(again).stdout().is_empty(),
        "a restart printed tokens"
    );

    // SIGKILL the joined side, bring it back with `tunnel up`.
    lab.proc(site.proc).kill();
    let t = Instant::now();
    let up = lab.spawn(&b, &site.local("up"));
    let line = lab.proc(up).wait_lines(1, UP)[0].clone();
    assert!(
        line.starts_with(&format!("up {} as 10.77.0.2/24", site.iface)),
        "{line}"
    );
    let took = b.ping_until("10.77.0.1", t);
    eprintln!(
        "joined site killed, `tunnel up`: traffic resumed {} ms after `up` started",
        took.as_millis()
    );
    assert!(a.ping("10.77.0.2"));

    // Both stop cleanly and leave nothing.
    assert!(lab.proc(up).terminate().success());
    assert!(lab.proc(again).terminate().success());
    assert!(!a.has_link(&hub.iface) && !b.has_link(&site.iface));
}

#[test]
#[ignore = "needs root: sudo make test"]
fn status_tokens_revoke_and_down() {
    needs_root("status_tokens_revoke_down");
    let (mut lab, hub, site) = sites(3);
    let (a, b, c) = (hub.host.clone(), site.host.clone(), lab.host(2));
    assert!(b.ping("10.77.0.1"));

    // status --json: the site, with a recent handshake and rising counters.
    let rx = |st: &serde_json::Value| -> (u64, u64) {
        let server = &st.as_array().unwrap()[0];
        assert_eq!(server["role"], "server");
        assert_eq!(server["state"], "up");
        let site = server["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["address"] == "10.77.0.2" && p["name"] != "used invite")
            .expect("site peer");
        // A site without --name is named after its host.
        assert!(site["name"].as_str().is_some_and(|n| !n.is_empty()));
        assert!(site["last_handshake_secs"].as_u64().expect("handshake") < 60);
        (
            site["rx_bytes"].as_u64().unwrap(),
            site["tx_bytes"].as_u64().unwrap(),
        )
    };
    let before = rx(&lab.status(&hub));
    assert!(b.ping("10.77.0.1"));
    let after = rx(&lab.status(&hub));
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "rx/tx did not rise: {before:?} -> {after:?}"
    );

    // A token from the running server joins a third host.
    let token = lab.tunnel_ok(
        &a,
        &with(&hub.local("token"), &["--name", "site-c", "--ttl", "10m"]),
    );
    let token = token.trim().to_owned();
    assert!(token.starts_with("tun1_") && !token.contains('\n'));
    // Names are unique: a second token for site-c is refused.
    let out = lab.tunnel(&a, &with(&hub.local("token"), &["--name", "site-c"]));
    common::failed_with(&out, 2, "already taken");
    let site_c = lab.join(&c, "c", &token, &a, &[]);
    assert!(
        site_c.lines[0].contains("as 10.77.0.3/24"),
        "{:?}",
        site_c.lines
    );
    assert!(c.ping("10.77.0.1"));

    // revoke cuts it off at once.
    let out = lab.tunnel_ok(&a, &with(&hub.local("revoke"), &["site-c"]));
    assert!(out.contains("revoked 10.77.0.3 (site-c)"), "{out}");
    assert!(
        !c.exec(&["ping", "-c", "2", "-W", "1", "10.77.0.1"])
            .status
            .success(),
        "a revoked site still reaches the server"
    );
    let st = lab.status(&hub);
    assert!(!st.to_string().contains("site-c"), "{st}");
    assert!(b.ping("10.77.0.1"), "revoke hit the wrong site");
    let out = lab.tunnel(&a, &with(&hub.local("revoke"), &["nobody"]));
    assert_eq!(out.status.code(), Some(2));

    // down is SIGTERM by another name.
    lab.tunnel_ok(&b, &site.local("down"));
    assert!(lab.proc(site.proc).wait(Duration::from_secs(10)).success());
    assert!(!b.has_link(&site.iface));
    lab.tunnel_ok(&a, &hub.local("down"));
    assert!(lab.proc(hub.proc).wait(Duration::from_secs(10)).success());
    assert!(!a.has_link(&hub.iface));
    // Nothing runs: status reports from the saved state.
    assert!(
        lab.status(&hub)
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["state"] == "down")
    );
    let out = lab.tunnel(&a, &hub.local("token"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running tunnel serves"));
}

#[test]
#[ignore = "needs root: sudo make test"]
fn stock_wireguard_go_takes_over_from_export() {
    needs_root("export_interop");
    let (mut lab, hub, site) = sites(2);
    let b = site.host.clone();
    let conf = lab.tunnel_ok(&b, &site.local("export"));
    assert!(
        conf.contains("[Interface]") && conf.contains("[Peer]") && conf.contains("PrivateKey = "),
        "{conf}"
    );
    let address = conf
        .lines()
        .find_map(|l| l.strip_prefix("Address = "))
        .unwrap()
        .to_owned();
    let mtu = conf
        .lines()
        .find_map(|l| l.strip_prefix("MTU = "))
        .unwrap()
        .to_owned();

    // Stop tunnel's joined side; wireguard-go takes the endpoint over,
    // configured only from the export (wg-quick's strip + wg setconf).
    assert!(lab.proc(site.proc).terminate().success());
    let file = lab.dir.path().join(format!("{}.conf", site.iface));
    std::fs::write(&file, &conf).unwrap();
    let stripped = common::sh(&["wg-quick", "strip", file.to_str().unwrap()]);
    let plain = lab.dir.path().join("plain.conf");
    std::fs::write(&plain, stripped).unwrap();
    b.run(&["wireguard-go", &site.iface]);
    b.run(&["wg", "setconf", &site.iface, plain.to_str().unwrap()]);
    // Both families: the tunnel is dual-stack by default.
    for a in address.split(", ") {
        b.run(&["ip", "address", "add", a, "dev", &site.iface]);
    }
    b.run(&["ip", "link", "set", &site.iface, "mtu", &mtu, "up"]);
    let took = b.ping_until("10.77.0.1", Instant::now());
    eprintln!(
        "wireguard-go from `tunnel export` reached the server after {} ms",
        took.as_millis()
    );
    // Removing the link stops wireguard-go.
    b.run(&["ip", "link", "del", &site.iface]);

    // The hub's export is a valid wg-quick config too.
    let exported = lab.tunnel_ok(&hub.host, &hub.local("export"));
    assert!(
        exported.contains("ListenPort = 51820") && exported.contains("AllowedIPs = 10.77.0.2/32"),
        "{exported}"
    );
}

#[test]
#[ignore = "needs root: sudo make test"]
fn serve_tells_systemd_it_is_ready() {
    needs_root("sd_notify");
    let mut lab = common::lab(1);
    let a = lab.host(0);
    let iface = lab.iface("a");
    let state = lab.state_dir("a");
    let path = lab.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(UP)).unwrap();
    let serve = lab.spawn_env(
        &a,
        &[
            "serve",
            "--iface",
            &iface,
            "--state-dir",
            state.to_str().unwrap(),
            "--backend",
            "userspace",
        ],
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a notification within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(msg.contains("READY=1"), "{msg}");
    // Ready means up: the interface exists and the token was printed.
    assert!(a.has_link(&iface));
    assert_eq!(lab.proc(serve).stdout().lines().count(), 1);
}

/// `tunnel status --check` for the state dir of `node`.
fn check(lab: &common::Lab, node: &Node) -> std::process::Output {
    lab.tunnel(
        &node.host,
        &[
            "status",
            "--check",
            "--state-dir",
            node.state.to_str().unwrap(),
        ],
    )
}

/// One scrape of `--metrics` at its default address in `host`, parsed as
/// Prometheus text by a parser of its own.
fn scrape(host: &common::Host) -> prometheus_parse::Scrape {
    let out = host.exec(&["curl", "-sf", "-m", "5", "http://127.0.0.1:9580/metrics"]);
    assert!(out.status.success(), "no metrics at 127.0.0.1:9580");
    let text = String::from_utf8(out.stdout).expect("UTF-8 metrics");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("the scrape is not Prometheus text: {e}\n{text}"))
}

/// The value of counter `name` for the peer whose label `label` is `peer`.
fn peer_counter(s: &prometheus_parse::Scrape, name: &str, label: &str, peer: &str) -> f64 {
    s.samples
        .iter()
        .find(|m| m.metric == name && m.labels.get(label) == Some(peer))
        .map(|m| counter(&m.value))
        .unwrap_or_else(|| panic!("no {name} for peer {label}={peer}"))
}

/// A counter's value. OpenMetrics names the family without `_total`, so
/// the parser may not tie the sample to its `# TYPE` line.
fn counter(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("not a counter: {other:?}"),
    }
}

#[test]
#[ignore = "needs root: sudo make test"]
fn metrics_count_traffic_and_the_health_check_follows_the_hub() {
    needs_root("metrics_and_health");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    // The hub opts in to peers' keys and names; the site shows addresses only.
    let hub = lab.serve(
        &a,
        "a",
        1,
        &["--metrics", "--metrics-peers", "--name", "hub"],
    );
    let site = lab.join(
        &b,
        "b",
        &hub.lines[0],
        &a,
        &["--metrics", "--name", "branch"],
    );
    assert!(b.ping("10.77.0.1"));

    // Both sides' counters rise while traffic flows.
    let (hub0, site0) = (scrape(&a), scrape(&b));
    b.run(&[
        "ping",
        "-q",
        "-c",
        "20",
        "-i",
        "0.01",
        "-s",
        "1000",
        "10.77.0.1",
    ]);
    let (hub1, site1) = (scrape(&a), scrape(&b));
    for name in ["tunnel_peer_rx_bytes_total", "tunnel_peer_tx_bytes_total"] {
        let (before, after) = (
            peer_counter(&hub0, name, "name", "branch"),
            peer_counter(&hub1, name, "name", "branch"),
        );
        assert!(
            after >= before + 20_000.0,
            "hub {name}: {before} -> {after}"
        );
        let (before, after) = (
            peer_counter(&site0, name, "address", "10.77.0.1"),
            peer_counter(&site1, name, "address", "10.77.0.1"),
        );
        assert!(
            after >= before + 20_000.0,
            "site {name}: {before} -> {after}"
        );
    }
    assert!(
        site1
            .samples
            .iter()
            .filter(|m| m.metric.starts_with("tunnel_peer_"))
            .all(|m| m.labels.get("name").is_none() && m.labels.get("peer").is_none()),
        "the site's metrics name its peers without --metrics-peers"
    );
    let redeemed = hub1
        .samples
        .iter()
        .find(|m| m.metric == "tunnel_token_redemptions_total")
        .expect("redemptions");
    assert_eq!(counter(&redeemed.value), 1.0);
    assert!(
        hub1.samples
            .iter()
            .any(|m| m.metric == "tunnel_peer_handshake_age_seconds"
                && m.labels.get("name") == Some("branch"))
    );

    // The health check: good on both sides while the tunnel is up.
    for node in [&hub, &site] {
        let out = check(&lab, node);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&format!("{}: ok", node.iface)), "{stdout}");
    }
    // The hub stops: the site's check fails at once, though its last
    // handshake is seconds old.
    assert!(lab.proc(hub.proc).terminate().success());
    let out = check(&lab, &site);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not answer"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unhealthy"));
    // A stopped hub is not healthy either.
    assert_eq!(check(&lab, &hub).status.code(), Some(1));
    // The hub comes back: so does the site's health.
    lab.serve_again(&hub, &[]);
    common::until("the site's check passes again", || {
        check(&lab, &site).status.success().then_some(())
    });
    assert!(lab.proc(site.proc).terminate().success());
}
