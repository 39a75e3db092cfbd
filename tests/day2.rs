//! Day-2 operations end to end: restarts after SIGKILL on either side,
//! status, tokens from a running server, revoke, down, and handing an
//! endpoint over to stock wireguard-go with `tunnel export`.

mod common;

use common::{Host, Lab, can_run};
use std::time::{Duration, Instant};

const UP: Duration = Duration::from_secs(30);

struct Sites {
    lab: Lab,
    a: Host,
    b: Host,
    iface_a: String,
    iface_b: String,
    serve: usize,
    join: usize,
}

fn args<'a>(v: &'a [&'a str]) -> Vec<&'a str> {
    v.to_vec()
}

fn sites(hosts: usize) -> Sites {
    let mut lab = Lab::new(hosts);
    let (a, b) = (lab.host(0), lab.host(1));
    let (iface_a, iface_b) = (lab.iface("a"), lab.iface("b"));
    let (sa, sb) = (lab.state_dir("a"), lab.state_dir("b"));
    let serve = lab.spawn(
        &a,
        &args(&[
            "serve",
            "--iface",
            &iface_a,
            "--state-dir",
            sa.to_str().unwrap(),
            "--backend",
            "userspace",
        ]),
    );
    let token = lab.proc(serve).wait_lines(1, UP)[0].clone();
    let join = lab.spawn(
        &b,
        &args(&[
            "join",
            &token,
            &a.ip,
            "--iface",
            &iface_b,
            "--state-dir",
            sb.to_str().unwrap(),
            "--backend",
            "userspace",
        ]),
    );
    lab.proc(join).wait_lines(1, UP);
    Sites {
        lab,
        a,
        b,
        iface_a,
        iface_b,
        serve,
        join,
    }
}

fn ping_until(from: &Host, to: &str, since: Instant) -> Duration {
    while !from
        .exec(&["ping", "-c", "1", "-W", "1", to])
        .status
        .success()
    {
        assert!(
            since.elapsed() < UP,
            "no traffic from {} to {to} after {UP:?}",
            from.ns
        );
    }
    since.elapsed()
}

fn status(lab: &Lab, host: &Host, tag: &str) -> serde_json::Value {
    let out = lab.tunnel(
        host,
        &[
            "status",
            "--json",
            "--state-dir",
            lab.state_dir(tag).to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json parses")
}

#[test]
fn either_side_killed_and_restarted_resumes_without_a_new_token() {
    if !can_run("restart_after_sigkill") {
        return;
    }
    let mut s = sites(2);
    assert!(s.b.ping("10.77.0.1"));
    let sa = s.lab.state_dir("a");
    let sb = s.lab.state_dir("b");

    // SIGKILL the server, start it again: same key, no token, traffic resumes.
    s.lab.proc(s.serve).child.kill().unwrap();
    s.lab.proc(s.serve).child.wait().unwrap();
    let t = Instant::now();
    let again = s.lab.spawn(
        &s.a,
        &args(&[
            "serve",
            "--iface",
            &s.iface_a,
            "--state-dir",
            sa.to_str().unwrap(),
            "--backend",
            "userspace",
        ]),
    );
    let took = ping_until(&s.b, "10.77.0.1", t);
    eprintln!(
        "server killed and restarted: traffic from the joined site resumed {} ms after the restart began",
        took.as_millis()
    );
    assert!(
        s.lab.proc(again).stdout().is_empty(),
        "a restart printed tokens"
    );

    // SIGKILL the joined side, bring it back with `tunnel up`.
    s.lab.proc(s.join).child.kill().unwrap();
    s.lab.proc(s.join).child.wait().unwrap();
    let t = Instant::now();
    let up = s.lab.spawn(
        &s.b,
        &args(&[
            "up",
            "--iface",
            &s.iface_b,
            "--state-dir",
            sb.to_str().unwrap(),
        ]),
    );
    let line = s.lab.proc(up).wait_lines(1, UP)[0].clone();
    assert!(
        line.starts_with(&format!("up {} as 10.77.0.2/24", s.iface_b)),
        "{line}"
    );
    let took = ping_until(&s.b, "10.77.0.1", t);
    eprintln!(
        "joined site killed, `tunnel up`: traffic resumed {} ms after `up` started",
        took.as_millis()
    );
    assert!(s.a.ping("10.77.0.2"));

    // Both stop cleanly and leave nothing.
    assert!(s.lab.proc(up).terminate().success());
    assert!(s.lab.proc(again).terminate().success());
    assert!(!s.a.has_link(&s.iface_a) && !s.b.has_link(&s.iface_b));
}

#[test]
fn status_tokens_revoke_and_down() {
    if !can_run("status_tokens_revoke_down") {
        return;
    }
    let mut s = sites(3);
    let sa = s.lab.state_dir("a");
    let sa_s = sa.to_str().unwrap().to_owned();
    assert!(s.b.ping("10.77.0.1"));

    // status --json: the site, with a recent handshake and rising counters.
    let rx = |st: &serde_json::Value| -> (u64, u64) {
        let server = &st.as_array().unwrap()[0];
        assert_eq!(server["role"], "server");
        assert_eq!(server["state"], "up");
        let site = server["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "site")
            .expect("site peer");
        assert!(site["last_handshake_secs"].as_u64().expect("handshake") < 60);
        (
            site["rx_bytes"].as_u64().unwrap(),
            site["tx_bytes"].as_u64().unwrap(),
        )
    };
    let before = rx(&status(&s.lab, &s.a, "a"));
    assert!(s.b.ping("10.77.0.1"));
    let after = rx(&status(&s.lab, &s.a, "a"));
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "rx/tx did not rise: {before:?} -> {after:?}"
    );

    // A token from the running server joins a third host.
    let out = s.lab.tunnel(
        &s.a,
        &[
            "token",
            "--iface",
            &s.iface_a,
            "--state-dir",
            &sa_s,
            "--name",
            "site-c",
            "--ttl",
            "10m",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(token.starts_with("tun1_") && !token.contains('\n'));
    let c = s.lab.host(2);
    let iface_c = s.lab.iface("c");
    let sc = s.lab.state_dir("c");
    let join_c = s.lab.spawn(
        &c,
        &args(&[
            "join",
            &token,
            &s.a.ip,
            "--iface",
            &iface_c,
            "--state-dir",
            sc.to_str().unwrap(),
            "--backend",
            "userspace",
        ]),
    );
    let line = s.lab.proc(join_c).wait_lines(1, UP)[0].clone();
    assert!(line.contains("as 10.77.0.3/24"), "{line}");
    assert!(c.ping("10.77.0.1"));

    // revoke cuts it off at once.
    let out = s.lab.tunnel(
        &s.a,
        &[
            "revoke",
            "site-c",
            "--iface",
            &s.iface_a,
            "--state-dir",
            &sa_s,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked 10.77.0.3 (site-c)"));
    assert!(
        !c.exec(&["ping", "-c", "2", "-W", "1", "10.77.0.1"])
            .status
            .success(),
        "a revoked site still reaches the server"
    );
    let st = status(&s.lab, &s.a, "a");
    assert!(!st.to_string().contains("site-c"), "{st}");
    assert!(s.b.ping("10.77.0.1"), "revoke hit the wrong site");
    let out = s.lab.tunnel(
        &s.a,
        &[
            "revoke",
            "nobody",
            "--iface",
            &s.iface_a,
            "--state-dir",
            &sa_s,
        ],
    );
    assert_eq!(out.status.code(), Some(2));

    // down is SIGTERM by another name.
    let sb = s.lab.state_dir("b");
    let out = s.lab.tunnel(
        &s.b,
        &[
            "down",
            "--iface",
            &s.iface_b,
            "--state-dir",
            sb.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.lab.proc(s.join).wait(Duration::from_secs(10)).success());
    assert!(!s.b.has_link(&s.iface_b));
    let out = s
        .lab
        .tunnel(&s.a, &["down", "--iface", &s.iface_a, "--state-dir", &sa_s]);
    assert!(out.status.success());
    assert!(s.lab.proc(s.serve).wait(Duration::from_secs(10)).success());
    assert!(!s.a.has_link(&s.iface_a));
    // Nothing runs: status reports from the saved state.
    assert!(
        status(&s.lab, &s.a, "a")
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["state"] == "down")
    );
    let out = s.lab.tunnel(
        &s.a,
        &["token", "--iface", &s.iface_a, "--state-dir", &sa_s],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running tunnel serves"));
}

#[test]
fn stock_wireguard_go_takes_over_from_export() {
    if !can_run("export_interop") {
        return;
    }
    let mut s = sites(2);
    let sb = s.lab.state_dir("b");
    let export = s.lab.tunnel(
        &s.b,
        &[
            "export",
            "--iface",
            &s.iface_b,
            "--state-dir",
            sb.to_str().unwrap(),
        ],
    );
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let conf = String::from_utf8(export.stdout).unwrap();
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
    assert!(s.lab.proc(s.join).terminate().success());
    let file = s.lab.dir.path().join(format!("{}.conf", s.iface_b));
    std::fs::write(&file, &conf).unwrap();
    let stripped = common::sh(&["wg-quick", "strip", file.to_str().unwrap()]);
    let plain = s.lab.dir.path().join("plain.conf");
    std::fs::write(&plain, stripped).unwrap();
    s.b.run(&["wireguard-go", &s.iface_b]);
    s.b.run(&["wg", "setconf", &s.iface_b, plain.to_str().unwrap()]);
    s.b.run(&["ip", "address", "add", &address, "dev", &s.iface_b]);
    s.b.run(&["ip", "link", "set", &s.iface_b, "mtu", &mtu, "up"]);
    let took = ping_until(&s.b, "10.77.0.1", Instant::now());
    eprintln!(
        "wireguard-go from `tunnel export` reached the server after {} ms",
        took.as_millis()
    );
    // Removing the link stops wireguard-go.
    s.b.run(&["ip", "link", "del", &s.iface_b]);

    // The hub's export is a valid wg-quick config too.
    let sa = s.lab.state_dir("a");
    let hub = s.lab.tunnel(
        &s.a,
        &[
            "export",
            "--iface",
            &s.iface_a,
            "--state-dir",
            sa.to_str().unwrap(),
        ],
    );
    let hub = String::from_utf8(hub.stdout).unwrap();
    assert!(
        hub.contains("ListenPort = 51820") && hub.contains("AllowedIPs = 10.77.0.2/32"),
        "{hub}"
    );
}

#[test]
fn serve_tells_systemd_it_is_ready() {
    if !can_run("sd_notify") {
        return;
    }
    let mut lab = Lab::new(1);
    let a = lab.host(0);
    let iface = lab.iface("a");
    let state = lab.state_dir("a");
    let path = lab.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(UP)).unwrap();
    let serve = lab.spawn_env(
        &a,
        &args(&[
            "serve",
            "--iface",
            &iface,
            "--state-dir",
            state.to_str().unwrap(),
            "--backend",
            "userspace",
        ]),
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
