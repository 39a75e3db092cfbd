//! N sites join one hub at once, each in its own namespace host on one
//! bridge: the scale test (tests/scale.rs), `make scale` and the bench's
//! scale section run this. It measures how many got in within the joins'
//! default timeout, the time to admit all, serve's RSS and idle CPU, what
//! one site costs, `status` latency and how soon a revoke takes effect.
//!
//! All the sites share this machine's cores with the hub, which a real
//! deployment does not; nothing is niced to make up for it.

use crate::{Lab, Node, cpu_seconds, status_kb, step};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What one run saw.
#[derive(Debug, Clone)]
pub struct Report {
    pub sites: usize,
    pub joined: usize,
    /// The last line of each join that gave up.
    pub failures: Vec<String>,
    /// From the first join started to the last one in.
    pub all_in: Duration,
    /// Each join's own time, from its start: what its timeout bounds.
    pub join_median: Duration,
    pub join_max: Duration,
    pub serve_rss_kb: u64,
    /// serve's CPU share over 10 s once all are in.
    pub serve_idle_cpu: f64,
    /// Median CPU time a join used to get in.
    pub site_cpu_ms: u64,
    /// Median RSS of a joined site after 10 s idle.
    pub site_rss_kb: u64,
    /// Median of the same sites' private memory (USS): their RSS less the
    /// binary's code and libraries, which every site on a host shares.
    pub site_private_kb: u64,
    pub status_ms: u128,
    pub revoke_ms: u128,
    /// Whether the revoked site was cut off at once.
    pub cut: bool,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} sites: {} joined, {} failed; all admitted in {:.1} s (a join took {:.1} s median, {:.1} s at most); serve RSS {} kB, idle CPU {:.1}%; a site: CPU to join {} ms, idle RSS {} kB, of it private {} kB (medians); status {} ms; revoke {} ms ({})",
            self.sites,
            self.joined,
            self.failures.len(),
            self.all_in.as_secs_f64(),
            self.join_median.as_secs_f64(),
            self.join_max.as_secs_f64(),
            self.serve_rss_kb,
            self.serve_idle_cpu * 100.0,
            self.site_cpu_ms,
            self.site_rss_kb,
            self.site_private_kb,
            self.status_ms,
            self.revoke_ms,
            if self.cut {
                "the site is cut off"
            } else {
                "THE SITE STILL GETS THROUGH"
            }
        )?;
        if let Some(first) = self.failures.first() {
            write!(f, "\n  first failure: {first}")?;
        }
        Ok(())
    }
}

fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS").unwrap_or(0)
}

/// Private_Clean + Private_Dirty of `/proc/<pid>/smaps_rollup`.
fn private_kb(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .filter(|l| l.starts_with("Private_"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn median<T: Copy + Default>(sorted: &[T]) -> T {
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// What each join did: in (from the first join's start, from its own
/// start), or the last line it printed when it gave up; `None`, neither.
type Outcome = Option<Result<(Duration, Duration), String>>;

/// Runs `n` sites against one hub with `bin`. The hub's and sites' log
/// level is `log`; with `keep`, every process's output and the packet
/// counters of the hub and one site are copied there.
pub fn run(bin: &Path, n: usize, log: &str, keep: Option<&Path>) -> Report {
    step(&format!(
        "{n} sites: making {n} namespace hosts on one bridge"
    ));
    let mut lab = Lab::new(bin, n + 1);
    lab.log = log.to_owned();
    let a = lab.host(0);
    // The join storm without the mesh: with it, every join is pushed to
    // every site as a whole peer map. 250 joins at once went through with
    // the release build, but 300 with the debug build (the tests') lost
    // 17 of them; SCALE_MESH=1 measures it with the mesh.
    let mut extra = vec!["--subnet", "10.80.0.0/20", "--token-ttl", "1h"];
    if std::env::var("SCALE_MESH").map_or(true, |v| v != "1") {
        extra.push("--no-mesh");
    }
    let hub = lab.serve(&a, "s", n, &extra);
    let hub_pid = lab.proc(hub.proc).pid();
    step(&format!("{n} joins at once"));
    let t0 = Instant::now();
    let joins = spawn_joins(&mut lab, &hub, n);
    let (joined, join_cpu) = wait_joins(&mut lab, &joins, t0);
    if !lab.proc(hub.proc).running() {
        let status = lab.proc(hub.proc).wait(Duration::from_secs(1));
        let log = lab.proc(hub.proc).stderr();
        panic!("the hub exited ({status}):\n{log}");
    }
    let ok: Vec<(Duration, Duration)> = joined.iter().filter_map(|j| j.clone()?.ok()).collect();
    let mut failures: Vec<String> = joined.iter().filter_map(|j| j.clone()?.err()).collect();
    let stuck = joined.iter().filter(|j| j.is_none()).count();
    if stuck > 0 {
        failures.push(format!(
            "{stuck} joins neither joined nor gave up within 60 s"
        ));
    }
    let mut own: Vec<Duration> = ok.iter().map(|o| o.1).collect();
    own.sort_unstable();
    let serve_rss_kb = rss_kb(hub_pid);
    let c0 = cpu_seconds(hub_pid);
    std::thread::sleep(Duration::from_secs(10));
    let serve_idle_cpu = (cpu_seconds(hub_pid) - c0) / 10.0;
    let site_pids: Vec<u32> = joins
        .iter()
        .zip(&joined)
        .filter(|(_, j)| matches!(j, Some(Ok(_))))
        .map(|((p, _), _)| lab.proc(*p).pid())
        .collect();
    let mut site_rss: Vec<u64> = site_pids.iter().map(|p| rss_kb(*p)).collect();
    site_rss.sort_unstable();
    let mut site_private: Vec<u64> = site_pids.iter().map(|p| private_kb(*p)).collect();
    site_private.sort_unstable();
    let mut cpu: Vec<f64> = join_cpu.iter().copied().filter(|c| *c > 0.0).collect();
    cpu.sort_by(f64::total_cmp);
    let (status_ms, revoke_ms, cut) = status_and_revoke(&lab, &hub, ok.len(), &mut failures);
    if let Some(keep) = keep {
        save_logs(
            &lab,
            &[(&a, "hub"), (&lab.host(n), "site")],
            &keep.join(format!("{n}")),
        );
    }
    if !failures.is_empty() {
        print_hub_tail(&mut lab, hub.proc);
    }
    Report {
        sites: n,
        joined: ok.len(),
        failures,
        all_in: ok.iter().map(|o| o.0).max().unwrap_or_default(),
        join_median: median(&own),
        join_max: own.last().copied().unwrap_or_default(),
        serve_rss_kb,
        serve_idle_cpu,
        site_cpu_ms: (median(&cpu) * 1000.0) as u64,
        site_rss_kb: median(&site_rss),
        site_private_kb: median(&site_private),
        status_ms,
        revoke_ms,
        cut,
    }
}

/// `n` joins, one per token of `hub`, each from its own host, all started
/// before any is waited for; each process and when it was started.
fn spawn_joins(lab: &mut Lab, hub: &Node, n: usize) -> Vec<(usize, Instant)> {
    let a = lab.host(0);
    let mut joins = vec![];
    for (i, token) in hub.lines[..n].iter().enumerate() {
        let h = lab.host(i + 1);
        let (iface, state) = (lab.iface(&format!("j{i}")), lab.state_dir(&format!("j{i}")));
        let args = [
            "join",
            token,
            &a.ip,
            "--iface",
            &iface,
            "--state-dir",
            state.to_str().expect("a UTF-8 path"),
            "--backend",
            "userspace",
            "--firewall",
            "off",
        ];
        joins.push((lab.spawn(&h, &args), Instant::now()));
    }
    joins
}

/// Waits (at most 60 s) until every join is in or gave up; what each
/// did, and the CPU seconds each had used when it got in.
fn wait_joins(lab: &mut Lab, joins: &[(usize, Instant)], t0: Instant) -> (Vec<Outcome>, Vec<f64>) {
    let n = joins.len();
    // Each join prints its line when in, or exits when it gives up (its
    // default timeout is 20 s).
    let mut joined: Vec<Outcome> = vec![None; n];
    let mut join_cpu = vec![0.0; n];
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && joined.iter().any(Option::is_none) {
        for (i, (p, spawned)) in joins.iter().enumerate() {
            if joined[i].is_none() {
                let proc = lab.proc(*p);
                if proc.stdout().ends_with('\n') {
                    joined[i] = Some(Ok((t0.elapsed(), spawned.elapsed())));
                    join_cpu[i] = cpu_seconds(proc.pid());
                } else if !proc.running() {
                    joined[i] = Some(Err(proc.stderr().lines().last().unwrap_or("").to_owned()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (joined, join_cpu)
}

/// How long `status` takes with every site listed (a failure when fewer
/// than `joined` have a handshake), and how long revoking the first site
/// takes and whether it is cut off at once: (status ms, revoke ms, cut).
fn status_and_revoke(
    lab: &Lab,
    hub: &Node,
    joined: usize,
    failures: &mut Vec<String>,
) -> (u128, u128, bool) {
    let t = Instant::now();
    let status = lab.status(hub);
    let status_ms = t.elapsed().as_millis();
    let listed = status[0]["peers"].as_array().map_or(0, |p| {
        p.iter()
            .filter(|p| p["last_handshake_secs"].is_number())
            .count()
    });
    if listed < joined {
        failures.push(format!(
            "status lists {listed} peers with a handshake, {joined} joined"
        ));
    }
    // Revoke the first site and see that it no longer reaches the hub.
    let mut revoke = hub.local("revoke");
    revoke.push("10.80.0.2");
    let first = lab.host(1);
    let t = Instant::now();
    lab.tunnel_ok(&hub.host, &revoke);
    let revoke_ms = t.elapsed().as_millis();
    let cut = !first.ping("10.80.0.1");
    (status_ms, revoke_ms, cut)
}

/// The hub's last log lines, on stderr, for a run that failed.
fn print_hub_tail(lab: &mut Lab, hub: usize) {
    let log = lab.proc(hub).stderr();
    let tail: Vec<&str> = log.lines().rev().take(20).collect();
    eprintln!("the hub's last log lines:");
    for l in tail.iter().rev() {
        eprintln!("  {l}");
    }
}

/// Every process's output, and where packets were dropped (`nstat`, link
/// counters) on `hosts`.
fn save_logs(lab: &Lab, hosts: &[(&crate::Host, &str)], to: &PathBuf) {
    let _ = std::fs::create_dir_all(to);
    for (h, name) in hosts {
        let out = h.exec(&["nstat", "-az"]);
        let _ = std::fs::write(to.join(format!("nstat-{name}")), out.stdout);
        let out = h.exec(&["ip", "-s", "link"]);
        let _ = std::fs::write(to.join(format!("links-{name}")), out.stdout);
    }
    for e in std::fs::read_dir(lab.dir.path())
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.path()
            .extension()
            .is_some_and(|x| x == "err" || x == "out")
        {
            let _ = std::fs::copy(e.path(), to.join(e.file_name()));
        }
    }
}
