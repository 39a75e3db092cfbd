//! Simulation of the join on a fake clock: the test is the world. It
//! answers each action the machine asks for at a time of its choosing, and
//! checks what comes out and when. No sockets, no device, no root.

use super::*;
use crate::control::tunnel::{Admitted, Declined};
use std::collections::VecDeque;

const ENDPOINT: &str = "192.0.2.1:51820";
const ASSIGNED: &str = "10.77.0.2/24";
const TIMEOUT: Duration = Duration::from_secs(20);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn plan(t0: Instant, udp: bool, websocket: bool) -> Plan {
    Plan {
        endpoint: ENDPOINT.parse().unwrap(),
        udp,
        websocket,
        assigned: ASSIGNED.parse().unwrap(),
        deadline: t0 + TIMEOUT,
        timeout: TIMEOUT,
    }
}

fn ways(n: usize) -> Vec<Way> {
    let names = ["direct", "via proxy"];
    (0..n)
        .map(|i| Way {
            shown: format!("wss://192.0.2.1/…#{i}"),
            named: format!("wss://192.0.2.1/…#{i} {}", names[i.min(1)]),
            path: format!("wss {}", names[i.min(1)]),
        })
        .collect()
}

fn admitted(address: &str) -> Admitted {
    Admitted {
        address: address.parse().unwrap(),
        name: Some("b".into()),
        pending: vec![],
    }
}

/// Nothing reached the hub's API (no handshake yet, say).
fn no_answer() -> Declined {
    ControlError::Timeout("10.77.0.1:51821".into()).into()
}

/// The hub took the request but did not answer in time (busy, or the
/// answer was lost).
fn lost_answer() -> Declined {
    ControlError::Unanswered("10.77.0.1:51821".into()).into()
}

fn refused(status: u16, message: &str) -> Declined {
    ControlError::Refused {
        status,
        message: message.into(),
    }
    .into()
}

/// The machine on a fake clock, with what came out of it so far.
struct Sim {
    m: JoinMachine,
    t0: Instant,
    now: Instant,
    actions: VecDeque<Action>,
    progress: Vec<String>,
    end: Option<Result<Chosen, SiteError>>,
}

impl Sim {
    fn new(udp: bool, websocket: bool) -> Sim {
        let t0 = Instant::now();
        Sim::with_plan(plan(t0, udp, websocket), t0)
    }

    fn with_plan(plan: Plan, t0: Instant) -> Sim {
        let mut s = Sim {
            m: JoinMachine::new(plan, t0),
            t0,
            now: t0,
            actions: VecDeque::new(),
            progress: vec![],
            end: None,
        };
        s.drain();
        s
    }

    /// Moves the fake clock to `t` after the start.
    fn at(&mut self, t: Duration) -> Instant {
        assert!(self.t0 + t >= self.now, "the clock goes forward");
        self.now = self.t0 + t;
        self.now
    }

    /// Collects what the machine put out.
    fn drain(&mut self) {
        while let Some(a) = self.m.poll_transmit() {
            self.actions.push_back(a);
        }
        while let Some(e) = self.m.poll_event() {
            match e {
                Event::Progress(p) => self.progress.push(p),
                Event::Up(c) => self.end = Some(Ok(c)),
                Event::Failed(e) => self.end = Some(Err(e)),
            }
        }
    }

    /// The next action, which must be there.
    fn next(&mut self) -> Action {
        self.actions
            .pop_front()
            .unwrap_or_else(|| panic!("no action at {:?}", self.now - self.t0))
    }

    fn no_action(&mut self) {
        assert!(self.actions.is_empty(), "{:?}", self.actions);
    }

    fn expect_ping(&mut self) -> Patience {
        match self.next() {
            Action::Ping(p) => p,
            other => panic!("not a ping: {other:?}"),
        }
    }

    fn expect_redeem(&mut self) -> Patience {
        match self.next() {
            Action::Redeem(p) => p,
            other => panic!("not a redeem: {other:?}"),
        }
    }

    fn expect_dial(&mut self) -> (usize, Duration) {
        match self.next() {
            Action::Dial { index, timeout } => (index, timeout),
            other => panic!("not a dial: {other:?}"),
        }
    }

    fn expect(&mut self, want: &str) {
        let got = format!("{:?}", self.next());
        assert!(got.starts_with(want), "wanted {want}, got {got}");
    }

    fn ping(&mut self, t: Duration, result: Result<(), ControlError>) {
        let now = self.at(t);
        self.m.handle_ping(now, result);
        self.drain();
    }

    fn handshake(&mut self, t: Duration, seen: bool) {
        let now = self.at(t);
        self.m.handle_handshake(now, seen);
        self.drain();
    }

    fn ways(&mut self, t: Duration, n: usize) {
        let now = self.at(t);
        self.m.handle_ways(now, ways(n));
        self.drain();
    }

    fn dial(&mut self, t: Duration, index: usize, result: Result<(), TransportError>) {
        let now = self.at(t);
        self.m.handle_dial(now, index, result);
        self.drain();
    }

    fn redeem(&mut self, t: Duration, result: Result<Admitted, Declined>) {
        let now = self.at(t);
        self.m.handle_redeem(now, result);
        self.drain();
    }

    fn switched(&mut self, t: Duration) {
        let now = self.at(t);
        self.m.handle_switched(now);
        self.drain();
    }

    /// Runs the timer if it is due at `t`.
    fn tick(&mut self, t: Duration) {
        let now = self.at(t);
        if self.m.poll_timeout().is_some_and(|w| w <= now) {
            self.m.handle_timeout(now);
        }
        self.drain();
    }

    fn timeout_in(&self) -> Option<Duration> {
        self.m.poll_timeout().map(|w| w - self.t0)
    }

    fn failed(&mut self) -> SiteError {
        match self.end.take() {
            Some(Err(e)) => e,
            other => panic!("not failed: {other:?}"),
        }
    }

    /// From a redeem that was admitted: the switch, then traffic.
    fn switch_and_flow(&mut self, t: Duration) -> Chosen {
        self.expect("Switch");
        self.switched(t);
        self.expect_ping();
        self.ping(t, Ok(()));
        match self.end.take() {
            Some(Ok(c)) => c,
            other => panic!("not up: {other:?}"),
        }
    }

    /// Probes over UDP until `t`, without a handshake.
    fn probe_until(&mut self, t: Duration) {
        let mut at = self.now - self.t0;
        while at < t {
            self.expect_ping();
            at = (at + ms(100)).min(t);
            self.ping(at, Err(no_answer().error));
            self.expect("CheckHandshake");
            self.handshake(at, false);
        }
    }

    /// Fails redeems (`answer` each time) with the handshake `seen`,
    /// retrying every 50 ms, until `t` or the end.
    fn redeem_failing_until(&mut self, t: Duration, seen: bool, answer: fn() -> Declined) {
        let mut at = self.now - self.t0;
        while self.end.is_none() && at <= t {
            self.expect_redeem();
            self.redeem(at, Err(answer()));
            self.expect("CheckHandshake");
            self.handshake(at, seen);
            at += ms(50);
            self.tick(at);
        }
    }
}

#[test]
fn a_udp_handshake_within_the_bound_takes_udp() {
    let mut s = Sim::new(true, true);
    assert_eq!(s.progress, ["trying UDP to 192.0.2.1:51820"]);
    let probe = s.expect_ping();
    assert_eq!(probe.connect, ms(100));
    s.ping(ms(100), Err(no_answer().error));
    s.expect("CheckHandshake");
    s.handshake(ms(100), false);
    s.expect_ping();
    s.ping(ms(200), Err(no_answer().error));
    s.expect("CheckHandshake");
    s.handshake(ms(200), true);
    s.expect("Use(Udp)");
    assert_eq!(s.progress[1], "handshaking with 192.0.2.1:51820");
    s.expect_redeem();
    s.redeem(ms(300), Ok(admitted(ASSIGNED)));
    assert_eq!(s.switch_and_flow(ms(320)), Chosen::Udp);
}

#[test]
fn no_udp_handshake_within_one_second_tries_websocket() {
    let mut s = Sim::new(true, true);
    s.probe_until(ms(900));
    // Not yet at 900 ms: UDP still has time.
    s.expect_ping();
    s.ping(ms(999), Err(no_answer().error));
    s.expect("CheckHandshake");
    s.handshake(ms(999), false);
    s.expect_ping();
    s.ping(ms(1000), Err(no_answer().error));
    s.expect("CheckHandshake");
    s.handshake(ms(1000), false);
    s.expect("ListWays");
    s.ways(ms(1000), 2);
    assert_eq!(
        s.progress.last().unwrap(),
        "connecting to wss://192.0.2.1/…#0"
    );
    let (i, timeout) = s.expect_dial();
    assert_eq!(i, 0);
    assert_eq!(timeout, TIMEOUT - ms(1000), "what is left of the bring-up");
}

#[test]
fn a_deadline_shorter_than_the_udp_bound_ends_the_probing() {
    let t0 = Instant::now();
    let mut p = plan(t0, true, true);
    p.deadline = t0 + ms(400);
    let mut s = Sim::with_plan(p, t0);
    s.probe_until(ms(400));
    s.expect("ListWays");
    s.ways(ms(400), 1);
    let (_, timeout) = s.expect_dial();
    assert_eq!(timeout, ms(500), "a way gets 500 ms even past the deadline");
}

#[test]
fn a_udp_only_token_redeems_at_once_without_probing() {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    assert_eq!(s.progress, ["handshaking with 192.0.2.1:51820"]);
    let p = s.expect_redeem();
    assert_eq!((p.connect, p.total), (ms(700), ANSWER_WITHIN));
    s.no_action();
}

#[test]
fn websocket_only_dials_at_once() {
    let mut s = Sim::new(false, true);
    assert!(s.progress.is_empty(), "{:?}", s.progress);
    s.expect("ListWays");
    s.ways(ms(0), 1);
    assert_eq!(s.expect_dial().0, 0);
}

/// From the start of a WebSocket-only join to the first dial.
fn dialing(n: usize) -> Sim {
    let mut s = Sim::new(false, true);
    s.expect("ListWays");
    s.ways(ms(0), n);
    assert_eq!(s.expect_dial().0, 0);
    s
}

#[test]
fn a_slow_direct_dial_starts_the_proxy_after_the_stagger() {
    let mut s = dialing(2);
    assert_eq!(s.timeout_in(), Some(STAGGER));
    s.tick(ms(299));
    s.no_action();
    s.tick(ms(300));
    assert_eq!(s.expect_dial(), (1, TIMEOUT - ms(300)));
    assert_eq!(s.timeout_in(), None, "no third way");
    // The proxy connects first: its way is the route.
    s.dial(ms(450), 1, Ok(()));
    s.expect("Use(Way(1))");
    assert_eq!(s.progress.last().unwrap(), "handshaking over wss via proxy");
    s.expect_redeem();
    // The direct way answering late changes nothing.
    s.dial(ms(500), 0, Ok(()));
    s.no_action();
}

#[test]
fn a_first_way_that_fails_fast_starts_the_second_at_once() {
    let mut s = dialing(2);
    s.dial(ms(40), 0, Err(TransportError::Timeout("direct".into())));
    assert_eq!(s.expect_dial(), (1, TIMEOUT - ms(40)));
    s.dial(ms(90), 1, Ok(()));
    s.expect("Use(Way(1))");
}

#[test]
fn when_every_way_fails_there_is_no_path() {
    let mut s = dialing(2);
    s.tick(ms(300));
    s.expect_dial();
    s.dial(ms(310), 1, Err(TransportError::Timeout("proxy".into())));
    assert!(s.end.is_none(), "the direct way is still out");
    s.dial(ms(900), 0, Err(TransportError::Timeout("direct".into())));
    let e = s.failed();
    let text = e.to_string();
    assert!(matches!(e, SiteError::NoPath(_)), "{e:?}");
    assert!(
        text.contains("#1 via proxy: no connection to proxy"),
        "{text}"
    );
    assert!(
        text.contains("#0 direct: no connection to direct"),
        "{text}"
    );
    assert!(!e.is_input());
}

#[test]
fn a_wrong_pin_ends_the_dialing_as_bad_input() {
    let mut s = dialing(2);
    let pin = TransportError::PinMismatch {
        expected: "aa".into(),
        got: "bb".into(),
    };
    s.dial(ms(30), 0, Err(pin));
    let e = s.failed();
    assert!(e.is_input(), "{e:?}");
    s.no_action();
}

#[test]
fn a_lost_answer_is_asked_again_and_admitted() {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    let first = s.expect_redeem();
    // Connected, but the answer never came within ANSWER_WITHIN.
    s.redeem(ms(3000), Err(lost_answer()));
    s.expect("CheckHandshake");
    s.handshake(ms(3000), true);
    assert_eq!(s.progress.last().unwrap(), "redeeming the invite");
    assert_eq!(s.timeout_in(), Some(ms(3050)));
    s.tick(ms(3049));
    s.no_action();
    s.tick(ms(3050));
    let again = s.expect_redeem();
    assert_eq!(
        (again.connect, again.total),
        (first.connect, first.total),
        "the re-ask has the same patience"
    );
    s.redeem(ms(3100), Ok(admitted(ASSIGNED)));
    assert_eq!(s.switch_and_flow(ms(3100)), Chosen::Udp);
}

#[test]
fn a_handshake_without_a_connection_for_six_seconds_means_the_token_was_used() {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    s.redeem_failing_until(ms(6000), true, no_answer);
    assert!(s.end.is_none(), "not used at 6 s: the bound is exclusive");
    s.redeem_failing_until(ms(6100), true, no_answer);
    let e = s.failed();
    assert!(matches!(e, SiteError::AlreadyUsed(_)), "{e:?}");
    assert!(e.is_input());
    assert_eq!(
        s.progress
            .iter()
            .filter(|p| *p == "redeeming the invite")
            .count(),
        1,
        "{:?}",
        s.progress
    );
}

#[test]
fn the_six_seconds_count_from_the_first_handshake_seen() {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    s.redeem_failing_until(ms(2000), false, no_answer);
    s.redeem_failing_until(ms(8000), true, no_answer);
    assert!(s.end.is_none(), "a handshake first seen at 2.05 s");
    s.redeem_failing_until(ms(8200), true, no_answer);
    assert!(matches!(s.failed(), SiteError::AlreadyUsed(_)));
}

#[test]
fn a_connected_but_slow_hub_is_never_taken_for_a_used_token() {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    s.redeem_failing_until(ms(100), true, lost_answer);
    // From then on nothing connects, but the hub was reached once.
    s.redeem_failing_until(TIMEOUT, true, no_answer);
    let e = s.failed();
    assert!(matches!(e, SiteError::Unreachable { .. }), "{e:?}");
}

#[test]
fn without_any_handshake_the_deadline_makes_it_unreachable() {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    s.redeem_failing_until(TIMEOUT - ms(50), false, no_answer);
    assert!(s.end.is_none());
    s.redeem_failing_until(TIMEOUT, false, no_answer);
    let e = s.failed();
    assert_eq!(
        e.to_string(),
        "server unreachable: no WireGuard handshake with 192.0.2.1:51820 within 20s (is `tunnel serve` running there, and UDP port 51820 open?)"
    );
    assert!(!e.is_input());
}

#[test]
fn redeems_near_the_deadline_get_only_what_is_left() {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    s.redeem_failing_until(TIMEOUT - ms(1000), false, no_answer);
    let p = s.expect_redeem();
    assert_eq!(p.connect, ms(700));
    assert_eq!(
        p.total,
        ms(950),
        "the 3 s answer bound is cut to the deadline"
    );
}

#[test]
fn a_refusal_is_final() {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    s.expect_redeem();
    s.redeem(
        ms(20),
        Err(refused(403, "this invite was already redeemed")),
    );
    let e = s.failed();
    assert_eq!(
        e.to_string(),
        "the server refused this token: this invite was already redeemed"
    );
    assert!(e.is_input());
    s.no_action();
}

#[test]
fn a_busy_hub_is_asked_again_not_refused() {
    for status in [429, 503] {
        let mut s = Sim::new(true, false);
        s.expect("Use(Udp)");
        s.expect_redeem();
        s.redeem(ms(20), Err(refused(status, "busy")));
        assert!(s.end.is_none(), "{status}");
        s.expect("CheckHandshake");
    }
}

#[test]
fn an_address_other_than_the_tokens_is_a_mismatch() {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    s.expect_redeem();
    s.redeem(ms(20), Ok(admitted("10.77.0.9/24")));
    let e = s.failed();
    assert_eq!(
        e.to_string(),
        "the server assigned 10.77.0.9/24 but the token says 10.77.0.2/24"
    );
    s.no_action();
}

/// The hub refuses our timestamp with a 401 that says its time.
fn skewed(hub_time: u64) -> Declined {
    Declined {
        hub_time: Some(hub_time),
        ..refused(
            401,
            "the request's clock is 300 s away from the hub's; check the clocks",
        )
    }
}

#[test]
fn a_clock_five_minutes_off_signs_again_with_the_hubs_time() {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    let first = s.expect_redeem();
    s.redeem(ms(20), Err(skewed(1_000_300)));
    match s.next() {
        Action::AdjustClock { hub_time } => assert_eq!(hub_time, 1_000_300),
        other => panic!("{other:?}"),
    }
    let again = s.expect_redeem();
    assert_eq!(again.total, first.total);
    s.redeem(ms(40), Ok(admitted(ASSIGNED)));
    assert_eq!(s.switch_and_flow(ms(40)), Chosen::Udp);
}

#[test]
fn a_clock_still_refused_after_signing_again_is_a_refusal() {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    s.expect_redeem();
    s.redeem(ms(20), Err(skewed(1_000_300)));
    s.expect("AdjustClock");
    s.expect_redeem();
    s.redeem(ms(40), Err(skewed(1_000_300)));
    let e = s.failed();
    assert!(
        matches!(e, SiteError::Refused(ref m) if m.contains("clock")),
        "{e:?}"
    );
}

#[test]
fn each_attempt_may_sign_again_once() {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    s.expect_redeem();
    s.redeem(ms(20), Err(skewed(1)));
    s.expect("AdjustClock");
    s.expect_redeem();
    s.redeem(ms(3020), Err(lost_answer()));
    s.expect("CheckHandshake");
    s.handshake(ms(3020), true);
    s.tick(ms(3070));
    s.expect_redeem();
    // A new attempt: the hub's clock moved (it restarted, say).
    s.redeem(ms(3090), Err(skewed(2)));
    s.expect("AdjustClock");
}

/// Admitted at 100 ms over UDP, switched; the first ping is out.
fn switched() -> Sim {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    s.expect_redeem();
    s.redeem(ms(100), Ok(admitted(ASSIGNED)));
    s.expect("Switch");
    s.switched(ms(110));
    assert_eq!(
        s.progress.last().unwrap(),
        "waiting for traffic with our own key"
    );
    let p = s.expect_ping();
    assert_eq!((p.connect, p.total), (ms(100), ANSWER_WITHIN));
    s
}

#[test]
fn a_hub_that_restarts_mid_swap_is_waited_for() {
    let mut s = switched();
    // The hub is down: pings fail, and are sent again every 20 ms.
    let mut at = ms(210);
    for _ in 0..50 {
        s.ping(at, Err(no_answer().error));
        assert_eq!(s.timeout_in(), Some(at + ms(20)));
        at += ms(20);
        s.tick(at);
        s.expect_ping();
        at += ms(100);
    }
    assert!(s.end.is_none());
    // Back, with our key from its state: up.
    s.ping(at, Ok(()));
    assert!(matches!(s.end, Some(Ok(Chosen::Udp))));
}

#[test]
fn a_hub_that_never_comes_back_after_the_swap_is_no_flow() {
    let mut s = switched();
    s.ping(TIMEOUT - ms(1), Err(no_answer().error));
    assert!(s.end.is_none(), "there is still time");
    s.tick(TIMEOUT + ms(19));
    s.expect_ping();
    s.ping(TIMEOUT + ms(19), Err(no_answer().error));
    let e = s.failed();
    assert_eq!(
        e.to_string(),
        "the server admitted this host but traffic does not flow"
    );
}

#[test]
fn the_machine_sleeps_while_it_only_waits_for_answers() {
    let mut s = Sim::new(true, true);
    assert_eq!(s.timeout_in(), None, "probing waits for the probe");
    s.expect_ping();
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    s.expect_redeem();
    assert_eq!(s.timeout_in(), None, "a redeem is out");
    s.tick(ms(10_000));
    s.no_action();
}

#[test]
fn answers_out_of_turn_change_nothing() {
    let mut s = Sim::new(true, false);
    s.expect("Use(Udp)");
    s.expect_redeem();
    // Nothing asked for these.
    s.ping(ms(10), Ok(()));
    s.dial(ms(10), 0, Ok(()));
    s.switched(ms(10));
    s.handshake(ms(10), true);
    s.no_action();
    assert!(s.end.is_none());
    s.redeem(ms(20), Ok(admitted(ASSIGNED)));
    assert_eq!(s.switch_and_flow(ms(30)), Chosen::Udp);
}
