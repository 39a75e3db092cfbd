//! Coalescing decrypted packets per flow (GRO) for an offloading TUN.
//!
//! A batch of decrypted packets is planned into writes: the in-order
//! segments of one TCP flow (or equal-sized datagrams of one UDP flow)
//! become one super-packet behind a virtio header that asks the kernel to
//! treat it as GSO, everything else is written alone. The plan names the
//! packets; the segments stay where they were decrypted and the caller
//! writes each plan with one `writev`, so the kernel's copy into its
//! buffer is the only one. tun-rs's coalescing, which this replaces,
//! copied every segment twice (into a write buffer, then onto the flow's
//! first one), allocated per segment and summed every checksum: 15% of the
//! receiving end's CPU in a profile of single-stream TCP.
//!
//! Checksums are not verified: each packet came with a Poly1305 tag from
//! the peer that built it, so a bad checksum could only be that peer's
//! own, and it could send any bytes anyway. The kernel's WireGuard marks
//! decrypted packets `CHECKSUM_UNNECESSARY` for the same reason. A
//! coalesced packet carries the pseudo-header sum with `NEEDS_CSUM`, as
//! wireguard-go's and tun-rs's do, and the kernel completes it if the
//! packet is forwarded.
//!
//! The rules are wireguard-go's (`tun/offload_linux.go`): only IPv4
//! without options or fragments and IPv6 without extension headers; TCP
//! segments carrying data with ACK (and PSH on the last) only, with equal
//! header lengths, options, acknowledgement, TOS/traffic class and TTL/hop
//! limit, each starting where the previous one ended; every segment but
//! the last of the same size. Segments are only appended, never
//! prepended: what arrives out of order leaves as it came.

use std::ops::{Deref, DerefMut};

/// Bytes of the virtio header (`struct virtio_net_hdr`) before each write.
pub const HDR_LEN: usize = 10;
/// Segments one coalesced write holds at most: the kernel's UDP GSO limit
/// on the oldest kernels with UDP offload on a TUN.
pub const MAX_SEGMENTS: usize = 64;
/// An IPv4 packet's length field is 16 bits; IPv6's payload length too.
const MAX_LEN: usize = 65535;
/// Open flows a packet is matched against: the most recent ones. A flow
/// beyond them is never appended to again, which keeps its order.
const WINDOW: usize = 8;

const NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// A flow: addresses, ports, protocol.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Flow {
    v6: bool,
    proto: Proto,
    src: [u8; 16],
    dst: [u8; 16],
    ports: [u8; 4],
}

/// What a packet that may be coalesced says in its headers.
struct Seg {
    flow: Flow,
    /// IP and transport header lengths.
    iph: usize,
    l4h: usize,
    payload: usize,
    seq: u32,
    ack: u32,
    psh: bool,
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The headers of `p` if it may be coalesced (UDP only with `udp`).
fn parse(p: &[u8], udp: bool) -> Option<Seg> {
    let mut src = [0; 16];
    let mut dst = [0; 16];
    let (iph, proto, v6) = match p.first()? >> 4 {
        4 => {
            // No options, the length as received, no fragment.
            if p.len() < 20 || p[0] & 0x0f != 5 || be16(p, 2) != p.len() || be16(p, 6) & 0x3fff != 0
            {
                return None;
            }
            src[..4].copy_from_slice(&p[12..16]);
            dst[..4].copy_from_slice(&p[16..20]);
            (20, p[9], false)
        }
        6 => {
            // The transport header right behind (no extension headers).
            if p.len() < 40 || be16(p, 4) + 40 != p.len() {
                return None;
            }
            src.copy_from_slice(&p[8..24]);
            dst.copy_from_slice(&p[24..40]);
            (40, p[6], true)
        }
        _ => return None,
    };
    let l4 = &p[iph..];
    let (proto, l4h, seq, ack, psh) = match proto {
        6 if l4.len() >= 20 => {
            let l4h = usize::from(l4[12] >> 4) * 4;
            let flags = l4[13];
            if l4h < 20 || l4h > l4.len() || (flags != TCP_ACK && flags != TCP_ACK | TCP_PSH) {
                return None;
            }
            (
                Proto::Tcp,
                l4h,
                be32(l4, 4),
                be32(l4, 8),
                flags & TCP_PSH != 0,
            )
        }
        17 if udp && l4.len() >= 8 && be16(l4, 4) == l4.len() => (Proto::Udp, 8, 0, 0, false),
        _ => return None,
    };
    let payload = l4.len() - l4h;
    (payload > 0).then(|| Seg {
        flow: Flow {
            v6,
            proto,
            src,
            dst,
            ports: [l4[0], l4[1], l4[2], l4[3]],
        },
        iph,
        l4h,
        payload,
        seq,
        ack,
        psh,
    })
}

/// Packets written as one: the first whole, the others' payloads behind.
struct Item {
    /// `None`: a packet written alone as it is.
    flow: Option<Flow>,
    first: usize,
    last: usize,
    segs: usize,
    iph: usize,
    l4h: usize,
    /// Payload bytes per segment (the first's).
    gso: usize,
    /// Bytes of the coalesced packet so far.
    len: usize,
    next_seq: u32,
    ack: u32,
    psh: bool,
    /// Whether another segment may follow.
    open: bool,
}

/// Whether `p` (parsed as `s`) may follow `item`, whose first packet is
/// `f`: the rules in the module's overview.
fn fits(item: &Item, f: &[u8], p: &[u8], s: &Seg) -> bool {
    let same_ip = if s.flow.v6 {
        f[0] == p[0] && f[1] >> 4 == p[1] >> 4 && f[7] == p[7]
    } else {
        f[1] == p[1] && f[6] >> 5 == p[6] >> 5 && f[8] == p[8]
    };
    let same_l4 = match s.flow.proto {
        Proto::Tcp => {
            let opts = s.iph + 20..s.iph + s.l4h;
            s.l4h == item.l4h
                && s.ack == item.ack
                && s.seq == item.next_seq
                && f[opts.clone()] == p[opts]
        }
        Proto::Udp => true,
    };
    item.open
        && same_ip
        && same_l4
        && s.payload <= item.gso
        && item.segs < MAX_SEGMENTS
        && item.len + s.payload <= MAX_LEN
}

/// One write: a virtio header, then `first` whole, then the payload (past
/// `skip` header bytes) of each packet [`Coalescer::members`] names.
pub struct Write {
    pub hdr: [u8; HDR_LEN],
    pub first: usize,
    pub skip: usize,
    item: usize,
}

/// Plans writes; keeps its tables between batches so that the steady
/// state allocates nothing.
#[derive(Default)]
pub struct Coalescer {
    items: Vec<Item>,
    /// The packet after each one in its item, `usize::MAX` at the end.
    next: Vec<usize>,
    writes: Vec<Write>,
}

impl Coalescer {
    /// Plans the writes of `packets`, in the order of each write's first
    /// packet, and completes the headers of the coalesced ones' first
    /// packets. UDP is coalesced only with `udp` (the kernel takes UDP
    /// GSO on a TUN since 6.2).
    pub fn plan<B: DerefMut<Target = [u8]>>(&mut self, packets: &mut [B], udp: bool) -> &Self {
        self.items.clear();
        self.writes.clear();
        self.next.clear();
        self.next.resize(packets.len(), usize::MAX);
        for i in 0..packets.len() {
            self.add(packets, i, udp);
        }
        for (n, item) in self.items.iter().enumerate() {
            let hdr = match item.flow {
                Some(flow) if item.segs > 1 => finish(&mut packets[item.first], item, flow),
                _ => [0; HDR_LEN],
            };
            self.writes.push(Write {
                hdr,
                first: item.first,
                skip: item.iph + item.l4h,
                item: n,
            });
        }
        self
    }

    /// The writes the last [`Coalescer::plan`] made, in order.
    pub fn writes(&self) -> &[Write] {
        &self.writes
    }

    /// The packets after the first in `write`, in order.
    pub fn members(&self, write: &Write) -> impl Iterator<Item = usize> + '_ {
        let first = self.items[write.item].first;
        let link = |i: usize| (i != usize::MAX).then_some(i);
        std::iter::successors(link(self.next[first]), move |&i| link(self.next[i]))
    }

    fn add<B: Deref<Target = [u8]>>(&mut self, packets: &[B], i: usize, udp: bool) {
        let p = &packets[i][..];
        let seg = parse(p, udp);
        let flow = seg.as_ref().map(|s| s.flow).or_else(|| loose_flow(p));
        // The flow's most recent item, if it is recent enough to extend.
        let start = self.items.len().saturating_sub(WINDOW);
        let open = flow.and_then(|flow| {
            (start..self.items.len())
                .rev()
                .find(|&n| self.items[n].open && self.items[n].flow == Some(flow))
        });
        if let (Some(n), Some(s)) = (open, &seg) {
            let item = &self.items[n];
            if fits(item, &packets[item.first], p, s) {
                self.next[item.last] = i;
                let item = &mut self.items[n];
                item.last = i;
                item.segs += 1;
                item.len += s.payload;
                item.next_seq = item.next_seq.wrapping_add(s.payload as u32);
                item.psh = s.psh;
                // Nothing follows a short segment or a push.
                item.open = s.payload == item.gso && !s.psh;
                return;
            }
        }
        if let Some(n) = open {
            // Later packets of the flow must not overtake this one.
            self.items[n].open = false;
        }
        self.items.push(match seg {
            Some(s) => Item {
                flow: Some(s.flow),
                first: i,
                last: i,
                segs: 1,
                iph: s.iph,
                l4h: s.l4h,
                gso: s.payload,
                len: p.len(),
                next_seq: s.seq.wrapping_add(s.payload as u32),
                ack: s.ack,
                psh: s.psh,
                open: !s.psh,
            },
            None => Item {
                flow: None,
                first: i,
                last: i,
                segs: 1,
                iph: 0,
                l4h: 0,
                gso: 0,
                len: p.len(),
                next_seq: 0,
                ack: 0,
                psh: false,
                open: false,
            },
        });
    }
}

/// The flow of a TCP or UDP packet that may not be coalesced (a SYN, a
/// pure ACK, a fragment's first part): it closes the flow's open item.
fn loose_flow(p: &[u8]) -> Option<Flow> {
    let (iph, proto, v6) = match p.first()? >> 4 {
        4 if p.len() >= 20 => (usize::from(p[0] & 0x0f) * 4, p[9], false),
        6 if p.len() >= 40 => (40, p[6], true),
        _ => return None,
    };
    let proto = match proto {
        6 => Proto::Tcp,
        17 => Proto::Udp,
        _ => return None,
    };
    let ports = p.get(iph..iph + 4)?;
    let mut src = [0; 16];
    let mut dst = [0; 16];
    if v6 {
        src.copy_from_slice(&p[8..24]);
        dst.copy_from_slice(&p[24..40]);
    } else {
        src[..4].copy_from_slice(&p[12..16]);
        dst[..4].copy_from_slice(&p[16..20]);
    }
    Some(Flow {
        v6,
        proto,
        src,
        dst,
        ports: [ports[0], ports[1], ports[2], ports[3]],
    })
}

/// Makes `p`, the first of `item`'s packets, the head of the coalesced
/// packet (lengths, IPv4 checksum, the pseudo-header sum, PSH) and
/// returns its virtio header.
fn finish(p: &mut [u8], item: &Item, flow: Flow) -> [u8; HDR_LEN] {
    let (iph, len) = (item.iph, item.len);
    let l4_len = len - iph;
    if flow.v6 {
        p[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[10..12].fill(0);
        let sum = !fold(sum(&p[..iph], 0));
        p[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    let addrs = if flow.v6 { 16 } else { 4 };
    let mut pseudo = sum(&flow.src[..addrs], 0);
    pseudo = sum(&flow.dst[..addrs], pseudo);
    let (gso_type, proto, csum_offset) = match flow.proto {
        Proto::Tcp if flow.v6 => (GSO_TCPV6, 6u8, 16usize),
        Proto::Tcp => (GSO_TCPV4, 6, 16),
        Proto::Udp => (GSO_UDP_L4, 17, 6),
    };
    pseudo += u64::from(proto) + l4_len as u64;
    match flow.proto {
        Proto::Tcp if item.psh => p[iph + 13] |= TCP_PSH,
        Proto::Tcp => {}
        Proto::Udp => p[iph + 4..iph + 6].copy_from_slice(&(l4_len as u16).to_be_bytes()),
    }
    let at = iph + csum_offset;
    p[at..at + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
    // The TUN reads the header in the host's byte order (legacy virtio).
    let mut hdr = [0; HDR_LEN];
    hdr[0] = NEEDS_CSUM;
    hdr[1] = gso_type;
    for (k, v) in [iph + item.l4h, item.gso, iph, csum_offset]
        .into_iter()
        .enumerate()
    {
        hdr[2 + 2 * k..4 + 2 * k].copy_from_slice(&(v as u16).to_ne_bytes());
    }
    hdr
}

/// The ones' complement sum of `data` as big-endian 16-bit words, added
/// to `acc`, unfolded.
fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// `acc` folded to 16 bits (not complemented).
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
#[path = "gro_tests.rs"]
mod tests;
