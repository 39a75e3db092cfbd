//! Which path each peer takes: a sans-IO core.
//!
//! Inputs are what the node's socket and device saw ([`Paths::on_pong`],
//! [`Paths::on_ping`], [`Paths::on_call_me`], [`Paths::on_traffic`]) and
//! the peer map ([`Paths::set_peers`]), each with `now`; [`Paths::poll`]
//! returns what to do ([`Effect`]: probes to send, "call me" requests,
//! endpoints to set) and [`Paths::deadline`] when to poll again. Random
//! transaction ids come from the generator the caller passes.
//!
//! The rules, as the issue and Tailscale's disco teach them:
//! - a peer starts on the relay, which always works while the hub does,
//!   and is probed only once traffic flows to or from it (or it asks):
//!   with hundreds of peers, the idle ones cost nothing;
//! - a probe round pings every candidate and, through the hub, asks the
//!   peer to ping back at once ("call me"), so that both NATs open;
//! - a direct path is taken only once a pong proved it (make before
//!   break), the lowest round trip wins, an address on one of this node's
//!   own networks gets a bonus, and a better path must be clearly better
//!   (hysteresis) to replace the one in use;
//! - the path in use is pinged often while traffic flows and seldom when
//!   idle; when its pings go unanswered for [`Timings::dead_after`] the
//!   peer goes back to the relay, and a relayed peer is probed again every
//!   [`Timings::reprobe`].

use super::NodeId;
use super::map::MeshPeer;
use crate::keys::PublicKey;
use ipnetwork::IpNetwork;
use rand_core::RngCore;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The path a peer's datagrams take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    Relay,
    Direct(SocketAddr),
}

impl std::fmt::Display for Chosen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chosen::Relay => f.write_str("relay"),
            Chosen::Direct(a) => write!(f, "direct {a}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send a ping to `to` (a candidate, or the peer's relay address).
    Ping {
        peer: PublicKey,
        to: SocketAddr,
        txid: [u8; 12],
    },
    /// Ask the hub to have `peer` ping us now.
    CallMe { peer: PublicKey },
    /// Point the peer's WireGuard endpoint at this path.
    SetPath { peer: PublicKey, path: Chosen },
}

#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// Pings on the path in use while traffic flows.
    pub heartbeat: Duration,
    /// Pings on the path in use while idle (keeps NAT mappings open).
    pub idle_heartbeat: Duration,
    /// Traffic this recent makes a peer active.
    pub active_for: Duration,
    /// The path in use is dead once its pings went unanswered this long.
    pub dead_after: Duration,
    /// A pong later than this answers nothing.
    pub probe_timeout: Duration,
    /// A candidate may replace the path in use only with a pong this recent.
    pub fresh: Duration,
    /// Probe rounds of a relayed idle peer (and of a direct one, for a
    /// better path).
    pub reprobe: Duration,
    /// Probe rounds of a relayed peer while traffic flows.
    pub active_reprobe: Duration,
    /// At most one round per peer this often, whatever asks for it.
    pub min_round: Duration,
    /// A "call me" is answered with a round unless one ran this recently.
    pub call_me_quiet: Duration,
    /// Taken off the round trip of an address on one of our own networks.
    pub lan_bonus: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            heartbeat: Duration::from_millis(1500),
            idle_heartbeat: Duration::from_secs(20),
            active_for: Duration::from_secs(10),
            dead_after: Duration::from_secs(4),
            probe_timeout: Duration::from_secs(3),
            fresh: Duration::from_secs(5),
            reprobe: Duration::from_secs(60),
            active_reprobe: Duration::from_secs(10),
            min_round: Duration::from_secs(1),
            call_me_quiet: Duration::from_secs(1),
            lan_bonus: Duration::from_millis(2),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Stat {
    /// Smoothed round trip.
    rtt: Option<Duration>,
    last_pong: Option<Instant>,
    /// The first ping since the last pong, while unanswered.
    unanswered_since: Option<Instant>,
}

#[derive(Debug)]
struct Peer {
    id: NodeId,
    /// From the map, then learned from pings ("call me", a ping's source).
    candidates: Vec<SocketAddr>,
    stats: HashMap<SocketAddr, Stat>,
    chosen: Chosen,
    /// Since when.
    since: Instant,
    next_round: Instant,
    last_round: Option<Instant>,
    next_heartbeat: Option<Instant>,
    last_traffic: Option<Instant>,
    /// The next round answers a "call me": it asks for none itself.
    answering: bool,
    /// Rounds since the peer or its candidates were new.
    rounds: u32,
    /// Addresses a ping came from that are not the path in use: pinged
    /// back once, so that a path proven one way is tried the other way
    /// at once rather than at the next round.
    ping_back: Vec<SocketAddr>,
}

/// What status shows of a peer's path.
#[derive(Debug, Clone, PartialEq)]
pub struct PathView {
    pub peer: PublicKey,
    pub chosen: Chosen,
    /// Of the path in use.
    pub rtt: Option<Duration>,
    /// The last pong on the path in use.
    pub last_pong: Option<Instant>,
    pub since: Instant,
}

struct Pending {
    peer: PublicKey,
    to: SocketAddr,
    sent: Instant,
}

/// At most this many probes wait for their pong; older ones are forgotten
/// first (a flood of rounds must not grow memory).
const MAX_PENDING: usize = 4096;

pub struct Paths {
    timings: Timings,
    /// This node's own networks, for the same-LAN bonus.
    local: Vec<IpNetwork>,
    peers: HashMap<PublicKey, Peer>,
    pending: HashMap<[u8; 12], Pending>,
    effects: Vec<Effect>,
}

impl Paths {
    pub fn new(timings: Timings, local: Vec<IpNetwork>) -> Paths {
        Paths {
            timings,
            local,
            peers: HashMap::new(),
            pending: HashMap::new(),
            effects: vec![],
        }
    }

    pub fn set_local(&mut self, local: Vec<IpNetwork>) {
        self.local = local;
    }

    /// Follows the map: new peers start on the relay and are probed at
    /// once, peers whose candidates changed are probed again, peers gone
    /// are forgotten.
    pub fn set_peers(&mut self, peers: &[MeshPeer], now: Instant) {
        self.peers
            .retain(|k, _| peers.iter().any(|p| p.public_key == *k));
        for p in peers {
            let Some(id) = p.id() else { continue };
            match self.peers.get_mut(&p.public_key) {
                Some(known) => {
                    let new: Vec<SocketAddr> = p
                        .candidates
                        .iter()
                        .filter(|c| !known.candidates.contains(c))
                        .copied()
                        .collect();
                    if !new.is_empty() {
                        known.candidates.extend(new);
                        known.rounds = 0;
                        if active(known.last_traffic, self.timings.reprobe, now) {
                            known.next_round = now;
                        }
                    }
                    if known.id != id {
                        known.id = id;
                        known.chosen = Chosen::Relay;
                        self.effects.push(Effect::SetPath {
                            peer: p.public_key,
                            path: Chosen::Relay,
                        });
                    }
                }
                None => {
                    self.peers.insert(
                        p.public_key,
                        Peer {
                            id,
                            candidates: p.candidates.clone(),
                            stats: HashMap::new(),
                            chosen: Chosen::Relay,
                            since: now,
                            // Probed once traffic flows (or it calls):
                            // a peer nobody talks to costs nothing.
                            next_round: idle(now),
                            last_round: None,
                            next_heartbeat: None,
                            last_traffic: None,
                            answering: false,
                            rounds: 0,
                            ping_back: vec![],
                        },
                    );
                }
            }
        }
    }

    /// A pong came from `from`.
    pub fn on_pong(&mut self, peer: &PublicKey, from: SocketAddr, txid: [u8; 12], now: Instant) {
        let Some(p) = self.pending.get(&txid) else {
            return;
        };
        // Only an answer from where the ping went, and from whom it went to.
        if p.peer != *peer || p.to != from {
            return;
        }
        let p = self.pending.remove(&txid).expect("just found");
        let rtt = now.saturating_duration_since(p.sent);
        if rtt > self.timings.probe_timeout {
            return;
        }
        let Some(peer) = self.peers.get_mut(peer) else {
            return;
        };
        let s = peer.stats.entry(from).or_default();
        s.rtt = Some(match s.rtt {
            // As TCP smooths: an eighth of each new sample.
            Some(old) => (old * 7 + rtt) / 8,
            None => rtt,
        });
        s.last_pong = Some(now);
        s.unanswered_since = None;
        self.choose(now);
    }

    /// A ping came from `from`: the peer's address as this node sees it
    /// (for a peer behind a symmetric NAT, the one address that works).
    pub fn on_ping(&mut self, peer: &PublicKey, from: SocketAddr, now: Instant) {
        if super::relay_id(&from).is_some() {
            return;
        }
        let min_round = self.timings.min_round;
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if !p.candidates.contains(&from) {
            if p.candidates.len() >= 2 * super::map::MAX_CANDIDATES {
                p.candidates.remove(0);
            }
            p.candidates.push(from);
            p.next_round = p.next_round.min(earliest(p.last_round, min_round, now));
        }
        let fresh = p
            .stats
            .get(&from)
            .and_then(|s| s.last_pong)
            .is_some_and(|l| now.saturating_duration_since(l) <= self.timings.fresh);
        if p.chosen != Chosen::Direct(from) && !fresh && !p.ping_back.contains(&from) {
            p.ping_back.push(from);
        }
    }

    /// The peer asked (through the hub) to be probed now; `at` is where
    /// the hub sees it. Answered at once, so that both sides' probes cross
    /// and open both NATs; but not when this side probed lately itself,
    /// or two relayed peers would keep calling each other.
    pub fn on_call_me(&mut self, peer: &PublicKey, at: Option<SocketAddr>, now: Instant) {
        let quiet = self.timings.call_me_quiet;
        if let Some(p) = self.peers.get_mut(peer) {
            let mut new = false;
            if let Some(at) = at
                && !p.candidates.contains(&at)
            {
                p.candidates.push(at);
                new = true;
            }
            if new
                || p.last_round
                    .is_none_or(|l| now.saturating_duration_since(l) >= quiet)
            {
                p.next_round = now;
                p.answering = true;
            }
        }
    }

    /// Datagrams went to or came from the peer.
    pub fn on_traffic(&mut self, peer: &PublicKey, now: Instant) {
        let t = self.timings;
        if let Some(p) = self.peers.get_mut(peer) {
            let was_idle = p
                .last_traffic
                .is_none_or(|l| now.saturating_duration_since(l) >= t.active_for);
            p.last_traffic = Some(now);
            if was_idle {
                match p.chosen {
                    Chosen::Relay => {
                        p.next_round =
                            p.next_round
                                .min(earliest(p.last_round, t.active_reprobe, now))
                    }
                    Chosen::Direct(_) => p.next_heartbeat = Some(now),
                }
            }
        }
    }

    /// What is due at `now`.
    pub fn poll(&mut self, now: Instant, rng: &mut dyn RngCore) -> Vec<Effect> {
        let t = self.timings;
        self.pending
            .retain(|_, p| now.saturating_duration_since(p.sent) <= t.probe_timeout);
        let keys: Vec<PublicKey> = self.peers.keys().copied().collect();
        for key in keys {
            let p = self.peers.get_mut(&key).expect("listed");
            let mut pings: Vec<SocketAddr> = std::mem::take(&mut p.ping_back);
            if p.next_round <= now {
                p.last_round = Some(now);
                for c in p
                    .candidates
                    .iter()
                    .copied()
                    .chain([super::relay_addr(p.id)])
                {
                    if !pings.contains(&c) {
                        pings.push(c);
                    }
                }
                if p.chosen == Chosen::Relay && !p.answering {
                    self.effects.push(Effect::CallMe { peer: key });
                }
                p.answering = false;
                let active = p
                    .last_traffic
                    .is_some_and(|l| now.saturating_duration_since(l) < t.active_for);
                let every = match (p.chosen, active) {
                    (Chosen::Relay, true) => t.active_reprobe,
                    _ => t.reprobe,
                };
                let recent = self::active(p.last_traffic, t.reprobe, now);
                // A relayed peer's first rounds come quickly (1, 2, 4, 8 s
                // apart): a first round often races the peer learning of
                // us, and one lost race should not cost the whole interval.
                let backoff = match p.chosen {
                    Chosen::Relay => t.min_round * (1 << p.rounds.min(6)),
                    Chosen::Direct(_) => every,
                };
                p.rounds += 1;
                p.next_round = if p.chosen == Chosen::Relay && !recent {
                    // Idle for a minute: no more rounds until traffic.
                    idle(now)
                } else {
                    now + every.min(backoff)
                };
            }
            if let Chosen::Direct(a) = p.chosen
                && p.next_heartbeat.is_none_or(|h| h <= now)
            {
                if !pings.contains(&a) {
                    pings.push(a);
                }
                let s = p.stats.entry(a).or_default();
                let active = p
                    .last_traffic
                    .is_some_and(|l| now.saturating_duration_since(l) < t.active_for);
                let every = if active || s.unanswered_since.is_some() {
                    t.heartbeat
                } else {
                    t.idle_heartbeat
                };
                p.next_heartbeat = Some(now + every);
            }
            for to in pings {
                let s = p.stats.entry(to).or_default();
                s.unanswered_since.get_or_insert(now);
                let mut txid = [0u8; 12];
                rng.fill_bytes(&mut txid);
                if self.pending.len() >= MAX_PENDING
                    && let Some(old) = self
                        .pending
                        .iter()
                        .min_by_key(|(_, p)| p.sent)
                        .map(|(k, _)| *k)
                {
                    self.pending.remove(&old);
                }
                self.pending.insert(
                    txid,
                    Pending {
                        peer: key,
                        to,
                        sent: now,
                    },
                );
                self.effects.push(Effect::Ping {
                    peer: key,
                    to,
                    txid,
                });
            }
        }
        self.choose(now);
        std::mem::take(&mut self.effects)
    }

    /// When to poll next (and after every input: a ping may want one back).
    /// Peers that wait for traffic add nothing.
    pub fn deadline(&self) -> Option<Instant> {
        let t = self.timings;
        self.peers
            .values()
            .flat_map(|p| {
                let dead = match p.chosen {
                    Chosen::Direct(a) => p
                        .stats
                        .get(&a)
                        .and_then(|s| s.unanswered_since)
                        .map(|u| u + t.dead_after),
                    Chosen::Relay => None,
                };
                [Some(p.next_round), p.next_heartbeat, dead]
            })
            .flatten()
            .min()
    }

    fn score(&self, a: &SocketAddr, s: &Stat) -> Option<Duration> {
        let rtt = s.rtt?;
        let lan = self.local.iter().any(|n| n.contains(a.ip()));
        Some(if lan {
            rtt.saturating_sub(self.timings.lan_bonus)
        } else {
            rtt
        })
    }

    /// Settles each peer's path on what the probes showed.
    fn choose(&mut self, now: Instant) {
        let t = self.timings;
        let mut changes = vec![];
        for (key, p) in &self.peers {
            let fresh = |s: &Stat| {
                s.last_pong
                    .is_some_and(|l| now.saturating_duration_since(l) <= t.fresh)
            };
            let best = p
                .stats
                .iter()
                .filter(|(a, s)| super::relay_id(a).is_none() && fresh(s))
                .filter_map(|(a, s)| Some((*a, self.score(a, s)?)))
                .min_by_key(|(a, score)| (*score, *a));
            let next = match p.chosen {
                Chosen::Relay => best.map(|(a, _)| Chosen::Direct(a)),
                Chosen::Direct(cur) => {
                    let s = p.stats.get(&cur).cloned().unwrap_or_default();
                    let dead = s
                        .unanswered_since
                        .is_some_and(|u| now.saturating_duration_since(u) >= t.dead_after)
                        || s.last_pong.is_none_or(|l| {
                            now.saturating_duration_since(l) > 3 * t.idle_heartbeat
                        });
                    if dead {
                        Some(match best.filter(|(a, _)| *a != cur) {
                            Some((a, _)) => Chosen::Direct(a),
                            None => Chosen::Relay,
                        })
                    } else {
                        let current = self.score(&cur, &s);
                        // The pongs of the round that chose this path are
                        // compared as equals; after that, a new path must be
                        // clearly better.
                        let same_round = p.last_round.is_some_and(|r| {
                            p.since >= r && now.saturating_duration_since(r) <= t.probe_timeout
                        });
                        let margin = |c: Duration| {
                            if same_round {
                                Duration::ZERO
                            } else {
                                (c / 5).max(Duration::from_millis(2))
                            }
                        };
                        match (best, current) {
                            (Some((a, b)), Some(c)) if a != cur && b + margin(c) < c => {
                                Some(Chosen::Direct(a))
                            }
                            _ => None,
                        }
                    }
                }
            };
            if let Some(next) = next
                && next != p.chosen
            {
                changes.push((*key, next));
            }
        }
        for (key, next) in changes {
            let p = self.peers.get_mut(&key).expect("listed");
            p.chosen = next;
            p.since = now;
            match next {
                Chosen::Direct(_) => {
                    p.next_heartbeat = Some(now + t.heartbeat);
                    p.next_round = p.next_round.max(now + t.reprobe);
                }
                Chosen::Relay => {
                    p.next_heartbeat = None;
                    // Probe again soon: one lost burst should not cost a minute.
                    p.next_round = p.next_round.min(now + t.min_round);
                    p.rounds = 0;
                }
            }
            self.effects.push(Effect::SetPath {
                peer: key,
                path: next,
            });
        }
    }

    /// Each peer's path, for status.
    pub fn view(&self) -> Vec<PathView> {
        let mut out: Vec<PathView> = self
            .peers
            .iter()
            .map(|(k, p)| {
                let at = match p.chosen {
                    Chosen::Direct(a) => a,
                    Chosen::Relay => super::relay_addr(p.id),
                };
                let s = p.stats.get(&at);
                PathView {
                    peer: *k,
                    chosen: p.chosen,
                    rtt: s.and_then(|s| s.rtt),
                    last_pong: s.and_then(|s| s.last_pong),
                    since: p.since,
                }
            })
            .collect();
        out.sort_by_key(|v| v.peer.0);
        out
    }

    pub fn chosen(&self, peer: &PublicKey) -> Option<Chosen> {
        self.peers.get(peer).map(|p| p.chosen)
    }
}

/// "Not before something asks for it": later than any deadline that
/// matters, without overflowing the clock.
fn idle(now: Instant) -> Instant {
    now + Duration::from_secs(24 * 3600)
}

/// Whether traffic came within `within` of `now`.
fn active(last: Option<Instant>, within: Duration, now: Instant) -> bool {
    last.is_some_and(|l| now.saturating_duration_since(l) < within)
}

/// The soonest a round may run, `min` after the last one.
fn earliest(last: Option<Instant>, min: Duration, now: Instant) -> Instant {
    last.map_or(now, |l| (l + min).max(now))
}

#[cfg(test)]
mod tests;
