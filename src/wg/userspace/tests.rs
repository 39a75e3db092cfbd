//! The userspace device's pure parts: GSO batching, confinement, error
//! mapping, peers as gotatun takes them, the UAPI socket's life and the
//! device's thread.

use super::*;

#[test]
fn gso_runs_group_equal_sizes_to_one_destination_within_limits() {
    let a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let b: SocketAddr = "192.0.2.2:51820".parse().unwrap();
    // Same size, then a shorter last one ends the run.
    let shape = [(1452, a), (1452, a), (1452, a), (600, a), (1452, a)];
    assert_eq!(gso_runs(&shape), vec![0..4, 4..5]);
    // Another destination or a bigger datagram starts a new run.
    let shape = [(1452, a), (1452, b), (100, b), (1452, b)];
    assert_eq!(gso_runs(&shape), vec![0..1, 1..3, 3..4]);
    // At most 64 datagrams, and 65000 bytes, per run.
    let shape = vec![(100, a); 130];
    assert_eq!(gso_runs(&shape), vec![0..64, 64..128, 128..130]);
    let shape = vec![(1452, a); 50];
    let runs = gso_runs(&shape);
    assert_eq!(runs[0], 0..44);
    assert!(runs.iter().all(|r| r.len() * 1452 <= 65000));
    assert!(gso_runs(&[]).is_empty());
}

#[test]
fn confinement_keeps_packets_whose_other_end_is_inside() {
    let nets = [
        "10.77.0.0/24".parse().unwrap(),
        "fd00::/64".parse().unwrap(),
    ];
    assert!(within(&nets, Some("10.77.0.3".parse().unwrap())));
    assert!(within(&nets, Some("fd00::9".parse().unwrap())));
    assert!(!within(&nets, Some("192.168.1.5".parse().unwrap())));
    assert!(!within(&nets, Some("10.78.0.1".parse().unwrap())));
    // Not an IP packet at all: dropped.
    assert!(!within(&nets, None));
}

#[test]
fn a_run_never_carries_more_bytes_than_one_datagram_can() {
    let a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    // Shorter last datagram, but together over the limit: two sends.
    assert_eq!(gso_runs(&[(40000, a), (30000, a)]), vec![0..1, 1..2]);
    // Exactly at the limit: one.
    assert_eq!(gso_runs(&[(32500, a), (32500, a)]), vec![0..2]);
    assert_eq!(gso_runs(&[(1452, a)]), vec![0..1]);
    assert!(!within(&[], Some("10.0.0.1".parse().unwrap())));
}

#[test]
fn a_port_in_use_is_its_own_error_and_other_failures_say_what_failed() {
    let params = |port| UdpTransportFactoryParams {
        addr: None,
        port,
        fwmark: None,
    };
    let in_use = gotatun::device::Error::Bind(std::io::ErrorKind::AddrInUse.into(), params(51820));
    assert!(matches!(
        err("starting the device")(in_use),
        WgError::PortInUse(51820)
    ));
    let denied =
        gotatun::device::Error::Bind(std::io::ErrorKind::PermissionDenied.into(), params(80));
    assert!(matches!(
        err("starting the device")(denied),
        WgError::Userspace {
            what: "starting the device",
            ..
        }
    ));
    assert!(matches!(
        err("configuring a peer")(gotatun::device::Error::DuplicatePeer),
        WgError::Userspace {
            what: "configuring a peer",
            ..
        }
    ));
}

#[test]
fn a_peer_spec_becomes_gotatuns_peer_unchanged() {
    let key = PrivateKey::generate().public_key();
    let spec = PeerSpec {
        public_key: key,
        endpoint: Some("198.51.100.1:51820".parse().unwrap()),
        allowed_ips: vec![
            "10.77.0.0/24".parse().unwrap(),
            "fd00:77::/64".parse().unwrap(),
        ],
        keepalive: Some(25),
    };
    let p = to_peer(&spec);
    assert_eq!(p.public_key.to_bytes(), *key.as_bytes());
    assert_eq!(p.endpoint, spec.endpoint);
    assert_eq!(p.keepalive, Some(25));
    assert_eq!(p.allowed_ips, spec.allowed_ips);
    assert_eq!(p.preshared_key, None);
}

#[tokio::test]
async fn the_uapi_socket_replaces_a_stale_one_and_goes_away_when_aborted() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("wireguard").join("wgt0.sock");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // A crashed process's socket file, nobody listening.
    std::fs::write(&path, b"").unwrap();
    let (_server, task) = serve_uapi(&path).unwrap();
    tokio::net::UnixStream::connect(&path)
        .await
        .expect("the UAPI socket answers");
    task.abort();
    for _ in 0..100 {
        if tokio::net::UnixStream::connect(&path).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the UAPI socket still answers after its task was aborted");
}

/// A device's work runs on the thread made for it, and that thread ends
/// with it, its tasks too: a container restarting must not leave a
/// thread (and the sockets its tasks hold) behind per run.
#[tokio::test]
async fn a_devices_work_runs_on_its_own_thread_which_ends_with_it() {
    let threads_named = |name: &str| {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim() == name)
            .count()
    };
    let data = DataThread::start("wgtest0").unwrap();
    let (name, id) = data
        .run(async {
            let t = std::thread::current();
            (t.name().map(str::to_owned), t.id())
        })
        .await
        .unwrap();
    assert_eq!(name.as_deref(), Some("wg wgtest0"));
    assert_ne!(id, std::thread::current().id());
    assert_eq!(threads_named("wg wgtest0"), 1);
    // A task left running there, as a device's are.
    let (held, ended) = tokio::sync::oneshot::channel::<()>();
    data.run(async move {
        tokio::spawn(async move {
            let _held = held;
            std::future::pending::<()>().await
        });
    })
    .await
    .unwrap();
    drop(data);
    tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("the thread's tasks end with it")
        .unwrap_err();
    for _ in 0..100 {
        if threads_named("wg wgtest0") == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the device's thread outlived it");
}

/// A prefix that one peer takes from another leaves the other's list, so
/// that `wg show` tells the truth and a later change to the other peer
/// (the mesh sets endpoints on every path change) does not take it back.
/// gotatun's in-memory transports: no TUN, no root.
#[tokio::test]
async fn a_prefix_taken_by_another_peer_leaves_the_first_peers_list() {
    use gotatun::device::{DeviceBuilder, Peer};
    use std::net::{Ipv4Addr, Ipv6Addr};
    let (tun_tx, tun_rx, udp) = gotatun::udp::channel::new_udp_tun_channel(
        16,
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv6Addr::UNSPECIFIED,
        MtuWatcher::new(1420),
    );
    let net = |s: &str| -> IpNetwork { s.parse().unwrap() };
    let (x, y) = (
        x25519::PublicKey::from(*PrivateKey::generate().public_key().as_bytes()),
        x25519::PublicKey::from(*PrivateKey::generate().public_key().as_bytes()),
    );
    let lan = net("192.168.7.0/24");
    let peer = |key, ips: Vec<IpNetwork>| {
        let mut p = Peer::new(key);
        p.allowed_ips = ips;
        p
    };
    let device = DeviceBuilder::new()
        .with_udp(udp)
        .with_ip_pair(tun_tx, tun_rx)
        .with_private_key(PrivateKey::generate().as_secret().clone())
        .with_peer(peer(x, vec![net("10.77.0.2/32"), lan]))
        .with_peer(peer(y, vec![net("10.77.0.3/32")]))
        .build()
        .await
        .unwrap();
    let lists = || async {
        let mut out = std::collections::HashMap::new();
        for p in device.peers().await {
            let mut ips = p.peer.allowed_ips.clone();
            ips.sort();
            out.insert(p.peer.public_key, ips);
        }
        out
    };
    device
        .write(async |w| {
            w.modify_peer(&y, |p| {
                p.clear_allowed_ips();
                p.add_allowed_ips([net("10.77.0.3/32"), lan]);
            })
            .await
        })
        .await
        .unwrap();
    let after_take = lists().await;
    assert_eq!(after_take[&x], vec![net("10.77.0.2/32")]);
    assert_eq!(after_take[&y], vec![net("10.77.0.3/32"), lan]);
    let endpoint: SocketAddr = "192.0.2.9:51820".parse().unwrap();
    device
        .write(async |w| w.modify_peer(&x, |p| p.set_endpoint(Some(endpoint))).await)
        .await
        .unwrap();
    assert_eq!(lists().await, after_take);
    // A new peer given the prefix takes it the same way.
    let z = x25519::PublicKey::from(*PrivateKey::generate().public_key().as_bytes());
    device
        .write(async |w| w.add_peer(peer(z, vec![lan])))
        .await
        .unwrap();
    let after_add = lists().await;
    assert_eq!(after_add[&y], vec![net("10.77.0.3/32")]);
    assert_eq!(after_add[&z], vec![lan]);
    device.stop().await;
}
