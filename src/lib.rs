//! `tunnel`: Docker-aware site-to-site WireGuard tunnels.
//!
//! `tunnel serve` creates a hub endpoint and prints single-use join tokens;
//! `tunnel join <token> <ip>` brings up the other side with a key made on its
//! own host, so no private key ever crosses the network.
//!
//! Layout: [`cli`] holds one file per command and is the only place that uses
//! `anyhow`. The pure parts ([`token`], [`ipam`], [`keys`], [`hub`]'s
//! bookkeeping) are tested without root; the OS-facing parts sit behind small
//! traits: [`wg::WgDevice`] (kernel or embedded userspace WireGuard) and
//! [`net::NetOps`] (rtnetlink), each with a fake for unit tests.

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
