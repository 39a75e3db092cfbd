//! End-to-end: `tunnel serve` in one namespace "host", `tunnel join` in
//! another, real traffic across, and the failure cases leaving nothing behind.

mod common;

use common::{Host, failed_with, handshake_ages, needs_root, tcp_exchange};
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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

fn uapi_socket(iface: &str) -> std::path::PathBuf {
    Path::new("/var/run/wireguard").join(format!("{iface}.sock"))
}

#[test]
#[ignore = "needs root: sudo make test"]
fn serve_and_join_carry_traffic_both_ways_and_leave_nothing_behind() {
    needs_root("serve_and_join");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let hub = lab.serve(&a, "a", 1, &[]);
    let tokens = lab.proc(hub.proc).stdout();
    assert_eq!(
        tokens.lines().count(),
        1,
        "stdout holds exactly the token: {tokens:?}"
    );
    assert!(hub.lines[0].starts_with("tun1_"));

    let site = lab.join(&b, "b", &hub.lines[0], &a, &[]);
    assert!(
        site.lines[0].starts_with(&format!("joined {} as 10.77.0.2/24", site.iface)),
        "{:?}",
        site.lines
    );
    assert_eq!(
        lab.proc(site.proc).stdout().lines().count(),
        1,
        "join prints one line"
    );

    // Ping and TCP, both ways.
    assert!(b.ping("10.77.0.1"), "B cannot ping A across the tunnel");
    assert!(a.ping("10.77.0.2"), "A cannot ping B across the tunnel");
    tcp_exchange(&a, &b, "10.77.0.1:7001".parse().unwrap());
    tcp_exchange(&b, &a, "10.77.0.2:7002".parse().unwrap());

    // The hub forwards between its peers, on its own interface only.
    let fwd = |h: &Host, i: &str| {
        h.run(&["cat", &format!("/proc/sys/net/ipv4/conf/{i}/forwarding")])
            .trim()
            .to_owned()
    };
    assert_eq!(fwd(&a, &hub.iface), "1");
    assert_eq!(fwd(&a, "all"), "0");
    assert_eq!(fwd(&b, &site.iface), "0");

    // Stock `wg show` reads both userspace devices and sees a recent handshake.
    let ages_a = handshake_ages(&a, &hub.iface);
    assert!(
        ages_a.iter().flatten().any(|age| *age < 60),
        "server handshakes: {ages_a:?}"
    );
    let ages_b = handshake_ages(&b, &site.iface);
    assert_eq!(ages_b.len(), 1);
    assert!(
        ages_b[0].is_some_and(|age| age < 60),
        "joiner handshakes: {ages_b:?}"
    );
    let show_b = b.run(&["wg", "show", &site.iface]);
    assert!(
        show_b.contains("persistent keepalive: every 25 seconds"),
        "{show_b}"
    );

    // The joiner's private key exists only on B.
    let joined: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(site.state.join(format!("{}.json", site.iface))).unwrap(),
    )
    .unwrap();
    let secret = joined["private_key"].as_str().unwrap().to_owned();
    assert_eq!(secret.len(), 44);
    let mut server_side = files_under(&hub.state);
    assert!(!server_side.is_empty());
    server_side.push(lab.proc(hub.proc).stdout.clone());
    server_side.push(lab.proc(hub.proc).stderr.clone());
    for f in &server_side {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            !text.contains(&secret),
            "joiner's private key found in {}",
            f.display()
        );
    }
    // Nor does B's key appear in B's own logs.
    assert!(!lab.proc(site.proc).stderr().contains(&secret));

    // SIGTERM both: clean exits, and no interface, UAPI socket or route left.
    assert!(
        lab.proc(site.proc).terminate().success(),
        "join exit: {}",
        lab.proc(site.proc).stderr()
    );
    assert!(
        lab.proc(hub.proc).terminate().success(),
        "serve exit: {}",
        lab.proc(hub.proc).stderr()
    );
    for (h, i) in [(&a, &hub.iface), (&b, &site.iface)] {
        assert!(!h.has_link(i), "{i} left behind in {}", h.ns);
        assert!(!uapi_socket(i).exists(), "UAPI socket of {i} left behind");
        assert!(
            !h.routes().contains("10.77.0."),
            "tunnel route left in {}: {}",
            h.ns,
            h.routes()
        );
    }
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_used_token_is_refused() {
    needs_root("a_used_token_is_refused");
    let mut lab = common::lab(3);
    let (a, b, c) = (lab.host(0), lab.host(1), lab.host(2));
    let hub = lab.serve(&a, "a", 1, &[]);
    lab.join(&b, "b", &hub.lines[0], &a, &[]);
    // A third host presents the same token: the server knows the invite but
    // no longer admits it.
    let iface_c = lab.iface("c");
    let state_c = lab.state_dir("c");
    let out = lab.tunnel(
        &c,
        &[
            "join",
            &hub.lines[0],
            &a.ip,
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
    assert!(!uapi_socket(&iface_c).exists());
    assert!(
        !state_c.join(format!("{iface_c}.json")).exists(),
        "a refused join saved state"
    );
    // The first joiner is unaffected.
    assert!(b.ping("10.77.0.1"));
}

#[test]
#[ignore = "needs root: sudo make test"]
fn bad_tokens_are_refused_before_anything_is_created() {
    needs_root("bad_tokens");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let hub = lab.serve(&a, "a", 1, &[]);
    let token = hub.lines[0].clone();
    let iface_b = lab.iface("b");
    let state_b = lab.state_dir("b");
    let mut flipped = token.clone().into_bytes();
    let i = flipped.len() / 2;
    flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let truncated = token[..token.len() - 10].to_owned();
    let wrong_version = token.replacen("tun1_", "tun9_", 1);
    // The server's own token, made expired through the library: an hour ago.
    let mut old = tunnel::token::Token::decode(&token).unwrap();
    old.expires = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    let expired = old.encode();
    let cases = [
        (flipped.as_str(), "corrupted"),
        (truncated.as_str(), "truncated"),
        ("not-a-token", "not a join token"),
        (wrong_version.as_str(), "unsupported token version 9"),
        (expired.as_str(), "expired"),
    ];
    for (token, want) in cases {
        let out = lab.tunnel(
            &b,
            &[
                "join",
                token,
                &a.ip,
                "--iface",
                &iface_b,
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
        assert!(!b.has_link(&iface_b), "{want}: interface created");
        assert!(!state_b.exists(), "{want}: state dir created");
    }
    assert!(!uapi_socket(&iface_b).exists());
}

#[test]
#[ignore = "needs root: sudo make test"]
fn host_errors_are_one_clear_line_and_change_nothing() {
    needs_root("host_errors");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let hub = lab.serve(&a, "a", 1, &[]);
    let token = hub.lines[0].clone();
    let iface_b = lab.iface("b");
    let state2 = lab.state_dir("a2");
    let s2 = state2.to_str().unwrap();

    // The interface name is taken (same namespace) ...
    let out = lab.tunnel(
        &a,
        &[
            "serve",
            "--iface",
            &hub.iface,
            "--state-dir",
            s2,
            "--port",
            "51999",
        ],
    );
    failed_with(&out, 2, "already taken");
    // ... or held by a device in another namespace (shared UAPI directory).
    let out = lab.tunnel(
        &b,
        &[
            "serve",
            "--iface",
            &hub.iface,
            "--state-dir",
            s2,
            "--port",
            "51999",
        ],
    );
    failed_with(&out, 2, "in use by another WireGuard process");
    assert!(!b.has_link(&hub.iface));

    // The port is in use.
    let other = lab.iface("x");
    let out = lab.tunnel(&a, &["serve", "--iface", &other, "--state-dir", s2]);
    failed_with(&out, 2, "UDP port 51820 is already in use");
    assert!(!a.has_link(&other));
    assert!(!uapi_socket(&other).exists());
    assert!(
        !state2.join(format!("{other}.json")).exists(),
        "a failed serve saved state"
    );
    assert!(
        !a.has_nft_table(&format!("tunnel-{other}")),
        "a failed serve left its nftables table"
    );

    // Not root: refused before anything is touched.
    let out = a.exec(&[
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
    assert!(!a.has_link(&other));

    // A bad address and a bad name.
    let out = lab.tunnel(&b, &["join", &token, "not an address", "--iface", &iface_b]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lab.tunnel(
        &b,
        &["join", &token, &a.ip, "--iface", "this-name-is-too-long"],
    );
    failed_with(&out, 2, "longer than 15");
    assert!(!b.has_link(&iface_b));
}

#[test]
#[ignore = "needs root: sudo make test"]
fn an_unreachable_server_times_out_cleanly() {
    needs_root("unreachable");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let hub = lab.serve(&a, "a", 1, &[]);
    assert!(lab.proc(hub.proc).terminate().success());
    let iface_b = lab.iface("b");
    let state_b = lab.state_dir("b");
    let out = lab.tunnel(
        &b,
        &[
            "join",
            &hub.lines[0],
            &a.ip,
            "--iface",
            &iface_b,
            "--state-dir",
            state_b.to_str().unwrap(),
            "--backend",
            "userspace",
            "--timeout",
            "2s",
        ],
    );
    failed_with(&out, 1, "server unreachable");
    assert!(!b.has_link(&iface_b));
    assert!(!uapi_socket(&iface_b).exists());
    assert!(!b.routes().contains("10.77.0."));
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_restarted_server_keeps_its_key_and_admits_the_peer_again() {
    needs_root("restart");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let hub = lab.serve(&a, "a", 1, &[]);
    lab.join(&b, "b", &hub.lines[0], &a, &[]);
    let key_before = a.run(&["wg", "show", &hub.iface, "public-key"]);
    assert!(lab.proc(hub.proc).terminate().success());
    let mut args = hub.local("serve");
    args.extend(["--backend", "userspace", "--tokens", "0"]);
    let again = lab.spawn(&a, &args);
    lab.proc(again).wait_log("is up", common::UP);
    assert_eq!(a.run(&["wg", "show", &hub.iface, "public-key"]), key_before);
    assert!(
        lab.proc(again).stdout().is_empty(),
        "no tokens printed on restart with --tokens 0"
    );
    // The joiner never stopped; its traffic resumes against the same key.
    b.ping_until("10.77.0.1", Instant::now());
}
