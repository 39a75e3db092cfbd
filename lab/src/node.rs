//! The `tunnel` endpoints a lab starts: `serve` (a hub) and `join` (a
//! site) as [`Node`]s, and the commands that talk to them.

use std::path::PathBuf;
use std::process::Output;

use crate::{Host, Lab, UP};

/// An endpoint a test started: a `serve` or a `join`.
#[derive(Clone, Debug)]
pub struct Node {
    /// Its process, in [`Lab::proc`].
    pub proc: usize,
    pub host: Host,
    pub iface: String,
    pub state: PathBuf,
    /// What it printed: the tokens of a `serve`, the summary of a `join`.
    pub lines: Vec<String>,
}

impl Node {
    /// `--iface I --state-dir S`, for the commands that talk to it.
    pub fn local<'a>(&'a self, command: &'a str) -> Vec<&'a str> {
        vec![
            command,
            "--iface",
            &self.iface,
            "--state-dir",
            self.state.to_str().unwrap(),
        ]
    }
}

/// A joined site's tunnel address, from its summary line
/// ("joined IFACE as 10.77.0.3/24, ...").
pub fn site_address(site: &Node) -> String {
    let line = site.lines.first().expect("a join summary");
    line.split(" as ")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned()
}

impl Lab {
    /// `tunnel serve` (userspace) in `host` with interface tag `tag`,
    /// `PRE` before it; returns once it printed `tokens` lines.
    pub fn serve_via(
        &mut self,
        host: &Host,
        tag: &str,
        tokens: usize,
        pre: &[&str],
        extra: &[&str],
    ) -> Node {
        let iface = self.iface(tag);
        let state = self.state_dir(tag);
        let count = tokens.to_string();
        let mut args = vec![
            "serve",
            "--iface",
            &iface,
            "--state-dir",
            state.to_str().unwrap(),
            "--backend",
            "userspace",
            "--tokens",
            &count,
        ];
        // The tests' addresses: a new hub's default subnet is random.
        if !extra.contains(&"--subnet") {
            args.extend_from_slice(&["--subnet", "10.77.0.0/24"]);
        }
        args.extend_from_slice(extra);
        let proc = self.spawn_via(host, pre, &args, &[]);
        let lines = if tokens > 0 {
            self.proc(proc).wait_lines(tokens, UP)
        } else {
            self.proc(proc).wait_log("is up", UP);
            vec![]
        };
        Node {
            proc,
            host: host.clone(),
            iface,
            state,
            lines,
        }
    }

    /// `tunnel serve` again for `node`'s interface and state (a restart),
    /// with `extra`; returns its process once it is up.
    pub fn serve_again(&mut self, node: &Node, extra: &[&str]) -> usize {
        let state = node.state.to_str().expect("a UTF-8 path").to_owned();
        let mut args = vec![
            "serve",
            "--iface",
            &node.iface,
            "--state-dir",
            &state,
            "--backend",
            "userspace",
        ];
        args.extend_from_slice(extra);
        let proc = self.spawn(&node.host, &args);
        self.proc(proc).wait_log("is up", UP);
        proc
    }

    /// `tunnel join` run to completion (one that is to fail), with a new
    /// interface and state dir tagged `tag`.
    pub fn join_output(
        &mut self,
        host: &Host,
        tag: &str,
        token: &str,
        server: &str,
        extra: &[&str],
    ) -> Output {
        let (iface, state) = (self.iface(tag), self.state_dir(tag));
        let mut args = vec![
            "join",
            token,
            server,
            "--iface",
            &iface,
            "--state-dir",
            state.to_str().expect("a UTF-8 path"),
            "--backend",
            "userspace",
        ];
        args.extend_from_slice(extra);
        self.tunnel(host, &args)
    }

    pub fn serve(&mut self, host: &Host, tag: &str, tokens: usize, extra: &[&str]) -> Node {
        self.serve_via(host, tag, tokens, &[], extra)
    }

    /// `tunnel join TOKEN SERVER` (userspace) in `host`; returns once it
    /// printed its summary.
    pub fn join(
        &mut self,
        host: &Host,
        tag: &str,
        token: &str,
        server: &Host,
        extra: &[&str],
    ) -> Node {
        self.join_env(host, tag, token, server, extra, &[])
    }

    /// [`Lab::join`] with environment variables (a proxy, a CA file).
    pub fn join_env(
        &mut self,
        host: &Host,
        tag: &str,
        token: &str,
        server: &Host,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        let iface = self.iface(tag);
        let state = self.state_dir(tag);
        let mut args = vec![
            "join",
            token,
            &server.ip,
            "--iface",
            &iface,
            "--state-dir",
            state.to_str().unwrap(),
            "--backend",
            "userspace",
        ];
        args.extend_from_slice(extra);
        let proc = self.spawn_env(host, &args, env);
        let lines = self.proc(proc).wait_lines(1, UP);
        Node {
            proc,
            host: host.clone(),
            iface,
            state,
            lines,
        }
    }

    /// `tunnel route approve|reject SITE PREFIX` on the hub, where SITE
    /// is the site's tunnel address from its join summary. Returns stdout.
    pub fn decide_route(&self, hub: &Node, site: &Node, verb: &str, prefix: &str) -> String {
        let address = site_address(site);
        let mut args = vec!["route", verb, &address, prefix];
        args.extend(hub.local("x").into_iter().skip(1));
        self.tunnel_ok(&hub.host, &args)
    }

    /// `tunnel status --json` for the state dir of `node`.
    pub fn status(&self, node: &Node) -> serde_json::Value {
        let out = self.tunnel_ok(
            &node.host,
            &[
                "status",
                "--json",
                "--state-dir",
                node.state.to_str().unwrap(),
            ],
        );
        serde_json::from_str(&out).expect("status --json parses")
    }
}
