//! `make demo`: two namespace "sites" joined by a veth "internet". A web
//! container is attached by `tunnel serve` in site A, a client container
//! by `tunnel join` in site B; the client fetches the page across the
//! tunnel. Then a clean shutdown: the containers keep running without the
//! tunnel interface, and nothing is left behind. With DEMO_CONTAINERS=0
//! the page is served from site A itself, without Docker.
//!
//! Environment: TUNNEL_BIN (default target/release/tunnel),
//! DEMO_CONTAINERS (default 1), TUNNEL_VERBOSE=1 for debug logs.

use std::path::Path;
use std::time::{Duration, Instant};
use tunnel_lab::{Containers, Lab, Node, container_address, docker_ok, indent, step};

const PAGE: &str = "hello from site A over the tunnel";

/// The demo's containers: `web` attached by the hub, `client` by the site.
struct Apps {
    web: String,
    client: String,
}

fn main() {
    let (bin, with_containers) = tunnel_lab::demo_setup("make demo");
    let mut lab = Lab::new(&bin, 2);
    lab.log = tunnel_lab::demo_log();
    let (a, b) = (lab.host(0), lab.host(1));
    step(&format!(
        "two namespace sites: A={} ({}) and B={} ({}), joined by a veth pair",
        a.ns, a.ip, b.ns, b.ip
    ));
    b.ping_until(&a.ip, Instant::now());
    println!("    site B can reach site A at {}", a.ip);

    let mut cs = Containers::default();
    let apps = with_containers.then(|| start_apps(&lab, &mut cs));
    let (hub, site) = hub_and_site(&mut lab, apps.as_ref());

    step("pinging site A's tunnel address 10.77.0.1 from site B");
    indent(&b.run(&["ping", "-c", "3", "-W", "2", "10.77.0.1"]));

    let body = match &apps {
        Some(apps) => page_between_containers(&lab, &hub, &site, apps),
        None => page_between_sites(&mut lab),
    };
    println!("    page: {body}");
    assert_eq!(body, PAGE, "unexpected page content");

    step("stopping tunnel join and tunnel serve (SIGTERM)");
    for node in [&site, &hub] {
        let status = lab.proc(node.proc).terminate();
        assert!(status.success(), "{} exited with {status}", node.iface);
    }
    nothing_left(&hub, &site, apps.as_ref());
    step("removing the demo containers and the namespace sites");
    drop(cs);
    drop(lab);
    step("demo finished successfully");
}

fn start_apps(lab: &Lab, cs: &mut Containers) -> Apps {
    let (web, client) = (
        format!("tdemo{}web", lab.id),
        format!("tdemo{}client", lab.id),
    );
    step(&format!(
        "starting the apps: container {web} (httpd) for site A, {client} for site B"
    ));
    cs.web(&web, &format!("'{PAGE}'"));
    cs.run(&client, &["sleep", "3600"]);
    Apps { web, client }
}

/// `tunnel serve` in site A and `tunnel join` in site B, attaching the
/// containers when there are any; shows what each set up.
fn hub_and_site(lab: &mut Lab, apps: Option<&Apps>) -> (Node, Node) {
    let (a, b) = (lab.host(0), lab.host(1));
    let (extra_a, extra_b) = match apps {
        Some(c) => (
            vec!["--container", c.web.as_str()],
            vec!["--container", c.client.as_str()],
        ),
        None => (vec![], vec![]),
    };
    step(&format!(
        "starting the hub in site A: tunnel serve {}",
        extra_a.join(" ")
    ));
    let hub = lab.serve(&a, "a", 1, &extra_a);
    let token = &hub.lines[0];
    println!(
        "    join token: {}... ({} chars)",
        &token[..24],
        token.len()
    );
    indent(&a.run(&["ip", "-brief", "addr", "show", &hub.iface]));

    step(&format!(
        "joining from site B: tunnel join <token> {} {}",
        a.ip,
        extra_b.join(" ")
    ));
    let site = lab.join(&b, "b", token, &a, &extra_b);
    indent(&site.lines[0]);
    indent(&b.run(&["ip", "-brief", "addr", "show", &site.iface]));
    (hub, site)
}

/// The page of the web container on site A, fetched by the client
/// container on site B.
fn page_between_containers(lab: &Lab, hub: &Node, site: &Node, apps: &Apps) -> String {
    let (web, client) = (&apps.web, &apps.client);
    step("tunnel status in site A");
    indent(&lab.tunnel_ok(
        &hub.host,
        &["status", "--state-dir", hub.state.to_str().unwrap()],
    ));
    let web_ip = container_address(&lab.status(hub), web);
    step(&format!("inside {client}: the tunnel interface"));
    indent(&docker_ok(&[
        "exec",
        client,
        "ip",
        "-o",
        "-4",
        "addr",
        "show",
        &format!("{}c0", site.iface),
    ]));
    step(&format!(
        "fetching http://{web_ip}/ from container {client} (site B) to container {web} (site A)"
    ));
    docker_ok(&[
        "exec",
        client,
        "timeout",
        "15",
        "wget",
        "-qO-",
        &format!("http://{web_ip}/"),
    ])
}

/// Without Docker: a page served by site A on its tunnel address,
/// fetched by site B.
fn page_between_sites(lab: &mut Lab) -> String {
    let (a, b) = (lab.host(0), lab.host(1));
    step("serving a web page in site A on 10.77.0.1:8080 (busybox httpd)");
    let www = lab.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), format!("{PAGE}\n")).unwrap();
    let httpd = lab.spawn_cmd(
        &a,
        &[
            "busybox",
            "httpd",
            "-f",
            "-p",
            "10.77.0.1:8080",
            "-h",
            www.to_str().unwrap(),
        ],
        &[],
    );
    a.wait_listening("8080", Duration::from_secs(10));
    step("fetching http://10.77.0.1:8080/ from site B (busybox wget)");
    let body = b.run(&[
        "timeout",
        "15",
        "busybox",
        "wget",
        "-qO-",
        "http://10.77.0.1:8080/",
    ]);
    lab.proc(httpd).terminate();
    body.trim().to_owned()
}

/// After the stop: no interface, UAPI socket or nftables table, and the
/// containers still run without their tunnel interfaces.
fn nothing_left(hub: &Node, site: &Node, apps: Option<&Apps>) {
    step("checking that nothing is left behind");
    for node in [hub, site] {
        assert!(
            !node.host.has_link(&node.iface),
            "interface {} still exists",
            node.iface
        );
        let sock = Path::new("/var/run/wireguard").join(format!("{}.sock", node.iface));
        assert!(!sock.exists(), "{} still exists", sock.display());
    }
    assert!(
        !hub.host.has_nft_table(&format!("tunnel-{}", hub.iface)),
        "the hub's nftables table is still there"
    );
    if let Some(Apps { web, client }) = apps {
        for (c, iface) in [
            (web, format!("{}c0", hub.iface)),
            (client, format!("{}c0", site.iface)),
        ] {
            assert_eq!(
                docker_ok(&["inspect", "-f", "{{.State.Running}}", c]),
                "true",
                "{c} stopped"
            );
            let links = docker_ok(&["exec", c, "ip", "-o", "link"]);
            assert!(!links.contains(&iface), "{iface} still in {c}");
        }
        println!("    {web} and {client} still run, without tunnel interfaces");
    }
    println!("    no interface, UAPI socket or nftables table left");
}
