//! A "host" of the lab: one network namespace, and what a test does from
//! inside it (commands, pings, HTTP, a thread or a runtime in the
//! namespace), plus the small servers a test runs there.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::UP;

/// A "host": a network namespace.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    /// Its address on the link it was made with.
    pub ip: String,
    /// Its interface on that link.
    pub dev: String,
}

impl Host {
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .output()
            .expect("spawn ip netns exec")
    }

    pub fn run(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in {}: {args:?} failed: {}{}",
            self.ns,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn has_link(&self, name: &str) -> bool {
        self.exec(&["ip", "link", "show", "dev", name])
            .status
            .success()
    }

    pub fn routes(&self) -> String {
        self.run(&["ip", "route", "show"])
    }

    pub fn ping(&self, ip: &str) -> bool {
        self.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", ip])
            .status
            .success()
    }

    /// Pings until `to` answers; panics after [`UP`]. Returns the time taken.
    pub fn ping_until(&self, to: &str, since: Instant) -> Duration {
        while !self
            .exec(&["ping", "-c", "1", "-W", "1", to])
            .status
            .success()
        {
            assert!(
                since.elapsed() < UP,
                "no traffic from {} to {to} after {UP:?}",
                self.ns
            );
        }
        since.elapsed()
    }

    /// The HTTP status of a request with curl, "000" when no answer came.
    /// `pre` runs first, e.g. `setpriv` to drop privileges.
    pub fn http(&self, pre: &[&str], method: &str, url: &str, body: Option<&str>) -> String {
        let mut args: Vec<&str> = pre.to_vec();
        args.extend([
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "5",
            "-X",
            method,
        ]);
        if let Some(b) = body {
            args.extend(["-H", "content-type: application/json", "-d", b]);
        }
        args.push(url);
        String::from_utf8_lossy(&self.exec(&args).stdout).into_owned()
    }

    /// Waits until something listens on TCP `port` here; panics after `within`.
    pub fn wait_listening(&self, port: &str, within: Duration) {
        let deadline = Instant::now() + within;
        let filter = format!("sport = :{port}");
        while !self
            .exec(&["ss", "-Hltn", &filter])
            .stdout
            .iter()
            .any(|c| !c.is_ascii_whitespace())
        {
            assert!(
                Instant::now() < deadline,
                "nothing listens on {port} in {}",
                self.ns
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether table `inet NAME` exists in this namespace.
    pub fn has_nft_table(&self, name: &str) -> bool {
        self.exec(&["nft", "list", "table", "inet", name])
            .status
            .success()
    }

    /// Runs `f` on a thread that has entered this host's namespace.
    pub fn in_ns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let ns = fs::File::open(&path).expect("open netns");
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// Runs an async block in this namespace, on its own runtime.
    pub fn block_on<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
        &self,
        f: impl FnOnce() -> F + Send + 'static,
    ) -> T {
        self.in_ns(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .expect("namespace thread")
    }
}

impl Host {
    /// The body of `curl URL` from here, `None` when no answer came.
    pub fn curl(&self, url: &str) -> Option<String> {
        let out = self.exec(&["curl", "-s", "-m", "3", url]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// A UDP socket on `0.0.0.0:port` (0: any) of this namespace; a socket
    /// stays in the namespace it was made in, so any thread may use it.
    pub fn udp_socket(&self, port: u16) -> UdpSocket {
        let ns = self.ns.clone();
        self.in_ns(move || {
            UdpSocket::bind(("0.0.0.0", port))
                .unwrap_or_else(|e| panic!("bind UDP port {port} in {ns}: {e}"))
        })
        .join()
        .expect("namespace thread")
    }

    /// The counters of link `dev` here (any link: a veth, a WireGuard
    /// interface), as `ip -s` reads them.
    pub fn link_counters(&self, dev: &str) -> LinkCounters {
        let out = self.run(&["ip", "-j", "-s", "link", "show", "dev", dev]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
        let n = |dir: &str, what: &str| {
            v[0]["stats64"][dir][what]
                .as_u64()
                .unwrap_or_else(|| panic!("no {dir} {what} for {dev} in {}: {out}", self.ns))
        };
        LinkCounters {
            rx_bytes: n("rx", "bytes"),
            tx_bytes: n("tx", "bytes"),
            rx_packets: n("rx", "packets"),
            tx_packets: n("tx", "packets"),
        }
    }

    /// Whether a link forwards IPv4 (`net.ipv4.conf.LINK.forwarding`).
    pub fn forwarding(&self, link: &str) -> bool {
        self.run(&["cat", &format!("/proc/sys/net/ipv4/conf/{link}/forwarding")])
            .trim()
            == "1"
    }
}

/// What went through a link, counted by the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

impl LinkCounters {
    /// Bytes both ways.
    pub fn bytes(&self) -> u64 {
        self.rx_bytes + self.tx_bytes
    }

    /// Packets both ways.
    pub fn packets(&self) -> u64 {
        self.rx_packets + self.tx_packets
    }

    /// What went through since `earlier`.
    pub fn since(&self, earlier: &LinkCounters) -> LinkCounters {
        LinkCounters {
            rx_bytes: self.rx_bytes - earlier.rx_bytes,
            tx_bytes: self.tx_bytes - earlier.tx_bytes,
            rx_packets: self.rx_packets - earlier.rx_packets,
            tx_packets: self.tx_packets - earlier.tx_packets,
        }
    }
}

/// A tiny HTTP server that answers each request with the client's
/// address as it sees it (to tell masquerading and SNAT apart); stops
/// when dropped.
pub struct WhoAmI {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WhoAmI {
    pub fn start(host: &Host, addr: SocketAddr) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = host.in_ns(move || {
            let l = TcpListener::bind(addr).expect("bind the whoami server");
            l.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !flag.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf);
                        let body = format!("{}\n", peer.ip());
                        let _ = write!(
                            s,
                            "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("whoami server ready");
        WhoAmI {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for WhoAmI {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One TCP exchange: a listener on `server` at `addr`, a client from `client`.
pub fn tcp_exchange(server: &Host, client: &Host, addr: SocketAddr) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let srv = server.in_ns(move || {
        let l = TcpListener::bind(addr).expect("bind tunnel address");
        ready_tx.send(()).unwrap();
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("read request");
        assert_eq!(&buf, b"hello");
        s.write_all(b"world").expect("write reply");
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("listener ready");
    let cli = client.in_ns(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .expect("connect across the tunnel");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("read reply");
        buf
    });
    assert_eq!(&cli.join().expect("client thread"), b"world");
    srv.join().expect("server thread");
}

/// The `wg show IFACE latest-handshakes` age in seconds of every peer.
pub fn handshake_ages(host: &Host, iface: &str) -> Vec<Option<u64>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    host.run(&["wg", "show", iface, "latest-handshakes"])
        .lines()
        .map(|l| {
            let t: u64 = l
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            (t != 0).then(|| now.saturating_sub(t))
        })
        .collect()
}
