//! The embedded userspace WireGuard: gotatun over a TUN device, in this
//! process and on its tokio runtime. gotatun types stay in this file.
//!
//! The UDP socket lives in the namespace where the device was created; the
//! UAPI socket is the standard `/var/run/wireguard/<name>.sock`, so stock
//! `wg show <name>` reads it.

use super::mesh::{MeshSocket, Verdict};
use super::{BackendKind, Cause, DeviceSpec, PeerSpec, PeerStatus, WgDevice, WgError, uapi_socket};
use crate::keys::{PrivateKey, PublicKey};
use crate::mesh::relay_id;
use crate::mesh::wire::{RELAY_HEADER, is_ours};
use crate::net::NetOps;
use crate::transport::{Relay, is_virtual};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use gotatun::device::uapi::UapiServer;
use gotatun::device::{Device, DeviceBuilder, Peer};
use gotatun::packet::{Ip, Packet, PacketBufPool};
use gotatun::tun::{IpRecv, IpSend, MtuWatcher};
use gotatun::udp::socket::{UdpSocket, UdpSocketFactory};
use gotatun::udp::{UdpRecv, UdpSend, UdpTransportFactory, UdpTransportFactoryParams};
use gotatun::x25519;
use ipnetwork::IpNetwork;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::RwLock;
use tokio::sync::mpsc;

type Gotatun = Device<(Mux, Tun, Tun)>;

/// The send buffer as wireguard-go sizes it (7 MiB): a batch leaves as
/// GSO sends of up to 64 datagrams each, which a small buffer refuses.
const UDP_SEND_BUFFER: usize = 7 << 20;
/// The receive buffer is the queue in front of the decrypting thread, and
/// where the CPU is the bottleneck that queue fills: at wireguard-go's
/// 7 MiB (8 MiB of kernel accounting) a bulk TCP flow kept megabytes
/// queued, ping p50/p99 6/15 ms under the flow. At 256 KiB (512 KiB with
/// the kernel's overhead) the inner TCP sees drops earlier and backs off:
/// 2.2-3.0/5.5-8.6 ms, the same throughput (interleaved bench runs: 512 KiB
/// and 1 MiB kept most of the delay, 128 KiB bought no more).
const UDP_RECV_BUFFER: usize = 256 << 10;

pub struct UserspaceDevice {
    name: String,
    /// `None` once destroyed: gotatun's `stop` takes the device by value.
    device: RwLock<Option<Arc<Gotatun>>>,
    /// Where the device lives and every call to it runs.
    data: DataThread,
    socket: PathBuf,
    /// The task answering on `socket`; stops with the device.
    uapi: tokio::task::AbortHandle,
    net: Arc<dyn NetOps>,
    /// As configured; 0 means any free port.
    listen_port: u16,
}

/// The thread a device runs on: a single-threaded runtime of its own, on
/// which the device is built, configured and stopped, so that its TUN,
/// its sockets and its tasks all belong to it. A packet then goes from
/// the TUN to the socket (or back) on one thread: on the process's shared
/// runtime, each task's wake-up could land on another core, and the
/// hand-offs cost a third of the CPU time (and, in a VM, interrupts).
/// Devices still use every core: each has its own thread.
struct DataThread {
    handle: tokio::runtime::Handle,
    /// Dropped with the device: the thread's runtime ends, and every task
    /// on it.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl DataThread {
    fn start(name: &str) -> Result<Self, WgError> {
        let fail = |e: std::io::Error| WgError::Userspace {
            what: "starting the device's thread",
            source: e.into(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(fail)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Linux keeps 15 bytes of a thread's name.
        let thread: String = format!("wg {name}").chars().take(15).collect();
        std::thread::Builder::new()
            .name(thread)
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(fail)?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }

    /// Runs `work` on the device's thread.
    async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, WgError> {
        self.handle
            .spawn(work)
            .await
            .map_err(|e| WgError::Userspace {
                what: "the device's thread",
                source: e.to_string().into(),
            })
    }
}

impl Drop for UserspaceDevice {
    fn drop(&mut self) {
        self.uapi.abort();
    }
}

/// Listens on the UAPI socket at `path` and hands each connection to
/// gotatun's protocol. Ours rather than gotatun's `default_unix_socket`,
/// whose accept loop never ends: every device made and destroyed (a
/// container restarting) left a listening socket and a task behind, 14
/// after 20 minutes of a soak.
fn serve_uapi(path: &std::path::Path) -> Result<(UapiServer, tokio::task::AbortHandle), WgError> {
    let fail = |what: &'static str| {
        move |e: std::io::Error| WgError::Userspace {
            what,
            source: format!("{}: {e}", path.display()).into(),
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail("creating the UAPI socket directory"))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(fail("opening the UAPI socket"))?;
    let (client, server) = UapiServer::new();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // gotatun speaks the protocol on a blocking stream, on a thread
            // of its own that ends when the client hangs up.
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            if stream.set_nonblocking(false).is_ok() {
                client.clone().wrap_read_write(stream);
            }
        }
    });
    Ok((server, task.abort_handle()))
}

/// The TUN device as gotatun sees it, optionally confined: with
/// `confine`, a decrypted packet for an address outside those networks is
/// dropped instead of written (the kernel would forward it elsewhere), and
/// a packet read from the TUN from an address outside them is dropped
/// instead of sent to a peer (the host forwarded it in from elsewhere).
#[derive(Clone)]
pub struct Tun {
    inner: super::offload::OffloadTun,
    confine: Option<Arc<[IpNetwork]>>,
    quarantine: Option<Arc<super::Quarantine>>,
}

/// Whether a packet with address `a` stays within `nets`.
pub fn within(nets: &[IpNetwork], a: Option<IpAddr>) -> bool {
    a.is_some_and(|a| nets.iter().any(|n| n.contains(a)))
}

impl Tun {
    /// `packet` if it may be written: inside the confining networks, and
    /// admitted by an active quarantine.
    fn admit(&self, packet: Packet<Ip>) -> Option<Packet<Ip>> {
        if let Some(nets) = &self.confine
            && !within(nets, packet.destination())
        {
            return None;
        }
        if let Some(q) = &self.quarantine
            && q.active()
            && packet.source().is_some_and(|s| q.holds(s))
        {
            let bytes = packet.into_bytes();
            if !q.admits(bytes.as_ref()) {
                return None;
            }
            return bytes.try_into_ip().ok();
        }
        Some(packet)
    }
}

impl IpSend for Tun {
    async fn send(&mut self, packet: Packet<Ip>) -> std::io::Result<()> {
        match self.admit(packet) {
            Some(p) => self.inner.send(p).await,
            None => Ok(()),
        }
    }

    async fn send_many(&mut self, packets: &mut Vec<Packet<Ip>>) -> std::io::Result<()> {
        if self.confine.is_some() || self.quarantine.as_ref().is_some_and(|q| q.active()) {
            let admitted: Vec<_> = packets.drain(..).filter_map(|p| self.admit(p)).collect();
            *packets = admitted;
        }
        self.inner.send_many(packets).await
    }
}

impl IpRecv for Tun {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> std::io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        let confine = self.confine.clone();
        let quarantine = self.quarantine.clone();
        let packets = self.inner.recv(pool).await?;
        Ok(packets.filter(move |p| {
            confine.as_ref().is_none_or(|n| within(n, p.source()))
                && quarantine
                    .as_ref()
                    .is_none_or(|q| !q.active() || q.delivers(p.source(), p.destination()))
        }))
    }

    fn mtu(&self) -> MtuWatcher {
        self.inner.mtu()
    }
}

/// The device's transport: its UDP socket, and the WebSocket links of a
/// [`Relay`] when it has one. Datagrams for a link's virtual address go
/// to the link; datagrams from links arrive beside the UDP ones, with the
/// link's virtual address as their source. One device thus serves UDP
/// and WebSocket peers with one key and one set of peers.
pub struct Mux {
    /// None: WebSocket links only, no UDP socket bound.
    udp: Option<UdpSocketFactory>,
    relay: Option<Arc<Relay>>,
    mesh: Option<Arc<MeshSocket>>,
}

impl UdpTransportFactory for Mux {
    type Send = MuxSend;
    type Recv = MuxRecv;

    async fn bind(
        &mut self,
        params: &UdpTransportFactoryParams,
    ) -> std::io::Result<(MuxSend, MuxRecv)> {
        let (send, recv) = match &mut self.udp {
            Some(udp) => {
                let (s, r) = udp.bind(params).await?;
                (Some(s), Some(r))
            }
            None => (None, None),
        };
        let inbound = self.relay.as_ref().map(|r| r.attach());
        if let Some(m) = &self.mesh
            && let Some(send) = &send
        {
            let udp = send.clone();
            // Straight to the socket: tokio's try_send_to would refuse
            // until its reactor first saw the socket writable.
            m.bound(Arc::new(move |d: &[u8], to| {
                use nix::sys::socket::{MsgFlags, SockaddrStorage, sendto};
                use std::os::fd::AsRawFd;
                let fd = udp.socket().as_raw_fd();
                let _ = sendto(fd, d, &SockaddrStorage::from(to), MsgFlags::MSG_DONTWAIT);
            }));
        }
        let send = MuxSend {
            udp: send,
            relay: self.relay.clone(),
            mesh: self.mesh.clone(),
            gso: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        };
        Ok((
            send.clone(),
            MuxRecv {
                udp: recv,
                inbound,
                mesh: self.mesh.clone(),
                forward: send,
            },
        ))
    }
}

#[derive(Clone)]
pub struct MuxSend {
    udp: Option<UdpSocket>,
    relay: Option<Arc<Relay>>,
    mesh: Option<Arc<MeshSocket>>,
    /// UDP GSO, until the kernel refuses it once.
    gso: Arc<std::sync::atomic::AtomicBool>,
}

/// Datagrams one GSO send carries at most (the kernel's UDP_MAX_SEGMENTS).
const GSO_SEGMENTS: usize = 64;
/// Bytes one GSO send carries at most (one UDP datagram's limit).
const GSO_BYTES: usize = 65000;

/// Runs of `packets` that one GSO send can carry: the same destination,
/// the same size but for a shorter last one, within the kernel's limits.
pub fn gso_runs(packets: &[(usize, SocketAddr)]) -> Vec<std::ops::Range<usize>> {
    let mut runs = vec![];
    let mut start = 0;
    while start < packets.len() {
        let (size, to) = packets[start];
        let mut end = start + 1;
        let mut bytes = size;
        while end < packets.len()
            && end - start < GSO_SEGMENTS
            && packets[end].1 == to
            && packets[end].0 <= size
            && bytes + packets[end].0 <= GSO_BYTES
        {
            bytes += packets[end].0;
            end += 1;
            if packets[end - 1].0 < size {
                break;
            }
        }
        runs.push(start..end);
        start = end;
    }
    runs
}

impl MuxSend {
    /// Sends `packets` as few GSO datagrams (the kernel splits them, and
    /// the receiver's UDP GRO may keep them whole up to its socket). On
    /// the first refusal, GSO is off for good and the rest go by
    /// `sendmmsg`.
    async fn send_gso(&self, packets: &mut Vec<(Packet, SocketAddr)>) -> std::io::Result<()> {
        use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
        use std::os::fd::AsRawFd;
        let Some(udp) = &self.udp else {
            packets.clear();
            return Ok(());
        };
        let sock = udp.socket();
        let shape: Vec<(usize, SocketAddr)> = packets.iter().map(|(p, d)| (p.len(), *d)).collect();
        let mut sent = 0;
        for run in gso_runs(&shape) {
            if run.len() == 1 {
                let (p, d) = &packets[run.start];
                sock.send_to(p, *d).await?;
                sent = run.end;
                continue;
            }
            let iov: Vec<std::io::IoSlice> = packets[run.clone()]
                .iter()
                .map(|(p, _)| std::io::IoSlice::new(p))
                .collect();
            let segment = shape[run.start].0 as u16;
            let to = SockaddrStorage::from(shape[run.start].1);
            let r = sock
                .async_io(tokio::io::Interest::WRITABLE, || {
                    sendmsg(
                        sock.as_raw_fd(),
                        &iov,
                        &[ControlMessage::UdpGsoSegments(&segment)],
                        MsgFlags::MSG_DONTWAIT,
                        Some(&to),
                    )
                    .map_err(std::io::Error::from)
                })
                .await;
            match r {
                Ok(_) => sent = run.end,
                // No GSO on this kernel or egress device (wireguard-go
                // reads EIO the same way): off for good.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
                    ) =>
                {
                    tracing::debug!("UDP GSO refused ({e}); sending one datagram at a time");
                    self.gso.store(false, std::sync::atomic::Ordering::Relaxed);
                    break;
                }
                // This run only (a datagram over the path MTU, say): one
                // at a time, as sendmmsg would.
                Err(_) => {
                    for (p, d) in &packets[run.clone()] {
                        let _ = sock.send_to(p, *d).await;
                    }
                    sent = run.end;
                }
            }
        }
        packets.drain(..sent);
        Ok(())
    }
}

/// A datagram's bytes, without a copy.
fn take(mut packet: Packet) -> Bytes {
    packet.buf_mut().split().freeze()
}

impl UdpSend for MuxSend {
    type SendManyBuf = <UdpSocket as UdpSend>::SendManyBuf;

    async fn send_to(&self, packet: Packet, destination: SocketAddr) -> std::io::Result<()> {
        if let Some(m) = &self.mesh
            && relay_id(&destination).is_some()
        {
            m.send(destination, &packet);
            return Ok(());
        }
        if is_virtual(&destination) {
            if let Some(r) = &self.relay {
                r.send(&destination, take(packet));
            }
            return Ok(());
        }
        match &self.udp {
            Some(udp) => udp.send_to(packet, destination).await,
            // No UDP here: nothing leaves but through the links.
            None => Ok(()),
        }
    }

    fn max_number_of_packets_to_send(&self) -> usize {
        self.udp
            .as_ref()
            .map_or(GSO_SEGMENTS, UdpSend::max_number_of_packets_to_send)
    }

    async fn send_many_to(
        &self,
        buf: &mut Self::SendManyBuf,
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> std::io::Result<()> {
        if let Some(m) = &self.mesh
            && packets.iter().any(|(_, d)| relay_id(d).is_some())
        {
            // Wrapped for the hub and sent with the rest: a relayed flow
            // goes as GSO datagrams too, not one system call a packet.
            let mut wrapped = vec![];
            packets.retain(|(p, d)| {
                if relay_id(d).is_none() {
                    return true;
                }
                match m.wrap(*d, p) {
                    Some((w, hub)) => wrapped.push((packet(Bytes::from(w)), hub)),
                    None => m.send(*d, p),
                }
                false
            });
            packets.append(&mut wrapped);
        }
        if let Some(r) = &self.relay
            && packets.iter().any(|(_, d)| is_virtual(d))
        {
            let mut udp = Vec::with_capacity(packets.len());
            for (p, d) in packets.drain(..) {
                if is_virtual(&d) {
                    r.send(&d, take(p));
                } else {
                    udp.push((p, d));
                }
            }
            *packets = udp;
        }
        if packets.is_empty() {
            return Ok(());
        }
        if self.gso.load(std::sync::atomic::Ordering::Relaxed) {
            self.send_gso(packets).await?;
            if packets.is_empty() {
                return Ok(());
            }
        }
        match &self.udp {
            Some(udp) => udp.send_many_to(buf, packets).await,
            None => {
                packets.clear();
                Ok(())
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        match &self.udp {
            Some(udp) => UdpSend::local_addr(udp),
            None => Ok(None),
        }
    }

    fn set_fwmark(&self, mark: u32) -> std::io::Result<()> {
        match &self.udp {
            Some(udp) => udp.set_fwmark(mark),
            None => Ok(()),
        }
    }
}

pub struct MuxRecv {
    udp: Option<UdpSocket>,
    inbound: Option<mpsc::Receiver<(Bytes, SocketAddr)>>,
    mesh: Option<Arc<MeshSocket>>,
    /// A hub's relay sends what it forwards from the receiving task, in
    /// the same batches as they came.
    forward: MuxSend,
}

/// Splits our datagrams off `packets` before WireGuard sees them: probes
/// are taken, relayed ones unwrapped in place, and (at a hub) those to
/// forward returned, each with where it goes.
fn sift(mesh: &MeshSocket, packets: &mut Vec<(Packet, SocketAddr)>) -> Vec<(Packet, SocketAddr)> {
    let mut forward = vec![];
    if !packets.iter().any(|(p, _)| is_ours(p)) {
        return forward;
    }
    for (mut p, from) in std::mem::take(packets) {
        if !is_ours(&p) {
            packets.push((p, from));
            continue;
        }
        match mesh.inbound(&p, from) {
            Verdict::Taken => {}
            Verdict::Unwrap { from: relayed } => {
                bytes::Buf::advance(p.buf_mut(), RELAY_HEADER);
                packets.push((p, relayed));
            }
            Verdict::Forward { to } => forward.push((p, to)),
        }
    }
    forward
}

impl MuxRecv {
    /// Sends what a hub forwards; a failure loses only those datagrams,
    /// as a full socket buffer would.
    async fn forward(&self, mut batch: Vec<(Packet, SocketAddr)>) {
        if batch.is_empty() {
            return;
        }
        let mut buf = Default::default();
        if let Err(e) = self.forward.send_many_to(&mut buf, &mut batch).await {
            tracing::debug!("relay: forwarding {} datagrams: {e}", batch.len());
        }
    }
}

fn packet(b: Bytes) -> Packet {
    Packet::from_bytes(b.try_into_mut().unwrap_or_else(|b| BytesMut::from(&b[..])))
}

impl UdpRecv for MuxRecv {
    type RecvManyBuf = <UdpSocket as UdpRecv>::RecvManyBuf;

    async fn recv_from(
        &mut self,
        pool: &mut PacketBufPool,
    ) -> std::io::Result<(Packet, SocketAddr)> {
        loop {
            let MuxRecv {
                udp, inbound, mesh, ..
            } = self;
            let got = match (inbound, udp) {
                (None, Some(udp)) => udp.recv_from(pool).await,
                (Some(rx), Some(udp)) => tokio::select! {
                    Some((b, from)) = rx.recv() => Ok((packet(b), from)),
                    r = udp.recv_from(pool) => r,
                },
                (Some(rx), None) => match rx.recv().await {
                    Some((b, from)) => Ok((packet(b), from)),
                    None => std::future::pending().await,
                },
                (None, None) => std::future::pending().await,
            }?;
            let Some(m) = mesh.clone() else {
                return Ok(got);
            };
            let mut one = vec![got];
            let forward = sift(&m, &mut one);
            self.forward(forward).await;
            if let Some(got) = one.pop() {
                return Ok(got);
            }
        }
    }

    async fn recv_many_from(
        &mut self,
        buf: &mut Self::RecvManyBuf,
        pool: &mut PacketBufPool,
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> std::io::Result<()> {
        let MuxRecv {
            udp, inbound, mesh, ..
        } = self;
        // Whatever else the links have queued, in the same batch.
        let rest = |rx: &mut mpsc::Receiver<(Bytes, SocketAddr)>,
                    packets: &mut Vec<(Packet, SocketAddr)>| {
            while packets.len() < 64 {
                match rx.try_recv() {
                    Ok((b, from)) => packets.push((packet(b), from)),
                    Err(_) => break,
                }
            }
        };
        let r = match (inbound, udp) {
            (None, Some(udp)) => udp.recv_many_from(buf, pool, packets).await,
            (Some(rx), Some(udp)) => tokio::select! {
                Some((b, from)) = rx.recv() => {
                    packets.push((packet(b), from));
                    rest(rx, packets);
                    Ok(())
                }
                r = udp.recv_many_from(buf, pool, packets) => r,
            },
            (Some(rx), None) => match rx.recv().await {
                Some((b, from)) => {
                    packets.push((packet(b), from));
                    rest(rx, packets);
                    Ok(())
                }
                None => std::future::pending().await,
            },
            (None, None) => std::future::pending().await,
        };
        if let Some(m) = mesh.clone() {
            let forward = sift(&m, packets);
            self.forward(forward).await;
        }
        r
    }

    fn enable_udp_gro(&self) -> std::io::Result<()> {
        match &self.udp {
            Some(udp) => udp.enable_udp_gro(),
            None => Ok(()),
        }
    }
}

/// Refuses a name whose UAPI socket answers (another live device uses it:
/// the socket directory is shared by all namespaces), and removes a stale
/// socket that a crashed process left behind.
pub fn check_uapi_free(name: &str) -> Result<(), WgError> {
    let path = uapi_socket(name);
    if !path.exists() {
        return Ok(());
    }
    if UnixStream::connect(&path).is_ok() {
        return Err(WgError::UapiInUse(
            name.to_owned(),
            path.display().to_string(),
        ));
    }
    tracing::info!("removing stale UAPI socket {}", path.display());
    std::fs::remove_file(&path).map_err(|e| WgError::Userspace {
        what: "removing a stale UAPI socket",
        source: format!("{}: {e}", path.display()).into(),
    })
}

/// Checks `/dev/net/tun` up front so that its absence gets its own message.
pub fn check_tun() -> Result<(), WgError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(WgError::NoTun),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(WgError::TunPermission),
        Err(e) => Err(WgError::Userspace {
            what: "opening /dev/net/tun",
            source: e.into(),
        }),
    }
}

fn to_peer(spec: &PeerSpec) -> Peer {
    let mut p = Peer::new(x25519::PublicKey::from(*spec.public_key.as_bytes()));
    p.endpoint = spec.endpoint;
    p.keepalive = spec.keepalive;
    p.with_allowed_ips(spec.allowed_ips.iter().copied())
}

fn err(what: &'static str) -> impl FnOnce(gotatun::device::Error) -> WgError {
    move |e| match e {
        gotatun::device::Error::Bind(io, params) if io.kind() == std::io::ErrorKind::AddrInUse => {
            WgError::PortInUse(params.port)
        }
        e => WgError::Userspace {
            what,
            source: e.into(),
        },
    }
}

impl UserspaceDevice {
    pub async fn create(spec: &DeviceSpec, net: Arc<dyn NetOps>) -> Result<Self, WgError> {
        check_tun()?;
        let data = DataThread::start(&spec.name)?;
        let (device, socket, uapi) = data.run(build(spec.clone())).await??;
        Ok(Self {
            name: spec.name.clone(),
            device: RwLock::new(Some(Arc::new(device))),
            data,
            socket,
            uapi,
            net,
            listen_port: spec.listen_port,
        })
    }
}

/// Builds the device (on its thread): the TUN, the UAPI socket, gotatun.
async fn build(spec: DeviceSpec) -> Result<(Gotatun, PathBuf, tokio::task::AbortHandle), WgError> {
    // Created with its MTU so that gotatun sizes packets right from the start.
    let tun = super::offload::OffloadTun::create(&spec.name, spec.mtu.min(u16::MAX as u32) as u16)
        .map_err(|e| WgError::Userspace {
            what: "creating the TUN device",
            source: Cause::from(e),
        })?;
    let socket = uapi_socket(&spec.name);
    let (uapi, uapi_task) = serve_uapi(&socket)?;
    let tun = Tun {
        inner: tun,
        confine: spec.confine.as_deref().map(Arc::from),
        quarantine: spec.quarantine.clone(),
    };
    let mux = Mux {
        udp: spec.udp.then_some(UdpSocketFactory {
            recv_buffer_size: Some(UDP_RECV_BUFFER),
            send_buffer_size: Some(UDP_SEND_BUFFER),
        }),
        relay: spec.relay.clone(),
        mesh: spec.mesh.clone(),
    };
    let builder = DeviceBuilder::new()
        .with_udp(mux)
        .with_ip(tun)
        .with_uapi(uapi)
        .with_private_key(spec.private_key.as_secret().clone())
        .with_peers(spec.peers.iter().map(to_peer));
    // gotatun binds its UDP socket at build only when there are peers, and
    // otherwise on a reconfiguration; a port change is one, so a peerless
    // device gets its port (or the port's error) here too.
    let built = if spec.peers.is_empty() {
        match builder.build().await {
            Ok(device) => device
                .set_listen_port(spec.listen_port)
                .await
                .map(|()| device),
            Err(e) => Err(e),
        }
    } else {
        builder.with_listen_port(spec.listen_port).build().await
    };
    match built {
        Ok(device) => Ok((device, socket, uapi_task)),
        Err(e) => {
            uapi_task.abort();
            let _ = std::fs::remove_file(&socket);
            Err(err("starting the device")(e))
        }
    }
}

impl UserspaceDevice {
    /// Binds the UDP socket again after a rebind lost the race with the old
    /// socket's closing. A port change is what makes gotatun rebind, so a
    /// fixed port goes through 0 (any) and back.
    async fn rebind(&self) -> Result<(), WgError> {
        let mut last = None;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let port = self.listen_port;
            if port != 0 {
                let _ = self
                    .with(|d| async move { d.set_listen_port(0).await })
                    .await?;
            }
            match self
                .with(move |d| async move { d.set_listen_port(port).await })
                .await?
            {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(err("binding the UDP socket again")(e)),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// Runs `f` with the device, on its thread (the socket a
    /// reconfiguration binds, and the tasks it starts, belong there).
    async fn with<T, F>(&self, f: impl FnOnce(Arc<Gotatun>) -> F) -> Result<T, WgError>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let guard = self.device.read().await;
        let device = guard.as_ref().ok_or_else(|| WgError::Userspace {
            what: "using the device",
            source: "it was destroyed".into(),
        })?;
        self.data.run(f(device.clone())).await
    }
}

#[async_trait]
impl WgDevice for UserspaceDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn backend(&self) -> BackendKind {
        BackendKind::Userspace
    }

    async fn set_private_key(&self, key: &PrivateKey) -> Result<(), WgError> {
        let key = key.as_secret().clone();
        let any_port = self.listen_port == 0;
        // gotatun applies a new key to its peers before it replaces the
        // connection, so a packet leaving in between starts a handshake from
        // the old socket; the reply is lost and the peer waits out the 5 s
        // rekey timeout. Suspending first means no packet leaves until the
        // new key has its new socket. With no fixed port, any port will do,
        // which also avoids racing the old socket's close.
        let result = self
            .with(move |d| async move {
                d.suspend().await;
                let written = d
                    .write(async |w| {
                        w.set_private_key(key).await;
                        if any_port {
                            w.set_listen_port(0);
                        }
                    })
                    .await;
                let resumed = d.resume().await;
                written.and(resumed)
            })
            .await?;
        match result.map_err(err("setting the private key")) {
            // A new key makes gotatun rebind its socket, and the old one may
            // not be closed yet: the key is in place, the socket is not.
            Err(WgError::PortInUse(_)) => self.rebind().await,
            other => other,
        }
    }

    async fn upsert_peer(&self, peer: &PeerSpec) -> Result<(), WgError> {
        let peer = to_peer(peer);
        self.with(|d| async move { d.add_or_update_peer(peer).await })
            .await?
            .map_err(err("configuring a peer"))
    }

    async fn set_allowed_ips(&self, key: &PublicKey, ips: &[IpNetwork]) -> Result<(), WgError> {
        let pk = x25519::PublicKey::from(*key.as_bytes());
        let ips = ips.to_vec();
        self.with(move |d| async move {
            d.write(async |w| {
                w.modify_peer(&pk, |p| {
                    p.clear_allowed_ips();
                    p.add_allowed_ips(ips);
                })
                .await
            })
            .await
        })
        .await?
        .map_err(err("setting allowed IPs"))?;
        Ok(())
    }

    async fn remove_peer(&self, key: &PublicKey) -> Result<(), WgError> {
        let pk = x25519::PublicKey::from(*key.as_bytes());
        self.with(move |d| async move { d.remove_peer(&pk).await })
            .await?
            .map_err(err("removing a peer"))?;
        Ok(())
    }

    async fn set_endpoint(&self, key: &PublicKey, endpoint: SocketAddr) -> Result<(), WgError> {
        let pk = x25519::PublicKey::from(*key.as_bytes());
        self.with(move |d| async move {
            d.write(async |w| w.modify_peer(&pk, |p| p.set_endpoint(Some(endpoint))).await)
                .await
        })
        .await?
        .map_err(err("setting a peer's endpoint"))?;
        Ok(())
    }

    async fn peers(&self) -> Result<Vec<PeerStatus>, WgError> {
        Ok(self
            .with(|d| async move { d.peers().await })
            .await?
            .into_iter()
            .map(|p| PeerStatus {
                public_key: PublicKey(p.peer.public_key.to_bytes()),
                endpoint: p.peer.endpoint,
                allowed_ips: p.peer.allowed_ips.clone(),
                last_handshake: p.stats.last_handshake,
                rx_bytes: p.stats.rx_bytes as u64,
                tx_bytes: p.stats.tx_bytes as u64,
                keepalive: p.peer.keepalive,
            })
            .collect())
    }

    async fn listen_port(&self) -> Result<u16, WgError> {
        self.with(|d| async move { d.read(async |r| r.listen_port()).await })
            .await
    }

    async fn destroy(&self) -> Result<(), WgError> {
        let (name, socket, net) = (&self.name, &self.socket, &self.net);
        let Some(device) = self.device.write().await.take() else {
            return Ok(());
        };
        // Every call took the device's lock for its whole run: this is
        // the last reference (if a caller gave up on a call midway, the
        // thread's end stops the device instead).
        if let Ok(device) = Arc::try_unwrap(device) {
            self.data.run(device.stop()).await?;
        }
        self.uapi.abort();
        let _ = std::fs::remove_file(socket);
        // The TUN link goes away when its last descriptor closes, which happens
        // as gotatun's tasks wind down; wait for that, then make sure.
        for _ in 0..50 {
            match net.link_exists(name).await {
                Ok(false) => return Ok(()),
                Ok(true) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => return Err(e.into()),
            }
        }
        match net.delete_link(name).await {
            Ok(()) | Err(crate::net::NetError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests;
