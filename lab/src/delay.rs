//! A delay line: a link between two namespaces that holds every frame for
//! a fixed time each way, for a [`crate::NatLab`] hub with latency. It is
//! made of two TAP devices, one in each namespace, and threads that copy
//! each frame read from one into the other once its time has come. This
//! and not `tc netem`, which is the usual tool: kernels built without
//! `CONFIG_NET_SCH_NETEM` (as the one the lab was written on) have no
//! netem, and a delay line needs only TUN, which the lab needs anyway.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Both directions of the link; stops (and its TAPs go) when dropped.
pub(crate) struct DelayLine {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DelayLine {
    /// TAP `a` in namespace `ns_a` and TAP `b` in `ns_b`, made now, joined
    /// by `delay` each way; the caller gives them addresses, bridges, up.
    pub(crate) fn new(ns_a: &str, a: &str, ns_b: &str, b: &str, delay: Duration) -> DelayLine {
        let (a, b) = (Arc::new(tap(ns_a, a)), Arc::new(tap(ns_b, b)));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (from, to) in [(a.clone(), b.clone()), (b, a)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let stop = stop.clone();
            // The reader stamps each frame as it comes, so a burst is not
            // delayed more than one frame is.
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::SeqCst) {
                    if !readable(&from, 50) {
                        continue;
                    }
                    match (&*from).read(&mut buf) {
                        Ok(n) => {
                            let _ = tx.send((Instant::now() + delay, buf[..n].to_vec()));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
            // The writer ends when the reader does (the channel closes).
            threads.push(std::thread::spawn(move || {
                while let Ok((due, frame)) = rx.recv() {
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    // A frame the link is down for is lost, as on a wire.
                    let _ = (&*to).write(&frame);
                }
            }));
        }
        DelayLine { stop, threads }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        // The TAPs go with the last of their files, i.e. with the threads;
        // until then they would keep their namespaces alive.
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Whether `f` has a frame to read within `ms` milliseconds.
fn readable(f: &File, ms: u16) -> bool {
    let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::from(ms)).is_ok_and(|n| n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
}

/// The `struct ifreq` of TUNSETIFF: a name and flags, padded to 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A new TAP `name` (Ethernet frames, no packet info) in namespace `ns`:
/// a TUN device belongs to the namespace its file was opened in, so the
/// file is opened on a thread inside it.
fn tap(ns: &str, name: &str) -> File {
    assert!(name.len() < libc::IFNAMSIZ, "{name} is too long");
    let (path, name) = (format!("/var/run/netns/{ns}"), name.to_owned());
    std::thread::spawn(move || {
        let target = File::open(&path).expect("open netns");
        nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `req`
        // is laid out as.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
        assert!(
            rc == 0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        file
    })
    .join()
    .expect("namespace thread")
}
