//! The summary at the end of a run: the machine, one row per path and the
//! ratios between them, then each section's figures, each against its
//! target ("ok" or "MISSED"); the targets missed are returned to fail a
//! strict run.

use std::process::Command;

use super::throughput::Path;
use super::{Both, Config, Results};

/// tunnel's single-stream TCP against wireguard-go 0.0.20231211's, both
/// ways, at least.
const TARGET_VS_2023: f64 = 1.5;
/// tunnel's UDP 64-byte packets per second against wireguard-go
/// 0.0.20231211's, at least.
const TARGET_PPS_VS_2023: f64 = 2.0;
/// tunnel's single-stream TCP as a share of the raw veth's, at least.
const TARGET_OF_RAW: f64 = 0.25;
/// CPU seconds of both ends per GB of single-stream TCP, at most.
const TARGET_CPU_PER_GB: f64 = 2.0;
const TARGET_JOIN_MS: u128 = 1000;

/// Prints the summary; returns the targets missed.
pub(super) fn summary(cfg: &Config, r: &Results) -> Vec<String> {
    let mut missed = vec![];
    println!();
    println!("==================== tunnel benchmark summary ====================");
    machine(cfg);
    paths(r, &mut missed);
    join_and_memory(r, &mut missed);
    if cfg.want("wss") {
        websocket(r, &mut missed);
    }
    if cfg.want("containers") {
        containers(r);
    }
    if cfg.want("network") {
        network(r, &mut missed);
    }
    if cfg.want("tunnel") || cfg.want("containers") || cfg.want("network") {
        shutdown(r);
    }
    println!("==================================================================");
    missed
}

/// "ok", or "MISSED" with `why` added to the targets missed.
pub(super) fn check(
    ok: bool,
    missed: &mut Vec<String>,
    why: impl FnOnce() -> String,
) -> &'static str {
    if ok {
        "ok"
    } else {
        missed.push(why());
        "MISSED"
    }
}

fn median(v: &[u128]) -> u128 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

/// What the figures depend on: the kernel, the cores, the iperf3 runs.
fn machine(cfg: &Config) {
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "kernel {kernel}, {cpus} CPUs, iperf3 TCP {}s, 1 stream{}, MTU 1420",
        cfg.seconds,
        if cfg.iperf_extra.is_empty() {
            String::new()
        } else {
            format!(" ({})", cfg.iperf_extra.join(" "))
        }
    );
}

fn row(name: &str, p: &Path) {
    println!(
        "{name:<16}{:>9.0}{:>9.0}{:>9.0}{:>9.0}{:>11.0}{:>9}",
        p.tcp1.0,
        p.tcp1.1,
        p.tcp4.0,
        p.tcp4.1,
        p.udp_pps,
        p.cpu_per_gb
            .map(|c| format!("{c:.2}"))
            .unwrap_or("-".into())
    );
}

/// Round trips, TUN write size and memory of one path.
fn row2(name: &str, p: &Path) {
    println!(
        "{name:<16}{:>7.2}{:>7.2}{:>9.2}{:>9.2}{:>12}{:>11}",
        p.ping_idle.0,
        p.ping_idle.1,
        p.ping_load.0,
        p.ping_load.1,
        p.tun_write.map(|w| format!("{w:.0}")).unwrap_or("-".into()),
        p.rss_peak.map(|k| k.to_string()).unwrap_or("-".into())
    );
}

/// Path `t` over path `o`, figure by figure.
fn ratio_row(name: &str, t: &Path, o: &Path) {
    let r = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    println!(
        "{name:<16}{:>9.2}{:>9.2}{:>9.2}{:>9.2}{:>11.2}{:>9}",
        r(t.tcp1.0, o.tcp1.0),
        r(t.tcp1.1, o.tcp1.1),
        r(t.tcp4.0, o.tcp4.0),
        r(t.tcp4.1, o.tcp4.1),
        r(t.udp_pps, o.udp_pps),
        match (t.cpu_per_gb, o.cpu_per_gb) {
            (Some(a), Some(b)) => format!("{:.2}", r(a, b)),
            _ => "-".into(),
        }
    );
}

/// The table of every path (raw veth, both wireguard-gos, gotatun-cli,
/// tunnel), tunnel's ratios to them, and tunnel against its targets.
fn paths(r: &Results, missed: &mut Vec<String>) {
    let all = [
        ("raw veth", &r.raw),
        ("wggo 20220316", &r.wggo),
        ("wggo 20231211", &r.wggo2023),
        ("gotatun-cli", &r.gotatun),
        ("tunnel", &r.tunnel),
    ];
    if all.iter().all(|(_, p)| p.is_none()) {
        return;
    }
    println!(
        "{:<16}{:>9}{:>9}{:>9}{:>9}{:>11}{:>9}",
        "Mbit/s", "TCP B>A", "TCP A>B", "4x B>A", "4x A>B", "UDP64 pps", "CPU s/GB"
    );
    for (name, p) in all {
        if let Some(p) = p {
            row(name, p);
        }
    }
    for (name, o) in [
        ("tunnel/raw", &r.raw),
        ("tunnel/wggo2022", &r.wggo),
        ("tunnel/wggo2023", &r.wggo2023),
        ("tunnel/gotatun", &r.gotatun),
    ] {
        if let (Some(t), Some(o)) = (&r.tunnel, o) {
            ratio_row(name, t, o);
        }
    }
    println!(
        "{:<16}{:>7}{:>7}{:>9}{:>9}{:>12}{:>11}",
        "ping ms", "idle50", "idle99", "load p50", "load p99", "B/TUN write", "peak RSS kB"
    );
    for (name, p) in all {
        if let Some(p) = p {
            row2(name, p);
        }
    }
    if let Some(t) = &r.tunnel {
        targets(t, r, missed);
    }
}

/// tunnel against the issue's targets: the 2023 wireguard-go, the raw
/// veth, the CPU per GB and its own 4-stream figures.
fn targets(t: &Path, r: &Results, missed: &mut Vec<String>) {
    if let Some(w) = &r.wggo2023 {
        let (up, down) = (t.tcp1.0 / w.tcp1.0, t.tcp1.1 / w.tcp1.1);
        let verdict = check(
            up >= TARGET_VS_2023 && down >= TARGET_VS_2023,
            missed,
            || {
                format!(
                    "tunnel/wireguard-go 0.0.20231211 single stream {up:.2} / {down:.2} < {TARGET_VS_2023}"
                )
            },
        );
        println!(
            "tunnel/wggo 20231211, TCP 1 stream: {up:.2} B>A, {down:.2} A>B  (target >= {TARGET_VS_2023} both: {verdict})"
        );
        let pps = t.udp_pps / w.udp_pps;
        let verdict = check(pps >= TARGET_PPS_VS_2023, missed, || {
            format!("tunnel/wireguard-go 0.0.20231211 UDP 64 B pps {pps:.2} < {TARGET_PPS_VS_2023}")
        });
        println!(
            "tunnel/wggo 20231211, UDP 64 B pps: {pps:.2}  (target >= {TARGET_PPS_VS_2023}: {verdict})"
        );
        let verdict = check(t.ping_load.1 <= w.ping_load.1, missed, || {
            format!(
                "ping p99 under load {:.2} ms > wireguard-go 0.0.20231211's {:.2} ms",
                t.ping_load.1, w.ping_load.1
            )
        });
        println!(
            "ping p99 under a bulk flow: tunnel {:.2} ms, wggo 20231211 {:.2} ms  (target: no worse: {verdict})",
            t.ping_load.1, w.ping_load.1
        );
        if let (Some(mine), Some(theirs)) = (t.rss_peak, w.rss_peak) {
            let verdict = check(mine <= theirs, missed, || {
                format!("peak RSS {mine} kB > wireguard-go 0.0.20231211's {theirs} kB")
            });
            println!(
                "peak RSS under traffic: tunnel {mine} kB, wggo 20231211 {theirs} kB  (target: no more: {verdict})"
            );
        }
    }
    if let Some(raw) = &r.raw {
        let share = t.tcp1.0 / raw.tcp1.0;
        let verdict = check(share >= TARGET_OF_RAW, missed, || {
            format!("tunnel is {share:.2} of the raw veth < {TARGET_OF_RAW}")
        });
        println!(
            "tunnel/raw veth, TCP 1 stream B>A: {share:.2}  (target >= {TARGET_OF_RAW}: {verdict})"
        );
    }
    if let Some(cpu) = t.cpu_per_gb {
        let verdict = check(cpu <= TARGET_CPU_PER_GB, missed, || {
            format!("tunnel spends {cpu:.2} CPU s per GB > {TARGET_CPU_PER_GB}")
        });
        println!(
            "tunnel CPU per GB, both ends: {cpu:.2} s  (target <= {TARGET_CPU_PER_GB}: {verdict})"
        );
    }
    let ok = t.tcp4.0 >= t.tcp1.0 && t.tcp4.1 >= t.tcp1.1;
    let verdict = check(ok, missed, || {
        format!(
            "tunnel with 4 streams {:.0}/{:.0} < 1 stream {:.0}/{:.0} Mbit/s",
            t.tcp4.0, t.tcp4.1, t.tcp1.0, t.tcp1.1
        )
    });
    println!("tunnel 4 streams >= 1 stream, both ways: {verdict}");
}

/// join -> first packet against its target, and peak memory, when the
/// tunnel section ran.
fn join_and_memory(r: &Results, missed: &mut Vec<String>) {
    let Some(measured) = r.join_measured_ms else {
        return;
    };
    let kb = |v: Option<u64>| v.map(|v| format!("{v} kB")).unwrap_or("n/a".into());
    let reported = r.join_reported_ms.unwrap_or(measured);
    let ok = reported < TARGET_JOIN_MS && measured < TARGET_JOIN_MS;
    let verdict = check(ok, missed, || {
        format!("join -> first packet took {reported} ms reported / {measured} ms measured")
    });
    println!(
        "join -> first packet: {reported} ms (reported by join), {measured} ms (measured from start)  (target < {TARGET_JOIN_MS} ms: {verdict})"
    );
    println!(
        "peak RSS (VmHWM) after single-stream TCP: tunnel serve {}, tunnel join {}",
        kb(r.tunnel.and_then(|t| t.rss_tcp1[0])),
        kb(r.tunnel.and_then(|t| t.rss_tcp1[1])),
    );
    println!(
        "peak RSS (VmHWM) after all runs: tunnel serve {}, tunnel join {}",
        kb(r.serve_rss),
        kb(r.join_rss),
    );
}

/// wss direct and via the proxy, against the wstunnel reference and
/// against tunnel over UDP.
fn websocket(r: &Results, missed: &mut Vec<String>) {
    let pair = |v: Option<Both>| {
        v.map(|(u, d)| format!("{u:6.0} Mbit/s client->server, {d:6.0} server->client"))
            .unwrap_or("-".into())
    };
    println!("wss direct:                  {}", pair(r.wss_direct));
    println!("wss via tinyproxy:           {}", pair(r.wss_proxy));
    match (&r.reference, &r.reference_note) {
        (Some(_), _) => println!(
            "reference (wireguard-go over wstunnel via tinyproxy): {}",
            pair(r.reference)
        ),
        (None, Some(n)) => println!("reference: {n}"),
        _ => {}
    }
    if let (Some((pu, pd)), Some((ru, rd))) = (r.wss_proxy, r.reference) {
        let (a, b) = (pu / ru, pd / rd);
        let verdict = check(a >= 2.0 && b >= 2.0, missed, || {
            format!("wss via proxy / wstunnel reference {a:.2} / {b:.2} < 2")
        });
        println!("ratio wss-via-proxy/reference: {a:.2} up, {b:.2} down  (target >= 2: {verdict})");
    }
    if let (Some((pu, _)), Some(udp)) = (r.wss_proxy, r.tunnel) {
        let x = pu / udp.tcp1.0;
        let verdict = check(x >= 0.5, missed, || {
            format!("wss via proxy / tunnel over UDP {x:.2} < 0.5")
        });
        println!("ratio wss-via-proxy/tunnel udp: {x:.2}  (target >= 0.5: {verdict})");
    }
    if let Some(ms) = r.wss_join_ms {
        let verdict = check(ms < TARGET_JOIN_MS, missed, || {
            format!("join -> traffic over wss via proxy took {ms} ms")
        });
        println!(
            "join -> traffic over wss via proxy: {ms} ms  (target < {TARGET_JOIN_MS} ms: {verdict})"
        );
    }
}

/// How fast `--container` followed `docker start` and `docker restart`.
fn containers(r: &Results) {
    match (r.attach_after_ms, r.attach_total_ms) {
        (Some(a), Some(t)) => println!(
            "container start -> attached:     {a} ms after `docker start` returned ({t} ms from its start)"
        ),
        _ => println!("container start -> attached:     -"),
    }
    if r.restarts.is_empty() {
        println!("docker restart -> traffic:       - (no fetch after any restart)");
    } else {
        let list: Vec<String> = r.restarts.iter().map(|(a, _)| a.to_string()).collect();
        let after: Vec<u128> = r.restarts.iter().map(|(a, _)| *a).collect();
        let total: Vec<u128> = r.restarts.iter().map(|(_, t)| *t).collect();
        println!(
            "docker restart -> traffic:       {} ms after `docker restart` returned (median {} ms; {:.1} s including the restart)",
            list.join(" / "),
            median(&after),
            median(&total) as f64 / 1000.0
        );
    }
    println!(
        "  (fetches run as `docker exec ... wget`, {} ms each when steady, included above)",
        r.fetch_ms.map(|m| m.to_string()).unwrap_or("?".into())
    );
}

/// `docker run --network` to the first page: by address against its
/// target, by name, and on a bridge for comparison.
fn network(r: &Results, missed: &mut Vec<String>) {
    if r.first_page.is_empty() {
        println!("docker run --network -> page:    -");
        return;
    }
    let list = |v: &[u128]| {
        v.iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let by_ip = median(&r.first_page);
    let verdict = check(by_ip < TARGET_JOIN_MS, missed, || {
        format!("docker run --network -> page took {by_ip} ms")
    });
    println!(
        "docker run --network -> page:    {} ms (median {by_ip} ms; target < {TARGET_JOIN_MS} ms: {verdict}), container start included",
        list(&r.first_page),
    );
    if !r.first_page_by_name.is_empty() {
        println!(
            "  ... by name via the hub's DNS: {} ms (median {} ms)",
            list(&r.first_page_by_name),
            median(&r.first_page_by_name)
        );
    }
    if !r.first_page_bridge.is_empty() {
        let br = median(&r.first_page_bridge);
        println!(
            "  ... on a Docker bridge network: {} ms (median {br} ms); tunnel/bridge {:.2}",
            list(&r.first_page_bridge),
            by_ip as f64 / br.max(1) as f64
        );
    }
}

/// Whether every `tunnel` stopped cleanly, or what it left.
fn shutdown(r: &Results) {
    if r.problems.is_empty() {
        println!("shutdown: clean (exit 0, no interface or UAPI socket left)");
    } else {
        for p in &r.problems {
            println!("PROBLEM: {p}");
        }
    }
}
