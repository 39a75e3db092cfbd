//! Attach one WireGuard endpoint to a running container and keep it there,
//! following restarts, until Ctrl-C: the library's container API on its own.
//!
//! The endpoint gets a fresh key and the given address; its one peer is
//! the given server. Without a matching peer on the server it only shows
//! the mechanics: an interface made here (its UDP socket stays in this
//! namespace) and moved into the container.
//!
//! ```text
//! sudo cargo run --example attach_container -- web 10.77.0.9/24 <SERVER_PUBKEY> 192.0.2.1:51820
//! docker exec web ip addr show wgexample0
//! ```

use std::sync::Arc;
use tunnel::containers::{EndpointSpec, Follower, HostPlacer};
use tunnel::docker::{Bollard, ContainerRuntime, resolve_all};
use tunnel::keys::{PrivateKey, PublicKey};
use tunnel::net::Netlink;
use tunnel::wg::{BackendChoice, PeerSpec};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [container, address, server_key, server] = args.as_slice() else {
        eprintln!(
            "usage: attach_container CONTAINER ADDRESS/PREFIX SERVER_PUBLIC_KEY SERVER_IP:PORT"
        );
        std::process::exit(2);
    };
    let fail = |e: &dyn std::fmt::Display| -> ! {
        eprintln!("error: {e}");
        std::process::exit(1)
    };
    let address: ipnetwork::IpNetwork = address.parse().unwrap_or_else(|e| fail(&e));
    let server_key = PublicKey::from_base64(server_key).unwrap_or_else(|e| fail(&e));
    let server: std::net::SocketAddr = server.parse().unwrap_or_else(|e| fail(&e));

    let runtime: Arc<dyn ContainerRuntime> =
        Arc::new(Bollard::connect().await.unwrap_or_else(|e| fail(&e)));
    let info = resolve_all(runtime.as_ref(), std::slice::from_ref(container))
        .await
        .unwrap_or_else(|e| fail(&e))
        .remove(0);
    let net = Arc::new(Netlink::connect().unwrap_or_else(|e| fail(&e)));
    let key = PrivateKey::generate();
    println!("endpoint public key: {}", key.public_key());
    let spec = EndpointSpec {
        container: info.name.clone(),
        iface: "wgexample0".into(),
        key,
        address,
        address6: None,
        hub: PeerSpec {
            public_key: server_key,
            endpoint: Some(server),
            allowed_ips: vec![address],
            keepalive: Some(25),
        },
        mtu: 1420,
        probe: std::net::SocketAddr::new(address.network(), 9),
        link: None,
        by_label: false,
    };
    let mut follower = Follower::new(
        runtime,
        HostPlacer::shared(net, BackendChoice::Auto),
        vec![spec],
    );
    if let Err(e) = follower.reconcile_all().await {
        fail(&e);
    }
    println!("attached wgexample0 to {}; Ctrl-C to remove it", info.name);
    follower
        .follow(
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
            None,
        )
        .await;
    follower.detach_all().await;
}
