//! Property tests: no input, however forged, makes the parsers of tokens,
//! state files or control requests panic. Stable Rust, part of `cargo test`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tunnel::control::auth::Proof;
use tunnel::control::local::{RevokeRequest, TokenRequest};
use tunnel::control::tunnel::{RedeemRequest, RegisterRequest};
use tunnel::state::Endpoint;
use tunnel::store::StateDir;
use tunnel::token::Token;

/// A token around `payload` with a valid CRC: what a forger can make.
fn forged(payload: &[u8]) -> String {
    let mut b = payload.to_vec();
    b.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    format!("tun1_{}", URL_SAFE_NO_PAD.encode(b))
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// Everything a decoded token is used for before the host is touched.
fn use_token(t: &Token) {
    let _ = t.check_expiry(now());
    let _ = t.expires_at();
    let _ = t.assigned_network();
    let _ = format!("{t:?}");
    let _ = t.encode();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_text_is_decoded_or_refused(text in ".{0,300}") {
        if let Ok(t) = Token::decode(&text) {
            use_token(&t);
        }
    }

    #[test]
    fn valid_crc_forgeries_are_decoded_or_refused(
        flags in 0u8..16,
        body in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut payload = vec![flags];
        payload.extend_from_slice(&body);
        if let Ok(t) = Token::decode(&forged(&payload)) {
            use_token(&t);
        }
    }

    #[test]
    fn well_formed_forgeries_with_any_field_values_are_safe(
        v6 in any::<bool>(),
        port in any::<u16>(),
        prefix in any::<u8>(),
        addrs in proptest::collection::vec(any::<u8>(), 48),
        expires in any::<u64>(),
        hint in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
    ) {
        let alen = if v6 { 16 } else { 4 };
        let mut p = vec![u8::from(v6) | if hint.is_some() { 2 } else { 0 }];
        p.extend_from_slice(&[7u8; 64]);
        p.extend_from_slice(&port.to_be_bytes());
        p.push(prefix);
        p.extend_from_slice(&addrs[..3 * alen]);
        p.extend_from_slice(&expires.to_be_bytes());
        if let Some(h) = &hint {
            p.push(h.len() as u8);
            p.extend_from_slice(h);
        }
        if let Ok(t) = Token::decode(&forged(&p)) {
            use_token(&t);
        }
    }

    #[test]
    fn any_bytes_in_a_state_file_are_loaded_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("wg0.json"), &bytes).unwrap();
        if let Ok(Some(e)) = StateDir::new(tmp.path()).load("wg0") {
            use_state(&e);
        }
    }

    #[test]
    fn any_field_values_in_a_state_file_are_loaded_or_refused(
        subnet in "(10\\.77\\.0\\.0|fd00::|10\\.77\\.0\\.5|0\\.0\\.0\\.0)/[0-9]{1,3}",
        addrs in proptest::collection::vec("(10\\.77\\.0\\.[0-9]{1,3}|fd00::[0-9a-f]{1,4}|10\\.78\\.0\\.1)", 4),
        mtu in any::<u32>(),
        port in any::<u16>(),
        via in any::<bool>(),
    ) {
        let key = tunnel::keys::PrivateKey::generate();
        let text = format!(
            r#"{{"version":1,"role":"server","private_key":"{}","port":{port},"mtu":{mtu},"subnet":"{subnet}",
               "peers":[{{"public_key":"{}","address":"{}","joined_at":0{}}},
                        {{"public_key":"{}","address":"{}","joined_at":0}}],
               "invites":[{{"public_key":"{}","address":"{}","expires":1}}],
               "containers":[{{"container":"web","iface":"c0","private_key":"{}","address":"{}"}}]}}"#,
            key.to_base64().as_str(),
            key.public_key(), addrs[0], if via { format!(r#","via":"{}""#, addrs[1]) } else { String::new() },
            key.public_key(), addrs[1],
            key.public_key(), addrs[2],
            key.to_base64().as_str(), addrs[3],
        );
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("wg0.json"), text).unwrap();
        if let Ok(Some(e)) = StateDir::new(tmp.path()).load("wg0") {
            use_state(&e);
        }
    }

    #[test]
    fn any_authorization_header_is_parsed_or_refused(h in ".{0,200}") {
        let _ = Proof::parse(&h);
        let _ = Proof::parse(&format!("Tunnel {h}"));
    }

    #[test]
    fn any_request_body_is_parsed_or_refused(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = serde_json::from_slice::<RedeemRequest>(&body);
        let _ = serde_json::from_slice::<RegisterRequest>(&body);
        let _ = serde_json::from_slice::<TokenRequest>(&body);
        let _ = serde_json::from_slice::<RevokeRequest>(&body);
    }
}

/// Everything that reads a loaded state.
fn use_state(e: &Endpoint) {
    let statuses = tunnel::status::from_state("wg0", e);
    let _ = tunnel::status::render(&statuses);
    let _ = tunnel::wg::quick::render("wg0", e, None);
    let _ = tunnel::wg::quick::render("wg0", e, Some("web"));
    if let Endpoint::Server(s) = e
        && let Ok(mut l) = tunnel::hub::Ledger::new(s.clone(), 4)
    {
        let _ = l.desired();
        let _ = l.revoke("web");
        let _ = l.prune(now());
    }
}

/// The control routers themselves, with arbitrary bodies and headers.
#[test]
fn the_routers_answer_any_request_without_panicking() {
    use axum::body::Body;
    use axum::extract::ConnectInfo;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use tower::ServiceExt;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let state = tunnel::state::ServerState::new("10.77.0.0/24".parse().unwrap(), 51820, 1420);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
    let strategy = (
        prop_oneof![
            Just("/v1/redeem"),
            Just("/v1/endpoints"),
            Just("/v1/leave"),
            Just("/v1/ping")
        ],
        ".{0,120}",
        proptest::collection::vec(any::<u8>(), 0..120),
        any::<[u8; 4]>(),
    );
    // A device nobody reads: the router never gets that far with junk.
    let hub = Arc::new(tunnel::hub::Hub::new(
        Arc::new(NullDevice),
        None,
        StateDir::new(tmp.path()),
        "wg0",
        tunnel::hub::Ledger::new(state, 4).unwrap(),
    ));
    let router = tunnel::hub::http::router(hub);
    runner
        .run(&strategy, |(path, auth, body, ip)| {
            let mut req = axum::http::Request::builder()
                .method("POST")
                .uri(path)
                .body(Body::from(body))
                .unwrap();
            if let Ok(v) = axum::http::HeaderValue::from_str(&auth) {
                req.headers_mut().insert("authorization", v);
            }
            req.extensions_mut()
                .insert(ConnectInfo(SocketAddr::from((ip, 40000))));
            let status = rt.block_on(router.clone().oneshot(req)).unwrap().status();
            prop_assert!(status.is_client_error() || status.is_success(), "{status}");
            Ok(())
        })
        .unwrap();
}

/// A WireGuard device with no peers that accepts nothing.
struct NullDevice;

#[async_trait::async_trait]
impl tunnel::wg::WgDevice for NullDevice {
    fn name(&self) -> &str {
        "null"
    }
    fn backend(&self) -> tunnel::wg::BackendKind {
        tunnel::wg::BackendKind::Userspace
    }
    async fn set_private_key(
        &self,
        _: &tunnel::keys::PrivateKey,
    ) -> Result<(), tunnel::wg::WgError> {
        Ok(())
    }
    async fn upsert_peer(&self, _: &tunnel::wg::PeerSpec) -> Result<(), tunnel::wg::WgError> {
        Ok(())
    }
    async fn set_allowed_ips(
        &self,
        _: &tunnel::keys::PublicKey,
        _: &[ipnetwork::IpNetwork],
    ) -> Result<(), tunnel::wg::WgError> {
        Ok(())
    }
    async fn remove_peer(&self, _: &tunnel::keys::PublicKey) -> Result<(), tunnel::wg::WgError> {
        Ok(())
    }
    async fn set_endpoint(
        &self,
        _: &tunnel::keys::PublicKey,
        _: std::net::SocketAddr,
    ) -> Result<(), tunnel::wg::WgError> {
        Ok(())
    }
    async fn peers(&self) -> Result<Vec<tunnel::wg::PeerStatus>, tunnel::wg::WgError> {
        Ok(vec![])
    }
    async fn listen_port(&self) -> Result<u16, tunnel::wg::WgError> {
        Ok(0)
    }
    async fn destroy(&self) -> Result<(), tunnel::wg::WgError> {
        Ok(())
    }
}

/// A ledger with one admitted site at 10.77.0.2 named "a", and the hub
/// host's own network 192.168.1.0/24.
fn ledger_with_a_site() -> tunnel::hub::Ledger {
    use tunnel::hub::{Ledger, MintRequest};
    let state = tunnel::state::ServerState::new("10.77.0.0/24".parse().unwrap(), 51820, 1420);
    let mut l = Ledger::new(state, 4).unwrap();
    l.set_host_networks(&["192.168.1.5/24".parse().unwrap()]);
    let req = MintRequest {
        count: 1,
        ttl: Duration::from_secs(60),
        endpoint_hint: None,
        name: Some("a".into()),
        routes: vec![],
    };
    let tok = l.mint(&req, now()).unwrap().remove(0);
    let key = tunnel::keys::PrivateKey::generate().public_key();
    l.redeem(tok.assigned, key, now(), std::time::Instant::now())
        .unwrap();
    l.name_site(tok.assigned, None, false).unwrap();
    l.complete_swaps(|_| true, std::time::Instant::now());
    l
}

fn any_prefix() -> impl Strategy<Value = ipnetwork::IpNetwork> {
    // Half from prefixes near what matters, so that asking and approving
    // meet often; half anything.
    let near = [
        "192.168.1.0/25",
        "192.168.0.0/16",
        "192.168.50.0/24",
        "192.168.50.0/23",
        "10.77.0.0/25",
        "10.0.0.0/8",
        "0.0.0.0/0",
        "127.0.0.0/8",
        "fd00::/64",
    ]
    .map(|n| n.parse::<ipnetwork::IpNetwork>().unwrap());
    prop_oneof![
        proptest::sample::select(near.to_vec()),
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| {
            let n = ipnetwork::IpNetwork::new(std::net::Ipv4Addr::from(a).into(), p).unwrap();
            ipnetwork::IpNetwork::new(n.network(), p).unwrap()
        }),
        (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, p)| {
            let n = ipnetwork::IpNetwork::new(std::net::Ipv6Addr::from(a).into(), p).unwrap();
            ipnetwork::IpNetwork::new(n.network(), p).unwrap()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Whatever a site asks for and an operator approves or rejects, what
    /// takes effect is approved, a network address, not a default route,
    /// and clear of the tunnel and of the hub host's networks.
    #[test]
    fn any_advertised_and_approved_prefixes_keep_the_invariants(
        asked in proptest::collection::vec(any_prefix(), 0..6),
        decisions in proptest::collection::vec((any::<bool>(), any_prefix()), 0..6),
        target in prop_oneof![Just("a".to_owned()), Just("10.77.0.2".to_owned()), ".{0,12}"],
    ) {
        let mut l = ledger_with_a_site();
        let site: std::net::IpAddr = "10.77.0.2".parse().unwrap();
        // One at a time, keeping what the hub took: a list with one bad
        // prefix is refused whole.
        let mut kept = vec![];
        for p in asked {
            let mut next = kept.clone();
            next.push(p);
            if l.advertise(site, next.clone()).is_ok() {
                kept = next;
            }
        }
        for (approve, prefix) in decisions {
            let _ = if approve { l.approve(&target, prefix) } else { l.reject(&target, prefix) };
        }
        let host: ipnetwork::IpNetwork = "192.168.1.0/24".parse().unwrap();
        let tunnel: ipnetwork::IpNetwork = "10.77.0.0/24".parse().unwrap();
        let overlaps = |a: &ipnetwork::IpNetwork, b: &ipnetwork::IpNetwork| {
            a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
        };
        let peer = l.site(site).unwrap().clone();
        for r in l.site_routes() {
            prop_assert!(tunnel::state::covered(peer.approved(), &r), "{r} not approved");
            prop_assert!(r.prefix() > 0);
            prop_assert_eq!(r.ip(), r.network());
            prop_assert!(!overlaps(&r, &host) && !overlaps(&r, &tunnel), "{}", r);
        }
        let pending = l.pending_routes(site);
        prop_assert_eq!(pending.len() + l.site_routes().len(), peer.routes.len());
    }

    #[test]
    fn any_route_decision_body_is_parsed_or_refused(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = serde_json::from_slice::<tunnel::control::local::RouteDecision>(&body);
        let _ = serde_json::from_slice::<tunnel::control::tunnel::RoutesRequest>(&body);
    }
}
