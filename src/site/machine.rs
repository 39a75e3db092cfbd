//! The join as a state machine without IO, in the manner of firezone's
//! `snownet::Node`: probing UDP → dialing WebSocket (the ways in order,
//! staggered) → redeeming the invite → switching to the site's own key →
//! waiting for traffic with it → up.
//!
//! What happened goes in through `handle_*(…, now)`; what to do next comes
//! out of [`JoinMachine::poll_transmit`], what the command should know
//! (progress, the end) out of [`JoinMachine::poll_event`], and when to wake
//! it with [`JoinMachine::handle_timeout`] out of
//! [`JoinMachine::poll_timeout`]. It reads no clock and no random source
//! and touches nothing: its driver (`drive`) runs it against the
//! device, the hub's API and the WebSocket dialers, and the simulation
//! tests run it against a fake clock.

use super::SiteError;
use crate::control::tunnel::{Admitted, Declined};
use crate::control::{ControlError, Patience};
use crate::transport::TransportError;
use ipnetwork::IpNetwork;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long UDP gets to complete a handshake before WebSocket is tried.
pub const UDP_BOUND: Duration = Duration::from_millis(1000);
/// After this long without a connection from one WebSocket way, the next
/// is tried too.
pub const STAGGER: Duration = Duration::from_millis(300);
/// After a handshake with the invite key, how long without a connection to
/// the API means the server knows the invite but no longer admits it. Long
/// enough for a hub busy admitting hundreds to accept our connection.
pub const USED_AFTER: Duration = Duration::from_secs(6);
/// How long a request the hub has taken may wait for its answer before it
/// is asked again (the hub answers the same request the same way).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(3);
/// A UDP probe: any packet starts a handshake; its answer is not needed.
const PROBE: Duration = Duration::from_millis(100);
/// Connecting to the API is retried quickly: the first packets may wait
/// for the handshake.
const REDEEM_CONNECT: Duration = Duration::from_millis(700);
const REDEEM_AGAIN: Duration = Duration::from_millis(50);
/// A connection shows that traffic flows; its answer may wait on a busy hub.
const FLOW_CONNECT: Duration = Duration::from_millis(100);
const FLOW_AGAIN: Duration = Duration::from_millis(20);
/// A WebSocket way gets at least this long, even past the deadline.
const DIAL_AT_LEAST: Duration = Duration::from_millis(500);

/// What the machine is told about the join before it starts.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The hub's UDP endpoint, for messages and errors.
    pub endpoint: SocketAddr,
    /// UDP is among the ways to try.
    pub udp: bool,
    /// WebSocket is among the ways to try.
    pub websocket: bool,
    /// The address the token assigns; the hub must admit us with it.
    pub assigned: IpNetwork,
    /// When the whole bring-up must be done.
    pub deadline: Instant,
    /// How long it was given (`--timeout`), for the error.
    pub timeout: Duration,
}

/// One WebSocket way to the hub, as the machine needs to name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Way {
    /// Where it connects, for the progress line.
    pub shown: String,
    /// The same with its proxy, for the error when no way connects.
    pub named: String,
    /// The path it makes (`wss direct`, `ws via proxy …`).
    pub path: String,
}

/// The way chosen: UDP, or the WebSocket way with that index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    Udp,
    Way(usize),
}

/// What the driver is to do; each answer goes back through a `handle_*`.
#[derive(Debug)]
pub enum Action {
    /// A round trip to the hub's API through the tunnel
    /// ([`JoinMachine::handle_ping`]).
    Ping(Patience),
    /// Whether the hub peer has a handshake
    /// ([`JoinMachine::handle_handshake`]).
    CheckHandshake,
    /// The WebSocket ways, in order ([`JoinMachine::handle_ways`]).
    ListWays,
    /// Connect that way ([`JoinMachine::handle_dial`]).
    Dial { index: usize, timeout: Duration },
    /// Send the device's datagrams that way (no answer).
    Use(Chosen),
    /// Ask the hub to admit our key ([`JoinMachine::handle_redeem`]).
    Redeem(Patience),
    /// Sign with the hub's clock from now on (no answer).
    AdjustClock { hub_time: u64 },
    /// Save the site, then give the device our own key
    /// ([`JoinMachine::handle_switched`]).
    Switch(Admitted),
}

/// What the command learns.
#[derive(Debug)]
pub enum Event {
    /// The step under way.
    Progress(String),
    /// Traffic flows with our own key over the chosen way.
    Up(Chosen),
    /// The join failed; nothing more comes out.
    Failed(SiteError),
}

/// Where the redeeming is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A redeem is out.
    Asking,
    /// After a failed redeem: whether the handshake is there.
    Checking,
    /// Until then, before asking again.
    Waiting(Instant),
}

#[derive(Debug)]
enum Phase {
    /// UDP has until then to complete a handshake.
    Probing {
        until: Instant,
    },
    /// Waiting for the WebSocket ways.
    Listing,
    Dialing {
        /// The next way to start, and when the last one started.
        next: usize,
        started: Instant,
        running: usize,
        errors: Vec<String>,
    },
    Redeeming {
        step: Step,
        /// When the handshake with the invite key was first seen.
        handshake_at: Option<Instant>,
        /// A connection to the API was made: the invite still routes.
        reached: bool,
        /// This attempt was signed again with the hub's clock.
        resigned: bool,
        /// This attempt's patience (kept when it is signed again).
        patience: Patience,
    },
    /// Saving the site and switching the device's key.
    Switching,
    /// Pinging with our own key; asking again then.
    Flowing {
        again: Option<Instant>,
    },
    Over,
}

/// The join, from the first probe to traffic with our own key.
#[derive(Debug)]
pub struct JoinMachine {
    plan: Plan,
    phase: Phase,
    ways: Vec<Way>,
    chosen: Option<Chosen>,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
}

impl JoinMachine {
    /// Starts at `now`: probing UDP when WebSocket is possible too, else
    /// the only way there is.
    pub fn new(plan: Plan, now: Instant) -> Self {
        let mut m = JoinMachine {
            plan,
            phase: Phase::Over,
            ways: vec![],
            chosen: None,
            actions: VecDeque::new(),
            events: VecDeque::new(),
        };
        if !m.plan.websocket {
            m.choose(Chosen::Udp, now);
        } else if m.plan.udp {
            m.progress(format!("trying UDP to {}", m.plan.endpoint));
            let until = (now + UDP_BOUND).min(m.plan.deadline);
            m.phase = Phase::Probing { until };
            m.probe(now);
        } else {
            m.list();
        }
        m
    }

    /// What it was told before it started.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn poll_transmit(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] is due; `None` while the machine
    /// waits only for answers.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Dialing { next, started, .. } if *next < self.ways.len() => {
                Some(*started + STAGGER)
            }
            Phase::Redeeming {
                step: Step::Waiting(at),
                ..
            } => Some(*at),
            Phase::Flowing { again } => *again,
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Dialing { next, started, .. }
                if *next < self.ways.len() && now >= *started + STAGGER =>
            {
                self.dial(now);
            }
            Phase::Redeeming {
                step: Step::Waiting(at),
                ..
            } if now >= *at => self.ask(now),
            Phase::Flowing { again: Some(at) } if now >= *at => {
                self.phase = Phase::Flowing { again: None };
                self.actions
                    .push_back(Action::Ping(flow_patience(self.plan.deadline, now)));
            }
            _ => {}
        }
    }

    /// A ping's answer: while probing, only that it is over; once
    /// switched, whether traffic flows.
    pub fn handle_ping(&mut self, now: Instant, result: Result<(), ControlError>) {
        match (&self.phase, result) {
            (Phase::Probing { .. }, _) => self.actions.push_back(Action::CheckHandshake),
            (Phase::Flowing { again: None }, Ok(())) => {
                let chosen = self.chosen.expect("a way was chosen before the switch");
                self.finish(Event::Up(chosen));
            }
            (Phase::Flowing { again: None }, Err(e)) if now >= self.plan.deadline => {
                self.finish(Event::Failed(SiteError::NoFlow(e)));
            }
            (Phase::Flowing { again: None }, Err(e)) => {
                tracing::debug!("ping: {e}");
                self.phase = Phase::Flowing {
                    again: Some(now + FLOW_AGAIN),
                };
            }
            (phase, _) => tracing::debug!("a ping's answer while {phase:?}"),
        }
    }

    /// Whether the hub peer has had a handshake, as the device says.
    pub fn handle_handshake(&mut self, now: Instant, seen: bool) {
        match &mut self.phase {
            Phase::Probing { .. } if seen => self.choose(Chosen::Udp, now),
            Phase::Probing { .. } => self.probe(now),
            Phase::Redeeming {
                step: step @ Step::Checking,
                handshake_at,
                reached,
                ..
            } => {
                let first = handshake_at.is_none() && seen;
                if first {
                    *handshake_at = Some(now);
                }
                let used = !*reached
                    && handshake_at.is_some_and(|t| now.saturating_duration_since(t) > USED_AFTER);
                *step = Step::Waiting(now + REDEEM_AGAIN);
                if first {
                    self.progress("redeeming the invite".into());
                }
                if used {
                    self.fail(SiteError::AlreadyUsed(self.plan.endpoint));
                } else if now >= self.plan.deadline {
                    self.fail(SiteError::Unreachable {
                        endpoint: self.plan.endpoint,
                        timeout: humantime::format_duration(self.plan.timeout).to_string(),
                    });
                }
            }
            phase => tracing::debug!("a handshake check while {phase:?}"),
        }
    }

    /// The WebSocket ways, direct first.
    pub fn handle_ways(&mut self, now: Instant, ways: Vec<Way>) {
        if !matches!(self.phase, Phase::Listing) {
            return;
        }
        let Some(first) = ways.first() else {
            return self.fail(SiteError::NoPath(String::new()));
        };
        self.progress(format!("connecting to {}", first.shown));
        self.ways = ways;
        self.phase = Phase::Dialing {
            next: 0,
            started: now,
            running: 0,
            errors: vec![],
        };
        self.dial(now);
    }

    /// How a WebSocket way's connection went.
    pub fn handle_dial(&mut self, now: Instant, index: usize, result: Result<(), TransportError>) {
        let Phase::Dialing {
            next,
            running,
            errors,
            ..
        } = &mut self.phase
        else {
            return;
        };
        let e = match result {
            Ok(()) => return self.choose(Chosen::Way(index), now),
            Err(e) => e,
        };
        tracing::info!("WebSocket via {}: {e}", self.ways[index].shown);
        if e.is_input() {
            return self.fail(e.into());
        }
        errors.push(format!("{}: {e}", self.ways[index].named));
        *running -= 1;
        if *next < self.ways.len() {
            self.dial(now);
        } else if *running == 0 {
            let errors = errors.join("; ");
            self.fail(SiteError::NoPath(errors));
        }
    }

    /// The hub's answer to a redeem.
    pub fn handle_redeem(&mut self, _now: Instant, result: Result<Admitted, Declined>) {
        let Phase::Redeeming {
            step: step @ Step::Asking,
            reached,
            resigned,
            patience,
            ..
        } = &mut self.phase
        else {
            return;
        };
        match result {
            Ok(admitted) if admitted.address != self.plan.assigned => {
                self.fail(SiteError::Mismatch {
                    got: admitted.address,
                    want: self.plan.assigned,
                });
            }
            Ok(admitted) => {
                self.phase = Phase::Switching;
                self.actions.push_back(Action::Switch(admitted));
            }
            // Our clock is off: once per attempt, sign with the hub's.
            Err(Declined {
                hub_time: Some(hub_time),
                ..
            }) if !*resigned => {
                *resigned = true;
                self.actions.push_back(Action::AdjustClock { hub_time });
                self.actions.push_back(Action::Redeem(*patience));
            }
            Err(Declined { error, .. }) if !error.is_transient() => {
                let why = match error {
                    ControlError::Refused { message, .. } => message,
                    other => other.to_string(),
                };
                self.fail(SiteError::Refused(why));
            }
            Err(Declined { error, .. }) => {
                tracing::debug!("redeem attempt: {error}");
                *reached |= error.connected();
                *step = Step::Checking;
                self.actions.push_back(Action::CheckHandshake);
            }
        }
    }

    /// The site is saved and the device has our own key.
    pub fn handle_switched(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Switching) {
            return;
        }
        self.progress("waiting for traffic with our own key".into());
        self.phase = Phase::Flowing { again: None };
        self.actions
            .push_back(Action::Ping(flow_patience(self.plan.deadline, now)));
    }

    /// Another probe while UDP still has time, else on to WebSocket.
    fn probe(&mut self, now: Instant) {
        let Phase::Probing { until } = self.phase else {
            return;
        };
        if now < until {
            self.actions.push_back(Action::Ping(PROBE.into()));
        } else {
            tracing::info!(
                "no WireGuard handshake over UDP within {UDP_BOUND:?}; trying WebSocket"
            );
            self.list();
        }
    }

    fn list(&mut self) {
        self.phase = Phase::Listing;
        self.actions.push_back(Action::ListWays);
    }

    /// Starts the next way; it gets what is left of the bring-up.
    fn dial(&mut self, now: Instant) {
        let Phase::Dialing {
            next,
            started,
            running,
            ..
        } = &mut self.phase
        else {
            return;
        };
        let timeout = self
            .plan
            .deadline
            .saturating_duration_since(now)
            .max(DIAL_AT_LEAST);
        self.actions.push_back(Action::Dial {
            index: *next,
            timeout,
        });
        *next += 1;
        *started = now;
        *running += 1;
    }

    /// The way is chosen: on to redeeming over it.
    fn choose(&mut self, chosen: Chosen, now: Instant) {
        self.chosen = Some(chosen);
        self.actions.push_back(Action::Use(chosen));
        let step = match chosen {
            Chosen::Way(i) => format!("handshaking over {}", self.ways[i].path),
            Chosen::Udp => format!("handshaking with {}", self.plan.endpoint),
        };
        self.progress(step);
        self.phase = Phase::Redeeming {
            step: Step::Asking,
            handshake_at: None,
            reached: false,
            resigned: false,
            patience: PROBE.into(),
        };
        self.ask(now);
    }

    /// One more redeem: connecting is retried quickly; once connected, the
    /// hub may be busy with hundreds of joiners, so the answer is waited
    /// for longer, though not for ever: a lost answer costs TCP seconds of
    /// backoff, while asking again gets the same admission at once.
    fn ask(&mut self, now: Instant) {
        let left = self.plan.deadline.saturating_duration_since(now);
        let attempt = Patience {
            connect: REDEEM_CONNECT.min(left),
            total: ANSWER_WITHIN.min(left),
        };
        if let Phase::Redeeming {
            step,
            resigned,
            patience,
            ..
        } = &mut self.phase
        {
            *step = Step::Asking;
            *resigned = false;
            *patience = attempt;
            self.actions.push_back(Action::Redeem(attempt));
        }
    }

    fn progress(&mut self, message: String) {
        self.events.push_back(Event::Progress(message));
    }

    fn fail(&mut self, e: SiteError) {
        self.finish(Event::Failed(e));
    }

    fn finish(&mut self, event: Event) {
        self.phase = Phase::Over;
        self.actions.clear();
        self.events.push_back(event);
    }
}

fn flow_patience(deadline: Instant, now: Instant) -> Patience {
    let left = deadline.saturating_duration_since(now);
    Patience {
        connect: FLOW_CONNECT.min(left),
        total: ANSWER_WITHIN.min(left),
    }
}

#[cfg(test)]
mod tests;
