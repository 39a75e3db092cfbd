//! The periodic sample: VmRSS and open fds of every running `tunnel`
//! process, judged against its warm-up baseline, and a ping from every
//! site to the hub, so that a peer lost between events is caught too.

use std::time::Duration;

use super::{Soak, human};
use crate::status_kb;

impl Soak<'_> {
    pub(super) fn sample(&mut self) {
        let now = self.start.elapsed();
        for i in 0..self.tracked.len() {
            if self.tracked[i].live {
                self.sample_one(i, now);
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

    /// Samples tracked process `i`, which must still run; `now` is when
    /// it exited if it did not.
    fn sample_one(&mut self, i: usize, now: Duration) {
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
            return;
        }
        let pid = self.tracked[i].pid;
        let rss = status_kb(pid, "VmRSS").unwrap_or(0);
        let fds = crate::fd_count(pid).unwrap_or(0);
        let t = &mut self.tracked[i];
        t.rss_kb.push(rss);
        t.fds.push(fds);
        for why in self.growth(i) {
            self.fail(why);
        }
    }

    /// What of process `i`'s last sample went past its bounds, each said
    /// only the first time so that one leak is one failure.
    fn growth(&mut self, i: usize) -> Vec<String> {
        let (rss_growth, fd_growth) = (self.cfg.rss_growth_kb, self.cfg.fd_growth);
        let t = &mut self.tracked[i];
        let Some((base_rss, base_fds)) = t.baseline(self.cfg.warmup_samples) else {
            return vec![];
        };
        let (rss, fds) = (*t.rss_kb.last().unwrap(), *t.fds.last().unwrap());
        let mut why = vec![];
        if !t.flagged.0 && rss > base_rss + rss_growth {
            t.flagged.0 = true;
            why.push(format!(
                "growth: {} has RSS {rss} kB, more than {rss_growth} kB over its baseline of {base_rss} kB",
                t.label
            ));
        }
        if !t.flagged.1 && fds > base_fds + fd_growth {
            t.flagged.1 = true;
            why.push(format!(
                "growth: {} has {fds} open fds, more than {fd_growth} over its baseline of {base_fds}",
                t.label
            ));
        }
        why
    }
}
