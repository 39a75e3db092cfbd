//! The hub's housekeeping timers, sans IO, in the manner of firezone's
//! `snownet::Node`: what happened goes in through `handle_*(…, now)`, what
//! is due comes out of [`Housekeeper::poll_action`], and when to ask next
//! out of [`Housekeeper::poll_timeout`]. Nothing here reads a clock, the
//! device or the disk; the shell ([`Hub::housekeep`](super::Hub::housekeep))
//! does the [`Chore`]s and reports back.
//!
//! The timers, and why:
//! - **key swaps**: while one is pending, the device's statistics are read
//!   every [`Timings::swap_poll`] (a handshake shows up nowhere else, and
//!   a joiner waits for it), and at the latest at the swap's grace
//!   deadline ([`SWAP_GRACE`](super::ledger::SWAP_GRACE));
//! - **endpoints**: where peers are seen is recorded every
//!   [`Timings::endpoints`], and at once after a swap, so that a hub that
//!   is killed and restarted reaches a fresh peer first;
//! - **invite expiry**: when the next invite expires (a wall-clock time,
//!   looked at again at least every [`Timings::wall_recheck`], as the wall
//!   clock may be stepped);
//! - **save retries**: after a failed save, with a backoff that doubles up
//!   to [`Timings::save_retry_max`], so a full disk is not hammered;
//! - **the firewall**: re-read every [`Timings::firewall`] (it repairs
//!   what someone else flushed), and soon after the state changed, but no
//!   more often than every [`Timings::firewall_gap`] in a burst of joins.

use std::time::{Duration, Instant, SystemTime};

/// What the shell must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chore {
    /// Read the device's peers and complete the swaps that are due, then
    /// report with [`Housekeeper::handle_swaps`].
    CompleteSwaps,
    /// Record where peers are seen, and look at the host's networks again.
    RecordEndpoints,
    /// Forget expired invites, then report with
    /// [`Housekeeper::handle_invites`] or [`Housekeeper::handle_prune_failed`].
    Prune,
    /// Save the state again, and report with [`Housekeeper::handle_saved`].
    RetrySave,
    /// Read the firewall policy again and apply it (or repair it).
    CheckFirewall,
}

/// The durations the housekeeper works with; [`Timings::default`] is what
/// the hub runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// How often the device is asked for handshakes while a swap is pending.
    pub swap_poll: Duration,
    /// How often peers' endpoints are recorded.
    pub endpoints: Duration,
    /// How often the firewall is read back.
    pub firewall: Duration,
    /// The least time between two firewall re-reads after changes.
    pub firewall_gap: Duration,
    /// The first wait before a failed save is tried again.
    pub save_retry: Duration,
    /// The longest wait between two tries of a failing save.
    pub save_retry_max: Duration,
    /// How often a failing save is logged again.
    pub save_nag: Duration,
    /// The wait before a prune that failed is tried again.
    pub prune_retry: Duration,
    /// The longest a wall-clock deadline is trusted without looking again.
    pub wall_recheck: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            swap_poll: Duration::from_millis(20),
            endpoints: Duration::from_secs(10),
            firewall: Duration::from_secs(1),
            firewall_gap: Duration::from_millis(20),
            save_retry: Duration::from_secs(1),
            save_retry_max: Duration::from_secs(30),
            save_nag: Duration::from_secs(30),
            prune_retry: Duration::from_secs(1),
            wall_recheck: Duration::from_secs(60),
        }
    }
}

/// What a save's outcome means for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveNote {
    /// Nothing worth a line: saved as usual, or failing as already said.
    Quiet,
    /// The first failure, or the first for [`Timings::save_nag`]: say it.
    Failing,
    /// Saved after failures: say so.
    Recovered,
}

/// Pending key swaps: when to look at the device next, and when the first
/// of them completes whatever the device says.
#[derive(Debug, Clone, Copy)]
struct Swaps {
    check_at: Instant,
    grace: Option<Instant>,
}

/// A state the disk does not hold.
#[derive(Debug, Clone, Copy)]
struct Unsaved {
    retry_at: Instant,
    backoff: Duration,
    logged_at: Instant,
}

/// The hub's housekeeping deadlines. See the [module](self) overview.
#[derive(Debug, Clone)]
pub struct Housekeeper {
    t: Timings,
    swaps: Option<Swaps>,
    endpoints_at: Instant,
    expiry_at: Option<Instant>,
    /// No prune before this: the last one failed.
    prune_hold: Option<Instant>,
    unsaved: Option<Unsaved>,
    firewall_at: Instant,
    firewall_last: Instant,
    /// The deadline the shell sleeps until ([`Housekeeper::arm`]).
    armed: Option<Instant>,
}

impl Housekeeper {
    /// A housekeeper started at `now`: endpoints and the firewall come
    /// round after their periods; nothing is pending.
    pub fn new(now: Instant, t: Timings) -> Self {
        Self {
            t,
            swaps: None,
            endpoints_at: now + t.endpoints,
            expiry_at: None,
            prune_hold: None,
            unsaved: None,
            firewall_at: now + t.firewall,
            firewall_last: now,
            armed: None,
        }
    }

    /// A swap is pending (a redeem, or swaps resumed after a restart):
    /// look at the device now. `grace`: when the first pending swap
    /// completes anyway.
    pub fn handle_redeemed(&mut self, now: Instant, grace: Option<Instant>) {
        self.swaps = Some(Swaps {
            check_at: now,
            grace,
        });
    }

    /// The outcome of [`Chore::CompleteSwaps`]: `swapped` swaps completed,
    /// and the first of those left completes at `grace` (`None`: none is
    /// left). The device's statistics are read again soon while any is; a
    /// grace already past (its swap failed) waits for that poll too.
    pub fn handle_swaps(&mut self, now: Instant, swapped: usize, grace: Option<Instant>) {
        self.swaps = grace.map(|g| Swaps {
            check_at: now + self.t.swap_poll,
            grace: Some(g).filter(|g| *g > now),
        });
        if swapped > 0 {
            self.endpoints_at = now;
        }
    }

    /// The invites changed (or were pruned): the next expires at `next`,
    /// by the wall clock that reads `wall` at `now`.
    pub fn handle_invites(&mut self, now: Instant, wall: SystemTime, next: Option<SystemTime>) {
        self.expiry_at = next.map(|at| {
            let wait = at.duration_since(wall).unwrap_or(Duration::ZERO);
            let due = now + wait.min(self.t.wall_recheck);
            self.prune_hold.map_or(due, |hold| due.max(hold))
        });
    }

    /// [`Chore::Prune`] failed (the device refused): try again later, not
    /// at once.
    pub fn handle_prune_failed(&mut self, now: Instant) {
        let hold = now + self.t.prune_retry;
        self.prune_hold = Some(hold);
        self.expiry_at = Some(hold);
    }

    /// The state changed: the firewall is read back soon.
    pub fn handle_state_changed(&mut self, now: Instant) {
        let soon = now.max(self.firewall_last + self.t.firewall_gap);
        self.firewall_at = self.firewall_at.min(soon);
    }

    /// A save (of any change, or a retry) succeeded or failed. Failures
    /// are retried on their own schedule; what is worth logging comes back.
    pub fn handle_saved(&mut self, now: Instant, ok: bool) -> SaveNote {
        match (ok, &mut self.unsaved) {
            (true, None) => SaveNote::Quiet,
            (true, Some(_)) => {
                self.unsaved = None;
                SaveNote::Recovered
            }
            (false, None) => {
                self.unsaved = Some(Unsaved {
                    retry_at: now + self.t.save_retry,
                    backoff: self.t.save_retry,
                    logged_at: now,
                });
                SaveNote::Failing
            }
            (false, Some(u)) if now.duration_since(u.logged_at) >= self.t.save_nag => {
                u.logged_at = now;
                SaveNote::Failing
            }
            (false, Some(_)) => SaveNote::Quiet,
        }
    }

    /// Whether the disk lags behind the state.
    pub fn unsaved(&self) -> bool {
        self.unsaved.is_some()
    }

    /// Whether a key swap is pending, as far as the housekeeper was told.
    pub fn swapping(&self) -> bool {
        self.swaps.is_some()
    }

    /// When the next chore is due: never later than the next endpoint
    /// recording and firewall check, so there is always a deadline.
    pub fn poll_timeout(&self) -> Instant {
        let swaps = self
            .swaps
            .iter()
            .flat_map(|s| std::iter::once(s.check_at).chain(s.grace));
        let save = self.unsaved.map(|u| u.retry_at);
        swaps
            .chain(self.expiry_at)
            .chain(save)
            .chain([self.endpoints_at, self.firewall_at])
            .min()
            .expect("endpoints and the firewall always have a deadline")
    }

    /// The next chore due at `now`, in the order today's loop did them:
    /// swaps first (a swap makes endpoints due), the firewall last (it
    /// reads what the others changed). A chore handed out is scheduled
    /// again as if done; the `handle_*` calls correct that. Calling this
    /// until it returns `None` hands out each due chore once.
    pub fn poll_action(&mut self, now: Instant) -> Option<Chore> {
        if let Some(s) = &mut self.swaps
            && (s.check_at <= now || s.grace.is_some_and(|g| g <= now))
        {
            s.check_at = now + self.t.swap_poll;
            s.grace = s.grace.filter(|g| *g > now);
            return Some(Chore::CompleteSwaps);
        }
        if self.endpoints_at <= now {
            self.endpoints_at = now + self.t.endpoints;
            return Some(Chore::RecordEndpoints);
        }
        if self.expiry_at.is_some_and(|at| at <= now) {
            self.expiry_at = None;
            return Some(Chore::Prune);
        }
        if let Some(u) = &mut self.unsaved
            && u.retry_at <= now
        {
            u.backoff = (u.backoff * 2).min(self.t.save_retry_max);
            u.retry_at = now + u.backoff;
            return Some(Chore::RetrySave);
        }
        if self.firewall_at <= now {
            self.firewall_last = now;
            self.firewall_at = now + self.t.firewall;
            return Some(Chore::CheckFirewall);
        }
        None
    }

    /// The shell is awake and will ask [`Housekeeper::poll_timeout`]
    /// before it sleeps again: nothing needs to wake it.
    pub fn disarm(&mut self) {
        self.armed = None;
    }

    /// The shell goes to sleep until the returned deadline.
    pub fn arm(&mut self) -> Instant {
        let at = self.poll_timeout();
        self.armed = Some(at);
        at
    }

    /// Whether something came in that is due before the deadline the shell
    /// sleeps until: it must be woken.
    pub fn needs_wake(&self) -> bool {
        self.armed.is_some_and(|at| self.poll_timeout() < at)
    }
}

#[cfg(test)]
mod tests {
    //! A fake clock: plain `Instant`s that the test moves forward.
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    fn keeper() -> (Instant, Housekeeper) {
        let t0 = Instant::now();
        (t0, Housekeeper::new(t0, Timings::default()))
    }

    /// Every chore due at `now`, as the shell would drain them.
    fn due(h: &mut Housekeeper, now: Instant) -> Vec<Chore> {
        std::iter::from_fn(|| h.poll_action(now)).take(20).collect()
    }

    #[test]
    fn at_rest_only_the_firewall_and_endpoints_come_round() {
        let (t0, mut h) = keeper();
        assert!(due(&mut h, t0).is_empty());
        assert_eq!(h.poll_timeout(), t0 + S, "the firewall, once a second");
        assert_eq!(due(&mut h, t0 + S), [Chore::CheckFirewall]);
        assert_eq!(h.poll_timeout(), t0 + 2 * S);
        for k in 2..10 {
            assert_eq!(due(&mut h, t0 + k * S), [Chore::CheckFirewall]);
        }
        assert_eq!(
            due(&mut h, t0 + 10 * S),
            [Chore::RecordEndpoints, Chore::CheckFirewall]
        );
    }

    #[test]
    fn a_redeem_makes_the_device_be_read_at_once_then_every_20ms() {
        let (t0, mut h) = keeper();
        let t = t0 + 300 * MS;
        h.handle_redeemed(t, Some(t + 30 * S));
        assert_eq!(h.poll_timeout(), t, "at once: a joiner waits");
        assert_eq!(due(&mut h, t), [Chore::CompleteSwaps]);
        h.handle_swaps(t, 0, Some(t + 30 * S));
        assert_eq!(h.poll_timeout(), t + 20 * MS);
        assert!(due(&mut h, t + 19 * MS).is_empty());
        assert_eq!(due(&mut h, t + 20 * MS), [Chore::CompleteSwaps]);
    }

    #[test]
    fn a_completed_swap_records_endpoints_at_once_and_stops_the_quick_polling() {
        let (t0, mut h) = keeper();
        let t = t0 + 300 * MS;
        h.handle_redeemed(t, Some(t + 30 * S));
        assert_eq!(due(&mut h, t), [Chore::CompleteSwaps]);
        h.handle_swaps(t, 1, None);
        assert!(!h.swapping());
        assert_eq!(due(&mut h, t), [Chore::RecordEndpoints]);
        // The next recording is a full period after this one.
        assert!(!due(&mut h, t0 + 10 * S).contains(&Chore::RecordEndpoints));
        assert!(due(&mut h, t + 10 * S).contains(&Chore::RecordEndpoints));
        assert!(!due(&mut h, t + 10 * S + 20 * MS).contains(&Chore::CompleteSwaps));
    }

    #[test]
    fn a_swap_grace_sooner_than_the_poll_is_the_deadline() {
        let (t0, mut h) = keeper();
        h.handle_swaps(t0, 0, Some(t0 + 5 * MS));
        assert_eq!(h.poll_timeout(), t0 + 5 * MS);
        assert_eq!(due(&mut h, t0 + 5 * MS), [Chore::CompleteSwaps]);
        // Handed out once; what is left comes from the next report.
        assert!(due(&mut h, t0 + 5 * MS).is_empty());
    }

    #[test]
    fn an_invite_is_pruned_when_it_expires_by_the_wall_clock() {
        let (t0, mut h) = keeper();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        h.handle_invites(t0, wall, Some(wall + 30 * S));
        // Drain the firewall checks on the way; no prune before the expiry.
        for k in 1..30 {
            assert!(!due(&mut h, t0 + k * S).contains(&Chore::Prune), "{k}s");
        }
        assert_eq!(h.poll_timeout(), t0 + 30 * S);
        assert!(due(&mut h, t0 + 30 * S).contains(&Chore::Prune));
        h.handle_invites(t0 + 30 * S, wall + 30 * S, None);
        assert!(!due(&mut h, t0 + 300 * S).contains(&Chore::Prune));
    }

    #[test]
    fn a_far_expiry_is_looked_at_again_within_a_minute_and_a_past_one_at_once() {
        let (t0, mut h) = keeper();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        h.handle_invites(t0, wall, Some(wall + 3600 * S));
        assert!(!due(&mut h, t0 + 59 * S).contains(&Chore::Prune));
        assert!(due(&mut h, t0 + 60 * S).contains(&Chore::Prune));
        h.handle_invites(t0 + 60 * S, wall + 60 * S, Some(wall));
        assert_eq!(h.poll_timeout(), t0 + 60 * S, "already expired: now");
    }

    #[test]
    fn a_failed_prune_waits_before_it_is_tried_again() {
        let (t0, mut h) = keeper();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        h.handle_invites(t0, wall, Some(wall));
        assert_eq!(due(&mut h, t0), [Chore::Prune]);
        h.handle_prune_failed(t0);
        // Another change reports the same expired invite: still held.
        h.handle_invites(t0 + 10 * MS, wall, Some(wall));
        assert!(!due(&mut h, t0 + 500 * MS).contains(&Chore::Prune));
        assert!(due(&mut h, t0 + S).contains(&Chore::Prune));
    }

    #[test]
    fn a_failed_save_is_retried_with_a_doubling_backoff_up_to_30s() {
        let (t0, mut h) = keeper();
        assert_eq!(h.handle_saved(t0, false), SaveNote::Failing);
        assert!(h.unsaved());
        let mut retries = vec![];
        let mut at = t0;
        // Sleep until each deadline, as the shell does; the firewall and
        // endpoint rounds come in between.
        for _ in 0..1000 {
            at = h.poll_timeout();
            if due(&mut h, at).contains(&Chore::RetrySave) {
                retries.push(at.duration_since(t0).as_secs());
                h.handle_saved(at, false);
            }
            if retries.len() == 9 {
                break;
            }
        }
        assert!(at > t0);
        assert_eq!(&retries[..5], [1, 3, 7, 15, 31]);
        let gaps: Vec<u64> = retries.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[5..].iter().all(|g| *g == 30), "{retries:?}");
    }

    #[test]
    fn a_failing_save_is_logged_once_in_30s_and_its_recovery_once() {
        let (t0, mut h) = keeper();
        assert_eq!(h.handle_saved(t0, true), SaveNote::Quiet);
        assert_eq!(h.handle_saved(t0, false), SaveNote::Failing);
        assert_eq!(h.handle_saved(t0 + 29 * S, false), SaveNote::Quiet);
        assert_eq!(h.handle_saved(t0 + 30 * S, false), SaveNote::Failing);
        assert_eq!(h.handle_saved(t0 + 31 * S, true), SaveNote::Recovered);
        assert_eq!(h.handle_saved(t0 + 32 * S, true), SaveNote::Quiet);
        assert!(!h.unsaved());
        assert!(
            !due(&mut h, t0 + 100 * S).contains(&Chore::RetrySave),
            "saved: nothing to retry"
        );
    }

    #[test]
    fn a_change_brings_the_firewall_forward_but_not_twice_within_20ms() {
        let (t0, mut h) = keeper();
        let t = t0 + 200 * MS;
        h.handle_state_changed(t);
        assert_eq!(h.poll_timeout(), t);
        assert_eq!(due(&mut h, t), [Chore::CheckFirewall]);
        // A burst of joins: the next change waits for the gap.
        h.handle_state_changed(t + 5 * MS);
        assert_eq!(h.poll_timeout(), t + 20 * MS);
        assert_eq!(due(&mut h, t + 20 * MS), [Chore::CheckFirewall]);
        assert_eq!(h.poll_timeout(), t + 20 * MS + S, "then once a second");
    }

    #[test]
    fn due_chores_come_in_the_order_of_the_old_loop_once_each() {
        let (t0, mut h) = keeper();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let t = t0 + 10 * S;
        h.handle_redeemed(t0, None);
        h.handle_invites(t0, wall, Some(wall));
        h.handle_saved(t0, false);
        assert_eq!(
            due(&mut h, t),
            [
                Chore::CompleteSwaps,
                Chore::RecordEndpoints,
                Chore::Prune,
                Chore::RetrySave,
                Chore::CheckFirewall
            ]
        );
        assert!(h.poll_timeout() > t, "nothing is due twice in one round");
    }

    #[test]
    fn a_sleeping_shell_is_woken_only_for_something_sooner() {
        let (t0, mut h) = keeper();
        assert!(!h.needs_wake(), "not asleep");
        assert_eq!(h.arm(), t0 + S);
        // A save failure retries in a second: not sooner than the firewall.
        h.handle_saved(t0 + 100 * MS, false);
        assert!(!h.needs_wake());
        h.handle_redeemed(t0 + 200 * MS, Some(t0 + 30 * S));
        assert!(h.needs_wake(), "a joiner waits");
        assert_eq!(h.arm(), t0 + 200 * MS);
        assert!(!h.needs_wake());
    }

    #[test]
    fn the_deadline_is_never_later_than_the_next_endpoint_recording() {
        let t0 = Instant::now();
        let t = Timings {
            firewall: 3600 * S,
            ..Timings::default()
        };
        let mut h = Housekeeper::new(t0, t);
        assert_eq!(h.poll_timeout(), t0 + 10 * S);
        assert_eq!(due(&mut h, t0 + 10 * S), [Chore::RecordEndpoints]);
        assert_eq!(h.poll_timeout(), t0 + 20 * S);
    }
}
