//! WebSocket links: the hub's listener (axum over hyper, with or without
//! TLS) and a site's link to it (tokio-tungstenite, directly or through a
//! CONNECT proxy). Each binary message carries one WireGuard datagram.
//!
//! - `pump`: one WebSocket, either end, carrying datagrams to and from
//!   the [`Relay`](crate::transport::Relay); writes are batched, so a
//!   burst costs one TLS record run and one syscall, not one per datagram.
//! - `limits`: the hub listener's bounds, so that links cannot exhaust
//!   its descriptors or memory (see [`Limits`]): a connection holds its
//!   place in the total and in its source's count for its whole life,
//!   upgraded or not.
//! - `listener`: the hub's side; a connection has
//!   [`Limits::handshake`] to become a WebSocket; a link is pinged and
//!   closed when nothing comes back.
//! - `wrong_paths`: what the listener logs about other paths, without
//!   the secret.
//! - `dial`: a site's side, kept up with jittered backoff.
//!
//! Every TCP socket sets TCP_NODELAY (a proxy otherwise adds a Nagle
//! stall to the first packets).

mod dial;
mod limits;
mod listener;
mod pump;
mod wrong_paths;

pub use dial::{Connection, Dialer, Link};
pub use limits::Limits;
pub use listener::{bind, serve, serve_within};

#[cfg(test)]
mod tests;
