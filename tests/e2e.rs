//! End-to-end: `tunnel serve` in one namespace "host", `tunnel join` in
//! another, real traffic across, and the failure cases leaving nothing behind.

mod common;

use common::{Host, Lab, can_run, failed_with, handshake_ages, tcp_exchange};
use std::path::Path;
use std::time::Duration;

const UP: Duration = Duration::from_secs(30);

struct Pair {
    lab: Lab,
    a: Host,
    b: Host,
    iface_a: String,
    iface_b: String,
    serve: usize,
    join: Option<usize>,
    token: String,
}

/// serve in host 0; returns with its token printed.
fn serve(hosts: usize, extra: &[&str]) -> Pair {
    let mut lab = Lab::new(hosts);
    let (a, b) = (lab.host(0), lab.host(1));
    let (iface_a, iface_b) = (lab.iface("a"), lab.iface("b"));
    let state = lab.state_dir("a");
    let mut args = vec![
        "serve",
        "--iface",
        &iface_a,
        "--state-dir",
        state.to_str().unwrap(),
        "--backend",
        "userspace",
    ];
    args.extend_from_slice(extra);
    let serve = lab.spawn(&a, &args);
    let token = lab.proc(serve).wait_lines(1, UP)[0].clone();
    Pair {
        lab,
        a,
        b,
        iface_a,
        iface_b,
        serve,
        join: None,
        token,
    }
}

impl Pair {
    fn join(&mut self) -> String {
        let state = self.lab.state_dir("b");
        let (b, a_ip) = (self.b.clone(), self.a.ip.clone());
        let args = [
            "join",
            &self.token,
            &a_ip,
            "--iface",
            &self.iface_b,
            "--state-dir",
            state.to_str().unwrap(),
            "--backend",
            "userspace",
        ];
        let j = self.lab.spawn(&b, &args);
        self.join = Some(j);
        self.lab.proc(j).wait_lines(1, UP)[0].clone()
    }
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p))
            } else if p.is_file() {
                // Regular files only: the local control socket lives here too.
                out.push(p)
            }
        }
    }
    out
}

#[test]
fn serve_and_join_carry_traffic_both_ways_and_leave_nothing_behind() {
    if !can_run("serve_and_join") {
        return;
    }
    let mut p = serve(2, &[]);
    let tokens = p.lab.proc(p.serve).stdout();
    assert_eq!(
        tokens.lines().count(),
        1,
        "stdout holds exactly the token: {tokens:?}"
    );
    assert!(p.token.starts_with("tun1_"));

    let summary = p.join();
    assert!(
        summary.starts_with(&format!("joined {} as 10.77.0.2/24", p.iface_b)),
        "{summary}"
    );
    let join = p.join.unwrap();
    assert_eq!(
        p.lab.proc(join).stdout().lines().count(),
        1,
        "join prints one line"
    );

    // Ping and TCP, both ways.
    assert!(p.b.ping("10.77.0.1"), "B cannot ping A across the tunnel");
    assert!(p.a.ping("10.77.0.2"), "A cannot ping B across the tunnel");
    tcp_exchange(&p.a, &p.b, "10.77.0.1:7001".parse().unwrap());
    tcp_exchange(&p.b, &p.a, "10.77.0.2:7002".parse().unwrap());

    // The hub forwards between its peers, on its own interface only.
    let fwd = |h: &Host, i: &str| {
        h.run(&["cat", &format!("/proc/sys/net/ipv4/conf/{i}/forwarding")])
            .trim()
            .to_owned()
    };
    assert_eq!(fwd(&p.a, &p.iface_a), "1");
    assert_eq!(fwd(&p.a, "all"), "0");
    assert_eq!(fwd(&p.b, &p.iface_b), "0");

    // Stock `wg show` reads both userspace devices and sees a recent handshake.
    let ages_a = handshake_ages(&p.a, &p.iface_a);
    assert!(
        ages_a.iter().flatten().any(|age| *age < 60),
        "server handshakes: {ages_a:?}"
    );
    let ages_b = handshake_ages(&p.b, &p.iface_b);
    assert_eq!(ages_b.len(), 1);
    assert!(
        ages_b[0].is_some_and(|age| age < 60),
        "joiner handshakes: {ages_b:?}"
    );
    let show_b = p.b.run(&["wg", "show", &p.iface_b]);
    assert!(
        show_b.contains("persistent keepalive: every 25 seconds"),
        "{show_b}"
    );

    // The joiner's private key exists only on B.
    let joined: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.lab.state_dir("b").join(format!("{}.json", p.iface_b))).unwrap(),
    )
    .unwrap();
    let secret = joined["private_key"].as_str().unwrap().to_owned();
    assert_eq!(secret.len(), 44);
    let mut server_side = files_under(&p.lab.state_dir("a"));
    assert!(!server_side.is_empty());
    server_side.push(p.lab.proc(p.serve).stdout.clone());
    server_side.push(p.lab.proc(p.serve).stderr.clone());
    for f in &server_side {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            !text.contains(&secret),
            "joiner's private key found in {}",
            f.display()
        );
    }
    // Nor does B's key appear in B's own logs.
    assert!(!p.lab.proc(join).stderr().contains(&secret));

    // SIGTERM both: clean exits, and no interface, UAPI socket or route left.
    assert!(
        p.lab.proc(join).terminate().success(),
        "join exit: {}",
        p.lab.proc(join).stderr()
    );
    assert!(
        p.lab.proc(p.serve).terminate().success(),
        "serve exit: {}",
        p.lab.proc(p.serve).stderr()
    );
    for (h, i) in [(&p.a, &p.iface_a), (&p.b, &p.iface_b)] {
        assert!(!h.has_link(i), "{i} left behind in {}", h.ns);
        assert!(
            !Path::new(&format!("/var/run/wireguard/{i}.sock")).exists(),
            "UAPI socket of {i} left behind"
        );
        assert!(
            !h.routes().contains("10.77.0."),
            "tunnel route left in {}: {}",
            h.ns,
            h.routes()
        );
    }
}

#[test]
fn a_used_token_is_refused() {
    if !can_run("a_used_token_is_refused") {
        return;
    }
    let mut p = serve(3, &[]);
    p.join();
    // A third host presents the same token: the server knows the invite but
    // no longer admits it.
    let c = p.lab.host(2);
    let iface_c = p.lab.iface("c");
    let state_c = p.lab.state_dir("c");
    let out = p.lab.tunnel(
        &c,
        &[
            "join",
            &p.token,
            &p.a.ip,
            "--iface",
            &iface_c,
            "--state-dir",
            state_c.to_str().unwrap(),
            "--backend",
            "userspace",
            "--timeout",
            "15s",
        ],
    );
    failed_with(&out, 2, "already used");
    assert!(out.stdout.is_empty());
    assert!(!c.has_link(&iface_c));
    assert!(!Path::new(&format!("/var/run/wireguard/{iface_c}.sock")).exists());
    assert!(
        !state_c.join(format!("{iface_c}.json")).exists(),
        "a refused join saved state"
    );
    // The first joiner is unaffected.
    assert!(p.b.ping("10.77.0.1"));
}

#[test]
fn bad_tokens_are_refused_before_anything_is_created() {
    if !can_run("bad_tokens") {
        return;
    }
    let p = serve(2, &["--token-ttl", "1s"]);
    let state_b = p.lab.state_dir("b");
    let mut flipped = p.token.clone().into_bytes();
    let i = flipped.len() / 2;
    flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let truncated = p.token[..p.token.len() - 10].to_owned();
    let wrong_version = p.token.replacen("tun1_", "tun9_", 1);
    std::thread::sleep(Duration::from_millis(2100));
    let cases = [
        (flipped.as_str(), "corrupted"),
        (truncated.as_str(), "truncated"),
        ("not-a-token", "not a join token"),
        (wrong_version.as_str(), "unsupported token version 9"),
        (p.token.as_str(), "expired"),
    ];
    for (token, want) in cases {
        let out = p.lab.tunnel(
            &p.b,
            &[
                "join",
                token,
                &p.a.ip,
                "--iface",
                &p.iface_b,
                "--state-dir",
                state_b.to_str().unwrap(),
            ],
        );
        let err = failed_with(&out, 2, want);
        assert_eq!(
            err.trim().lines().count(),
            1,
            "nothing but the error: {err:?}"
        );
        assert!(!p.b.has_link(&p.iface_b), "{want}: interface created");
        assert!(!state_b.exists(), "{want}: state dir created");
    }
    assert!(!Path::new(&format!("/var/run/wireguard/{}.sock", p.iface_b)).exists());
}

#[test]
fn host_errors_are_one_clear_line_and_change_nothing() {
    if !can_run("host_errors") {
        return;
    }
    let mut p = serve(2, &[]);
    let state2 = p.lab.state_dir("a2");
    let s2 = state2.to_str().unwrap();

    // The interface name is taken (same namespace) ...
    let out = p.lab.tunnel(
        &p.a,
        &[
            "serve",
            "--iface",
            &p.iface_a,
            "--state-dir",
            s2,
            "--port",
            "51999",
        ],
    );
    failed_with(&out, 2, "already taken");
    // ... or held by a device in another namespace (shared UAPI directory).
    let out = p.lab.tunnel(
        &p.b,
        &[
            "serve",
            "--iface",
            &p.iface_a,
            "--state-dir",
            s2,
            "--port",
            "51999",
        ],
    );
    failed_with(&out, 2, "in use by another WireGuard process");
    assert!(!p.b.has_link(&p.iface_a));

    // The port is in use.
    let other = p.lab.iface("x");
    let out = p
        .lab
        .tunnel(&p.a, &["serve", "--iface", &other, "--state-dir", s2]);
    failed_with(&out, 2, "UDP port 51820 is already in use");
    assert!(!p.a.has_link(&other));
    assert!(!Path::new(&format!("/var/run/wireguard/{other}.sock")).exists());
    assert!(
        !state2.join(format!("{other}.json")).exists(),
        "a failed serve saved state"
    );

    // Not root: refused before anything is touched.
    let out = p.a.exec(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        common::BIN,
        "serve",
        "--iface",
        &other,
        "--state-dir",
        s2,
        "--port",
        "51998",
    ]);
    failed_with(&out, 2, "needs root or CAP_NET_ADMIN");
    assert!(!p.a.has_link(&other));

    // A bad address and a bad name.
    let out = p.lab.tunnel(
        &p.b,
        &["join", &p.token, "not an address", "--iface", &p.iface_b],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = p.lab.tunnel(
        &p.b,
        &[
            "join",
            &p.token,
            &p.a.ip,
            "--iface",
            "this-name-is-too-long",
        ],
    );
    failed_with(&out, 2, "longer than 15");
    assert!(!p.b.has_link(&p.iface_b));
}

#[test]
fn an_unreachable_server_times_out_cleanly() {
    if !can_run("unreachable") {
        return;
    }
    let mut p = serve(2, &[]);
    assert!(p.lab.proc(p.serve).terminate().success());
    let state_b = p.lab.state_dir("b");
    let out = p.lab.tunnel(
        &p.b,
        &[
            "join",
            &p.token,
            &p.a.ip,
            "--iface",
            &p.iface_b,
            "--state-dir",
            state_b.to_str().unwrap(),
            "--backend",
            "userspace",
            "--timeout",
            "2s",
        ],
    );
    failed_with(&out, 1, "server unreachable");
    assert!(!p.b.has_link(&p.iface_b));
    assert!(!Path::new(&format!("/var/run/wireguard/{}.sock", p.iface_b)).exists());
    assert!(!p.b.routes().contains("10.77.0."));
}

#[test]
fn a_restarted_server_keeps_its_key_and_admits_the_peer_again() {
    if !can_run("restart") {
        return;
    }
    let mut p = serve(2, &[]);
    p.join();
    let key_before = p.a.run(&["wg", "show", &p.iface_a, "public-key"]);
    assert!(p.lab.proc(p.serve).terminate().success());
    let state = p.lab.state_dir("a");
    let again = p.lab.spawn(
        &p.a.clone(),
        &[
            "serve",
            "--iface",
            &p.iface_a.clone(),
            "--state-dir",
            state.to_str().unwrap(),
            "--backend",
            "userspace",
            "--tokens",
            "0",
        ],
    );
    // No tokens asked for: wait until the interface is back instead.
    let deadline = std::time::Instant::now() + UP;
    while !p.a.has_link(&p.iface_a) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            p.lab.proc(again).stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        p.a.run(&["wg", "show", &p.iface_a, "public-key"]),
        key_before
    );
    assert!(
        p.lab.proc(again).stdout().is_empty(),
        "no tokens printed on restart with --tokens 0"
    );
    // The joiner never stopped; its traffic resumes against the same key.
    let deadline = std::time::Instant::now() + UP;
    while !p.b.ping("10.77.0.1") {
        assert!(
            std::time::Instant::now() < deadline,
            "traffic did not resume; {}",
            p.lab.proc(again).stderr()
        );
    }
}
