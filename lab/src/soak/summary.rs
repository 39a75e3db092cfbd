//! What a soak saw: each `tunnel` process it tracked with its samples, and
//! the counts and longest times of its events; `Display` is the summary
//! it prints.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::config::human;
use crate::Host;

/// One `tunnel` process and its samples.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub label: String,
    /// Its index in the lab.
    pub(super) proc: usize,
    pub(super) pid: u32,
    /// A site's tunnel address, which must reach the hub; `None` for the hub.
    pub(super) site: Option<String>,
    pub(super) host: Host,
    pub(super) live: bool,
    pub from: Duration,
    pub to: Option<Duration>,
    pub rss_kb: Vec<u64>,
    pub fds: Vec<u64>,
    /// Whether its RSS, its fds, went past the bound (said once each).
    pub(super) flagged: (bool, bool),
}

impl Tracked {
    pub(super) fn baseline(&self, warmup: usize) -> Option<(u64, u64)> {
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
