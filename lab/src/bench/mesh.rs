//! The mesh section: sites behind every kind of NAT in a [`NatLab`] with
//! the hub as rendezvous and relay. How long a pair takes from its first
//! packet to its direct path, which pairs go direct, round trips direct
//! and relayed (with a delay on the hub's link), a direct pair's
//! throughput against the same pair routed through a `--no-mesh` hub, and
//! 100 sites in one mesh.

use std::time::{Duration, Instant};

use super::summary::check;
use super::{Config, die, info};
use crate::{
    Host, Lab, MeshSite, Nat, NatLab, Router, cpu_seconds, path_to, pings, status_json, status_kb,
    step,
};

const P50_TARGET: Duration = Duration::from_secs(2);
const P95_TARGET: Duration = Duration::from_secs(5);
const THROUGHPUT_TARGET: f64 = 1.8;

/// Runs the section in labs of its own; returns the targets missed.
pub(super) fn mesh(cfg: &Config) -> Vec<String> {
    let mut missed = vec![];
    let mut lines = vec![];
    // BENCH_MESH picks parts (matrix,rtt,throughput,sites) while working
    // on one; unset, all run.
    let parts = std::env::var("BENCH_MESH").unwrap_or_default();
    let want = |p: &str| parts.is_empty() || parts.split(',').any(|x| x == p);
    if want("matrix") {
        matrix(cfg, &mut lines, &mut missed);
    }
    if want("rtt") {
        round_trips(cfg, &mut lines, &mut missed);
    }
    if want("throughput") {
        throughput(cfg, &mut lines, &mut missed);
    }
    if want("sites") {
        hundred(cfg, &mut lines, &mut missed);
    }
    println!();
    println!("==================== mesh ====================");
    for l in lines {
        println!("{l}");
    }
    missed
}

/// A router as a host, to ping from it.
fn router_host(r: &Router) -> Host {
    Host {
        ns: r.ns.clone(),
        ip: r.public.clone(),
        dev: String::new(),
    }
}

/// Symmetric NAT goes direct only with an open (full-cone) one.
fn feasible(a: &str, b: &str) -> bool {
    let sym = |x: &str| x.starts_with('s');
    !(sym(a) && b != "f" || sym(b) && a != "f")
}

fn is_direct(lab: &Lab, a: &MeshSite, b: &MeshSite) -> bool {
    path_to(lab, &a.node, &b.address).is_some_and(|p| p.starts_with("direct"))
}

fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Each site joins in turn; from its first packet to each earlier site,
/// the time until both ends of every feasible pair are direct.
fn matrix(cfg: &Config, lines: &mut Vec<String>, missed: &mut Vec<String>) {
    step("mesh: sites behind every kind of NAT join one by one");
    let mut nl = NatLab::new(&cfg.bin, None);
    nl.lab.log = "info".into();
    let home = nl.router(Nat::Masquerade);
    let hosts: Vec<(&str, Host)> = vec![
        ("m1", nl.site_behind(&home)),
        ("m2", nl.site_behind(&home)),
        ("m3", nl.site(Nat::Masquerade).1),
        ("f", nl.site(Nat::FullCone).1),
        ("s1", nl.site(Nat::Symmetric).1),
        ("s2", nl.site(Nat::Symmetric).1),
        ("d", nl.double_nat().1),
    ];
    let hub = nl.mesh_hub(hosts.len(), &[]);
    let mut sites: Vec<(&str, MeshSite)> = vec![];
    let mut times = vec![];
    let mut slow = vec![];
    let mut late = vec![];
    for (i, (tag, host)) in hosts.iter().enumerate() {
        let token = hub.lines[i].clone();
        let site = nl.mesh_join(host, tag, &token, &[]);
        let start = Instant::now();
        for (_, other) in &sites {
            let _ = pings(host, &other.address, 1, "0.2");
        }
        let mut waiting: Vec<usize> = (0..sites.len())
            .filter(|j| feasible(tag, sites[*j].0))
            .collect();
        while !waiting.is_empty() && start.elapsed() < Duration::from_secs(20) {
            waiting.retain(|j| {
                let other = &sites[*j].1;
                let done = is_direct(&nl.lab, &site, other) && is_direct(&nl.lab, other, &site);
                if done {
                    times.push(start.elapsed());
                    if start.elapsed() > P50_TARGET {
                        late.push(format!(
                            "{tag}-{} {} ms",
                            sites[*j].0,
                            start.elapsed().as_millis()
                        ));
                    }
                }
                !done
            });
            std::thread::sleep(Duration::from_millis(50));
        }
        slow.extend(waiting.iter().map(|j| format!("{tag}-{}", sites[*j].0)));
        sites.push((tag, site));
    }
    std::thread::sleep(Duration::from_secs(3));
    paths_table(&nl, &sites, lines, missed);
    if times.is_empty() {
        die("mesh: no pair went direct");
    }
    let (p50, p95) = (percentile(&times, 0.5), percentile(&times, 0.95));
    let ok50 = check(p50 <= P50_TARGET, missed, || {
        format!("mesh: p50 to direct {p50:?}")
    });
    let ok95 = check(p95 <= P95_TARGET && slow.is_empty(), missed, || {
        format!("mesh: p95 to direct {p95:?}, never direct: {slow:?}")
    });
    lines.push(format!(
        "  first packet -> direct, {} pairs: p50 {} ms (target <= {} ms: {ok50}), p95 {} ms (target <= {} ms: {ok95}){}",
        times.len(),
        p50.as_millis(),
        P50_TARGET.as_millis(),
        p95.as_millis(),
        P95_TARGET.as_millis(),
        if slow.is_empty() { String::new() } else { format!("; never direct: {slow:?}") }
    ));
    if !late.is_empty() {
        lines.push(format!(
            "  pairs slower than {} ms: {}",
            P50_TARGET.as_millis(),
            late.join(", ")
        ));
    }
}

/// Which pairs are direct and which relayed, as a table; relayed pairs
/// must carry pings without loss.
fn paths_table(
    nl: &NatLab,
    sites: &[(&str, MeshSite)],
    lines: &mut Vec<String>,
    missed: &mut Vec<String>,
) {
    let mut table = format!("{:>6}", "");
    for (t, _) in sites {
        table.push_str(&format!("{t:>5}"));
    }
    let mut wrong = vec![];
    let mut lost = 0;
    for (ta, a) in sites {
        table.push_str(&format!("\n  {ta:>4}"));
        for (tb, b) in sites {
            let cell = if ta == tb {
                "-"
            } else {
                let p = path_to(&nl.lab, &a.node, &b.address).unwrap_or_default();
                let direct = p.starts_with("direct");
                if direct != feasible(ta, tb) {
                    wrong.push(format!("{ta}->{tb}: {p}"));
                }
                if !direct {
                    lost += 10 - pings(&a.node.host, &b.address, 10, "0.1").min(10);
                }
                if direct { "D" } else { "R" }
            };
            table.push_str(&format!("{cell:>5}"));
        }
    }
    lines.push("paths between NAT kinds (m: masquerade, f: full cone, s: symmetric, d: double NAT; m1/m2 share one router; D direct, R relayed):".into());
    lines.push(table);
    let ok = check(wrong.is_empty() && lost == 0, missed, || {
        format!("mesh paths: {wrong:?}, {lost} pings lost on relayed pairs")
    });
    lines.push(format!(
        "  every feasible pair direct, the rest relayed with no loss: {ok} ({} wrong, {lost} of the relayed pairs' pings lost)",
        wrong.len()
    ));
}

/// The median round trip of `count` pings, ms.
fn rtt_ms(from: &Host, to: &str, count: u32) -> Option<f64> {
    let out = from.exec(&[
        "ping",
        "-c",
        &count.to_string(),
        "-i",
        "0.05",
        "-W",
        "1",
        to,
    ]);
    let mut v: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Two sites that can go direct (a masquerading NAT and `b_nat`), two
/// behind symmetric NATs that cannot, and a hub with `extra`, all joined.
struct Quartet {
    ra: Router,
    rb: Router,
    ha: Host,
    hb: Host,
    hs1: Host,
    hs2: Host,
    a: MeshSite,
    b: MeshSite,
    s2: MeshSite,
}

fn quartet(nl: &mut NatLab, b_nat: Nat, extra: &[&str]) -> Quartet {
    nl.lab.log = "info".into();
    let (ra, ha) = nl.site(Nat::Masquerade);
    let (rb, hb) = nl.site(b_nat);
    let hs1 = nl.site(Nat::Symmetric).1;
    let hs2 = nl.site(Nat::Symmetric).1;
    let hub = nl.mesh_hub(4, extra);
    let a = nl.mesh_join(&ha, "a", &hub.lines[0].clone(), &[]);
    let b = nl.mesh_join(&hb, "b", &hub.lines[1].clone(), &[]);
    let _s1 = nl.mesh_join(&hs1, "s1", &hub.lines[2].clone(), &[]);
    let s2 = nl.mesh_join(&hs2, "s2", &hub.lines[3].clone(), &[]);
    let _ = pings(&ha, &b.address, 2, "0.2");
    Quartet {
        ra,
        rb,
        ha,
        hb,
        hs1,
        hs2,
        a,
        b,
        s2,
    }
}

/// Round trips with a delay on the hub's link: the underlay between two
/// routers, the same pair through the tunnel direct, and a relayed pair.
fn round_trips(cfg: &Config, lines: &mut Vec<String>, missed: &mut Vec<String>) {
    let delay = Duration::from_millis(10);
    step("mesh: round trips, with 10 ms each way on the hub's link");
    let mut nl = NatLab::new(&cfg.bin, Some(delay));
    let Quartet {
        ra,
        rb,
        ha,
        hs1,
        a,
        b,
        s2,
        ..
    } = quartet(&mut nl, Nat::FullCone, &[]);
    crate::wait_path(
        &nl.lab,
        &a.node,
        &b.address,
        "direct",
        Duration::from_secs(20),
    );
    let underlay = rtt_ms(&router_host(&ra), &rb.public, 40).unwrap_or(f64::NAN);
    let direct = rtt_ms(&ha, &b.address, 40).unwrap_or(f64::NAN);
    let relayed = rtt_ms(&hs1, &s2.address, 40).unwrap_or(f64::NAN);
    let ok1 = check(direct <= underlay + 1.0, missed, || {
        format!("mesh: direct RTT {direct:.2} ms vs underlay {underlay:.2} ms")
    });
    let ok2 = check(direct < relayed / 2.0, missed, || {
        format!("mesh: direct RTT {direct:.2} ms vs relayed {relayed:.2} ms")
    });
    lines.push(format!(
        "round trip, p50 of 40 pings: underlay {underlay:.2} ms, direct {direct:.2} ms (target <= underlay + 1 ms: {ok1}), relayed {relayed:.2} ms (direct < half: {ok2})"
    ));
}

/// A direct pair's single-stream TCP against the same pair through a
/// `--no-mesh` hub (decrypted and encrypted again there), and a relayed
/// pair (ciphertext forwarded).
fn throughput(cfg: &Config, lines: &mut Vec<String>, missed: &mut Vec<String>) {
    let measure = |mesh: bool| -> (f64, Option<f64>) {
        step(&format!(
            "mesh: throughput of a pair {}",
            if mesh {
                "with the mesh"
            } else {
                "through a --no-mesh hub"
            }
        ));
        let mut nl = NatLab::new(&cfg.bin, None);
        let extra: &[&str] = if mesh { &[] } else { &["--no-mesh"] };
        let Quartet {
            ha,
            hb,
            hs1,
            hs2,
            a,
            b,
            s2,
            ..
        } = quartet(&mut nl, Nat::Masquerade, extra);
        if mesh {
            crate::wait_path(
                &nl.lab,
                &a.node,
                &b.address,
                "direct",
                Duration::from_secs(20),
            );
        }
        let pair = super::throughput::iperf(&mut nl.lab, cfg, &hb, &ha, &b.address, false);
        let relayed = mesh.then(|| {
            let _ = pings(&hs1, &s2.address, 2, "0.2");
            super::throughput::iperf(&mut nl.lab, cfg, &hs2, &hs1, &s2.address, false)
        });
        (pair, relayed)
    };
    let (direct, relayed) = measure(true);
    let (through_hub, _) = measure(false);
    let ratio = direct / through_hub;
    let ok = check(ratio >= THROUGHPUT_TARGET, missed, || {
        format!("mesh: direct/hub-routed throughput {ratio:.2}")
    });
    lines.push(format!(
        "single-stream TCP: direct {direct:.0} Mbit/s, through a --no-mesh hub {through_hub:.0} Mbit/s: {ratio:.2}x (target >= {THROUGHPUT_TARGET}: {ok}); relayed (ciphertext via the hub) {:.0} Mbit/s",
        relayed.unwrap_or(f64::NAN)
    ));
}

/// One UDP datagram (to the discard port) from every site to every other.
fn datagram_between_all(sites: &[MeshSite]) {
    let addresses: Vec<String> = sites.iter().map(|s| s.address.clone()).collect();
    let senders: Vec<_> = sites
        .iter()
        .map(|s| {
            let all = addresses.clone();
            let me = s.address.clone();
            s.node.host.in_ns(move || {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
                for a in all.iter().filter(|a| **a != me) {
                    let _ = sock.send_to(b"hello", (a.as_str(), 9));
                }
            })
        })
        .collect();
    for t in senders {
        let _ = t.join();
    }
}

/// 100 sites in one mesh on a flat link: time from one datagram between
/// every pair until every pair is direct, idle RSS per site, and the hub's CPU for one change (a join)
/// pushed to all.
fn hundred(cfg: &Config, lines: &mut Vec<String>, missed: &mut Vec<String>) {
    let n: usize = std::env::var("BENCH_MESH_SITES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    step(&format!("mesh: {n} sites in one mesh"));
    let mut lab = Lab::new(&cfg.bin, n + 2);
    lab.log = "warn".into();
    let hub_host = lab.host(0);
    let hub = lab.serve(&hub_host, "hub", n + 1, &[]);
    let mut sites = vec![];
    for i in 0..n {
        let h = lab.host(i + 1);
        let token = hub.lines[i].clone();
        // A join that fails is reported with how many got in, and the rest
        // of the section is skipped: the lab still cleans up.
        let joined = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            lab.join(&h, &format!("s{i}"), &token, &hub_host, &[])
        }));
        match joined {
            Ok(node) => {
                let address = crate::site_address(&node);
                sites.push(MeshSite { node, address });
            }
            Err(_) => {
                missed.push(format!("mesh: site {} of {n} could not join", i + 1));
                lines.push(format!(
                    "{n} sites in one mesh: MISSED, site {} of {n} did not join (joined one after another; the hub did not answer its handshake within 20 s)",
                    i + 1
                ));
                return;
            }
        }
    }
    // Peers are probed once traffic flows: one datagram from every site
    // to every other.
    let start = Instant::now();
    datagram_between_all(&sites);
    let pairs = n * (n - 1) / 2;
    let mut all_direct = None;
    while start.elapsed() < Duration::from_secs(180) {
        let direct: usize = sites
            .iter()
            .map(|s| {
                status_json(&lab, &s.node)["peers"]
                    .as_array()
                    .map(|p| {
                        p.iter()
                            .filter(|p| {
                                p["path"]["path"]
                                    .as_str()
                                    .is_some_and(|x| x.starts_with("direct"))
                            })
                            .count()
                    })
                    .unwrap_or(0)
            })
            .sum();
        if direct == 2 * pairs {
            all_direct = Some(start.elapsed());
            break;
        }
        info(&format!("{} of {} pair ends direct", direct, 2 * pairs));
    }
    if all_direct.is_none() {
        missed.push(format!(
            "mesh: {n} sites: not every pair direct within 180 s"
        ));
    }
    std::thread::sleep(Duration::from_secs(5));
    let mut rss: Vec<u64> = sites
        .iter()
        .filter_map(|s| status_kb(lab.proc(s.node.proc).pid(), "VmRSS"))
        .collect();
    rss.sort_unstable();
    let hub_pid = lab.proc(hub.proc).pid();
    let window = Duration::from_secs(5);
    let idle0 = cpu_seconds(hub_pid);
    std::thread::sleep(window);
    let idle = cpu_seconds(hub_pid) - idle0;
    let last = lab.host(n + 1);
    let before = cpu_seconds(hub_pid);
    let token = hub.lines[n].clone();
    let extra = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lab.join(&last, "extra", &token, &hub_host, &[])
    }));
    if extra.is_err() {
        missed.push(format!("mesh: a site joining {n} others could not join"));
    }
    std::thread::sleep(window);
    let change = cpu_seconds(hub_pid) - before - idle;
    lines.push(format!(
        "{n} sites in one mesh ({pairs} pairs): all direct {} after a datagram from every site to every other; idle RSS per site median {} kB, max {} kB; hub CPU for one join pushed to all: {change:.2} s (idle {idle:.2} s per {}s)",
        all_direct.map_or("NOT within 180 s".into(), |d| format!("{} ms", d.as_millis())),
        rss.get(rss.len() / 2).copied().unwrap_or(0),
        rss.last().copied().unwrap_or(0),
        window.as_secs()
    ));
}
