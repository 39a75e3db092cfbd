//! Docker for the tests: the engine's CLI, networks and containers that
//! are removed when they drop, and what a container fetches or is given.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::IMAGE;

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("spawn docker")
}

pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A Docker network of one test, removed on drop even when it fails.
pub struct Network(pub String);

impl Network {
    /// `docker network create -d PLUGIN --ipam-driver PLUGIN NAME`: a
    /// network of `tunnel`'s driver.
    pub fn create(name: &str, plugin: &str) -> Self {
        Self::create_with(name, plugin, &[])
    }

    /// The same with more options (`--ipv6`).
    pub fn create_with(name: &str, plugin: &str, options: &[&str]) -> Self {
        let mut args = vec!["network", "create", "-d", plugin, "--ipam-driver", plugin];
        args.extend_from_slice(options);
        args.push(name);
        docker_ok(&args);
        Network(name.to_owned())
    }

    /// A plain Docker bridge network, for comparison.
    pub fn bridge(name: &str) -> Self {
        docker_ok(&["network", "create", name]);
        Network(name.to_owned())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.0]);
    }
}

/// Containers of one test, removed on drop even when the test fails.
#[derive(Default)]
pub struct Containers(pub Vec<String>);

impl Containers {
    pub fn run(&mut self, name: &str, cmd: &[&str]) {
        self.run_with(name, &[], cmd);
    }

    /// `docker run -d --name NAME OPTIONS... IMAGE CMD...`; the time
    /// `docker run` took.
    pub fn run_with(&mut self, name: &str, options: &[&str], cmd: &[&str]) -> Duration {
        let mut args = vec!["run", "-d", "--name", name];
        args.extend_from_slice(options);
        args.push(IMAGE);
        args.extend_from_slice(cmd);
        // Kept before it runs: a `docker run` that fails after creating the
        // container (an engine restarting under it) leaves it "Created",
        // and the drop must remove that one too.
        self.0.push(name.to_owned());
        let started = Instant::now();
        docker_ok(&args);
        started.elapsed()
    }

    /// A busybox httpd serving `page` on port 80.
    pub fn web(&mut self, name: &str, page: &str) {
        self.run(
            name,
            &[
                "sh",
                "-c",
                &format!(
                    "mkdir -p /www && echo {page} > /www/index.html && exec httpd -f -p 80 -h /www"
                ),
            ],
        );
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = docker(&["rm", "-f", c]);
        }
    }
}

/// A page fetched from inside container `from`.
pub fn fetch(from: &str, url: &str) -> Option<String> {
    // busybox wget has no working timeout flag here; `timeout` bounds it.
    let out = docker(&["exec", from, "timeout", "5", "wget", "-qO-", url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The tunnel address of container `name`'s endpoint, from `status --json`.
pub fn container_address(status: &serde_json::Value, name: &str) -> String {
    container_field(status, name, "address")
}

/// Its IPv6 address in a dual-stack tunnel.
pub fn container_address6(status: &serde_json::Value, name: &str) -> String {
    container_field(status, name, "address6")
}

fn container_field(status: &serde_json::Value, name: &str, field: &str) -> String {
    let ep = status
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["container"] == name)
        .unwrap_or_else(|| panic!("no endpoint for {name} in {status}"));
    let addr = ep[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} for {name} in {status}"));
    addr.split('/').next().unwrap().to_owned()
}
