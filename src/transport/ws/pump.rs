//! One WebSocket, either end: the two libraries' messages seen one way,
//! and [`pump`], which carries datagrams between a WebSocket and the
//! [`Relay`] until either side ends.
//!
//! Writes are batched: whatever is queued when the writer wakes goes out
//! with one flush, so a burst costs one TLS record run and one syscall,
//! not one per datagram.

use crate::transport::Relay;
use axum::extract::ws::Message as AxumMessage;
use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as TMessage;

/// A WireGuard datagram is at most 64 KiB; nothing larger is a datagram.
pub(super) const MAX_MESSAGE: usize = 1 << 16;

/// What a link's reader makes of a message.
pub(super) enum Frame {
    Data(Bytes),
    Close,
    Other,
}

/// The two WebSocket libraries' messages, seen the same way.
pub(super) trait WsMessage: Sized + Send {
    fn binary(b: Bytes) -> Self;
    fn ping() -> Self;
    fn frame(self) -> Frame;
}

impl WsMessage for AxumMessage {
    fn binary(b: Bytes) -> Self {
        AxumMessage::Binary(b)
    }
    fn ping() -> Self {
        AxumMessage::Ping(Bytes::new())
    }
    fn frame(self) -> Frame {
        match self {
            AxumMessage::Binary(b) => Frame::Data(b),
            AxumMessage::Close(_) => Frame::Close,
            _ => Frame::Other,
        }
    }
}

impl WsMessage for TMessage {
    fn binary(b: Bytes) -> Self {
        TMessage::Binary(b)
    }
    fn ping() -> Self {
        TMessage::Ping(Bytes::new())
    }
    fn frame(self) -> Frame {
        match self {
            TMessage::Binary(b) => Frame::Data(b),
            TMessage::Close(_) => Frame::Close,
            _ => Frame::Other,
        }
    }
}

/// Carries datagrams between one WebSocket and the relay until either
/// side ends; `ping` makes this side ping; `idle` ends the link when
/// nothing at all (data, ping, pong) came for that long.
pub(super) async fn pump<M, S, E>(
    ws: S,
    relay: &Relay,
    addr: SocketAddr,
    mut outbound: mpsc::Receiver<Bytes>,
    ping: Option<Duration>,
    idle: Option<Duration>,
) where
    M: WsMessage,
    S: Stream<Item = Result<M, E>> + Sink<M> + Send,
    E: std::fmt::Display,
{
    let (mut sink, mut stream) = ws.split();
    let writer = async {
        let mut ticker = tokio::time::interval(ping.unwrap_or(Duration::from_secs(3600)));
        ticker.tick().await;
        loop {
            tokio::select! {
                first = outbound.recv() => {
                    let Some(first) = first else { return };
                    if sink.feed(M::binary(first)).await.is_err() {
                        return;
                    }
                    // Let a burst that is on its way join this write.
                    tokio::task::yield_now().await;
                    while let Ok(more) = outbound.try_recv() {
                        if sink.feed(M::binary(more)).await.is_err() {
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
                _ = ticker.tick(), if ping.is_some() => {
                    if sink.send(M::ping()).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    // A flag rather than a timer reset per message: a busy link costs a
    // store per datagram, and the watchdog wakes four times per `idle`.
    let heard = AtomicBool::new(false);
    let reader = async {
        while let Some(msg) = stream.next().await {
            heard.store(true, Ordering::Relaxed);
            match msg {
                Ok(m) => match m.frame() {
                    Frame::Data(b) if b.len() <= MAX_MESSAGE => relay.deliver(addr, b),
                    Frame::Close => return,
                    _ => {}
                },
                Err(e) => {
                    tracing::debug!("WebSocket link {addr}: {e}");
                    return;
                }
            }
        }
    };
    // Closes a link that has been silent for four checks in a row, so
    // after `idle` to 1.25 x `idle` of silence.
    let watchdog = async {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        let mut quiet = 0;
        loop {
            tokio::time::sleep(idle / 4).await;
            if heard.swap(false, Ordering::Relaxed) {
                quiet = 0;
            } else {
                quiet += 1;
                if quiet == 4 {
                    tracing::debug!("WebSocket link {addr}: nothing heard for {idle:?}; closing");
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
        _ = watchdog => {}
    }
}
