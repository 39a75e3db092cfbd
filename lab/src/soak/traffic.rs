//! The steady traffic under the events: iperf3 from site A to site B
//! through the hub, paced, one run after the other; each run's bytes are
//! counted and an error is a failure.

use std::time::Duration;

use super::Soak;

const IPERF_PORT: &str = "5201";

impl Soak<'_> {
    pub(super) fn start_iperf(&mut self) {
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
    pub(super) fn poll_iperf(&mut self, again: bool) {
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
}
