//! The follower's decisions, with a fake runtime, fake devices and fake
//! netlink: attaching, following events, labels, routes, errors.

use super::*;
use crate::docker::fake::FakeRuntime;
use crate::docker::{ContainerEvent, ContainerInfo, EventKind};
use crate::keys::PrivateKey;
use crate::status::State as Up;
use crate::wg::fake::FakeWg;
use crate::wg::{DeviceSpec, WgDevice};
use std::sync::Mutex;
use std::time::Duration;

/// Places fake devices, built with their peers as a real one is, and
/// remembers where.
#[derive(Default)]
struct FakePlacer {
    placed: Mutex<Vec<(u32, FakeWg)>>,
    net: Arc<crate::net::fake::FakeNet>,
    /// A namespace this placer cannot enter.
    refuse: Mutex<Option<u32>>,
    /// The next device placed refuses its first change (routes).
    broken: Mutex<bool>,
}

#[async_trait::async_trait]
impl Placer for FakePlacer {
    async fn place(
        &self,
        spec: &DeviceSpec,
        container: &str,
        pid: u32,
    ) -> Result<Placed, ContainerError> {
        if *self.refuse.lock().unwrap() == Some(pid) {
            return Err(ContainerError::Endpoint {
                container: container.into(),
                reason: format!("the fake cannot enter {pid}"),
            });
        }
        let dev = FakeWg::default();
        for p in &spec.peers {
            dev.upsert_peer(p).await.unwrap();
        }
        if std::mem::take(&mut *self.broken.lock().unwrap()) {
            dev.fail_after(0);
        }
        self.placed.lock().unwrap().push((pid, dev.clone()));
        Ok(Placed {
            device: Box::new(dev),
            net: self.net.clone(),
        })
    }

    async fn probe(&self, _: u32, _: SocketAddr, _: Duration) -> Result<Duration, String> {
        Ok(Duration::ZERO)
    }
}

impl FakePlacer {
    fn pids(&self) -> Vec<u32> {
        self.placed
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| *p)
            .collect()
    }

    fn destroyed(&self) -> Vec<bool> {
        self.placed
            .lock()
            .unwrap()
            .iter()
            .map(|(_, d)| d.state.lock().unwrap().destroyed)
            .collect()
    }

    /// The last device placed.
    fn last(&self) -> FakeWg {
        self.placed.lock().unwrap().last().unwrap().1.clone()
    }

    async fn until(&self, what: &str, cond: impl Fn(&Self) -> bool) {
        for _ in 0..500 {
            if cond(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!(
            "{what}: placed {:?}, destroyed {:?}",
            self.pids(),
            self.destroyed()
        );
    }
}

fn spec(container: &str) -> EndpointSpec {
    EndpointSpec {
        container: container.into(),
        iface: format!("{container}0"),
        key: PrivateKey::generate(),
        address: "10.77.0.5/24".parse().unwrap(),
        address6: None,
        hub: PeerSpec {
            public_key: PrivateKey::generate().public_key(),
            endpoint: None,
            allowed_ips: vec!["10.77.0.0/24".parse().unwrap()],
            keepalive: None,
        },
        mtu: 1420,
        probe: "10.77.0.1:51821".parse().unwrap(),
        link: None,
        by_label: false,
    }
}

fn info(id: &str, name: &str, pid: Option<u32>) -> ContainerInfo {
    ContainerInfo {
        id: id.into(),
        name: name.into(),
        pid,
        endpoint_ids: vec![],
    }
}

fn event(kind: EventKind, id: &str, name: &str) -> ContainerEvent {
    ContainerEvent {
        kind,
        id: id.into(),
        name: name.into(),
        labels: Default::default(),
    }
}

#[tokio::test]
async fn the_follower_attaches_and_follows_restarts_recreation_and_removal() {
    let rt = Arc::new(FakeRuntime::default());
    rt.set(info("c1", "web", Some(10)));
    rt.set(info("o1", "other", Some(20)));
    let placer = Arc::new(FakePlacer::default());
    let mut f = Follower::new(rt.clone(), placer.clone(), vec![spec("web")]);
    let view = f.status();
    assert_eq!(view.report().await[0].state, Up::Down);
    f.reconcile_all().await.unwrap();
    assert_eq!(placer.pids(), vec![10]);
    let up = view.report().await;
    assert_eq!(up[0].state, Up::Up);
    assert_eq!(up[0].container_id.as_deref(), Some("c1"));

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let lan: IpNetwork = "192.168.7.0/24".parse().unwrap();
    let (routes_tx, routes_rx) = tokio::sync::watch::channel(vec![]);
    let driver = async {
        rt.until_subscribed().await;
        // Another container's events change nothing.
        rt.emit(event(EventKind::Die, "o1", "other"));
        // Stopped: detached, the endpoint kept for later.
        rt.set(info("c1", "web", None));
        rt.emit(event(EventKind::Die, "c1", "web"));
        placer
            .until("detach on die", |p| p.destroyed() == [true])
            .await;
        // Started again in a new namespace: attached there.
        rt.set(info("c1", "web", Some(11)));
        rt.emit(event(EventKind::Start, "c1", "web"));
        placer
            .until("attach on start", |p| p.pids() == [10, 11])
            .await;
        // Removed and re-created under the same name: re-attached.
        rt.remove("web");
        rt.emit(event(EventKind::Destroy, "c1", "web"));
        placer
            .until("detach on destroy", |p| p.destroyed() == [true, true])
            .await;
        rt.set(info("c2", "web", Some(12)));
        rt.emit(event(EventKind::Start, "c2", "web"));
        placer
            .until("attach the new one", |p| p.pids() == [10, 11, 12])
            .await;
        // LANs behind other sites, announced while following, reach
        // the attached container; withdrawn, they are gone again.
        routes_tx.send(vec![lan]).unwrap();
        placer
            .until("route the LAN", |p| {
                p.net
                    .routes
                    .lock()
                    .unwrap()
                    .contains(&(lan, "web0".into(), None))
            })
            .await;
        routes_tx.send(vec![]).unwrap();
        placer
            .until("withdraw the LAN", |p| {
                p.net.routes.lock().unwrap().is_empty()
            })
            .await;
        stop.send(()).unwrap();
    };
    tokio::join!(
        f.follow(
            async {
                let _ = stopped.await;
            },
            Some(routes_rx)
        ),
        driver
    );
    assert_eq!(view.report().await[0].container_id.as_deref(), Some("c2"));
    f.detach_all().await;
    assert_eq!(placer.destroyed(), [true, true, true]);
    assert_eq!(view.report().await[0].state, Up::Down);
}

#[tokio::test]
async fn a_stopped_engine_is_an_error_and_detaches_nothing() {
    let rt = Arc::new(FakeRuntime::default());
    rt.set(info("c1", "web", Some(10)));
    let placer = Arc::new(FakePlacer::default());
    let mut f = Follower::new(rt.clone(), placer.clone(), vec![spec("web")]);
    f.reconcile_all().await.unwrap();
    rt.down();
    assert!(matches!(
        f.reconcile_all().await,
        Err(ContainerError::Docker(DockerError::Unavailable(_)))
    ));
    assert_eq!(placer.destroyed(), [false]);
}

#[test]
fn endpoint_names_fit() {
    assert_eq!(endpoint_iface("wg-tunnel", 0), "wg-tunnelc0");
    assert_eq!(endpoint_iface("a23456789012345", 12).len(), 15);
}

/// Endpoints made up on the spot, and the ones given back.
#[derive(Default)]
struct FakeEndpoints {
    released: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Endpoints for FakeEndpoints {
    async fn allocate(&self, name: &str, _driver: bool) -> Result<EndpointSpec, ContainerError> {
        Ok(spec(name))
    }

    async fn rename(&self, _spec: &EndpointSpec, _name: &str) -> Result<(), ContainerError> {
        Ok(())
    }

    async fn release(&self, spec: &EndpointSpec) -> Result<(), ContainerError> {
        self.released.lock().unwrap().push(spec.container.clone());
        Ok(())
    }

    async fn leftovers(&self) -> Vec<EndpointSpec> {
        vec![]
    }
}

#[tokio::test]
async fn labelled_containers_are_attached_as_they_start_and_given_back_when_removed() {
    let rt = Arc::new(FakeRuntime::default());
    let label = docker::Label::parse("tunnel.attach").unwrap();
    let labelled = |name: &str| {
        rt.labels.lock().unwrap().insert(
            name.to_owned(),
            [("tunnel.attach".to_owned(), "1".to_owned())].into(),
        );
    };
    rt.set(info("a1", "a", Some(10)));
    labelled("a");
    rt.set(info("b1", "b", Some(20)));
    let placer = Arc::new(FakePlacer::default());
    let endpoints = Arc::new(FakeEndpoints::default());
    let mut f = Follower::new(rt.clone(), placer.clone(), vec![]).with_label(ByLabel {
        label,
        endpoints: endpoints.clone(),
    });
    f.discover().await.unwrap();
    assert_eq!(placer.pids(), vec![10], "only the labelled one");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let driver = async {
        rt.until_subscribed().await;
        // Started later with the label: attached.
        rt.set(info("c1", "c", Some(30)));
        let mut ev = event(EventKind::Start, "c1", "c");
        ev.labels = [("tunnel.attach".to_owned(), "yes".to_owned())].into();
        rt.emit(ev);
        placer.until("attach c", |p| p.pids() == [10, 30]).await;
        // Started without it: never.
        rt.set(info("d1", "d", Some(40)));
        rt.emit(event(EventKind::Start, "d1", "d"));
        // Removed: detached, and its endpoint given back.
        rt.remove("a");
        rt.emit(event(EventKind::Destroy, "a1", "a"));
        placer
            .until("detach a", |p| p.destroyed() == [true, false])
            .await;
        stop.send(()).unwrap();
    };
    tokio::join!(
        f.follow(
            async {
                let _ = stopped.await;
            },
            None
        ),
        driver
    );
    assert_eq!(*endpoints.released.lock().unwrap(), ["a"]);
    assert_eq!(placer.pids(), vec![10, 30], "d was never attached");
    let shown: Vec<String> = f
        .status()
        .report()
        .await
        .iter()
        .filter_map(|e| e.container.clone())
        .collect();
    assert_eq!(shown, ["c"]);
}

/// A follower of `specs` on `rt`, with a fresh placer.
fn follower(rt: &Arc<FakeRuntime>, specs: Vec<EndpointSpec>) -> (Follower, Arc<FakePlacer>) {
    let placer = Arc::new(FakePlacer::default());
    (Follower::new(rt.clone(), placer.clone(), specs), placer)
}

#[tokio::test]
async fn a_stopped_or_missing_container_is_not_attached_until_it_runs() {
    let rt = Arc::new(FakeRuntime::default());
    rt.set(info("c1", "web", None));
    let (mut f, placer) = follower(&rt, vec![spec("web"), spec("gone")]);
    f.reconcile_all().await.unwrap();
    assert!(placer.pids().is_empty(), "attached to a stopped container");
    let states: Vec<Up> = f.status().report().await.iter().map(|e| e.state).collect();
    assert_eq!(states, [Up::Down, Up::Down]);
    rt.set(info("c1", "web", Some(10)));
    f.reconcile_all().await.unwrap();
    assert_eq!(placer.pids(), [10]);
    // Nothing changed since: reconciling again attaches nothing twice.
    f.reconcile_all().await.unwrap();
    assert_eq!(placer.pids(), [10]);
    assert_eq!(placer.destroyed(), [false]);
}

#[tokio::test]
async fn a_container_recreated_while_nobody_watched_gets_the_endpoint_moved() {
    let rt = Arc::new(FakeRuntime::default());
    rt.set(info("c1", "web", Some(10)));
    let (mut f, placer) = follower(&rt, vec![spec("web")]);
    f.reconcile_all().await.unwrap();
    // The same name, another container (docker compose up --force-recreate).
    rt.set(info("c2", "web", Some(12)));
    f.reconcile_all().await.unwrap();
    assert_eq!(placer.pids(), [10, 12]);
    assert_eq!(placer.destroyed(), [true, false], "the old device stayed");
    let shown = f.status().report().await;
    assert_eq!(shown[0].container_id.as_deref(), Some("c2"));
}

#[tokio::test]
async fn one_endpoint_that_cannot_attach_keeps_no_other_from_attaching() {
    let rt = Arc::new(FakeRuntime::default());
    rt.set(info("a1", "a", Some(10)));
    rt.set(info("b1", "b", Some(20)));
    rt.set(info("c1", "c", Some(30)));
    let (mut f, placer) = follower(&rt, vec![spec("a"), spec("b"), spec("c")]);
    *placer.refuse.lock().unwrap() = Some(20);
    let e = f.reconcile_all().await.unwrap_err();
    assert!(
        matches!(&e, ContainerError::Endpoint { container, .. } if container == "b"),
        "{e:?}"
    );
    assert_eq!(placer.pids(), [10, 30]);
    let states: Vec<Up> = f.status().report().await.iter().map(|e| e.state).collect();
    assert_eq!(states, [Up::Up, Up::Down, Up::Up]);
}

#[tokio::test]
async fn a_device_that_cannot_take_the_routes_is_removed_again_and_reported() {
    let rt = Arc::new(FakeRuntime::default());
    rt.set(info("c1", "web", Some(10)));
    let (mut f, placer) = follower(&rt, vec![spec("web")]);
    f.set_routes(vec!["192.168.7.0/24".parse().unwrap()]).await;
    *placer.broken.lock().unwrap() = true;
    let e = f.reconcile_all().await.unwrap_err();
    assert!(
        matches!(&e, ContainerError::Attach { container, .. } if container == "web"),
        "{e:?}"
    );
    assert_eq!(placer.destroyed(), [true], "a half-made endpoint stayed");
    assert_eq!(f.status().report().await[0].state, Up::Down);
    // The next reconcile tries again, and this time it works.
    f.reconcile_all().await.unwrap();
    assert_eq!(placer.destroyed(), [true, false]);
}

#[tokio::test]
async fn the_lans_of_other_sites_become_allowed_ips_and_routes_and_go_again() {
    let rt = Arc::new(FakeRuntime::default());
    rt.set(info("c1", "web", Some(10)));
    let s = spec("web");
    let hub = s.hub.public_key;
    let (mut f, placer) = follower(&rt, vec![s]);
    f.reconcile_all().await.unwrap();
    let dev = placer.last();
    let net = |s: &str| -> IpNetwork { s.parse().unwrap() };
    let (lan1, lan2) = (net("192.168.7.0/24"), net("172.27.88.0/24"));
    f.set_routes(vec![lan1]).await;
    assert_eq!(
        dev.peer(&hub).unwrap().allowed_ips,
        [net("10.77.0.0/24"), lan1]
    );
    f.set_routes(vec![lan2]).await;
    assert_eq!(
        dev.peer(&hub).unwrap().allowed_ips,
        [net("10.77.0.0/24"), lan2],
        "the hub's own allowed IPs are kept and the old LAN dropped"
    );
    let routes: Vec<IpNetwork> = placer
        .net
        .routes
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(routes, [lan2]);
    f.set_routes(vec![]).await;
    assert!(placer.net.routes.lock().unwrap().is_empty());
    assert_eq!(dev.peer(&hub).unwrap().allowed_ips, [net("10.77.0.0/24")]);
}

#[tokio::test]
async fn attaches_and_reattaches_are_counted_apart() {
    let rt = Arc::new(FakeRuntime::default());
    rt.set(info("c1", "web", Some(10)));
    let metrics = crate::metrics::Metrics::new();
    let (f, placer) = follower(&rt, vec![spec("web")]);
    let mut f = f.with_metrics(metrics.clone());
    f.reconcile_all().await.unwrap();
    rt.set(info("c1", "web", None));
    f.reconcile_all().await.unwrap();
    rt.set(info("c1", "web", Some(11)));
    f.reconcile_all().await.unwrap();
    assert_eq!(placer.pids(), [10, 11]);
    let text = metrics.encode();
    for want in [
        "tunnel_container_attaches_total{container=\"web\"} 1",
        "tunnel_container_reattaches_total{container=\"web\"} 1",
    ] {
        assert!(text.contains(want), "{want}:\n{text}");
    }
}

#[tokio::test]
async fn discover_adopts_a_labelled_container_once_and_gives_back_what_went() {
    let rt = Arc::new(FakeRuntime::default());
    let label = docker::Label::parse("tunnel.attach").unwrap();
    rt.set(info("a1", "a", Some(10)));
    rt.labels.lock().unwrap().insert(
        "a".to_owned(),
        [("tunnel.attach".to_owned(), "1".to_owned())].into(),
    );
    let endpoints = Arc::new(FakeEndpoints::default());
    let (f, placer) = follower(&rt, vec![spec("web")]);
    let mut f = f.with_label(ByLabel {
        label,
        endpoints: endpoints.clone(),
    });
    f.discover().await.unwrap();
    f.discover().await.unwrap();
    assert_eq!(placer.pids(), [10], "adopted twice");
    assert_eq!(f.status().report().await.len(), 2);
    // Removed while the follower was not listening: given back at the
    // next look; the endpoint named on the command line stays.
    rt.remove("a");
    f.discover().await.unwrap();
    assert_eq!(*endpoints.released.lock().unwrap(), ["a"]);
    assert_eq!(placer.destroyed(), [true]);
    let shown: Vec<Option<String>> = f
        .status()
        .report()
        .await
        .into_iter()
        .map(|e| e.container)
        .collect();
    assert_eq!(shown, [Some("web".to_owned())]);
}

#[test]
fn endpoint_names_keep_their_index_when_the_interface_name_is_cut() {
    assert_eq!(endpoint_iface("a23456789012345", 3), "a234567890123c3");
    assert_eq!(endpoint_iface("a23456789012345", 123), "a2345678901c123");
    assert_ne!(
        endpoint_iface("a23456789012345", 1),
        endpoint_iface("a23456789012345", 11)
    );
}
