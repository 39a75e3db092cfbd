//! The soak's disruptive events: `docker restart` of a container in
//! turn, and the hub stopped (SIGTERM and SIGKILL in turn) and started
//! again on the same state; after each, every site and page must be back.

use std::time::{Duration, Instant};

use super::{Soak, human};
use crate::docker;

impl Soak<'_> {
    pub(super) fn restart_container(&mut self) {
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

    pub(super) fn restart_hub(&mut self) {
        let n = self.s.hub_term + self.s.hub_kill;
        let signal = self.stop_hub(n % 2 == 1);
        let down = Instant::now();
        let web0 = self.web0.clone();
        self.hub.proc = self.lab.serve_again(&self.hub, &["--container", &web0]);
        let up = down.elapsed();
        let hub = self.hub.clone();
        self.track(&format!("hub#{} (after {signal})", n + 2), &hub, None);
        let sites: Vec<usize> = (0..self.tracked.len())
            .filter(|&i| self.tracked[i].live && self.tracked[i].site.is_some())
            .collect();
        let slowest = self.sites_reach_hub(&sites, signal);
        self.s.hub_back_max = self.s.hub_back_max.max(slowest);
        self.hub_lists(&sites, signal);
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

    /// Stops the hub with SIGKILL (`kill`) or SIGTERM, which must exit 0;
    /// the signal's name.
    fn stop_hub(&mut self, kill: bool) -> &'static str {
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
        signal
    }

    /// Every site of `sites` reaches the new hub; the clock starts when it
    /// is up, and all share one `back_within`. The slowest one's time.
    fn sites_reach_hub(&mut self, sites: &[usize], signal: &str) -> Duration {
        let mut slowest = Duration::ZERO;
        for &i in sites {
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
        slowest
    }

    /// The hub sees them all too: its status lists each of `sites` with a
    /// handshake within `back_within`.
    fn hub_lists(&mut self, sites: &[usize], signal: &str) {
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
}
