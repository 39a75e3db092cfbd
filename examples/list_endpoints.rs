//! List a host's endpoints from its state directory, the way `tunnel
//! status` does when nothing runs (no root needed if the directory is
//! readable; it holds private keys, so normally only root can).
//!
//! ```text
//! sudo cargo run --example list_endpoints -- /var/lib/tunnel
//! ```

use tunnel::status;
use tunnel::store::StateDir;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/var/lib/tunnel".into());
    let store = StateDir::new(&dir);
    let ifaces = match store.ifaces() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let mut endpoints = Vec::new();
    for iface in ifaces {
        match store.load(&iface) {
            Ok(Some(saved)) => endpoints.extend(status::from_state(&iface, &saved)),
            Ok(None) => {}
            Err(e) => eprintln!("skipping {iface}: {e}"),
        }
    }
    print!("{}", status::render(&endpoints));
}
