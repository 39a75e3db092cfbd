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
fn help_documents_exit_codes_and_commands() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Exit codes: 0 success, 2 bad usage or input, 1 runtime failure"),
        "{text}"
    );
    for cmd in [
        "serve",
        "join",
        "status",
        "token",
        "revoke",
        "up",
        "down",
        "export",
        "completions",
    ] {
        assert!(text.contains(cmd), "{cmd} missing from --help");
    }
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(run(&["serve", "--no-such-flag"]).status.code(), Some(2));
    assert_eq!(run(&["join"]).status.code(), Some(2));
    assert_eq!(run(&["serve", "--mtu", "100"]).status.code(), Some(2));
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
fn a_bad_token_is_refused_without_root() {
    let out = run(&["join", "tun1_AAAA", "192.0.2.1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(err.trim().lines().count(), 1);
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
        assigned: "10.77.0.2".parse().unwrap(),
        server_address: "10.77.0.1".parse().unwrap(),
        expires: 4_000_000_000,
        endpoint_hint: Some("vpn.example.org".into()),
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
