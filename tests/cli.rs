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
