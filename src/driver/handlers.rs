//! What each plugin request does: IPAM hands out the hub's addresses
//! (each one an endpoint allocated through [`Endpoints`]), the network
//! driver checks networks, records endpoints and, on join, makes the
//! endpoint's device and hands its link to Docker.

use super::wire::{
    AddressRequest, EndpointRequest, NetworkRequest, POOL, POOL6, PoolRequest, address_of, decode,
    joined, placeholder, refused, reply,
};
use super::{Driver, Ep, Peer};
use crate::containers::EndpointSpec;
use crate::net::Netlink;
use crate::transport::Relay;
use crate::transport::ws::Link;
use crate::wg::{self, DeviceSpec, Placement, WgDevice};
use axum::extract::{ConnectInfo, State as AxState};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use ipnetwork::IpNetwork;
use serde_json::{Value, json};
use std::sync::Arc;

impl Driver {
    pub fn router(self: &Arc<Self>) -> axum::Router {
        let caps = |v: Value| move || async move { reply(v) };
        axum::Router::new()
            .route(
                "/Plugin.Activate",
                post(caps(
                    json!({ "Implements": ["NetworkDriver", "IpamDriver"] }),
                )),
            )
            .route(
                "/NetworkDriver.GetCapabilities",
                post(caps(
                    json!({ "Scope": "local", "ConnectivityScope": "local" }),
                )),
            )
            .route(
                "/IpamDriver.GetCapabilities",
                post(caps(
                    json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false }),
                )),
            )
            .route(
                "/IpamDriver.GetDefaultAddressSpaces",
                post(caps(json!({
                    "LocalDefaultAddressSpace": "tunnel",
                    "GlobalDefaultAddressSpace": "tunnel"
                }))),
            )
            .route("/IpamDriver.RequestPool", post(request_pool))
            .route("/IpamDriver.ReleasePool", post(caps(json!({}))))
            .route("/IpamDriver.RequestAddress", post(request_address))
            .route("/IpamDriver.ReleaseAddress", post(release_address))
            .route("/NetworkDriver.CreateNetwork", post(create_network))
            .route("/NetworkDriver.DeleteNetwork", post(delete_network))
            .route("/NetworkDriver.CreateEndpoint", post(create_endpoint))
            .route(
                "/NetworkDriver.EndpointOperInfo",
                post(caps(json!({ "Value": {} }))),
            )
            .route("/NetworkDriver.DeleteEndpoint", post(delete_endpoint))
            .route("/NetworkDriver.Join", post(join))
            .route("/NetworkDriver.Leave", post(caps(json!({}))))
            .route("/NetworkDriver.DiscoverNew", post(caps(json!({}))))
            .route("/NetworkDriver.DiscoverDelete", post(caps(json!({}))))
            .route(
                "/NetworkDriver.ProgramExternalConnectivity",
                post(caps(json!({}))),
            )
            .route(
                "/NetworkDriver.RevokeExternalConnectivity",
                post(caps(json!({}))),
            )
            .with_state(self.clone())
    }
}

async fn request_pool(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: PoolRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    if req.v6 {
        let Some(s6) = d.subnet6 else {
            return refused(
                "this tunnel is IPv4 only (its hub runs with --subnet6 none): create the network without --ipv6",
            );
        };
        if !req.pool.is_empty() && req.pool != s6.to_string() {
            return refused(format!(
                "the tunnel's IPv6 subnet is {s6}: create the network without an IPv6 --subnet, or with --subnet {s6}"
            ));
        }
        return reply(json!({ "PoolID": POOL6, "Pool": s6.to_string(), "Data": {} }));
    }
    if !req.pool.is_empty() && req.pool != d.subnet.to_string() {
        return refused(format!(
            "the tunnel's subnet is {}: create the network without --subnet, or with --subnet {}",
            d.subnet, d.subnet
        ));
    }
    reply(json!({ "PoolID": POOL, "Pool": d.subnet.to_string(), "Data": {} }))
}

async fn request_address(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: AddressRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let v6 = req.pool_id == POOL6;
    if req.for_gateway() {
        let gateway = if v6 { d.server6 } else { Some(d.server) };
        return match gateway {
            Some(g) => reply(json!({ "Address": d.net(g), "Data": {} })),
            None => refused("this tunnel is IPv4 only"),
        };
    }
    if !req.address.is_empty() {
        return refused("addresses on a tunnel network come from its hub: drop --ip and --ip6");
    }
    if v6 {
        // The twin of the IPv4 address Docker just took for this endpoint.
        let mut book = d.book.lock().await;
        let twin = book
            .unpaired
            .pop()
            .and_then(|ip| book.pending.get(&ip)?.address6);
        return match twin {
            Some(a6) => reply(json!({ "Address": d.net(a6.ip()), "Data": {} })),
            None => refused("no IPv4 address was handed out for this endpoint first"),
        };
    }
    // The container is not known yet: a placeholder name until it starts.
    let mut tag = [0u8; 4];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut tag);
    match d.endpoints.allocate(&placeholder(tag), true).await {
        Ok(spec) => {
            let address = d.net(spec.address.ip());
            let mut book = d.book.lock().await;
            book.unpaired.push(spec.address.ip());
            book.pending.insert(spec.address.ip(), spec);
            reply(json!({ "Address": address, "Data": {} }))
        }
        Err(e) => refused(e),
    }
}

async fn release_address(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: AddressRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let Some(ip) = address_of(&req.address) else {
        return reply(json!({}));
    };
    // The gateway, and an IPv6 twin: nothing of their own to give back.
    if ip == d.server || ip.is_ipv6() {
        return reply(json!({}));
    }
    let spec = {
        let mut book = d.book.lock().await;
        let from_endpoint = book
            .endpoints
            .iter()
            .find(|(_, e)| e.spec.address.ip() == ip)
            .map(|(id, _)| id.clone());
        book.unpaired.retain(|u| *u != ip);
        match from_endpoint {
            Some(id) => book.endpoints.remove(&id).map(|e| e.spec),
            None => book.pending.remove(&ip),
        }
    };
    if let Some(spec) = spec
        && let Err(e) = d.endpoints.release(&spec).await
    {
        return refused(e);
    }
    reply(json!({}))
}

async fn create_network(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: NetworkRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    if req.pools() != [d.subnet.to_string()] {
        return refused(format!(
            "a tunnel network takes its addresses from the tunnel ({}): create it with --ipam-driver of the same name as -d",
            d.subnet
        ));
    }
    let pools6 = req.pools6();
    if !pools6.is_empty()
        && d.subnet6.map(|s| vec![s.to_string()])
            != Some(pools6.iter().map(|p| (*p).to_owned()).collect())
    {
        return refused("a tunnel network's IPv6 addresses come from the tunnel's IPv6 subnet");
    }
    let internet = req.internet();
    d.book
        .lock()
        .await
        .networks
        .insert(req.network_id, internet);
    reply(json!({}))
}

async fn delete_network(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: NetworkRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    d.book.lock().await.networks.remove(&req.network_id);
    reply(json!({}))
}

async fn create_endpoint(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: EndpointRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let ip = req.address();
    let mut book = d.book.lock().await;
    let Some(spec) = ip.and_then(|ip| book.pending.get(&ip)).cloned() else {
        return refused("this endpoint has no address from the tunnel's IPAM");
    };
    let v6 = req.address6();
    if v6.is_some() && v6 != spec.address6.map(|a| a.ip()) {
        // Two networks of this driver made endpoints at the same moment
        // and Docker's IPv6 requests crossed: this one is refused whole.
        return refused(
            "its IPv6 address is not its IPv4 address's twin (two containers were created at once): start it again",
        );
    }
    book.pending.remove(&spec.address.ip());
    book.unpaired.retain(|u| *u != spec.address.ip());
    let _ = req.network_id;
    book.endpoints.insert(
        req.endpoint_id,
        Ep {
            spec,
            v6: v6.is_some(),
            named: false,
            device: None,
            _link: None,
            pid: None,
            lans: vec![],
        },
    );
    reply(json!({}))
}

async fn delete_endpoint(AxState(d): AxState<Arc<Driver>>, body: axum::body::Bytes) -> Response {
    let req: EndpointRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let device = {
        let mut book = d.book.lock().await;
        match book.endpoints.get_mut(&req.endpoint_id) {
            Some(e) => {
                e._link = None;
                e.device.take()
            }
            None => None,
        }
    };
    if let Some(dev) = device
        && let Err(e) = dev.destroy().await
    {
        tracing::warn!("removing {}: {e}", dev.name());
    }
    reply(json!({}))
}

async fn join(
    AxState(d): AxState<Arc<Driver>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: axum::body::Bytes,
) -> Response {
    let req: EndpointRequest = match decode(&body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let Some(pid) = peer.pid else {
        return refused("cannot tell which process the Docker engine is (no peer credentials)");
    };
    let (spec, v6, internet) = {
        let book = d.book.lock().await;
        let Some(e) = book.endpoints.get(&req.endpoint_id) else {
            return refused(format!("no endpoint {}", req.endpoint_id));
        };
        (
            e.spec.clone(),
            e.v6,
            book.networks.get(&req.network_id).copied().unwrap_or(false),
        )
    };
    let lans = d.routes.borrow().clone();
    let relay = spec.link.as_ref().map(|_| Relay::new("websocket"));
    let device = match d
        .make_device(&device_spec(&spec, &lans, relay.clone()), pid)
        .await
    {
        Ok(dev) => dev,
        Err(why) => return refused(why),
    };
    let link = match (&spec.link, relay) {
        (Some(dialer), Some(r)) => Some(Link::spawn(dialer.clone(), r, None)),
        _ => None,
    };
    {
        let mut book = d.book.lock().await;
        match book.endpoints.get_mut(&req.endpoint_id) {
            Some(e) => {
                e.device = Some(device);
                e._link = link;
                e.lans = e.routable(&lans);
            }
            None => {
                tokio::spawn(async move {
                    let _ = device.destroy().await;
                });
                return refused("the endpoint went while it joined");
            }
        }
    }
    tracing::debug!("endpoint {} joins as {}", spec.iface, spec.address);
    reply(joined(&spec.iface, &lans, internet, v6))
}

/// The device of a joining endpoint: the hub as its one peer, for the
/// tunnel and the LANs behind other sites. It has no address of its own:
/// Docker gives it the one IPAM handed out.
pub(super) fn device_spec(
    spec: &EndpointSpec,
    lans: &[IpNetwork],
    relay: Option<Arc<Relay>>,
) -> DeviceSpec {
    let mut hub = spec.hub.clone();
    hub.allowed_ips.extend(lans.iter().copied());
    DeviceSpec {
        name: spec.iface.clone(),
        private_key: spec.key.clone(),
        listen_port: 0,
        peers: vec![hub],
        addresses: vec![],
        mtu: spec.mtu,
        confine: None,
        relay,
        quarantine: None,
        mesh: None,
        udp: true,
    }
}

impl Driver {
    /// Makes `spec`'s device here, where its UDP socket stays, with its
    /// link in the namespace of the Docker engine (`pid`), where Docker
    /// finds it by name; the refusal to send back otherwise.
    async fn make_device(&self, spec: &DeviceSpec, pid: u32) -> Result<Arc<dyn WgDevice>, String> {
        let engine = Netlink::connect_in_netns(pid)
            .map_err(|e| format!("the Docker engine's namespace: {e}"))?;
        let placement = Placement {
            pid,
            net: Arc::new(engine),
        };
        match wg::create(spec, self.backend, self.host.clone(), Some(placement)).await {
            Ok(dev) => Ok(Arc::from(dev)),
            Err(e) => Err(format!(
                "creating {}: {:#}",
                spec.name,
                anyhow::Error::from(e)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use crate::wg::PeerSpec;

    #[test]
    fn a_joining_device_has_the_hub_for_the_tunnel_and_the_lans_and_no_address() {
        let spec = EndpointSpec {
            container: "docker-00000000".into(),
            iface: "wgd2".into(),
            key: PrivateKey::generate(),
            address: "10.77.0.2/24".parse().unwrap(),
            address6: None,
            hub: PeerSpec {
                public_key: PrivateKey::generate().public_key(),
                endpoint: Some("198.51.100.1:51820".parse().unwrap()),
                allowed_ips: vec!["10.77.0.0/24".parse().unwrap()],
                keepalive: Some(25),
            },
            mtu: 1380,
            probe: "10.77.0.1:51821".parse().unwrap(),
            link: None,
            by_label: false,
        };
        let lan: IpNetwork = "192.168.7.0/24".parse().unwrap();
        let d = device_spec(&spec, &[lan], None);
        assert_eq!((d.name.as_str(), d.listen_port, d.mtu), ("wgd2", 0, 1380));
        assert!(d.addresses.is_empty(), "Docker sets the address");
        assert_eq!(d.private_key.public_key(), spec.key.public_key());
        let [hub] = d.peers.as_slice() else {
            panic!("{:?}", d.peers)
        };
        assert_eq!(hub.public_key, spec.hub.public_key);
        assert_eq!(hub.allowed_ips, ["10.77.0.0/24".parse().unwrap(), lan]);
        assert_eq!((hub.endpoint, hub.keepalive), (spec.hub.endpoint, Some(25)));
        assert!(d.relay.is_none());
        // The endpoint's own spec is untouched.
        assert_eq!(spec.hub.allowed_ips.len(), 1);
    }
}
