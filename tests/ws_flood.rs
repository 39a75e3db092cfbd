//! A flood of idle WebSocket links on the hub's secret path: a token
//! holder (or anyone who read the path) opens 1,100 upgrades and
//! never speaks again. The hub runs with the 1,024 descriptors that
//! systemd gives by default, as a hard limit that it cannot raise, and
//! must still answer its operator and its sites.
//!
//! Hosts on the lab's shared link: 0 the hub, 1 a site that floods,
//! 2 a site that joins over WebSocket during the flood.

mod common;

use common::needs_root;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tunnel::transport::ws::Dialer;

/// Upgrades the flood asks for.
const FLOOD: usize = 1100;
/// "Answers within a second", with room for a loaded machine.
const WITHIN: Duration = Duration::from_secs(2);

/// A `/proc/PID/status` figure in kB.
fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_thousand_idle_websockets_on_the_secret_path_do_not_take_the_hub_down() {
    needs_root("ws_flood");
    let mut lab = common::lab(3);
    let (a, b, c) = (lab.host(0), lab.host(1), lab.host(2));
    let hub = lab.serve_via(
        &a,
        "a",
        2,
        &["prlimit", "--nofile=1024:1024"],
        &["--transport", "udp,wss", "--wss-listen", "[::]:8443"],
    );
    let site = lab.join(&b, "b", &hub.lines[0].clone(), &a, &[]);
    let pid = lab.proc(hub.proc).pid();
    eprintln!("hub RSS before the flood: {} kB", status_kb(pid, "VmRSS:"));

    // The secret path and the pin are in the token.
    let offer = tunnel::token::Token::decode(&hub.lines[0])
        .unwrap()
        .websocket
        .expect("the token offers a WebSocket");
    let (flood, release, links) = start_flood(&b, offer, a.ip.clone());
    eprintln!("{links} of {FLOOD} upgrades on the secret path got a link");

    hub_answers_during_the_flood(&lab, &hub, &site, pid);

    // A site on another address still gets a WebSocket link, and its
    // signed request crosses it.
    let other = lab.join(&c, "c", &hub.lines[1].clone(), &a, &["--transport", "wss"]);
    let other_registered = common::register_as(&other, "over-wss");

    assert!(
        other.lines[0].contains("over wss"),
        "the other site did not join over WebSocket: {:?}",
        other.lines
    );
    assert!(
        other_registered.is_ok(),
        "the other site's signed request over its WebSocket failed: {other_registered:?}"
    );
    release.send(()).unwrap();
    flood.join().unwrap();
    assert!(
        lab.proc(hub.proc).running(),
        "serve died: {}",
        lab.proc(hub.proc).stderr()
    );
}

/// From `host`, [`FLOOD`] upgrades to the hub's secret path, held open and
/// never polled, until the sender returned is used or dropped; the
/// thread, that sender, and how many upgrades got a link.
fn start_flood(
    host: &common::Host,
    offer: tunnel::transport::WsOffer,
    server: String,
) -> (
    std::thread::JoinHandle<()>,
    std::sync::mpsc::Sender<()>,
    usize,
) {
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (up, opened) = std::sync::mpsc::channel::<usize>();
    let flood = host.in_ns(move || {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Connected and upgraded, then never polled again: no data, and
        // no answer to the hub's pings.
        let held = rt.block_on(async {
            let dialer = Arc::new(Dialer::new(&offer, &server, None).unwrap());
            let mut held = Vec::new();
            for _ in 0..FLOOD / 100 {
                let batch = (0..100).map(|_| {
                    let d = dialer.clone();
                    async move { d.connect(Duration::from_secs(3)).await }
                });
                held.extend(
                    futures::future::join_all(batch)
                        .await
                        .into_iter()
                        .filter_map(Result::ok),
                );
            }
            held
        });
        up.send(held.len()).unwrap();
        let _ = released.recv();
        drop(held);
    });
    let links = opened.recv().expect("the flood thread died");
    (flood, release, links)
}

/// The operator mints a token and a site makes a signed request, each
/// answered within [`WITHIN`], and the hub's memory stays bounded.
fn hub_answers_during_the_flood(
    lab: &common::Lab,
    hub: &common::Node,
    site: &common::Node,
    pid: u32,
) {
    let start = Instant::now();
    let token = lab.tunnel(&hub.host, &hub.local("token"));
    let token_took = start.elapsed();
    let start = Instant::now();
    let registered = common::register_as(site, "during-flood");
    let register_took = start.elapsed();
    let rss = status_kb(pid, "VmRSS:");
    eprintln!(
        "during the flood: `tunnel token` {} ms, a signed request {} ms, hub RSS {rss} kB (peak {} kB)",
        token_took.as_millis(),
        register_took.as_millis(),
        status_kb(pid, "VmHWM:")
    );
    assert!(
        token.status.success(),
        "`tunnel token` failed during the flood: {}",
        String::from_utf8_lossy(&token.stderr)
    );
    assert!(
        token_took < WITHIN,
        "`tunnel token` took {token_took:?} during the flood"
    );
    assert!(
        registered.is_ok(),
        "a signed request failed during the flood: {registered:?}"
    );
    assert!(
        register_took < WITHIN,
        "a signed request took {register_took:?} during the flood"
    );
    assert!(
        rss < 200 * 1024,
        "the hub's RSS is {rss} kB during the flood"
    );
}
