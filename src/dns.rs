//! The hub's names for the tunnel: every container endpoint as
//! `<container>.<site>.<zone>`, and every site (road warriors included) and
//! the hub itself as `<site>.<zone>`, with an A record and, in a dual-stack
//! tunnel, an AAAA one. The hub answers them on its tunnel addresses, UDP
//! and TCP port 53, for its peers only (the sockets are bound to the
//! tunnel interface), and nothing else: no recursion.
//!
//! The zone is built from the ledger's state ([`Zone::from_state`]) each
//! time it changes, and answering is a pure function of it
//! ([`Zone::answer`]), both tested without sockets. Messages are parsed
//! and written by hickory-proto.

use crate::state::ServerState;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub const DNS_PORT: u16 = 53;
/// Names follow attaches, detaches and revokes; resolvers must not keep
/// them long.
const TTL: u32 = 2;
pub const DEFAULT_ZONE: &str = "tunnel";

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("--dns-zone {0:?} is not a domain name: {1}")]
    BadZone(String, String),
    #[error("the host's resolvers (/etc/resolv.conf): {0}")]
    Upstream(String),
    #[error("listening for DNS on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// A name as a DNS label: lower case, letters, digits and hyphens only
/// (container and site names may hold `_` and `.`), at most 63 bytes.
pub fn label(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    out.truncate(63);
    out.trim_matches('-').to_owned()
}

/// Checks a `--dns-zone`.
pub fn parse_zone(zone: &str) -> Result<Name, DnsError> {
    let bad = |why: String| DnsError::BadZone(zone.to_owned(), why);
    if zone.is_empty() || zone.len() > 200 {
        return Err(bad("give 1 to 200 characters".into()));
    }
    let mut name = Name::from_ascii(zone).map_err(|e| bad(e.to_string()))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

/// The names of a hub, and what they resolve to.
#[derive(Debug, Clone)]
pub struct Zone {
    origin: Name,
    names: HashMap<Name, Vec<IpAddr>>,
}

impl Zone {
    pub fn empty(origin: Name) -> Self {
        Self {
            origin,
            names: HashMap::new(),
        }
    }

    /// The names in `state`: the hub and its containers under the hub's
    /// name, each site, and each site's containers under the site's name.
    /// A name that two endpoints would share keeps the first, with a log
    /// line; unnamed sites get `site-<address>`.
    pub fn from_state(state: &ServerState, origin: &Name) -> Self {
        let subnets = state.subnets();
        let with_twin = |a: IpAddr| {
            std::iter::once(a)
                .chain(subnets.twin(a))
                .collect::<Vec<_>>()
        };
        let mut zone = Zone::empty(origin.clone());
        let unnamed = |a: IpAddr| format!("site-{a}");
        let hub = state.name.clone().unwrap_or_else(|| "hub".to_owned());
        let hub_ip = crate::ipam::Pool::new(state.subnet)
            .map(|p| p.server_address())
            .unwrap_or(state.subnet.ip());
        zone.insert(&[&hub], with_twin(hub_ip));
        for c in &state.containers {
            zone.insert(&[&c.container, &hub], with_twin(c.address));
        }
        let site_name = |a: IpAddr| {
            state
                .peers
                .iter()
                .find(|p| p.address == a && p.via.is_none())
                .map(|p| p.name.clone().unwrap_or_else(|| unnamed(a)))
        };
        for p in &state.peers {
            match p.via {
                None => {
                    let n = p.name.clone().unwrap_or_else(|| unnamed(p.address));
                    zone.insert(&[&n], with_twin(p.address));
                }
                Some(site) => {
                    if let (Some(c), Some(s)) = (&p.name, site_name(site)) {
                        zone.insert(&[c, &s], with_twin(p.address));
                    }
                }
            }
        }
        zone
    }

    fn insert(&mut self, labels: &[&str], addrs: Vec<IpAddr>) {
        let mut name = Name::root();
        for l in labels.iter().rev() {
            let l = label(l);
            if l.is_empty() {
                return;
            }
            name = match name.prepend_label(l.as_bytes()) {
                Ok(n) => n,
                Err(_) => return,
            };
        }
        let Ok(name) = name.append_domain(&self.origin) else {
            return;
        };
        if self.names.contains_key(&name) {
            tracing::warn!("DNS: two endpoints would be {name}; the first keeps it");
            return;
        }
        self.names.insert(name, addrs);
    }

    /// The addresses of `name`, if it is in the zone.
    pub fn lookup(&self, name: &Name) -> Option<&[IpAddr]> {
        self.names.get(&name.to_lowercase()).map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The answer to the wire-format query `request`, or `None` when it is
    /// not even a DNS header (dropped, as any server does).
    pub fn answer(&self, request: &[u8]) -> Option<Vec<u8>> {
        let query = match Message::from_vec(request) {
            Ok(q) => q,
            Err(_) => {
                // A header we can read gets FORMERR; anything less, silence.
                if request.len() < 12 {
                    return None;
                }
                let id = u16::from_be_bytes([request[0], request[1]]);
                return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
        };
        if query.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        reply.metadata.recursion_available = false;
        reply.add_queries(query.queries.clone());
        if query.metadata.op_code != OpCode::Query {
            reply.metadata.response_code = ResponseCode::NotImp;
            return reply.to_vec().ok();
        }
        let [q] = query.queries.as_slice() else {
            reply.metadata.response_code = ResponseCode::FormErr;
            return reply.to_vec().ok();
        };
        let name = q.name().to_lowercase();
        if !self.origin.zone_of(&name) || q.query_class() != DNSClass::IN {
            reply.metadata.response_code = ResponseCode::Refused;
            return reply.to_vec().ok();
        }
        reply.metadata.authoritative = true;
        match self.lookup(&name) {
            None => reply.metadata.response_code = ResponseCode::NXDomain,
            Some(addrs) => {
                for a in addrs {
                    let rdata = match (a, q.query_type()) {
                        (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => RData::A(A(*v4)),
                        (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
                            RData::AAAA(AAAA(*v6))
                        }
                        _ => continue,
                    };
                    reply.add_answer(Record::from_rdata(q.name().clone(), TTL, rdata));
                }
            }
        }
        reply.to_vec().ok()
    }
}

impl Zone {
    /// The query in `request` when it is one this zone does not hold: a
    /// plain query, one question, class IN, a name outside the zone.
    pub fn outside(&self, request: &[u8]) -> Option<Message> {
        let query = Message::from_vec(request).ok()?;
        let plain = query.metadata.message_type == MessageType::Query
            && query.metadata.op_code == OpCode::Query;
        let [q] = query.queries.as_slice() else {
            return None;
        };
        (plain && q.query_class() == DNSClass::IN && !self.origin.zone_of(&q.name().to_lowercase()))
            .then_some(query)
    }
}

/// Whether `from` is inside the tunnel's subnets (not a LAN behind a
/// site, not anyone else).
fn within(peers: &[ipnetwork::IpNetwork], from: IpAddr) -> bool {
    peers.iter().any(|p| p.contains(from))
}

/// Forwards in flight at most; beyond them a query gets SERVFAIL at once.
const FORWARDS: usize = 256;

/// Names outside the zone, asked of the hub host's own resolvers (its
/// `/etc/resolv.conf`) through hickory-resolver, which caches the
/// answers; only for senders inside the tunnel's subnets.
pub struct Forwarder {
    resolver: hickory_resolver::TokioResolver,
    peers: Vec<ipnetwork::IpNetwork>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Forwarder {
    /// From the host's resolver configuration; `peers` are who may ask.
    pub fn from_system(peers: Vec<ipnetwork::IpNetwork>) -> Result<Self, DnsError> {
        let upstream = |e: &dyn std::fmt::Display| DnsError::Upstream(e.to_string());
        let mut builder = hickory_resolver::Resolver::builder_tokio().map_err(|e| upstream(&e))?;
        let opts = builder.options_mut();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        opts.cache_size = 4096;
        // The asker's name as it is: no search domains of the hub's host.
        opts.ndots = 0;
        let resolver = builder.build().map_err(|e| upstream(&e))?;
        Ok(Self {
            resolver,
            peers,
            slots: Arc::new(tokio::sync::Semaphore::new(FORWARDS)),
        })
    }

    /// Whether `from` may have names outside the zone resolved.
    pub fn may_ask(&self, from: IpAddr) -> bool {
        within(&self.peers, from)
    }

    /// The answer to `query` from upstream: its records, NXDOMAIN, or
    /// SERVFAIL when upstream fails or too many forwards are in flight.
    pub async fn answer(&self, query: &Message) -> Vec<u8> {
        let mut reply = Message::response(query.metadata.id, OpCode::Query);
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.add_queries(query.queries.clone());
        let q = &query.queries[0];
        let looked = match self.slots.clone().try_acquire_owned() {
            Ok(_slot) => Some(self.resolver.lookup(q.name().clone(), q.query_type()).await),
            Err(_) => None,
        };
        match looked {
            Some(Ok(found)) => {
                reply.add_answers(found.answers().iter().cloned());
            }
            Some(Err(e)) if e.is_nx_domain() => {
                reply.metadata.response_code = ResponseCode::NXDomain;
            }
            Some(Err(e)) if e.is_no_records_found() => {}
            Some(Err(e)) => {
                tracing::debug!("resolving {} upstream: {e}", q.name());
                reply.metadata.response_code = ResponseCode::ServFail;
            }
            None => reply.metadata.response_code = ResponseCode::ServFail,
        }
        reply.to_vec().unwrap_or_default()
    }
}

/// The hub's DNS sockets: UDP and TCP on each of its tunnel addresses,
/// bound to the tunnel interface.
pub struct Listeners {
    udp: Vec<tokio::net::UdpSocket>,
    tcp: Vec<tokio::net::TcpListener>,
}

pub fn bind(addrs: &[IpAddr], iface: &str) -> Result<Listeners, DnsError> {
    use nix::sys::socket::{setsockopt, sockopt::BindToDevice};
    let mut out = Listeners {
        udp: vec![],
        tcp: vec![],
    };
    for (i, a) in addrs.iter().enumerate() {
        let at = SocketAddr::new(*a, DNS_PORT);
        let err = |source| DnsError::Bind {
            addr: format!("{at} on {iface}"),
            source,
        };
        let udp = match std::net::UdpSocket::bind(at) {
            // The twin of a dual-stack hub is missing where IPv6 is off
            // for the interface (a container's read-only /proc/sys): the
            // names are still answered on the first address.
            Err(e) if i > 0 && e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                tracing::warn!("no DNS on {at}: {iface} has no such address");
                continue;
            }
            r => r.map_err(err)?,
        };
        setsockopt(&udp, BindToDevice, &std::ffi::OsString::from(iface))
            .map_err(|e| err(e.into()))?;
        udp.set_nonblocking(true).map_err(err)?;
        out.udp
            .push(tokio::net::UdpSocket::from_std(udp).map_err(err)?);
        out.tcp
            .push(crate::control::server::bind_on_device(at, iface).map_err(err)?);
    }
    Ok(out)
}

/// What to forward: the query, when it is for a name outside the zone
/// and its sender may have such names resolved.
fn to_forward(
    zone: &tokio::sync::watch::Receiver<Arc<Zone>>,
    forward: Option<&Arc<Forwarder>>,
    request: &[u8],
    from: IpAddr,
) -> Option<(Arc<Forwarder>, Message)> {
    let f = forward.filter(|f| f.may_ask(from))?;
    let query = zone.borrow().outside(request)?;
    Some((f.clone(), query))
}

/// Answers queries with the zone of the moment until `stop`; names
/// outside it go to `forward`, when given.
pub async fn serve(
    listeners: Listeners,
    zone: tokio::sync::watch::Receiver<Arc<Zone>>,
    forward: Option<Arc<Forwarder>>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for sock in listeners.udp {
        let zone = zone.clone();
        let forward = forward.clone();
        let sock = Arc::new(sock);
        tasks.spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                if let Some((f, query)) = to_forward(&zone, forward.as_ref(), &buf[..n], from.ip())
                {
                    let sock = sock.clone();
                    tokio::spawn(async move {
                        let a = f.answer(&query).await;
                        let _ = sock.send_to(&fit_udp(a), from).await;
                    });
                    continue;
                }
                let answer = zone.borrow().answer(&buf[..n]);
                if let Some(a) = answer {
                    let _ = sock.send_to(&fit_udp(a), from).await;
                }
            }
        });
    }
    for listener in listeners.tcp {
        let zone = zone.clone();
        let forward = forward.clone();
        tasks.spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(64));
            loop {
                let Ok((stream, from)) = listener.accept().await else {
                    continue;
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let zone = zone.clone();
                let forward = forward.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let talk = tcp(stream, zone, forward, from.ip());
                    let _ = tokio::time::timeout(Duration::from_secs(10), talk).await;
                });
            }
        });
    }
    stop.await;
    tasks.abort_all();
}

/// Plain UDP DNS carries at most 512 bytes: a longer answer goes as its
/// header alone, with TC set and no records counted, and the client asks
/// again over TCP.
fn fit_udp(mut answer: Vec<u8>) -> Vec<u8> {
    if answer.len() > 512 {
        answer.truncate(12);
        answer[2] |= 0x02;
        answer[4..12].fill(0);
    }
    answer
}

/// One TCP connection: length-prefixed queries, answered in turn.
async fn tcp(
    mut stream: tokio::net::TcpStream,
    zone: tokio::sync::watch::Receiver<Arc<Zone>>,
    forward: Option<Arc<Forwarder>>,
    from: IpAddr,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let len = stream.read_u16().await? as usize;
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).await?;
        let answer = match to_forward(&zone, forward.as_ref(), &buf, from) {
            Some((f, query)) => Some(f.answer(&query).await),
            None => zone.borrow().answer(&buf),
        };
        let Some(a) = answer else { return Ok(()) };
        stream.write_u16(a.len() as u16).await?;
        stream.write_all(&a).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use crate::state::{ContainerRecord, PeerRecord};

    fn peer(address: &str, name: Option<&str>, via: Option<&str>) -> PeerRecord {
        PeerRecord {
            public_key: PrivateKey::generate().public_key(),
            address: address.parse().unwrap(),
            joined_at: 0,
            name: name.map(str::to_owned),
            via: via.map(|v| v.parse().unwrap()),
            endpoint: None,
            routes: vec![],
            snat_public: false,
            approved: Some(vec![]),
            road_warrior: false,
        }
    }

    fn zone() -> Zone {
        let mut s = ServerState::new("10.77.0.0/24".parse().unwrap(), 51820, 1420);
        s.subnet6 = Some("fd00:77::/64".parse().unwrap());
        s.name = Some("hq".into());
        s.containers.push(ContainerRecord {
            container: "web".into(),
            iface: "wgc0".into(),
            private_key: PrivateKey::generate(),
            address: "10.77.0.2".parse().unwrap(),
            by_label: false,
            driver: false,
        });
        s.peers.push(peer("10.77.0.3", Some("Branch_Office"), None));
        s.peers
            .push(peer("10.77.0.4", Some("db"), Some("10.77.0.3")));
        s.peers.push(peer("10.77.0.5", None, None));
        Zone::from_state(&s, &parse_zone("tunnel").unwrap())
    }

    fn ask(zone: &Zone, name: &str, kind: RecordType) -> Message {
        let mut q = Message::query();
        q.add_query(hickory_proto::op::Query::query(
            Name::from_ascii(name).unwrap(),
            kind,
        ));
        Message::from_vec(&zone.answer(&q.to_vec().unwrap()).unwrap()).unwrap()
    }

    fn addrs(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn endpoints_have_names_under_their_sites() {
        let z = zone();
        let m = ask(&z, "web.hq.tunnel.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(addrs(&m), ["10.77.0.2"]);
        assert_eq!(
            addrs(&ask(&z, "web.hq.tunnel.", RecordType::AAAA)),
            ["fd00:77::2"]
        );
        // Names are labels: lower case, `_` and `.` as `-`; case does not matter.
        assert_eq!(
            addrs(&ask(&z, "DB.branch-office.tunnel.", RecordType::A)),
            ["10.77.0.4"]
        );
        assert_eq!(
            addrs(&ask(&z, "branch-office.tunnel.", RecordType::A)),
            ["10.77.0.3"]
        );
        assert_eq!(addrs(&ask(&z, "hq.tunnel.", RecordType::A)), ["10.77.0.1"]);
        assert_eq!(
            addrs(&ask(&z, "site-10-77-0-5.tunnel.", RecordType::A)),
            ["10.77.0.5"]
        );
        assert_eq!(ask(&z, "web.hq.tunnel.", RecordType::ANY).answers.len(), 2);
    }

    #[test]
    fn unknown_names_are_nxdomain_and_other_zones_refused() {
        let z = zone();
        let m = ask(&z, "gone.hq.tunnel.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = ask(&z, "example.org.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(m.answers.is_empty());
        // A name with no record of that type: NOERROR, no answer.
        let m = ask(&z, "web.hq.tunnel.", RecordType::MX);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn garbage_gets_formerr_or_silence() {
        let z = zone();
        assert_eq!(z.answer(&[1, 2, 3]), None);
        let reply = Message::from_vec(
            &z.answer(&[0xab, 0xcd, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 9])
                .unwrap(),
        )
        .unwrap();
        assert_eq!(reply.metadata.id, 0xabcd);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    }

    #[test]
    fn only_plain_queries_for_names_outside_the_zone_are_forwarded() {
        let z = zone();
        let out = |m: &Message| z.outside(&m.to_vec().unwrap()).is_some();
        assert!(out(&query("www.example.org.")));
        assert!(!out(&query("web.site-a.tunnel.")), "a name of the zone");
        assert!(!out(&query("nothing-here.tunnel.")), "NXDOMAIN of the zone");
        let mut two = query("www.example.org.");
        two.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("other.example.org.").unwrap(),
            RecordType::A,
        ));
        assert!(!out(&two));
        let mut update = query("www.example.org.");
        update.metadata.op_code = OpCode::Update;
        assert!(!out(&update));
        assert!(z.outside(b"garbage").is_none());
    }

    #[test]
    fn only_the_tunnels_subnets_may_have_names_resolved() {
        let peers = [
            "10.77.0.0/24".parse().unwrap(),
            "fd00:77::/64".parse().unwrap(),
        ];
        assert!(within(&peers, "10.77.0.9".parse().unwrap()));
        assert!(within(&peers, "fd00:77::9".parse().unwrap()));
        assert!(!within(&peers, "192.168.1.5".parse().unwrap()));
        assert!(!within(&peers, "fd00::5".parse().unwrap()));
    }

    #[test]
    fn labels_and_zones() {
        assert_eq!(label("My_App.v2"), "my-app-v2");
        assert_eq!(label("-x-"), "x");
        assert!(parse_zone("corp.example").is_ok());
        assert!(parse_zone("").is_err());
        assert!(parse_zone("a..b").is_err());
    }

    fn zone_of(state: &ServerState) -> Zone {
        Zone::from_state(state, &parse_zone("tunnel").unwrap())
    }

    fn names(z: &Zone) -> Vec<String> {
        let mut n: Vec<String> = z.names.keys().map(|n| n.to_string()).collect();
        n.sort();
        n
    }

    #[test]
    fn an_unnamed_hub_is_hub_and_unlabelable_or_orphaned_names_are_left_out() {
        let mut s = ServerState::new("10.77.0.0/24".parse().unwrap(), 51820, 1420);
        s.peers.push(peer("10.77.0.3", None, None));
        // A container of that unnamed site: under its made-up name.
        s.peers
            .push(peer("10.77.0.4", Some("db"), Some("10.77.0.3")));
        // A container whose site is not (or no longer) a peer.
        s.peers
            .push(peer("10.77.0.5", Some("cache"), Some("10.77.0.99")));
        // A container without a name yet (the driver's, before it starts).
        s.peers.push(peer("10.77.0.6", None, Some("10.77.0.3")));
        // A name with nothing a label can hold.
        s.peers.push(peer("10.77.0.7", Some("___"), None));
        let z = zone_of(&s);
        assert_eq!(
            names(&z),
            [
                "db.site-10-77-0-3.tunnel.",
                "hub.tunnel.",
                "site-10-77-0-3.tunnel.",
            ]
        );
        // A single-stack tunnel has no AAAA records.
        let m = ask(&z, "hub.tunnel.", RecordType::AAAA);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn two_endpoints_with_one_name_leave_it_to_the_first() {
        let mut s = ServerState::new("10.77.0.0/24".parse().unwrap(), 51820, 1420);
        s.peers.push(peer("10.77.0.3", Some("Branch"), None));
        s.peers.push(peer("10.77.0.4", Some("branch"), None));
        let z = zone_of(&s);
        assert_eq!(z.len(), 2, "{:?}", names(&z));
        assert_eq!(
            addrs(&ask(&z, "branch.tunnel.", RecordType::A)),
            ["10.77.0.3"]
        );
    }

    #[test]
    fn a_label_is_cut_to_63_bytes_and_trimmed_of_hyphens() {
        let long = format!("{}_tail", "a".repeat(62));
        assert_eq!(label(&long), "a".repeat(62));
        assert_eq!(label(&"b".repeat(80)).len(), 63);
        assert_eq!(label("Ünïcode"), "n-code");
    }

    #[test]
    fn a_zone_is_a_lower_case_fqdn() {
        let z = parse_zone("Corp.Example").unwrap();
        assert!(z.is_fqdn());
        assert_eq!(z.to_string(), "corp.example.");
        let e = parse_zone(&"a".repeat(201)).unwrap_err();
        assert!(e.to_string().contains("1 to 200 characters"), "{e}");
    }

    /// The answer to `q` as sent, parsed.
    fn answer(z: &Zone, q: &Message) -> Option<Message> {
        z.answer(&q.to_vec().unwrap())
            .map(|a| Message::from_vec(&a).unwrap())
    }

    fn query(name: &str) -> Message {
        let mut q = Message::query();
        q.add_query(hickory_proto::op::Query::query(
            Name::from_ascii(name).unwrap(),
            RecordType::A,
        ));
        q
    }

    #[test]
    fn only_plain_queries_with_one_question_are_answered() {
        let z = zone();
        // A response is never answered (no loops between two servers).
        let mut r = query("hq.tunnel.");
        r.metadata.message_type = MessageType::Response;
        assert!(answer(&z, &r).is_none());
        let mut notify = query("hq.tunnel.");
        notify.metadata.op_code = OpCode::Notify;
        let a = answer(&z, &notify).unwrap();
        assert_eq!(a.metadata.response_code, ResponseCode::NotImp);
        let mut two = query("hq.tunnel.");
        two.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("web.hq.tunnel.").unwrap(),
            RecordType::A,
        ));
        let a = answer(&z, &two).unwrap();
        assert_eq!(a.metadata.response_code, ResponseCode::FormErr);
        assert!(a.answers.is_empty());
    }

    #[test]
    fn an_answer_echoes_the_id_and_recursion_desired_and_offers_no_recursion() {
        let z = zone();
        let mut q = query("hq.tunnel.");
        q.metadata.id = 4242;
        q.metadata.recursion_desired = true;
        let a = answer(&z, &q).unwrap();
        assert_eq!(a.metadata.id, 4242);
        assert!(a.metadata.recursion_desired);
        assert!(!a.metadata.recursion_available);
        assert_eq!(a.metadata.message_type, MessageType::Response);
        assert_eq!(a.answers[0].ttl, TTL);
    }

    #[test]
    fn a_long_udp_answer_becomes_a_truncated_header() {
        let short = vec![7u8; 100];
        assert_eq!(fit_udp(short.clone()), short);
        let mut long = vec![0u8; 600];
        long[..12].copy_from_slice(&[0xab, 0xcd, 0x84, 0x00, 0, 1, 0, 30, 0, 0, 0, 0]);
        let cut = fit_udp(long);
        assert_eq!(cut, [0xab, 0xcd, 0x86, 0x00, 0, 0, 0, 0, 0, 0, 0, 0]);
        let m = Message::from_vec(&cut).unwrap();
        assert!(m.metadata.truncation);
        assert_eq!(m.metadata.id, 0xabcd);
    }
}
