//! The coalescing plan, checked the way the kernel would read it: the
//! bytes of each write are split back into segments (as GSO would) and
//! their checksums completed, and what comes out must be what went in.

use super::*;

const MSS: usize = 1380;

/// A TCP (`proto` 6) or UDP (17) packet from port `sport` carrying
/// `payload` bytes whose values follow from `seq`, IPv4 or `v6`, with
/// valid checksums.
fn packet(v6: bool, proto: u8, sport: u16, seq: u32, payload: usize) -> Vec<u8> {
    let (iph, l4h) = (if v6 { 40 } else { 20 }, if proto == 6 { 20 } else { 8 });
    let mut b = vec![0u8; iph + l4h + payload];
    let len = b.len();
    if v6 {
        b[0] = 0x60;
        b[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        b[6] = proto;
        b[7] = 64;
        b[8..24].copy_from_slice(&[0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        b[24..40].copy_from_slice(&[0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    } else {
        b[0] = 0x45;
        b[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        b[6] = 0x40; // don't fragment
        b[8] = 64;
        b[9] = proto;
        b[12..16].copy_from_slice(&[10, 77, 0, 2]);
        b[16..20].copy_from_slice(&[10, 77, 0, 1]);
    }
    let l4 = &mut b[iph..];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&5201u16.to_be_bytes());
    if proto == 6 {
        l4[4..8].copy_from_slice(&seq.to_be_bytes());
        l4[8..12].copy_from_slice(&7u32.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = TCP_ACK;
        l4[14..16].copy_from_slice(&512u16.to_be_bytes());
    } else {
        l4[4..6].copy_from_slice(&((len - iph) as u16).to_be_bytes());
    }
    for (k, byte) in l4[l4h..].iter_mut().enumerate() {
        *byte = (seq as usize + k) as u8;
    }
    complete(&mut b, if proto == 6 { 16 } else { 6 });
    b
}

fn iph(p: &[u8]) -> usize {
    if p[0] >> 4 == 6 { 40 } else { 20 }
}

/// The pseudo-header sum of `p` with transport length `l4_len`.
fn pseudo(p: &[u8], l4_len: usize) -> u64 {
    let (addrs, proto) = if p[0] >> 4 == 6 {
        (&p[8..40], p[6])
    } else {
        (&p[12..20], p[9])
    };
    sum(addrs, 0) + u64::from(proto) + l4_len as u64
}

/// Fills in the IPv4 header checksum and the transport checksum at
/// `offset` in the transport header, from scratch.
fn complete(p: &mut [u8], offset: usize) {
    let h = iph(p);
    if h == 20 {
        p[10..12].fill(0);
        let s = !fold(sum(&p[..20], 0));
        p[10..12].copy_from_slice(&s.to_be_bytes());
    }
    p[h + offset..h + offset + 2].fill(0);
    let s = !fold(sum(&p[h..], pseudo(p, p.len() - h)));
    p[h + offset..h + offset + 2].copy_from_slice(&s.to_be_bytes());
}

/// Whether `p`'s checksums hold, as a receiver checks them.
fn valid(p: &[u8]) -> bool {
    let h = iph(p);
    let ip_ok = h == 40 || fold(sum(&p[..20], 0)) == 0xffff;
    ip_ok && fold(sum(&p[h..], pseudo(p, p.len() - h))) == 0xffff
}

/// What the kernel makes of one write: its packets, split at `gso_size`
/// with every header fixed up as GSO does.
fn kernel_view(hdr: &[u8; HDR_LEN], bytes: &[u8]) -> Vec<Vec<u8>> {
    let field = |k: usize| usize::from(u16::from_ne_bytes([hdr[2 + 2 * k], hdr[3 + 2 * k]]));
    if hdr[1] == 0 {
        assert_eq!(
            hdr, &[0; HDR_LEN],
            "a packet written alone has a zero header"
        );
        return vec![bytes.to_vec()];
    }
    assert_eq!(hdr[0], NEEDS_CSUM);
    let (hdr_len, gso_size, start, offset) = (field(0), field(1), field(2), field(3));
    let h = iph(bytes);
    assert_eq!(start, h);
    // The coalesced packet's own lengths and IPv4 checksum are right.
    if h == 20 {
        assert_eq!(be16(bytes, 2), bytes.len());
        assert_eq!(fold(sum(&bytes[..20], 0)), 0xffff);
    } else {
        assert_eq!(be16(bytes, 4), bytes.len() - 40);
    }
    // The transport checksum field holds the pseudo-header sum.
    assert_eq!(
        u64::from(u16::from_be_bytes([
            bytes[start + offset],
            bytes[start + offset + 1]
        ])),
        u64::from(fold(pseudo(bytes, bytes.len() - h)))
    );
    let tcp = hdr[1] != GSO_UDP_L4;
    let mut out = Vec::new();
    for (k, chunk) in bytes[hdr_len..].chunks(gso_size).enumerate() {
        let mut p = bytes[..hdr_len].to_vec();
        p.extend_from_slice(chunk);
        let len = p.len();
        if h == 20 {
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        } else {
            p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        }
        if tcp {
            let seq = be32(&p, h + 4).wrapping_add((k * gso_size) as u32);
            p[h + 4..h + 8].copy_from_slice(&seq.to_be_bytes());
            // PSH only on the last segment, as the kernel's GSO does.
            if (k + 1) * gso_size < bytes.len() - hdr_len {
                p[h + 13] &= !TCP_PSH;
            }
        } else {
            p[h + 4..h + 6].copy_from_slice(&((len - h) as u16).to_be_bytes());
        }
        complete(&mut p, offset);
        out.push(p);
    }
    out
}

/// Plans `packets` and returns each write as the kernel sees it, along
/// with the number of packets each write carried.
fn run(mut packets: Vec<Vec<u8>>, udp: bool) -> (Vec<Vec<Vec<u8>>>, Vec<usize>) {
    let mut c = Coalescer::default();
    let planned = c.plan(&mut packets, udp);
    let plan: Vec<_> = planned
        .writes()
        .iter()
        .map(|w| {
            (
                w.hdr,
                w.first,
                w.skip,
                planned.members(w).collect::<Vec<_>>(),
            )
        })
        .collect();
    let mut seen = vec![false; packets.len()];
    let (mut writes, mut sizes) = (Vec::new(), Vec::new());
    for (hdr, first, skip, members) in plan {
        let mut bytes = packets[first].clone();
        for &m in &members {
            bytes.extend_from_slice(&packets[m][skip..]);
        }
        for i in std::iter::once(first).chain(members.iter().copied()) {
            assert!(!seen[i], "packet {i} written twice");
            seen[i] = true;
        }
        sizes.push(1 + members.len());
        writes.push(kernel_view(&hdr, &bytes));
    }
    assert!(seen.iter().all(|s| *s), "every packet is written");
    (writes, sizes)
}

/// The kernel's TCP receiver gets its speed from this: a run of in-order
/// segments of one flow is one write, and splitting it gives back the
/// very segments that went in, checksums and all.
#[test]
fn a_run_of_one_flows_segments_is_one_write_that_splits_back_into_them() {
    for v6 in [false, true] {
        let packets: Vec<_> = (0..30u32)
            .map(|i| packet(v6, 6, 40000, 1000 + i * MSS as u32, MSS))
            .collect();
        let (writes, sizes) = run(packets.clone(), false);
        assert_eq!(sizes, [30], "v6 {v6}");
        assert!(writes[0].iter().all(|p| valid(p)));
        assert_eq!(writes[0], packets, "v6 {v6}");
    }
}

/// A shorter last segment and a PSH on it still join; nothing joins after
/// either, and the order of the flow's bytes is kept.
#[test]
fn a_short_or_pushed_segment_ends_a_write() {
    let mut packets: Vec<_> = (0..4u32)
        .map(|i| packet(false, 6, 40000, i * 1000, 1000))
        .collect();
    packets.push(packet(false, 6, 40000, 4000, 500));
    packets.push(packet(false, 6, 40000, 4500, 1000));
    let mut pushed = packet(false, 6, 40000, 5500, 1000);
    pushed[33] |= TCP_PSH;
    complete(&mut pushed, 16);
    packets.push(pushed);
    packets.push(packet(false, 6, 40000, 6500, 1000));
    let (writes, sizes) = run(packets.clone(), false);
    assert_eq!(sizes, [5, 2, 1]);
    assert_eq!(writes.concat(), packets);
}

/// Two flows interleaved: one write each, each flow's bytes in order.
#[test]
fn interleaved_flows_are_coalesced_each_on_its_own() {
    let mut packets = Vec::new();
    for i in 0..10u32 {
        packets.push(packet(false, 6, 40000, i * 1000, 1000));
        packets.push(packet(false, 6, 40001, i * 1000, 1000));
    }
    let (writes, sizes) = run(packets.clone(), false);
    assert_eq!(sizes, [10, 10]);
    let flow = |port: u16| -> Vec<Vec<u8>> {
        packets
            .iter()
            .filter(|p| be16(p, 20) == usize::from(port))
            .cloned()
            .collect()
    };
    assert_eq!(
        (writes[0].clone(), writes[1].clone()),
        (flow(40000), flow(40001))
    );
}

/// A gap in the sequence, a segment with other TCP options, or a packet
/// that may not be coalesced (a pure ACK) starts a new write, and nothing
/// behind it overtakes it.
#[test]
fn gaps_other_options_and_other_packets_keep_their_place() {
    let seg = |seq: u32| packet(false, 6, 40000, seq, 1000);
    let mut ack = packet(false, 6, 40000, 3000, 0);
    ack[33] = TCP_ACK;
    let mut tos = seg(5000);
    tos[1] = 0x02; // ECN capable: another TOS
    complete(&mut tos, 16);
    let packets = vec![
        seg(0),
        seg(1000),
        seg(9000),
        seg(10000),
        ack,
        seg(11000),
        tos,
        seg(6000),
    ];
    let (writes, sizes) = run(packets.clone(), false);
    assert_eq!(sizes, [2, 2, 1, 1, 1, 1]);
    assert_eq!(writes.concat(), packets);
}

/// UDP datagrams of one flow are coalesced only where the kernel takes
/// UDP GSO on a TUN, and then split back exactly.
#[test]
fn udp_datagrams_are_coalesced_only_with_udp_offload() {
    let packets: Vec<_> = (0..20u32)
        .map(|i| packet(false, 17, 40000, i, 64))
        .collect();
    let (writes, sizes) = run(packets.clone(), true);
    assert_eq!(sizes, [20]);
    assert_eq!(writes[0], packets);
    let (_, sizes) = run(packets, false);
    assert_eq!(sizes, vec![1; 20]);
}

/// A coalesced packet stays within the 16-bit length field and the
/// segment limit; the rest of the run starts the next write.
#[test]
fn a_write_stops_at_64_kib_and_64_segments() {
    let packets: Vec<_> = (0..60u32)
        .map(|i| packet(false, 6, 40000, i * MSS as u32, MSS))
        .collect();
    let (writes, sizes) = run(packets.clone(), false);
    assert_eq!(sizes, [47, 13]);
    assert_eq!(writes.concat(), packets);
    let packets: Vec<_> = (0..70u32)
        .map(|i| packet(false, 17, 40000, i, 64))
        .collect();
    let (_, sizes) = run(packets, true);
    assert_eq!(sizes, [MAX_SEGMENTS, 70 - MAX_SEGMENTS]);
}

/// Anything else (ICMP, fragments, IPv4 options, a truncated packet,
/// bytes that are not IP) is written alone and untouched.
#[test]
fn other_packets_are_written_alone_as_they_are() {
    let mut icmp = packet(false, 6, 40000, 0, 100);
    icmp[9] = 1;
    let mut fragment = packet(false, 6, 40000, 0, 100);
    fragment[6] |= 0x20; // more fragments
    let mut short = packet(false, 6, 40000, 0, 100);
    short.truncate(30);
    let packets = vec![icmp, fragment, short, vec![0xff; 5], vec![]];
    let (writes, sizes) = run(packets.clone(), true);
    assert_eq!(sizes, vec![1; 5]);
    assert_eq!(writes.concat(), packets);
}

/// The tables are reused: a second plan over fewer packets knows nothing
/// of the first.
#[test]
fn a_coalescer_plans_each_batch_afresh() {
    let mut c = Coalescer::default();
    let mut first: Vec<_> = (0..10u32)
        .map(|i| packet(false, 6, 40000, i * 1000, 1000))
        .collect();
    assert_eq!(c.plan(&mut first, false).writes().len(), 1);
    let mut second = vec![packet(false, 6, 40000, 10000, 1000)];
    let plan = c.plan(&mut second, false);
    assert_eq!((plan.writes().len(), plan.writes()[0].first), (1, 0));
    assert_eq!(plan.members(&plan.writes()[0]).count(), 0);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

    /// Decrypted packets are whatever an authenticated peer chose to send:
    /// segments with bytes flipped anywhere, or no IP at all. The plan
    /// never panics, writes every packet exactly once, and leaves the
    /// packets it writes alone untouched.
    #[test]
    fn any_bytes_are_planned_without_panic_and_written_once(
        picks in proptest::collection::vec(
            (0u8..4, 0u32..8, proptest::collection::vec((0usize..1500, proptest::prelude::any::<u8>()), 0..3)),
            0..40,
        ),
        udp in proptest::prelude::any::<bool>(),
    ) {
        let packets: Vec<Vec<u8>> = picks
            .iter()
            .map(|(kind, seq, flips)| {
                let mut p = match kind {
                    0 => packet(false, 6, 40000, seq * 100, 100),
                    1 => packet(true, 6, 40000, seq * 100, 100),
                    2 => packet(false, 17, 40000, *seq, 64),
                    _ => vec![0x45; (*seq as usize) * 7],
                };
                for &(at, byte) in flips {
                    if !p.is_empty() {
                        let at = at % p.len();
                        p[at] = byte;
                    }
                }
                p
            })
            .collect();
        let mut planned = packets.clone();
        let mut c = Coalescer::default();
        let plan = c.plan(&mut planned, udp);
        let mut seen = vec![0; packets.len()];
        for w in plan.writes() {
            let members: Vec<usize> = plan.members(w).collect();
            for i in std::iter::once(w.first).chain(members.iter().copied()) {
                seen[i] += 1;
            }
            if members.is_empty() {
                proptest::prop_assert_eq!(w.hdr, [0; HDR_LEN]);
                proptest::prop_assert_eq!(&planned[w.first], &packets[w.first]);
            }
        }
        proptest::prop_assert!(seen.iter().all(|&n| n == 1));
    }
}
