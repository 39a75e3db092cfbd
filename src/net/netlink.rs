//! The rtnetlink implementation of [`NetOps`]. rtnetlink types stay in here.

use super::{NetError, NetOps};
use async_trait::async_trait;
use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_core::DefaultNla;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkUnspec, LinkWireguard};

const EPERM: i32 = 1;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EOPNOTSUPP: i32 = 95;

const IFLA_AF_SPEC: u16 = 26;
const AF_INET: u16 = 2;
const IFLA_INET_CONF: u16 = 1;
const IPV4_DEVCONF_FORWARDING: u16 = 1;

/// `IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { FORWARDING = 1 } } }`, the
/// netlink form of `net.ipv4.conf.<iface>.forwarding=1`. Built by hand:
/// netlink-packet-route's devconf type would write every setting, not one.
fn forwarding_af_spec() -> Vec<u8> {
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = 4 + value.len() as u16;
        let mut out = Vec::with_capacity(len as usize);
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out
    }
    let setting = nla(IPV4_DEVCONF_FORWARDING, &1u32.to_ne_bytes());
    nla(AF_INET, &nla(IFLA_INET_CONF, &setting))
}

/// A netlink connection in the calling thread's network namespace.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the socket and spawns its driver on the current tokio runtime.
    pub fn connect() -> Result<Self, NetError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| other("opening a netlink socket", e))?;
        tokio::spawn(conn);
        Ok(Self { handle })
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
        Ok(Self { handle })
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

    async fn require_index(&self, name: &str) -> Result<u32, NetError> {
        self.index(name)
            .await?
            .ok_or_else(|| NetError::NotFound(name.to_owned()))
    }
}

fn other(what: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> NetError {
    NetError::Other {
        what: what.to_owned(),
        source: e.into(),
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
        for a in addrs {
            self.handle
                .address()
                .add(index, a.ip(), a.prefix())
                .execute()
                .await
                .map_err(|e| classify(e, &format!("adding address {a}"), name))?;
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

    async fn enable_forwarding(&self, name: &str) -> Result<(), NetError> {
        let index = self.require_index(name).await?;
        let attr = LinkAttribute::Other(DefaultNla::new(IFLA_AF_SPEC, forwarding_af_spec()));
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .append_extra_attribute(attr)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| classify(e, "enabling forwarding", name))
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
        assert_eq!(super::forwarding_af_spec(), want);
    }
}
