//! Command-line conventions that need no root.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tunnel");

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

#[test]
fn help_lists_every_subcommand_and_the_exit_codes() {
    use clap::CommandFactory;
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Exit codes: 0 success, 2 bad usage or input, 1 runtime failure"),
        "{text}"
    );
    // The "Commands:" section, one `  name  description` line each.
    let listed: Vec<&str> = text
        .split("Commands:")
        .nth(1)
        .expect("a Commands section")
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut want: Vec<String> = tunnel::cli::Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    want.push("help".into());
    assert_eq!(listed, want, "{text}");
    for cmd in [
        "serve", "join", "token", "revoke", "up", "down", "status", "export",
    ] {
        assert!(want.iter().any(|w| w == cmd), "{cmd} is not a subcommand");
    }
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(run(&["serve", "--no-such-flag"]).status.code(), Some(2));
    assert_eq!(run(&["join"]).status.code(), Some(2));
    assert_eq!(run(&["serve", "--mtu", "100"]).status.code(), Some(2));
}

#[test]
fn a_bad_advertised_endpoint_is_refused_in_one_line_before_anything() {
    for bad in [
        "nonsense",
        "198.51.100.7",
        "198.51.100.7:99999",
        "host.example:51820",
    ] {
        let out = run(&["join", "tun1_x", "--advertise-endpoint", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--advertise-endpoint"), "{bad}: {err}");
    }
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("tunnel") && text.contains("serve"),
            "{shell}: {text}"
        );
    }
}

#[test]
fn a_forged_token_that_never_expires_is_refused_cleanly() {
    use tunnel::keys::PrivateKey;
    use tunnel::token::Token;
    let forged = Token {
        server_public_key: PrivateKey::generate().public_key(),
        invite_key: PrivateKey::generate(),
        port: 51820,
        subnet: "10.77.0.0/24".parse().unwrap(),
        subnet6: None,
        assigned: "10.77.0.2".parse().unwrap(),
        server_address: "10.77.0.1".parse().unwrap(),
        expires: u64::MAX,
        endpoint_hint: None,
        udp: true,
        websocket: None,
    };
    let out = run(&["join", &forged.encode(), "192.0.2.1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("beyond the longest TTL"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn out_of_range_ttls_counts_and_names_are_usage_errors() {
    for args in [
        &["serve", "--token-ttl", "100000000000d"][..],
        &["serve", "--token-ttl", "0s"],
        &["serve", "--tokens", "1001"],
        &["token", "--count", "0"],
        &["token", "--ttl", "367d"],
        &["token", "--name", "a b"],
        &["serve", "--endpoints-per-site", "99999"],
        &["join", "tun1_x", "--timeout", "100000000000d"],
        &["up", "--timeout", "0s"],
        &["serve", "--port", "0"],
        &["serve", "--port", "randomly"],
        &["serve", "--allow-from", "10.0.0.300/24"],
        &["join", "tun1_x", "--route", "not-a-net"],
        &["join", "tun1_x", "--snat-public"],
        &["join", "tun1_x", "--firewall", "maybe"],
        &["peer", "add", "phone", "--public-key", "short"],
        &["peer", "add", "a b", "--allow-generated-key"],
        &[
            "peer",
            "add",
            "p",
            "--public-key",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "--allow-generated-key",
        ],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("panicked"),
            "{args:?}"
        );
    }
}

#[test]
fn a_bad_token_is_refused_without_root() {
    let out = run(&["join", "tun1_AAAA", "192.0.2.1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(err.trim().lines().count(), 1);
}

#[test]
fn lan_flags_that_contradict_each_other_are_refused_before_anything_runs() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap();
    for (args, want) in [
        (
            &["peer", "add", "phone", "--state-dir", dir][..],
            "--public-key",
        ),
        (
            &["serve", "--masquerade", "--state-dir", dir],
            "--masquerade needs",
        ),
        (
            &[
                "serve",
                "--subnet",
                "10.77.0.0/24",
                "--route",
                "10.77.0.0/16",
                "--state-dir",
                dir,
            ],
            "overlaps the tunnel's subnet",
        ),
        (
            &["serve", "--route", "192.168.1.1/24", "--state-dir", dir],
            "did you mean 192.168.1.0/24",
        ),
        (
            &["serve", "--route", "0.0.0.0/0", "--state-dir", dir],
            "whole internet",
        ),
        (
            &[
                "serve",
                "--route",
                "192.168.0.0/16",
                "--route",
                "192.168.7.0/24",
                "--state-dir",
                dir,
            ],
            "overlaps 192.168.0.0/16",
        ),
        (
            &[
                "serve",
                "--token-route",
                "192.168.1.1/24",
                "--state-dir",
                dir,
            ],
            "--token-route: route 192.168.1.1/24 is not a network address",
        ),
        (
            &["serve", "--token-route", "0.0.0.0/0", "--state-dir", dir],
            "whole internet",
        ),
        (
            &["serve", "--token-route", "127.0.0.0/8", "--state-dir", dir],
            "loopback",
        ),
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    // Typos in the approval commands' words: usage errors, nothing sent.
    for args in [
        &[
            "route",
            "approve",
            "site-a",
            "not-a-net",
            "--state-dir",
            dir,
        ][..],
        &["route", "approve", "site-a", "--state-dir", dir],
        &[
            "route",
            "allow",
            "site-a",
            "192.168.9.0/24",
            "--state-dir",
            dir,
        ],
        &["token", "--route", "192.168.9.0/33", "--state-dir", dir],
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error:"), "{args:?}: {err}");
    }
    assert!(
        std::fs::read_dir(state.path()).unwrap().next().is_none(),
        "state written"
    );
}

/// `cargo test` builds the examples next to the test binaries.
fn example(name: &str) -> std::path::PathBuf {
    let deps = std::env::current_exe().unwrap();
    deps.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

#[test]
fn the_token_example_decodes_a_token() {
    use tunnel::keys::PrivateKey;
    use tunnel::token::Token;
    let invite = PrivateKey::generate();
    let token = Token {
        server_public_key: PrivateKey::generate().public_key(),
        invite_key: invite.clone(),
        port: 51820,
        subnet: "10.77.0.0/24".parse().unwrap(),
        subnet6: None,
        assigned: "10.77.0.2".parse().unwrap(),
        server_address: "10.77.0.1".parse().unwrap(),
        expires: 4_000_000_000,
        endpoint_hint: Some("vpn.example.org".into()),
        udp: true,
        websocket: None,
    };
    let out = Command::new(example("inspect_token"))
        .arg(token.encode())
        .output()
        .expect("examples are built by cargo test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("your address      : 10.77.0.2/24"), "{text}");
    assert!(text.contains("vpn.example.org"), "{text}");
    assert!(
        !text.contains(invite.to_base64().as_str()),
        "the example printed the invite's private key"
    );
    let bad = Command::new(example("inspect_token"))
        .arg("tun1_garbage!")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn docker_native_and_metrics_flags_refuse_typos_with_one_line_and_change_nothing() {
    // Unique enough that a link by this name can only be ours.
    let iface = format!("wtcli{}", std::process::id() % 100000);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let base = [
        "serve",
        "--iface",
        &iface,
        "--state-dir",
        state,
        "--tokens",
        "0",
    ];
    for extra in [
        &["--metrics", "localhost"][..],
        &["--metrics", "127.0.0.1:99999"],
        &["--attach-label", "=x"],
        &["--attach-label", "a b"],
        &["--name", "Bad Name!"],
        &["--dns-zone", "a..b"],
        &["--docker-driver", "a/b"],
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
        // One line says what is wrong (clap adds its usage hint below it).
        assert!(
            err.lines().next().is_some_and(|l| l.starts_with("error: ")),
            "{extra:?}: {err}"
        );
        assert!(
            !std::path::Path::new(&format!("/sys/class/net/{iface}")).exists(),
            "{extra:?} left a link"
        );
        assert!(
            !std::path::Path::new(state)
                .join(format!("{iface}.json"))
                .exists(),
            "{extra:?} saved a state"
        );
    }
}

#[test]
fn metrics_off_loopback_without_the_opt_in_exit_2_with_one_line_and_create_nothing() {
    let iface = format!("wtmx{}", std::process::id() % 100000);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let local = ["--iface", &iface, "--state-dir", state];
    let serve: Vec<&str> = ["serve", "--tokens", "0"]
        .iter()
        .chain(&local)
        .copied()
        .collect();
    let join: Vec<&str> = ["join", "tun1_not_read", "192.0.2.1"]
        .iter()
        .chain(&local)
        .copied()
        .collect();
    let up: Vec<&str> = ["up"].iter().chain(&local).copied().collect();
    for command in [&serve, &join, &up] {
        for addr in ["0.0.0.0:9580", "[::]:9580", "192.0.2.7:9580"] {
            let mut args = command.clone();
            args.extend(["--metrics", addr]);
            let out = run(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(
                err.starts_with("error: ") && err.contains("--metrics-public"),
                "{args:?}: {err}"
            );
            assert!(
                !std::path::Path::new(state).exists(),
                "{args:?} created the state dir"
            );
            assert!(
                !std::path::Path::new(&format!("/sys/class/net/{iface}")).exists(),
                "{args:?} left a link"
            );
        }
    }
    // The opt-ins mean nothing without --metrics: a usage error, not a no-op.
    for flag in ["--metrics-public", "--metrics-peers"] {
        let mut args = serve.clone();
        args.push(flag);
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--metrics"),
            "{args:?}"
        );
        assert!(!std::path::Path::new(state).exists());
    }
}
