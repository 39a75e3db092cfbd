//! The process and its host: privileges, checked before anything is
//! touched, and readiness, told to systemd.

const CAP_NET_ADMIN: u32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("needs root or CAP_NET_ADMIN (run with sudo)")]
    NoNetAdmin,
}

/// Whether the effective capability set holds CAP_NET_ADMIN.
pub fn has_net_admin() -> bool {
    let status = match std::fs::read_to_string("/proc/self/status") {
        Ok(s) => s,
        Err(_) => return nix::unistd::geteuid().is_root(),
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

pub fn require_net_admin() -> Result<(), SysError> {
    if has_net_admin() {
        Ok(())
    } else {
        Err(SysError::NoNetAdmin)
    }
}

/// Tells systemd (Type=notify) that the tunnel is up; nothing without systemd.
pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// This host's name (the default name of a hub or site), lower case;
/// "site" where there is none.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.split('.').next().unwrap_or("").to_ascii_lowercase())
        .filter(|h| crate::limits::check_name(h).is_ok())
        .unwrap_or_else(|| "site".to_owned())
}

/// glibc's allocator, set for a long-running daemon. Called first in
/// `main`, before any thread exists.
///
/// - One arena: packet buffers are allocated on one thread and freed on
///   another (a device's thread and the runtime's workers); with an
///   arena per thread the freed memory sat in the wrong one, and a site
///   moving traffic grew in steps.
/// - A fixed mmap threshold: each UDP receive loop of gotatun allocates
///   a 256 KiB region for GRO (it was 26 MB once), which this threshold
///   maps (glibc's test counts the chunk's header). Once one such region had
///   been freed, glibc's moving threshold put the next on the heap,
///   zeroed and so resident, and never gave it back: every device made
///   (a container restarting, a key switch) added its whole size, 20 ->
///   123 MB over 25 minutes of the soak with the 26 MB ones. Fixed, large
///   buffers are always mapped on their own, resident only where written,
///   and unmapped when freed; smaller ones (64 KiB) come from the heap,
///   which is why the receive buffers are one region and not four.
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Raises the soft limit on open descriptors to the hard one. Every
/// tunnel, control connection and WebSocket link holds a descriptor, and
/// the soft limit that services get by default (1,024) is a guess made
/// for programs that use `select`, which this one never does. Returns
/// (before, after) for `main` to log once logging is up; a failure
/// leaves the limit as it was and never stops the start.
pub fn raise_nofile_limit() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, soft.max(hard)))
}

/// Test builds only (debug assertions on): SIGKILLs this process at the
/// named step when `TUNNEL_TEST_CRASH_AT` names it, so that tests crash a
/// flow at an exact point rather than guess one by timing. Release builds
/// compile it to nothing.
pub fn crash_point(step: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("TUNNEL_TEST_CRASH_AT").is_ok_and(|s| s == step) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(debug_assertions))]
    let _ = step;
}

/// This host's own addresses as mesh candidates: up interfaces only, not
/// loopback, link-local, Docker's bridges and veths, or tunnel interfaces
/// (`skip` names; addresses in `tunnel` are left out too).
pub fn local_addresses(skip: &[&str], tunnel: &[ipnetwork::IpNetwork]) -> Vec<std::net::IpAddr> {
    use nix::net::if_::InterfaceFlags;
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return vec![];
    };
    let docker = |n: &str| n.starts_with("docker") || n.starts_with("br-") || n.starts_with("veth");
    let mut out = vec![];
    for a in addrs {
        let name = a.interface_name.as_str();
        if skip.contains(&name)
            || docker(name)
            || !a.flags.contains(InterfaceFlags::IFF_UP)
            || a.flags.contains(InterfaceFlags::IFF_LOOPBACK)
            || a.flags.contains(InterfaceFlags::IFF_POINTOPOINT)
        {
            continue;
        }
        let Some(sa) = a.address else { continue };
        let ip: std::net::IpAddr = if let Some(v4) = sa.as_sockaddr_in() {
            std::net::IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            std::net::IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let link_local = match ip {
            std::net::IpAddr::V4(v4) => v4.is_link_local(),
            std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        if link_local || tunnel.iter().any(|n| n.contains(ip)) || out.contains(&ip) {
            continue;
        }
        out.push(ip);
    }
    out
}

/// The networks of this host's own addresses, for the mesh's same-LAN
/// bonus (same filters as [`local_addresses`]).
pub fn local_networks(skip: &[&str], tunnel: &[ipnetwork::IpNetwork]) -> Vec<ipnetwork::IpNetwork> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return vec![];
    };
    let mine = local_addresses(skip, tunnel);
    let mut out = vec![];
    for a in addrs {
        let (Some(sa), Some(mask)) = (a.address, a.netmask) else {
            continue;
        };
        let net = if let (Some(v4), Some(m)) = (sa.as_sockaddr_in(), mask.as_sockaddr_in()) {
            ipnetwork::IpNetwork::with_netmask(v4.ip().into(), m.ip().into()).ok()
        } else if let (Some(v6), Some(m)) = (sa.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            ipnetwork::IpNetwork::with_netmask(v6.ip().into(), m.ip().into()).ok()
        } else {
            None
        };
        if let Some(n) = net
            && mine.contains(&n.ip())
        {
            out.push(n);
        }
    }
    out
}
