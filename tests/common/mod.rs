//! Test hosts made of network namespaces joined by veth pairs, running the
//! real `tunnel` binary. Everything a test creates is removed when its
//! [`Lab`] drops, also when the test fails.
//!
//! Needs root, `ip` and `/dev/net/tun`. Without them a test fails when `CI`
//! is set, and otherwise skips with a message on stderr.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tunnel");
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether this machine can run the network tests. Panics under CI when not.
pub fn can_run(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root");
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun");
    }
    if Command::new("ip")
        .arg("-V")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        missing.push("iproute2 (ip)");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: cannot run, missing {}", missing.join(", "));
    if std::env::var_os("CI").is_some() {
        panic!("{msg} (CI is set, so this is a failure, not a skip)");
    }
    eprintln!("SKIPPED {msg}");
    false
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A unique short id for names: namespaces, interfaces (15 bytes max).
pub fn unique() -> String {
    format!(
        "{}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A "host": a network namespace.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    /// Its address on the shared veth link.
    pub ip: String,
}

impl Host {
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .output()
            .expect("spawn ip netns exec")
    }

    pub fn run(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in {}: {args:?} failed: {}{}",
            self.ns,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn has_link(&self, name: &str) -> bool {
        self.exec(&["ip", "link", "show", "dev", name])
            .status
            .success()
    }

    pub fn routes(&self) -> String {
        self.run(&["ip", "route", "show"])
    }

    pub fn ping(&self, ip: &str) -> bool {
        self.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", ip])
            .status
            .success()
    }

    /// Runs `f` on a thread that has entered this host's namespace.
    pub fn in_ns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let ns = fs::File::open(&path).expect("open netns");
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }
}

/// One TCP exchange: a listener on `server` at `addr`, a client from `client`.
pub fn tcp_exchange(server: &Host, client: &Host, addr: SocketAddr) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let srv = server.in_ns(move || {
        let l = TcpListener::bind(addr).expect("bind tunnel address");
        ready_tx.send(()).unwrap();
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("read request");
        assert_eq!(&buf, b"hello");
        s.write_all(b"world").expect("write reply");
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("listener ready");
    let cli = client.in_ns(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .expect("connect across the tunnel");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("read reply");
        buf
    });
    assert_eq!(&cli.join().expect("client thread"), b"world");
    srv.join().expect("server thread");
}

/// A running `tunnel` process, its output captured to files.
pub struct Proc {
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Proc {
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until stdout has `n` lines; panics with stderr if the process exits first.
    pub fn wait_lines(&mut self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.stdout();
            let lines: Vec<String> = out.lines().map(str::to_owned).collect();
            if lines.len() >= n && out.ends_with('\n') {
                return lines;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "tunnel exited ({status}) before printing {n} line(s); stderr:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {n} line(s) on stdout in {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits (at most 10 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.wait(Duration::from_secs(10))
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "tunnel still running after {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Namespaces, processes and files of one test; all removed on drop.
pub struct Lab {
    pub id: String,
    pub dir: tempfile::TempDir,
    hosts: Vec<Host>,
    procs: Vec<Proc>,
    ifaces: Vec<String>,
}

impl Lab {
    /// `n` hosts on one shared link ("the internet"): a bridge in the first
    /// namespace, one veth per host. Addresses 10.231.0.1, .2, ...
    pub fn new(n: usize) -> Self {
        let id = unique();
        let mut lab = Lab {
            id: id.clone(),
            dir: tempfile::tempdir().unwrap(),
            hosts: vec![],
            procs: vec![],
            ifaces: vec![],
        };
        for i in 0..n {
            let ns = format!("tnl{id}h{i}");
            sh(&["ip", "netns", "add", &ns]);
            // A new namespace inherits forwarding from the root one, which
            // Docker turns on; start from a plain host's default instead.
            for key in [
                "net.ipv4.conf.all.forwarding=0",
                "net.ipv4.conf.default.forwarding=0",
            ] {
                sh(&["ip", "netns", "exec", &ns, "sysctl", "-qw", key]);
            }
            lab.hosts.push(Host {
                ns,
                ip: format!("10.231.0.{}", i + 1),
            });
        }
        let hub = lab.hosts[0].ns.clone();
        let br = format!("br{id}");
        sh(&["ip", "-n", &hub, "link", "add", &br, "type", "bridge"]);
        sh(&["ip", "-n", &hub, "link", "set", &br, "up"]);
        for (i, h) in lab.hosts.iter().enumerate() {
            let (a, b) = (format!("v{id}h{i}"), format!("v{id}b{i}"));
            sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
            sh(&["ip", "link", "set", &a, "netns", &h.ns]);
            sh(&["ip", "link", "set", &b, "netns", &hub]);
            sh(&["ip", "-n", &hub, "link", "set", &b, "master", &br, "up"]);
            sh(&[
                "ip",
                "-n",
                &h.ns,
                "addr",
                "add",
                &format!("{}/24", h.ip),
                "dev",
                &a,
            ]);
            sh(&["ip", "-n", &h.ns, "link", "set", &a, "up"]);
            sh(&["ip", "-n", &h.ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    pub fn host(&self, i: usize) -> Host {
        self.hosts[i].clone()
    }

    /// A unique WireGuard interface name (the UAPI directory is shared).
    pub fn iface(&mut self, tag: &str) -> String {
        let name = format!("wt{}{tag}", self.id);
        assert!(name.len() <= 15, "{name} is too long");
        self.ifaces.push(name.clone());
        name
    }

    pub fn state_dir(&self, tag: &str) -> PathBuf {
        self.dir.path().join(format!("state-{tag}"))
    }

    /// Starts `tunnel ARGS` in `host`; output goes to files in the lab dir.
    pub fn spawn(&mut self, host: &Host, args: &[&str]) -> usize {
        self.spawn_env(host, args, &[])
    }

    pub fn spawn_env(&mut self, host: &Host, args: &[&str], env: &[(&str, &str)]) -> usize {
        let n = self.procs.len();
        let stdout = self.dir.path().join(format!("p{n}.out"));
        let stderr = self.dir.path().join(format!("p{n}.err"));
        let child = Command::new("ip")
            .args(["netns", "exec", &host.ns, BIN])
            .args(args)
            .env("RUST_LOG", "tunnel=debug,warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn tunnel");
        self.procs.push(Proc {
            child,
            stdout,
            stderr,
        });
        n
    }

    pub fn proc(&mut self, i: usize) -> &mut Proc {
        &mut self.procs[i]
    }

    /// Runs `tunnel ARGS` in `host` to completion.
    pub fn tunnel(&self, host: &Host, args: &[&str]) -> Output {
        let mut cmd = vec![BIN];
        cmd.extend_from_slice(args);
        host.exec(&cmd)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if p.child.try_wait().ok().flatten().is_none() {
                let pid = nix::unistd::Pid::from_raw(p.child.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(5);
                while p.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).status();
        }
        for i in &self.ifaces {
            let _ = fs::remove_file(format!("/var/run/wireguard/{i}.sock"));
        }
    }
}

/// Asserts that a command failed with `code` and that stderr ends with one
/// `error:` line holding `want`; returns all of stderr.
pub fn failed_with(out: &Output, code: i32, want: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "wanted exit {code} and {want:?}: {err}"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err:?}");
    assert!(errors[0].contains(want), "wanted {want:?} in {err:?}");
    assert_eq!(
        err.trim().lines().last(),
        Some(errors[0]),
        "the error comes last: {err:?}"
    );
    err
}

/// The `wg show IFACE latest-handshakes` age in seconds of every peer.
pub fn handshake_ages(host: &Host, iface: &str) -> Vec<Option<u64>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    host.run(&["wg", "show", iface, "latest-handshakes"])
        .lines()
        .map(|l| {
            let t: u64 = l
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            (t != 0).then(|| now.saturating_sub(t))
        })
        .collect()
}
