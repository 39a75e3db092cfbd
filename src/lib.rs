//! `tunnel`: Docker-aware site-to-site WireGuard tunnels.
//!
//! `tunnel serve` creates a hub endpoint and prints single-use join tokens;
//! `tunnel join <token> <ip>` brings up the other side with a key made on its
//! own host, so no private key ever crosses the network.
//!
//! The house reads one way, each layer using only those below it
//! (`tests/layers.rs` checks it, and that no files import each other in a
//! circle):
//!
//! 1. pure data: [`keys`], [`token`], [`state`] (the records), [`reach`],
//!    [`ipam`], [`limits`], [`lograte`]: no OS, no transport, no policy;
//! 2. the OS edge, behind small traits with fakes that only tests compile:
//!    [`wg`] (`WgDevice`: kernel or embedded userspace WireGuard), [`net`]
//!    (`NetOps`: rtnetlink), [`firewall`] (nftables), [`docker`]
//!    (`ContainerRuntime`: bollard), [`transport`], [`store`] (files),
//!    [`gateway`] (journaled host changes), [`endpoint`], [`sys`],
//!    [`shutdown`], [`status`];
//! 3. the wire protocol, [`control`]: types, signing and the client; it
//!    knows nothing of who serves it;
//! 4. the node runtime, [`node`], with [`containers`], [`driver`], [`dns`]
//!    and [`metrics`]: what a hub and a site both run beside their tunnel;
//! 5. the two roles, [`hub`] and [`site`], neither importing the other; their
//!    timers and multi-step protocols are pure cores with the clock passed in;
//! 6. [`cli`]: one file per command (parse, a config, run, print), the only
//!    place that uses `anyhow`; exit codes come from one trait, `cli::exit::Exit`.

pub mod cli;
pub mod containers;
pub mod control;
pub mod dns;
pub mod docker;
pub mod driver;
pub mod endpoint;
pub mod firewall;
pub mod gateway;
pub mod hub;
pub mod ipam;
pub mod keys;
pub mod limits;
pub mod lograte;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod node;
pub mod reach;
pub mod shutdown;
pub mod site;
pub mod state;
pub mod status;
pub mod store;
pub mod sys;
pub mod token;
pub mod transport;
pub mod wg;
