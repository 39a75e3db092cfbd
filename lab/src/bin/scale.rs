//! `make scale` (and the bench's scale section): N sites join one hub at
//! once, each in its own namespace host on one bridge. Prints how many got
//! in within the joins' default timeout, the time to admit all, serve's
//! RSS and idle CPU, `status` latency and how soon a revoke takes effect.
//!
//! Environment: SCALE_SITES (comma list, default "250"), TUNNEL_BIN.

use std::path::PathBuf;
use std::time::{Duration, Instant};
use tunnel_lab::{Lab, cpu_seconds, step};

fn rss_kb(pid: u32) -> u64 {
    tunnel_lab::status_kb(pid, "VmRSS").unwrap_or(0)
}

fn run(bin: &PathBuf, n: usize) -> String {
    step(&format!(
        "{n} sites: making {n} namespace hosts on one bridge"
    ));
    let mut lab = Lab::new(bin, n + 1);
    lab.log = "warn".into();
    let a = lab.host(0);
    let hub = lab.serve(
        &a,
        "s",
        n,
        &["--subnet", "10.80.0.0/20", "--token-ttl", "1h"],
    );
    let hub_pid = lab.proc(hub.proc).pid();
    step(&format!("{n} joins at once"));
    let t0 = Instant::now();
    let mut joins = vec![];
    for i in 0..n {
        let h = lab.host(i + 1);
        let (iface, state) = (lab.iface(&format!("j{i}")), lab.state_dir(&format!("j{i}")));
        let args = [
            "join",
            &hub.lines[i],
            &a.ip,
            "--iface",
            &iface,
            "--state-dir",
            state.to_str().unwrap(),
            "--backend",
            "userspace",
            "--firewall",
            "off",
        ];
        joins.push(lab.spawn(&h, &args));
    }
    // Each join prints its line when in, or exits when it gives up (its
    // default timeout is 20 s).
    let mut joined = vec![None; n];
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && joined.iter().any(Option::is_none) {
        for (i, p) in joins.iter().enumerate() {
            if joined[i].is_none() {
                let proc = lab.proc(*p);
                if proc.stdout().ends_with('\n') {
                    joined[i] = Some(Ok(t0.elapsed()));
                } else if !proc.running() {
                    joined[i] = Some(Err(proc.stderr().lines().last().unwrap_or("").to_owned()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !lab.proc(hub.proc).running() {
        let status = lab.proc(hub.proc).wait(Duration::from_secs(1));
        let log = lab.proc(hub.proc).stderr();
        panic!("the hub exited ({status}):\n{log}");
    }
    let ok: Vec<Duration> = joined.iter().filter_map(|j| j.clone()?.ok()).collect();
    let failed: Vec<String> = joined.iter().filter_map(|j| j.clone()?.err()).collect();
    let all = ok.iter().max().copied().unwrap_or_default();
    let rss = rss_kb(hub_pid);
    let c0 = cpu_seconds(hub_pid);
    std::thread::sleep(Duration::from_secs(10));
    let idle_cpu = (cpu_seconds(hub_pid) - c0) / 10.0;
    let t = Instant::now();
    let _ = lab.status(&hub);
    let status_ms = t.elapsed().as_millis();
    // Revoke the first site and time until it no longer reaches the hub.
    let mut revoke = hub.local("revoke");
    revoke.push("10.80.0.2");
    let first = lab.host(1);
    let t = Instant::now();
    lab.tunnel_ok(&a, &revoke);
    let revoked_ms = t.elapsed().as_millis();
    let cut = !first.ping("10.80.0.1");
    let mut summary = format!(
        "{n} sites: {} joined, {} failed; all admitted in {:.1} s; serve RSS {} kB, idle CPU {:.1}%; status {} ms; revoke {} ms ({})",
        ok.len(),
        failed.len(),
        all.as_secs_f64(),
        rss,
        idle_cpu * 100.0,
        status_ms,
        revoked_ms,
        if cut {
            "the site is cut off"
        } else {
            "THE SITE STILL GETS THROUGH"
        }
    );
    if let Some(f) = failed.first() {
        summary.push_str(&format!("\n  first failure: {f}"));
    }
    summary
}

fn main() {
    tunnel_lab::plain_panics();
    tunnel_lab::needs_root("make scale");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = std::env::var("TUNNEL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target/release/tunnel"));
    let sizes: Vec<usize> = std::env::var("SCALE_SITES")
        .unwrap_or_else(|_| "250".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let lines: Vec<String> = sizes.iter().map(|n| run(&bin, *n)).collect();
    println!();
    println!("==================== scale ====================");
    for l in lines {
        println!("{l}");
    }
}
