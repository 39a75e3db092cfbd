//! What a soak does and how often, and the bounds it holds the processes
//! to: the two presets (`make soak`, and the short form of the test and
//! CI) and the environment's overrides.

use std::path::PathBuf;
use std::time::Duration;

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
pub(super) fn human(d: Duration) -> String {
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
