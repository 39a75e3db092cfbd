//! [`Lab`]: the namespaces, processes and files of one test or run, laid
//! out as hosts on one shared link, and all removed when it drops.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{Host, Proc, sh, unique};

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
    /// The neighbour table's limits as they were, when this lab raised them.
    neigh: Option<Vec<(String, String)>>,
}

/// The kernel's ARP and NDP tables are one for all namespaces, 1024
/// entries at most by default: a lab of N hosts that all talk to each
/// other (a mesh) needs N² of them, and beyond the limit the kernel drops
/// packets to new neighbours ("neighbor table overflow"): a lab artifact,
/// as real sites are hosts of their own. Big labs raise the limits and
/// put them back when they go.
fn raise_neighbour_limits(hosts: usize) -> Option<Vec<(String, String)>> {
    let want = hosts * hosts * 2;
    if want <= 1024 {
        return None;
    }
    let mut old = vec![];
    for family in ["ipv4", "ipv6"] {
        for (k, v) in [
            ("gc_thresh1", want / 4),
            ("gc_thresh2", want / 2),
            ("gc_thresh3", want),
        ] {
            let path = format!("/proc/sys/net/{family}/neigh/default/{k}");
            let Ok(was) = fs::read_to_string(&path) else {
                continue;
            };
            if was.trim().parse::<usize>().is_ok_and(|w| w >= v) {
                continue;
            }
            if fs::write(&path, v.to_string()).is_ok() {
                old.push((path, was.trim().to_owned()));
            }
        }
    }
    Some(old)
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
            neigh: raise_neighbour_limits(n),
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

    /// A new, empty namespace `tnl{id}{tag}`, removed with the lab (for
    /// layouts of their own, such as [`crate::NatLab`]'s).
    pub fn namespace(&mut self, tag: &str) -> String {
        let ns = format!("tnl{}{tag}", self.id);
        add_ns(&ns);
        self.extra.push(ns.clone());
        ns
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
        // LAB_LOG overrides what a bench or test asked for, to trace one run.
        let log = std::env::var("LAB_LOG").unwrap_or_else(|_| self.log.clone());
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
        // Thresholds go back in reverse, so gc_thresh1 <= 2 <= 3 holds throughout.
        for (path, was) in self.neigh.iter().flatten().rev() {
            let _ = fs::write(path, was);
        }
        // LAB_KEEP_LOGS=DIR keeps every process's output, to read a run
        // after it failed.
        if let Ok(dir) = std::env::var("LAB_KEEP_LOGS") {
            let to = PathBuf::from(dir).join(&self.id);
            let _ = fs::create_dir_all(&to);
            for (i, p) in self.procs.iter().enumerate() {
                let _ = fs::copy(&p.stderr, to.join(format!("p{i}.err")));
                let _ = fs::copy(&p.stdout, to.join(format!("p{i}.out")));
            }
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
