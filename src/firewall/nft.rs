//! [`Firewall`] over nf_tables netlink (netlink-packet-netfilter, from the
//! rtnetlink family of crates). netlink types stay in this file.

use super::{Action, Firewall, FirewallError, Hook, Match, Table};
use netlink_packet_core::{
    Emitable, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, Cmp, DataAttribute, Expressions, Immediate, InetHookNumber, Meta,
    MetaKey, NfTablesMessage, Operator, Register, RuleAttribute, RuleMessage, TableAttribute,
    TableMessage, Verdict, VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use std::io;
use std::time::Duration;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const IFNAMSIZ: usize = 16;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const POLICY_ACCEPT: u32 = 1;
/// How long one exchange may wait for the kernel.
const TIMEOUT: Duration = Duration::from_secs(2);

/// nf_tables in this thread's network namespace.
#[derive(Debug, Default)]
pub struct Nftables;

type Msg = NetlinkMessage<NetfilterMessage>;

fn msg(family: NetfilterProtoFamily, inner: impl Into<NetfilterMessageInner>, flags: u16) -> Msg {
    let mut m = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(family, 0, 0),
        inner,
    ));
    m.header.flags = NLM_F_REQUEST | flags;
    m
}

fn control(c: ControlMessage) -> Msg {
    let mut m = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
        c,
    ));
    m.header.flags = NLM_F_REQUEST;
    m
}

fn table_msg(name: &str, delete: bool) -> Msg {
    let t = TableMessage {
        attributes: vec![TableAttribute::Name(name.to_owned())],
    };
    if delete {
        msg(
            NetfilterProtoFamily::Inet,
            NfTablesMessage::DeleteTable(t),
            NLM_F_ACK,
        )
    } else {
        msg(
            NetfilterProtoFamily::Inet,
            NfTablesMessage::NewTable(t),
            NLM_F_CREATE | NLM_F_ACK,
        )
    }
}

/// An interface name as `meta iifname` compares it: NUL-padded to IFNAMSIZ.
fn ifname(name: &str) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.resize(IFNAMSIZ, 0);
    b
}

fn expressions(m: &Match) -> Vec<Expressions> {
    match m {
        Match::InIface(n) | Match::OutIface(n) => {
            let key = if matches!(m, Match::InIface(_)) {
                MetaKey::Iifname
            } else {
                MetaKey::Oifname
            };
            vec![
                Expressions::Meta(vec![
                    Meta::Key(key),
                    Meta::DestinationRegister(Register::Reg1),
                ]),
                Expressions::Cmp(vec![
                    Cmp::SourceRegister(Register::Reg1),
                    Cmp::Op(Operator::Equal),
                    Cmp::Data(DataAttribute::Value(ifname(n))),
                ]),
            ]
        }
    }
}

fn verdict(a: Action) -> Expressions {
    let code = match a {
        Action::Accept => NF_ACCEPT,
        Action::Drop => NF_DROP,
    };
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
            Verdict::Other(code),
        )])),
    ])
}

/// The batch that replaces `table` (or only removes it, with `None`).
fn batch(name: &str, table: Option<&Table>) -> Vec<Msg> {
    let mut out = vec![
        control(ControlMessage::BatchBegin),
        // Creating first makes the delete succeed whether or not it existed.
        table_msg(name, false),
        table_msg(name, true),
    ];
    if let Some(t) = table {
        out.push(table_msg(&t.name, false));
        for c in &t.chains {
            let hook = match c.hook {
                Hook::Forward => InetHookNumber::Forward,
            };
            out.push(msg(
                NetfilterProtoFamily::Inet,
                NfTablesMessage::NewChain(ChainMessage {
                    attributes: vec![
                        ChainAttribute::Table(t.name.clone()),
                        ChainAttribute::Name(c.name.to_owned()),
                        ChainAttribute::Hook(vec![
                            netlink_packet_netfilter::nftables::Hook::Number(hook.into()),
                            netlink_packet_netfilter::nftables::Hook::Priority(c.priority as u32),
                        ]),
                        ChainAttribute::Policy(POLICY_ACCEPT),
                        ChainAttribute::Type("filter".to_owned()),
                    ],
                }),
                NLM_F_CREATE | NLM_F_ACK,
            ));
            for r in &c.rules {
                let mut exprs: Vec<_> = r.matches.iter().flat_map(expressions).collect();
                exprs.push(verdict(r.action));
                out.push(msg(
                    NetfilterProtoFamily::Inet,
                    NfTablesMessage::NewRule(RuleMessage {
                        attributes: vec![
                            RuleAttribute::Table(t.name.clone()),
                            RuleAttribute::Chain(c.name.to_owned()),
                            RuleAttribute::Expressions(exprs.into_iter().map(Into::into).collect()),
                        ],
                    }),
                    NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
                ));
            }
        }
    }
    out.push(control(ControlMessage::BatchEnd));
    out
}

fn classify(what: &str, e: io::Error) -> FirewallError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => FirewallError::Permission(e),
        Some(libc::EPROTONOSUPPORT) | Some(libc::EOPNOTSUPP) | Some(libc::EAFNOSUPPORT) => {
            FirewallError::Unsupported(e)
        }
        _ => FirewallError::Netlink {
            what: what.to_owned(),
            source: e,
        },
    }
}

fn socket() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_NETFILTER)?;
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    // A reply that never comes must not hang the caller.
    nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(TIMEOUT.as_secs() as _, 0),
    )
    .map_err(io::Error::from)?;
    Ok(s)
}

/// Sends `msgs` in one write and waits for the acknowledgement of each
/// message that asked for one; the first error wins.
fn exchange(msgs: Vec<Msg>) -> io::Result<Vec<NetfilterMessage>> {
    let s = socket()?;
    let mut buf = Vec::new();
    let mut acks = Vec::new();
    for (seq, mut m) in msgs.into_iter().enumerate() {
        m.header.sequence_number = seq as u32;
        if m.header.flags & NLM_F_ACK != 0 {
            acks.push(seq as u32);
        }
        m.finalize();
        let start = buf.len();
        buf.resize(start + m.buffer_len(), 0);
        m.emit(&mut buf[start..]);
    }
    s.send(&buf, 0)?;
    let mut replies = Vec::new();
    let mut rx = vec![0u8; 1 << 16];
    while !acks.is_empty() {
        let n = s.recv(&mut &mut rx[..], 0)?;
        let mut off = 0;
        while off < n {
            let nb = NetlinkBuffer::new_checked(&rx[off..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = nb.length() as usize;
            let m = Msg::deserialize(&rx[off..off + len])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            off += (len + 3) & !3;
            match m.payload {
                NetlinkPayload::Error(e) => {
                    if e.code.is_some() {
                        return Err(e.to_io());
                    }
                    acks.retain(|s| *s != m.header.sequence_number);
                }
                NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                _ => {}
            }
        }
    }
    Ok(replies)
}

impl Firewall for Nftables {
    fn apply(&self, table: &Table) -> Result<(), FirewallError> {
        exchange(batch(&table.name, Some(table)))
            .map(drop)
            .map_err(|e| classify(&format!("writing table {}", table.name), e))
    }

    fn remove(&self, name: &str) -> Result<(), FirewallError> {
        exchange(batch(name, None))
            .map(drop)
            .map_err(|e| classify(&format!("removing table {name}"), e))
    }

    fn exists(&self, name: &str) -> Result<bool, FirewallError> {
        let get = msg(
            NetfilterProtoFamily::Inet,
            NfTablesMessage::GetTable(TableMessage {
                attributes: vec![TableAttribute::Name(name.to_owned())],
            }),
            NLM_F_ACK,
        );
        match exchange(vec![get]) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(classify(&format!("reading table {name}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_batch_is_framed_and_clears_the_old_table_first() {
        let t = super::super::confinement("wg0");
        let b = batch(&t.name, Some(&t));
        // begin, new, delete, new, chain, 3 rules, end
        assert_eq!(b.len(), 9);
        assert!(matches!(
            b[0].payload,
            NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::None(ControlMessage::BatchBegin),
                ..
            })
        ));
        assert!(matches!(
            &b[2].payload,
            NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::NfTables(NfTablesMessage::DeleteTable(_)),
                ..
            })
        ));
        let removal = batch("tunnel-wg0", None);
        assert_eq!(removal.len(), 4);
        assert_eq!(ifname("wg0").len(), IFNAMSIZ);
    }
}
