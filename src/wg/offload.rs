//! The userspace backend's TUN device, with the kernel's offloads.
//!
//! Opened with `IFF_VNET_HDR`, and TSO/USO offered to the kernel
//! (`TUNSETOFFLOAD`): the kernel's TCP stack hands us up to 64 KiB per
//! read instead of one MTU-sized packet, which tun-rs splits into
//! segments (the checksums completed) straight into gotatun's packet
//! buffers, before they are encrypted. Decrypted packets go the other way
//! in batches: whatever queued up while the last batch was written is
//! coalesced per TCP/UDP flow (GRO) and written as few super-packets, so
//! the receiving stack sees one packet where there were dozens. That is
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
/// A read from an offloading TUN: the header and up to 64 KiB.
const READ_BUFFER: usize = VIRTIO_NET_HDR_LEN + 65535;

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
    writer: mpsc::Sender<Packet<Ip>>,
    /// Its tasks (writer, MTU watch) end when the last clone is dropped.
    _tasks: Arc<Tasks>,
    reader: Reader,
}

struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// What one reader keeps between reads (allocated at its first read: the
/// clone that only writes never pays for it).
#[derive(Default)]
struct Reader {
    raw: Vec<u8>,
    segments: Vec<Segment>,
    sizes: Vec<usize>,
}

impl Clone for Reader {
    fn clone(&self) -> Self {
        Self::default()
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
        let (tx, rx) = mpsc::channel(4 * WRITE_BATCH);
        let tasks = Tasks(vec![
            tokio::spawn(write_batches(dev.clone(), rx)),
            tokio::spawn(watch_mtu(Arc::downgrade(&dev), mtu, mtu_tx)),
        ]);
        Ok(Self {
            dev,
            mtu: mtu_rx.into(),
            writer: tx,
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

/// Writes decrypted packets: each batch is what queued up meanwhile,
/// coalesced per flow. Buffers are kept across batches (the ones that
/// became super-packets keep their size), so the steady state allocates
/// nothing.
async fn write_batches(dev: Arc<tun_rs::AsyncDevice>, mut rx: mpsc::Receiver<Packet<Ip>>) {
    let mut gro = GROTable::default();
    let mut queued: Vec<Packet<Ip>> = Vec::with_capacity(WRITE_BATCH);
    let mut bufs: Vec<bytes::BytesMut> = Vec::with_capacity(WRITE_BATCH);
    let mut spare: Vec<bytes::BytesMut> = Vec::with_capacity(WRITE_BATCH);
    loop {
        if rx.recv_many(&mut queued, WRITE_BATCH).await == 0 {
            return;
        }
        // Let the decrypting side add what it has in hand, while it has
        // some: a few yields make batches worth coalescing (measured: one
        // yield gives single-stream TCP a fifth more than none).
        for _ in 0..4 {
            if queued.len() >= WRITE_BATCH {
                break;
            }
            tokio::task::yield_now().await;
            let before = queued.len();
            while queued.len() < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(p) => queued.push(p),
                    Err(_) => break,
                }
            }
            if queued.len() == before {
                break;
            }
        }
        for p in queued.drain(..) {
            let mut b = spare.pop().unwrap_or_default();
            b.clear();
            b.resize(VIRTIO_NET_HDR_LEN, 0);
            b.extend_from_slice(&p.into_bytes());
            bufs.push(b);
        }
        if let Err(e) = dev
            .send_multiple(&mut gro, &mut bufs, VIRTIO_NET_HDR_LEN)
            .await
        {
            // As a NIC would: the batch is lost, TCP sends it again.
            tracing::trace!("writing {} packets to the TUN: {e}", bufs.len());
        }
        // Super-packets grew to 64 KiB: keep a few of those, not a batch.
        spare.extend(bufs.drain(..).filter(|b| b.capacity() <= 4 * 4096));
    }
}

impl IpSend for OffloadTun {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        self.writer
            .send(packet)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the TUN writer stopped"))
    }
}

impl IpRecv for OffloadTun {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        let r = &mut self.reader;
        if r.raw.is_empty() {
            r.raw = vec![0; READ_BUFFER];
            r.sizes = vec![0; SEGMENTS];
        }
        while r.segments.len() < SEGMENTS {
            r.segments.push(Segment(pool.get()));
        }
        let n = self
            .dev
            .recv_multiple(&mut r.raw, &mut r.segments, &mut r.sizes, 0)
            .await?;
        let sizes = &r.sizes[..n];
        Ok(r.segments
            .drain(..n)
            .zip(sizes.iter())
            .filter_map(|(Segment(mut p), &len)| {
                p.truncate(len);
                p.try_into_ip().ok()
            }))
    }

    fn mtu(&self) -> MtuWatcher {
        self.mtu.clone()
    }
}
