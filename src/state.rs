//! Persistent state: keys, peers, allocations and unused invites.
//!
//! One JSON file per interface, `<state-dir>/<iface>.json`, with a format
//! version. The directory is created 0700 and files 0600 at creation time
//! (never chmod-ed after the fact, so there is no window where a secret is
//! readable). Writes go to a temporary file that is fsync-ed and renamed over
//! the old one, then the directory is fsync-ed, so a crash leaves either the
//! old or the new state, never a mix.

use crate::keys::{PrivateKey, PublicKey};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;

fn default_mtu() -> u32 {
    1420
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a tunnel state file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path}: state format version {found} is newer than this tunnel understands ({FORMAT_VERSION})"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: the state is inconsistent: {detail}; restore it from a backup or remove it")]
    Invalid { path: PathBuf, detail: String },
    #[error(
        "{path}: holds a {found} endpoint, not a {wanted} one; use another --iface or --state-dir"
    )]
    Role {
        path: PathBuf,
        found: &'static str,
        wanted: &'static str,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A peer admitted by the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerRecord {
    pub public_key: PublicKey,
    pub address: IpAddr,
    /// Unix seconds.
    pub joined_at: u64,
    /// What it is, when known: the token's --name for a site, or e.g.
    /// "container cli" for a site's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// For an endpoint registered by a site (a container on it): the
    /// site's address. Revoking the site revokes these too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<IpAddr>,
    /// Where the peer was last seen, so that a restarted server can reach
    /// it first instead of waiting for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<std::net::SocketAddr>,
    /// LANs behind a site that it advertises (`join --route`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNetwork>,
    /// A transparent site that asked to keep its public source address
    /// (`join --transparent --snat-public`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snat_public: bool,
    /// The prefixes the hub operator allowed this site to advertise
    /// (`token --route`, `route approve`): an advertised LAN takes effect
    /// only within one of them. `None` in a file saved before approvals
    /// existed; the hub then keeps what the site had ([`PeerRecord::approved`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<Vec<IpNetwork>>,
    /// A stock WireGuard client (`tunnel peer add`): routed like a site,
    /// but it may do nothing on the control API.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub road_warrior: bool,
}

impl PeerRecord {
    /// The prefixes this peer may advertise.
    pub fn approved(&self) -> &[IpNetwork] {
        self.approved.as_deref().unwrap_or_default()
    }

    /// Its advertised LANs within an approved prefix, and the others.
    pub fn split_routes(&self) -> (Vec<IpNetwork>, Vec<IpNetwork>) {
        self.routes
            .iter()
            .partition(|r| covered(self.approved(), r))
    }
}

/// Whether `r` lies within one of `approved`.
pub fn covered(approved: &[IpNetwork], r: &IpNetwork) -> bool {
    approved
        .iter()
        .any(|a| a.is_ipv4() == r.is_ipv4() && a.prefix() <= r.prefix() && a.contains(r.network()))
}

/// A container endpoint of this host: its key is made and kept here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContainerRecord {
    pub container: String,
    pub iface: String,
    pub private_key: PrivateKey,
    pub address: IpAddr,
    /// Attached by label (or the network driver): the endpoint goes when
    /// the container is removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_label: bool,
    /// Made for the network driver: Docker holds it, for this run only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub driver: bool,
}

/// An invite the server issued. Only its public half is kept: the private
/// half lives in the token alone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InviteRecord {
    pub public_key: PublicKey,
    pub address: IpAddr,
    /// Unix seconds.
    pub expires: u64,
    /// Set once redeemed; kept until expiry so that a reuse can be told apart
    /// from an unreachable server.
    #[serde(default)]
    pub redeemed_by: Option<PublicKey>,
    /// Given with `tunnel token --name`; the admitted peer takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Prefixes approved with the token (`token --route`): the site that
    /// redeems it may advertise LANs within them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNetwork>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerState {
    /// The hub's own name (`serve --name`), under which its containers are
    /// found in DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub private_key: PrivateKey,
    pub port: u16,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    pub subnet: IpNetwork,
    /// The IPv6 subnet of a dual-stack tunnel: each endpoint has the twin
    /// of its address there ([`crate::ipam::Subnets`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<IpNetwork>,
    #[serde(default)]
    pub peers: Vec<PeerRecord>,
    #[serde(default)]
    pub invites: Vec<InviteRecord>,
    #[serde(default)]
    pub containers: Vec<ContainerRecord>,
    /// LANs behind the hub itself (`serve --route`), as last started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNetwork>,
    /// The secret part of the WebSocket path, made once so that tokens
    /// and joined sites keep working across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket_secret: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JoinedState {
    /// The site's name on the hub (`join --name`, the token's, or the host
    /// name), under which its containers are found in DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub private_key: PrivateKey,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// As first joined.
    #[serde(default)]
    pub backend: Option<crate::wg::BackendChoice>,
    pub server_public_key: PublicKey,
    /// As given on the command line (`HOST[:PORT]`), resolved again on start.
    pub endpoint: String,
    pub port: u16,
    pub address: IpNetwork,
    pub server_address: IpAddr,
    pub subnet: IpNetwork,
    /// The tunnel's IPv6 subnet when it is dual-stack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<IpNetwork>,
    #[serde(default)]
    pub containers: Vec<ContainerRecord>,
    /// How its datagrams reach the hub (UDP unless it joined over a WebSocket).
    #[serde(default = "udp_path")]
    pub path: crate::transport::Path,
    /// LANs behind this site that it advertises (`--route`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNetwork>,
    /// Whether it masquerades what the tunnel sends to those LANs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub masquerade: bool,
    /// Traffic for the server's public address goes through the tunnel
    /// (`--transparent`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transparent: bool,
    /// The hub gives that traffic this site's public source address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snat_public: bool,
    /// `--attach-label`, followed again by `up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_label: Option<String>,
}

fn udp_path() -> crate::transport::Path {
    crate::transport::Path::Udp
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Endpoint {
    Server(ServerState),
    Joined(JoinedState),
}

impl Endpoint {
    fn role(&self) -> &'static str {
        match self {
            Endpoint::Server(_) => "server",
            Endpoint::Joined(_) => "joined",
        }
    }

    /// What serde cannot check: addresses inside the subnet and of its
    /// family, no address twice, values in range. Everything that reads
    /// state may then rely on these, and nothing it loads can panic later.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Endpoint::Server(s) => s.validate(),
            Endpoint::Joined(j) => j.validate(),
        }
    }
}

fn check_mtu(mtu: u32) -> Result<(), String> {
    if (1280..=9000).contains(&mtu) {
        Ok(())
    } else {
        Err(format!("MTU {mtu} is outside 1280-9000"))
    }
}

/// A pool for `subnet`, or why the subnet cannot be one.
fn pool_for(subnet: IpNetwork) -> Result<crate::ipam::Pool, String> {
    crate::ipam::Pool::new(subnet).map_err(|e| e.to_string())
}

/// Checks that `addr` is a host address of the pool's subnet and not yet
/// seen, then marks it seen.
fn claim(
    pool: &crate::ipam::Pool,
    seen: &mut std::collections::BTreeSet<IpAddr>,
    what: &str,
    addr: IpAddr,
) -> Result<(), String> {
    if !pool.contains_host(addr) {
        return Err(format!(
            "{what} address {addr} is not a host address of {}",
            pool.subnet()
        ));
    }
    if !seen.insert(addr) {
        return Err(format!("{what} address {addr} is used twice"));
    }
    Ok(())
}

impl ServerState {
    /// A new hub: a fresh key, no peers yet.
    pub fn new(subnet: IpNetwork, port: u16, mtu: u32) -> Self {
        Self {
            name: None,
            private_key: PrivateKey::generate(),
            port,
            mtu,
            subnet,
            subnet6: None,
            peers: vec![],
            invites: vec![],
            containers: vec![],
            routes: vec![],
            websocket_secret: None,
        }
    }

    pub fn subnets(&self) -> crate::ipam::Subnets {
        crate::ipam::Subnets {
            main: self.subnet,
            v6: self.subnet6,
        }
    }

    /// The file of the WebSocket transport's TLS certificate and key.
    pub fn certificate(store: &StateDir, iface: &str) -> PathBuf {
        store.root().join(format!("{iface}.wss.pem"))
    }

    fn validate(&self) -> Result<(), String> {
        let pool = pool_for(self.subnet)?;
        crate::ipam::Subnets::new(self.subnet, self.subnet6).map_err(|e| e.to_string())?;
        check_mtu(self.mtu)?;
        if self.port == 0 {
            return Err("listen port 0".into());
        }
        let mut seen = std::collections::BTreeSet::from([pool.server_address()]);
        for p in &self.peers {
            claim(&pool, &mut seen, "peer", p.address)?;
            if let Some(v) = p.via
                && !self.peers.iter().any(|s| s.address == v && s.via.is_none())
            {
                return Err(format!(
                    "peer {} was registered by {v}, which is not a site",
                    p.address
                ));
            }
        }
        for i in &self.invites {
            // A redeemed invite shares its address with the peer it admitted.
            if i.redeemed_by.is_some() {
                if !pool.contains_host(i.address) {
                    return Err(format!(
                        "invite address {} is outside {}",
                        i.address, self.subnet
                    ));
                }
            } else {
                claim(&pool, &mut seen, "invite", i.address)?;
            }
        }
        for c in &self.containers {
            claim(&pool, &mut seen, "container", c.address)?;
            crate::net::validate_ifname(&c.iface).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl JoinedState {
    pub fn subnets(&self) -> crate::ipam::Subnets {
        crate::ipam::Subnets {
            main: self.subnet,
            v6: self.subnet6,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let pool = pool_for(self.subnet)?;
        crate::ipam::Subnets::new(self.subnet, self.subnet6).map_err(|e| e.to_string())?;
        check_mtu(self.mtu)?;
        if self.address.prefix() != self.subnet.prefix() {
            return Err(format!(
                "address {} does not carry the prefix of {}",
                self.address, self.subnet
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        claim(&pool, &mut seen, "server", self.server_address)?;
        claim(&pool, &mut seen, "site", self.address.ip())?;
        for c in &self.containers {
            claim(&pool, &mut seen, "container", c.address)?;
            crate::net::validate_ifname(&c.iface).map_err(|e| e.to_string())?;
        }
        if self.port == 0 {
            return Err("server port 0".into());
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    #[serde(flatten)]
    endpoint: Endpoint,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The local control socket of the running instance for `iface`.
    pub fn socket(&self, iface: &str) -> PathBuf {
        self.root.join(format!("{iface}.sock"))
    }

    /// The interfaces with saved state, sorted. A missing directory has none.
    pub fn ifaces(&self) -> Result<Vec<String>, StateError> {
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io_err(&self.root)(e)),
        };
        let mut out: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_owned)
            })
            .filter(|n| !n.starts_with('.'))
            .collect();
        out.sort();
        Ok(out)
    }

    pub fn file(&self, iface: &str) -> PathBuf {
        self.root.join(format!("{iface}.json"))
    }

    /// Creates the directory (and parents) with mode 0700 if missing.
    pub fn ensure(&self) -> Result<(), StateError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io_err(&self.root))?;
        let mode = fs::metadata(&self.root)
            .map_err(io_err(&self.root))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "state directory {} has mode {:o}; it holds private keys and should be 0700",
                self.root.display(),
                mode & 0o777
            );
        }
        Ok(())
    }

    pub fn load(&self, iface: &str) -> Result<Option<Endpoint>, StateError> {
        let path = self.file(iface);
        let bytes = match fs::read(&path) {
            Ok(b) => zeroize::Zeroizing::new(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_slice(&bytes).map_err(|source| StateError::Parse {
            path: path.clone(),
            source,
        })?;
        if v.version > FORMAT_VERSION {
            return Err(StateError::Version {
                path,
                found: v.version,
            });
        }
        let disk: OnDisk = serde_json::from_slice(&bytes).map_err(|source| StateError::Parse {
            path: path.clone(),
            source,
        })?;
        disk.endpoint
            .validate()
            .map_err(|detail| StateError::Invalid { path, detail })?;
        Ok(Some(disk.endpoint))
    }

    pub fn load_server(&self, iface: &str) -> Result<Option<ServerState>, StateError> {
        match self.load(iface)? {
            None => Ok(None),
            Some(Endpoint::Server(s)) => Ok(Some(s)),
            Some(other) => Err(StateError::Role {
                path: self.file(iface),
                found: other.role(),
                wanted: "server",
            }),
        }
    }

    pub fn save(&self, iface: &str, endpoint: &Endpoint) -> Result<(), StateError> {
        self.ensure()?;
        let disk = OnDisk {
            version: FORMAT_VERSION,
            endpoint: endpoint.clone(),
        };
        let json =
            zeroize::Zeroizing::new(serde_json::to_vec_pretty(&disk).expect("state serializes"));
        write_atomic(&self.file(iface), &json)
    }

    /// Removes temp files that an interrupted save of `iface` left behind.
    /// Called at start, once this process owns `iface`.
    pub fn clean_stale_temps(&self, iface: &str) {
        let prefix = format!(".{iface}.json.tmp");
        let Ok(rd) = fs::read_dir(&self.root) else {
            return;
        };
        for e in rd.flatten() {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
            {
                match fs::remove_file(e.path()) {
                    Ok(()) => tracing::info!(
                        "removed {}, left by an interrupted save",
                        e.path().display()
                    ),
                    Err(err) => tracing::warn!("removing {}: {err}", e.path().display()),
                }
            }
        }
    }

    /// Where a join under way keeps the key it made for its token.
    pub fn pending_file(&self, iface: &str) -> PathBuf {
        self.root.join(format!("{iface}.joining"))
    }

    pub fn load_pending(&self, iface: &str) -> Result<Option<PendingJoin>, StateError> {
        let path = self.pending_file(iface);
        let bytes = match fs::read(&path) {
            Ok(b) => zeroize::Zeroizing::new(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source })
    }

    /// Saved (0600, atomically) before the redeem is sent.
    pub fn save_pending(&self, iface: &str, pending: &PendingJoin) -> Result<(), StateError> {
        self.ensure()?;
        let json = zeroize::Zeroizing::new(serde_json::to_vec(pending).expect("serializes"));
        write_atomic(&self.pending_file(iface), &json)
    }

    /// Once the site's state is saved (or the token is refused for good).
    pub fn remove_pending(&self, iface: &str) {
        let path = self.pending_file(iface);
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("removing {}: {e}", path.display());
        }
    }

    pub fn remove(&self, iface: &str) -> Result<(), StateError> {
        let path = self.file(iface);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }
}

/// A join under way: the key made here for one token (named by its
/// invite's public key). A join that crashes after sending the redeem and
/// runs again redeems with the same key, which the hub accepts again, so
/// no crash burns a token.
#[derive(Serialize, Deserialize)]
pub struct PendingJoin {
    pub invite: PublicKey,
    pub private_key: PrivateKey,
}

impl std::fmt::Debug for PendingJoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingJoin")
            .field("invite", &self.invite)
            .finish_non_exhaustive()
    }
}

/// Writes `bytes` to `path` atomically; the file is created 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A random suffix: a stale temp left by a crash, even by a process that
    // had the same pid (pid 1 in a container), never blocks a save.
    let mut suffix = [0u8; 6];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut suffix);
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!(".{name}.tmp{suffix}"));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Endpoint {
        Endpoint::Server(ServerState {
            name: None,
            private_key: PrivateKey::generate(),
            port: 51820,
            mtu: 1420,
            subnet: "10.77.0.0/24".parse().unwrap(),
            subnet6: None,
            peers: vec![PeerRecord {
                public_key: PrivateKey::generate().public_key(),
                address: "10.77.0.2".parse().unwrap(),
                joined_at: 1,
                name: None,
                via: None,
                endpoint: None,
                routes: vec![],
                snat_public: false,
                approved: Some(vec![]),
                road_warrior: false,
            }],
            invites: vec![],
            containers: vec![],
            routes: vec![],
            websocket_secret: None,
        })
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn round_trip_with_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path().join("a/b/state"));
        let s = server();
        dir.save("wg0", &s).unwrap();
        assert_eq!(mode(dir.root()), 0o700);
        assert_eq!(mode(&dir.file("wg0")), 0o600);
        assert_eq!(dir.load("wg0").unwrap(), Some(s));
        assert_eq!(dir.load("other").unwrap(), None);
    }

    #[test]
    fn save_replaces_atomically_and_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        dir.save("wg0", &server()).unwrap();
        let second = server();
        dir.save("wg0", &second).unwrap();
        assert_eq!(dir.load("wg0").unwrap(), Some(second));
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["wg0.json".to_string()]);
    }

    #[test]
    fn failed_write_keeps_old_content_and_leaves_no_temp() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let first = server();
        dir.save("wg0", &first).unwrap();
        // The rename fails (even for root) when a directory holds the name.
        fs::create_dir_all(tmp.path().join("wg1.json/keep")).unwrap();
        assert!(dir.save("wg1", &server()).is_err());
        assert!(tmp.path().join("wg1.json/keep").is_dir());
        if !nix::unistd::geteuid().is_root() {
            // A read-only directory: the temp file cannot even be made.
            fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o500)).unwrap();
            let failed = dir.save("wg0", &server());
            fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
            assert!(failed.is_err());
        }
        assert_eq!(dir.load("wg0").unwrap(), Some(first));
        let mut names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["wg0.json", "wg1.json"], "no temp left");
    }

    #[test]
    fn stale_temps_never_block_a_save_and_are_cleaned() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        // What a crash of a process with our pid would have left.
        let stale = tmp
            .path()
            .join(format!(".wg0.json.tmp{}", std::process::id()));
        fs::write(&stale, b"half").unwrap();
        let other = tmp.path().join(".wg1.json.tmpabc");
        fs::write(&other, b"x").unwrap();
        dir.save("wg0", &server()).unwrap();
        dir.clean_stale_temps("wg0");
        assert!(!stale.exists());
        assert!(other.exists(), "another interface's temp is not ours");
    }

    #[test]
    fn inconsistent_state_is_refused_with_its_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let Endpoint::Server(mut s) = server() else {
            unreachable!()
        };
        s.peers[0].address = "10.78.0.2".parse().unwrap();
        dir.save("a", &Endpoint::Server(s.clone())).unwrap();
        let e = dir.load("a").unwrap_err().to_string();
        assert!(e.contains("not a host address of 10.77.0.0/24"), "{e}");
        // An IPv4 address under an IPv6 subnet (this panicked `status`).
        s.subnet = "fd00::/64".parse().unwrap();
        s.peers[0].address = "10.77.0.2".parse().unwrap();
        dir.save("b", &Endpoint::Server(s.clone())).unwrap();
        assert!(matches!(dir.load("b"), Err(StateError::Invalid { .. })));
        s.subnet = "10.77.0.0/24".parse().unwrap();
        s.peers[0].address = "10.77.0.1".parse().unwrap();
        dir.save("c", &Endpoint::Server(s)).unwrap();
        let e = dir.load("c").unwrap_err().to_string();
        assert!(e.contains("used twice"), "{e}");
    }

    #[test]
    fn newer_version_and_garbage_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        fs::write(dir.file("wg0"), br#"{"version": 99, "role": "server"}"#).unwrap();
        assert!(matches!(
            dir.load("wg0"),
            Err(StateError::Version { found: 99, .. })
        ));
        fs::write(dir.file("wg1"), b"nope").unwrap();
        let err = dir.load("wg1").unwrap_err();
        assert!(err.to_string().contains("wg1.json"), "{err}");
    }

    #[test]
    fn role_mismatch_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let joined = Endpoint::Joined(JoinedState {
            name: None,
            private_key: PrivateKey::generate(),
            mtu: 1420,
            backend: None,
            server_public_key: PrivateKey::generate().public_key(),
            endpoint: "10.0.0.1".into(),
            port: 51820,
            address: "10.77.0.2/24".parse().unwrap(),
            server_address: "10.77.0.1".parse().unwrap(),
            subnet: "10.77.0.0/24".parse().unwrap(),
            subnet6: None,
            containers: vec![],
            path: crate::transport::Path::Udp,
            routes: vec![],
            masquerade: false,
            transparent: false,
            snat_public: false,
            attach_label: None,
        });
        dir.save("wg0", &joined).unwrap();
        assert!(matches!(
            dir.load_server("wg0"),
            Err(StateError::Role { .. })
        ));
    }
}
