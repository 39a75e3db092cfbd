//! The lab (`tunnel-lab`, shared with the benchmark and the demo), bound
//! to the binary under test, and what the tests need of the library.

#![allow(dead_code)]

pub use tunnel_lab::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_tunnel");

/// A lab of `n` hosts running the binary under test.
pub fn lab(n: usize) -> Lab {
    Lab::new(BIN, n)
}

/// An endpoint's private key and the hub's public key, from its state.
pub fn keys(node: &Node) -> (tunnel::keys::PrivateKey, tunnel::keys::PublicKey) {
    let store = tunnel::store::StateDir::new(&node.state);
    match store.load(&node.iface).unwrap().expect("saved state") {
        tunnel::state::Endpoint::Joined(j) => (j.private_key, j.server_public_key),
        tunnel::state::Endpoint::Server(s) => {
            let k = s.private_key.public_key();
            (s.private_key, k)
        }
    }
}

/// Registers `name` for `site` with a fresh key, signed with the site's key
/// (what a site's `--container` does), through the hub's control API.
pub fn register_as(
    site: &Node,
    name: &'static str,
) -> Result<String, tunnel::control::ControlError> {
    let (key, hub) = keys(site);
    let api = tunnel::control::tunnel::HubApi::via("10.77.0.1:51821".parse().unwrap(), &site.iface);
    site.host.block_on(move || async move {
        let signer = tunnel::control::auth::Signer::new(&key, &hub).unwrap();
        let fresh = tunnel::keys::PrivateKey::generate().public_key();
        tunnel::control::tunnel::register_endpoint(
            api,
            &signer,
            &fresh,
            name,
            std::time::Duration::from_secs(5),
        )
        .await
        .map(|a| a.address.to_string())
    })
}
