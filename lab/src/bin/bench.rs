//! `make bench`: `tunnel` against its peers, measured in the same run on
//! two namespace hosts joined by a veth pair: iperf3 over the raw veth,
//! over a pair of stock `wireguard-go`, and over `tunnel` (userspace
//! backend); the time from `tunnel join` to the first packet; peak RSS;
//! the WebSocket transport, direct and through tinyproxy, against stock
//! wireguard-go over wstunnel through the same proxy; and how fast
//! `--container` follows Docker (start -> attached, restart -> traffic);
//! and, with the network driver, `docker run --network <tunnel net>` to
//! the first page fetched across, against the same on a Docker bridge;
//! and scale: 250 and 500 sites joining one hub at once (`tunnel_lab::scale`,
//! as `make scale`). Prints the ratios.
//!
//! Environment:
//!   TUNNEL_BIN     binary to measure (default: target/release/tunnel)
//!   BENCH_SECONDS  iperf3 duration per measurement (default 5)
//!   BENCH_ONLY     comma list of raw,wggo,tunnel,wss,containers,network,scale (default: all)
//!   BENCH_SCALE    site counts of the scale section (default 250,500)
//!   WSTUNNEL       the wstunnel binary of the WebSocket reference
//!   BENCH_STRICT   1 = exit non-zero when a target is missed
//!   IPERF_EXTRA    extra iperf3 client arguments (e.g. "-P 2")

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tunnel_lab::{
    Containers, Host, Lab, Network, Node, cpu_seconds, docker, docker_ok, fetch, step,
};

const TARGET_RATIO: f64 = 3.0;
/// tunnel's single-stream TCP as a share of the raw veth's, at least.
const TARGET_OF_RAW: f64 = 0.2;
const TARGET_JOIN_MS: u128 = 1000;
const IPERF_PORT: &str = "5201";
const PAGE: &str = "bench-page";
const RESTARTS: usize = 3;
/// `docker run` to the first page, per network: how many runs.
const FIRST_PAGES: usize = 5;

fn info(s: &str) {
    println!("    {s}");
}

/// Fails the run; the lab is unwound, so everything is cleaned up.
fn die(s: &str) -> ! {
    panic!("{s}")
}

struct Config {
    bin: PathBuf,
    seconds: u64,
    only: Vec<String>,
    strict: bool,
    iperf_extra: Vec<String>,
}

impl Config {
    fn from_env() -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            bin: var("TUNNEL_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target/release/tunnel")),
            seconds: var("BENCH_SECONDS")
                .and_then(|s| s.parse().ok())
                .unwrap_or(5),
            only: var("BENCH_ONLY")
                .unwrap_or_else(|| "raw,wggo,tunnel,wss,containers,network,scale".into())
                .split(',')
                .map(str::to_owned)
                .collect(),
            strict: var("BENCH_STRICT").as_deref() == Some("1"),
            iperf_extra: var("IPERF_EXTRA")
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
        }
    }

    fn want(&self, what: &str) -> bool {
        self.only.iter().any(|o| o == what)
    }
}

/// iperf3 from `client` to `server` at `addr`; Mbit/s received.
/// With `reverse`, the server sends (iperf3 -R).
fn iperf(
    lab: &mut Lab,
    cfg: &Config,
    server: &Host,
    client: &Host,
    addr: &str,
    reverse: bool,
) -> f64 {
    let extra: &[&str] = if reverse { &["-R"] } else { &[] };
    let json = iperf_json(lab, cfg, server, client, addr, extra);
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| die(&format!("iperf3 to {addr}: no throughput")));
    let mbps = bps / 1e6;
    info(&format!(
        "{addr}{}: {mbps:.0} Mbit/s",
        if reverse { " (server sends)" } else { "" }
    ));
    mbps
}

/// One iperf3 run with `extra` arguments; its JSON report.
fn iperf_json(
    lab: &mut Lab,
    cfg: &Config,
    server: &Host,
    client: &Host,
    addr: &str,
    extra: &[&str],
) -> serde_json::Value {
    let srv = lab.spawn_cmd(server, &["iperf3", "-s", "-1", "-p", IPERF_PORT], &[]);
    server.wait_listening(IPERF_PORT, Duration::from_secs(10));
    let secs = cfg.seconds.to_string();
    let mut args = vec![
        "iperf3",
        "-c",
        addr,
        "-p",
        IPERF_PORT,
        "-t",
        &secs,
        "-J",
        "--connect-timeout",
        "5000",
    ];
    args.extend_from_slice(extra);
    args.extend(cfg.iperf_extra.iter().map(String::as_str));
    let out = client.exec(&args);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| die(&format!("iperf3 to {addr}: not JSON ({e})")));
    if let Some(e) = json["error"].as_str() {
        die(&format!("iperf3 to {addr}: {e}"));
    }
    lab.proc(srv).wait(Duration::from_secs(10));
    json
}

/// One path's figures: TCP with 1 and 4 streams each way (Mbit/s, B -> A
/// then A -> B), UDP packets per second with 64-byte datagrams, and the
/// CPU seconds its processes spent per GB of single-stream TCP.
#[derive(Default, Clone, Copy)]
struct Path {
    tcp1: Both,
    tcp4: Both,
    udp_pps: f64,
    cpu_per_gb: Option<f64>,
    /// Peak RSS (kB) of its two processes after single-stream TCP, as
    /// earlier benchmarks measured it.
    rss_tcp1: [Option<u64>; 2],
}

/// VmHWM of a process, kB.
fn hwm_kb(pid: u32) -> Option<u64> {
    tunnel_lab::status_kb(pid, "VmHWM")
}

/// Measures one path: server `a` at `addr`, client `b`; `pids` are the
/// processes that carry it (none for the raw veth: the kernel does).
fn measure(lab: &mut Lab, cfg: &Config, addr: &str, pids: &[u32]) -> Path {
    let (a, b) = (lab.host(0), lab.host(1));
    let mbps = |j: &serde_json::Value| {
        j["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6
    };
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let before = cpu(pids);
    let one = iperf_json(lab, cfg, &a, &b, addr, &[]);
    let spent = cpu(pids) - before;
    let gb = one["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0) / 1e9;
    let rss_tcp1 = [0, 1].map(|i| pids.get(i).and_then(|p| hwm_kb(*p)));
    let one_rev = iperf_json(lab, cfg, &a, &b, addr, &["-R"]);
    let four = iperf_json(lab, cfg, &a, &b, addr, &["-P", "4"]);
    let four_rev = iperf_json(lab, cfg, &a, &b, addr, &["-P", "4", "-R"]);
    let udp = iperf_json(lab, cfg, &a, &b, addr, &["-u", "-l", "64", "-b", "0"]);
    let sum = &udp["end"]["sum"];
    let received =
        sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0);
    let path = Path {
        tcp1: (mbps(&one), mbps(&one_rev)),
        tcp4: (mbps(&four), mbps(&four_rev)),
        udp_pps: received / sum["seconds"].as_f64().unwrap_or(1.0).max(0.001),
        cpu_per_gb: (!pids.is_empty() && gb > 0.0).then(|| spent / gb),
        rss_tcp1,
    };
    info(&format!(
        "{addr}: TCP {:.0}/{:.0} Mbit/s, 4 streams {:.0}/{:.0}, UDP 64 B {:.0} pps{}",
        path.tcp1.0,
        path.tcp1.1,
        path.tcp4.0,
        path.tcp4.1,
        path.udp_pps,
        path.cpu_per_gb
            .map(|c| format!(", {c:.1} CPU s/GB"))
            .unwrap_or_default()
    ));
    path
}

#[derive(Default)]
struct Results {
    raw: Option<Path>,
    wggo: Option<Path>,
    tunnel: Option<Path>,
    join_reported_ms: Option<u128>,
    join_measured_ms: Option<u128>,
    serve_rss: Option<u64>,
    join_rss: Option<u64>,
    wggo_rss: Option<u64>,
    attach_after_ms: Option<u128>,
    attach_total_ms: Option<u128>,
    restarts: Vec<(u128, u128)>,
    fetch_ms: Option<u128>,
    /// `docker run --network` -> page, ms: tunnel by address, by name, and
    /// a Docker bridge network.
    first_page: Vec<u128>,
    first_page_by_name: Vec<u128>,
    first_page_bridge: Vec<u128>,
    wss_direct: Option<Both>,
    wss_proxy: Option<Both>,
    wss_join_ms: Option<u128>,
    reference: Option<Both>,
    reference_note: Option<String>,
    problems: Vec<String>,
}

/// A pair of stock wireguard-go: A on `net.1`, B on `net.2`, MTU `mtu`.
/// B sends to `b_to_a` (A's UDP address, or a local relay's); A learns B.
/// Returns A's process and both interfaces.
struct WgGo {
    a_proc: usize,
    b_proc: usize,
    ia: String,
    ib: String,
}

fn wggo_pair(lab: &mut Lab, tag: &str, net: &str, mtu: &str, a_port: &str, b_to_a: &str) -> WgGo {
    let (a, b) = (lab.host(0), lab.host(1));
    let (ia, ib) = (lab.iface(&format!("a{tag}")), lab.iface(&format!("b{tag}")));
    let key = |h: &Host| h.run(&["wg", "genkey"]).trim().to_owned();
    let (ka, kb) = (key(&a), key(&b));
    let public = |k: &str| {
        let mut c = Command::new("wg")
            .arg("pubkey")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin.take().unwrap().write_all(k.as_bytes()).unwrap();
        String::from_utf8(c.wait_with_output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned()
    };
    let (pa, pb) = (public(&ka), public(&kb));
    let env = [("LOG_LEVEL", "error")];
    let a_proc = lab.spawn_cmd(&a, &["wireguard-go", "-f", &ia], &env);
    let b_proc = lab.spawn_cmd(&b, &["wireguard-go", "-f", &ib], &env);
    let sock = |i: &str| PathBuf::from(format!("/var/run/wireguard/{i}.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(sock(&ia).exists() && sock(&ib).exists()) {
        if Instant::now() > deadline {
            die("wireguard-go did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let keyfile = |name: &str, k: &str| {
        let p = lab.dir.path().join(name);
        std::fs::write(&p, k).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (fa, fb) = (
        keyfile(&format!("{ia}.key"), &ka),
        keyfile(&format!("{ib}.key"), &kb),
    );
    a.run(&[
        "wg",
        "set",
        &ia,
        "listen-port",
        a_port,
        "private-key",
        &fa,
        "peer",
        &pb,
        "allowed-ips",
        &format!("{net}.2/32"),
    ]);
    b.run(&[
        "wg",
        "set",
        &ib,
        "private-key",
        &fb,
        "peer",
        &pa,
        "allowed-ips",
        &format!("{net}.1/32"),
        "endpoint",
        b_to_a,
        "persistent-keepalive",
        "25",
    ]);
    for (h, i, me) in [
        (&a, &ia, format!("{net}.1/24")),
        (&b, &ib, format!("{net}.2/24")),
    ] {
        h.run(&["ip", "addr", "add", &me, "dev", i]);
        h.run(&["ip", "link", "set", i, "mtu", mtu, "up"]);
    }
    b.ping_until(&format!("{net}.1"), Instant::now());
    WgGo {
        a_proc,
        b_proc,
        ia,
        ib,
    }
}

impl WgGo {
    fn remove(self, lab: &Lab) {
        lab.host(0).run(&["ip", "link", "del", &self.ia]);
        lab.host(1).run(&["ip", "link", "del", &self.ib]);
    }
}

fn wireguard_go(lab: &mut Lab, cfg: &Config, r: &mut Results) {
    step("starting a pair of stock wireguard-go");
    let a_ip = lab.host(0).ip;
    let pair = wggo_pair(
        lab,
        "g",
        "10.78.0",
        "1420",
        "51830",
        &format!("{a_ip}:51830"),
    );
    step("measuring wireguard-go (A 10.78.0.1, B 10.78.0.2)");
    let pids = [lab.proc(pair.a_proc).pid(), lab.proc(pair.b_proc).pid()];
    r.wggo = Some(measure(lab, cfg, "10.78.0.1", &pids));
    r.wggo_rss = lab.proc(pair.a_proc).peak_rss_kb();
    pair.remove(lab);
}

/// Stops a node with SIGTERM and checks it left nothing behind.
fn stop(lab: &mut Lab, node: &Node, r: &mut Results) {
    let status = lab.proc(node.proc).terminate();
    if !status.success() {
        r.problems
            .push(format!("{} exited with {status} after SIGTERM", node.iface));
    }
    if node.host.has_link(&node.iface) {
        r.problems.push(format!(
            "interface {} still exists after shutdown",
            node.iface
        ));
    }
    if PathBuf::from(format!("/var/run/wireguard/{}.sock", node.iface)).exists() {
        r.problems.push(format!(
            "UAPI socket of {} still exists after shutdown",
            node.iface
        ));
    }
}

fn tunnel(lab: &mut Lab, cfg: &Config, r: &mut Results) {
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
    r.tunnel = Some(measure(lab, cfg, "10.77.0.1", &pids));
    r.serve_rss = lab.proc(hub.proc).peak_rss_kb();
    r.join_rss = lab.proc(site.proc).peak_rss_kb();
    step("stopping tunnel join and serve (SIGTERM)");
    stop(lab, &site, r);
    stop(lab, &hub, r);
}

/// Throughput both ways: (client -> server, server -> client), Mbit/s.
type Both = (f64, f64);

/// tinyproxy on B's own address, :3128, allowing CONNECT to the ports used here.
fn tinyproxy(lab: &mut Lab) -> usize {
    let b = lab.host(1);
    let conf = lab.dir.path().join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "Port 3128\nListen {}\nTimeout 600\nAllow 10.231.0.0/24\nConnectPort 8443\nConnectPort 8444\nLogLevel Warning\nMaxClients 100\n",
            b.ip
        ),
    )
    .unwrap();
    let p = lab.spawn_cmd(&b, &["tinyproxy", "-d", "-c", conf.to_str().unwrap()], &[]);
    b.wait_listening("3128", Duration::from_secs(10));
    p
}

/// wstunnel for the reference: `WSTUNNEL`, else on PATH, else the
/// workplace's reference copy beside the repository.
fn wstunnel() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("WSTUNNEL") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v wstunnel"])
        .output()
        && out.status.success()
    {
        return Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/wstunnel");
    shared.exists().then_some(shared)
}

fn websocket(lab: &mut Lab, cfg: &Config, r: &mut Results) {
    let (a, b) = (lab.host(0), lab.host(1));
    step("WebSocket: tinyproxy on site B, tunnel serve --transport udp,wss on site A");
    let proxy_proc = tinyproxy(lab);
    let proxy = format!("http://{}:3128", b.ip);
    let hub = lab.serve(
        &a,
        "wa",
        1,
        &["--transport", "udp,wss", "--wss-listen", "[::]:8443"],
    );
    let token = lab.tunnel_ok(&a, &hub.local("token"));
    let token = token.trim().to_owned();
    let both = |lab: &mut Lab| -> Both {
        (
            iperf(lab, cfg, &a, &b, "10.77.0.1", false),
            iperf(lab, cfg, &a, &b, "10.77.0.1", true),
        )
    };

    step("join --transport wss (direct)");
    let site = lab.join(&b, "wd", &hub.lines[0], &a, &["--transport", "wss"]);
    info(&site.lines[0]);
    r.wss_direct = Some(both(lab));
    let mut stopped = Results::default();
    stop(lab, &site, &mut stopped);

    step("join --transport wss --proxy (through tinyproxy)");
    let t = Instant::now();
    let site = lab.join(
        &b,
        "wp",
        &token,
        &a,
        &["--transport", "wss", "--proxy", &proxy],
    );
    r.wss_join_ms = Some(t.elapsed().as_millis());
    info(&site.lines[0]);
    r.wss_proxy = Some(both(lab));
    stop(lab, &site, &mut stopped);
    stop(lab, &hub, &mut stopped);
    r.problems.extend(stopped.problems);

    match wstunnel() {
        None => {
            r.reference_note = Some("reference not measured (no wstunnel: set WSTUNNEL)".into())
        }
        Some(ws) => {
            step(&format!(
                "reference: stock wireguard-go over {} through the same tinyproxy",
                ws.display()
            ));
            let ws = ws.to_str().unwrap().to_owned();
            let server = lab.spawn_cmd(
                &a,
                &[
                    &ws,
                    "server",
                    "wss://[::]:8444",
                    "--restrict-to",
                    "127.0.0.1:51840",
                ],
                &[("RUST_LOG", "warn")],
            );
            a.wait_listening("8444", Duration::from_secs(10));
            let client = lab.spawn_cmd(
                &b,
                &[
                    &ws,
                    "client",
                    "-L",
                    "udp://127.0.0.1:51842:127.0.0.1:51840?timeout_sec=0",
                    "--http-proxy",
                    &format!("{}:3128", b.ip),
                    &format!("wss://{}:8444", a.ip),
                ],
                &[("RUST_LOG", "warn")],
            );
            std::thread::sleep(Duration::from_millis(500));
            // wstunnel's own advice for WireGuard: an MTU that fits its framing.
            let pair = wggo_pair(lab, "w", "10.79.0", "1400", "51840", "127.0.0.1:51842");
            let up = iperf(lab, cfg, &a, &b, "10.79.0.1", false);
            let down = iperf(lab, cfg, &a, &b, "10.79.0.1", true);
            r.reference = Some((up, down));
            pair.remove(lab);
            lab.proc(client).terminate();
            lab.proc(server).terminate();
        }
    }
    lab.proc(proxy_proc).terminate();
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

fn containers(lab: &mut Lab, r: &mut Results) {
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
    let web_ip = tunnel_lab::container_address(&lab.status(&hub), &web);
    let url = format!("http://{web_ip}/");
    let web_if = format!("{}c0", hub.iface);
    wait_fetch(&cli, &url, Duration::from_secs(30))
        .unwrap_or_else(|| die(&format!("{cli} cannot fetch {url} over the tunnel")));
    let mut one = vec![];
    for _ in 0..3 {
        let t = Instant::now();
        fetch(&cli, &url).unwrap_or_else(|| die("a steady-state fetch failed"));
        one.push(t.elapsed().as_millis());
    }
    one.sort();
    r.fetch_ms = Some(one[1]);

    step(&format!(
        "docker stop {web}, then docker start: time until {web_if} has its address"
    ));
    docker_ok(&["stop", "-t", "1", &web]);
    let detached = Instant::now() + Duration::from_secs(10);
    while lab
        .proc(hub.proc)
        .stderr()
        .matches(&format!("detached {web_if}"))
        .count()
        == 0
        && Instant::now() < detached
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    docker_ok(&["start", &web]);
    let t1 = Instant::now();
    let pid = docker_ok(&["inspect", "-f", "{{.State.Pid}}", &web]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !has_address(&pid, &web_if) {
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
    if wait_fetch(&cli, &url, Duration::from_secs(30)).is_none() {
        r.problems
            .push(format!("after docker start, {cli} could not fetch {url}"));
    }

    for n in 1..=RESTARTS {
        step(&format!(
            "docker restart {web} ({n}/{RESTARTS}): time until {cli} fetches {url}"
        ));
        let t0 = Instant::now();
        docker_ok(&["restart", "-t", "1", &web]);
        let t1 = Instant::now();
        match wait_fetch(&cli, &url, Duration::from_secs(30)) {
            Some(at) => r
                .restarts
                .push(((at - t1).as_millis(), (at - t0).as_millis())),
            None => r
                .problems
                .push(format!("restart {n}: no fetch within 30 s")),
        }
    }
    step("stopping tunnel join and serve with containers (SIGTERM)");
    stop(lab, &site, r);
    stop(lab, &hub, r);
    for c in [&web, &cli] {
        if docker_ok(&["inspect", "-f", "{{.State.Running}}", c]) != "true" {
            r.problems
                .push(format!("container {c} stopped with tunnel"));
        }
    }
}

/// `docker run --rm --network NET [--dns ...] IMAGE wget URL`, once: the
/// time from the call to the page, or None when the one attempt failed.
fn first_page(net: &str, dns: Option<&str>, url: &str) -> Option<u128> {
    let mut args = vec!["run", "--rm", "--network", net];
    if let Some(d) = dns {
        args.extend(["--dns", d]);
    }
    // busybox wget's own -T crashes (Debian's busybox-static 1.35).
    args.extend([tunnel_lab::IMAGE, "timeout", "5", "wget", "-qO-", url]);
    let t = Instant::now();
    let out = docker(&args);
    let took = t.elapsed().as_millis();
    let ok = out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == PAGE;
    if !ok {
        info(&format!(
            "docker {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    ok.then_some(took)
}

fn network(lab: &mut Lab, r: &mut Results) {
    let (a, b) = (lab.host(0), lab.host(1));
    let (plugin_a, plugin_b) = (format!("tb{}a", lab.id), format!("tb{}b", lab.id));
    let hub = lab.serve(
        &a,
        "na",
        1,
        &[
            "--mtu",
            "1420",
            "--name",
            "hq",
            "--docker-driver",
            &plugin_a,
        ],
    );
    let site = lab.join(
        &b,
        "nb",
        &hub.lines[0],
        &a,
        &["--mtu", "1420", "--docker-driver", &plugin_b],
    );
    let (na, nb, bridge) = (
        format!("tb{}na", lab.id),
        format!("tb{}nb", lab.id),
        format!("tb{}br", lab.id),
    );
    let nets = [
        Network::create(&na, &plugin_a),
        Network::create(&nb, &plugin_b),
        Network::bridge(&bridge),
    ];
    let (web, web_br) = (format!("tb{}nweb", lab.id), format!("tb{}bweb", lab.id));
    let mut cs = Containers::default();
    let httpd =
        format!("mkdir -p /www && echo {PAGE} > /www/index.html && exec httpd -f -p 80 -h /www");
    step(&format!(
        "web containers: {web} on tunnel network {na} (hub), {web_br} on bridge {bridge}"
    ));
    cs.run_with(&web, &["--network", &na], &["sh", "-c", &httpd]);
    cs.run_with(&web_br, &["--network", &bridge], &["sh", "-c", &httpd]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let web_ip = loop {
        let st = lab.status(&hub);
        let found = st.as_array().and_then(|eps| {
            eps.iter()
                .find(|e| e["container"] == web.as_str())
                .and_then(|e| e["address"].as_str())
                .map(|a| a.split('/').next().unwrap_or("").to_owned())
        });
        if let Some(ip) = found {
            break ip;
        }
        if Instant::now() > deadline {
            die(&format!("{web} got no endpoint on {na}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let br_ip = docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &web_br,
    ]);
    // The page answers before measuring (httpd is up).
    let url = format!("http://{web_ip}/");
    let by_name = format!("http://{web}.hq.tunnel/");
    let url_br = format!("http://{br_ip}/");
    let deadline = Instant::now() + Duration::from_secs(30);
    while first_page(&nb, None, &url).is_none() || first_page(&bridge, None, &url_br).is_none() {
        if Instant::now() > deadline {
            die("no page across the tunnel network or the bridge within 30 s");
        }
    }
    step(&format!(
        "docker run --rm --network {nb} ... wget {url} (and by name {by_name}), {FIRST_PAGES} times; the same on bridge {bridge}"
    ));
    for _ in 0..FIRST_PAGES {
        match first_page(&nb, None, &url) {
            Some(ms) => r.first_page.push(ms),
            None => r.problems.push(format!(
                "a container on {nb} missed {url} on its first attempt"
            )),
        }
        match first_page(&nb, Some("10.77.0.1"), &by_name) {
            Some(ms) => r.first_page_by_name.push(ms),
            None => r.problems.push(format!(
                "a container on {nb} missed {by_name} on its first attempt"
            )),
        }
        if let Some(ms) = first_page(&bridge, None, &url_br) {
            r.first_page_bridge.push(ms);
        }
    }
    drop(cs);
    drop(nets);
    step("stopping tunnel join and serve with the network driver (SIGTERM)");
    stop(lab, &site, r);
    stop(lab, &hub, r);
}

fn median(v: &mut [u128]) -> u128 {
    v.sort();
    v[v.len() / 2]
}

fn summary(cfg: &Config, r: &mut Results) -> Vec<String> {
    let mut missed = vec![];
    let mbps = |v: Option<f64>| {
        v.map(|v| format!("{v:8.0} Mbit/s"))
            .unwrap_or("       -".into())
    };
    let kb = |v: Option<u64>| v.map(|v| format!("{v} kB")).unwrap_or("n/a".into());
    println!();
    println!("==================== tunnel benchmark summary ====================");
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
    let _ = mbps;
    let row = |name: &str, p: &Path| {
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
        )
    };
    let ratio_row = |name: &str, t: &Path, o: &Path| {
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
        )
    };
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
        let ok = ratio >= TARGET_RATIO;
        if !ok {
            missed.push(format!(
                "tunnel/wireguard-go single-stream ratio {ratio:.2} < {TARGET_RATIO}"
            ));
        }
        println!(
            "ratio tunnel/wireguard-go, TCP 1 stream B>A: {ratio:.2}  (target >= {TARGET_RATIO}: {})",
            if ok { "ok" } else { "MISSED" }
        );
    }
    if let (Some(t), Some(raw)) = (&r.tunnel, &r.raw) {
        ratio_row("tunnel/raw", t, raw);
        let share = t.tcp1.0 / raw.tcp1.0;
        let ok = share >= TARGET_OF_RAW;
        if !ok {
            missed.push(format!(
                "tunnel is {share:.2} of the raw veth < {TARGET_OF_RAW}"
            ));
        }
        println!(
            "ratio tunnel/raw veth, TCP 1 stream B>A:     {share:.2}  (target >= {TARGET_OF_RAW}: {})",
            if ok { "ok" } else { "MISSED" }
        );
    }
    if let Some(measured) = r.join_measured_ms {
        let reported = r.join_reported_ms.unwrap_or(measured);
        let ok = reported < TARGET_JOIN_MS && measured < TARGET_JOIN_MS;
        if !ok {
            missed.push(format!(
                "join -> first packet took {reported} ms reported / {measured} ms measured"
            ));
        }
        println!(
            "join -> first packet: {reported} ms (reported by join), {measured} ms (measured from start)  (target < {TARGET_JOIN_MS} ms: {})",
            if ok { "ok" } else { "MISSED" }
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
    if cfg.want("wss") {
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
            let ok = a >= 2.0 && b >= 2.0;
            if !ok {
                missed.push(format!(
                    "wss via proxy / wstunnel reference {a:.2} / {b:.2} < 2"
                ));
            }
            println!(
                "ratio wss-via-proxy/reference: {a:.2} up, {b:.2} down  (target >= 2: {})",
                if ok { "ok" } else { "MISSED" }
            );
        }
        if let (Some((pu, _)), Some(udp)) = (r.wss_proxy, r.tunnel) {
            let x = pu / udp.tcp1.0;
            let ok = x >= 0.5;
            if !ok {
                missed.push(format!("wss via proxy / tunnel over UDP {x:.2} < 0.5"));
            }
            println!(
                "ratio wss-via-proxy/tunnel udp: {x:.2}  (target >= 0.5: {})",
                if ok { "ok" } else { "MISSED" }
            );
        }
        if let Some(ms) = r.wss_join_ms {
            let ok = ms < TARGET_JOIN_MS;
            if !ok {
                missed.push(format!("join -> traffic over wss via proxy took {ms} ms"));
            }
            println!(
                "join -> traffic over wss via proxy: {ms} ms  (target < {TARGET_JOIN_MS} ms: {})",
                if ok { "ok" } else { "MISSED" }
            );
        }
    }
    if cfg.want("containers") {
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
            let mut after: Vec<u128> = r.restarts.iter().map(|(a, _)| *a).collect();
            let mut total: Vec<u128> = r.restarts.iter().map(|(_, t)| *t).collect();
            println!(
                "docker restart -> traffic:       {} ms after `docker restart` returned (median {} ms; {:.1} s including the restart)",
                list.join(" / "),
                median(&mut after),
                median(&mut total) as f64 / 1000.0
            );
        }
        println!(
            "  (fetches run as `docker exec ... wget`, {} ms each when steady, included above)",
            r.fetch_ms.map(|m| m.to_string()).unwrap_or("?".into())
        );
    }
    if cfg.want("network") {
        if r.first_page.is_empty() {
            println!("docker run --network -> page:    -");
        } else {
            let list = |v: &[u128]| {
                v.iter()
                    .map(|m| m.to_string())
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let by_ip = median(&mut r.first_page.clone());
            let ok = by_ip < TARGET_JOIN_MS;
            if !ok {
                missed.push(format!("docker run --network -> page took {by_ip} ms"));
            }
            println!(
                "docker run --network -> page:    {} ms (median {by_ip} ms; target < {TARGET_JOIN_MS} ms: {}), container start included",
                list(&r.first_page),
                if ok { "ok" } else { "MISSED" }
            );
            if !r.first_page_by_name.is_empty() {
                println!(
                    "  ... by name via the hub's DNS: {} ms (median {} ms)",
                    list(&r.first_page_by_name),
                    median(&mut r.first_page_by_name.clone())
                );
            }
            if !r.first_page_bridge.is_empty() {
                let br = median(&mut r.first_page_bridge.clone());
                println!(
                    "  ... on a Docker bridge network: {} ms (median {br} ms); tunnel/bridge {:.2}",
                    list(&r.first_page_bridge),
                    by_ip as f64 / br.max(1) as f64
                );
            }
        }
    }
    if cfg.want("tunnel") || cfg.want("containers") || cfg.want("network") {
        if r.problems.is_empty() {
            println!("shutdown: clean (exit 0, no interface or UAPI socket left)");
        } else {
            for p in &r.problems {
                println!("PROBLEM: {p}");
            }
        }
    }
    println!("==================================================================");
    missed
}

fn main() {
    tunnel_lab::plain_panics();
    let cfg = Config::from_env();
    tunnel_lab::needs_root("make bench");
    if !cfg.bin.exists() {
        die(&format!(
            "{} not found; run `make build` first",
            cfg.bin.display()
        ));
    }
    if (cfg.want("containers") || cfg.want("network"))
        && !(tunnel_lab::docker(&["info"]).status.success()
            && tunnel_lab::docker(&["image", "inspect", tunnel_lab::IMAGE])
                .status
                .success())
    {
        step("no Docker engine or no test image: running scripts/docker-env.sh");
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let ok = Command::new("bash")
            .arg(root.join("scripts/docker-env.sh"))
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            die("scripts/docker-env.sh failed");
        }
    }
    let mut lab = Lab::new(&cfg.bin, 2);
    lab.log = "info".into();
    let (a, b) = (lab.host(0), lab.host(1));
    step(&format!(
        "two namespace sites: A {} and B {}, a veth pair between them",
        a.ip, b.ip
    ));
    b.ping_until(&a.ip, Instant::now());
    let mut r = Results::default();
    if cfg.want("raw") {
        step(&format!("measuring raw veth throughput (B -> A {})", a.ip));
        r.raw = Some(measure(&mut lab, &cfg, &a.ip, &[]));
    }
    if cfg.want("wggo") {
        wireguard_go(&mut lab, &cfg, &mut r);
    }
    if cfg.want("tunnel") {
        tunnel(&mut lab, &cfg, &mut r);
    }
    if cfg.want("wss") {
        websocket(&mut lab, &cfg, &mut r);
    }
    if cfg.want("containers") {
        containers(&mut lab, &mut r);
    }
    if cfg.want("network") {
        network(&mut lab, &mut r);
    }
    let mut missed = summary(&cfg, &mut r);
    drop(lab);
    if !r.problems.is_empty() {
        die("tunnel did not run or shut down cleanly");
    }
    if cfg.want("scale") {
        // A lab of its own, once the two-host one is gone.
        let sizes: Vec<usize> = std::env::var("BENCH_SCALE")
            .unwrap_or_else(|_| "250,500".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        let reports: Vec<_> = sizes
            .iter()
            .map(|n| tunnel_lab::scale::run(&cfg.bin, *n, "warn", None))
            .collect();
        println!();
        println!("==================== scale ====================");
        for rep in &reports {
            println!("{rep}");
            if !rep.failures.is_empty() {
                missed.push(format!(
                    "{} of {} sites did not join within their timeout",
                    rep.failures.len(),
                    rep.sites
                ));
            }
        }
    }
    for m in &missed {
        eprintln!("error: target missed: {m}");
    }
    if cfg.strict && !missed.is_empty() {
        std::process::exit(1);
    }
}
