//! End-to-end with real Docker: containers on two namespace "hosts" talk
//! over the tunnel, follow restarts and re-creation, and are left running
//! and clean on exit. The engine and the local image come from
//! `scripts/docker-env.sh` (run by `make test` and CI as root).

mod common;

use common::{Containers, IMAGE, Lab, Node, container_address, docker_ok, fetch, needs_docker};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

const UP: Duration = common::UP;

/// Fetches from `from` until the page comes back, failing after `UP`.
fn wait_for_page(from: &str, url: &str, page: &str, when: &str, lab: &mut Lab, serve: usize) {
    let since = Instant::now();
    while fetch(from, url).as_deref() != Some(page) {
        assert!(
            since.elapsed() < UP,
            "page not reachable {when}; {}",
            lab.proc(serve).stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn interfaces_in(container: &str) -> String {
    docker_ok(&["exec", container, "ip", "-o", "link"])
}

#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn containers_on_two_hosts_talk_over_the_tunnel_and_follow_restarts() {
    needs_docker("containers_on_two_hosts");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let (web, cli, other) = (
        format!("tnl{}web", lab.id),
        format!("tnl{}cli", lab.id),
        format!("tnl{}oth", lab.id),
    );
    let page = format!("page-{}", lab.id);
    let mut cs = Containers::default();
    cs.web(&web, &page);
    cs.run(&cli, &["sleep", "3600"]);
    cs.run(&other, &["sleep", "3600"]);

    let hub = lab.serve(&a, "a", 1, &["--container", &web]);
    let site = lab.join(&b, "b", &hub.lines[0], &a, &["--container", &cli]);
    let summary = site.lines[0].clone();
    assert!(
        summary.contains(&format!("container {cli} as 10.77.0.")),
        "{summary}"
    );

    let web_ip = container_address(&lab.status(&hub), &web);
    let url = format!("http://{web_ip}/");
    assert_eq!(
        fetch(&cli, &url).as_deref(),
        Some(page.as_str()),
        "cli cannot fetch from web over the tunnel"
    );
    only_attached_containers_are_in(&cli, &other, &[&hub.iface, &site.iface]);
    status_shows_the_container(&lab, &hub, &web);
    follows_restart_and_recreation(&mut lab, &mut cs, &hub, &cli, &web, &page);

    // SIGTERM both: the containers keep running, with no WireGuard interface left.
    for node in [&site, &hub] {
        assert!(
            lab.proc(node.proc).terminate().success(),
            "{}",
            lab.proc(node.proc).stderr()
        );
    }
    for (c, endpoint_iface) in [
        (&web, format!("{}c0", hub.iface)),
        (&cli, format!("{}c0", site.iface)),
    ] {
        assert_eq!(
            docker_ok(&["inspect", "-f", "{{.State.Running}}", c]),
            "true",
            "{c} was stopped"
        );
        let links = interfaces_in(c);
        assert!(
            !links.contains(&endpoint_iface),
            "{endpoint_iface} left in {c}: {links}"
        );
        assert!(!Path::new(&format!("/var/run/wireguard/{endpoint_iface}.sock")).exists());
    }
    assert!(!a.has_link(&hub.iface) && !b.has_link(&site.iface));
    // Status afterwards reports from saved state.
    let after = lab.status(&hub);
    assert!(
        after
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["state"] == "down"),
        "{after}"
    );
}

/// A container that was not attached (`other`) has no way into the
/// tunnel: no interface and no route for the subnet; `cli` has its route.
/// (Checked without sending: `other`'s packets to 10.77.0.x would follow
/// its default route off this host.)
fn only_attached_containers_are_in(cli: &str, other: &str, ifaces: &[&str]) {
    let other_links = interfaces_in(other);
    assert!(
        !ifaces.iter().any(|i| other_links.contains(i)),
        "{other_links}"
    );
    let other_routes = docker_ok(&["exec", other, "ip", "route"]);
    assert!(!other_routes.contains("10.77.0."), "{other_routes}");
    assert!(
        docker_ok(&["exec", cli, "ip", "route"]).contains("10.77.0.0/24"),
        "cli has no tunnel route"
    );
}

/// Container endpoints report live figures too, and the human-readable
/// status shows both endpoints and the container.
fn status_shows_the_container(lab: &Lab, hub: &Node, web: &str) {
    let st = lab.status(hub);
    let web_ep = st
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["container"] == web)
        .unwrap();
    assert_eq!(web_ep["state"], "up");
    assert!(
        web_ep["peers"][0]["last_handshake_secs"].is_u64(),
        "{web_ep}"
    );
    assert!(
        web_ep["peers"][0]["rx_bytes"].as_u64().unwrap() > 0,
        "{web_ep}"
    );
    let text = String::from_utf8_lossy(
        &lab.tunnel(
            &hub.host,
            &["status", "--state-dir", hub.state.to_str().unwrap()],
        )
        .stdout,
    )
    .into_owned();
    assert!(text.contains(&format!("container:  {web} (")), "{text}");
    assert!(
        text.contains(&format!("{} (server, up", hub.iface)),
        "{text}"
    );
}

/// `web` restarted, then removed and re-created under the same name: the
/// hub's endpoint follows each time, with the same address, and leaves no
/// UAPI listener behind.
fn follows_restart_and_recreation(
    lab: &mut Lab,
    cs: &mut Containers,
    hub: &Node,
    cli: &str,
    web: &str,
    page: &str,
) {
    let web_ip = container_address(&lab.status(hub), web);
    let url = format!("http://{web_ip}/");
    // A restart gives web a new namespace; the endpoint follows it.
    let t = Instant::now();
    docker_ok(&["restart", "-t", "1", web]);
    let restarted = Instant::now();
    wait_for_page(cli, &url, page, "after docker restart", lab, hub.proc);
    eprintln!(
        "docker restart {web}: page reachable again {} ms after `docker restart` returned ({} ms including the restart)",
        restarted.elapsed().as_millis(),
        t.elapsed().as_millis()
    );

    // Removed and re-created under the same name: re-attached.
    docker_ok(&["rm", "-f", web]);
    cs.0.retain(|c| c != web);
    cs.web(web, page);
    wait_for_page(cli, &url, page, "after re-creating web", lab, hub.proc);
    // The same address and key came back.
    assert_eq!(container_address(&lab.status(hub), web), web_ip);
    // Each attach made a new device for web's endpoint; only the current
    // one still listens on its UAPI socket (gotatun's own listener outlived
    // its device, one per container restart).
    let uapi = format!("/var/run/wireguard/{}c0.sock", hub.iface);
    let listening = hub.host.run(&["ss", "-xl"]);
    assert_eq!(
        listening.lines().filter(|l| l.contains(&uapi)).count(),
        1,
        "{listening}"
    );
}

#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn docker_errors_are_clear_and_change_nothing() {
    needs_docker("docker_errors");
    let mut lab = common::lab(1);
    let a = lab.host(0);
    let iface = lab.iface("a");
    let state = lab.state_dir("a");
    let s = state.to_str().unwrap();
    let web = format!("tnl{}web", lab.id);
    let stopped = format!("tnl{}stp", lab.id);
    let mut cs = Containers::default();
    cs.web(&web, "x");
    docker_ok(&["create", "--name", &stopped, IMAGE, "sleep", "1"]);
    cs.0.push(stopped.clone());
    let web_id = docker_ok(&["inspect", "-f", "{{.Id}}", &web]);

    let check = |out: Output, want: &str| {
        let err = common::failed_with(&out, 2, want);
        assert_eq!(
            err.trim().lines().count(),
            1,
            "nothing but the error: {err:?}"
        );
        assert!(!a.has_link(&iface), "{want}: interface created");
        assert!(!state.exists(), "{want}: state created");
        assert!(
            !interfaces_in(&web).contains(&iface),
            "{want}: container touched"
        );
    };
    check(
        lab.tunnel(
            &a,
            &[
                "serve",
                "--iface",
                &iface,
                "--state-dir",
                s,
                "--container",
                "no-such-container-here",
            ],
        ),
        "no container named",
    );
    check(
        lab.tunnel(
            &a,
            &[
                "serve",
                "--iface",
                &iface,
                "--state-dir",
                s,
                "--container",
                &stopped,
            ],
        ),
        "is not running",
    );
    check(
        lab.tunnel(
            &a,
            &[
                "serve",
                "--iface",
                &iface,
                "--state-dir",
                s,
                "--container",
                &web,
                "--container",
                &web_id,
            ],
        ),
        "named twice",
    );
    // Docker stopped, as far as tunnel can tell: nothing answers at DOCKER_HOST.
    let out = a.exec(&[
        "env",
        "DOCKER_HOST=unix:///nonexistent/docker.sock",
        common::BIN,
        "serve",
        "--iface",
        &iface,
        "--state-dir",
        s,
        "--container",
        &web,
    ]);
    check(out, "Docker is not running");
}
