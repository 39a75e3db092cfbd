//! The plugin protocol in-process, through the router, with fake
//! endpoints: no socket, no Docker, no root.

use super::wire::GATEWAY_REQUEST;
use super::*;
use crate::containers::ContainerError;
use crate::docker::fake::FakeRuntime;
use crate::docker::{ContainerEvent, ContainerInfo, EventKind};
use crate::keys::PrivateKey;
use crate::wg::PeerSpec;
use axum::extract::ConnectInfo;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Mutex;
use tower::ServiceExt;

#[derive(Default)]
struct Book2 {
    allocated: Mutex<Vec<String>>,
    released: Mutex<Vec<IpAddr>>,
    renamed: Mutex<Vec<(IpAddr, String)>>,
    /// What an earlier run left.
    left: Mutex<Vec<EndpointSpec>>,
}

#[async_trait::async_trait]
impl Endpoints for Book2 {
    async fn allocate(&self, name: &str, driver: bool) -> Result<EndpointSpec, ContainerError> {
        assert!(driver);
        let mut a = self.allocated.lock().unwrap();
        a.push(name.to_owned());
        let n = a.len() + 1;
        Ok(EndpointSpec {
            container: name.into(),
            iface: format!("wgd{n}"),
            key: PrivateKey::generate(),
            address: format!("10.77.0.{n}/24").parse().unwrap(),
            address6: Some(format!("fd00:77::{n}/64").parse().unwrap()),
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
        })
    }

    async fn rename(&self, spec: &EndpointSpec, name: &str) -> Result<(), ContainerError> {
        self.renamed
            .lock()
            .unwrap()
            .push((spec.address.ip(), name.to_owned()));
        Ok(())
    }

    async fn release(&self, spec: &EndpointSpec) -> Result<(), ContainerError> {
        self.released.lock().unwrap().push(spec.address.ip());
        Ok(())
    }

    async fn leftovers(&self) -> Vec<EndpointSpec> {
        self.left.lock().unwrap().clone()
    }
}

fn driver() -> (Arc<Driver>, Arc<Book2>) {
    let book = Arc::new(Book2::default());
    let (_tx, rx) = tokio::sync::watch::channel(vec![]);
    let d = Driver::new(
        book.clone(),
        Arc::new(crate::net::fake::FakeNet::default()),
        BackendChoice::Userspace,
        crate::ipam::Subnets {
            main: "10.77.0.0/24".parse().unwrap(),
            v6: Some("fd00:77::/64".parse().unwrap()),
        },
        "10.77.0.1".parse().unwrap(),
        rx,
    );
    (d, book)
}

async fn call(d: &Arc<Driver>, path: &str, body: Value) -> Value {
    let mut req = hyper::Request::post(path)
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    req.extensions_mut().insert(ConnectInfo(Peer { pid: None }));
    let res = d.router().oneshot(req).await.unwrap();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn the_handshake_says_network_and_ipam() {
    let (d, _) = driver();
    let v = call(&d, "/Plugin.Activate", json!({})).await;
    assert_eq!(v["Implements"], json!(["NetworkDriver", "IpamDriver"]));
    let v = call(&d, "/NetworkDriver.GetCapabilities", json!({})).await;
    assert_eq!(v["Scope"], "local");
}

#[tokio::test]
async fn the_pool_is_the_tunnels_subnet_and_the_gateway_the_hub() {
    let (d, _) = driver();
    let v = call(
        &d,
        "/IpamDriver.RequestPool",
        json!({"AddressSpace": "tunnel", "Pool": "", "V6": false}),
    )
    .await;
    assert_eq!(v["Pool"], "10.77.0.0/24");
    let v = call(
        &d,
        "/IpamDriver.RequestPool",
        json!({"Pool": "172.18.0.0/16"}),
    )
    .await;
    assert!(v["Err"].as_str().unwrap().contains("10.77.0.0/24"), "{v}");
    // A dual-stack tunnel's IPv6 subnet is the pool of `--ipv6`.
    let v = call(&d, "/IpamDriver.RequestPool", json!({"V6": true})).await;
    assert_eq!(
        (v["PoolID"].as_str(), v["Pool"].as_str()),
        (Some("tunnel6"), Some("fd00:77::/64"))
    );
    let v = call(
        &d,
        "/IpamDriver.RequestPool",
        json!({"V6": true, "Pool": "fd00:1::/64"}),
    )
    .await;
    assert!(v["Err"].as_str().unwrap().contains("fd00:77::/64"), "{v}");
    let v = call(
        &d,
        "/IpamDriver.RequestAddress",
        json!({"PoolID": "tunnel6", "Options": {"RequestAddressType": GATEWAY_REQUEST}}),
    )
    .await;
    assert_eq!(v["Address"], "fd00:77::1/64");
    // The gateway is the hub.
    let v = call(
        &d,
        "/IpamDriver.RequestAddress",
        json!({"PoolID": "tunnel", "Options": {"RequestAddressType": GATEWAY_REQUEST}}),
    )
    .await;
    assert_eq!(v["Address"], "10.77.0.1/24");
}

#[tokio::test]
async fn addresses_come_from_the_hub_and_go_back_to_it() {
    let (d, book) = driver();
    // A network made with another IPAM is refused.
    let v = call(
        &d,
        "/NetworkDriver.CreateNetwork",
        json!({"NetworkID": "n1", "IPv4Data": [{"Pool": "172.18.0.0/16"}]}),
    )
    .await;
    assert!(v["Err"].as_str().unwrap().contains("--ipam-driver"), "{v}");
    let v = call(
        &d,
        "/NetworkDriver.CreateNetwork",
        json!({"NetworkID": "n1", "IPv4Data": [{"Pool": "10.77.0.0/24"}]}),
    )
    .await;
    assert_eq!(v, json!({}));
    let v = call(
        &d,
        "/IpamDriver.RequestAddress",
        json!({"PoolID": "tunnel"}),
    )
    .await;
    assert_eq!(v["Address"], "10.77.0.2/24");
    assert_eq!(book.allocated.lock().unwrap().len(), 1);
    let v = call(
        &d,
        "/IpamDriver.RequestAddress",
        json!({"PoolID": "tunnel", "Address": "10.77.0.9"}),
    )
    .await;
    assert!(v["Err"].as_str().unwrap().contains("--ip"), "{v}");
    let v = call(
        &d,
        "/NetworkDriver.CreateEndpoint",
        json!({"NetworkID": "n1", "EndpointID": "e1", "Interface": {"Address": "10.77.0.2/24"}}),
    )
    .await;
    assert_eq!(v, json!({}));
    // An endpoint Docker did not get an address for from us.
    let v = call(
        &d,
        "/NetworkDriver.CreateEndpoint",
        json!({"NetworkID": "n1", "EndpointID": "e2", "Interface": {"Address": "10.77.0.7/24"}}),
    )
    .await;
    assert!(v.get("Err").is_some(), "{v}");
    // Joining needs the engine's pid, from the socket.
    let v = call(
        &d,
        "/NetworkDriver.Join",
        json!({"NetworkID": "n1", "EndpointID": "e1", "SandboxKey": "/x"}),
    )
    .await;
    assert!(
        v["Err"].as_str().unwrap().contains("peer credentials"),
        "{v}"
    );
    call(
        &d,
        "/NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": "n1", "EndpointID": "e1"}),
    )
    .await;
    let v = call(
        &d,
        "/IpamDriver.ReleaseAddress",
        json!({"PoolID": "tunnel", "Address": "10.77.0.2/24"}),
    )
    .await;
    assert_eq!(v, json!({}));
    assert_eq!(
        *book.released.lock().unwrap(),
        ["10.77.0.2".parse::<IpAddr>().unwrap()]
    );
    // Releasing the gateway gives nothing back.
    call(
        &d,
        "/IpamDriver.ReleaseAddress",
        json!({"PoolID": "tunnel", "Address": "10.77.0.1/24"}),
    )
    .await;
    assert_eq!(book.released.lock().unwrap().len(), 1);
}

#[test]
fn plugin_names() {
    assert!(check_name("tunnel").is_ok());
    assert!(check_name("tun_1.a-b").is_ok());
    assert!(check_name("").is_err());
    assert!(check_name("../x").is_err());
}

/// The status code and body of a request with a raw body.
async fn raw(d: &Arc<Driver>, path: &str, body: &str) -> (u16, String) {
    let mut req = hyper::Request::post(path)
        .body(axum::body::Body::from(body.to_owned()))
        .unwrap();
    req.extensions_mut().insert(ConnectInfo(Peer { pid: None }));
    let res = d.router().oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// An address from IPAM and an endpoint `id` on it; the address.
async fn endpoint(d: &Arc<Driver>, id: &str) -> String {
    let v = call(d, "/IpamDriver.RequestAddress", json!({"PoolID": "tunnel"})).await;
    let address = v["Address"].as_str().unwrap().to_owned();
    let v = call(
        d,
        "/NetworkDriver.CreateEndpoint",
        json!({"NetworkID": "n1", "EndpointID": id, "Interface": {"Address": address}}),
    )
    .await;
    assert_eq!(v, json!({}));
    address
}

#[tokio::test]
async fn a_request_that_does_not_decode_is_a_bad_request_in_dockers_format() {
    let (d, book) = driver();
    let (status, body) = raw(&d, "/IpamDriver.RequestAddress", "{not json").await;
    assert_eq!(status, 400);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["Err"].as_str().unwrap().starts_with("bad request: "),
        "{v}"
    );
    assert!(book.allocated.lock().unwrap().is_empty());
    // Unknown fields and missing ones are fine: Docker adds fields over time.
    let (status, _) = raw(&d, "/IpamDriver.RequestPool", r#"{"New": 1}"#).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_address_is_an_endpoint_once_and_a_pending_one_goes_back_on_release() {
    let (d, book) = driver();
    let first = endpoint(&d, "e1").await;
    // The same address again: IPAM's pending one is used up.
    let v = call(
        &d,
        "/NetworkDriver.CreateEndpoint",
        json!({"NetworkID": "n1", "EndpointID": "e9", "Interface": {"Address": first}}),
    )
    .await;
    assert!(v["Err"].as_str().unwrap().contains("no address"), "{v}");
    // Handed out, never an endpoint (docker run failed in between).
    let v = call(
        &d,
        "/IpamDriver.RequestAddress",
        json!({"PoolID": "tunnel"}),
    )
    .await;
    let pending = v["Address"].as_str().unwrap().to_owned();
    call(
        &d,
        "/IpamDriver.ReleaseAddress",
        json!({"PoolID": "tunnel", "Address": pending}),
    )
    .await;
    assert_eq!(
        *book.released.lock().unwrap(),
        [address_ip(&pending)],
        "the pending address was not given back"
    );
    // An address the driver never handed out: nothing to give back.
    let v = call(
        &d,
        "/IpamDriver.ReleaseAddress",
        json!({"PoolID": "tunnel", "Address": "10.77.0.200/24"}),
    )
    .await;
    assert_eq!(v, json!({}));
    assert_eq!(book.released.lock().unwrap().len(), 1);
}

fn address_ip(cidr: &str) -> IpAddr {
    cidr.split('/').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn networks_are_remembered_with_their_internet_option_until_deleted() {
    let (d, _) = driver();
    for (id, generic) in [
        ("open", json!({"tunnel.internet": "true"})),
        ("closed", json!({})),
    ] {
        let v = call(
            &d,
            "/NetworkDriver.CreateNetwork",
            json!({
                "NetworkID": id,
                "IPv4Data": [{"Pool": "10.77.0.0/24"}],
                "Options": {"com.docker.network.generic": generic},
            }),
        )
        .await;
        assert_eq!(v, json!({}));
    }
    let networks = d.book.lock().await.networks.clone();
    assert_eq!(networks.get("open"), Some(&true));
    assert_eq!(networks.get("closed"), Some(&false));
    call(
        &d,
        "/NetworkDriver.DeleteNetwork",
        json!({"NetworkID": "open"}),
    )
    .await;
    assert!(!d.book.lock().await.networks.contains_key("open"));
}

#[tokio::test]
async fn close_removes_devices_keeps_joined_endpoints_and_gives_back_the_rest() {
    let (d, book) = driver();
    let a = endpoint(&d, "e1").await;
    let joined = endpoint(&d, "e2").await;
    let device = crate::wg::fake::FakeWg::default();
    d.book.lock().await.endpoints.get_mut("e2").unwrap().device = Some(Arc::new(device.clone()));
    let v = call(
        &d,
        "/IpamDriver.RequestAddress",
        json!({"PoolID": "tunnel"}),
    )
    .await;
    let pending = v["Address"].as_str().unwrap().to_owned();
    d.close().await;
    let mut released = book.released.lock().unwrap().clone();
    released.sort();
    assert_eq!(released, [address_ip(&a), address_ip(&pending)]);
    assert!(!released.contains(&address_ip(&joined)));
    assert!(device.state.lock().unwrap().destroyed);
    assert!(d.report().await.is_empty());
}

#[tokio::test]
async fn at_start_the_networks_come_back_stopped_containers_leftovers_go_and_failed_starts_start() {
    use crate::docker::{DriverNetwork, Member};
    let (d, book) = driver();
    let left = book.allocate("web", true).await.unwrap();
    *book.left.lock().unwrap() = vec![left.clone()];
    let rt = Arc::new(FakeRuntime::default());
    let stopped = |id: &str, error: Option<&str>| Member {
        container: ContainerInfo {
            id: id.into(),
            name: id.into(),
            pid: None,
            endpoint_ids: vec![],
        },
        endpoint: None,
        address6: None,
        error: error.map(str::to_owned),
    };
    *rt.networks.lock().unwrap() = vec![DriverNetwork {
        id: "n1".into(),
        name: "front".into(),
        options: [("tunnel.internet".to_owned(), "true".to_owned())].into(),
        members: vec![
            stopped("web", None),
            stopped(
                "late",
                Some("dial unix /run/docker/plugins/tnl.sock: connect: no such file or directory"),
            ),
        ],
    }];
    d.resume(rt.as_ref(), "tnl").await;
    assert_eq!(d.book.lock().await.networks.get("n1"), Some(&true));
    assert_eq!(*book.released.lock().unwrap(), [left.address.ip()]);
    assert_eq!(*rt.started.lock().unwrap(), ["late"]);
    assert!(d.report().await.is_empty());
}

#[tokio::test]
async fn an_endpoint_is_reported_down_under_its_placeholder_until_it_joins() {
    let (d, book) = driver();
    let a = endpoint(&d, "e1").await;
    let [e] = d.report().await.try_into().unwrap();
    assert_eq!((e.role, e.state), (Role::Container, State::Down));
    assert_eq!(e.address.to_string(), a);
    assert!(e.peers.is_empty());
    let name = e.container.unwrap();
    assert_eq!(name, book.allocated.lock().unwrap()[0]);
    assert!(
        name.starts_with("docker-") && name.len() == "docker-".len() + 8,
        "{name}"
    );
}

#[tokio::test]
async fn an_endpoint_is_named_after_its_container_once_when_that_starts() {
    let (d, book) = driver();
    let a = endpoint(&d, "e1").await;
    let rt = Arc::new(FakeRuntime::default());
    rt.set(ContainerInfo {
        id: "c1".into(),
        name: "web".into(),
        pid: Some(10),
        endpoint_ids: vec!["e1".into()],
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let follow = tokio::spawn(d.clone().follow(rt.clone(), "tnl".into(), async {
        let _ = stopped.await;
    }));
    rt.until_subscribed().await;
    let start = ContainerEvent {
        kind: EventKind::Start,
        id: "c1".into(),
        name: "web".into(),
        labels: Default::default(),
    };
    rt.emit(start.clone());
    for _ in 0..500 {
        if !book.renamed.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    // Started again: it has its name already.
    rt.emit(start);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    stop.send(()).unwrap();
    follow.await.unwrap();
    assert_eq!(
        *book.renamed.lock().unwrap(),
        [(address_ip(&a), "web".to_owned())]
    );
    assert_eq!(d.report().await[0].container.as_deref(), Some("web"));
}

#[tokio::test]
async fn on_an_ipv6_network_each_endpoint_gets_the_twin_of_its_ipv4_address() {
    let (d, book) = driver();
    let v = call(
        &d,
        "/NetworkDriver.CreateNetwork",
        json!({"NetworkID": "n6", "IPv4Data": [{"Pool": "10.77.0.0/24"}], "IPv6Data": [{"Pool": "fd00:1::/64"}]}),
    )
    .await;
    assert!(v["Err"].as_str().unwrap().contains("IPv6"), "{v}");
    let v = call(
        &d,
        "/NetworkDriver.CreateNetwork",
        json!({"NetworkID": "n6", "IPv4Data": [{"Pool": "10.77.0.0/24"}], "IPv6Data": [{"Pool": "fd00:77::/64"}]}),
    )
    .await;
    assert_eq!(v, json!({}));
    // Docker asks for each endpoint's IPv4 address, then its IPv6 one.
    let ask = |pool: &'static str| {
        let d = d.clone();
        async move {
            call(&d, "/IpamDriver.RequestAddress", json!({"PoolID": pool})).await["Address"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let (a, a6) = (ask("tunnel").await, ask("tunnel6").await);
    assert_eq!((a.as_str(), a6.as_str()), ("10.77.0.2/24", "fd00:77::2/64"));
    assert_eq!(
        book.allocated.lock().unwrap().len(),
        1,
        "one endpoint, two addresses"
    );
    let (b, b6) = (ask("tunnel").await, ask("tunnel6").await);
    assert_eq!(b6, "fd00:77::3/64");
    // Crossed twins are refused, and nothing is taken.
    let v = call(
        &d,
        "/NetworkDriver.CreateEndpoint",
        json!({"NetworkID": "n6", "EndpointID": "e1", "Interface": {"Address": a, "AddressIPv6": b6}}),
    )
    .await;
    assert!(v["Err"].as_str().unwrap().contains("twin"), "{v}");
    for (id, v4, v6) in [("e1", &a, &a6), ("e2", &b, &b6)] {
        let v = call(
            &d,
            "/NetworkDriver.CreateEndpoint",
            json!({"NetworkID": "n6", "EndpointID": id, "Interface": {"Address": v4, "AddressIPv6": v6}}),
        )
        .await;
        assert_eq!(v, json!({}));
    }
    let report = d.report().await;
    assert!(report.iter().all(|e| e.address6.is_some()), "{report:?}");
    // Giving back the IPv6 twin is a no-op; the IPv4 address frees both.
    call(
        &d,
        "/IpamDriver.ReleaseAddress",
        json!({"PoolID": "tunnel6", "Address": a6}),
    )
    .await;
    assert!(book.released.lock().unwrap().is_empty());
    call(
        &d,
        "/IpamDriver.ReleaseAddress",
        json!({"PoolID": "tunnel", "Address": a}),
    )
    .await;
    assert_eq!(book.released.lock().unwrap().len(), 1);
    // An IPv6 request with no IPv4 address before it is refused.
    let v = call(
        &d,
        "/IpamDriver.RequestAddress",
        json!({"PoolID": "tunnel6"}),
    )
    .await;
    assert!(v["Err"].as_str().is_some(), "{v}");
}
