//! The reliability soak: `make soak` (30 minutes by default) and its short
//! form in `tests/soak.rs` (about 2.5 minutes, in `make test` and CI). The
//! end-to-end tests each prove one event once; the soak repeats all of them
//! together for a long time, under traffic, to catch what only shows with
//! repetition: a peer that does not come back on the tenth restart, a
//! process that grows a little on every event.
//!
//! Setup: a hub (host 0) with a busybox httpd container attached, site A
//! (host 1) with a client container, site B (host 2) with a second httpd
//! container, and [`POOL`] spare hosts for the joins. While it runs:
//!
//! - iperf3 from site A to site B over the tunnel (through the hub),
//!   paced (`-b`), one run after the other;
//! - every `container_every`: `docker restart` of one of the three
//!   containers in turn, then both pages must cross again (client to the
//!   hub's page and to site B's);
//! - every `hub_every`: the hub stopped, with SIGTERM and SIGKILL in turn,
//!   and started again on the same state; every site must reach it and be
//!   listed with a handshake in its `status --json`, and both pages cross;
//! - every `join_every`: `tunnel token` on the hub, and a join from a
//!   spare host, which must reach the hub; the spare hosts are used in
//!   turn, and a host's previous site is stopped (SIGTERM) and revoked
//!   first, so that a long soak keeps a steady number of sites;
//! - every `sample_every`: VmRSS and the number of open fds of every
//!   running `tunnel` process, and a ping from every site to the hub.
//!
//! Events due at once run one after the other, container first. With the
//! default periods every hub restart comes moments after a container
//! restart (300 s is a multiple of 30 s): a hub killed just after a
//! container was re-attached is part of what the soak covers.
//!
//! It fails on:
//!
//! - a lost peer: a site or page not back within `back_within` (20 s)
//!   of an event or of a sample's ping, a `tunnel` process that exits by
//!   itself, a join that does not get in, a hub that does not exit 0 on
//!   SIGTERM, an iperf3 run that errors out;
//! - growth: after its first `warmup_samples` samples (1 minute by
//!   default), a process's RSS may not exceed the largest warm-up sample
//!   by more than `rss_growth_kb` (16 MiB), nor its fd count by more than
//!   `fd_growth` (8). A healthy process's fd count is flat within a few
//!   transient connections, so 8 is loose for noise yet catches a leak of
//!   one fd per container restart within a 30-minute run (20 restarts of
//!   each container). A restarted hub is a new process with a new
//!   baseline; a process with fewer samples than the warm-up is not judged.
//!
//! On a failure the processes' logs are copied out of the lab (which
//! removes everything it made) to a directory named in the summary.

use crate::{Containers, Host, Lab, Node, container_address, docker, fetch, status_kb};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Spare hosts the joins take turns on: at most this many joined sites
/// besides A and B at any time.
pub const POOL: usize = 3;
const IPERF_PORT: &str = "5201";

/// What the soak does and how often; [`Config::full`] and
/// [`Config::short`] are the two presets.
#[derive(Clone, Debug)]
pub struct Config {
    /// The `tunnel` binary.
    pub bin: PathBuf,
    pub duration: Duration,
    pub container_every: Duration,
    pub hub_every: Duration,
    pub join_every: Duration,
    pub sample_every: Duration,
    /// Samples of a process before its baseline is fixed.
    pub warmup_samples: usize,
    /// How far RSS may grow past the baseline, in kB.
    pub rss_growth_kb: u64,
    /// How far the open-fd count may grow past the baseline.
    pub fd_growth: u64,
    /// A site or page must be back this soon after an event. 20 s: a
    /// site's container endpoint whose saved endpoint went stale (its
    /// container restarted moments before the hub was killed) comes back
    /// only when WireGuard's own timer makes it handshake again, ~15 s.
    /// The summary shows how long each took.
    pub back_within: Duration,
    /// iperf3 `-b` (pace), e.g. "50M": steady traffic that leaves the
    /// CPU to the events on a small machine.
    pub iperf_rate: String,
    /// iperf3 `-t` of each run.
    pub iperf_seconds: u64,
}

impl Config {
    /// `make soak`: containers every 30 s, the hub every 5 min, a join
    /// every 2 min, samples every 10 s.
    pub fn full(bin: impl Into<PathBuf>, minutes: f64) -> Self {
        Config {
            bin: bin.into(),
            duration: Duration::from_secs_f64(minutes * 60.0),
            container_every: Duration::from_secs(30),
            hub_every: Duration::from_secs(300),
            join_every: Duration::from_secs(120),
            sample_every: Duration::from_secs(10),
            warmup_samples: 6,
            rss_growth_kb: 16 * 1024,
            fd_growth: 8,
            back_within: Duration::from_secs(20),
            iperf_rate: "50M".into(),
            iperf_seconds: 60,
        }
    }

    /// The short form (the test, CI): 150 s in which every event happens
    /// at least twice, the hub restart with both signals.
    pub fn short(bin: impl Into<PathBuf>) -> Self {
        Config {
            duration: Duration::from_secs(150),
            container_every: Duration::from_secs(10),
            hub_every: Duration::from_secs(45),
            join_every: Duration::from_secs(30),
            sample_every: Duration::from_secs(5),
            warmup_samples: 3,
            iperf_rate: "20M".into(),
            iperf_seconds: 20,
            ..Config::full(bin, 2.5)
        }
    }

    /// The preset the environment asks for, with its overrides:
    /// SOAK_MINUTES (default 30, or the short form when CI=true and it is
    /// unset), SOAK_CONTAINER_EVERY, SOAK_HUB_EVERY, SOAK_JOIN_EVERY,
    /// SOAK_SAMPLE_EVERY (seconds), and [`Config::env_overrides`].
    pub fn from_env(bin: impl Into<PathBuf>) -> Self {
        let minutes = var("SOAK_MINUTES").and_then(|m| m.parse::<f64>().ok());
        let cfg = match minutes {
            Some(m) => Config::full(bin, m),
            None if var("CI").as_deref() == Some("true") => Config::short(bin),
            None => Config::full(bin, 30.0),
        };
        cfg.env_overrides()
    }

    /// The periods and bounds of SOAK_CONTAINER_EVERY, SOAK_HUB_EVERY,
    /// SOAK_JOIN_EVERY, SOAK_SAMPLE_EVERY, SOAK_BACK_WITHIN (seconds),
    /// SOAK_WARMUP_SAMPLES, SOAK_RSS_GROWTH_KB, SOAK_FD_GROWTH and
    /// SOAK_IPERF_RATE, where set.
    pub fn env_overrides(mut self) -> Self {
        let secs = |k: &str, d: &mut Duration| {
            if let Some(s) = var(k).and_then(|v| v.parse::<f64>().ok()) {
                *d = Duration::from_secs_f64(s);
            }
        };
        secs("SOAK_CONTAINER_EVERY", &mut self.container_every);
        secs("SOAK_HUB_EVERY", &mut self.hub_every);
        secs("SOAK_JOIN_EVERY", &mut self.join_every);
        secs("SOAK_SAMPLE_EVERY", &mut self.sample_every);
        secs("SOAK_BACK_WITHIN", &mut self.back_within);
        let num = |k: &str| var(k).and_then(|v| v.parse::<u64>().ok());
        if let Some(n) = num("SOAK_WARMUP_SAMPLES") {
            self.warmup_samples = n as usize;
        }
        if let Some(n) = num("SOAK_RSS_GROWTH_KB") {
            self.rss_growth_kb = n;
        }
        if let Some(n) = num("SOAK_FD_GROWTH") {
            self.fd_growth = n;
        }
        if let Some(r) = var("SOAK_IPERF_RATE") {
            self.iperf_rate = r;
        }
        self
    }

    /// The bounds, as the summary states them.
    pub fn bounds(&self) -> String {
        format!(
            "after {} warm-up samples ({}), RSS at most +{} kB and fds at most +{} over the largest warm-up sample, per process; every site and page back within {} of each event",
            self.warmup_samples,
            human(self.sample_every * self.warmup_samples as u32),
            self.rss_growth_kb,
            self.fd_growth,
            human(self.back_within)
        )
    }

    pub fn plan(&self) -> String {
        format!(
            "{}: container restart every {}, hub restart every {} (SIGTERM and SIGKILL in turn), token + join every {}, samples every {}; iperf3 at {}bit/s",
            human(self.duration),
            human(self.container_every),
            human(self.hub_every),
            human(self.join_every),
            human(self.sample_every),
            self.iperf_rate
        )
    }
}

fn var(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// `1m30s`, `45s`, `812 ms`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else if s < 60 {
        format!("{}s", s)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// One `tunnel` process and its samples.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub label: String,
    /// Its index in the lab.
    proc: usize,
    pid: u32,
    /// A site's tunnel address, which must reach the hub; `None` for the hub.
    site: Option<String>,
    host: Host,
    live: bool,
    pub from: Duration,
    pub to: Option<Duration>,
    pub rss_kb: Vec<u64>,
    pub fds: Vec<u64>,
    /// Whether its RSS, its fds, went past the bound (said once each).
    flagged: (bool, bool),
}

impl Tracked {
    fn baseline(&self, warmup: usize) -> Option<(u64, u64)> {
        (warmup > 0 && self.rss_kb.len() >= warmup).then(|| {
            (
                self.rss_kb[..warmup].iter().copied().max().unwrap_or(0),
                self.fds[..warmup].iter().copied().max().unwrap_or(0),
            )
        })
    }
}

/// What a soak did and found; `Display` is the summary it prints.
#[derive(Debug, Default)]
pub struct Summary {
    pub plan: String,
    pub bounds: String,
    pub elapsed: Duration,
    pub container_restarts: usize,
    /// The longest from `docker restart` returning to both pages crossing.
    pub container_back_max: Duration,
    pub hub_term: usize,
    pub hub_kill: usize,
    /// The longest from the new hub being up to a site reaching it.
    pub hub_back_max: Duration,
    pub joins: usize,
    /// The longest from starting `join` to the new site reaching the hub.
    pub join_max: Duration,
    /// Sites stopped and revoked to make room on a spare host.
    pub rotated: usize,
    pub iperf_runs: usize,
    pub iperf_bytes: u64,
    pub iperf_seconds: f64,
    pub procs: Vec<Tracked>,
    pub warmup_samples: usize,
    pub failures: Vec<String>,
    /// Where the logs were copied on a failure.
    pub logs: Option<PathBuf>,
}

impl Summary {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "==================== soak ====================")?;
        writeln!(f, "plan:     {}", self.plan)?;
        writeln!(f, "ran:      {}", human(self.elapsed))?;
        writeln!(
            f,
            "events:   {} container restarts (pages back within {} at most), {} hub restarts ({} SIGTERM, {} SIGKILL; every site back within {} of the hub being up, at most), {} joins (in and reaching the hub within {} at most), {} sites stopped and revoked",
            self.container_restarts,
            human(self.container_back_max),
            self.hub_term + self.hub_kill,
            self.hub_term,
            self.hub_kill,
            human(self.hub_back_max),
            self.joins,
            human(self.join_max),
            self.rotated
        )?;
        let mbit = if self.iperf_seconds > 0.0 {
            self.iperf_bytes as f64 * 8.0 / self.iperf_seconds / 1e6
        } else {
            0.0
        };
        writeln!(
            f,
            "traffic:  {} iperf3 runs site A -> site B, {:.2} GB received, {:.1} Mbit/s average",
            self.iperf_runs,
            self.iperf_bytes as f64 / 1e9,
            mbit
        )?;
        writeln!(f, "bounds:   {}", self.bounds)?;
        writeln!(
            f,
            "{:<26} {:>11}  {:>31}  {:>19}",
            "process", "lived", "RSS kB first/base/last/max", "fds first/base/last/max"
        )?;
        for p in &self.procs {
            let lived = format!(
                "{}-{}",
                p.from.as_secs(),
                p.to.map(|t| format!("{}s", t.as_secs()))
                    .unwrap_or_else(|| "end".into())
            );
            let (base_rss, base_fd) = p
                .baseline(self.warmup_samples)
                .map(|(r, d)| (r.to_string(), d.to_string()))
                .unwrap_or_else(|| ("-".into(), "-".into()));
            let four = |v: &[u64], base: &str| {
                format!(
                    "{}/{}/{}/{}",
                    v.first().copied().unwrap_or(0),
                    base,
                    v.last().copied().unwrap_or(0),
                    v.iter().copied().max().unwrap_or(0)
                )
            };
            writeln!(
                f,
                "{:<26} {:>11}  {:>31}  {:>19}",
                p.label,
                lived,
                four(&p.rss_kb, &base_rss),
                four(&p.fds, &base_fd)
            )?;
        }
        if self.passed() {
            write!(f, "PASS")
        } else {
            writeln!(f, "FAIL: {} failure(s)", self.failures.len())?;
            for r in &self.failures {
                writeln!(f, "  - {r}")?;
            }
            if let Some(l) = &self.logs {
                write!(f, "logs: {}", l.display())?;
            }
            Ok(())
        }
    }
}

/// The running soak: the lab, its containers and what it has seen.
struct Soak<'a> {
    cfg: &'a Config,
    lab: Lab,
    // After the lab: its `tunnel` processes stop before the containers go.
    _containers: Containers,
    start: Instant,
    hub: Node,
    hub_ip: String,
    web0: String,
    web1: String,
    cli: String,
    /// URL, page and what it is, of the two pages the client fetches.
    urls: [(String, String, String); 2],
    site_b_ip: String,
    tracked: Vec<Tracked>,
    /// Per spare host, the index in `tracked` of the site on it.
    pool: Vec<Option<usize>>,
    iperf: Option<(usize, usize)>,
    s: Summary,
}

/// Runs a soak and returns its summary; the lab is gone when it returns.
/// A panic of the lab (a step that could not even be attempted) ends the
/// run early and is one of the failures.
pub fn run(cfg: &Config) -> Summary {
    let mut soak = Soak::new(cfg);
    let body = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| soak.main_loop()));
    if let Err(e) = body {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".into());
        soak.fail(format!("the run stopped early: {msg}"));
    }
    soak.finish()
}

impl<'a> Soak<'a> {
    fn new(cfg: &'a Config) -> Self {
        let mut lab = Lab::new(&cfg.bin, 3 + POOL);
        let (h, a, b) = (lab.host(0), lab.host(1), lab.host(2));
        let id = lab.id.clone();
        let (web0, web1, cli) = (
            format!("tsoak{id}w0"),
            format!("tsoak{id}w1"),
            format!("tsoak{id}cli"),
        );
        let (page0, page1) = (format!("soak-hub-{id}"), format!("soak-site-b-{id}"));
        let mut cs = Containers::default();
        cs.web(&web0, &page0);
        cs.web(&web1, &page1);
        cs.run(&cli, &["sleep", "infinity"]);
        let hub = lab.serve(&h, "h", 2, &["--container", &web0]);
        let sa = lab.join(&a, "a", &hub.lines[0], &h, &["--container", &cli]);
        let sb = lab.join(&b, "b", &hub.lines[1], &h, &["--container", &web1]);
        let hub_status = lab.status(&hub);
        let hub_ip = address_of(&hub_status, "server").expect("the hub's address");
        let sa_ip = address_of(&lab.status(&sa), "joined").expect("site A's address");
        let sb_status = lab.status(&sb);
        let site_b_ip = address_of(&sb_status, "joined").expect("site B's address");
        let (ip0, ip1) = (
            container_address(&hub_status, &web0),
            container_address(&sb_status, &web1),
        );
        let urls = [
            (
                format!("http://{ip0}/"),
                page0,
                format!("the hub's page ({web0} at {ip0})"),
            ),
            (
                format!("http://{ip1}/"),
                page1,
                format!("site B's page ({web1} at {ip1})"),
            ),
        ];
        let start = Instant::now();
        let mut soak = Soak {
            cfg,
            lab,
            _containers: cs,
            start,
            hub: hub.clone(),
            hub_ip,
            web0,
            web1,
            cli,
            urls,
            site_b_ip,
            tracked: vec![],
            pool: vec![None; POOL],
            iperf: None,
            s: Summary {
                plan: cfg.plan(),
                bounds: cfg.bounds(),
                warmup_samples: cfg.warmup_samples,
                ..Summary::default()
            },
        };
        soak.track("hub#1", &hub, None);
        soak.track("site-a", &sa, Some(sa_ip));
        let sb_ip = soak.site_b_ip.clone();
        soak.track("site-b", &sb, Some(sb_ip));
        match soak.pages_back() {
            Ok(t) => soak.say(&format!(
                "set up lab {}: hub, sites A and B, 3 containers; both pages cross ({} ms)",
                soak.lab.id,
                t.as_millis()
            )),
            Err(e) => soak.fail(format!("after setup, {e}")),
        }
        soak
    }

    fn track(&mut self, label: &str, node: &Node, site: Option<String>) -> usize {
        let pid = self.lab.proc(node.proc).pid();
        self.tracked.push(Tracked {
            label: label.to_owned(),
            proc: node.proc,
            pid,
            site,
            host: node.host.clone(),
            live: true,
            from: self.start.elapsed(),
            to: None,
            rss_kb: vec![],
            fds: vec![],
            flagged: (false, false),
        });
        self.tracked.len() - 1
    }

    fn say(&self, what: &str) {
        let t = self.start.elapsed().as_secs();
        println!("[{:3}:{:02}] {what}", t / 60, t % 60);
    }

    fn fail(&mut self, why: String) {
        self.say(&format!("FAILURE: {why}"));
        self.s.failures.push(why);
    }

    fn main_loop(&mut self) {
        let cfg = self.cfg;
        let end = self.start + cfg.duration;
        let mut next_sample = self.start;
        let mut next_container = self.start + cfg.container_every;
        let mut next_hub = self.start + cfg.hub_every;
        let mut next_join = self.start + cfg.join_every;
        self.start_iperf();
        while Instant::now() < end {
            if due(&mut next_sample, cfg.sample_every) {
                self.sample();
            }
            if due(&mut next_container, cfg.container_every) {
                self.restart_container();
            }
            if due(&mut next_hub, cfg.hub_every) {
                self.restart_hub();
            }
            if due(&mut next_join, cfg.join_every) {
                self.join();
            }
            self.poll_iperf(true);
            let next = [next_sample, next_container, next_hub, next_join, end]
                .into_iter()
                .min()
                .unwrap();
            let wait = next.saturating_duration_since(Instant::now());
            std::thread::sleep(wait.min(Duration::from_millis(250)));
        }
        self.sample();
    }

    /// A ping from `host` to the hub, retried until `within`; how long it took.
    fn reach(&self, host: &Host, within: Duration) -> Option<Duration> {
        let t = Instant::now();
        loop {
            if host
                .exec(&["ping", "-c", "1", "-W", "1", &self.hub_ip])
                .status
                .success()
            {
                return Some(t.elapsed());
            }
            if t.elapsed() >= within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Both pages fetched from the client container, within
    /// `back_within`; or which one was not, and when it came back (tried
    /// until [`crate::UP`], so that the report says how long it was out).
    fn pages_back(&self) -> Result<Duration, String> {
        let t = Instant::now();
        let mut late = vec![];
        for (url, page, what) in &self.urls {
            while fetch(&self.cli, url).as_deref() != Some(page.as_str()) {
                if t.elapsed() >= crate::UP {
                    late.push(format!("{what} not back after {}", human(crate::UP)));
                    return Err(late.join("; "));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if t.elapsed() > self.cfg.back_within {
                late.push(format!(
                    "{what} not back within {} (back after {} ms)",
                    human(self.cfg.back_within),
                    t.elapsed().as_millis()
                ));
            }
        }
        if late.is_empty() {
            Ok(t.elapsed())
        } else {
            Err(late.join("; "))
        }
    }

    /// The last lines of a process's log, for a failure's reason.
    fn tail(&self, i: usize) -> String {
        let p = &self.tracked[i];
        let path = self.lab.dir.path().join(format!("p{}.err", p.proc));
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(5);
        format!(
            "last lines of {}:\n      {}",
            p.label,
            lines[from..].join("\n      ")
        )
    }

    fn sample(&mut self) {
        let now = self.start.elapsed();
        let warmup = self.cfg.warmup_samples;
        for i in 0..self.tracked.len() {
            if !self.tracked[i].live {
                continue;
            }
            let proc = self.tracked[i].proc;
            if !self.lab.proc(proc).running() {
                let status = self.lab.proc(proc).wait(Duration::from_secs(1));
                self.tracked[i].live = false;
                self.tracked[i].to = Some(now);
                let why = format!(
                    "lost peer: {} exited by itself ({status}); {}",
                    self.tracked[i].label,
                    self.tail(i)
                );
                self.fail(why);
                continue;
            }
            let pid = self.tracked[i].pid;
            let rss = status_kb(pid, "VmRSS").unwrap_or(0);
            let fds = crate::fd_count(pid).unwrap_or(0);
            let t = &mut self.tracked[i];
            t.rss_kb.push(rss);
            t.fds.push(fds);
            let Some((base_rss, base_fds)) = t.baseline(warmup) else {
                continue;
            };
            let mut why = vec![];
            if !t.flagged.0 && rss > base_rss + self.cfg.rss_growth_kb {
                t.flagged.0 = true;
                why.push(format!(
                    "growth: {} has RSS {rss} kB, more than {} kB over its baseline of {base_rss} kB",
                    t.label, self.cfg.rss_growth_kb
                ));
            }
            if !t.flagged.1 && fds > base_fds + self.cfg.fd_growth {
                t.flagged.1 = true;
                why.push(format!(
                    "growth: {} has {fds} open fds, more than {} over its baseline of {base_fds}",
                    t.label, self.cfg.fd_growth
                ));
            }
            for w in why {
                self.fail(w);
            }
        }
        let line: Vec<String> = self
            .tracked
            .iter()
            .filter(|t| t.live)
            .map(|t| {
                let short = t.label.split(' ').next().unwrap_or("");
                let (rss, fds) = (t.rss_kb.last().unwrap_or(&0), t.fds.last().unwrap_or(&0));
                format!("{short} {rss}k/{fds}")
            })
            .collect();
        self.say(&format!("sample (RSS kB/fds): {}", line.join(", ")));
        // Between the events too, every site keeps reaching the hub.
        for i in 0..self.tracked.len() {
            let t = &self.tracked[i];
            if t.live && t.site.is_some() && self.reach(&t.host, self.cfg.back_within).is_none() {
                let why = format!(
                    "lost peer: {} does not reach the hub for {}; {}",
                    t.label,
                    human(self.cfg.back_within),
                    self.tail(i)
                );
                self.fail(why);
            }
        }
    }

    fn restart_container(&mut self) {
        let n = self.s.container_restarts;
        let which = [&self.web0, &self.cli, &self.web1][n % 3].clone();
        self.s.container_restarts += 1;
        let out = docker(&["restart", "-t", "1", &which]);
        if !out.status.success() {
            let why = format!(
                "docker restart {which}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            self.fail(why);
            return;
        }
        match self.pages_back() {
            Ok(t) => {
                self.s.container_back_max = self.s.container_back_max.max(t);
                self.say(&format!(
                    "container restart {}: {which}; pages back {} ms after docker restart returned",
                    n + 1,
                    t.as_millis()
                ));
            }
            Err(e) => {
                let why = format!(
                    "lost peer: after docker restart {which}, {e}; {}",
                    self.tail(self.hub_tracked())
                );
                self.fail(why);
            }
        }
    }

    fn hub_tracked(&self) -> usize {
        self.tracked
            .iter()
            .rposition(|t| t.site.is_none())
            .expect("a hub")
    }

    fn restart_hub(&mut self) {
        let n = self.s.hub_term + self.s.hub_kill;
        let kill = n % 2 == 1;
        let old = self.hub_tracked();
        let proc = self.hub.proc;
        let signal = if kill {
            self.lab.proc(proc).kill();
            self.s.hub_kill += 1;
            "SIGKILL"
        } else {
            let status = self.lab.proc(proc).terminate();
            self.s.hub_term += 1;
            if !status.success() {
                let why = format!(
                    "the hub exited with {status} on SIGTERM; {}",
                    self.tail(old)
                );
                self.fail(why);
            }
            "SIGTERM"
        };
        self.tracked[old].live = false;
        self.tracked[old].to = Some(self.start.elapsed());
        let down = Instant::now();
        let web0 = self.web0.clone();
        self.hub.proc = self.lab.serve_again(&self.hub, &["--container", &web0]);
        let up = down.elapsed();
        let hub = self.hub.clone();
        self.track(&format!("hub#{} (after {signal})", n + 2), &hub, None);
        // Every site reaches the new hub; the clock starts when it is up.
        let mut slowest = Duration::ZERO;
        let sites: Vec<usize> = (0..self.tracked.len())
            .filter(|&i| self.tracked[i].live && self.tracked[i].site.is_some())
            .collect();
        for &i in &sites {
            let left = self.cfg.back_within.saturating_sub(slowest);
            match self.reach(&self.tracked[i].host, left) {
                Some(t) => slowest = slowest.max(t),
                None => {
                    let why = format!(
                        "lost peer: {} does not reach the hub within {} after its restart ({signal}); {}",
                        self.tracked[i].label,
                        human(self.cfg.back_within),
                        self.tail(i)
                    );
                    self.fail(why);
                }
            }
        }
        self.s.hub_back_max = self.s.hub_back_max.max(slowest);
        // The hub sees them all too: listed, with a handshake.
        let want: Vec<String> = sites
            .iter()
            .filter_map(|&i| self.tracked[i].site.clone())
            .collect();
        let t = Instant::now();
        let (missing, listed) = loop {
            let (missing, listed) = self.unlisted(&want);
            if missing.is_empty() || t.elapsed() >= self.cfg.back_within {
                break (missing, listed);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !missing.is_empty() {
            let why = format!(
                "lost peer: the hub's status lists no handshake with {} after its restart ({signal}); it lists {listed}",
                missing.join(", ")
            );
            self.fail(why);
        }
        let pages = self.pages_back();
        if let Err(e) = &pages {
            let why = format!(
                "lost peer: after the hub's restart ({signal}), {e}; {}",
                self.tail(self.hub_tracked())
            );
            self.fail(why);
        }
        self.say(&format!(
            "hub restart {} ({signal}): up again in {} ms; {} sites back within {} ms of that; pages {}",
            n + 1,
            up.as_millis(),
            sites.len(),
            slowest.as_millis(),
            pages.map_or("LOST".into(), |t| format!("back in {} ms", t.as_millis()))
        ));
    }

    /// Which of `sites` the hub's `status --json` lists without a
    /// handshake, and the peers it lists (address, name, handshake age).
    fn unlisted(&self, sites: &[String]) -> (Vec<String>, String) {
        let state = self.hub.state.to_str().expect("a UTF-8 path");
        let out = self
            .lab
            .tunnel(&self.hub.host, &["status", "--json", "--state-dir", state]);
        let status: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let peers = status
            .as_array()
            .and_then(|eps| eps.iter().find(|e| e["role"] == "server"))
            .and_then(|e| e["peers"].as_array().cloned())
            .unwrap_or_default();
        let missing = sites
            .iter()
            .filter(|ip| {
                !peers.iter().any(|p| {
                    p["address"].as_str() == Some(ip.as_str()) && p["last_handshake_secs"].is_u64()
                })
            })
            .cloned()
            .collect();
        let listed: Vec<String> = peers
            .iter()
            .map(|p| {
                format!(
                    "{} ({}, handshake {})",
                    p["address"], p["name"], p["last_handshake_secs"]
                )
            })
            .collect();
        (missing, listed.join(", "))
    }

    fn join(&mut self) {
        let k = self.s.joins + 1;
        self.s.joins += 1;
        let slot = (k - 1) % POOL;
        // Room first: the site before on this host leaves, and is revoked.
        if let Some(i) = self.pool[slot].take()
            && self.tracked[i].live
        {
            let proc = self.tracked[i].proc;
            let status = self.lab.proc(proc).terminate();
            self.tracked[i].live = false;
            self.tracked[i].to = Some(self.start.elapsed());
            if !status.success() {
                let why = format!(
                    "{} exited with {status} on SIGTERM; {}",
                    self.tracked[i].label,
                    self.tail(i)
                );
                self.fail(why);
            }
            let addr = self.tracked[i].site.clone().unwrap_or_default();
            let mut args = self.hub.local("revoke");
            args.push(&addr);
            let out = self.lab.tunnel(&self.hub.host, &args);
            if out.status.success() {
                self.s.rotated += 1;
            } else {
                let why = format!(
                    "revoke {addr}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                self.fail(why);
            }
        }
        let out = self.lab.tunnel(&self.hub.host, &self.hub.local("token"));
        let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || token.is_empty() {
            let why = format!(
                "tunnel token: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            self.fail(why);
            return;
        }
        let host = self.lab.host(3 + slot);
        let tag = format!("j{k}");
        let (iface, state) = (self.lab.iface(&tag), self.lab.state_dir(&tag));
        let server = self.hub.host.ip.clone();
        let t = Instant::now();
        let proc = self.lab.spawn(
            &host,
            &[
                "join",
                &token,
                &server,
                "--iface",
                &iface,
                "--state-dir",
                state.to_str().expect("a UTF-8 path"),
                "--backend",
                "userspace",
            ],
        );
        let node = Node {
            proc,
            host: host.clone(),
            iface,
            state,
            lines: vec![],
        };
        let label = format!("join-{k} (host {})", 3 + slot);
        let i = self.track(&label, &node, None);
        self.pool[slot] = Some(i);
        // In: its summary line; out: it exits (it gives up after its own timeout).
        let joined = loop {
            let p = self.lab.proc(proc);
            if p.stdout().ends_with('\n') {
                break true;
            }
            if !p.running() || t.elapsed() > crate::UP {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let addr = joined
            .then(|| {
                let out = self.lab.tunnel(
                    &host,
                    &["status", "--json", "--state-dir", node.state.to_str()?],
                );
                address_of(&serde_json::from_slice(&out.stdout).ok()?, "joined")
            })
            .flatten();
        let Some(addr) = addr else {
            let why = format!("join {k} did not get in; {}", self.tail(i));
            self.fail(why);
            return;
        };
        self.tracked[i].site = Some(addr.clone());
        match self.reach(&host, self.cfg.back_within) {
            Some(_) => {
                let took = t.elapsed();
                self.s.join_max = self.s.join_max.max(took);
                self.say(&format!(
                    "join {k}: {addr} from host {} in and reaching the hub {} ms after join started",
                    3 + slot,
                    took.as_millis()
                ));
            }
            None => {
                let why = format!(
                    "lost peer: join {k} ({addr}) got in but does not reach the hub; {}",
                    self.tail(i)
                );
                self.fail(why);
            }
        }
    }

    fn start_iperf(&mut self) {
        let (a, b) = (self.lab.host(1), self.lab.host(2));
        let srv = self
            .lab
            .spawn_cmd(&b, &["iperf3", "-s", "-1", "-p", IPERF_PORT], &[]);
        b.wait_listening(IPERF_PORT, Duration::from_secs(10));
        let secs = self.cfg.iperf_seconds.to_string();
        let rate = self.cfg.iperf_rate.clone();
        let to = self.site_b_ip.clone();
        let cli = self.lab.spawn_cmd(
            &a,
            &[
                "iperf3",
                "-c",
                &to,
                "-p",
                IPERF_PORT,
                "-t",
                &secs,
                "-b",
                &rate,
                "-J",
                "--connect-timeout",
                "5000",
            ],
            &[],
        );
        self.iperf = Some((srv, cli));
    }

    /// Counts a finished iperf3 run and starts the next (with `again`);
    /// a run still going is left alone, unless it is the end.
    fn poll_iperf(&mut self, again: bool) {
        let Some((srv, cli)) = self.iperf else {
            return;
        };
        if self.lab.proc(cli).running() {
            if again {
                return;
            }
            self.lab.proc(cli).kill();
        } else {
            let out = self.lab.proc(cli).stdout();
            let json: serde_json::Value =
                serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
            self.s.iperf_runs += 1;
            if let Some(e) = json["error"].as_str() {
                let why = format!("traffic: iperf3 run {} failed: {e}", self.s.iperf_runs);
                self.fail(why);
            } else if let Some(bytes) = json["end"]["sum_received"]["bytes"].as_u64() {
                self.s.iperf_bytes += bytes;
                self.s.iperf_seconds += json["end"]["sum_received"]["seconds"]
                    .as_f64()
                    .unwrap_or(0.0);
            } else {
                let why = format!(
                    "traffic: iperf3 run {} gave no report: {}",
                    self.s.iperf_runs,
                    out.trim()
                );
                self.fail(why);
            }
        }
        if self.lab.proc(srv).running() {
            self.lab.proc(srv).kill();
        }
        self.iperf = None;
        if again {
            self.start_iperf();
        }
    }

    /// Stops everything cleanly (a clean stop is part of the test) and
    /// closes the summary.
    fn finish(mut self) -> Summary {
        let stop = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.poll_iperf(false);
            // Sites first, so that they leave while the hub still runs.
            let mut order: Vec<usize> = (0..self.tracked.len()).collect();
            order.sort_by_key(|&i| self.tracked[i].site.is_none());
            for i in order {
                if !self.tracked[i].live {
                    continue;
                }
                let status = self.lab.proc(self.tracked[i].proc).terminate();
                self.tracked[i].live = false;
                self.tracked[i].to = Some(self.start.elapsed());
                if !status.success() {
                    let why = format!(
                        "{} exited with {status} on SIGTERM at the end; {}",
                        self.tracked[i].label,
                        self.tail(i)
                    );
                    self.fail(why);
                }
            }
        }));
        if stop.is_err() {
            self.fail("stopping the processes at the end failed".into());
        }
        self.s.elapsed = self.start.elapsed();
        self.s.procs = std::mem::take(&mut self.tracked);
        if !self.s.passed() {
            self.s.logs = keep_logs(&self.lab);
        }
        std::mem::take(&mut self.s)
    }
}

/// Whether `next` has come; if so, moves it on by whole periods past now.
fn due(next: &mut Instant, every: Duration) -> bool {
    let now = Instant::now();
    if now < *next {
        return false;
    }
    while *next <= now {
        *next += every;
    }
    true
}

/// The tunnel address (without the prefix length) of the endpoint of `role`.
fn address_of(status: &serde_json::Value, role: &str) -> Option<String> {
    let ep = status.as_array()?.iter().find(|e| e["role"] == role)?;
    Some(ep["address"].as_str()?.split('/').next()?.to_owned())
}

/// Copies the processes' logs out of the lab before it removes its
/// directory; where to, if it could.
fn keep_logs(lab: &Lab) -> Option<PathBuf> {
    let to = std::env::temp_dir().join(format!("tunnel-soak-{}", lab.id));
    std::fs::create_dir_all(&to).ok()?;
    for e in std::fs::read_dir(lab.dir.path()).ok()?.flatten() {
        let name = e.file_name();
        let n = name.to_string_lossy();
        if n.ends_with(".err") || n.ends_with(".out") {
            let _ = std::fs::copy(e.path(), to.join(&name));
        }
    }
    Some(to)
}
