//! The Docker network driver: `docker run --network <tunnel net>` until
//! the first page fetched across the tunnel, by address and by name via
//! the hub's DNS, against the same on a plain Docker bridge network.

use std::time::{Duration, Instant};

use super::{PAGE, Results, die, info, stop};
use crate::{Containers, Lab, Network, Node, docker, docker_ok, step};

/// `docker run` to the first page, per network: how many runs.
const FIRST_PAGES: usize = 5;

/// The URLs the new containers fetch and the networks they join.
struct Pages {
    /// The site's tunnel network and the bridge.
    nb: String,
    bridge: String,
    url: String,
    by_name: String,
    url_br: String,
}

/// `docker run --rm --network NET [--dns ...] IMAGE wget URL`, once: the
/// time from the call to the page, or None when the one attempt failed.
fn first_page(net: &str, dns: Option<&str>, url: &str) -> Option<u128> {
    let mut args = vec!["run", "--rm", "--network", net];
    if let Some(d) = dns {
        args.extend(["--dns", d]);
    }
    // busybox wget's own -T crashes (Debian's busybox-static 1.35).
    args.extend([crate::IMAGE, "timeout", "5", "wget", "-qO-", url]);
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

pub(super) fn network(lab: &mut Lab, r: &mut Results) {
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
    let web_ip = endpoint_address(lab, &hub, &web, &na);
    let br_ip = docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &web_br,
    ]);
    let pages = Pages {
        url: format!("http://{web_ip}/"),
        by_name: format!("http://{web}.hq.tunnel/"),
        url_br: format!("http://{br_ip}/"),
        nb,
        bridge,
    };
    first_pages(&pages, r);
    drop(cs);
    drop(nets);
    step("stopping tunnel join and serve with the network driver (SIGTERM)");
    stop(lab, &site, r);
    stop(lab, &hub, r);
}

/// The tunnel address the hub gave container `web` on network `net`, as
/// soon as its `status` lists one.
fn endpoint_address(lab: &Lab, hub: &Node, web: &str, net: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = lab.status(hub);
        let found = st.as_array().and_then(|eps| {
            eps.iter()
                .find(|e| e["container"] == web)
                .and_then(|e| e["address"].as_str())
                .map(|a| a.split('/').next().unwrap_or("").to_owned())
        });
        if let Some(ip) = found {
            return ip;
        }
        if Instant::now() > deadline {
            die(&format!("{web} got no endpoint on {net}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`FIRST_PAGES`] new containers per way in: by address, by name, and on
/// the bridge. Each gets one attempt, so a miss is a problem, not a wait.
fn first_pages(p: &Pages, r: &mut Results) {
    let (nb, bridge) = (&p.nb, &p.bridge);
    let (url, by_name, url_br) = (&p.url, &p.by_name, &p.url_br);
    // The page answers before measuring (httpd is up).
    let deadline = Instant::now() + Duration::from_secs(30);
    while first_page(nb, None, url).is_none() || first_page(bridge, None, url_br).is_none() {
        if Instant::now() > deadline {
            die("no page across the tunnel network or the bridge within 30 s");
        }
    }
    step(&format!(
        "docker run --rm --network {nb} ... wget {url} (and by name {by_name}), {FIRST_PAGES} times; the same on bridge {bridge}"
    ));
    for _ in 0..FIRST_PAGES {
        match first_page(nb, None, url) {
            Some(ms) => r.first_page.push(ms),
            None => r.problems.push(format!(
                "a container on {nb} missed {url} on its first attempt"
            )),
        }
        match first_page(nb, Some("10.77.0.1"), by_name) {
            Some(ms) => r.first_page_by_name.push(ms),
            None => r.problems.push(format!(
                "a container on {nb} missed {by_name} on its first attempt"
            )),
        }
        if let Some(ms) = first_page(bridge, None, url_br) {
            r.first_page_bridge.push(ms);
        }
    }
}
