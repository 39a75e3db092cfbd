//! [`NatLab`]: an "internet" with a hub on it and sites behind NAT routers
//! of known kinds, for end-to-end tests of the mesh's NAT traversal. Every
//! part is a namespace of one [`Lab`], so all of it goes when the lab drops,
//! also when a test panics; nothing is made in the root namespace.
//!
//! ```text
//!                  hub 198.18.0.1          (a delay line if asked for)
//!                        |
//!   internet: a bridge in a namespace of its own, 198.18.0.0/24
//!        |                       |                        |
//!   router 198.18.0.2      router 198.18.0.3       carrier 198.18.0.4
//!   Nat::FullCone          Nat::Masquerade         Nat::Masquerade
//!        | 192.168.1.0/24        | 192.168.2.0/24         | 100.64.3.0/24
//!   site 192.168.1.2       site .2, site .3        home router 100.64.3.2
//!                                                  Nat::Masquerade
//!                                                         | 192.168.4.0/24
//!                                                  site 192.168.4.2
//! ```
//!
//! The internet is one flat /24 in 198.18.0.0/15 (RFC 2544's benchmark
//! range, never a real address): the hub and the routers need no routes.
//! Each router owns a bridge for its LAN, `PREFIX.1` on it; its hosts
//! (sites, or a home router behind a carrier) are veths on that bridge
//! with a default route via `PREFIX.1`. The router forwards and translates
//! on its WAN link with nftables (an `ip nat` table in its namespace), so
//! conntrack does the NAT as a home router's does.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::delay::DelayLine;
use crate::{Host, Lab, LinkCounters, nft, sh};

/// The internet's /24; the hub is `.1`, routers `.2` on.
const INTERNET: &str = "198.18.0";

/// How a router translates what its LAN sends to the internet (the kinds
/// of RFC 4787: mapping, and filtering of what comes back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// Endpoint-independent mapping (a LAN port keeps its public port for
    /// every destination), address-and-port-dependent filtering (only the
    /// destinations sent to get in): nft `masquerade`, as most home routers.
    Masquerade,
    /// Endpoint-independent mapping and filtering ("full cone"): once a LAN
    /// host has sent from a port, anyone may send to its public port.
    FullCone,
    /// Address-and-port-dependent mapping: a new public port for each
    /// destination (`masquerade random,fully-random`), so the port the hub
    /// sees is of no use to another peer.
    Symmetric,
}

/// A router: a namespace that forwards between its WAN link and a LAN
/// behind it, translating with its [`Nat`].
#[derive(Clone, Debug)]
pub struct Router {
    pub ns: String,
    pub nat: Nat,
    /// Its address on its WAN link (the internet, or its carrier's LAN).
    pub wan: String,
    pub wan_dev: String,
    /// The address its sites appear from on the internet: `wan`, or for a
    /// router behind a carrier the carrier's.
    pub public: String,
    /// Its LAN is `PREFIX.0/24`, the router `PREFIX.1`.
    pub lan_prefix: String,
    /// The router it sits behind (the carrier of a double NAT).
    pub upstream: Option<Box<Router>>,
    /// Its LAN's index in `NatLab::links`.
    link: usize,
}

/// A link that hosts join through a bridge: the internet, or a LAN.
struct Link {
    /// The namespace that holds the bridge.
    ns: String,
    bridge: String,
    prefix: String,
    /// The next host number on it.
    next: u8,
}

/// An internet with a hub, routers and sites; all removed when it drops.
pub struct NatLab {
    /// Declared first so that it drops first: its TAPs keep the hub's and
    /// the internet's namespaces alive until its threads end.
    delay: Option<DelayLine>,
    /// The namespaces and processes; spawn `tunnel` with it as usual.
    pub lab: Lab,
    /// The hub, at 198.18.0.1 on the internet, reachable by every site.
    pub hub: Host,
    /// The namespace of the internet's bridge, where [`NatLab::block`] drops.
    pub internet: String,
    /// The internet first, then each router's LAN.
    links: Vec<Link>,
    veths: usize,
    sites: usize,
    blocks: AtomicU32,
}

impl NatLab {
    /// The internet and the hub on it, `bin` being the `tunnel` binary that
    /// `lab` runs. With `hub_delay` = `Some(d)` the hub's link is a delay
    /// line (two TAPs and threads, see `delay.rs`: no netem needed) that
    /// holds each frame for `d` each way: a round trip to the hub gains 2d;
    /// traffic between routers does not pass it and is not delayed.
    /// Without, the hub's link is a veth like every other.
    pub fn new(bin: impl Into<PathBuf>, hub_delay: Option<Duration>) -> NatLab {
        let mut lab = Lab::new(bin, 0);
        let internet = lab.namespace("net");
        let hub_ns = lab.namespace("hub");
        let bridge = name(&lab.id, "br", 0);
        ip(&internet, &["link", "add", &bridge, "type", "bridge"]);
        quiet(&internet, &bridge);
        ip(&internet, &["link", "set", &bridge, "up"]);
        let mut net = NatLab {
            delay: None,
            lab,
            hub: Host {
                ns: hub_ns.clone(),
                ip: String::new(),
                dev: String::new(),
            },
            internet: internet.clone(),
            links: vec![Link {
                ns: internet.clone(),
                bridge,
                prefix: INTERNET.to_owned(),
                next: 1,
            }],
            veths: 0,
            sites: 0,
            blocks: AtomicU32::new(0),
        };
        net.hub = match hub_delay {
            None => net.plug(0, &hub_ns),
            Some(d) => {
                let (dev, port) = net.names();
                net.delay = Some(DelayLine::new(&hub_ns, &dev, &internet, &port, d));
                net.attach(0, &hub_ns, dev, &port)
            }
        };
        net
    }

    /// A router on the internet (198.18.0.N) translating with `nat`, with
    /// an empty LAN 192.168.K.0/24 behind it.
    pub fn router(&mut self, nat: Nat) -> Router {
        self.add_router(nat, None, "192.168")
    }

    /// A router on `upstream`'s LAN translating with `nat`, with a LAN
    /// 192.168.K.0/24 of its own: two NATs in a row.
    pub fn router_behind(&mut self, upstream: &Router, nat: Nat) -> Router {
        self.add_router(nat, Some(upstream), "192.168")
    }

    /// A new site on `router`'s LAN (192.168.K.M, default route via the
    /// router). Sites behind one router share its LAN and reach each other
    /// directly by their LAN addresses.
    pub fn site_behind(&mut self, router: &Router) -> Host {
        let ns = self.lab.namespace(&format!("s{}", self.sites));
        self.sites += 1;
        let site = self.plug(router.link, &ns);
        let gateway = format!("{}.1", router.lan_prefix);
        ip(&ns, &["route", "add", "default", "via", &gateway]);
        site
    }

    /// A new router with `nat`, and one site behind it.
    pub fn site(&mut self, nat: Nat) -> (Router, Host) {
        let router = self.router(nat);
        let site = self.site_behind(&router);
        (router, site)
    }

    /// A double NAT, as behind a carrier-grade NAT: a carrier that
    /// masquerades on the internet with a LAN in 100.64.K.0/24, a home
    /// router on it that masquerades too, and one site behind that. The
    /// router returned is the home router (`upstream` is the carrier, and
    /// `public` the carrier's address).
    pub fn double_nat(&mut self) -> (Router, Host) {
        let carrier = self.add_router(Nat::Masquerade, None, "100.64");
        let home = self.router_behind(&carrier, Nat::Masquerade);
        let site = self.site_behind(&home);
        (home, site)
    }

    /// Drops all traffic between the public addresses of `a` and `b` on the
    /// internet's bridge until the guard drops (or [`Blocked::unblock`]);
    /// what either exchanges with the hub, or anyone else, still passes.
    pub fn block(&self, a: &Router, b: &Router) -> Blocked {
        assert_ne!(a.public, b.public, "{} and {} share an address", a.ns, b.ns);
        let table = format!("block{}", self.blocks.fetch_add(1, Ordering::SeqCst));
        // A bridge-family table of the internet's namespace: it sees the
        // frames between the routers' ports, which no router's rules do.
        nft(
            &self.internet,
            &format!(
                "table bridge {table} {{\n\
                 chain forward {{\n\
                 type filter hook forward priority filter; policy accept;\n\
                 ip saddr {a} ip daddr {b} drop\n\
                 ip saddr {b} ip daddr {a} drop\n\
                 }}\n\
                 }}\n",
                a = a.public,
                b = b.public,
            ),
        );
        Blocked {
            ns: self.internet.clone(),
            table,
        }
    }

    /// What went through the hub's link to the internet, read in the hub's
    /// namespace (rx: what the hub received).
    pub fn hub_link(&self) -> LinkCounters {
        self.hub.link_counters(&self.hub.dev)
    }

    fn add_router(&mut self, nat: Nat, upstream: Option<&Router>, base: &str) -> Router {
        let k = self.links.len();
        let ns = self.lab.namespace(&format!("r{k}"));
        // add_ns turns forwarding off, as on a plain host; a router forwards.
        sysctl(&ns, "net.ipv4.ip_forward=1");
        let wan = self.plug(upstream.map_or(0, |u| u.link), &ns);
        if let Some(u) = upstream {
            // The internet is only reachable through the carrier.
            let gateway = format!("{}.1", u.lan_prefix);
            ip(&ns, &["route", "add", "default", "via", &gateway]);
        }
        let prefix = format!("{base}.{k}");
        let bridge = name(&self.lab.id, "br", k);
        ip(&ns, &["link", "add", &bridge, "type", "bridge"]);
        quiet(&ns, &bridge);
        let addr = format!("{prefix}.1/24");
        ip(&ns, &["addr", "add", &addr, "dev", &bridge]);
        ip(&ns, &["link", "set", &bridge, "up"]);
        nft(&ns, &ruleset(nat, &wan.dev, &wan.ip));
        self.links.push(Link {
            ns: ns.clone(),
            bridge,
            prefix: prefix.clone(),
            next: 2,
        });
        Router {
            ns,
            nat,
            public: upstream.map_or_else(|| wan.ip.clone(), |u| u.public.clone()),
            wan: wan.ip,
            wan_dev: wan.dev,
            lan_prefix: prefix,
            upstream: upstream.map(|u| Box::new(u.clone())),
            link: k,
        }
    }

    /// Puts namespace `ns` on link `link` with its next address, through
    /// a veth whose other end is a port of the link's bridge.
    fn plug(&mut self, link: usize, ns: &str) -> Host {
        let (dev, port) = self.names();
        // Made in the namespaces themselves: the names never exist in the
        // root namespace, where another lab might be making its own.
        let l = &self.links[link].ns;
        let args = [
            "link", "add", &port, "type", "veth", "peer", "name", &dev, "netns", ns,
        ];
        ip(l, &args);
        self.attach(link, ns, dev, &port)
    }

    /// Names for the two ends of a new link: (the host's, the bridge's).
    fn names(&mut self) -> (String, String) {
        let n = self.veths;
        self.veths += 1;
        (name(&self.lab.id, "v", n), name(&self.lab.id, "p", n))
    }

    /// Puts `port` on `link`'s bridge and gives `dev`, in `ns`, the link's
    /// next address: the two ends of a link that exists.
    fn attach(&mut self, link: usize, ns: &str, dev: String, port: &str) -> Host {
        let l = &mut self.links[link];
        assert!(l.next < 255, "no address left on {}.0/24", l.prefix);
        let addr = format!("{}.{}", l.prefix, l.next);
        l.next += 1;
        quiet(&l.ns, port);
        quiet(ns, &dev);
        ip(&l.ns, &["link", "set", port, "master", &l.bridge, "up"]);
        ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", &dev]);
        ip(ns, &["link", "set", &dev, "up"]);
        Host {
            ns: ns.to_owned(),
            ip: addr,
            dev,
        }
    }
}

/// Traffic between two routers is dropped while this lives.
#[must_use = "the block lasts as long as the guard"]
pub struct Blocked {
    ns: String,
    table: String,
}

impl Blocked {
    /// Lets the traffic through again (as dropping the guard does).
    pub fn unblock(self) {}
}

impl Drop for Blocked {
    fn drop(&mut self) {
        // Quietly: the lab, and the table with it, may be gone already.
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "delete", "table"])
            .args(["bridge", &self.table])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `ip -n NS ARGS`, panicking if it fails.
fn ip(ns: &str, args: &[&str]) {
    let argv: Vec<&str> = ["ip", "-n", ns].iter().chain(args).copied().collect();
    sh(&argv);
}

/// Turns IPv6 off on link `dev` (before it is up): the lab is IPv4, and
/// the neighbour discovery and MLD chatter of each link would otherwise be
/// flooded to the hub and counted in [`NatLab::hub_link`]. Links made later
/// (the WireGuard interfaces) keep IPv6.
fn quiet(ns: &str, dev: &str) {
    sysctl(ns, &format!("net.ipv6.conf.{dev}.disable_ipv6=1"));
}

fn sysctl(ns: &str, setting: &str) {
    sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", setting]);
}

/// An interface name unique to the lab, within Linux's 15 bytes.
fn name(id: &str, kind: &str, n: usize) -> String {
    let name = format!("n{id}{kind}{n}");
    assert!(name.len() <= 15, "{name} is too long for an interface");
    name
}

/// The nftables rules of a router translating on `wan_dev` (`wan` its
/// address there). Conntrack applies a NAT decision to every later packet
/// of a flow, both ways; the nat chains only see a flow's first packet.
fn ruleset(nat: Nat, wan_dev: &str, wan: &str) -> String {
    let out = match nat {
        Nat::Masquerade => "masquerade".to_owned(),
        // A random port for each new flow, so each destination gets its own.
        Nat::Symmetric => "masquerade random,fully-random".to_owned(),
        // Linux keeps the source port where it can, so a LAN port maps to
        // the same public port for every destination.
        Nat::FullCone => format!("snat ip to {wan}"),
    };
    let mut rules = format!(
        "table ip nat {{\n\
         chain post {{\n\
         type nat hook postrouting priority srcnat; policy accept;\n\
         oifname \"{wan_dev}\" {out}\n\
         }}\n"
    );
    if nat == Nat::FullCone {
        // The cone: a map from each public UDP port in use to the LAN
        // address and port it stands for, learnt after the SNAT (so from
        // the port actually used) of everything sent out. A packet that
        // starts a new flow on the WAN side (no conntrack entry maps it, or
        // it would not reach the nat chain) goes to whoever has that port,
        // from whatever address it comes.
        rules.push_str(&format!(
            "map cone {{\n\
             type inet_service : ipv4_addr . inet_service\n\
             flags dynamic,timeout\n\
             timeout 5m\n\
             }}\n\
             chain learn {{\n\
             type filter hook postrouting priority srcnat + 10; policy accept;\n\
             oifname \"{wan_dev}\" meta l4proto udp \
             update @cone {{ udp sport : ct original ip saddr . ct original proto-src }}\n\
             }}\n\
             chain pre {{\n\
             type nat hook prerouting priority dstnat; policy accept;\n\
             iifname \"{wan_dev}\" ip daddr {wan} meta l4proto udp dnat ip to udp dport map @cone\n\
             }}\n"
        ));
    }
    rules.push_str("}\n");
    // A home router's firewall: nothing new from the WAN reaches the router
    // itself. Besides being what routers do, it matters for hole punching:
    // a peer's first probe, arriving before this side sent its own, would
    // otherwise leave a conntrack entry (confirmed on delivery to the
    // router's own input) that takes the very tuple this side's NAT needs
    // for its mapping, and push that mapping to another port. Dropped in the
    // input hook, the entry is never confirmed.
    rules.push_str(&format!(
        "table inet fw {{\n\
         chain input {{\n\
         type filter hook input priority filter; policy accept;\n\
         iifname \"{wan_dev}\" meta l4proto icmp accept\n\
         iifname \"{wan_dev}\" ct state new drop\n\
         }}\n\
         }}\n"
    ));
    rules
}
