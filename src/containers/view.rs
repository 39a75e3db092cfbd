//! What status shows of the container endpoints: a snapshot the
//! follower publishes on every change, read by the local API, with live
//! handshake and traffic figures from the devices at each read.

use super::EndpointSpec;
use crate::docker::Attached;
use crate::status::{EndpointStatus, PeerReport, Role, State};
use crate::wg::WgDevice;
use ipnetwork::IpNetwork;
use std::sync::{Arc, Mutex};

/// The container endpoints as status shows them, with their devices while
/// attached, shared between the follower and the local API.
#[derive(Clone, Default)]
pub struct ContainerView(Arc<Mutex<Vec<ViewEntry>>>);

type ViewEntry = (EndpointStatus, Option<Arc<dyn WgDevice>>);

impl ContainerView {
    /// The endpoints, with live handshake and traffic figures where attached.
    pub async fn report(&self) -> Vec<EndpointStatus> {
        let entries = self.0.lock().expect("status lock").clone();
        let mut out = Vec::with_capacity(entries.len());
        for (mut e, device) in entries {
            if let Some(d) = device
                && let Ok(peers) = d.peers().await
            {
                for (report, live) in e.peers.iter_mut().zip(peers.iter()) {
                    // Live figures replace the configured ones; what only
                    // the configuration knows (the transport, the LANs
                    // through the hub) stays.
                    let transport = report.transport.take();
                    let routes = std::mem::take(&mut report.routes);
                    *report = PeerReport::from_live(live, report.name.clone(), report.address);
                    report.transport = transport;
                    report.routes = routes;
                    if report
                        .endpoint
                        .as_ref()
                        .is_some_and(crate::transport::is_virtual)
                    {
                        report.endpoint = None;
                    }
                }
            }
            out.push(e);
        }
        out
    }
}

impl ContainerView {
    /// Replaces what status shows: each endpoint as configured, with its
    /// container and device while attached, and `routes` (the LANs behind
    /// other sites) through the hub.
    pub(super) fn publish<'a>(
        &self,
        endpoints: impl Iterator<Item = (&'a EndpointSpec, Option<&'a (Attached, Arc<dyn WgDevice>)>)>,
        routes: &[IpNetwork],
    ) {
        let all = endpoints
            .map(|(spec, attached)| {
                (
                    configured(spec, attached, routes),
                    attached.map(|(_, d)| d.clone()),
                )
            })
            .collect();
        *self.0.lock().expect("status lock") = all;
    }
}

/// One endpoint as status shows it before any live figures: up while
/// attached, with the hub as its one peer.
fn configured(
    spec: &EndpointSpec,
    attached: Option<&(Attached, Arc<dyn WgDevice>)>,
    routes: &[IpNetwork],
) -> EndpointStatus {
    EndpointStatus {
        iface: spec.iface.clone(),
        name: None,
        role: Role::Container,
        state: if attached.is_some() {
            State::Up
        } else {
            State::Down
        },
        backend: attached.map(|(_, d)| d.backend()),
        address: spec.address,
        address6: spec.address6,
        listen_port: None,
        listening: vec![],
        public_key: spec.key.public_key(),
        container: Some(spec.container.clone()),
        container_id: attached.map(|(a, _)| a.id.clone()),
        server: None,
        routes: vec![],
        mesh: None,
        peers: vec![PeerReport {
            public_key: spec.hub.public_key,
            name: Some("server".into()),
            address: Some(spec.probe.ip()),
            endpoint: spec.hub.endpoint,
            last_handshake_secs: None,
            rx_bytes: 0,
            tx_bytes: 0,
            keepalive: spec.hub.keepalive,
            transport: Some(
                if spec.link.is_some() {
                    "websocket"
                } else {
                    "udp"
                }
                .into(),
            ),
            routes: routes.to_vec(),
            pending_routes: vec![],
            path: None,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use crate::transport::ws::Dialer;
    use crate::transport::{WsOffer, WsTarget, virtual_addr};
    use crate::wg::fake::FakeWg;
    use crate::wg::{PeerSpec, PeerStatus};
    use std::time::Duration;

    fn spec() -> EndpointSpec {
        EndpointSpec {
            container: "web".into(),
            iface: "wgtc0".into(),
            key: PrivateKey::generate(),
            address: "10.77.0.5/24".parse().unwrap(),
            address6: Some("fd00:77::5/64".parse().unwrap()),
            hub: PeerSpec {
                public_key: PrivateKey::generate().public_key(),
                endpoint: Some("198.51.100.1:51820".parse().unwrap()),
                allowed_ips: vec!["10.77.0.0/24".parse().unwrap()],
                keepalive: Some(25),
            },
            mtu: 1420,
            probe: "10.77.0.1:51821".parse().unwrap(),
            link: None,
            by_label: false,
        }
    }

    #[test]
    fn a_detached_endpoint_shows_its_configuration_and_the_hub_as_its_one_peer() {
        let s = spec();
        let lan: IpNetwork = "192.168.7.0/24".parse().unwrap();
        let e = configured(&s, None, &[lan]);
        assert_eq!((e.role, e.state), (Role::Container, State::Down));
        assert_eq!((e.backend, e.container_id), (None, None));
        assert_eq!(e.container.as_deref(), Some("web"));
        assert_eq!(e.address6, s.address6);
        assert_eq!(e.public_key, s.key.public_key());
        let [hub] = e.peers.as_slice() else {
            panic!("{:?}", e.peers)
        };
        assert_eq!(hub.name.as_deref(), Some("server"));
        assert_eq!(hub.address, Some("10.77.0.1".parse().unwrap()));
        assert_eq!(hub.endpoint, s.hub.endpoint);
        assert_eq!(hub.keepalive, Some(25));
        assert_eq!(hub.transport.as_deref(), Some("udp"));
        assert_eq!(hub.routes, [lan]);
    }

    #[test]
    fn an_endpoint_with_a_websocket_link_says_so() {
        let mut s = spec();
        let offer = WsOffer {
            target: WsTarget::Plain { port: 80 },
            path: "/t/x".into(),
        };
        s.link = Some(Arc::new(Dialer::new(&offer, "hub", None).unwrap()));
        let e = configured(&s, None, &[]);
        assert_eq!(e.peers[0].transport.as_deref(), Some("websocket"));
    }

    #[tokio::test]
    async fn an_attached_endpoint_reports_live_figures_but_never_a_virtual_address() {
        let s = spec();
        let dev = FakeWg::default();
        dev.state.lock().unwrap().peers.push(PeerStatus {
            public_key: s.hub.public_key,
            endpoint: Some(virtual_addr(1)),
            allowed_ips: s.hub.allowed_ips.clone(),
            last_handshake: Some(Duration::from_secs(7)),
            rx_bytes: 1000,
            tx_bytes: 2000,
            keepalive: Some(25),
        });
        let attached: (Attached, Arc<dyn WgDevice>) = (
            Attached {
                id: "0123456789abcdef".into(),
                pid: 10,
            },
            Arc::new(dev),
        );
        let view = ContainerView::default();
        view.publish(std::iter::once((&s, Some(&attached))), &[]);
        let [e] = view.report().await.try_into().unwrap();
        assert_eq!(e.state, State::Up);
        assert_eq!(e.container_id.as_deref(), Some("0123456789abcdef"));
        let hub = &e.peers[0];
        assert_eq!(hub.last_handshake_secs, Some(7));
        assert_eq!((hub.rx_bytes, hub.tx_bytes), (1000, 2000));
        // The link's stand-in address means nothing to a reader.
        assert_eq!(hub.endpoint, None);
        assert_eq!(hub.name.as_deref(), Some("server"));
        assert_eq!(hub.transport.as_deref(), Some("udp"));
    }

    #[tokio::test]
    async fn an_attached_endpoint_keeps_the_lans_it_reaches_through_the_hub() {
        let s = spec();
        let dev = FakeWg::default();
        dev.state.lock().unwrap().peers.push(PeerStatus {
            public_key: s.hub.public_key,
            endpoint: s.hub.endpoint,
            allowed_ips: s.hub.allowed_ips.clone(),
            last_handshake: Some(Duration::from_secs(3)),
            rx_bytes: 1,
            tx_bytes: 2,
            keepalive: Some(25),
        });
        let attached: (Attached, Arc<dyn WgDevice>) = (
            Attached {
                id: "0123456789abcdef".into(),
                pid: 10,
            },
            Arc::new(dev),
        );
        let lan: IpNetwork = "192.168.50.0/24".parse().unwrap();
        let view = ContainerView::default();
        view.publish(std::iter::once((&s, Some(&attached))), &[lan]);
        let [e] = view.report().await.try_into().unwrap();
        assert_eq!(e.peers[0].routes, [lan]);
        assert_eq!(e.peers[0].last_handshake_secs, Some(3));
    }
}
