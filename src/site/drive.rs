//! The join's driver: runs the [`JoinMachine`] against a [`World`] (the
//! device, the hub's API, the WebSocket ways and the store; `join` has
//! the real one), on tokio's clock. Calls that take
//! time (pings, redeems, dials) run side by side; the rest is done before
//! the machine hears of anything else.

use super::machine::{Action, Chosen, Event, JoinMachine, Way};
use super::{Progress, SiteError};
use crate::control::tunnel::{Admitted, Declined};
use crate::control::{ControlError, Patience};
use crate::keys::PublicKey;
use crate::transport::TransportError;
use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What the join does to the world, one call per [`Action`].
#[async_trait]
pub trait World: Send + Sync {
    /// A WebSocket connection, kept for the way that wins.
    type Conn: Send;

    /// A round trip to the hub's API through the tunnel.
    async fn ping(&self, patience: Patience) -> Result<(), ControlError>;
    /// Whether the hub peer has had a handshake.
    async fn handshake(&self) -> Result<bool, SiteError>;
    /// The WebSocket ways, direct first.
    fn ways(&self) -> Result<Vec<Way>, SiteError>;
    async fn dial(&self, index: usize, timeout: Duration) -> Result<Self::Conn, TransportError>;
    /// The device's datagrams go that way from now on (`conn`: the way's
    /// first connection).
    async fn use_way(&self, chosen: Chosen, conn: Option<Self::Conn>) -> Result<(), SiteError>;
    /// Asks the hub to admit our own key, signed with the invite.
    async fn redeem(&self, patience: Patience) -> Result<Admitted, Declined>;
    /// Signs with the hub's clock from now on.
    fn adjust_clock(&self, hub_time: u64);
    /// Saves the site as admitted, then gives the device our own key.
    async fn switch(&self, admitted: Admitted) -> Result<(), SiteError>;
    /// Our own key's public half.
    fn own_key(&self) -> PublicKey;
    /// A step of the join where tests crash it (`crate::sys::crash_point`).
    fn crash_point(&self, step: &str) -> Result<(), SiteError>;
}

/// The answer to a call that takes time.
enum Answer<C> {
    Ping(Result<(), ControlError>),
    Redeem(Result<Admitted, Declined>),
    Dial(usize, Result<C, TransportError>),
}

pub(super) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Runs `machine` until traffic flows over the way it chose, or the join
/// fails; reports its steps to `progress`.
pub async fn drive<W: World>(
    mut machine: JoinMachine,
    world: &W,
    progress: &dyn Progress,
) -> Result<Chosen, SiteError> {
    let mut calls: FuturesUnordered<BoxFuture<'_, Answer<W::Conn>>> = FuturesUnordered::new();
    let mut dials: FuturesUnordered<BoxFuture<'_, Answer<W::Conn>>> = FuturesUnordered::new();
    let mut conns = HashMap::new();
    let mut sent = false;
    loop {
        while let Some(action) = machine.poll_transmit() {
            match action {
                Action::Ping(p) => {
                    calls.push(Box::pin(async move { Answer::Ping(world.ping(p).await) }))
                }
                Action::Redeem(p) => {
                    if !sent {
                        world.crash_point("redeem-sending")?;
                        sent = true;
                    }
                    calls.push(Box::pin(
                        async move { Answer::Redeem(world.redeem(p).await) },
                    ));
                }
                Action::Dial { index, timeout } => dials.push(Box::pin(async move {
                    Answer::Dial(index, world.dial(index, timeout).await)
                })),
                Action::CheckHandshake => {
                    let seen = world.handshake().await?;
                    machine.handle_handshake(now(), seen);
                }
                Action::ListWays => machine.handle_ways(now(), world.ways()?),
                Action::Use(chosen) => {
                    // The other ways are given up.
                    dials.clear();
                    let conn = match chosen {
                        Chosen::Way(i) => conns.remove(&i),
                        Chosen::Udp => None,
                    };
                    world.use_way(chosen, conn).await?;
                }
                Action::AdjustClock { hub_time } => {
                    tracing::warn!("this host's clock is off from the hub's; using the hub's time");
                    world.adjust_clock(hub_time);
                }
                Action::Switch(admitted) => {
                    world.switch(admitted).await?;
                    world.crash_point("key-swapped")?;
                    tracing::info!(
                        "invite redeemed; now using this host's own key {}",
                        world.own_key()
                    );
                    machine.handle_switched(now());
                }
            }
        }
        while let Some(event) = machine.poll_event() {
            match event {
                Event::Progress(step) => progress.step(&step),
                Event::Up(chosen) => return Ok(chosen),
                Event::Failed(e) => return Err(e),
            }
        }
        let wake = machine.poll_timeout();
        let answer = tokio::select! {
            Some(a) = calls.next(), if !calls.is_empty() => a,
            Some(a) = dials.next(), if !dials.is_empty() => a,
            () = sleep_until(wake), if wake.is_some() => {
                machine.handle_timeout(now());
                continue;
            }
            else => return Err(SiteError::NoPath("the join waits for nothing".into())),
        };
        match answer {
            Answer::Ping(r) => machine.handle_ping(now(), r),
            Answer::Redeem(Ok(admitted)) => {
                world.crash_point("redeem-answered")?;
                warn_pending(&machine, &admitted);
                machine.handle_redeem(now(), Ok(admitted));
            }
            Answer::Redeem(Err(e)) => machine.handle_redeem(now(), Err(e)),
            Answer::Dial(i, Ok(conn)) => {
                conns.insert(i, conn);
                machine.handle_dial(now(), i, Ok(()));
            }
            Answer::Dial(i, Err(e)) => machine.handle_dial(now(), i, Err(e)),
        }
    }
}

async fn sleep_until(wake: Option<Instant>) {
    if let Some(w) = wake {
        tokio::time::sleep_until(tokio::time::Instant::from_std(w)).await;
    }
}

/// The LANs the hub operator has yet to approve, and how.
fn warn_pending(machine: &JoinMachine, admitted: &Admitted) {
    if admitted.pending.is_empty() {
        return;
    }
    let who = admitted
        .name
        .clone()
        .unwrap_or_else(|| machine.plan().assigned.ip().to_string());
    for p in &admitted.pending {
        tracing::warn!(
            "route {p} waits for the hub operator's approval (on the hub: tunnel route approve {who} {p})"
        );
    }
}

#[cfg(test)]
mod tests;
