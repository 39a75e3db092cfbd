//! `tunnel` itself (userspace backend): the time from `tunnel join` to
//! the first packet, the same measurements as every path, peak RSS, and a
//! clean stop.

use std::time::Instant;

use super::throughput::{Carrier, measure};
use super::{Config, Results, info, stop};
use crate::{Lab, step};

pub(super) fn tunnel(lab: &mut Lab, cfg: &Config, r: &mut Results) {
    let (a, b) = (lab.host(0), lab.host(1));
    step("starting tunnel serve in site A (userspace backend)");
    let hub = lab.serve(&a, "sa", 1, &["--mtu", "1420"]);
    step("starting tunnel join in site B");
    let t = Instant::now();
    let site = lab.join(&b, "jb", &hub.lines[0], &a, &["--mtu", "1420"]);
    r.join_measured_ms = Some(t.elapsed().as_millis());
    info(&site.lines[0]);
    r.join_reported_ms = site.lines[0]
        .split("first packet after ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse().ok());
    step("measuring tunnel (A 10.77.0.1, B 10.77.0.2)");
    let pids = [lab.proc(hub.proc).pid(), lab.proc(site.proc).pid()];
    let tun = hub.iface.clone();
    r.tunnel = Some(measure(
        lab,
        cfg,
        "10.77.0.1",
        &Carrier {
            pids: &pids,
            tun: Some(&tun),
        },
    ));
    r.serve_rss = lab.proc(hub.proc).peak_rss_kb();
    r.join_rss = lab.proc(site.proc).peak_rss_kb();
    step("stopping tunnel join and serve (SIGTERM)");
    stop(lab, &site, r);
    stop(lab, &hub, r);
}
