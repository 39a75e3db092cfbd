//! What the driver takes back when it starts. Docker keeps a running
//! container's endpoint across our restart and never asks again, and a
//! container whose start failed because the plugin socket was missing
//! stays created: so at start the driver compares Docker's networks of
//! its name with the endpoints an earlier run left, gives each running
//! container its endpoint back in place, gives back the rest, and starts
//! the containers whose start failed on its socket.

use super::handlers::device_spec;
use super::wire::internet_option;
use super::{Driver, Ep};
use crate::containers::EndpointSpec;
use crate::docker::{ContainerRuntime, DriverNetwork};
use crate::net::{NetOps, Netlink};
use crate::transport::Relay;
use crate::transport::ws::Link;
use crate::wg::{self, Placement, WgDevice};
use ipnetwork::IpNetwork;
use std::net::IpAddr;
use std::sync::Arc;

/// A running container whose endpoint an earlier run made.
#[derive(Debug)]
pub(super) struct Adopt {
    pub endpoint_id: String,
    pub container: String,
    pub pid: u32,
    pub spec: EndpointSpec,
    /// Docker gave it the IPv6 twin too.
    pub v6: bool,
}

/// What to do at start, decided from Docker's view and our leftovers.
#[derive(Debug, Default)]
pub(super) struct Resume {
    /// Network id -> whether its containers keep a way to the internet.
    pub networks: Vec<(String, bool)>,
    pub adopt: Vec<Adopt>,
    /// Leftovers whose containers are gone or stopped: given back.
    pub release: Vec<EndpointSpec>,
    /// Containers (id, name) whose last start failed on our socket.
    pub start: Vec<(String, String)>,
    /// Running containers (name, address) with an endpoint no leftover
    /// matches (the state that had it was lost).
    pub strangers: Vec<(String, IpAddr)>,
}

/// Decides the resume: a running member is matched to a leftover by the
/// address Docker holds for it (the hub's ledger gave that address to
/// that endpoint and to nothing else); `socket` is the plugin socket, as
/// Docker names it in a start that failed for want of it.
pub(super) fn plan(nets: &[DriverNetwork], leftovers: Vec<EndpointSpec>, socket: &str) -> Resume {
    let mut r = Resume::default();
    let mut left = leftovers;
    for n in nets {
        r.networks.push((n.id.clone(), internet_option(&n.options)));
        for m in &n.members {
            match (&m.endpoint, m.container.pid) {
                (Some((endpoint_id, ip)), Some(pid)) => {
                    match left.iter().position(|s| s.address.ip() == *ip) {
                        Some(i) => {
                            let spec = left.swap_remove(i);
                            let v6 =
                                m.address6.is_some() && m.address6 == spec.address6.map(|a| a.ip());
                            r.adopt.push(Adopt {
                                endpoint_id: endpoint_id.clone(),
                                container: m.container.name.clone(),
                                pid,
                                spec,
                                v6,
                            })
                        }
                        None => r.strangers.push((m.container.name.clone(), *ip)),
                    }
                }
                _ => {
                    let failed_on_us = m.error.as_deref().is_some_and(|e| e.contains(socket));
                    if failed_on_us && !r.start.iter().any(|(id, _)| *id == m.container.id) {
                        r.start
                            .push((m.container.id.clone(), m.container.name.clone()));
                    }
                }
            }
        }
    }
    r.release = left;
    r
}

impl Driver {
    /// Takes back what an earlier run left (see the module's overview).
    /// Errors are logged: the driver serves new containers regardless.
    pub(super) async fn resume(&self, runtime: &dyn ContainerRuntime, plugin: &str) {
        let leftovers = self.endpoints.leftovers().await;
        let nets = match runtime.driver_networks(plugin).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("reading Docker's networks of driver {plugin}: {e}");
                vec![]
            }
        };
        let socket = super::socket_path(plugin).display().to_string();
        let r = plan(&nets, leftovers, &socket);
        {
            let mut book = self.book.lock().await;
            for (id, internet) in &r.networks {
                book.networks.insert(id.clone(), *internet);
            }
        }
        let lans = self.routes.borrow().clone();
        for a in r.adopt {
            match self.adopt(&a, &lans).await {
                Ok((device, link)) => {
                    tracing::info!(
                        "container {} has its endpoint {} back",
                        a.container,
                        a.spec.address.ip()
                    );
                    self.book.lock().await.endpoints.insert(
                        a.endpoint_id,
                        Ep {
                            spec: a.spec,
                            v6: a.v6,
                            // Named again from Docker, as a new one is.
                            named: false,
                            device: Some(device),
                            _link: link,
                            pid: Some(a.pid),
                            lans: lans
                                .iter()
                                .filter(|l| l.is_ipv4() || a.v6)
                                .copied()
                                .collect(),
                        },
                    );
                }
                Err(why) => {
                    tracing::warn!(
                        "container {}: its endpoint could not be restored ({why}); docker restart it",
                        a.container
                    );
                    if let Err(e) = self.endpoints.release(&a.spec).await {
                        tracing::warn!("{e}");
                    }
                }
            }
        }
        for spec in r.release {
            tracing::info!(
                "giving back {}: its container no longer runs",
                spec.address.ip()
            );
            if let Err(e) = self.endpoints.release(&spec).await {
                tracing::warn!("{e}");
            }
        }
        for (name, ip) in r.strangers {
            tracing::warn!(
                "container {name} holds {ip} on a network of driver {plugin}, which no endpoint of this tunnel has; docker restart it"
            );
        }
        for (id, name) in r.start {
            tracing::info!("starting container {name}: its start failed while the driver was away");
            if let Err(e) = runtime.start(&id).await {
                tracing::warn!("starting container {name}: {e}");
            }
        }
    }

    /// Makes `a`'s device again and puts it where Docker had it: in the
    /// container, named `tun<n>`, with its address and the LANs' routes.
    async fn adopt(
        &self,
        a: &Adopt,
        lans: &[IpNetwork],
    ) -> Result<(Arc<dyn WgDevice>, Option<Link>), String> {
        let relay = a.spec.link.as_ref().map(|_| Relay::new("websocket"));
        let spec = device_spec(&a.spec, lans, relay.clone());
        let net: Arc<dyn NetOps> =
            Arc::new(Netlink::connect_in_netns(a.pid).map_err(|e| format!("its namespace: {e}"))?);
        let placement = Placement {
            pid: a.pid,
            net: net.clone(),
        };
        let device: Arc<dyn WgDevice> =
            match wg::create(&spec, self.backend, self.host.clone(), Some(placement)).await {
                Ok(d) => Arc::from(d),
                Err(e) => return Err(format!("{:#}", anyhow::Error::from(e))),
            };
        let mut addresses = vec![
            IpNetwork::new(a.spec.address.ip(), self.subnet.prefix()).map_err(|e| e.to_string())?,
        ];
        if let (true, Some(a6), Some(s6)) = (a.v6, a.spec.address6, self.subnet6) {
            addresses.push(IpNetwork::new(a6.ip(), s6.prefix()).map_err(|e| e.to_string())?);
        }
        let placed = async {
            let mut n = 0;
            while net
                .link_exists(&format!("{}{n}", super::wire::DST_PREFIX))
                .await?
            {
                n += 1;
            }
            let name = format!("{}{n}", super::wire::DST_PREFIX);
            net.rename_link(&spec.name, &name).await?;
            net.configure(&name, &addresses, spec.mtu).await?;
            for lan in lans.iter().filter(|l| l.is_ipv4() || a.v6) {
                net.add_route(*lan, &name, None).await?;
            }
            Ok::<_, crate::net::NetError>(())
        };
        if let Err(e) = placed.await {
            let _ = device.destroy().await;
            return Err(e.to_string());
        }
        let link = match (&a.spec.link, relay) {
            (Some(dialer), Some(r)) => Some(Link::spawn(dialer.clone(), r, None)),
            _ => None,
        };
        Ok((device, link))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::{ContainerInfo, Member};
    use crate::keys::PrivateKey;
    use crate::wg::PeerSpec;

    const SOCKET: &str = "/run/docker/plugins/tnl.sock";

    fn spec(ip: &str) -> EndpointSpec {
        EndpointSpec {
            container: "docker-00000000".into(),
            iface: format!("wgd{}", ip.rsplit('.').next().unwrap()),
            key: PrivateKey::generate(),
            address: format!("{ip}/24").parse().unwrap(),
            address6: None,
            hub: PeerSpec {
                public_key: PrivateKey::generate().public_key(),
                endpoint: None,
                allowed_ips: vec![],
                keepalive: None,
            },
            mtu: 1420,
            probe: "10.77.0.1:51821".parse().unwrap(),
            link: None,
            by_label: false,
        }
    }

    fn member(name: &str, pid: Option<u32>, ip: Option<&str>, error: Option<&str>) -> Member {
        Member {
            container: ContainerInfo {
                id: format!("{name}-id"),
                name: name.into(),
                pid,
                endpoint_ids: vec![],
            },
            endpoint: ip.map(|ip| (format!("{name}-ep"), ip.parse().unwrap())),
            address6: None,
            error: error.map(str::to_owned),
        }
    }

    fn network(id: &str, options: &[(&str, &str)], members: Vec<Member>) -> DriverNetwork {
        DriverNetwork {
            id: id.into(),
            name: format!("{id}-name"),
            options: options
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            members,
        }
    }

    #[test]
    fn running_containers_get_their_leftovers_back_by_address_and_the_rest_is_given_back() {
        let nets = [
            network(
                "n1",
                &[("tunnel.internet", "true")],
                vec![
                    member("web", Some(10), Some("10.77.0.3"), None),
                    member("lost", Some(11), Some("10.77.0.9"), None),
                ],
            ),
            network("n2", &[], vec![]),
        ];
        let r = plan(
            &nets,
            vec![spec("10.77.0.4"), spec("10.77.0.3"), spec("10.77.0.5")],
            SOCKET,
        );
        assert_eq!(
            r.networks,
            [("n1".to_owned(), true), ("n2".to_owned(), false)]
        );
        let [a] = r.adopt.as_slice() else {
            panic!("{:?}", r.adopt)
        };
        assert_eq!(
            (a.endpoint_id.as_str(), a.container.as_str(), a.pid),
            ("web-ep", "web", 10)
        );
        assert_eq!(a.spec.address.ip().to_string(), "10.77.0.3");
        let mut released: Vec<String> = r
            .release
            .iter()
            .map(|s| s.address.ip().to_string())
            .collect();
        released.sort();
        assert_eq!(released, ["10.77.0.4", "10.77.0.5"]);
        assert_eq!(
            r.strangers,
            [("lost".to_owned(), "10.77.0.9".parse().unwrap())]
        );
        assert!(r.start.is_empty());
    }

    #[test]
    fn only_containers_whose_start_failed_on_our_socket_are_started_and_once() {
        let ours = format!(
            "Post \"http://%2Frun%2Fdocker%2Fplugins%2Ftnl.sock/IpamDriver.RequestAddress\": dial unix {SOCKET}: connect: no such file or directory"
        );
        let nets = [
            network(
                "n1",
                &[],
                vec![
                    member("failed", None, None, Some(&ours)),
                    member("stopped", None, None, None),
                    member("other", None, None, Some("OCI runtime create failed")),
                ],
            ),
            network("n2", &[], vec![member("failed", None, None, Some(&ours))]),
        ];
        let r = plan(&nets, vec![spec("10.77.0.3")], SOCKET);
        assert_eq!(r.start, [("failed-id".to_owned(), "failed".to_owned())]);
        assert!(r.adopt.is_empty());
        assert_eq!(r.release.len(), 1, "a stopped container keeps nothing");
    }
}
