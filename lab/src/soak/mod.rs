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
//!
//! Here: the setup, the loop that runs the events when due, and the
//! checks they share (a site reaches the hub, the pages cross). One file
//! per kind of event or check: `events` (container and hub restarts),
//! `join`, `samples`, `traffic`; `config` and `summary` are what goes in
//! and what comes out.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::{Containers, Host, Lab, Node, container_address, fetch};

mod config;
mod events;
mod join;
mod samples;
mod summary;
mod traffic;

pub use config::Config;
use config::human;
pub use summary::{Summary, Tracked};

/// Spare hosts the joins take turns on: at most this many joined sites
/// besides A and B at any time.
pub const POOL: usize = 3;

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

    fn hub_tracked(&self) -> usize {
        self.tracked
            .iter()
            .rposition(|t| t.site.is_none())
            .expect("a hub")
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
