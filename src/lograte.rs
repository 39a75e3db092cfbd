//! Log lines at a bounded rate: the first line of a kind is written, then
//! at most one per interval, each saying how many were held back since
//! the last. A peer that can make the hub refuse a request can make it
//! refuse thousands a second; one log line each would let it fill the
//! disk and drown everything else in the journal, while none at all (as
//! before) hid the flood from the operator.
//!
//! The caller picks the kind (a source address, a reason, or both) and
//! passes the time in, so that tests need no sleeps.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Kinds of lines remembered at once, by default: more than any hub has
/// peers refused within one interval; beyond it, new kinds share one
/// slot, so the memory stays bounded whatever the callers pass.
pub const DEFAULT_KINDS: usize = 1024;

/// A [`LogRate`] shared by the tasks that log through it.
pub type Shared<K> = std::sync::Arc<std::sync::Mutex<LogRate<K>>>;

/// Decides which lines are written.
#[derive(Debug)]
pub struct LogRate<K> {
    every: Duration,
    max_kinds: usize,
    kinds: HashMap<Kind<K>, Slot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Kind<K> {
    One(K),
    /// Every kind that arrived while the map was full.
    Others,
}

#[derive(Debug)]
struct Slot {
    /// When the last line of this kind was written.
    written: Instant,
    held: u64,
}

/// A line to write now, with the count of its kind held back since the
/// last one written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    pub held: u64,
}

impl std::fmt::Display for Write {
    /// What to append to the line: nothing, or "(and K more like it)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.held {
            0 => Ok(()),
            n => write!(f, " (and {n} more like it)"),
        }
    }
}

impl<K: Hash + Eq> LogRate<K> {
    /// At most one line per `every` for each kind, and [`DEFAULT_KINDS`]
    /// kinds remembered.
    pub fn new(every: Duration) -> Self {
        Self::with_kinds(every, DEFAULT_KINDS)
    }

    /// [`LogRate::new`], to share.
    pub fn shared(every: Duration) -> Shared<K> {
        std::sync::Arc::new(std::sync::Mutex::new(Self::new(every)))
    }

    pub fn with_kinds(every: Duration, max_kinds: usize) -> Self {
        Self {
            every,
            max_kinds: max_kinds.max(1),
            kinds: HashMap::new(),
        }
    }

    /// Whether a line of kind `kind` is written at `now`: `Some` with the
    /// count held back before it, or `None` (counted, to be reported with
    /// the next line of this kind that is written).
    pub fn admit(&mut self, kind: K, now: Instant) -> Option<Write> {
        let mut kind = Kind::One(kind);
        if !self.kinds.contains_key(&kind) && self.kinds.len() >= self.max_kinds {
            self.forget_quiet(now);
            if self.kinds.len() >= self.max_kinds {
                kind = Kind::Others;
            }
        }
        match self.kinds.get_mut(&kind) {
            Some(slot) if now.saturating_duration_since(slot.written) < self.every => {
                slot.held += 1;
                None
            }
            Some(slot) => {
                let held = std::mem::take(&mut slot.held);
                slot.written = now;
                Some(Write { held })
            }
            None => {
                self.kinds.insert(
                    kind,
                    Slot {
                        written: now,
                        held: 0,
                    },
                );
                Some(Write { held: 0 })
            }
        }
    }

    /// Drops the kinds whose interval has passed: their next line would be
    /// written anyway. What they held back is lost, which is the price of
    /// bounded memory (the count was never going to be reported unless a
    /// line of that kind came again).
    fn forget_quiet(&mut self, now: Instant) {
        let every = self.every;
        self.kinds
            .retain(|_, slot| now.saturating_duration_since(slot.written) < every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_passes_then_one_per_interval_with_the_count_held_back() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut rate = LogRate::new(Duration::from_secs(10));
        assert_eq!(rate.admit("a", s(0)), Some(Write { held: 0 }));
        for i in 0..500 {
            assert_eq!(rate.admit("a", s(0) + Duration::from_millis(i)), None);
        }
        // Another kind is not held back by the first one's flood.
        assert_eq!(rate.admit("b", s(1)), Some(Write { held: 0 }));
        assert_eq!(rate.admit("a", s(9)), None);
        let w = rate.admit("a", s(10)).unwrap();
        assert_eq!(w, Write { held: 501 });
        assert_eq!(w.to_string(), " (and 501 more like it)");
        assert_eq!(rate.admit("a", s(15)), None);
        assert_eq!(rate.admit("a", s(20)), Some(Write { held: 1 }));
        // A quiet kind starts over with nothing to report.
        let w = rate.admit("b", s(100)).unwrap();
        assert_eq!(w.held, 0);
        assert_eq!(w.to_string(), "");
    }

    #[test]
    fn the_kinds_remembered_are_bounded() {
        let t0 = Instant::now();
        let mut rate = LogRate::with_kinds(Duration::from_secs(10), 3);
        for k in 0..3 {
            assert!(rate.admit(k, t0).is_some());
        }
        // Full: a new kind shares the one slot of the others.
        assert!(rate.admit(3, t0).is_some());
        assert_eq!(rate.admit(4, t0), None);
        assert_eq!(rate.admit(5, t0), None);
        assert_eq!(rate.kinds.len(), 4);
        // Once the old kinds are quiet for an interval they make room.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(rate.admit(6, later), Some(Write { held: 0 }));
        assert_eq!(rate.kinds.len(), 1);
    }
}
