//! Checks of the process's privileges, made before anything is touched.

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
