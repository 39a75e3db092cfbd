//! WireGuard over WebSocket end to end (seed 000): a site whose network
//! passes nothing but an HTTP CONNECT proxy (tinyproxy), and a hub behind
//! a TLS-terminating reverse proxy (nginx).
//!
//! Hosts on the lab's shared link: 0 the hub, 1 the proxy, 2 the site.

mod common;

use common::{Containers, Host, Lab, Node, needs_docker, needs_root};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const WSS_PORT: &str = "8443";

/// Only TCP to the proxy leaves `host` on its uplink; UDP and every other
/// address are dropped (the tunnel's own interface is not restricted).
fn lock_down(host: &Host, proxy: &Host) {
    lock_down_to(host, proxy, 3128);
}

/// The same, with the proxy on `port`.
fn lock_down_to(host: &Host, proxy: &Host, port: u16) {
    let rules = format!(
        "table inet lockdown {{
            chain out {{
                type filter hook output priority 0; policy accept;
                oifname \"{dev}\" ip daddr {proxy} tcp dport {port} accept
                oifname \"{dev}\" drop
            }}
        }}",
        dev = host.dev,
        proxy = proxy.ip
    );
    host.run(&["nft", &rules]);
    assert!(
        !host
            .exec(&["ping", "-c", "1", "-W", "1", "10.231.0.1"])
            .status
            .success(),
        "the lock-down lets traffic through"
    );
}

/// tinyproxy in `host` on :3128, with Basic auth when `auth` is given.
fn tinyproxy(lab: &mut Lab, host: &Host, auth: Option<(&str, &str)>) -> usize {
    let conf = lab.dir.path().join(format!("tinyproxy-{}.conf", lab.id));
    let mut text = format!(
        "Port 3128\nListen {}\nTimeout 600\nAllow 10.231.0.0/24\nConnectPort 443\nConnectPort {WSS_PORT}\nLogLevel Info\nMaxClients 100\n",
        host.ip
    );
    if let Some((u, p)) = auth {
        text.push_str(&format!("BasicAuth {u} {p}\n"));
    }
    std::fs::write(&conf, text).unwrap();
    let p = lab.spawn_cmd(
        host,
        &["tinyproxy", "-d", "-c", conf.to_str().unwrap()],
        &[],
    );
    host.wait_listening("3128", Duration::from_secs(10));
    p
}

/// A CA of one test only, in `DIR/CA.pem`, and a certificate it signed
/// for `ip` in `DIR/NAME.pem` with its key in `DIR/NAME.key`.
fn test_ca(dir: &Path, ca: &str, name: &str, ip: &str) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![ip.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join(format!("{ca}.pem")), ca_cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

/// A file of `mb` random megabytes and its SHA-256.
fn big_file(dir: &Path, name: &str, mb: usize) -> (PathBuf, String) {
    let path = dir.join(name);
    common::sh(&[
        "dd",
        "if=/dev/urandom",
        &format!("of={}", path.display()),
        "bs=1M",
        &format!("count={mb}"),
        "status=none",
    ]);
    let sum = common::sh(&["sha256sum", path.to_str().unwrap()]);
    (path, sum.split_whitespace().next().unwrap().to_owned())
}

/// Serves `dir` on `addr` from `server` (busybox httpd) and fetches
/// `name` from `client`; asserts that the bytes arrive whole.
fn transfer(lab: &mut Lab, server: &Host, client: &Host, addr: &str, name: &str, sum: &str) {
    let dir = lab.dir.path().to_str().unwrap().to_owned();
    let httpd = lab.spawn_cmd(
        server,
        &["busybox", "httpd", "-f", "-p", addr, "-h", &dir],
        &[],
    );
    server.wait_listening(addr.rsplit(':').next().unwrap(), Duration::from_secs(10));
    let out = client.exec(&[
        "sh",
        "-c",
        &format!("timeout 60 busybox wget -qO- http://{addr}/{name} | sha256sum"),
    ]);
    let got = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        got.split_whitespace().next(),
        Some(sum),
        "a 10 MB transfer from {addr} arrived damaged or not at all"
    );
    lab.proc(httpd).terminate();
}

fn hub(lab: &mut Lab, host: &Host, extra: &[&str]) -> Node {
    let mut args = vec!["--transport", "udp,wss", "--wss-listen", "[::]:8443"];
    args.extend_from_slice(extra);
    lab.serve(host, "a", 1, &args)
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_site_behind_an_authenticating_proxy_joins_over_wss_and_survives_a_proxy_restart() {
    needs_root("websocket_through_proxy");
    let mut lab = common::lab(3);
    let (a, p, b) = (lab.host(0), lab.host(1), lab.host(2));
    lock_down(&b, &p);
    let mut proxy = tinyproxy(&mut lab, &p, Some(("alice", "s3cret")));
    let hub = hub(&mut lab, &a, &[]);
    let proxy_url = format!("http://alice:s3cret@{}:3128", p.ip);
    let site = lab.join_env(
        &b,
        "b",
        &hub.lines[0],
        &a,
        &[],
        &[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", "localhost")],
    );
    assert!(
        site.lines[0].contains("over wss via proxy http://alice:***@"),
        "auto ended elsewhere: {:?}",
        site.lines
    );
    // Ping and 10 MB both ways, through the proxy.
    assert!(b.ping("10.77.0.1") && a.ping("10.77.0.2"));
    let (_, sum) = big_file(lab.dir.path(), "big", 10);
    transfer(&mut lab, &a, &b, "10.77.0.1:8080", "big", &sum);
    transfer(&mut lab, &b, &a, "10.77.0.2:8080", "big", &sum);
    // The hub shows the site's transport; the site its path; MTU 1400.
    let st = lab.status(&hub).to_string();
    assert!(st.contains("\"transport\":\"wss\""), "{st}");
    let mtu = b.run(&["cat", &format!("/sys/class/net/{}/mtu", site.iface)]);
    assert_eq!(mtu.trim(), "1400");

    // The proxy restarts: traffic resumes without restarting tunnel.
    assert!(lab.proc(proxy).terminate().code().is_some());
    std::thread::sleep(Duration::from_secs(1));
    proxy = tinyproxy(&mut lab, &p, Some(("alice", "s3cret")));
    let took = b.ping_until("10.77.0.1", Instant::now());
    eprintln!(
        "traffic resumed {} ms after the proxy came back",
        took.as_millis()
    );
    assert!(lab.proc(site.proc).running() && lab.proc(hub.proc).running());

    // `up` after a crash takes the same path.
    lab.proc(site.proc).kill();
    let mut args = site.local("up");
    args.extend(["--backend", "userspace"]);
    let up = lab.spawn(&b, &args);
    let line = lab.proc(up).wait_lines(1, common::UP)[0].clone();
    assert!(line.contains("over wss via proxy"), "{line}");
    b.ping_until("10.77.0.1", Instant::now());
    let _ = proxy;
}

#[test]
#[ignore = "needs root: sudo make test"]
fn explicit_wss_a_wrong_pin_and_a_wrong_path() {
    needs_root("websocket_refusals");
    let mut lab = common::lab(3);
    let (a, p, b) = (lab.host(0), lab.host(1), lab.host(2));
    let hub = hub(&mut lab, &a, &[]);
    tinyproxy(&mut lab, &p, None);

    // Any path but the secret one: a plain 404, never a WebSocket.
    let url = format!("https://{}:{WSS_PORT}/tunnel/guess", a.ip);
    let out = b.exec(&[
        "curl",
        "-sk",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-m",
        "5",
        &url,
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    assert!(
        lab.proc(hub.proc)
            .stderr()
            .contains("which is not the tunnel's path")
    );

    // A token whose pin is not the server's certificate's: refused, rc 2,
    // nothing left behind.
    let mut forged = tunnel::token::Token::decode(&hub.lines[0]).unwrap();
    if let Some(tunnel::transport::WsOffer {
        target: tunnel::transport::WsTarget::Pinned { sha256, .. },
        ..
    }) = forged.websocket.as_mut()
    {
        sha256[0] ^= 0xff;
    } else {
        panic!("the token offers no pinned WebSocket: {forged:?}");
    }
    let iface = lab.iface("x");
    let state = lab.state_dir("x");
    let out = lab.tunnel(
        &b,
        &[
            "join",
            &forged.encode(),
            &a.ip,
            "--iface",
            &iface,
            "--state-dir",
            state.to_str().unwrap(),
            "--transport",
            "wss",
        ],
    );
    common::failed_with(&out, 2, "does not match the token's pin");
    assert!(!b.has_link(&iface));
    assert!(!state.join(format!("{iface}.json")).exists());

    // --transport wss with --proxy (no authentication): the explicit flag.
    let site = lab.join(
        &b,
        "b",
        &hub.lines[0],
        &a,
        &[
            "--transport",
            "wss",
            "--proxy",
            &format!("http://{}:3128", p.ip),
        ],
    );
    // An explicit --proxy is used, although direct would work here.
    assert!(
        site.lines[0].contains("over wss via proxy"),
        "{:?}",
        site.lines
    );
    assert!(b.ping("10.77.0.1"));
    // A bad proxy URL is bad input.
    let out = lab.tunnel(
        &b,
        &[
            "join",
            &hub.lines[0],
            &a.ip,
            "--proxy",
            "socks5://x:1",
            "--iface",
            "wtq",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An nginx `server` block: TLS on `listen` with the test CA's `proxy`
/// certificate (in `dir`), WebSocket on `path` to `upstream`, `extra` in
/// that location; any other path gets a 404.
fn nginx_server(dir: &Path, listen: &str, path: &str, upstream: &str, extra: &str) -> String {
    format!(
        "server {{
           listen {listen} ssl;
           ssl_certificate {dir}/proxy.pem; ssl_certificate_key {dir}/proxy.key;
           location {path} {{
             proxy_pass http://{upstream};
             proxy_http_version 1.1;
             proxy_set_header Upgrade $http_upgrade;
             proxy_set_header Connection \"upgrade\";
             {extra}
             proxy_read_timeout 3600s;
           }}
           location / {{ return 404; }}
         }}",
        dir = dir.display(),
    )
}

/// nginx in `host` with `servers`, its files in `dir`.
fn nginx(lab: &mut Lab, host: &Host, dir: &Path, servers: &[String]) {
    let conf = format!(
        "daemon off; pid {dir}/nginx.pid; error_log {dir}/nginx.err;
         events {{}}
         http {{
           access_log {dir}/nginx.log;
           client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};
           {servers}
         }}",
        dir = dir.display(),
        servers = servers.join("\n"),
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    lab.spawn_cmd(
        host,
        &["nginx", "-c", dir.join("nginx.conf").to_str().unwrap()],
        &[],
    );
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_hub_behind_a_tls_terminating_reverse_proxy_with_a_path_rule() {
    needs_root("websocket_reverse_proxy");
    let mut lab = common::lab(3);
    let (a, p, b) = (lab.host(0), lab.host(1), lab.host(2));
    // A CA for this test only, and nginx's certificate for the proxy's address.
    let dir = lab.dir.path().to_owned();
    test_ca(&dir, "ca", "proxy", &p.ip);

    // The hub speaks plain WebSocket; the proxy adds TLS.
    let public = format!("wss://{}/vpn", p.ip);
    let hub = lab.serve(
        &a,
        "a",
        1,
        &[
            "--transport",
            "udp,ws",
            "--wss-listen",
            "[::]:8080",
            "--public-url",
            &public,
        ],
    );
    let token = tunnel::token::Token::decode(&hub.lines[0]).unwrap();
    let offer = token.websocket.clone().expect("a WebSocket offer");
    assert!(offer.path.starts_with("/vpn/"), "{offer:?}");
    let server = nginx_server(
        &dir,
        &format!("{}:443", p.ip),
        &offer.path,
        &format!("{}:8080", a.ip),
        "",
    );
    nginx(&mut lab, &p, &dir, &[server]);
    p.wait_listening("443", Duration::from_secs(10));

    let ca = dir.join("ca.pem");
    let site = lab.join_env(
        &b,
        "b",
        &hub.lines[0],
        &a,
        &["--transport", "wss"],
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    );
    assert!(
        site.lines[0].contains("over wss direct"),
        "{:?}",
        site.lines
    );
    assert!(b.ping("10.77.0.1"));
    let (_, sum) = big_file(&dir, "big", 10);
    transfer(&mut lab, &a, &b, "10.77.0.1:8081", "big", &sum);
    // Without the test CA the proxy's certificate is refused.
    let iface = lab.iface("y");
    let out = lab.tunnel(
        &lab.host(1),
        &[
            "join",
            &hub.lines[0],
            &a.ip,
            "--transport",
            "wss",
            "--iface",
            &iface,
            "--state-dir",
            dir.join("y").to_str().unwrap(),
            "--timeout",
            "5s",
        ],
    );
    assert_ne!(out.status.code(), Some(0));
}

#[test]
#[ignore = "needs root and Docker: sudo make test"]
fn a_container_on_a_proxy_only_site_reaches_the_hubs_container() {
    needs_docker("websocket_container");
    let mut lab = common::lab(3);
    let (a, p, b) = (lab.host(0), lab.host(1), lab.host(2));
    lock_down(&b, &p);
    tinyproxy(&mut lab, &p, None);
    let (web, cli) = (format!("tnl{}web", lab.id), format!("tnl{}cli", lab.id));
    let page = format!("page-{}", lab.id);
    let mut cs = Containers::default();
    cs.web(&web, &page);
    cs.run(&cli, &["sleep", "3600"]);
    let hub = hub(&mut lab, &a, &["--container", &web]);
    let proxy = format!("http://{}:3128", p.ip);
    let site = lab.join_env(
        &b,
        "b",
        &hub.lines[0],
        &a,
        &["--container", &cli],
        &[("https_proxy", &proxy)],
    );
    assert!(
        site.lines[0].contains("over wss via proxy"),
        "{:?}",
        site.lines
    );
    let web_ip = common::container_address(&lab.status(&hub), &web);
    let url = format!("http://{web_ip}/");
    let deadline = Instant::now() + common::UP;
    while common::fetch(&cli, &url).as_deref() != Some(page.as_str()) {
        assert!(
            Instant::now() < deadline,
            "{cli} cannot fetch {url}: {}",
            lab.proc(site.proc).stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its interface has the WebSocket MTU too.
    let links = common::docker_ok(&["exec", &cli, "ip", "-o", "link"]);
    assert!(links.contains("mtu 1400"), "{links}");
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_hub_on_websocket_only_binds_no_udp_port_and_says_what_it_listens_on() {
    needs_root("wss_only_hub");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let hub = lab.serve(
        &a,
        "a",
        1,
        &["--transport", "wss", "--wss-listen", "[::]:8443"],
    );
    // No UDP socket outside the tunnel: the hub's own addresses in it
    // (DNS, the route pokes) are all there is.
    let udp = a.run(&["ss", "-Hulnp"]);
    let outside: Vec<&str> = udp
        .lines()
        .filter(|l| {
            // `ADDR%DEVICE:PORT` for a socket bound to the tunnel device.
            let local = l.split_whitespace().nth(3).unwrap_or("");
            let host = local.rsplit_once(':').map_or(local, |(h, _)| h);
            let host = host.split('%').next().unwrap_or(host);
            !(host == "10.77.0.1" || host.starts_with("[fd"))
        })
        .collect();
    assert!(
        outside.is_empty(),
        "UDP sockets outside the tunnel: {outside:?}"
    );
    assert!(!udp.contains(":51820"), "{udp}");

    // Sites still join and reach it, over the WebSocket.
    let site = lab.join(&b, "b", &hub.lines[0], &a, &[]);
    assert!(site.lines[0].contains("over wss"), "{:?}", site.lines);
    assert!(b.ping("10.77.0.1"));

    let status = lab.status(&hub);
    assert_eq!(
        status[0]["listen_port"],
        serde_json::Value::Null,
        "{status}"
    );
    assert_eq!(
        status[0]["listening"],
        serde_json::json!(["WebSocket with TLS (wss) on TCP [::]:8443"]),
        "{status}"
    );
    let text = lab.tunnel_ok(&a, &hub.local("status"));
    assert!(
        text.contains("listens on: WebSocket with TLS (wss) on TCP [::]:8443")
            && !text.contains("listen port"),
        "{text}"
    );
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_site_joins_through_an_https_proxy_with_its_ca_and_a_refusal_is_one_clear_line() {
    needs_root("websocket_https_proxy");
    let mut lab = common::lab(3);
    let (a, p, b) = (lab.host(0), lab.host(1), lab.host(2));
    // The proxy speaks TLS itself: tinyproxy behind stunnel on :3129, with
    // a certificate from a CA of this test only.
    let dir = lab.dir.path().to_owned();
    test_ca(&dir, "proxy-ca", "tls-proxy", &p.ip);
    let ca_file = dir.join("proxy-ca.pem");
    let _tinyproxy = tinyproxy(&mut lab, &p, Some(("alice", "s3cret")));
    let conf = format!(
        "foreground = yes\npid =\n[proxy]\naccept = {ip}:3129\nconnect = {ip}:3128\ncert = {d}/tls-proxy.pem\nkey = {d}/tls-proxy.key\n",
        ip = p.ip,
        d = dir.display()
    );
    std::fs::write(dir.join("stunnel.conf"), conf).unwrap();
    let _stunnel = lab.spawn_cmd(
        &p,
        &["stunnel4", dir.join("stunnel.conf").to_str().unwrap()],
        &[],
    );
    p.wait_listening("3129", Duration::from_secs(10));
    lock_down_to(&b, &p, 3129);
    let hub = hub(&mut lab, &a, &[]);
    let url = |creds: &str| format!("https://{creds}{}:3129", p.ip);
    let ca = ca_file.to_str().unwrap();

    // Bad input: a CA file that is not there.
    let attempt = |lab: &mut Lab, tag: &str, extra: &[&str]| {
        let mut args = vec!["--transport", "wss", "--timeout", "6s"];
        args.extend_from_slice(extra);
        let out = lab.join_output(&b, tag, &hub.lines[0], &a.ip, &args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = attempt(
        &mut lab,
        "x1",
        &["--proxy", &url(""), "--proxy-ca", "/nonexistent.pem"],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--proxy-ca /nonexistent.pem"), "{err}");
    // Without the proxy's CA: its certificate is not trusted.
    let (code, err) = attempt(&mut lab, "x2", &["--proxy", &url("")]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("https://") && err.contains("--proxy-ca"),
        "{err}"
    );
    // With it, but no login: the proxy's 407, said as such.
    let (code, err) = attempt(&mut lab, "x3", &["--proxy", &url(""), "--proxy-ca", ca]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains(&format!("the proxy https://{}:3129 refused CONNECT", p.ip))
            && err.contains("407")
            && err.contains("wants a login"),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );

    // With the CA and the login: joined, through TLS to the proxy.
    let site = lab.join(
        &b,
        "b",
        &hub.lines[0],
        &a,
        &[
            "--transport",
            "wss",
            "--proxy",
            &url("alice:s3cret@"),
            "--proxy-ca",
            ca,
        ],
    );
    assert!(
        site.lines[0].contains("over wss via proxy https://alice:***@"),
        "{:?}",
        site.lines
    );
    assert!(b.ping("10.77.0.1"));

    // `up` after a crash finds the proxy and its CA in the saved state.
    lab.proc(site.proc).kill();
    let up = lab.spawn(&b, &site.local("up"));
    let line = lab.proc(up).wait_lines(1, common::UP)[0].clone();
    assert!(line.contains("over wss via proxy https://"), "{line}");
    b.ping_until("10.77.0.1", Instant::now());
    assert!(lab.proc(up).terminate().success());
}

/// Transparent mode on WebSocket: the hub's own address goes through the
/// tunnel (the hub's firewall lets a WebSocket site reach the uplink its
/// connection comes in on), and with `--snat-public` the server sees the
/// address that connection came from. The site's direct TCP to the web
/// port is dropped, so an answer proves the tunnel carried it.
#[test]
#[ignore = "needs root: sudo make test"]
fn a_websocket_site_in_transparent_mode_and_with_snat_public() {
    needs_root("wss_snat_public");
    let mut lab = common::lab(3);
    let (a, b) = (lab.host(0), lab.host(2));
    let _whoami = common::WhoAmI::start(&a, format!("{}:8080", a.ip).parse().unwrap());
    let hub = lab.serve(
        &a,
        "a",
        2,
        &["--transport", "udp,wss", "--wss-listen", "[::]:8443"],
    );
    let public = format!("http://{}:8080/", a.ip);
    b.run(&[
        "iptables", "-A", "OUTPUT", "-o", &b.dev, "-p", "tcp", "--dport", "8080", "-j", "DROP",
    ]);
    let site = lab.join(
        &b,
        "b",
        &hub.lines[0],
        &a,
        &["--transport", "wss", "--transparent"],
    );
    let tunnel_ip = common::site_address(&site);
    let seen = common::until("the transparent site does not get through", || {
        b.curl(&public)
    });
    assert_eq!(seen, tunnel_ip);
    lab.tunnel_ok(&b, &site.local("down"));
    assert!(lab.proc(site.proc).wait(common::UP).success());

    let snat = lab.join(
        &b,
        "c",
        &hub.lines[1],
        &a,
        &["--transport", "wss", "--transparent", "--snat-public"],
    );
    // The SNAT rule follows the join within the hub's next firewall round.
    common::until("the server does not see the site's public address", || {
        b.curl(&public).filter(|seen| *seen == b.ip)
    });
    lab.tunnel_ok(&b, &snat.local("down"));
    assert!(lab.proc(snat.proc).wait(common::UP).success());
}

/// nginx on the hub's host `a`, TLS with the test CA's `proxy`
/// certificate, to the hub's plain listener on 127.0.0.1:8090 for `path`:
/// port 9443 says whom it forwards for; 9444 says nothing.
fn local_reverse_proxy(lab: &mut Lab, a: &Host, dir: &Path, path: &str) {
    let forwarded = "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;";
    let servers = [
        nginx_server(
            dir,
            &format!("{}:9443", a.ip),
            path,
            "127.0.0.1:8090",
            forwarded,
        ),
        nginx_server(dir, &format!("{}:9444", a.ip), path, "127.0.0.1:8090", ""),
    ];
    nginx(lab, a, dir, &servers);
}

/// Behind a TLS-terminating reverse proxy on the hub's own host, the
/// site's address is the one the proxy says it forwards for
/// (X-Forwarded-For); a proxy that says nothing gets a warning instead.
#[test]
#[ignore = "needs root: sudo make test"]
fn snat_public_behind_a_reverse_proxy_on_the_hubs_host_takes_its_forwarded_for() {
    needs_root("wss_snat_forwarded");
    let mut lab = common::lab(3);
    let (a, b) = (lab.host(0), lab.host(2));
    let dir = lab.dir.path().to_owned();
    test_ca(&dir, "ca", "proxy", &a.ip);
    let _whoami = common::WhoAmI::start(&a, format!("{}:8080", a.ip).parse().unwrap());
    let hub = lab.serve(
        &a,
        "a",
        2,
        &[
            "--transport",
            "udp,ws",
            "--wss-listen",
            "127.0.0.1:8090",
            "--public-url",
            &format!("wss://{}:9443/vpn", a.ip),
        ],
    );
    let offer = tunnel::token::Token::decode(&hub.lines[0])
        .unwrap()
        .websocket
        .expect("a WebSocket offer");
    local_reverse_proxy(&mut lab, &a, &dir, &offer.path);
    a.wait_listening("9443", Duration::from_secs(10));
    let public = format!("http://{}:8080/", a.ip);
    b.run(&[
        "iptables", "-A", "OUTPUT", "-o", &b.dev, "-p", "tcp", "--dport", "8080", "-j", "DROP",
    ]);
    let ca = dir.join("ca.pem");
    let env = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    let site = lab.join_env(
        &b,
        "b",
        &hub.lines[0],
        &a,
        &["--transport", "wss", "--transparent", "--snat-public"],
        &env,
    );
    common::until("the server does not see the address forwarded for", || {
        b.curl(&public).filter(|seen| *seen == b.ip)
    });
    lab.tunnel_ok(&b, &site.local("down"));
    assert!(lab.proc(site.proc).wait(common::UP).success());

    // Through the port that says nothing: the hub says why it cannot.
    let mut token = tunnel::token::Token::decode(&hub.lines[1]).unwrap();
    let Some(tunnel::reach::WsOffer {
        target: tunnel::reach::WsTarget::Url { base },
        ..
    }) = token.websocket.as_mut()
    else {
        panic!("{:?}", token.websocket)
    };
    *base = base.replace(":9443", ":9444");
    let quiet = lab.join_env(
        &b,
        "c",
        &token.encode(),
        &a,
        &["--transport", "wss", "--transparent", "--snat-public"],
        &env,
    );
    lab.proc(hub.proc)
        .wait_log("does not say whom for", common::UP);
    lab.tunnel_ok(&b, &quiet.local("down"));
    assert!(lab.proc(quiet.proc).wait(common::UP).success());
}

/// `--proxy-pac FILE`: a site whose network passes only the proxy joins
/// through the one the PAC file picks for the hub's URL (its SOCKS entry
/// skipped); a PAC file that is not there is bad input.
#[test]
#[ignore = "needs root: sudo make test"]
fn a_site_joins_through_the_proxy_its_pac_file_picks() {
    needs_root("websocket_pac");
    let mut lab = common::lab(3);
    let (a, p, b) = (lab.host(0), lab.host(1), lab.host(2));
    lock_down(&b, &p);
    let _proxy = tinyproxy(&mut lab, &p, None);
    let hub = hub(&mut lab, &a, &[]);
    let dir = lab.dir.path().to_owned();
    let missing = dir.join("none.pac");
    let out = lab.join_output(
        &b,
        "x",
        &hub.lines[0],
        &a.ip,
        &["--proxy-pac", missing.to_str().unwrap()],
    );
    common::failed_with(&out, 2, "none.pac");
    let pac = dir.join("proxy.pac");
    std::fs::write(
        &pac,
        format!(
            r#"function FindProxyForURL(url, host) {{
                 if (url.substring(0, 4) == "wss:" && host == "{hub}")
                     return "SOCKS5 {proxy}:1080; PROXY {proxy}:3128; DIRECT";
                 return "DIRECT";
               }}"#,
            hub = a.ip,
            proxy = p.ip
        ),
    )
    .unwrap();
    let site = lab.join(
        &b,
        "b",
        &hub.lines[0],
        &a,
        &["--proxy-pac", pac.to_str().unwrap()],
    );
    assert!(
        site.lines[0].contains(&format!("over wss via proxy http://{}:3128", p.ip)),
        "{:?}",
        site.lines
    );
    assert!(b.ping("10.77.0.1"));
}

/// squid in `host` on :3128 taking NTLM only (its test helper
/// `ntlm_fake_auth`, which accepts any well-formed NTLM login: what is
/// tested is the handshake, not a password check). Basic is refused.
fn squid_ntlm(lab: &mut Lab, host: &Host) -> usize {
    let conf = lab.dir.path().join(format!("squid-{}.conf", lab.id));
    let text = format!(
        "http_port {ip}:3128
auth_param ntlm program /usr/lib/squid/ntlm_fake_auth
auth_param ntlm children 2
acl authed proxy_auth REQUIRED
http_access allow authed
http_access deny all
cache deny all
pid_filename none
cache_log /dev/null
access_log none
shutdown_lifetime 1 seconds
",
        ip = host.ip
    );
    std::fs::write(&conf, text).unwrap();
    let p = lab.spawn_cmd(host, &["squid", "-N", "-f", conf.to_str().unwrap()], &[]);
    host.wait_listening("3128", Duration::from_secs(20));
    p
}

/// A proxy that takes NTLM only: the site answers its challenge with the
/// user and password of the proxy URL (DOMAIN\user), on one connection.
#[test]
#[ignore = "needs root: sudo make test"]
fn a_site_joins_through_a_proxy_that_takes_ntlm_only() {
    needs_root("websocket_ntlm");
    let mut lab = common::lab(3);
    let (a, p, b) = (lab.host(0), lab.host(1), lab.host(2));
    lock_down(&b, &p);
    let _proxy = squid_ntlm(&mut lab, &p);
    let hub = hub(&mut lab, &a, &[]);
    let url = format!("http://CORP%5Calice:s3cret@{}:3128", p.ip);
    let site = lab.join(
        &b,
        "b",
        &hub.lines[0],
        &a,
        &["--transport", "wss", "--proxy", &url],
    );
    assert!(
        site.lines[0].contains("over wss via proxy http://CORP%5Calice:***@"),
        "{:?}",
        site.lines
    );
    assert!(b.ping("10.77.0.1"));
}
