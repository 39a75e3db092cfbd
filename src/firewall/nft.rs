//! [`Firewall`] over nf_tables netlink (netlink-packet-netfilter, from the
//! rtnetlink family of crates). netlink types stay in this file.

use super::{Action, Firewall, FirewallError, Foreign, Hook, Match, Rule, Table};
use ipnetwork::IpNetwork;
use netlink_packet_core::{
    DefaultNla, Emitable, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST,
    NetlinkBuffer, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, Expressions, Immediate,
    InetHookNumber, Meta, MetaKey, NfTablesMessage, Operator, Payload, Register, RuleAttribute,
    RuleMessage, TableAttribute, TableMessage, Verdict, VerdictAttribute,
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
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_TCP: u8 = 6;
/// How long one exchange may wait for the kernel.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Docker's chain for users' rules, jumped to first from its FORWARD.
const DOCKER_USER: &str = "DOCKER-USER";

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

fn cmp(op: Operator, data: Vec<u8>) -> Expressions {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(op),
        Cmp::Data(DataAttribute::Value(data)),
    ])
}

fn meta(key: MetaKey) -> Expressions {
    Expressions::Meta(vec![
        Meta::Key(key),
        Meta::DestinationRegister(Register::Reg1),
    ])
}

fn payload(base: u32, offset: u32, len: u32) -> Expressions {
    Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
}

/// `ip[6] saddr|daddr [!=] NET`: the family first, so that an IPv4 rule
/// never reads an IPv6 header.
fn net_match(n: &IpNetwork, source: bool, op: Operator) -> Vec<Expressions> {
    let (proto, offset, bytes): (u8, u32, Vec<u8>) = match n {
        IpNetwork::V4(v4) => (
            NFPROTO_IPV4,
            if source { 12 } else { 16 },
            v4.network().octets().to_vec(),
        ),
        IpNetwork::V6(v6) => (
            NFPROTO_IPV6,
            if source { 8 } else { 24 },
            v6.network().octets().to_vec(),
        ),
    };
    let len = bytes.len() as u32;
    let mut mask = vec![0u8; bytes.len()];
    for (i, m) in mask.iter_mut().enumerate() {
        let bits = (n.prefix() as usize).saturating_sub(i * 8).min(8);
        *m = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    vec![
        meta(MetaKey::Nfproto),
        cmp(Operator::Equal, vec![proto]),
        payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len),
        Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(len),
            Bitwise::Mask(DataAttribute::Value(mask)),
            Bitwise::Xor(DataAttribute::Value(vec![0; bytes.len()])),
        ]),
        cmp(op, bytes),
    ]
}

/// `meta l4proto PROTO th dport PORT`.
fn dport(proto: u8, port: u16) -> Vec<Expressions> {
    vec![
        meta(MetaKey::L4Proto),
        cmp(Operator::Equal, vec![proto]),
        payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2),
        cmp(Operator::Equal, port.to_be_bytes().to_vec()),
    ]
}

fn expressions(m: &Match) -> Vec<Expressions> {
    match m {
        Match::InIface(n) => vec![meta(MetaKey::Iifname), cmp(Operator::Equal, ifname(n))],
        Match::OutIface(n) => vec![meta(MetaKey::Oifname), cmp(Operator::Equal, ifname(n))],
        Match::NotOutIface(n) => vec![meta(MetaKey::Oifname), cmp(Operator::NotEqual, ifname(n))],
        Match::SrcNet(n) => net_match(n, true, Operator::Equal),
        Match::DstNet(n) => net_match(n, false, Operator::Equal),
        Match::NotDstNet(n) => net_match(n, false, Operator::NotEqual),
        Match::UdpDport(p) => dport(IPPROTO_UDP, *p),
        Match::TcpDport(p) => dport(IPPROTO_TCP, *p),
    }
}

fn verdict(a: Action) -> Vec<Expressions> {
    let code = match a {
        Action::Accept => NF_ACCEPT,
        Action::Drop => NF_DROP,
        Action::Masquerade => {
            return vec![Expressions::Other {
                expression_type: "masq".into(),
                attributes: vec![],
            }];
        }
        Action::Snat(to) => return snat(to),
    };
    vec![Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
            Verdict::Other(code),
        )])),
    ])]
}

/// `snat to ADDR`: the address into a register, then the `nat` expression
/// (its attributes are big-endian u32s, as nftables' netlink has them).
fn snat(to: std::net::IpAddr) -> Vec<Expressions> {
    const NFTA_NAT_TYPE: u16 = 1;
    const NFTA_NAT_FAMILY: u16 = 2;
    const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
    const NFT_NAT_SNAT: u32 = 0;
    const NFT_REG_1: u32 = 1;
    let (family, bytes) = match to {
        std::net::IpAddr::V4(a) => (NFPROTO_IPV4, a.octets().to_vec()),
        std::net::IpAddr::V6(a) => (NFPROTO_IPV6, a.octets().to_vec()),
    };
    let be = |v: u32| v.to_be_bytes().to_vec();
    vec![
        Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Reg1),
            Immediate::Data(DataAttribute::Value(bytes)),
        ]),
        Expressions::Other {
            expression_type: "nat".into(),
            attributes: vec![
                DefaultNla::new(NFTA_NAT_TYPE, be(NFT_NAT_SNAT)),
                DefaultNla::new(NFTA_NAT_FAMILY, be(u32::from(family))),
                DefaultNla::new(NFTA_NAT_REG_ADDR_MIN, be(NFT_REG_1)),
            ],
        },
    ]
}

fn rule_exprs(r: &Rule) -> Vec<Expressions> {
    let mut exprs: Vec<_> = r.matches.iter().flat_map(expressions).collect();
    exprs.extend(verdict(r.action));
    exprs
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
                Hook::Input => InetHookNumber::LocalIn,
                Hook::Postrouting => InetHookNumber::PostRouting,
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
                        ChainAttribute::Type(c.kind.to_owned()),
                    ],
                }),
                NLM_F_CREATE | NLM_F_ACK,
            ));
            for r in &c.rules {
                out.push(msg(
                    NetfilterProtoFamily::Inet,
                    NfTablesMessage::NewRule(RuleMessage {
                        attributes: vec![
                            RuleAttribute::Table(t.name.clone()),
                            RuleAttribute::Chain(c.name.to_owned()),
                            RuleAttribute::Expressions(
                                rule_exprs(r).into_iter().map(Into::into).collect(),
                            ),
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
/// message that asked for one, or for the end of a dump; the first error
/// wins. Returns the messages the kernel sent back.
fn exchange(msgs: Vec<Msg>) -> io::Result<Vec<NetfilterMessage>> {
    let s = socket()?;
    let mut buf = Vec::new();
    let mut acks = Vec::new();
    let mut dump = false;
    for (seq, mut m) in msgs.into_iter().enumerate() {
        m.header.sequence_number = seq as u32;
        if m.header.flags & NLM_F_ACK != 0 {
            acks.push(seq as u32);
        }
        dump |= m.header.flags & NLM_F_DUMP == NLM_F_DUMP;
        m.finalize();
        let start = buf.len();
        buf.resize(start + m.buffer_len(), 0);
        m.emit(&mut buf[start..]);
    }
    s.send(&buf, 0)?;
    let mut replies = Vec::new();
    let mut rx = vec![0u8; 1 << 16];
    while !acks.is_empty() || dump {
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
                NetlinkPayload::Done(_) => dump = false,
                NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                _ => {}
            }
        }
    }
    Ok(replies)
}

/// The address families of Docker's chains: `iptables` and `ip6tables`.
const DOCKER_FAMILIES: [NetfilterProtoFamily; 2] =
    [NetfilterProtoFamily::IPv4, NetfilterProtoFamily::IPv6];

/// A chain of `table` (of family `fam`), with its policy, if it exists.
fn chain_policy(
    fam: NetfilterProtoFamily,
    table: &str,
    chain: &str,
) -> io::Result<Option<Option<u32>>> {
    let get = msg(
        fam,
        NfTablesMessage::GetChain(ChainMessage {
            attributes: vec![
                ChainAttribute::Table(table.to_owned()),
                ChainAttribute::Name(chain.to_owned()),
            ],
        }),
        NLM_F_ACK,
    );
    match exchange(vec![get]) {
        Ok(replies) => Ok(Some(replies.iter().find_map(|r| match &r.inner {
            NetfilterMessageInner::NfTables(NfTablesMessage::NewChain(c)) => {
                c.attributes.iter().find_map(|a| match a {
                    ChainAttribute::Policy(p) => Some(*p),
                    _ => None,
                })
            }
            _ => None,
        }))),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Where Docker-style forwarding rules of family `fam` go: `DOCKER-USER`
/// in its `filter` table, or that table's FORWARD chain when its policy
/// drops.
fn docker_chain(fam: NetfilterProtoFamily) -> io::Result<Option<&'static str>> {
    if chain_policy(fam, "filter", DOCKER_USER)?.is_some() {
        return Ok(Some(DOCKER_USER));
    }
    match chain_policy(fam, "filter", "FORWARD")? {
        Some(Some(NF_DROP)) => Ok(Some("FORWARD")),
        _ => Ok(None),
    }
}

/// The handles of the rules in `filter <chain>` of family `fam` tagged `tag`.
fn tagged(fam: NetfilterProtoFamily, chain: &str, tag: &str) -> io::Result<Vec<u64>> {
    let mut dump = msg(
        fam,
        NfTablesMessage::GetRule(RuleMessage {
            attributes: vec![
                RuleAttribute::Table("filter".into()),
                RuleAttribute::Chain(chain.into()),
            ],
        }),
        NLM_F_DUMP,
    );
    dump.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let replies = match exchange(vec![dump]) {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    Ok(replies
        .iter()
        .filter_map(|r| match &r.inner {
            NetfilterMessageInner::NfTables(NfTablesMessage::NewRule(rule)) => {
                let chain_ok = rule
                    .attributes
                    .iter()
                    .any(|a| matches!(a, RuleAttribute::Chain(c) if c == chain));
                let ours = rule
                    .attributes
                    .iter()
                    .any(|a| matches!(a, RuleAttribute::UserData(d) if d == tag.as_bytes()));
                let handle = rule.attributes.iter().find_map(|a| match a {
                    RuleAttribute::Handle(h) => Some(*h),
                    _ => None,
                });
                (chain_ok && ours).then_some(handle).flatten()
            }
            _ => None,
        })
        .collect())
}

fn delete_rules(fam: NetfilterProtoFamily, chain: &str, handles: &[u64]) -> Vec<Msg> {
    handles
        .iter()
        .map(|h| {
            msg(
                fam,
                NfTablesMessage::DeleteRule(RuleMessage {
                    attributes: vec![
                        RuleAttribute::Table("filter".into()),
                        RuleAttribute::Chain(chain.into()),
                        RuleAttribute::Handle(*h),
                    ],
                }),
                NLM_F_ACK,
            )
        })
        .collect()
}

/// Replaces our tagged rules in Docker's chain of family `fam` with
/// `rules`; false when that family has no such chain.
fn open_docker_family(fam: NetfilterProtoFamily, tag: &str, rules: &[Rule]) -> io::Result<bool> {
    let Some(chain) = docker_chain(fam)? else {
        return Ok(false);
    };
    let old = tagged(fam, chain, tag)?;
    let mut b = vec![control(ControlMessage::BatchBegin)];
    b.extend(delete_rules(fam, chain, &old));
    // Each rule goes to the top; in reverse, so that they keep their order.
    for r in rules.iter().rev() {
        b.push(msg(
            fam,
            NfTablesMessage::NewRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table("filter".into()),
                    RuleAttribute::Chain(chain.into()),
                    RuleAttribute::Expressions(rule_exprs(r).into_iter().map(Into::into).collect()),
                    RuleAttribute::UserData(tag.as_bytes().to_vec()),
                ],
            }),
            NLM_F_CREATE | NLM_F_ACK,
        ));
    }
    b.push(control(ControlMessage::BatchEnd));
    exchange(b)?;
    Ok(true)
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

    fn open_docker(&self, f: &Foreign) -> Result<bool, FirewallError> {
        let fail = |e| classify("opening Docker's FORWARD chain", e);
        let v4 = open_docker_family(NetfilterProtoFamily::IPv4, &f.tag, &f.rules).map_err(fail)?;
        let v6 = open_docker_family(NetfilterProtoFamily::IPv6, &f.tag, &f.rules6).map_err(fail)?;
        Ok(v4 || v6)
    }

    fn close_docker(&self, tag: &str) -> Result<(), FirewallError> {
        let fail = |e| classify("cleaning Docker's FORWARD chain", e);
        for fam in DOCKER_FAMILIES {
            for chain in [DOCKER_USER, "FORWARD"] {
                let old = tagged(fam, chain, tag).map_err(fail)?;
                if old.is_empty() {
                    continue;
                }
                let mut b = vec![control(ControlMessage::BatchBegin)];
                b.extend(delete_rules(fam, chain, &old));
                b.push(control(ControlMessage::BatchEnd));
                exchange(b).map_err(fail)?;
            }
        }
        Ok(())
    }

    fn docker_open(&self, f: &Foreign) -> Result<bool, FirewallError> {
        let fail = |e| classify("reading Docker's FORWARD chain", e);
        let mut any = false;
        for (fam, rules) in DOCKER_FAMILIES.into_iter().zip([&f.rules, &f.rules6]) {
            if rules.is_empty() {
                continue;
            }
            let Some(chain) = docker_chain(fam).map_err(fail)? else {
                continue;
            };
            if tagged(fam, chain, &f.tag).map_err(fail)?.is_empty() {
                return Ok(false);
            }
            any = true;
        }
        Ok(any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_batch_is_framed_and_clears_the_old_table_first() {
        let (t, _) = super::super::plan(&super::super::Policy {
            iface: "wg0".into(),
            hub: true,
            ..Default::default()
        });
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

    #[test]
    fn network_matches_mask_the_prefix() {
        let e = net_match(&"10.77.0.0/20".parse().unwrap(), false, Operator::Equal);
        match &e[3] {
            Expressions::Bitwise(b) => {
                assert!(b.contains(&Bitwise::Mask(DataAttribute::Value(vec![
                    0xff, 0xff, 0xf0, 0
                ]))))
            }
            other => panic!("{other:?}"),
        }
        let e6 = net_match(&"fd00:7::/64".parse().unwrap(), true, Operator::Equal);
        assert!(
            matches!(&e6[2], Expressions::Payload(p) if p.contains(&Payload::Offset(8)) && p.contains(&Payload::Len(16)))
        );
    }
}
