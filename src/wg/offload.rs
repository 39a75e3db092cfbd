//! The userspace backend's TUN device, with the kernel's offloads.
//!
//! Opened with `IFF_VNET_HDR`, and TSO/USO offered to the kernel
//! (`TUNSETOFFLOAD`): the kernel's TCP stack hands us up to 64 KiB per
//! read instead of one MTU-sized packet, which a reader task has tun-rs
//! split into segments (the checksums completed) straight into packet
//! buffers, ahead of the device encrypting them. Decrypted packets go the
//! other way in batches: the device hands over each batch it decrypted
//! (our gotatun's `IpSend::send_many`) to a writer task, which coalesces
//! it per TCP/UDP flow (GRO) and writes few super-packets, so the
//! receiving stack sees one packet where there were dozens. That is
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
use tokio::sync::{mpsc, watch};
use tun_rs::{GROTable, VIRTIO_NET_HDR_LEN};

/// Segments one read may yield: a 64 KiB TSO packet at the smallest MSS
/// the tunnel's MTU allows (IPv6 minimum 1280) fits with room to spare.
const SEGMENTS: usize = 64;
/// Decrypted packets coalesced and written together at most.
const WRITE_BATCH: usize = 64;
/// Decrypted batches waiting for the writer at most: the decrypting side
/// waits beyond that, as it would for a slow TUN.
const WRITE_QUEUE: usize = 4;
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

/// The TUN, shared by the read and write halves.
#[derive(Clone)]
pub struct OffloadTun {
    dev: Arc<tun_rs::AsyncDevice>,
    mtu: MtuWatcher,
    /// Decrypted batches, to the writing task: decrypting the next batch
    /// overlaps with writing this one (a hand-off per batch, not per
    /// packet).
    batches: mpsc::Sender<Vec<Packet<Ip>>>,
    /// Its tasks (writer, MTU watch) end when the last clone is dropped.
    _tasks: Arc<Tasks>,
    reader: Reader,
}

/// The TUN's tasks: the MTU watch and the writer from the start, the
/// reader from the first read.
struct Tasks(std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        let tasks = self.0.get_mut().unwrap_or_else(|e| e.into_inner());
        for t in tasks.iter() {
            t.abort();
        }
    }
}

/// A batch the reading task read, or why it could not.
type ReadBatch = io::Result<Vec<Packet<Ip>>>;

/// The reading half of one clone: its task's batches (the task starts at
/// the first read: the clone that only writes never has one), and the
/// batch being handed out.
#[derive(Default)]
struct Reader {
    batches: Option<mpsc::Receiver<ReadBatch>>,
    batch: Vec<Packet<Ip>>,
    /// An error that came after batches already taken: the next read's.
    error: Option<io::Error>,
}

impl Clone for Reader {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Batches read ahead at most: the reader waits beyond that.
const READ_QUEUE: usize = 4;
/// Packets one `recv` hands to the device at most.
const RECV_BATCH: usize = 256;

/// Reads the TUN in a task of its own, so that splitting the next 64 KiB
/// read overlaps with encrypting this one, and small packets that arrive
/// while the device encrypts pile up into one batch (one `sendmmsg`).
async fn read_batches(dev: Arc<tun_rs::AsyncDevice>, tx: mpsc::Sender<ReadBatch>) {
    let pool = PacketBufPool::<4096>::new(4 * SEGMENTS);
    let mut raw = vec![0; READ_BUFFER];
    let mut sizes = vec![0; SEGMENTS];
    let mut segments: Vec<Segment> = Vec::with_capacity(SEGMENTS);
    loop {
        while segments.len() < SEGMENTS {
            segments.push(Segment(pool.get()));
        }
        let batch = match dev
            .recv_multiple(&mut raw, &mut segments, &mut sizes, 0)
            .await
        {
            Ok(n) => Ok(segments
                .drain(..n)
                .zip(sizes.iter())
                .filter_map(|(Segment(mut p), &len)| {
                    p.truncate(len);
                    p.try_into_ip().ok()
                })
                .collect()),
            Err(e) => Err(e),
        };
        let gone = batch.as_ref().is_err_and(|e| {
            matches!(
                e.raw_os_error(),
                Some(libc::EBADF | libc::EBADFD | libc::ENODEV)
            )
        });
        if tx.send(batch).await.is_err() || gone {
            return;
        }
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
        let mut rest = packets.drain(..);
        loop {
            let mut chunk: Vec<Packet<Ip>> = rest.by_ref().take(WRITE_BATCH).collect();
            if chunk.is_empty() {
                return;
            }
            stage(&mut chunk, &mut self.bufs, &mut self.spare);
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
        let (tx, mut rx) = mpsc::channel::<Vec<Packet<Ip>>>(WRITE_QUEUE);
        let writing = dev.clone();
        let tasks = Tasks(std::sync::Mutex::new(vec![
            tokio::spawn(async move {
                let mut w = Writer::default();
                while let Some(mut batch) = rx.recv().await {
                    w.write(&writing, &mut batch).await;
                }
            }),
            tokio::spawn(watch_mtu(Arc::downgrade(&dev), mtu, mtu_tx)),
        ]));
        Ok(Self {
            dev,
            mtu: mtu_rx.into(),
            batches: tx,
            _tasks: Arc::new(tasks),
            reader: Reader::default(),
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
    queued: &mut Vec<Packet<Ip>>,
    bufs: &mut Vec<bytes::BytesMut>,
    spare: &mut Vec<bytes::BytesMut>,
) {
    for p in queued.drain(..) {
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
        let batch = std::mem::take(packets);
        self.batches
            .send(batch)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the TUN writer stopped"))
    }
}

impl IpRecv for OffloadTun {
    async fn recv<'a>(
        &'a mut self,
        _pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        if let Some(e) = self.reader.error.take() {
            return Err(e);
        }
        let r = &mut self.reader;
        let rx = r.batches.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(READ_QUEUE);
            let task = tokio::spawn(read_batches(self.dev.clone(), tx));
            self._tasks
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(task);
            rx
        });
        let stopped = || io::Error::new(io::ErrorKind::BrokenPipe, "the TUN reader stopped");
        r.batch = rx.recv().await.ok_or_else(stopped)??;
        // Whatever else was read meanwhile, in the same batch.
        while r.batch.len() < RECV_BATCH {
            match rx.try_recv() {
                Ok(Ok(more)) => r.batch.extend(more),
                Ok(Err(e)) => {
                    r.error = Some(e);
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(r.batch.drain(..))
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
        stage(&mut queued, &mut bufs, &mut spare);
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
        stage(&mut queued, &mut bufs, &mut spare);
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
        stage(&mut queued, &mut bufs, &mut spare);
        GROTable::default()
            .apply_gro(&mut bufs, VIRTIO_NET_HDR_LEN, false)
            .unwrap();
        let whole = VIRTIO_NET_HDR_LEN + 40 + 10 * 1000;
        assert_eq!((bufs[0].len(), bufs[1].len()), (whole, whole));
    }
}
