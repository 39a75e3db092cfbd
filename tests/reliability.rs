//! What a long-running tunnel meets on real hosts, end to end: a partition
//! between the sites, and a site whose underlay address changes. Neither
//! needs a restart.

mod common;

use common::needs_root;
use std::time::{Duration, Instant};

/// Traffic must be back this soon after the network is.
const BACK_WITHIN: Duration = Duration::from_secs(5);

#[test]
#[ignore = "needs root: sudo make test"]
fn a_60_second_partition_heals_without_a_restart() {
    needs_root("partition");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let hub = lab.serve(&a, "a", 1, &[]);
    let site = lab.join(&b, "b", &hub.lines[0], &a, &[]);
    assert!(b.ping("10.77.0.1"));
    // Everything between the sites is dropped for 60 s (both ways, at B).
    let table = format!("part{}", lab.id);
    b.run(&["nft", "add", "table", "inet", &table]);
    for (chain, hook, dir) in [("i", "input", "iifname"), ("o", "output", "oifname")] {
        b.run(&[
            "nft",
            "add",
            "chain",
            "inet",
            &table,
            chain,
            &format!("{{ type filter hook {hook} priority -10; }}"),
        ]);
        b.run(&[
            "nft", "add", "rule", "inet", &table, chain, dir, &b.dev, "drop",
        ]);
    }
    assert!(!b.ping("10.77.0.1"), "the partition lets traffic through");
    std::thread::sleep(Duration::from_secs(60));
    b.run(&["nft", "delete", "table", "inet", &table]);
    let healed = Instant::now();
    let took = b.ping_until("10.77.0.1", healed);
    eprintln!(
        "traffic back {} ms after a 60 s partition healed",
        took.as_millis()
    );
    assert!(took < BACK_WITHIN, "traffic back only after {took:?}");
    // And the hub reaches the site too.
    assert!(a.ping("10.77.0.2"));
    assert!(lab.proc(site.proc).terminate().success());
    assert!(lab.proc(hub.proc).terminate().success());
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_site_whose_underlay_address_changes_is_followed_by_the_hub() {
    needs_root("roaming");
    let mut lab = common::lab(2);
    let (a, b) = (lab.host(0), lab.host(1));
    let hub = lab.serve(&a, "a", 1, &[]);
    let site = lab.join(&b, "b", &hub.lines[0], &a, &[]);
    assert!(b.ping("10.77.0.1"));
    // B moves: its old address gone, a new one on its link (removing a
    // primary address takes the secondaries of its subnet with it, so the
    // old one goes first, as a DHCP renumbering would).
    let new_ip = "10.231.0.77";
    b.run(&["ip", "addr", "del", &format!("{}/24", b.ip), "dev", &b.dev]);
    b.run(&["ip", "addr", "add", &format!("{new_ip}/24"), "dev", &b.dev]);
    let moved = Instant::now();
    // The hub sends to B first: it learns B's new address only from B's
    // next packet (keepalive or traffic), as WireGuard roams.
    let took = b.ping_until("10.77.0.1", moved);
    eprintln!(
        "traffic back {} ms after the site's address changed",
        took.as_millis()
    );
    assert!(took < BACK_WITHIN, "traffic back only after {took:?}");
    assert!(a.ping("10.77.0.2"), "the hub does not reach the moved site");
    let st = lab.status(&hub);
    let endpoint = st[0]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["address"] == "10.77.0.2" && p["name"] != "used invite")
        .and_then(|p| p["endpoint"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(endpoint.starts_with(new_ip), "the hub still has {endpoint}");
    assert!(lab.proc(site.proc).terminate().success());
    assert!(lab.proc(hub.proc).terminate().success());
}

/// A small tmpfs, unmounted on drop even when the test fails.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: std::path::PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&at).unwrap();
        common::sh(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0700"),
            "tmpfs",
            at.to_str().unwrap(),
        ]);
        Tmpfs(at)
    }

    /// Writes zeros until the filesystem is full.
    fn fill(&self) -> std::path::PathBuf {
        let filler = self.0.join("filler");
        let _ = std::process::Command::new("dd")
            .args([
                "if=/dev/zero",
                &format!("of={}", filler.display()),
                "bs=64k",
            ])
            .output();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The hub of the disk test, its state on the small tmpfs.
struct DiskHub {
    host: common::Host,
    iface: String,
    state: std::path::PathBuf,
    proc: usize,
}

impl DiskHub {
    /// `tunnel CMD` for this hub's interface and state, to completion.
    fn tunnel(&self, lab: &common::Lab, cmd: &str) -> std::process::Output {
        let state = self.state.to_str().unwrap();
        lab.tunnel(
            &self.host,
            &[cmd, "--iface", &self.iface, "--state-dir", state],
        )
    }

    /// What its state file holds; it must parse whatever happened.
    fn saved(&self) -> serde_json::Value {
        let text =
            std::fs::read_to_string(self.state.join(format!("{}.json", self.iface))).unwrap();
        serde_json::from_str(&text).expect("the state file is always a complete state")
    }
}

#[test]
#[ignore = "needs root: sudo make test"]
fn a_full_or_read_only_disk_never_takes_the_tunnel_down() {
    needs_root("full_disk");
    let mut lab = common::lab(3);
    let (a, b, c) = (lab.host(0), lab.host(1), lab.host(2));
    let disk = Tmpfs::mount(lab.dir.path().join("disk"), "2m");
    let state = disk.0.join("hub");
    let iface = lab.iface("a");
    let serve = lab.spawn(
        &a,
        &[
            "serve",
            "--iface",
            &iface,
            "--state-dir",
            state.to_str().unwrap(),
            "--backend",
            "userspace",
            "--subnet",
            "10.77.0.0/24",
            "--tokens",
            "1",
        ],
    );
    let token = lab.proc(serve).wait_lines(1, common::UP)[0].clone();
    let site = lab.join(&b, "b", &token, &a, &[]);
    assert!(b.ping("10.77.0.1"));
    let hub = DiskHub {
        host: a,
        iface,
        state,
        proc: serve,
    };
    let token2 = a_full_disk_hands_out_no_token(&mut lab, &hub, &disk, &b);
    // From a host on no tunnel yet: B's is on the same subnet already.
    a_read_only_disk_refuses_new_endpoints(&mut lab, &hub, &disk, (&b, &c), &token2);
    // The token refused above was not spent: it joins another site now
    // (from B's namespace, once the first site there has stopped).
    assert!(lab.proc(site.proc).terminate().success());
    let again = lab.join(&b, "e", &token2, &hub.host, &[]);
    assert!(again.lines[0].contains("10.77.0.3"), "{:?}", again.lines);
    assert!(b.ping("10.77.0.1"));
    assert!(lab.proc(again.proc).terminate().success());
    assert!(lab.proc(serve).terminate().success());
}

/// Full: a token cannot be saved, so none is handed out; the tunnel stays
/// up and the file keeps the last complete state. With space again, the
/// next token is saved; it is returned.
fn a_full_disk_hands_out_no_token(
    lab: &mut common::Lab,
    hub: &DiskHub,
    disk: &Tmpfs,
    b: &common::Host,
) -> String {
    let before = hub.saved();
    let filler = disk.fill();
    let out = hub.tunnel(lab, "token");
    assert_eq!(out.status.code(), Some(1), "a token was handed out unsaved");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(b.ping("10.77.0.1"), "the tunnel went down with the disk");
    assert!(
        lab.proc(hub.proc).running(),
        "the hub exited on a full disk"
    );
    assert_eq!(hub.saved(), before);
    // Space again: the next change is saved.
    std::fs::remove_file(&filler).unwrap();
    let out = hub.tunnel(lab, "token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(hub.saved(), before, "the new token's invite is not on disk");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Read-only: a new serve or join refuses to start with one clear line
/// and leaves nothing; the running hub stays up; `token` is not spent.
fn a_read_only_disk_refuses_new_endpoints(
    lab: &mut common::Lab,
    hub: &DiskHub,
    disk: &Tmpfs,
    (b, c): (&common::Host, &common::Host),
    token: &str,
) {
    let a = &hub.host;
    common::sh(&["mount", "-o", "remount,ro", disk.0.to_str().unwrap()]);
    let fresh = disk.0.join("other");
    let (iface_c, iface_d) = (lab.iface("c"), lab.iface("d"));
    let out = lab.tunnel(
        a,
        &[
            "serve",
            "--iface",
            &iface_c,
            "--state-dir",
            fresh.to_str().unwrap(),
            "--backend",
            "userspace",
            "--port",
            "51999",
        ],
    );
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(fresh.to_str().unwrap()), "{err}");
    let join_state = disk.0.join("joined");
    let out = lab.tunnel(
        c,
        &[
            "join",
            token,
            &a.ip,
            "--iface",
            &iface_d,
            "--state-dir",
            join_state.to_str().unwrap(),
            "--backend",
            "userspace",
        ],
    );
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(join_state.to_str().unwrap()), "{err}");
    assert!(!c.has_link(&iface_d));
    assert!(b.ping("10.77.0.1"));
    common::sh(&["mount", "-o", "remount,rw", disk.0.to_str().unwrap()]);
}
