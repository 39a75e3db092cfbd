//! The router in-process, with spoofed peer addresses (as innernet's
//! server tests do): no sockets, no root.

use super::*;
use crate::control::auth::Signer;
use crate::control::tunnel::Admitted;
use crate::hub::{Ledger, MintRequest};
use crate::keys::PrivateKey;
use crate::keys::PublicKey;
use crate::state::ServerState;
use crate::store::StateDir;
use crate::token::Token;
use crate::wg::fake::FakeWg;
use http_body_util::BodyExt;
use ipnetwork::IpNetwork;
use tower::ServiceExt;

struct Api {
    _tmp: tempfile::TempDir,
    hub: Arc<Hub>,
    fake: FakeWg,
    server: PublicKey,
}

fn api() -> Api {
    api_with(false)
}

/// With `mesh`, the hub is the mesh's rendezvous (no sockets: the map and
/// the claims only).
fn api_with(mesh: bool) -> Api {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeWg::default();
    let state = ServerState::new("10.77.0.0/24".parse().unwrap(), 51820, 1420);
    let server = state.private_key.public_key();
    let rendezvous = mesh.then(|| {
        let (socket, _) = crate::wg::mesh::MeshSocket::new(true, None);
        crate::hub::mesh::HubMesh::new(
            socket,
            state.private_key.clone(),
            51822,
            None,
            state.subnets().all(),
        )
    });
    let hub = Arc::new(
        Hub::new(
            Arc::new(fake.clone()),
            None,
            StateDir::new(tmp.path()),
            "wgt0",
            Ledger::new(state, 2).unwrap(),
        )
        .with_mesh(rendezvous),
    );
    Api {
        _tmp: tmp,
        hub,
        fake,
        server,
    }
}

impl Api {
    async fn token(&self) -> Token {
        let req = MintRequest {
            count: 1,
            ttl: Duration::from_secs(600),
            endpoint_hint: None,
            name: None,
            routes: vec![],
        };
        self.hub
            .mint(&req, SystemTime::now())
            .await
            .unwrap()
            .remove(0)
    }

    async fn call(
        &self,
        from: IpAddr,
        method: &str,
        path: &str,
        body: &[u8],
        signer: Option<&Signer>,
    ) -> (StatusCode, String) {
        let mut req = hyper::Request::builder().method(method).uri(path);
        if let Some(s) = signer {
            req = req.header(
                "authorization",
                s.sign(method, path, body, SystemTime::now()),
            );
        }
        let mut req = req.body(axum::body::Body::from(body.to_vec())).unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::new(from, 40000)));
        let resp = router(self.hub.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// A site admitted and swapped in, with its signer.
    async fn site(&self) -> (IpAddr, PrivateKey, Signer) {
        let (status, text, site) = self.site_with(vec![]).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        site.unwrap()
    }

    /// A site that redeems with `routes`: the answer, and the site
    /// when admitted.
    async fn site_with(
        &self,
        routes: Vec<IpNetwork>,
    ) -> (StatusCode, String, Option<(IpAddr, PrivateKey, Signer)>) {
        let tok = self.token().await;
        let own = PrivateKey::generate();
        let invite = Signer::new(&tok.invite_key, &self.server).unwrap();
        let body = serde_json::to_vec(&RedeemRequest {
            public_key: own.public_key(),
            routes,
            snat_public: false,
            name: None,
            default_name: false,
        })
        .unwrap();
        let (status, text) = self
            .call(tok.assigned, "POST", REDEEM, &body, Some(&invite))
            .await;
        if status != StatusCode::OK {
            return (status, text, None);
        }
        self.fake.handshake(&own.public_key());
        self.hub
            .complete_swaps(std::time::Instant::now())
            .await
            .unwrap();
        let signer = Signer::new(&own, &self.server).unwrap();
        (status, text, Some((tok.assigned, own, signer)))
    }
}

fn register_body(name: &str) -> Vec<u8> {
    serde_json::to_vec(&RegisterRequest {
        public_key: PrivateKey::generate().public_key(),
        name: name.into(),
    })
    .unwrap()
}

#[tokio::test]
async fn redeem_needs_the_invite_key_of_that_address() {
    let a = api();
    let tok = a.token().await;
    let body = serde_json::to_vec(&RedeemRequest {
        public_key: PrivateKey::generate().public_key(),
        routes: vec![],
        snat_public: false,
        name: None,
        default_name: false,
    })
    .unwrap();
    // Unsigned, as any process on the joining host could send it.
    let (status, _) = a.call(tok.assigned, "POST", REDEEM, &body, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Signed with a key of its own.
    let stranger = Signer::new(&PrivateKey::generate(), &a.server).unwrap();
    let (status, _) = a
        .call(tok.assigned, "POST", REDEEM, &body, Some(&stranger))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The right key, from another address.
    let invite = Signer::new(&tok.invite_key, &a.server).unwrap();
    let other: IpAddr = "10.77.0.9".parse().unwrap();
    let (status, _) = a.call(other, "POST", REDEEM, &body, Some(&invite)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, text) = a
        .call(tok.assigned, "POST", REDEEM, &body, Some(&invite))
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let got: Admitted = serde_json::from_str(&text).unwrap();
    assert_eq!(got.address.ip(), tok.assigned);
}

#[tokio::test]
async fn redeeming_with_a_hub_container_key_is_key_in_use() {
    let a = api();
    let mut state = a.hub.snapshot().await;
    crate::hub::ensure_containers(&mut state, &["web".into()], |n| format!("c{n}")).unwrap();
    let container = state.containers[0].private_key.public_key();
    let hub = Arc::new(Hub::new(
        Arc::new(a.fake.clone()),
        None,
        a.hub.store().clone(),
        "wgt0",
        Ledger::new(state, 2).unwrap(),
    ));
    let a = Api { hub, ..a };
    let tok = a.token().await;
    let invite = Signer::new(&tok.invite_key, &a.server).unwrap();
    let body = serde_json::to_vec(&RedeemRequest {
        public_key: container,
        routes: vec![],
        snat_public: false,
        name: None,
        default_name: false,
    })
    .unwrap();
    let (status, text) = a
        .call(tok.assigned, "POST", REDEEM, &body, Some(&invite))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    assert!(text.contains("already in use"), "{text}");
}

#[tokio::test]
async fn register_needs_the_site_key_and_keeps_names_unique() {
    let a = api();
    let (site, _, signer) = a.site().await;
    let (status, _) = a
        .call(site, "POST", REGISTER, &register_body("web"), None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "unsigned, as `nobody` on the site would send it"
    );
    let (status, text) = a
        .call(site, "POST", REGISTER, &register_body("web"), Some(&signer))
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, text) = a
        .call(site, "POST", REGISTER, &register_body("web"), Some(&signer))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    let (status, _) = a
        .call(site, "POST", REGISTER, &register_body("db"), Some(&signer))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, text) = a
        .call(site, "POST", REGISTER, &register_body("x"), Some(&signer))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "over the quota of 2: {text}");
    let (status, _) = a
        .call(site, "POST", REGISTER, b"{not json", Some(&signer))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_replayed_request_is_refused() {
    let a = api();
    let (site, _, signer) = a.site().await;
    let body = register_body("web");
    let header = signer.sign("POST", REGISTER, &body, SystemTime::now());
    let send = || {
        let mut req = hyper::Request::builder()
            .method("POST")
            .uri(REGISTER)
            .header("authorization", header.clone())
            .body(axum::body::Body::from(body.clone()))
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::new(site, 1)));
        router(a.hub.clone()).oneshot(req)
    };
    assert_eq!(send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn leave_is_signed_and_rate_limited() {
    let a = api();
    let (site, _, signer) = a.site().await;
    let (status, _) = a.call(site, "POST", LEAVE, b"{}", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = a.call(site, "POST", LEAVE, b"{}", Some(&signer)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = a.call(site, "POST", LEAVE, b"{}", Some(&signer)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_skewed_clock_gets_the_server_time() {
    let a = api();
    let (site, _, signer) = a.site().await;
    signer.adjust_clock(1_000, SystemTime::now());
    let (status, text) = a.call(site, "POST", LEAVE, b"{}", Some(&signer)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let body: ErrorBody = serde_json::from_str(&text).unwrap();
    assert!(body.server_time.unwrap() > 1_700_000_000, "{text}");
}

#[tokio::test]
async fn ping_answers_known_addresses_only() {
    let a = api();
    let tok = a.token().await;
    let (status, _) = a.call(tok.assigned, "GET", PING, b"", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = a
        .call("10.77.0.99".parse().unwrap(), "GET", PING, b"", None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_site_advertises_its_lan_with_the_redeem_and_other_peers_learn_it() {
    let a = api();
    let lan: IpNetwork = "192.168.50.0/24".parse().unwrap();
    let (status, text, site) = a.site_with(vec![lan]).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (c, _, _) = site.unwrap();
    // Asked for, not approved: it waits, and the answer says so.
    let got: Admitted = serde_json::from_str(&text).unwrap();
    assert_eq!(got.pending, [lan]);
    let peers = crate::wg::WgDevice::peers(&a.fake).await.unwrap();
    assert!(!peers.iter().any(|p| p.allowed_ips.contains(&lan)));
    assert!(a.hub.routes().borrow().is_empty());
    a.hub.approve(&c.to_string(), lan).await.unwrap();
    // The hub routes the LAN to that site.
    let peers = crate::wg::WgDevice::peers(&a.fake).await.unwrap();
    let p = peers.iter().find(|p| p.allowed_ips.contains(&lan)).unwrap();
    assert!(p.allowed_ips.contains(&crate::hub::host_net(c)));
    let (b, _, _) = a.site().await;
    let (status, text) = a.call(b, "GET", ROUTES, b"", None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let got: Vec<Advertised> = serde_json::from_str(&text).unwrap();
    assert_eq!(
        got,
        [Advertised {
            prefix: lan,
            via: c
        }]
    );
    // Not for strangers.
    let (status, _) = a
        .call("10.77.0.99".parse().unwrap(), "GET", ROUTES, b"", None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn an_overlapping_route_is_refused_and_the_token_stays_good() {
    let a = api();
    let (status, _, _) = a.site_with(vec!["192.168.50.0/24".parse().unwrap()]).await;
    assert_eq!(status, StatusCode::OK);
    let tok = a.token().await;
    let invite = Signer::new(&tok.invite_key, &a.server).unwrap();
    let redeem = |routes: &[&str]| {
        serde_json::to_vec(&RedeemRequest {
            public_key: PrivateKey::generate().public_key(),
            routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
            snat_public: false,
            name: None,
            default_name: false,
        })
        .unwrap()
    };
    for (routes, want) in [
        (&["192.168.50.128/25"][..], "overlaps 192.168.50.0/24"),
        (&["10.77.0.0/16"][..], "overlaps the tunnel's subnet"),
    ] {
        let (status, text) = a
            .call(tok.assigned, "POST", REDEEM, &redeem(routes), Some(&invite))
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{text}");
        assert!(text.contains(want), "{text}");
    }
    let (status, text) = a
        .call(
            tok.assigned,
            "POST",
            REDEEM,
            &redeem(&["10.1.0.1/16"]),
            Some(&invite),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("did you mean 10.1.0.0/16"), "{text}");
    // Nothing of that was kept: the same token still admits the site.
    let (status, text) = a
        .call(
            tok.assigned,
            "POST",
            REDEEM,
            &redeem(&["192.168.60.0/24"]),
            Some(&invite),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
}

#[tokio::test]
async fn only_the_site_itself_changes_its_routes() {
    let a = api();
    let (site, _, signer) = a.site().await;
    let body = serde_json::to_vec(&RoutesRequest {
        routes: vec!["192.168.9.0/24".parse().unwrap()],
    })
    .unwrap();
    let (status, _) = a.call(site, "POST", ROUTES, &body, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let tok = a.token().await;
    let invite = Signer::new(&tok.invite_key, &a.server).unwrap();
    let (status, _) = a
        .call(tok.assigned, "POST", ROUTES, &body, Some(&invite))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, text) = a.call(site, "POST", ROUTES, &body, Some(&signer)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let answer: RoutesAnswer = serde_json::from_str(&text).unwrap();
    assert_eq!(answer.pending.len(), 1, "waits for approval");
    assert!(a.hub.routes().borrow().is_empty());
    a.hub
        .approve(&site.to_string(), "192.168.0.0/16".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(a.hub.routes().borrow().len(), 1);
    // An empty list withdraws them.
    let body = serde_json::to_vec(&RoutesRequest { routes: vec![] }).unwrap();
    let (status, _) = a.call(site, "POST", ROUTES, &body, Some(&signer)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(a.hub.routes().borrow().is_empty());
}

/// A stock client admitted with `peer add`, signing with its own key.
async fn road_warrior(a: &Api) -> (IpAddr, Signer) {
    let own = PrivateKey::generate();
    let addr = a
        .hub
        .admit("phone", own.public_key(), SystemTime::now())
        .await
        .unwrap();
    (addr, Signer::new(&own, &a.server).unwrap())
}

#[tokio::test]
async fn a_road_warrior_may_only_ping() {
    let a = api();
    let (_site, _, _) = a.site().await;
    let (rw, signer) = road_warrior(&a).await;
    let routes = serde_json::to_vec(&RoutesRequest {
        routes: vec!["192.168.9.0/24".parse().unwrap()],
    })
    .unwrap();
    for (path, body) in [
        (ROUTES, routes.clone()),
        (REGISTER, register_body("web")),
        (
            RELEASE,
            br#"{"public_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}"#.to_vec(),
        ),
        (LEAVE, b"{}".to_vec()),
        (REDEEM, b"{}".to_vec()),
    ] {
        let (status, text) = a.call(rw, "POST", path, &body, Some(&signer)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {text}");
        assert!(text.contains("road warrior"), "{path}: {text}");
    }
    let (status, _) = a.call(rw, "GET", ROUTES, b"", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "routes are for sites");
    let (status, _) = a.call(rw, "GET", PING, b"", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(a.hub.routes().borrow().is_empty());
    assert_eq!(a.hub.snapshot().await.peers.len(), 2, "nothing registered");
}

#[tokio::test]
async fn a_used_invite_only_repeats_its_own_redeem_and_changes_nothing() {
    let a = api();
    let tok = a.token().await;
    let own = PrivateKey::generate();
    let invite = Signer::new(&tok.invite_key, &a.server).unwrap();
    let redeem = |routes: Vec<IpNetwork>, snat_public: bool| {
        serde_json::to_vec(&RedeemRequest {
            public_key: own.public_key(),
            routes,
            snat_public,
            name: Some("branch".into()),
            default_name: false,
        })
        .unwrap()
    };
    let (status, first) = a
        .call(
            tok.assigned,
            "POST",
            REDEEM,
            &redeem(vec![], false),
            Some(&invite),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let before = a.hub.snapshot().await;
    // The crash-resume path: the same request gets the same answer.
    let (status, again) = a
        .call(
            tok.assigned,
            "POST",
            REDEEM,
            &redeem(vec![], false),
            Some(&invite),
        )
        .await;
    assert_eq!((status, &again), (StatusCode::OK, &first));
    // The same key with other wishes: a reuse, refused, nothing changed.
    for body in [
        redeem(vec!["192.168.77.0/24".parse().unwrap()], false),
        redeem(vec![], true),
    ] {
        let (status, text) = a
            .call(tok.assigned, "POST", REDEEM, &body, Some(&invite))
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{text}");
        assert!(text.contains("already used"), "{text}");
    }
    // Nothing else, whatever it signs.
    for (path, body) in [
        (ROUTES, br#"{"routes":["192.168.77.0/24"]}"#.to_vec()),
        (REGISTER, register_body("web")),
        (LEAVE, b"{}".to_vec()),
    ] {
        let (status, text) = a
            .call(tok.assigned, "POST", path, &body, Some(&invite))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {text}");
    }
    assert_eq!(a.hub.snapshot().await, before);
}

#[tokio::test]
async fn a_container_endpoint_cannot_act_for_its_site() {
    let a = api();
    let (site, _, signer) = a.site().await;
    let ep = PrivateKey::generate();
    let body = serde_json::to_vec(&RegisterRequest {
        public_key: ep.public_key(),
        name: "web".into(),
    })
    .unwrap();
    let (status, text) = a.call(site, "POST", REGISTER, &body, Some(&signer)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let got: Admitted = serde_json::from_str(&text).unwrap();
    let ep_signer = Signer::new(&ep, &a.server).unwrap();
    let (status, text) = a
        .call(
            got.address.ip(),
            "POST",
            REGISTER,
            &register_body("db"),
            Some(&ep_signer),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert!(text.contains("container endpoint"), "{text}");
}

#[tokio::test]
async fn routes_a_token_approved_take_effect_and_others_wait() {
    let a = api();
    let lan: IpNetwork = "192.168.50.0/24".parse().unwrap();
    let other: IpNetwork = "192.168.60.0/24".parse().unwrap();
    let req = MintRequest {
        count: 1,
        ttl: Duration::from_secs(600),
        endpoint_hint: None,
        name: None,
        routes: vec!["192.168.48.0/21".parse().unwrap()],
    };
    let tok = a.hub.mint(&req, SystemTime::now()).await.unwrap().remove(0);
    let invite = Signer::new(&tok.invite_key, &a.server).unwrap();
    let body = serde_json::to_vec(&RedeemRequest {
        public_key: PrivateKey::generate().public_key(),
        routes: vec![lan, other],
        snat_public: false,
        name: None,
        default_name: false,
    })
    .unwrap();
    let (status, text) = a
        .call(tok.assigned, "POST", REDEEM, &body, Some(&invite))
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let got: Admitted = serde_json::from_str(&text).unwrap();
    assert_eq!(got.pending, [other]);
    let shown: Vec<IpNetwork> = a.hub.routes().borrow().iter().map(|r| r.prefix).collect();
    assert_eq!(shown, [lan]);
}

#[test]
fn a_sites_lan_counts_as_the_site() {
    let site: IpAddr = "10.77.0.2".parse().unwrap();
    let routes = [
        Advertised {
            prefix: "192.168.0.0/16".parse().unwrap(),
            via: "10.77.0.9".parse().unwrap(),
        },
        Advertised {
            prefix: "192.168.50.0/24".parse().unwrap(),
            via: site,
        },
    ];
    assert_eq!(owner_of(&routes, "192.168.50.7".parse().unwrap()), site);
    assert_eq!(
        owner_of(&routes, "192.168.51.7".parse().unwrap()),
        "10.77.0.9".parse::<IpAddr>().unwrap()
    );
    let other: IpAddr = "10.77.0.3".parse().unwrap();
    assert_eq!(owner_of(&routes, other), other);
}

#[tokio::test]
async fn sites_claim_candidates_and_get_a_map_of_the_others_tagged_for_them() {
    use crate::control::tunnel::{MESH, MeshClaim};
    use crate::mesh::wire::PairKey;
    let a = api_with(true);
    let (a_addr, _a_key, a_signer) = a.site().await;
    let (b_addr, b_key, b_signer) = a.site().await;
    let claim = MeshClaim {
        local: vec![
            "192.168.1.7:4000".parse().unwrap(),
            // Loopback and the tunnel's own addresses are never candidates.
            "127.0.0.1:4000".parse().unwrap(),
            "10.77.0.9:4000".parse().unwrap(),
        ],
        advertise: Some("198.51.100.7:51820".parse().unwrap()),
        nat: Some(crate::mesh::NatKind::EndpointIndependent),
    };
    let body = serde_json::to_vec(&claim).unwrap();
    let (status, text) = a.call(a_addr, "POST", MESH, &body, Some(&a_signer)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    // Unsigned, or signed by a key that is not that address's: refused.
    let (status, _) = a.call(a_addr, "POST", MESH, &body, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = a.call(a_addr, "POST", MESH, &body, Some(&b_signer)).await;
    assert!(status.is_client_error(), "{status}");
    // Not a claim at all: refused, nothing kept.
    let junk = b"{\"local\": 7}";
    let (status, _) = a.call(b_addr, "POST", MESH, junk, Some(&b_signer)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let body = serde_json::to_vec(&MeshClaim::default()).unwrap();
    let (status, _) = a.call(b_addr, "POST", MESH, &body, Some(&b_signer)).await;
    assert_eq!(status, StatusCode::OK);

    let (status, text) = a.call(b_addr, "GET", MESH, b"", None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let signed: crate::mesh::SignedMap = serde_json::from_str(&text).unwrap();
    let key = PairKey::derive(&b_key, &a.server).unwrap();
    let map = signed.open(&key, &b_key.public_key()).unwrap();
    assert_eq!(map.peers.len(), 1, "only the other site: {map:?}");
    let peer = &map.peers[0];
    assert_eq!(peer.addresses[0], a_addr);
    assert_eq!(
        peer.candidates,
        [
            "198.51.100.7:51820".parse::<SocketAddr>().unwrap(),
            "192.168.1.7:4000".parse().unwrap()
        ]
    );
    assert_eq!(map.probe_port, Some(51822));
    // Another site's key cannot open it.
    let other = PairKey::derive(&PrivateKey::generate(), &a.server).unwrap();
    assert!(signed.open(&other, &b_key.public_key()).is_err());
    // An address that is no site gets no map.
    let tok = a.token().await;
    let (status, _) = a.call(tok.assigned, "GET", MESH, b"", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_hub_without_a_mesh_says_so() {
    use crate::control::tunnel::MESH;
    let a = api();
    let (addr, _, signer) = a.site().await;
    let (status, _) = a.call(addr, "GET", MESH, b"", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = a.call(addr, "POST", MESH, b"{}", Some(&signer)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
