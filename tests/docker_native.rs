//! Docker-native: names across sites (the hub's DNS), the network driver,
//! label-based attach, metrics and health checks, end to end with a real
//! Docker engine and namespace "sites".

mod common;

use common::{Containers, container_address, docker, needs_docker, until};
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
