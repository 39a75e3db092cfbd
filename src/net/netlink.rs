//! The rtnetlink implementation of [`NetOps`]. rtnetlink types stay in here.

use super::{NetError, NetOps, Occupied, PolicyRule};
use async_trait::async_trait;
use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_core::DefaultNla;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use rtnetlink::packet_route::{AddressFamily, IpProtocol};
use rtnetlink::{Handle, LinkUnspec, LinkWireguard};

const EPERM: i32 = 1;
const EACCES: i32 = 13;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EOPNOTSUPP: i32 = 95;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENETUNREACH: i32 = 101;
const EHOSTUNREACH: i32 = 113;

const IFLA_AF_SPEC: u16 = 26;
const AF_INET: u16 = 2;
const IFLA_INET_CONF: u16 = 1;
const IPV4_DEVCONF_FORWARDING: u16 = 1;

/// `IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { FORWARDING = 1 } } }`, the
/// netlink form of `net.ipv4.conf.<iface>.forwarding=1`. Built by hand:
/// netlink-packet-route's devconf type would write every setting, not one.
fn forwarding_af_spec(on: bool) -> Vec<u8> {
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = 4 + value.len() as u16;
        let mut out = Vec::with_capacity(len as usize);
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out
    }
    let setting = nla(IPV4_DEVCONF_FORWARDING, &u32::from(on).to_ne_bytes());
    nla(AF_INET, &nla(IFLA_INET_CONF, &setting))
}

/// A netlink connection in the calling thread's network namespace.
pub struct Netlink {
    handle: Handle,
    /// The namespace it was opened in, when not the process's own.
    netns: Option<String>,
}

impl Netlink {
    /// Opens the socket and spawns its driver on the current tokio runtime.
    pub fn connect() -> Result<Self, NetError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| other("opening a netlink socket", e))?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            netns: None,
        })
    }

    /// Opens the socket inside the network namespace of process `pid`. A
    /// netlink socket belongs to the namespace it was made in, so it is made
    /// on a dedicated thread that enters the namespace (never a tokio
    /// worker), then used from anywhere.
    pub fn connect_in_netns(pid: u32) -> Result<Self, NetError> {
        use std::os::fd::AsFd;
        let path = format!("/proc/{pid}/ns/net");
        let ns = std::fs::File::open(&path).map_err(|e| other(&path, e))?;
        let runtime = tokio::runtime::Handle::current();
        let made = std::thread::spawn(move || {
            let _enter = runtime.enter();
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| other(&format!("entering {path}"), e))?;
            rtnetlink::new_connection()
                .map_err(|e| other(&format!("a netlink socket in {path}"), e))
        })
        .join()
        .map_err(|_| other("entering a namespace", "the thread panicked"))?;
        let (conn, handle, _) = made?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            netns: Some(format!("/proc/{pid}/ns/net")),
        })
    }

    async fn index(&self, name: &str) -> Result<Option<u32>, NetError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(msg.header.index)),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(classify(e, "reading links", name)),
        }
    }

    /// Turns IPv6 on for the link if it is off (Docker turns it off for the
    /// links of containers on networks without IPv6, new ones included).
    /// A sysctl of the link's namespace: written from a thread in it.
    fn enable_ipv6(&self, name: &str) -> Result<(), NetError> {
        let file = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
        let work = {
            let file = file.clone();
            move || -> std::io::Result<()> {
                if std::fs::read_to_string(&file)?.trim() == "1" {
                    std::fs::write(&file, "0")?;
                }
                Ok(())
            }
        };
        let done = match &self.netns {
            None => work(),
            Some(ns) => {
                use std::os::fd::AsFd;
                let ns_file = std::fs::File::open(ns).map_err(|e| other(ns, e))?;
                std::thread::spawn(move || {
                    nix::sched::setns(ns_file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)?;
                    work()
                })
                .join()
                .map_err(|_| other("entering a namespace", "the thread panicked"))?
            }
        };
        done.map_err(|e| sysctl_err(&file, e))
    }

    async fn require_index(&self, name: &str) -> Result<u32, NetError> {
        self.index(name)
            .await?
            .ok_or_else(|| NetError::NotFound(name.to_owned()))
    }
}

const FORWARDING6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// A sysctl file that could not be read or written: missing privileges are
/// said as such.
fn sysctl_err(path: &str, e: std::io::Error) -> NetError {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
            NetError::Permission(format!("writing {path}"))
        }
        _ => other(path, e),
    }
}

fn other(what: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> NetError {
    NetError::Other {
        what: what.to_owned(),
        source: e.into(),
    }
}

fn route_message(dst: IpNetwork, index: u32, table: Option<u32>) -> Result<RouteMessage, NetError> {
    let mut b = RouteMessageBuilder::<std::net::IpAddr>::new()
        .destination_prefix(dst.network(), dst.prefix())
        .map_err(|e| other("a route", e))?
        .output_interface(index);
    if let Some(t) = table {
        b = b.table_id(t);
    }
    Ok(b.build())
}

/// Destination, protocol and port of a rule; family from the destination.
fn rule_fill(msg: &mut RuleMessage, rule: &PolicyRule) {
    msg.header.family = if rule.to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    msg.header.dst_len = rule.to.prefix();
    msg.attributes
        .push(RuleAttribute::Destination(rule.to.network()));
    if let Some(p) = rule.ip_proto {
        msg.attributes
            .push(RuleAttribute::IpProtocol(IpProtocol::from(p)));
    }
    if let Some(d) = rule.dport {
        msg.attributes
            .push(RuleAttribute::DestinationPortRange(RulePortRange {
                start: d,
                end: d,
            }));
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn classify(e: rtnetlink::Error, what: &str, name: &str) -> NetError {
    match errno(&e) {
        Some(EPERM) => NetError::Permission(format!("{what} on {name}")),
        Some(EEXIST) => NetError::Exists(name.to_owned()),
        Some(ENODEV) => NetError::NotFound(name.to_owned()),
        _ => other(&format!("{what} on {name}"), e),
    }
}

#[async_trait]
impl NetOps for Netlink {
    async fn link_exists(&self, name: &str) -> Result<bool, NetError> {
        Ok(self.index(name).await?.is_some())
    }

    async fn create_wireguard(&self, name: &str) -> Result<(), NetError> {
        let req = self.handle.link().add(LinkWireguard::new(name).build());
        match req.execute().await {
            Ok(()) => Ok(()),
            // Without the module the kernel answers EOPNOTSUPP (unknown kind).
            Err(e) if errno(&e) == Some(EOPNOTSUPP) => Err(NetError::NotSupported(e.to_string())),
            Err(e) => Err(classify(e, "creating a wireguard link", name)),
        }
    }

    async fn configure(&self, name: &str, addrs: &[IpNetwork], mtu: u32) -> Result<(), NetError> {
        let index = self.require_index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(|e| classify(e, "setting the MTU", name))?;
        // Where IPv6 is off for the link and cannot be turned on (/proc/sys
        // is read-only inside a container, IPv6 disabled at boot), the
        // endpoint still works over IPv4: its IPv6 address is left out.
        let mut ipv6 = true;
        if addrs.iter().any(|a| a.is_ipv6())
            && let Err(e) = self.enable_ipv6(name)
        {
            tracing::warn!("{name} gets no IPv6 address: IPv6 is off for it here ({e})");
            ipv6 = false;
        }
        for a in addrs.iter().filter(|a| ipv6 || a.is_ipv4()) {
            match self
                .handle
                .address()
                .add(index, a.ip(), a.prefix())
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if a.is_ipv6() && errno(&e) == Some(EACCES) => {
                    tracing::warn!("{name} gets no IPv6 address: IPv6 is disabled on it");
                }
                Err(e) => return Err(classify(e, &format!("adding address {a}"), name)),
            }
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| classify(e, "bringing the link up", name))
    }

    async fn move_to_netns(&self, name: &str, pid: u32) -> Result<(), NetError> {
        let index = self.require_index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).setns_by_pid(pid).build())
            .execute()
            .await
            .map_err(|e| classify(e, &format!("moving into the namespace of pid {pid}"), name))
    }

    async fn rename_link(&self, name: &str, to: &str) -> Result<(), NetError> {
        super::validate_ifname(to)?;
        let index = self.require_index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(|e| classify(e, "taking the link down", name))?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .name(to.to_owned())
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| classify(e, &format!("renaming it to {to}"), name))
    }

    async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), NetError> {
        let index = self.require_index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(|e| classify(e, "setting the MTU", name))
    }

    async fn forwarding(&self, name: &str) -> Result<bool, NetError> {
        self.require_index(name).await?;
        let path = format!("/proc/sys/net/ipv4/conf/{name}/forwarding");
        let v = std::fs::read_to_string(&path).map_err(|e| other(&path, e))?;
        Ok(v.trim() == "1")
    }

    async fn forwarding6(&self) -> Result<bool, NetError> {
        let v = std::fs::read_to_string(FORWARDING6).map_err(|e| sysctl_err(FORWARDING6, e))?;
        Ok(v.trim() == "1")
    }

    async fn set_forwarding6(&self, on: bool) -> Result<(), NetError> {
        // Linux has no netlink setter for IPv6's switch; sysctl's file is it.
        std::fs::write(FORWARDING6, if on { "1" } else { "0" })
            .map_err(|e| sysctl_err(FORWARDING6, e))
    }

    async fn ra_links(&self) -> Result<Vec<String>, NetError> {
        let dir = "/proc/sys/net/ipv6/conf";
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            // No IPv6 in this kernel: no link takes advertisements.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(sysctl_err(dir, e)),
        };
        let mut out = vec![];
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "all" || name == "default" {
                continue;
            }
            let path = e.path().join("accept_ra");
            if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    async fn set_accept_ra(&self, name: &str, value: u8) -> Result<(), NetError> {
        let path = format!("/proc/sys/net/ipv6/conf/{name}/accept_ra");
        match std::fs::write(&path, value.to_string()) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(NetError::NotFound(name.to_owned()))
            }
            other => other.map_err(|e| sysctl_err(&path, e)),
        }
    }

    async fn set_forwarding(&self, name: &str, on: bool) -> Result<(), NetError> {
        let index = self.require_index(name).await?;
        let attr = LinkAttribute::Other(DefaultNla::new(IFLA_AF_SPEC, forwarding_af_spec(on)));
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .append_extra_attribute(attr)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| classify(e, "setting forwarding", name))
    }

    async fn add_route(
        &self,
        dst: IpNetwork,
        name: &str,
        table: Option<u32>,
    ) -> Result<(), NetError> {
        let index = self.require_index(name).await?;
        let msg = route_message(dst, index, table)?;
        match self.handle.route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(classify(e, &format!("adding a route to {dst}"), name)),
        }
    }

    async fn del_route(
        &self,
        dst: IpNetwork,
        name: &str,
        table: Option<u32>,
    ) -> Result<(), NetError> {
        let Some(index) = self.index(name).await? else {
            return Ok(());
        };
        let msg = route_message(dst, index, table)?;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(ESRCH) | Some(ENOENT)) => Ok(()),
            Err(e) => Err(classify(e, &format!("removing the route to {dst}"), name)),
        }
    }

    async fn route_iface(&self, to: std::net::IpAddr) -> Result<Option<String>, NetError> {
        let prefix = if to.is_ipv4() { 32 } else { 128 };
        let msg = RouteMessageBuilder::<std::net::IpAddr>::new()
            .destination_prefix(to, prefix)
            .map_err(|e| other("a route lookup", e))?
            .build();
        let mut routes = self.handle.route().get(msg).execute();
        let index = match routes.try_next().await {
            Ok(Some(r)) => r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            }),
            Ok(None) => None,
            Err(e) if matches!(errno(&e), Some(ENETUNREACH) | Some(EHOSTUNREACH)) => None,
            Err(e) => return Err(classify(e, &format!("looking up the route to {to}"), "-")),
        };
        let Some(index) = index else { return Ok(None) };
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })),
            Ok(None) => Ok(None),
            Err(e) => Err(classify(e, "reading a link", "-")),
        }
    }

    async fn host_networks(&self, link: Option<&str>) -> Result<Vec<IpNetwork>, NetError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut get = self.handle.address().get();
        if let Some(name) = link {
            get = get.set_link_index_filter(self.require_index(name).await?);
        }
        let mut dump = get.execute();
        let mut out = vec![];
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| classify(e, "reading addresses", "any link"))?
        {
            // `Local` is the host's own address on point-to-point links,
            // where `Address` is the other end's.
            let ip = msg
                .attributes
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                })
                .or_else(|| {
                    msg.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                });
            if let Some(n) = ip.and_then(|ip| IpNetwork::new(ip, msg.header.prefix_len).ok()) {
                out.push(n);
            }
        }
        Ok(out)
    }

    async fn occupied(&self) -> Result<Vec<Occupied>, NetError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        use rtnetlink::packet_route::route::{RouteAddress, RouteHeader, RouteType};
        let mut names = std::collections::HashMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(l) = links
            .try_next()
            .await
            .map_err(|e| classify(e, "reading links", "any link"))?
        {
            if let Some(n) = l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            }) {
                names.insert(l.header.index, n);
            }
        }
        let name = |i: u32| names.get(&i).cloned().unwrap_or_else(|| format!("#{i}"));
        let mut out = vec![];
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(|e| classify(e, "reading addresses", "any link"))?
        {
            let ip = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(net) = ip.and_then(|ip| IpNetwork::new(ip, msg.header.prefix_len).ok()) {
                out.push(Occupied {
                    net,
                    iface: name(msg.header.index),
                    address: true,
                });
            }
        }
        let dumps = [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ];
        for dump in dumps {
            let mut routes = self.handle.route().get(dump).execute();
            while let Some(r) = routes
                .try_next()
                .await
                .map_err(|e| classify(e, "reading routes", "-"))?
            {
                let table = r
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(r.header.table));
                if table != u32::from(RouteHeader::RT_TABLE_MAIN)
                    || r.header.kind != RouteType::Unicast
                {
                    continue;
                }
                let prefix = r.header.destination_prefix_length;
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                        Some(std::net::IpAddr::V4(*ip))
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                        Some(std::net::IpAddr::V6(*ip))
                    }
                    _ => None,
                });
                let oif = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                if let (Some(net), Some(oif)) =
                    (dst.and_then(|d| IpNetwork::new(d, prefix).ok()), oif)
                {
                    out.push(Occupied {
                        net,
                        iface: name(oif),
                        address: false,
                    });
                }
            }
        }
        Ok(out)
    }

    async fn add_rule(&self, rule: &PolicyRule) -> Result<(), NetError> {
        let mut req = self
            .handle
            .rule()
            .add()
            .table_id(rule.table)
            .priority(rule.priority)
            .action(RuleAction::ToTable);
        let msg = req.message_mut();
        rule_fill(msg, rule);
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(classify(e, &format!("adding a rule to {}", rule.to), "-")),
        }
    }

    async fn del_rule(&self, rule: &PolicyRule) -> Result<(), NetError> {
        let mut msg = RuleMessage::default();
        msg.header.family = if rule.to.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        msg.header.action = RuleAction::ToTable;
        if rule.table > 255 {
            msg.attributes.push(RuleAttribute::Table(rule.table));
        } else {
            msg.header.table = rule.table as u8;
        }
        msg.attributes.push(RuleAttribute::Priority(rule.priority));
        rule_fill(&mut msg, rule);
        match self.handle.rule().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(ENOENT) | Some(ESRCH)) => Ok(()),
            Err(e) => Err(classify(
                e,
                &format!("removing the rule to {}", rule.to),
                "-",
            )),
        }
    }

    async fn delete_link(&self, name: &str) -> Result<(), NetError> {
        let index = self.require_index(name).await?;
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| classify(e, "deleting the link", name))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn forwarding_attribute_layout() {
        // len 16, AF_INET { len 12, INET_CONF { len 8, FORWARDING, 1 } }
        let mut want = Vec::new();
        for half in [16u16, 2, 12, 1, 8, 1] {
            want.extend_from_slice(&half.to_ne_bytes());
        }
        want.extend_from_slice(&1u32.to_ne_bytes());
        assert_eq!(super::forwarding_af_spec(true), want);
    }
}
