//! The lab of `tunnel`: "hosts" made of network namespaces on one shared
//! link, the real `tunnel` binary running in them, and Docker containers.
//! Written once, and used by the end-to-end tests, the benchmark
//! (`make bench`) and the demo (`make demo`). Everything a [`Lab`] (or
//! [`Containers`]) creates is removed when it drops, also when the test or
//! the run fails. Addresses are only ever inside the namespaces it makes.
//!
//! Tests that need root, namespaces or Docker are `#[ignore]`d with the
//! reason, so that a plain `cargo test` reports them as ignored; `make
//! test` runs them with `--include-ignored`, and then [`needs_root`] and
//! [`needs_docker`] fail a test whose prerequisites are missing, never
//! skip it.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod scale;
pub mod soak;

/// The longest any bring-up may take in a test.
pub const UP: Duration = Duration::from_secs(30);
pub const IMAGE: &str = "tunnel-test-busybox:latest";
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn missing_for_netns() -> Vec<&'static str> {
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
    missing
}

/// Fails the test unless it can make namespaces and TUN devices. Tests
/// that call this are `#[ignore = "needs root: sudo make test"]`.
pub fn needs_root(test: &str) {
    let missing = missing_for_netns();
    assert!(
        missing.is_empty(),
        "{test} cannot run here: missing {} (run as root: sudo make test)",
        missing.join(", ")
    );
}

/// Fails the test unless a Docker engine answers and has the test image
/// (`scripts/docker-env.sh` provides both).
pub fn needs_docker(test: &str) {
    needs_root(test);
    let engine = docker(&["info", "--format", "{{.ServerVersion}}"])
        .status
        .success();
    assert!(
        engine,
        "{test} cannot run here: no Docker engine answers (run scripts/docker-env.sh as root)"
    );
    assert!(
        docker(&["image", "inspect", IMAGE]).status.success(),
        "{test} cannot run here: no image {IMAGE} (run scripts/docker-env.sh as root)"
    );
}

/// For the lab's own programs (bench, demo): a failure panics, so that the
/// lab unwinds and cleans up, and is shown as one `error:` line.
pub fn plain_panics() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("failed");
        eprintln!("error: {msg}");
    }));
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
    /// Its address on the link it was made with.
    pub ip: String,
    /// Its interface on that link.
    pub dev: String,
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

    /// Pings until `to` answers; panics after [`UP`]. Returns the time taken.
    pub fn ping_until(&self, to: &str, since: Instant) -> Duration {
        while !self
            .exec(&["ping", "-c", "1", "-W", "1", to])
            .status
            .success()
        {
            assert!(
                since.elapsed() < UP,
                "no traffic from {} to {to} after {UP:?}",
                self.ns
            );
        }
        since.elapsed()
    }

    /// The HTTP status of a request with curl, "000" when no answer came.
    /// `pre` runs first, e.g. `setpriv` to drop privileges.
    pub fn http(&self, pre: &[&str], method: &str, url: &str, body: Option<&str>) -> String {
        let mut args: Vec<&str> = pre.to_vec();
        args.extend([
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "5",
            "-X",
            method,
        ]);
        if let Some(b) = body {
            args.extend(["-H", "content-type: application/json", "-d", b]);
        }
        args.push(url);
        String::from_utf8_lossy(&self.exec(&args).stdout).into_owned()
    }

    /// Waits until something listens on TCP `port` here; panics after `within`.
    pub fn wait_listening(&self, port: &str, within: Duration) {
        let deadline = Instant::now() + within;
        let filter = format!("sport = :{port}");
        while !self
            .exec(&["ss", "-Hltn", &filter])
            .stdout
            .iter()
            .any(|c| !c.is_ascii_whitespace())
        {
            assert!(
                Instant::now() < deadline,
                "nothing listens on {port} in {}",
                self.ns
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether table `inet NAME` exists in this namespace.
    pub fn has_nft_table(&self, name: &str) -> bool {
        self.exec(&["nft", "list", "table", "inet", name])
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

    /// Runs an async block in this namespace, on its own runtime.
    pub fn block_on<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
        &self,
        f: impl FnOnce() -> F + Send + 'static,
    ) -> T {
        self.in_ns(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .expect("namespace thread")
    }
}

/// A tiny HTTP server that answers each request with the client's
/// address as it sees it (to tell masquerading and SNAT apart); stops
/// when dropped.
pub struct WhoAmI {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WhoAmI {
    pub fn start(host: &Host, addr: SocketAddr) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = host.in_ns(move || {
            let l = TcpListener::bind(addr).expect("bind the whoami server");
            l.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !flag.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf);
                        let body = format!("{}\n", peer.ip());
                        let _ = write!(
                            s,
                            "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("whoami server ready");
        WhoAmI {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for WhoAmI {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Host {
    /// The body of `curl URL` from here, `None` when no answer came.
    pub fn curl(&self, url: &str) -> Option<String> {
        let out = self.exec(&["curl", "-s", "-m", "3", url]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Whether a link forwards IPv4 (`net.ipv4.conf.LINK.forwarding`).
    pub fn forwarding(&self, link: &str) -> bool {
        self.run(&["cat", &format!("/proc/sys/net/ipv4/conf/{link}/forwarding")])
            .trim()
            == "1"
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
            if lines.len() >= n && (n == 0 || out.ends_with('\n')) {
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

    /// Waits until stderr holds `text`; panics if the process exits first.
    pub fn wait_log(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(text) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "tunnel exited ({status}) before logging {text:?}:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log after {timeout:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory (VmHWM) in kB, while it runs.
    pub fn peak_rss_kb(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, then waits (at most 10 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.wait(Duration::from_secs(10))
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
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

/// Namespaces, processes and files of one test; all removed on drop.
pub struct Lab {
    /// The `tunnel` binary it runs.
    pub bin: PathBuf,
    /// `RUST_LOG` for the `tunnel` processes it starts.
    pub log: String,
    pub id: String,
    pub dir: tempfile::TempDir,
    hosts: Vec<Host>,
    extra: Vec<String>,
    procs: Vec<Proc>,
    ifaces: Vec<String>,
}

/// Namespace names (and so sysctl and nft state) stay inside the lab.
fn add_ns(ns: &str) {
    sh(&["ip", "netns", "add", ns]);
    // A new namespace inherits forwarding from the root one, which Docker
    // turns on; start from a plain host's default instead.
    for key in [
        "net.ipv4.conf.all.forwarding=0",
        "net.ipv4.conf.default.forwarding=0",
    ] {
        sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", key]);
    }
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
}

impl Lab {
    /// `n` hosts on one shared link ("the internet") running `bin`: a
    /// bridge in the first namespace, one veth per host; two hosts get a
    /// veth pair of their own. Addresses 10.231.0.1, .2, ...
    pub fn new(bin: impl Into<PathBuf>, n: usize) -> Self {
        let id = unique();
        let mut lab = Lab {
            bin: bin.into(),
            log: "tunnel=debug,warn".to_owned(),
            id: id.clone(),
            dir: tempfile::tempdir().unwrap(),
            hosts: vec![],
            extra: vec![],
            procs: vec![],
            ifaces: vec![],
        };
        // Up to 250 hosts on 10.231.0.0/24; a bigger lab (the scale
        // benchmark) spreads over 10.231.0.0/16.
        let prefix = if n > 250 { 16 } else { 24 };
        for i in 0..n {
            let ns = format!("tnl{id}h{i}");
            add_ns(&ns);
            lab.hosts.push(Host {
                ns,
                ip: format!("10.231.{}.{}", (i + 1) / 256, (i + 1) % 256),
                dev: format!("v{id}h{i}"),
            });
        }
        let addr = |h: &Host, dev: &str| {
            sh(&[
                "ip",
                "-n",
                &h.ns,
                "addr",
                "add",
                &format!("{}/{prefix}", h.ip),
                "dev",
                dev,
            ]);
            sh(&["ip", "-n", &h.ns, "link", "set", dev, "up"]);
        };
        if n == 2 {
            // A plain veth pair: the benchmark's "raw veth" is exactly that.
            let (a, b) = (format!("v{id}h0"), format!("v{id}h1"));
            let (ha, hb) = (&lab.hosts[0], &lab.hosts[1]);
            sh(&[
                "ip", "link", "add", &a, "netns", &ha.ns, "type", "veth", "peer", "name", &b,
                "netns", &hb.ns,
            ]);
            addr(ha, &a);
            addr(hb, &b);
        } else if n > 2 {
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
                addr(h, &a);
            }
        }
        lab
    }

    pub fn host(&self, i: usize) -> Host {
        self.hosts[i].clone()
    }

    /// A LAN behind `gateway`: a new namespace on a link of its own,
    /// `PREFIX.1` on the gateway and `PREFIX.2` on the LAN host, which
    /// routes `via` (a CIDR) through the gateway.
    pub fn lan(&mut self, gateway: &Host, prefix: &str, via: &str) -> Host {
        let n = self.extra.len();
        let ns = format!("tnl{}l{n}", self.id);
        add_ns(&ns);
        self.extra.push(ns.clone());
        let (a, b) = (format!("l{}g{n}", self.id), format!("l{}h{n}", self.id));
        sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
        sh(&["ip", "link", "set", &a, "netns", &gateway.ns]);
        sh(&["ip", "link", "set", &b, "netns", &ns]);
        sh(&[
            "ip",
            "-n",
            &gateway.ns,
            "addr",
            "add",
            &format!("{prefix}.1/24"),
            "dev",
            &a,
        ]);
        sh(&["ip", "-n", &gateway.ns, "link", "set", &a, "up"]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{prefix}.2/24"),
            "dev",
            &b,
        ]);
        sh(&["ip", "-n", &ns, "link", "set", &b, "up"]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            via,
            "via",
            &format!("{prefix}.1"),
        ]);
        Host {
            ns,
            ip: format!("{prefix}.2"),
            dev: b,
        }
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
        self.spawn_via(host, &[], args, &[])
    }

    pub fn spawn_env(&mut self, host: &Host, args: &[&str], env: &[(&str, &str)]) -> usize {
        self.spawn_via(host, &[], args, env)
    }

    /// Starts `PRE... tunnel ARGS` in `host` (`PRE` e.g. `prlimit ...`).
    pub fn spawn_via(
        &mut self,
        host: &Host,
        pre: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> usize {
        let bin = self.bin.to_str().expect("a UTF-8 path").to_owned();
        let argv: Vec<&str> = pre
            .iter()
            .copied()
            .chain([bin.as_str()])
            .chain(args.iter().copied())
            .collect();
        let log = self.log.clone();
        let mut env: Vec<(&str, &str)> = env.to_vec();
        if !env.iter().any(|(k, _)| *k == "RUST_LOG") {
            env.push(("RUST_LOG", &log));
        }
        self.spawn_cmd(host, &argv, &env)
    }

    /// Starts any program in `host` (`ip netns exec` execs it, so the
    /// process is the program itself); output goes to files in the lab dir.
    pub fn spawn_cmd(&mut self, host: &Host, argv: &[&str], env: &[(&str, &str)]) -> usize {
        let n = self.procs.len();
        let stdout = self.dir.path().join(format!("p{n}.out"));
        let stderr = self.dir.path().join(format!("p{n}.err"));
        let child = Command::new("ip")
            .args(["netns", "exec", &host.ns])
            .args(argv)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
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
        let mut cmd = vec![self.bin.to_str().expect("a UTF-8 path")];
        cmd.extend_from_slice(args);
        host.exec(&cmd)
    }

    /// Runs `tunnel ARGS` in `host`, asserting success; returns stdout.
    pub fn tunnel_ok(&self, host: &Host, args: &[&str]) -> String {
        let out = self.tunnel(host, args);
        assert!(
            out.status.success(),
            "tunnel {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

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

impl Drop for Lab {
    fn drop(&mut self) {
        // All are told at once and share one grace period: a lab of 500
        // sites must not take 500 grace periods to stop.
        let running: Vec<&mut Proc> = self
            .procs
            .iter_mut()
            .filter_map(|p| p.child.try_wait().ok().flatten().is_none().then_some(p))
            .collect();
        for p in &running {
            let pid = nix::unistd::Pid::from_raw(p.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for p in running {
            while p.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        // Links that a test made with wireguard-go go with their namespace.
        for ns in self.hosts.iter().map(|h| &h.ns).chain(&self.extra) {
            let _ = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
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
        docker_ok(&[
            "network",
            "create",
            "-d",
            plugin,
            "--ipam-driver",
            plugin,
            name,
        ]);
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
        let started = Instant::now();
        docker_ok(&args);
        self.0.push(name.to_owned());
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

/// A step of a demo or the benchmark, on stdout.
pub fn step(s: &str) {
    println!("==> {s}");
}

/// Command output under a step, indented.
pub fn indent(s: &str) {
    for l in s.lines() {
        println!("    {l}");
    }
}

/// Retries `f` until it gives `Some`, panicking with `what` after [`UP`].
pub fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let since = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(since.elapsed() < UP, "{what} after {UP:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a demo runs: the `tunnel` binary (TUNNEL_BIN, else the release
/// build), and whether it uses Docker (DEMO_CONTAINERS, default 1), whose
/// engine and image are then made sure of. Needs root.
pub fn demo_setup(what: &str) -> (PathBuf, bool) {
    plain_panics();
    needs_root(what);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = std::env::var("TUNNEL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target/release/tunnel"));
    assert!(
        bin.exists(),
        "{} not found; run `make build` first",
        bin.display()
    );
    let with_containers = std::env::var("DEMO_CONTAINERS").as_deref() != Ok("0");
    if with_containers {
        step("making sure a Docker engine and the local image are there (scripts/docker-env.sh)");
        let ok = Command::new("bash")
            .arg(root.join("scripts/docker-env.sh"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "scripts/docker-env.sh failed");
    }
    (bin, with_containers)
}

/// The log filter of a demo's `tunnel` processes: info, or debug with
/// TUNNEL_VERBOSE=1.
pub fn demo_log() -> String {
    if std::env::var("TUNNEL_VERBOSE").as_deref() == Ok("1") {
        "tunnel=debug,warn".into()
    } else {
        "info".into()
    }
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which may hold spaces; utime and
    // stime are fields 14 and 15 of stat, 12 and 13 here.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`, ...).
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .ok()
}

/// How many file descriptors process `pid` has open.
pub fn fd_count(pid: u32) -> Option<u64> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}
