//! The summary at the end of a run: the machine, one row per path and the
//! ratios between them, then each section's figures, each against its
//! target ("ok" or "MISSED"); the targets missed are returned to fail a
//! strict run.

use std::process::Command;

use super::throughput::Path;
use super::{Both, Config, Results};

/// tunnel's single-stream TCP against wireguard-go's, at least.
const TARGET_RATIO: f64 = 3.0;
/// tunnel's single-stream TCP as a share of the raw veth's, at least.
const TARGET_OF_RAW: f64 = 0.2;
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
        "{name:<14}{:>10.0}{:>10.0}{:>10.0}{:>10.0}{:>12.0}{:>10}",
        p.tcp1.0,
        p.tcp1.1,
        p.tcp4.0,
        p.tcp4.1,
        p.udp_pps,
        p.cpu_per_gb
            .map(|c| format!("{c:.1}"))
            .unwrap_or("-".into())
    );
}

/// Path `t` over path `o`, figure by figure.
fn ratio_row(name: &str, t: &Path, o: &Path) {
    let r = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    println!(
        "{name:<14}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>12.2}{:>10}",
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

/// The table of the raw veth, wireguard-go and tunnel, and tunnel's
/// ratios to the other two.
fn paths(r: &Results, missed: &mut Vec<String>) {
    if r.raw.is_some() || r.wggo.is_some() || r.tunnel.is_some() {
        println!(
            "{:<14}{:>10}{:>10}{:>10}{:>10}{:>12}{:>10}",
            "Mbit/s", "TCP B>A", "TCP A>B", "4x B>A", "4x A>B", "UDP64 pps", "CPU s/GB"
        );
    }
    for (name, p) in [
        ("raw veth", &r.raw),
        ("wireguard-go", &r.wggo),
        ("tunnel", &r.tunnel),
    ] {
        if let Some(p) = p {
            row(name, p);
        }
    }
    if let (Some(t), Some(w)) = (&r.tunnel, &r.wggo) {
        ratio_row("tunnel/wggo", t, w);
        let ratio = t.tcp1.0 / w.tcp1.0;
        let verdict = check(ratio >= TARGET_RATIO, missed, || {
            format!("tunnel/wireguard-go single-stream ratio {ratio:.2} < {TARGET_RATIO}")
        });
        println!(
            "ratio tunnel/wireguard-go, TCP 1 stream B>A: {ratio:.2}  (target >= {TARGET_RATIO}: {verdict})"
        );
    }
    if let (Some(t), Some(raw)) = (&r.tunnel, &r.raw) {
        ratio_row("tunnel/raw", t, raw);
        let share = t.tcp1.0 / raw.tcp1.0;
        let verdict = check(share >= TARGET_OF_RAW, missed, || {
            format!("tunnel is {share:.2} of the raw veth < {TARGET_OF_RAW}")
        });
        println!(
            "ratio tunnel/raw veth, TCP 1 stream B>A:     {share:.2}  (target >= {TARGET_OF_RAW}: {verdict})"
        );
    }
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
        "peak RSS (VmHWM) after single-stream TCP: tunnel serve {}, tunnel join {}, wireguard-go {}",
        kb(r.tunnel.and_then(|t| t.rss_tcp1[0])),
        kb(r.tunnel.and_then(|t| t.rss_tcp1[1])),
        kb(r.wggo.and_then(|w| w.rss_tcp1[0])),
    );
    println!(
        "peak RSS (VmHWM) after all runs: tunnel serve {}, tunnel join {}{}",
        kb(r.serve_rss),
        kb(r.join_rss),
        r.wggo
            .map(|_| format!(", wireguard-go {}", kb(r.wggo_rss)))
            .unwrap_or_default()
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
