//! The state directory on disk: one JSON file per interface, 0600 in a
//! 0700 directory, each written atomically ([`write_atomic`]), and the
//! pending join of a crashed `join`. The records themselves are pure data
//! in [`crate::state`].

use crate::state::{Endpoint, PendingJoin, ServerState};
use serde::{Deserialize, Serialize};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;

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

    /// The file of the WebSocket transport's TLS certificate and key.
    pub fn certificate(&self, iface: &str) -> PathBuf {
        self.root().join(format!("{iface}.wss.pem"))
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

    /// Where a site keeps the last peer map its hub gave it, so that `up`
    /// after a reboot reaches its peers without the hub.
    pub fn mesh_file(&self, iface: &str) -> PathBuf {
        self.root.join(format!("{iface}.mesh"))
    }

    /// The cached peer map, as the hub tagged it; `None` when there is none
    /// or it cannot be read (it is only a cache).
    pub fn load_mesh(&self, iface: &str) -> Option<crate::mesh::SignedMap> {
        let path = self.mesh_file(iface);
        let bytes = fs::read(&path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("ignoring {}: {e}", path.display());
                None
            }
        }
    }

    /// Saved 0600, atomically, in the 0700 state directory.
    pub fn save_mesh(&self, iface: &str, map: &crate::mesh::SignedMap) -> Result<(), StateError> {
        self.ensure()?;
        let json = serde_json::to_vec(map).expect("serializes");
        write_atomic(&self.mesh_file(iface), &json)
    }

    pub fn remove(&self, iface: &str) -> Result<(), StateError> {
        let mesh = self.mesh_file(iface);
        if let Err(e) = fs::remove_file(&mesh)
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(io_err(&mesh)(e));
        }
        let path = self.file(iface);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
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
    use crate::keys::PrivateKey;
    use crate::state::*;

    fn server() -> Endpoint {
        Endpoint::Server(ServerState {
            name: None,
            private_key: PrivateKey::generate(),
            port: 51820,
            mtu: 1420,
            subnet: "10.77.0.0/24".parse().unwrap(),
            subnet6: None,
            peers: vec![PeerRecord {
                joined_at: 1,
                ..PeerRecord::site("10.77.0.2")
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
    fn the_cached_peer_map_is_private_and_goes_with_the_endpoint() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let store = StateDir::new(tmp.path().join("state"));
        let map = crate::mesh::SignedMap {
            map: "{}".into(),
            tag: "00".into(),
        };
        store.save_mesh("wgt0", &map).unwrap();
        let mode = std::fs::metadata(store.mesh_file("wgt0"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(store.load_mesh("wgt0"), Some(map));
        // A garbled cache is ignored, not an error: it is only a cache.
        std::fs::write(store.mesh_file("wgt0"), b"{not json").unwrap();
        assert_eq!(store.load_mesh("wgt0"), None);
        store.remove("wgt0").unwrap();
        assert!(!store.mesh_file("wgt0").exists());
        // Not an endpoint of its own in the listing.
        assert!(store.ifaces().unwrap().is_empty());
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
            advertise_endpoint: None,
            listen_port: None,
        });
        dir.save("wg0", &joined).unwrap();
        assert!(matches!(
            dir.load_server("wg0"),
            Err(StateError::Role { .. })
        ));
    }
}
