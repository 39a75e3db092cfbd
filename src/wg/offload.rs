//! The userspace backend's TUN device, with the kernel's offloads.
//!
//! Opened with `IFF_VNET_HDR`, and TSO/USO offered to the kernel
//! (`TUNSETOFFLOAD`): the kernel's TCP stack hands us up to 64 KiB per
//! read instead of one MTU-sized packet, which tun-rs splits into
//! segments (the checksums completed) straight into packet buffers, for
//! the device to encrypt. Decrypted packets go the other way in batches:
//! each batch the device decrypted (our gotatun's `IpSend::send_many`) is
//! coalesced per TCP/UDP flow (GRO, planned by [`super::gro`]) and written
//! as few super-packets, each with one `writev` from where its segments
//! were decrypted, so the receiving stack sees one packet where there were
//! dozens. Both happen on the device's own task, with no hand-off between
//! tasks. That is how wireguard-go got its speed (`tun/offload_linux.go`);
//! tun-rs carries its segmentation in Rust.
//!
//! The kernel is asked for the offloads, not required to give them: a TUN
//! without `IFF_VNET_HDR` (old kernels) reads and writes one packet at a
//! time, as before, with nothing else changed.

use super::gro::{Coalescer, MAX_SEGMENTS};
use gotatun::packet::{Ip, Packet, PacketBufPool};
use gotatun::tun::{IpRecv, IpSend, MtuWatcher};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tun_rs::VIRTIO_NET_HDR_LEN;

/// Segments one read may yield: a 64 KiB TSO packet at the smallest MSS
/// the tunnel's MTU allows (IPv6 minimum 1280) fits with room to spare.
const SEGMENTS: usize = 64;
/// A read from an offloading TUN: the header and up to 64 KiB.
const READ_BUFFER: usize = VIRTIO_NET_HDR_LEN + 65535;
const _: () = assert!(super::gro::HDR_LEN == VIRTIO_NET_HDR_LEN);

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

/// What one writer keeps between batches: the batch's packets and the
/// coalescing tables, reused, so the steady state allocates nothing.
#[derive(Default)]
struct Writer {
    gro: Coalescer,
    packets: Vec<Packet<[u8]>>,
}

/// Slices of one `writev` at most: the header, the first packet and the
/// others' payloads.
const IOV: usize = 2 + MAX_SEGMENTS;

impl Writer {
    /// Writes `packets` (drained): coalesced per flow where the TUN takes
    /// offloads (see [`super::gro`]), each with one `writev` from where it
    /// was decrypted; one by one otherwise.
    async fn write(&mut self, dev: &tun_rs::AsyncDevice, packets: &mut Vec<Packet<Ip>>) {
        self.packets
            .extend(packets.drain(..).map(Packet::into_bytes));
        if !dev.tcp_gso() {
            for p in &self.packets {
                if let Err(e) = dev.send(p).await {
                    tracing::trace!("writing a packet to the TUN: {e}");
                }
            }
            self.packets.clear();
            return;
        }
        let plan = self.gro.plan(&mut self.packets, dev.udp_gso());
        for w in plan.writes() {
            let mut iov = [io::IoSlice::new(&[]); IOV];
            iov[0] = io::IoSlice::new(&w.hdr);
            iov[1] = io::IoSlice::new(&self.packets[w.first][..]);
            let mut n = 2;
            for m in plan.members(w) {
                iov[n] = io::IoSlice::new(&self.packets[m][w.skip..]);
                n += 1;
            }
            if let Err(e) = dev.send_vectored(&iov[..n]).await {
                // As a NIC would: the packet is lost, TCP sends it again.
                tracing::trace!("writing {n} slices to the TUN: {e}");
            }
        }
        self.packets.clear();
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
