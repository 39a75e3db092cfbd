//! `make demo-sites`: the setup of the guides in small. A hub and three
//! sites on one namespace "internet"; site C is the gateway of an office
//! LAN (`--route 192.168.50.0/24 --masquerade`), whose host has no route
//! back to the tunnel. Site B and a container attached to site A reach
//! that host, which sees the gateway's address; then everything stops and
//! nothing is left behind: interfaces, nftables tables, forwarding, the
//! journals of host changes. With DEMO_CONTAINERS=0, no Docker.
//!
//! Environment: TUNNEL_BIN (default target/release/tunnel),
//! DEMO_CONTAINERS (default 1), TUNNEL_VERBOSE=1 for debug logs.

use std::time::Duration;
use tunnel_lab::{Containers, Host, Lab, Node, WhoAmI, docker, indent, step, until};

const LAN: &str = "192.168.50";

fn main() {
    let (bin, with_containers) = tunnel_lab::demo_setup("make demo-sites");
    let mut lab = Lab::new(&bin, 4);
    lab.log = tunnel_lab::demo_log();
    let (h, a, b, c) = (lab.host(0), lab.host(1), lab.host(2), lab.host(3));
    step(&format!(
        "a hub ({}) and sites A ({}), B ({}), C ({}) on one bridge",
        h.ip, a.ip, b.ip, c.ip
    ));
    let office = lab.lan(&c, LAN, "198.18.0.0/15");
    let office_url = format!("http://{}:8080/", office.ip);
    let _whoami = WhoAmI::start(&office, format!("{}:8080", office.ip).parse().unwrap());
    step(&format!(
        "an office LAN {LAN}.0/24 behind C; its host {} answers with the address it sees, and has no route to the tunnel",
        office.ip
    ));

    let mut cs = Containers::default();
    let app = format!("tdemo{}app", lab.id);
    let mut extra_a = vec![];
    if with_containers {
        step(&format!("starting container {app} for site A"));
        cs.run(&app, &["sleep", "3600"]);
        extra_a = vec!["--container", &app];
    }

    step("tunnel serve --tokens 3 (the hub)");
    let hub = lab.serve(&h, "h", 3, &["--endpoint", &h.ip]);
    step(&format!(
        "site A: tunnel join <token 1> {}",
        extra_a.join(" ")
    ));
    let site_a = lab.join(&a, "a", &hub.lines[0], &h, &extra_a);
    indent(&site_a.lines[0]);
    step("site B: tunnel join <token 2>");
    let site_b = lab.join(&b, "b", &hub.lines[1], &h, &[]);
    indent(&site_b.lines[0]);
    step(&format!(
        "site C: tunnel join <token 3> --route {LAN}.0/24 --masquerade"
    ));
    let route = format!("{LAN}.0/24");
    let site_c = lab.join(
        &c,
        "c",
        &hub.lines[2],
        &h,
        &["--route", &route, "--masquerade"],
    );
    indent(&site_c.lines[0]);
    step(&format!(
        "on the hub: tunnel route approve <site C> {route} (a site's LAN waits for the hub operator)"
    ));
    indent(&lab.decide_route(&hub, &site_c, "approve", &route));

    step("tunnel status on the hub: C's route");
    indent(&lab.tunnel_ok(&h, &["status", "--state-dir", hub.state.to_str().unwrap()]));
    step("site B's routing table: the office LAN through the tunnel");
    indent(&until("B never learned the route", || {
        let r = b.routes();
        r.contains(LAN).then_some(r)
    }));

    step(&format!("curl {office_url} from site B"));
    let seen = until("B cannot reach the office host", || b.curl(&office_url));
    println!("    the office host saw {seen} (the gateway C)");
    assert_eq!(seen, format!("{LAN}.1"));
    if with_containers {
        step(&format!("wget {office_url} from container {app} on site A"));
        let seen = until("the container cannot reach the office host", || {
            let out = docker(&["exec", &app, "timeout", "5", "wget", "-qO-", &office_url]);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        });
        println!("    the office host saw {seen}");
        assert_eq!(seen, format!("{LAN}.1"));
    }

    stop_all(&mut lab, &[&site_c, &site_b, &site_a, &hub]);
    nothing_left(&[&hub, &site_a, &site_b, &site_c], &c, &office);
    drop(cs);
    drop(lab);
    step("demo finished successfully");
}

/// `tunnel down` for each of `nodes`, in order, and a clean exit.
fn stop_all(lab: &mut Lab, nodes: &[&Node]) {
    step("stopping the sites and the hub (tunnel down)");
    for n in nodes {
        lab.tunnel_ok(&n.host, &n.local("down"));
        let status = lab.proc(n.proc).wait(Duration::from_secs(30));
        assert!(status.success(), "{} exited with {status}", n.iface);
    }
}

/// No interface, nftables table or journal left of `nodes`, and gateway
/// `c` no longer forwards to the office LAN.
fn nothing_left(nodes: &[&Node], c: &Host, office: &Host) {
    step("checking that nothing is left behind");
    for n in nodes {
        assert!(!n.host.has_link(&n.iface), "{} still exists", n.iface);
        assert!(
            !n.host.has_nft_table(&format!("tunnel-{}", n.iface)),
            "table of {} left",
            n.iface
        );
        assert!(
            !n.state.join(format!("{}.host", n.iface)).exists(),
            "journal of {} left",
            n.iface
        );
    }
    let lan_link = c.run(&["ip", "-o", "route", "get", &office.ip]);
    let link = lan_link
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(!c.forwarding(&link), "forwarding left on for {link}");
    println!("    no interface, table, forwarding or journal left; {link} forwards no more");
}
