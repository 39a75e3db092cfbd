//! Docker-native: names across sites (the hub's DNS), the network driver,
//! label-based attach, metrics and health checks, end to end with a real
//! Docker engine and namespace "sites".

mod common;

use common::{Containers, Network, container_address, docker, needs_docker, until};
use std::time::Instant;

/// What `nslookup NAME SERVER` says inside `container` (busybox).
#[derive(Debug, PartialEq)]
enum Lookup {
    Address(String),
    NxDomain,
    /// No answer at all, or one we cannot read.
    Other(String),
}

fn resolve(container: &str, name: &str, server: &str) -> Lookup {
    let out = docker(&["exec", container, "timeout", "3", "nslookup", name, server]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("NXDOMAIN") {
        return Lookup::NxDomain;
    }
    // busybox prints the server first, then "Name: ... Address: ..." per answer.
    text.split("Name:")
        .nth(1)
        .and_then(|answer| {
            answer
                .lines()
                .find_map(|l| l.trim().strip_prefix("Address:"))
                .and_then(|a| a.split_whitespace().next())
                .map(|a| Lookup::Address(a.to_owned()))
        })
        .unwrap_or(Lookup::Other(text))
}

#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn container_names_resolve_across_sites_and_go_with_revoke() {
    needs_docker("container_names_resolve_across_sites");
    let mut lab = common::lab(2);
    let (h, s) = (lab.host(0), lab.host(1));
    let (web, cli) = (format!("tnl{}web", lab.id), format!("tnl{}cli", lab.id));
    let mut cs = Containers::default();
    cs.web(&web, "page");
    cs.run(&cli, &["sleep", "3600"]);
    let hub = lab.serve(&h, "h", 1, &["--name", "hq", "--container", &web]);
    let site = lab.join(
        &s,
        "s",
        &hub.lines[0],
        &h,
        &["--name", "branch", "--container", &cli],
    );
    let web_ip = container_address(&lab.status(&hub), &web);
    let cli_ip = container_address(&lab.status(&site), &cli);
    let web_name = format!("{web}.hq.tunnel");
    let cli_name = format!("{cli}.branch.tunnel");
    assert_eq!(
        resolve(&cli, &web_name, "10.77.0.1"),
        Lookup::Address(web_ip)
    );
    assert_eq!(
        resolve(&web, &cli_name, "10.77.0.1"),
        Lookup::Address(cli_ip)
    );
    assert_eq!(
        resolve(&web, "nobody.hq.tunnel", "10.77.0.1"),
        Lookup::NxDomain
    );
    // Revoked: the name is gone (NXDOMAIN) within 2 s.
    let mut revoke = hub.local("revoke");
    revoke.push("branch");
    lab.tunnel_ok(&h, &revoke);
    let since = Instant::now();
    until("the revoked site's container still resolves", || {
        (resolve(&web, &cli_name, "10.77.0.1") == Lookup::NxDomain).then_some(())
    });
    let took = since.elapsed();
    assert!(took.as_millis() < 2000, "NXDOMAIN only after {took:?}");
    drop(site);
}

/// Whether `container` has an interface named `iface` (its tunnel endpoint).
fn has_iface(container: &str, iface: &str) -> bool {
    let out = docker(&["exec", container, "ip", "-o", "link"]);
    String::from_utf8_lossy(&out.stdout).contains(&format!(": {iface}"))
}

#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn labelled_containers_are_attached_on_start_and_given_back_on_removal() {
    needs_docker("labelled_containers_are_attached");
    let mut lab = common::lab(2);
    let (h, s) = (lab.host(0), lab.host(1));
    // Labels of this test's own: other tests' tunnels leave these alone.
    // The hub and the site share this machine's Docker, so each follows
    // a label of its own, as two hosts would.
    let hub_label = format!("tunnel.test={}hq", lab.id);
    let site_label = format!("tunnel.test={}br", lab.id);
    let mut cs = Containers::default();
    let (early, late, plain) = (
        format!("tnl{}early", lab.id),
        format!("tnl{}late", lab.id),
        format!("tnl{}plain", lab.id),
    );
    cs.run_with(&early, &["--label", &hub_label], &["sleep", "3600"]);
    let hub = lab.serve(&h, "h", 1, &["--name", "hq", "--attach-label", &hub_label]);
    let site = lab.join(
        &s,
        "s",
        &hub.lines[0],
        &h,
        &["--name", "br", "--attach-label", &site_label],
    );
    // Running before: attached at start.
    until("the running labelled container is not attached", || {
        has_iface(&early, &format!("{}c0", hub.iface)).then_some(())
    });

    // Started after: attached within a second; an unlabelled one never.
    cs.run_with(&plain, &[], &["sleep", "3600"]);
    let took = cs.run_with(&late, &["--label", &site_label], &["sleep", "3600"]);
    let started = Instant::now();
    until(
        "the labelled container started later is not attached",
        || has_iface(&late, &format!("{}c0", site.iface)).then_some(()),
    );
    let attached = started.elapsed();
    eprintln!(
        "labelled container attached {} ms after `docker run` returned ({} ms)",
        attached.as_millis(),
        took.as_millis()
    );
    assert!(
        attached.as_millis() < 1000,
        "attached only after {attached:?}"
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let links = docker(&["exec", &plain, "ip", "-o", "link"]);
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains(&hub.iface) && !links.contains(&site.iface),
        "{links}"
    );

    // Its name resolves from the other site, and goes with `docker rm`.
    let late_ip = container_address(&lab.status(&site), &late);
    let name = format!("{late}.br.tunnel");
    assert_eq!(
        resolve(&early, &name, "10.77.0.1"),
        Lookup::Address(late_ip.clone())
    );
    common::docker_ok(&["rm", "-f", &late]);
    let since = Instant::now();
    until("the removed container still resolves", || {
        (resolve(&early, &name, "10.77.0.1") == Lookup::NxDomain).then_some(())
    });
    assert!(
        since.elapsed().as_millis() < 2000,
        "NXDOMAIN only after {:?}",
        since.elapsed()
    );
    let st = lab.status(&site);
    assert!(
        !st.as_array()
            .unwrap()
            .iter()
            .any(|e| e["container"] == late.as_str()),
        "{st}"
    );
    // The hub no longer has it as a peer: its address is free again.
    let peers = lab.status(&hub)[0]["peers"].to_string();
    assert!(!peers.contains(&format!("\"{late_ip}\"")), "{peers}");
    drop(site);
}

/// A hub "hq" and a site "br", each serving the network driver, and a
/// Docker network on each (created with `options`), all tagged `tag`.
struct DriverPair {
    hub: common::Node,
    site: common::Node,
    plugin_a: String,
    plugin_b: String,
    net_a: String,
    net_b: String,
    nets: (Network, Network),
}

fn driver_pair(lab: &mut common::Lab, tag: &str, options: &[&str]) -> DriverPair {
    let (h, s) = (lab.host(0), lab.host(1));
    let (plugin_a, plugin_b) = (
        format!("tnl{}{tag}a", lab.id),
        format!("tnl{}{tag}b", lab.id),
    );
    let hub = lab.serve(&h, "h", 1, &["--name", "hq", "--docker-driver", &plugin_a]);
    let site = lab.join(
        &s,
        "s",
        &hub.lines[0],
        &h,
        &["--name", "br", "--docker-driver", &plugin_b],
    );
    let (net_a, net_b) = (
        format!("tnl{}{tag}na", lab.id),
        format!("tnl{}{tag}nb", lab.id),
    );
    let nets = (
        Network::create_with(&net_a, &plugin_a, options),
        Network::create_with(&net_b, &plugin_b, options),
    );
    DriverPair {
        hub,
        site,
        plugin_a,
        plugin_b,
        net_a,
        net_b,
        nets,
    }
}

/// A busybox httpd serving "page", as container `name` on `network`.
fn web_on(cs: &mut Containers, name: &str, network: &str) {
    cs.run_with(
        name,
        &["--network", network],
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo page > /www/index.html && exec httpd -f -p 80 -h /www",
        ],
    );
}

/// A Docker network on a tunnel network driver, removed on drop.
#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn the_network_driver_gives_containers_endpoints_at_creation() {
    needs_docker("the_network_driver");
    let mut lab = common::lab(2);
    let DriverPair {
        hub,
        site,
        plugin_a,
        plugin_b,
        net_a,
        net_b,
        nets,
    } = driver_pair(&mut lab, "", &[]);
    let s = site.host.clone();
    let (web, cli) = (format!("tnl{}web", lab.id), format!("tnl{}cli", lab.id));
    let mut cs = Containers::default();
    web_on(&mut cs, &web, &net_a);
    let web_ip = until("web has no endpoint in status", || {
        let st = lab.status(&hub);
        st.as_array()
            .unwrap()
            .iter()
            .find(|e| e["container"] == web.as_str())
            .and_then(|e| e["address"].as_str())
            .map(|a| a.split('/').next().unwrap().to_owned())
    });
    // On its first attempt after start, by address and by name.
    let url = format!("http://{web_ip}/");
    let by_name = format!("http://{web}.hq.tunnel/");
    let out = docker(&[
        "run",
        "--rm",
        "--name",
        &cli,
        "--network",
        &net_b,
        "--dns",
        "10.77.0.1",
        common::IMAGE,
        "sh",
        "-c",
        &format!("wget -qO- {url} && wget -qO- {by_name}"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.lines().collect::<Vec<_>>(), ["page", "page"]);
    // Docker moved our TUN link in and named it; the container has no
    // other way out (no gateway bridge).
    let links = common::docker_ok(&["exec", &web, "ip", "-o", "link"]);
    assert!(links.contains(": tun0"), "{links}");
    let routes = common::docker_ok(&["exec", &web, "ip", "route"]);
    assert!(!routes.contains("default"), "{routes}");

    // `docker rm -f` gives the address back: the next container gets it.
    common::docker_ok(&["rm", "-f", &web]);
    until("web's endpoint is still in status", || {
        let st = lab.status(&hub).to_string();
        (!st.contains(&format!("\"{web_ip}/"))).then_some(())
    });
    let again = format!("tnl{}again", lab.id);
    cs.run_with(&again, &["--network", &net_a], &["sleep", "3600"]);
    let again_ip = until("the new container has no endpoint", || {
        let st = lab.status(&hub);
        st.as_array()
            .unwrap()
            .iter()
            .find(|e| e["container"] == again.as_str())
            .and_then(|e| e["address"].as_str())
            .map(|a| a.split('/').next().unwrap().to_owned())
    });
    assert_eq!(again_ip, web_ip, "the address was not given back");

    // On exit: the plugin sockets and every interface are gone.
    drop(cs);
    drop(nets);
    for (node, plugin) in [(&site, &plugin_b), (&hub, &plugin_a)] {
        lab.tunnel_ok(&node.host, &node.local("down"));
        assert!(lab.proc(node.proc).wait(common::UP).success());
        let sock = std::path::Path::new("/run/docker/plugins").join(format!("{plugin}.sock"));
        assert!(!sock.exists(), "{} left", sock.display());
        assert!(!node.host.has_link(&node.iface));
    }
    let _ = s;
}

#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn the_plugin_socket_is_refused_while_in_use_and_taken_back_after_a_sigkill() {
    needs_docker("plugin_socket_sigkill");
    let mut lab = common::lab(2);
    let a = lab.host(0);
    let plugin = format!("tnl{}k", lab.id);
    let sock = std::path::Path::new("/run/docker/plugins").join(format!("{plugin}.sock"));
    let hub = lab.serve(&a, "h", 0, &["--docker-driver", &plugin]);
    until("the plugin socket", || sock.exists().then_some(()));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second tunnel may not take a plugin name in use.
    let other = lab.iface("o");
    let other_state = lab.state_dir("o");
    let out = lab.tunnel(
        &lab.host(1),
        &[
            "serve",
            "--iface",
            &other,
            "--state-dir",
            other_state.to_str().unwrap(),
            "--backend",
            "userspace",
            "--docker-driver",
            &plugin,
        ],
    );
    common::failed_with(&out, 2, "already served by another process");
    assert!(
        !lab.host(1).has_link(&other),
        "the refused serve left its link"
    );
    assert!(
        sock.exists(),
        "the refused serve removed the running one's socket"
    );
    // SIGKILL leaves the socket; the next start takes it back, exit removes it.
    lab.proc(hub.proc).kill();
    assert!(sock.exists());
    let again = lab.serve_again(&hub, &["--docker-driver", &plugin]);
    until("the plugin socket again", || {
        std::os::unix::net::UnixStream::connect(&sock)
            .ok()
            .map(|_| ())
    });
    assert!(lab.proc(again).terminate().success());
    assert!(!sock.exists(), "{} left", sock.display());
}

/// A LAN the hub adds is routed into each of `containers` (driver
/// containers, taken back or joined by Docker) while they run, and taken
/// out again with `route del`.
fn a_hub_lan_is_routed_into(lab: &common::Lab, hub: &common::Node, containers: &[&str]) {
    let hub_route = |verb: &str| {
        let mut args = vec!["route", verb, "192.168.79.0/24"];
        let local = hub.local("x");
        args.extend(local.iter().skip(1));
        lab.tunnel_ok(&hub.host, &args);
    };
    let routed = |c: &str| {
        common::docker_ok(&["exec", c, "ip", "route"]).contains("192.168.79.0/24 dev tun")
    };
    hub_route("add");
    until(
        "the hub's new LAN is not routed into the containers",
        || containers.iter().all(|c| routed(c)).then_some(()),
    );
    hub_route("del");
    until("the hub's LAN stays routed into the containers", || {
        containers.iter().all(|c| !routed(c)).then_some(())
    });
}

/// Docker keeps a running container's endpoint across our restart and
/// never asks the driver again, and a container started while the plugin
/// socket is missing fails and stays created: both get their endpoint
/// when `tunnel` starts, without `docker restart`.
#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn driver_containers_get_their_endpoints_back_when_tunnel_starts_again() {
    needs_docker("driver_restart");
    let mut lab = common::lab(2);
    let DriverPair {
        hub,
        site,
        plugin_a,
        plugin_b,
        net_a,
        net_b,
        nets,
    } = driver_pair(&mut lab, "r", &[]);
    let s = site.host.clone();
    let (web, cli, late) = (
        format!("tnl{}rweb", lab.id),
        format!("tnl{}rcli", lab.id),
        format!("tnl{}rlate", lab.id),
    );
    let mut cs = Containers::default();
    web_on(&mut cs, &web, &net_a);
    cs.run_with(&cli, &["--network", &net_b], &["sleep", "3600"]);
    let web_ip = until("web has no endpoint", || {
        let st = lab.status(&hub);
        st.to_string()
            .contains(&format!("\"{web}\""))
            .then(|| container_address(&st, &web))
    });
    let url = format!("http://{web_ip}/");
    let cli_ip = container_address(&lab.status(&site), &cli);
    assert_eq!(common::fetch(&cli, &url).as_deref(), Some("page"));

    // The site stops; meanwhile a container is started on its network,
    // which fails for want of the plugin (Docker gives up after 15 s).
    lab.tunnel_ok(&site.host, &site.local("down"));
    assert!(lab.proc(site.proc).wait(common::UP).success());
    assert!(!has_iface(&cli, "tun0"), "the site's exit left cli's link");
    cs.0.push(late.clone());
    let failed = docker(&[
        "run",
        "-d",
        "--name",
        &late,
        "--network",
        &net_b,
        common::IMAGE,
        "sleep",
        "3600",
    ]);
    assert!(!failed.status.success(), "started without the plugin");
    // The hub is killed meanwhile and comes back.
    lab.proc(hub.proc).kill();
    let hub_again = lab.serve_again(&hub, &["--docker-driver", &plugin_a]);

    let up = lab.spawn(&s, &{
        let mut a = site.local("up");
        a.extend(["--docker-driver", plugin_b.as_str()]);
        a
    });
    lab.proc(up).wait_lines(1, common::UP);
    // cli has its endpoint back, under its name and address, and reaches
    // web (whose endpoint came back on the hub after its SIGKILL).
    until("cli has no tun0 again", || {
        has_iface(&cli, "tun0").then_some(())
    });
    let addrs = common::docker_ok(&["exec", &cli, "ip", "-o", "addr"]);
    assert!(addrs.contains(&format!("{cli_ip}/")), "{addrs}");
    until("cli does not reach web again", || {
        common::fetch(&cli, &url).filter(|p| p == "page")
    });
    // The container whose start failed was started, and reaches web too.
    until("late is not running", || {
        let s = common::docker_ok(&["inspect", "-f", "{{.State.Running}}", &late]);
        (s.trim() == "true").then_some(())
    });
    until("late does not reach web", || {
        common::fetch(&late, &url).filter(|p| p == "page")
    });
    let st = lab.status(&site).to_string();
    assert!(st.contains(&format!("\"{late}\"")), "{st}");
    a_hub_lan_is_routed_into(&lab, &hub, &[&cli, &late]);
    // Removed while both run (Docker asks a missing plugin for 15 s a call).
    drop(cs);
    drop(nets);
    assert!(lab.proc(up).terminate().success());
    assert!(lab.proc(hub_again).terminate().success());
}

/// The hub's namespace as a Docker host of both families: FORWARD drops
/// what no rule accepts, in `iptables` and in `ip6tables` (as Docker 27
/// and an `"ip6tables": true` engine make it), with DOCKER-USER first.
fn a_dual_stack_docker_host(h: &common::Host) {
    h.run(&["sysctl", "-qew", "net.bridge.bridge-nf-call-iptables=0"]);
    h.run(&["sysctl", "-qew", "net.bridge.bridge-nf-call-ip6tables=0"]);
    for tool in ["iptables", "ip6tables"] {
        for args in [
            &["-N", "DOCKER-USER"][..],
            &["-A", "DOCKER-USER", "-j", "RETURN"],
            &["-A", "FORWARD", "-j", "DOCKER-USER"],
            &["-P", "FORWARD", "DROP"],
        ] {
            let mut argv = vec![tool];
            argv.extend_from_slice(args);
            h.run(&argv);
        }
    }
}

/// `docker network create --ipv6` on the driver: containers get the IPv6
/// twin of their address, and reach another site's container over IPv6
/// by address and by name (AAAA), through a hub whose `ip6tables`
/// FORWARD policy is DROP.
#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn driver_networks_with_ipv6_reach_other_sites_over_ipv6_through_a_docker_hub() {
    needs_docker("driver_ipv6");
    let mut lab = common::lab(2);
    let h = lab.host(0);
    a_dual_stack_docker_host(&h);
    let DriverPair {
        hub,
        site,
        net_a,
        net_b,
        nets,
        ..
    } = driver_pair(&mut lab, "6", &["--ipv6"]);
    let (web, cli) = (format!("tnl{}6web", lab.id), format!("tnl{}6cli", lab.id));
    let mut cs = Containers::default();
    web_on(&mut cs, &web, &net_a);
    cs.run_with(
        &cli,
        &["--network", &net_b, "--dns", "10.77.0.1"],
        &["sleep", "3600"],
    );
    let web6 = until("web has no IPv6 endpoint", || {
        let st = lab.status(&hub);
        st.to_string()
            .contains(&format!("\"{web}\""))
            .then(|| common::container_address6(&st, &web))
    });
    // Docker set the twin on tun0.
    let addrs = common::docker_ok(&["exec", &web, "ip", "-o", "-6", "addr", "show", "tun0"]);
    assert!(addrs.contains(&format!("{web6}/64")), "{addrs}");
    let cli6 = common::container_address6(&lab.status(&site), &cli);
    assert!(cli6.contains(':'), "{cli6}");
    // By address, over IPv6, through the hub's DROP policy.
    let url = format!("http://[{web6}]/");
    until("cli does not reach web over IPv6", || {
        common::fetch(&cli, &url).filter(|p| p == "page")
    });
    let chain = h.run(&["ip6tables", "-S", "DOCKER-USER"]);
    assert!(chain.contains(&hub.iface), "{chain}");
    // By name: the hub's DNS answers AAAA, and ping -6 goes over IPv6.
    let out = common::docker_ok(&[
        "exec",
        &cli,
        "nslookup",
        "-type=AAAA",
        &format!("{web}.hq.tunnel"),
        "10.77.0.1",
    ]);
    assert!(out.contains(&web6), "{out}");
    let out = docker(&[
        "exec",
        &cli,
        "ping",
        "-6",
        "-c",
        "1",
        "-W",
        "3",
        &format!("{web}.hq.tunnel"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&web6), "{text}");

    drop(cs);
    drop(nets);
    lab.tunnel_ok(&site.host, &site.local("down"));
    assert!(lab.proc(site.proc).wait(common::UP).success());
    // A SIGKILL leaves our accepts in Docker's IPv6 chain; the next start
    // replaces them (no second copy), and its exit takes them out.
    let ours = |h: &common::Host| {
        h.run(&["ip6tables", "-S", "DOCKER-USER"])
            .lines()
            .filter(|l| l.contains(&hub.iface))
            .count()
    };
    let before = ours(&h);
    assert!(before > 0);
    lab.proc(hub.proc).kill();
    assert_eq!(ours(&h), before, "gone without their owner's exit?");
    let again = lab.serve_again(&hub, &[]);
    // Past one firewall round of the new run (about a second).
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(ours(&h), before, "the restart doubled or dropped them");
    assert!(lab.proc(again).terminate().success());
    let chain = h.run(&["ip6tables", "-S", "DOCKER-USER"]);
    assert!(!chain.contains(&hub.iface), "{chain}");
}
