//! The userspace backend's TUN device, with the kernel's offloads.
//!
//! Opened with `IFF_VNET_HDR`, and TSO/USO offered to the kernel
//! (`TUNSETOFFLOAD`): the kernel's TCP stack hands us up to 64 KiB per
//! read instead of one MTU-sized packet, which tun-rs splits into
//! segments (the checksums completed) straight into packet buffers, for
//! the device to encrypt. Decrypted packets go the other way in batches:
//! each batch the device decrypted (our gotatun's `IpSend::send_many`) is
//! coalesced per TCP/UDP flow (GRO) and written as few super-packets, so
//! the receiving stack sees one packet where there were dozens. Both
//! happen on the device's own task, with no hand-off between tasks. That is
//! how wireguard-go got its speed (`tun/offload_linux.go`); tun-rs carries
//! the same segmentation and coalescing in Rust.
//!
//! The kernel is asked for the offloads, not required to give them: a TUN
//! without `IFF_VNET_HDR` (old kernels) reads and writes one packet at a
//! time, as before, with nothing else changed.

use gotatun::packet::{Ip, Packet, PacketBufPool};
use gotatun::tun::{IpRecv, IpSend, MtuWatcher};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tun_rs::{GROTable, VIRTIO_NET_HDR_LEN};

/// Segments one read may yield: a 64 KiB TSO packet at the smallest MSS
/// the tunnel's MTU allows (IPv6 minimum 1280) fits with room to spare.
const SEGMENTS: usize = 64;
/// Decrypted packets coalesced and written together at most.
const WRITE_BATCH: usize = 64;
/// A read from an offloading TUN: the header and up to 64 KiB.
const READ_BUFFER: usize = VIRTIO_NET_HDR_LEN + 65535;
/// A write buffer: tun-rs coalesces a flow's segments into the first
/// one's buffer only if it can hold the whole super-packet (64 KiB) and
/// the header room it keeps on both sides (`InsufficientCap` otherwise,
/// and every packet is written alone). Only the pages a write touches
/// count towards RSS, so most of each buffer is never resident.
const WRITE_BUFFER: usize = 2 * VIRTIO_NET_HDR_LEN + 65535;

#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("creating TUN device {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// A gotatun packet buffer as tun-rs writes segments into it.
struct Segment(Packet<[u8]>);

impl AsRef<[u8]> for Segment {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl AsMut<[u8]> for Segment {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// The TUN, shared by the read and write halves (clones). Each clone
/// reads and writes on the task that calls it: the device's outgoing
/// task reads, its incoming task writes, and no packet is handed to
/// another task on the way (each hand-off cost a wake-up, a cross-core
/// cache transfer and, in a VM, an interrupt: a third of the CPU time).
pub struct OffloadTun {
    dev: Arc<tun_rs::AsyncDevice>,
    mtu: MtuWatcher,
    /// The MTU watch; ends when the last clone is dropped.
    _watch: Arc<AbortOnDrop>,
    reader: Reader,
    writer: Writer,
}

impl Clone for OffloadTun {
    fn clone(&self) -> Self {
        Self {
            dev: self.dev.clone(),
            mtu: self.mtu.clone(),
            _watch: self._watch.clone(),
            reader: Reader::default(),
            writer: Writer::default(),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What one reader keeps between reads: the raw read, the segments'
/// buffers (from a pool of its own) and the batch being handed out.
/// Made at the first read: the clone that only writes never has one.
struct Reader {
    pool: Option<PacketBufPool<4096>>,
    raw: Vec<u8>,
    sizes: Vec<usize>,
    segments: Vec<Segment>,
    batch: Vec<Packet<Ip>>,
}

impl Default for Reader {
    fn default() -> Self {
        Self {
            pool: None,
            raw: Vec::new(),
            sizes: vec![0; SEGMENTS],
            segments: Vec::with_capacity(SEGMENTS),
            batch: Vec::new(),
        }
    }
}

/// Packets one `recv` hands to the device at most.
const RECV_BATCH: usize = 256;

impl Reader {
    /// Moves the `n` segments just read into the batch.
    fn take(&mut self, n: usize) {
        self.batch
            .extend(self.segments.drain(..n).zip(self.sizes.iter()).filter_map(
                |(Segment(mut p), &len)| {
                    p.truncate(len);
                    p.try_into_ip().ok()
                },
            ));
    }

    fn refill(&mut self) {
        let pool = self
            .pool
            .get_or_insert_with(|| PacketBufPool::new_lazy(RECV_BATCH + SEGMENTS));
        while self.segments.len() < SEGMENTS {
            self.segments.push(Segment(pool.get()));
        }
        if self.raw.is_empty() {
            self.raw = vec![0; READ_BUFFER];
        }
    }

    /// Waits for one read. A read of one packet is followed by whatever
    /// else is ready, without waiting: small packets that arrived
    /// meanwhile leave together (one `sendmmsg`), as the segments of a
    /// 64 KiB TSO read do. A TSO read is handed over alone: more behind it
    /// would hold its first segments back, and the TCP sender's clock with
    /// them (measured: 10% less throughput).
    async fn read(&mut self, dev: &tun_rs::AsyncDevice) -> io::Result<()> {
        self.batch.clear();
        self.refill();
        let mut n = dev
            .recv_multiple(&mut self.raw, &mut self.segments, &mut self.sizes, 0)
            .await?;
        self.take(n);
        while n == 1 && self.batch.len() + SEGMENTS <= RECV_BATCH {
            self.refill();
            n = match dev.try_recv_multiple(&mut self.raw, &mut self.segments, &mut self.sizes, 0) {
                Ok(n) => n,
                // Nothing more ready (or an error the next read reports).
                Err(_) => break,
            };
            self.take(n);
        }
        Ok(())
    }
}

/// What one writer keeps between batches: buffers are reused, so the
/// steady state allocates nothing.
#[derive(Default)]
struct Writer {
    gro: GROTable,
    bufs: Vec<bytes::BytesMut>,
    spare: Vec<bytes::BytesMut>,
}

impl Writer {
    /// Writes `packets` (drained), at most [`WRITE_BATCH`] per coalescing
    /// round.
    async fn write(&mut self, dev: &tun_rs::AsyncDevice, packets: &mut Vec<Packet<Ip>>) {
        while !packets.is_empty() {
            let n = packets.len().min(WRITE_BATCH);
            stage(packets.drain(..n), &mut self.bufs, &mut self.spare);
            if let Err(e) = dev
                .send_multiple(&mut self.gro, &mut self.bufs, VIRTIO_NET_HDR_LEN)
                .await
            {
                // As a NIC would: the batch is lost, TCP sends it again.
                tracing::trace!("writing {} packets to the TUN: {e}", self.bufs.len());
            }
            self.spare.append(&mut self.bufs);
        }
    }
}

impl OffloadTun {
    /// Creates TUN `name` with `mtu`, down and without addresses (netlink
    /// configures it, wherever it is moved), offloads offered.
    pub fn create(name: &str, mtu: u16) -> Result<Self, OffloadError> {
        let err = |source| OffloadError::Create {
            name: name.to_owned(),
            source,
        };
        let dev = tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .offload(true)
            .inherit_enable_state()
            .build_async()
            .map_err(err)?;
        if !dev.tcp_gso() {
            tracing::debug!("{name}: the kernel takes no TUN offloads; one packet per read");
        }
        let dev = Arc::new(dev);
        let (mtu_tx, mtu_rx) = watch::channel(mtu);
        let watch = tokio::spawn(watch_mtu(Arc::downgrade(&dev), mtu, mtu_tx));
        Ok(Self {
            dev,
            mtu: mtu_rx.into(),
            _watch: Arc::new(AbortOnDrop(watch)),
            reader: Reader::default(),
            writer: Writer::default(),
        })
    }
}

/// Follows the link's MTU (`ip link set mtu`), as gotatun's own TUN does.
async fn watch_mtu(
    dev: std::sync::Weak<tun_rs::AsyncDevice>,
    mut mtu: u16,
    tx: watch::Sender<u16>,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let Some(dev) = dev.upgrade() else { return };
        if let Ok(now) = dev.mtu()
            && now != mtu
        {
            mtu = now;
            if tx.send(mtu).is_err() {
                return;
            }
        }
    }
}

/// Copies `queued` into write buffers, behind room for the virtio
/// header, reusing `spare` ones (all of [`WRITE_BUFFER`] capacity, so
/// that any of them can take a coalesced flow).
fn stage(
    queued: impl Iterator<Item = Packet<Ip>>,
    bufs: &mut Vec<bytes::BytesMut>,
    spare: &mut Vec<bytes::BytesMut>,
) {
    for p in queued {
        let mut b = spare
            .pop()
            .unwrap_or_else(|| bytes::BytesMut::with_capacity(WRITE_BUFFER));
        b.clear();
        b.resize(VIRTIO_NET_HDR_LEN, 0);
        b.extend_from_slice(&p.into_bytes());
        bufs.push(b);
    }
}

impl IpSend for OffloadTun {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        self.send_many(&mut vec![packet]).await
    }

    async fn send_many(&mut self, packets: &mut Vec<Packet<Ip>>) -> io::Result<()> {
        self.writer.write(&self.dev, packets).await;
        Ok(())
    }
}

impl IpRecv for OffloadTun {
    async fn recv<'a>(
        &'a mut self,
        _pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        self.reader.read(&self.dev).await?;
        Ok(self.reader.batch.drain(..))
    }

    fn mtu(&self) -> MtuWatcher {
        self.mtu.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    /// An IPv4 TCP segment (ACK) of one flow: `seq`, `payload` bytes.
    fn segment(seq: u32, payload: usize) -> Packet<Ip> {
        let total = 20 + 20 + payload;
        let mut b = BytesMut::zeroed(total);
        b[0] = 0x45;
        b[2..4].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
        b[6] = 0x40; // don't fragment
        b[8] = 64;
        b[9] = 6;
        b[12..16].copy_from_slice(&[10, 77, 0, 2]);
        b[16..20].copy_from_slice(&[10, 77, 0, 1]);
        let tcp = &mut b[20..];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x10; // ACK
        tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
        checksum(&mut b);
        Packet::from_bytes(b).try_into_ip().unwrap()
    }

    /// Fills in the IPv4 header's and the TCP checksum: tun-rs checks
    /// them before it coalesces, as the kernel would.
    fn checksum(b: &mut [u8]) {
        let sum = |data: &[u8], mut acc: u32| {
            for c in data.chunks(2) {
                acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            while acc > 0xffff {
                acc = (acc & 0xffff) + (acc >> 16);
            }
            !(acc as u16)
        };
        let ip = sum(&b[..20], 0);
        b[10..12].copy_from_slice(&ip.to_be_bytes());
        let tcp_len = u16::try_from(b.len() - 20).unwrap();
        let mut pseudo = Vec::from(&b[12..20]);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&tcp_len.to_be_bytes());
        let partial = u32::from(!sum(&pseudo, 0));
        let tcp = sum(&b[20..], partial);
        b[36..38].copy_from_slice(&tcp.to_be_bytes());
    }

    /// What the kernel's TCP receiver needs for speed: a run of in-order
    /// segments of one flow becomes one write of all their bytes.
    #[test]
    fn a_run_of_one_flows_segments_is_coalesced_into_one_write() {
        const MSS: usize = 1380;
        let mut queued: Vec<_> = (0..40u32).map(|i| segment(i * MSS as u32, MSS)).collect();
        let (mut bufs, mut spare) = (Vec::new(), Vec::new());
        stage(queued.drain(..), &mut bufs, &mut spare);
        let before: Vec<usize> = bufs.iter().map(BytesMut::len).collect();
        GROTable::default()
            .apply_gro(&mut bufs, VIRTIO_NET_HDR_LEN, false)
            .unwrap();
        // The first buffer holds the super-packet; the others are left
        // as they were (tun-rs writes only the first).
        assert_eq!(bufs[0].len(), VIRTIO_NET_HDR_LEN + 40 + 40 * MSS);
        assert_eq!(
            bufs[1..].iter().map(BytesMut::len).collect::<Vec<_>>(),
            before[1..]
        );
        // The buffers go back to be reused, each still able to take a
        // whole super-packet.
        spare.append(&mut bufs);
        let mut queued = vec![segment(0, MSS)];
        stage(queued.drain(..), &mut bufs, &mut spare);
        assert!(bufs[0].capacity() >= WRITE_BUFFER);
        assert_eq!(bufs[0].len(), VIRTIO_NET_HDR_LEN + 40 + MSS);
    }

    /// Segments of two flows interleaved: two writes, one per flow.
    #[test]
    fn interleaved_flows_are_coalesced_each_on_its_own() {
        let mut queued = Vec::new();
        for i in 0..10u32 {
            queued.push(segment(i * 1000, 1000));
            let mut other = segment(i * 1000, 1000).into_bytes();
            other[20..22].copy_from_slice(&40001u16.to_be_bytes());
            other[36..38].fill(0);
            checksum(&mut other);
            queued.push(other.try_into_ip().unwrap());
        }
        let (mut bufs, mut spare) = (Vec::new(), Vec::new());
        stage(queued.drain(..), &mut bufs, &mut spare);
        GROTable::default()
            .apply_gro(&mut bufs, VIRTIO_NET_HDR_LEN, false)
            .unwrap();
        let whole = VIRTIO_NET_HDR_LEN + 40 + 10 * 1000;
        assert_eq!((bufs[0].len(), bufs[1].len()), (whole, whole));
    }
}
