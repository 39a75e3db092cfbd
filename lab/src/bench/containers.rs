//! How fast `--container` follows Docker: a web container on the hub and
//! a client on the site; `docker stop` + `docker start` until the
//! endpoint has its address again, and `docker restart` until the client
//! fetches the page again.

use std::process::Command;
use std::time::{Duration, Instant};

use super::{PAGE, Results, die, info, stop};
use crate::{Containers, Lab, docker_ok, fetch, step};

/// `docker restart`s measured, for a median.
const RESTARTS: usize = 3;

/// The web container's page as the client fetches it, and the names.
struct Fetch {
    web: String,
    cli: String,
    url: String,
}

/// The address of `iface` inside the container with init `pid`, if set.
fn has_address(pid: &str, iface: &str) -> bool {
    Command::new("nsenter")
        .args(["-t", pid, "-n", "ip", "-o", "addr", "show", "dev", iface])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(" inet "))
        .unwrap_or(false)
}

fn wait_fetch(cli: &str, url: &str, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if fetch(cli, url).as_deref() == Some(PAGE) {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

pub(super) fn containers(lab: &mut Lab, r: &mut Results) {
    let (a, b) = (lab.host(0), lab.host(1));
    let (web, cli) = (format!("tb{}web", lab.id), format!("tb{}cli", lab.id));
    let mut cs = Containers::default();
    step(&format!("starting containers {web} (httpd) and {cli}"));
    cs.web(&web, PAGE);
    cs.run(&cli, &["sleep", "3600"]);
    let hub = lab.serve(&a, "ca", 1, &["--mtu", "1420", "--container", &web]);
    let site = lab.join(
        &b,
        "cb",
        &hub.lines[0],
        &a,
        &["--mtu", "1420", "--container", &cli],
    );
    info(&site.lines[0]);
    let web_ip = crate::container_address(&lab.status(&hub), &web);
    let f = Fetch {
        url: format!("http://{web_ip}/"),
        web,
        cli,
    };
    r.fetch_ms = Some(steady_fetch(&f));
    stop_start(lab, &f, hub.proc, &format!("{}c0", hub.iface), r);
    restarts(&f, r);
    step("stopping tunnel join and serve with containers (SIGTERM)");
    stop(lab, &site, r);
    stop(lab, &hub, r);
    for c in [&f.web, &f.cli] {
        if docker_ok(&["inspect", "-f", "{{.State.Running}}", c]) != "true" {
            r.problems
                .push(format!("container {c} stopped with tunnel"));
        }
    }
}

/// Once the page crosses, the median of three fetches: what a fetch
/// itself costs (`docker exec`), included in the times measured after.
fn steady_fetch(f: &Fetch) -> u128 {
    let (cli, url) = (&f.cli, &f.url);
    wait_fetch(cli, url, Duration::from_secs(30))
        .unwrap_or_else(|| die(&format!("{cli} cannot fetch {url} over the tunnel")));
    let mut one = vec![];
    for _ in 0..3 {
        let t = Instant::now();
        fetch(cli, url).unwrap_or_else(|| die("a steady-state fetch failed"));
        one.push(t.elapsed().as_millis());
    }
    one.sort();
    one[1]
}

/// `docker stop`, then `docker start`: the time until `web_if` has its
/// address in the new namespace, and the page crosses again.
fn stop_start(lab: &mut Lab, f: &Fetch, hub_proc: usize, web_if: &str, r: &mut Results) {
    let (web, cli, url) = (&f.web, &f.cli, &f.url);
    step(&format!(
        "docker stop {web}, then docker start: time until {web_if} has its address"
    ));
    docker_ok(&["stop", "-t", "1", web]);
    // The start is timed from a detached endpoint, not one being torn down.
    let detached = Instant::now() + Duration::from_secs(10);
    while lab
        .proc(hub_proc)
        .stderr()
        .matches(&format!("detached {web_if}"))
        .count()
        == 0
        && Instant::now() < detached
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    docker_ok(&["start", web]);
    let t1 = Instant::now();
    let pid = docker_ok(&["inspect", "-f", "{{.State.Pid}}", web]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !has_address(&pid, web_if) {
        if Instant::now() > deadline {
            r.problems.push(format!(
                "{web_if} had no address in {web} 30 s after docker start"
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    r.attach_after_ms = Some(t1.elapsed().as_millis());
    r.attach_total_ms = Some(t0.elapsed().as_millis());
    if wait_fetch(cli, url, Duration::from_secs(30)).is_none() {
        r.problems
            .push(format!("after docker start, {cli} could not fetch {url}"));
    }
}

/// [`RESTARTS`] times `docker restart`: the time until the page crosses
/// again, from `docker restart` returning and from its start.
fn restarts(f: &Fetch, r: &mut Results) {
    let (web, cli, url) = (&f.web, &f.cli, &f.url);
    for n in 1..=RESTARTS {
        step(&format!(
            "docker restart {web} ({n}/{RESTARTS}): time until {cli} fetches {url}"
        ));
        let t0 = Instant::now();
        docker_ok(&["restart", "-t", "1", web]);
        let t1 = Instant::now();
        match wait_fetch(cli, url, Duration::from_secs(30)) {
            Some(at) => r
                .restarts
                .push(((at - t1).as_millis(), (at - t0).as_millis())),
            None => r
                .problems
                .push(format!("restart {n}: no fetch within 30 s")),
        }
    }
}
