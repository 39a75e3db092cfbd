//! Two networks on one host: a tunnel whose subnet overlaps what the host
//! has is refused before anything changes; a new hub's default subnet is
//! random, clear of the host's, and kept; a site's requests to its hub
//! leave through its own interface whatever the routing table says;
//! `status --iface` shows one endpoint.

mod common;

use common::needs_root;
use std::net::IpAddr;

/// The subnet of an endpoint in `status --json` (`10.77.0.1/24` -> its network).
fn subnet_of(status: &serde_json::Value, iface: &str) -> ipnetwork::IpNetwork {
    let e = status
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["iface"] == iface)
        .unwrap_or_else(|| panic!("{iface} not in {status}"));
    let a: ipnetwork::IpNetwork = e["address"].as_str().unwrap().parse().unwrap();
    ipnetwork::IpNetwork::new(a.network(), a.prefix()).unwrap()
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_second_tunnel_on_a_subnet_the_host_has_is_refused_and_requests_take_their_own_interface() {
    needs_root("two_networks_on_one_host");
    let mut lab = common::lab(4);
    let (a, b, c, d) = (lab.host(0), lab.host(1), lab.host(2), lab.host(3));
    // Two hubs on the same subnet (what every hub had by default).
    let x = lab.serve(&a, "x", 1, &["--subnet", "10.77.0.0/24"]);
    let y = lab.serve(&c, "y", 1, &["--subnet", "10.77.0.0/24"]);
    let site_x = lab.join(&b, "bx", &x.lines[0], &a, &[]);

    let iface_y = lab.iface("by");
    let state_y = lab.state_dir("by");
    let out = lab.tunnel(
        &b,
        &[
            "join",
            &y.lines[0],
            &c.ip,
            "--iface",
            &iface_y,
            "--state-dir",
            state_y.to_str().unwrap(),
            "--backend",
            "userspace",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "overlaps the address 10.77.0.2/24 on {}",
            site_x.iface
        )) && err.contains("--subnet"),
        "{err}"
    );
    assert!(!b.has_link(&iface_y), "a refused join made its interface");
    assert!(!state_y.join(format!("{iface_y}.json")).exists());
    assert!(b.ping("10.77.0.1"), "the first tunnel suffered");

    // Y's token was not spent: another host joins with it.
    let elsewhere = lab.join(&d, "d", &y.lines[0], &c, &[]);
    assert!(d.ping("10.77.0.1"));
    assert!(lab.proc(elsewhere.proc).terminate().success());
    // A hub on a subnet of its own: the join goes through. Then a route
    // on B sends that hub's address into X's tunnel (a LAN route, a
    // stale rule): a plain connection follows it and gets nowhere ...
    let z = lab.serve(&c, "z", 1, &["--subnet", "10.88.0.0/24", "--port", "51999"]);
    let site_z = lab.join(&b, "bz", &z.lines[0], &c, &[]);
    b.run(&["ip", "route", "add", "10.88.0.1/32", "dev", &site_x.iface]);
    let plain = b.exec(&[
        "timeout",
        "3",
        "bash",
        "-c",
        "exec 3<>/dev/tcp/10.88.0.1/51821",
    ]);
    assert!(
        !plain.status.success(),
        "the captured route reached the hub anyway"
    );
    // ... while the site's own requests leave through its interface:
    // `status --check` asks the hub over the tunnel.
    let check = lab.tunnel(
        &b,
        &[
            "status",
            "--check",
            "--iface",
            &site_z.iface,
            "--state-dir",
            site_z.state.to_str().unwrap(),
        ],
    );
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    b.run(&["ip", "route", "del", "10.88.0.1/32", "dev", &site_x.iface]);
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_new_hub_picks_a_free_random_subnet_and_keeps_it() {
    needs_root("random_default_subnet");
    let mut lab = common::lab(1);
    let a = lab.host(0);
    // The host already has a network in the shared space: the draw keeps
    // clear of it.
    let (i1, i2) = (lab.iface("p"), lab.iface("q"));
    let (s1, s2) = (lab.state_dir("p"), lab.state_dir("q"));
    let serve = |lab: &mut common::Lab, iface: &str, state: &std::path::Path| {
        let p = lab.spawn(
            &a,
            &[
                "serve",
                "--iface",
                iface,
                "--state-dir",
                state.to_str().unwrap(),
                "--backend",
                "userspace",
                "--port",
                "random",
                "--tokens",
                "0",
            ],
        );
        lab.proc(p).wait_log("is up", common::UP);
        p
    };
    let first = serve(&mut lab, &i1, &s1);
    // "is up" comes before the first save: status may not see it yet.
    let status = |lab: &common::Lab, iface: &str, state: &std::path::Path| {
        common::until("the new hub is not in status", || {
            let out = lab.tunnel(
                &a,
                &[
                    "status",
                    "--json",
                    "--iface",
                    iface,
                    "--state-dir",
                    state.to_str().unwrap(),
                ],
            );
            out.status
                .success()
                .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
        })
    };
    let one = status(&lab, &i1, &s1);
    assert_eq!(one.as_array().unwrap().len(), 1, "{one}");
    let n1 = subnet_of(&one, &i1);
    let shared: ipnetwork::IpNetwork = "100.64.0.0/10".parse().unwrap();
    assert!(n1.prefix() == 24 && shared.contains(n1.network()), "{n1}");

    // A second hub on the host: a different /24 (the first one's is taken).
    let second = serve(&mut lab, &i2, &s2);
    let n2 = subnet_of(&status(&lab, &i2, &s2), &i2);
    assert_ne!(n1, n2);
    assert!(!n2.contains(n1.network()) && !n1.contains(n2.network()));

    // Kept across a restart.
    assert!(lab.proc(first).terminate().success());
    let again = serve(&mut lab, &i1, &s1);
    assert_eq!(subnet_of(&status(&lab, &i1, &s1), &i1), n1);
    let IpAddr::V4(net) = n1.network() else {
        panic!("{n1}")
    };
    let hub = std::net::Ipv4Addr::from(u32::from(net) + 1);
    assert!(
        a.ping(&hub.to_string()),
        "the hub's address {hub} does not answer"
    );

    // Bad input: an endpoint that is not there.
    let out = lab.tunnel(
        &a,
        &[
            "status",
            "--iface",
            "nope0",
            "--state-dir",
            s1.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no endpoint named nope0"));
    for p in [second, again] {
        assert!(lab.proc(p).terminate().success());
    }
}
