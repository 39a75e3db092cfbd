//! The WebSocket transport: `join --transport wss` direct and through
//! tinyproxy, against the reference a user would otherwise reach for:
//! stock wireguard-go over wstunnel through the same proxy.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::throughput::iperf;
use super::wggo::wggo_pair;
use super::{Both, Config, Results, info, stop};
use crate::{Lab, step};

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

pub(super) fn websocket(lab: &mut Lab, cfg: &Config, r: &mut Results) {
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

    reference(lab, cfg, r);
    lab.proc(proxy_proc).terminate();
}

/// wireguard-go over wstunnel through the proxy that `websocket` started;
/// only a note when there is no wstunnel.
fn reference(lab: &mut Lab, cfg: &Config, r: &mut Results) {
    let (a, b) = (lab.host(0), lab.host(1));
    let Some(ws) = wstunnel() else {
        r.reference_note = Some("reference not measured (no wstunnel: set WSTUNNEL)".into());
        return;
    };
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
    let pair = wggo_pair(
        lab,
        "wireguard-go",
        "w",
        "10.79.0",
        "1400",
        "51840",
        "127.0.0.1:51842",
    );
    let up = iperf(lab, cfg, &a, &b, "10.79.0.1", false);
    let down = iperf(lab, cfg, &a, &b, "10.79.0.1", true);
    r.reference = Some((up, down));
    pair.remove(lab);
    lab.proc(client).terminate();
    lab.proc(server).terminate();
}
