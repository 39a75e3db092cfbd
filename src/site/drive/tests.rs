//! The driver on tokio's paused clock, against the fake device and a fake
//! hub: the machine's decisions as they play out in time, the device's key
//! and the saved state, each crash point of the join and the run after it.

use super::*;
use crate::control::tunnel::Admitted;
use crate::keys::PrivateKey;
use crate::site::Invitation;
use crate::site::join::joined_state;
use crate::site::machine::{JoinMachine, STAGGER, UDP_BOUND};
use crate::site::own_key;
use crate::state::{Endpoint, JoinedState};
use crate::store::StateDir;
use crate::token::Token;
use crate::transport::{JoinTransport, Path};
use crate::wg::WgDevice;
use crate::wg::fake::FakeWg;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::time::Instant as TokioInstant;

const IFACE: &str = "wgt-fake";
const TIMEOUT: Duration = Duration::from_secs(20);

fn token(websocket: bool) -> Token {
    Token {
        server_public_key: PrivateKey::generate().public_key(),
        invite_key: PrivateKey::generate(),
        port: 51820,
        subnet: "10.77.0.0/24".parse().unwrap(),
        subnet6: None,
        assigned: "10.77.0.2".parse().unwrap(),
        server_address: "10.77.0.1".parse().unwrap(),
        expires: 2_000_000_000,
        endpoint_hint: None,
        udp: true,
        websocket: websocket.then(|| crate::reach::WsOffer {
            target: crate::reach::WsTarget::Plain { port: 8080 },
            path: "/secret".into(),
        }),
    }
}

fn invitation(token: &Token) -> Invitation<'_> {
    Invitation {
        token,
        server: "192.0.2.1",
        endpoint: "192.0.2.1:51820".parse().unwrap(),
        iface: IFACE,
        mtu: None,
        backend: crate::wg::BackendChoice::Userspace,
        transport: JoinTransport::Auto,
        proxy: None,
        proxy_ca: None,
        timeout: TIMEOUT,
        routes: &[],
        masquerade: false,
        transparent: false,
        snat_public: false,
        name: Some("b"),
        attach_label: None,
        advertise_endpoint: None,
    }
}

/// The hub, as a joining site sees it through the tunnel; it outlives a
/// join that crashed, as a real hub does.
#[derive(Default)]
struct Hub {
    /// UDP does not get through (a WebSocket-only network).
    udp_blocked: AtomicBool,
    /// Answers to redeems that are lost after the hub acted on them.
    lose: AtomicUsize,
    /// The hub's clock, while ours is off and not yet adjusted.
    skew: Mutex<Option<u64>>,
    /// Refuses every redeem with this.
    refuse: Mutex<Option<String>>,
    /// Whose key the invite was redeemed for.
    ledger: Mutex<Option<PublicKey>>,
    /// After the switch, the hub is down for this long (it restarts).
    restart: Mutex<Option<Duration>>,
    down_until: Mutex<Option<TokioInstant>>,
}

impl Hub {
    fn down(&self) -> bool {
        self.down_until
            .lock()
            .unwrap()
            .is_some_and(|t| TokioInstant::now() < t)
    }
}

/// One WebSocket way: how long it takes, and whether it connects.
type DialScript = (Duration, bool);

struct Fake<'a> {
    hub: &'a Hub,
    inv: &'a Invitation<'a>,
    device: FakeWg,
    store: &'a StateDir,
    own: PrivateKey,
    ways: Vec<DialScript>,
    crash_at: Option<&'static str>,
    t0: TokioInstant,
    log: Mutex<Vec<(Duration, String)>>,
    used: Mutex<Option<Chosen>>,
}

impl<'a> Fake<'a> {
    fn new(hub: &'a Hub, inv: &'a Invitation<'a>, store: &'a StateDir, own: PrivateKey) -> Self {
        let device = FakeWg::default();
        device.state.lock().unwrap().public_key = Some(inv.token.invite_key.public_key());
        device
            .state
            .lock()
            .unwrap()
            .peers
            .push(crate::wg::PeerStatus {
                public_key: inv.token.server_public_key,
                endpoint: Some(inv.endpoint),
                allowed_ips: vec![],
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                keepalive: None,
            });
        Fake {
            hub,
            inv,
            device,
            store,
            own,
            ways: vec![],
            crash_at: None,
            t0: TokioInstant::now(),
            log: Mutex::default(),
            used: Mutex::default(),
        }
    }

    fn note(&self, what: String) {
        self.log.lock().unwrap().push((self.t0.elapsed(), what));
    }

    /// When `what` happened first, after the start.
    fn when(&self, what: &str) -> Option<Duration> {
        let log = self.log.lock().unwrap();
        log.iter().find(|(_, w)| w == what).map(|(t, _)| *t)
    }

    fn count(&self, what: &str) -> usize {
        let log = self.log.lock().unwrap();
        log.iter().filter(|(_, w)| w == what).count()
    }

    fn hub_handshakes(&self) {
        self.device.handshake(&self.inv.token.server_public_key);
    }

    fn reachable(&self) -> bool {
        let used = *self.used.lock().unwrap();
        !self.hub.down()
            && (used != Some(Chosen::Udp) || !self.hub.udp_blocked.load(Ordering::SeqCst))
    }
}

#[async_trait]
impl World for Fake<'_> {
    type Conn = ();

    async fn ping(&self, patience: Patience) -> Result<(), ControlError> {
        self.note("ping".into());
        let udp =
            self.used.lock().unwrap().is_none() && !self.hub.udp_blocked.load(Ordering::SeqCst);
        if udp || (self.used.lock().unwrap().is_some() && self.reachable()) {
            self.hub_handshakes();
            tokio::time::sleep(Duration::from_millis(5)).await;
            if !self.hub.down() {
                return Ok(());
            }
        }
        tokio::time::sleep(patience.connect).await;
        Err(ControlError::Timeout("10.77.0.1:51821".into()))
    }

    async fn handshake(&self) -> Result<bool, SiteError> {
        let peers = self.device.peers().await?;
        Ok(peers.iter().any(|p| p.last_handshake.is_some()))
    }

    fn ways(&self) -> Result<Vec<Way>, SiteError> {
        self.note("ways".into());
        Ok((0..self.ways.len())
            .map(|i| Way {
                shown: format!("ws://192.0.2.1:8080/…#{i}"),
                named: format!("way {i}"),
                path: format!("ws way {i}"),
            })
            .collect())
    }

    async fn dial(&self, index: usize, _timeout: Duration) -> Result<(), TransportError> {
        self.note(format!("dial {index}"));
        let (after, ok) = self.ways[index];
        tokio::time::sleep(after).await;
        if ok {
            Ok(())
        } else {
            Err(TransportError::Timeout(format!("way {index}")))
        }
    }

    async fn use_way(&self, chosen: Chosen, _conn: Option<()>) -> Result<(), SiteError> {
        self.note(format!("use {chosen:?}"));
        *self.used.lock().unwrap() = Some(chosen);
        Ok(())
    }

    async fn redeem(&self, patience: Patience) -> Result<Admitted, Declined> {
        self.note("redeem".into());
        if !self.reachable() {
            tokio::time::sleep(patience.connect).await;
            return Err(ControlError::Timeout("10.77.0.1:51821".into()).into());
        }
        self.hub_handshakes();
        tokio::time::sleep(Duration::from_millis(5)).await;
        if let Some(hub_time) = *self.hub.skew.lock().unwrap() {
            return Err(Declined {
                error: ControlError::Refused {
                    status: 401,
                    message: "the request's clock is 300 s away from the hub's; check the clocks"
                        .into(),
                },
                hub_time: Some(hub_time),
            });
        }
        if let Some(why) = self.hub.refuse.lock().unwrap().clone() {
            let refused = ControlError::Refused {
                status: 403,
                message: why,
            };
            return Err(refused.into());
        }
        let mine = self.own.public_key();
        let admitted = *self.hub.ledger.lock().unwrap().get_or_insert(mine);
        if admitted != mine {
            let used = ControlError::Refused {
                status: 403,
                message: "this invite was already redeemed".into(),
            };
            return Err(used.into());
        }
        if self.hub.lose.load(Ordering::SeqCst) > 0 {
            self.hub.lose.fetch_sub(1, Ordering::SeqCst);
            tokio::time::sleep(patience.total).await;
            return Err(ControlError::Unanswered("10.77.0.1:51821".into()).into());
        }
        Ok(Admitted {
            address: self.inv.token.assigned_network(),
            name: Some("b".into()),
            pending: vec![],
        })
    }

    fn adjust_clock(&self, hub_time: u64) {
        self.note(format!("adjust {hub_time}"));
        *self.hub.skew.lock().unwrap() = None;
    }

    async fn switch(&self, admitted: Admitted) -> Result<(), SiteError> {
        self.note("switch".into());
        let joined = joined_state(self.inv, Path::Udp, 1420, &self.own, &admitted);
        self.store.save(IFACE, &Endpoint::Joined(joined))?;
        self.device.set_private_key(&self.own).await?;
        if let Some(d) = *self.hub.restart.lock().unwrap() {
            *self.hub.down_until.lock().unwrap() = Some(TokioInstant::now() + d);
        }
        Ok(())
    }

    fn own_key(&self) -> PublicKey {
        self.own.public_key()
    }

    fn crash_point(&self, step: &str) -> Result<(), SiteError> {
        if self.crash_at == Some(step) {
            self.note(format!("crash at {step}"));
            return Err(SiteError::Output(std::io::Error::other(format!(
                "killed at {step}"
            ))));
        }
        Ok(())
    }
}

#[derive(Default)]
struct Steps(Mutex<Vec<String>>);

impl Progress for Steps {
    fn step(&self, message: &str) {
        self.0.lock().unwrap().push(message.to_owned());
    }

    fn done(&self) {}
}

async fn join(fake: &Fake<'_>, steps: &Steps) -> Result<Chosen, SiteError> {
    let deadline = now() + fake.inv.timeout;
    let machine = JoinMachine::new(fake.inv.plan(deadline), now());
    drive(machine, fake, steps).await
}

fn saved(store: &StateDir) -> Option<JoinedState> {
    match store.load(IFACE).unwrap() {
        Some(Endpoint::Joined(j)) => Some(j),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_udp_join_switches_the_device_to_its_own_key_and_saves_the_site() {
    let (tmp, hub, token) = (tempfile::tempdir().unwrap(), Hub::default(), token(false));
    let (inv, store) = (invitation(&token), StateDir::new(tmp.path()));
    let own = PrivateKey::generate();
    let fake = Fake::new(&hub, &inv, &store, own.clone());
    let steps = Steps::default();
    assert_eq!(join(&fake, &steps).await.unwrap(), Chosen::Udp);
    let state = fake.device.state.lock().unwrap().public_key;
    assert_eq!(state, Some(own.public_key()), "the device has our key");
    let joined = saved(&store).expect("saved before the switch");
    assert_eq!(joined.private_key.public_key(), own.public_key());
    assert_eq!(joined.address, token.assigned_network());
    assert_eq!(*hub.ledger.lock().unwrap(), Some(own.public_key()));
    assert_eq!(
        *steps.0.lock().unwrap(),
        [
            "handshaking with 192.0.2.1:51820",
            "waiting for traffic with our own key"
        ]
        .map(str::to_owned),
        "admitted at the first ask: no handshake was waited for"
    );
}

#[tokio::test(start_paused = true)]
async fn websocket_is_dialed_after_a_second_of_udp_and_the_proxy_after_the_stagger() {
    let (tmp, hub, token) = (tempfile::tempdir().unwrap(), Hub::default(), token(true));
    hub.udp_blocked.store(true, Ordering::SeqCst);
    let (inv, store) = (invitation(&token), StateDir::new(tmp.path()));
    let mut fake = Fake::new(&hub, &inv, &store, PrivateKey::generate());
    // The direct way hangs; the proxy connects in 80 ms.
    fake.ways = vec![
        (Duration::from_secs(3600), true),
        (Duration::from_millis(80), true),
    ];
    let steps = Steps::default();
    assert_eq!(join(&fake, &steps).await.unwrap(), Chosen::Way(1));
    let dial0 = fake.when("dial 0").unwrap();
    let dial1 = fake.when("dial 1").unwrap();
    assert!(dial0 >= UDP_BOUND, "UDP had its second: {dial0:?}");
    assert!(dial0 < UDP_BOUND + Duration::from_millis(150), "{dial0:?}");
    assert_eq!(dial1 - dial0, STAGGER);
    assert_eq!(
        fake.when("use Way(1)"),
        Some(dial1 + Duration::from_millis(80))
    );
    let steps = steps.0.lock().unwrap();
    assert_eq!(steps[0], "trying UDP to 192.0.2.1:51820");
    assert_eq!(steps[1], "connecting to ws://192.0.2.1:8080/…#0");
    assert_eq!(steps[2], "handshaking over ws way 1");
}

#[tokio::test(start_paused = true)]
async fn a_way_that_fails_fast_hands_over_at_once_and_all_failing_is_no_path() {
    let (tmp, hub, token) = (tempfile::tempdir().unwrap(), Hub::default(), token(true));
    hub.udp_blocked.store(true, Ordering::SeqCst);
    let (inv, store) = (invitation(&token), StateDir::new(tmp.path()));
    let mut fake = Fake::new(&hub, &inv, &store, PrivateKey::generate());
    fake.ways = vec![
        (Duration::from_millis(20), false),
        (Duration::from_millis(40), false),
    ];
    let e = join(&fake, &Steps::default()).await.unwrap_err();
    assert_eq!(
        fake.when("dial 1").unwrap() - fake.when("dial 0").unwrap(),
        Duration::from_millis(20)
    );
    assert_eq!(
        e.to_string(),
        "server unreachable: no WireGuard handshake over UDP, and no WebSocket connection (way 0: no connection to way 0 within the time allowed; way 1: no connection to way 1 within the time allowed)"
    );
    assert_eq!(fake.count("redeem"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_lost_answer_is_asked_again_and_the_hub_admits_the_same_key() {
    let (tmp, hub, token) = (tempfile::tempdir().unwrap(), Hub::default(), token(false));
    hub.lose.store(1, Ordering::SeqCst);
    let (inv, store) = (invitation(&token), StateDir::new(tmp.path()));
    let own = PrivateKey::generate();
    let fake = Fake::new(&hub, &inv, &store, own.clone());
    let started = TokioInstant::now();
    assert_eq!(join(&fake, &Steps::default()).await.unwrap(), Chosen::Udp);
    assert_eq!(fake.count("redeem"), 2);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
        "the lost answer is given up after 3 s, not TCP's backoff: {waited:?}"
    );
    assert_eq!(*hub.ledger.lock().unwrap(), Some(own.public_key()));
}

#[tokio::test(start_paused = true)]
async fn a_clock_five_minutes_off_is_adjusted_to_the_hubs_and_the_join_goes_on() {
    let (tmp, hub, token) = (tempfile::tempdir().unwrap(), Hub::default(), token(false));
    *hub.skew.lock().unwrap() = Some(1_700_000_300);
    let (inv, store) = (invitation(&token), StateDir::new(tmp.path()));
    let fake = Fake::new(&hub, &inv, &store, PrivateKey::generate());
    assert_eq!(join(&fake, &Steps::default()).await.unwrap(), Chosen::Udp);
    assert!(fake.when("adjust 1700000300").is_some());
    assert_eq!(fake.count("redeem"), 2, "signed again once");
    assert!(saved(&store).is_some());
}

#[tokio::test(start_paused = true)]
async fn a_refusal_leaves_the_invite_key_on_the_device_and_saves_nothing() {
    let (tmp, hub, token) = (tempfile::tempdir().unwrap(), Hub::default(), token(false));
    *hub.refuse.lock().unwrap() = Some("the invite expired".into());
    let (inv, store) = (invitation(&token), StateDir::new(tmp.path()));
    let fake = Fake::new(&hub, &inv, &store, PrivateKey::generate());
    let e = join(&fake, &Steps::default()).await.unwrap_err();
    assert!(
        matches!(e, SiteError::Refused(ref m) if m == "the invite expired"),
        "{e:?}"
    );
    let key = fake.device.state.lock().unwrap().public_key;
    assert_eq!(key, Some(token.invite_key.public_key()));
    assert!(saved(&store).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_hub_that_restarts_mid_swap_is_waited_for_until_it_answers() {
    let (tmp, hub, token) = (tempfile::tempdir().unwrap(), Hub::default(), token(false));
    *hub.restart.lock().unwrap() = Some(Duration::from_secs(4));
    let (inv, store) = (invitation(&token), StateDir::new(tmp.path()));
    let fake = Fake::new(&hub, &inv, &store, PrivateKey::generate());
    let started = TokioInstant::now();
    assert_eq!(join(&fake, &Steps::default()).await.unwrap(), Chosen::Udp);
    assert!(started.elapsed() >= Duration::from_secs(4));
    assert!(fake.count("ping") > 10, "pinged while it was down");

    // One that does not come back in time: no flow, the site stays saved.
    let (tmp, hub) = (tempfile::tempdir().unwrap(), Hub::default());
    *hub.restart.lock().unwrap() = Some(Duration::from_secs(60));
    let store = StateDir::new(tmp.path());
    let fake = Fake::new(&hub, &inv, &store, PrivateKey::generate());
    let e = join(&fake, &Steps::default()).await.unwrap_err();
    assert!(matches!(e, SiteError::NoFlow(_)), "{e:?}");
    assert!(saved(&store).is_some(), "`up` brings it back later");
}

/// A join killed at `step`, then run again as `tunnel join` does: from
/// the saved site (then it is `up`'s), else with the pending key.
async fn crash_and_rerun(step: &'static str) -> (PublicKey, Option<PublicKey>, usize) {
    let (tmp, hub, token) = (tempfile::tempdir().unwrap(), Hub::default(), token(false));
    let (inv, store) = (invitation(&token), StateDir::new(tmp.path()));
    let first = own_key(&store, IFACE, &token, PrivateKey::generate).unwrap();
    let mut fake = Fake::new(&hub, &inv, &store, first.clone());
    fake.crash_at = Some(step);
    match join(&fake, &Steps::default()).await {
        Err(SiteError::Output(killed)) => assert!(killed.to_string().contains(step)),
        other => panic!("{step}: {other:?}"),
    }
    let redeems = fake.count("redeem");
    if let Some(j) = saved(&store) {
        // The next run brings the saved site up, with its own key.
        return (
            first.public_key(),
            Some(j.private_key.public_key()),
            redeems,
        );
    }
    let again = own_key(&store, IFACE, &token, PrivateKey::generate).unwrap();
    let fake = Fake::new(&hub, &inv, &store, again.clone());
    join(&fake, &Steps::default())
        .await
        .unwrap_or_else(|e| panic!("the run after a crash at {step}: {e}"));
    assert_eq!(*hub.ledger.lock().unwrap(), Some(again.public_key()));
    (first.public_key(), Some(again.public_key()), redeems)
}

#[tokio::test(start_paused = true)]
async fn each_crash_point_of_the_join_is_resumed_with_the_same_key() {
    for (step, redeems) in [
        ("redeem-sending", 0),
        ("redeem-answered", 1),
        ("key-swapped", 1),
    ] {
        let (first, second, sent) = crash_and_rerun(step).await;
        assert_eq!(sent, redeems, "{step}");
        assert_eq!(
            second,
            Some(first),
            "{step}: the token is redeemed for one key"
        );
    }
}

#[tokio::test]
async fn a_pending_key_is_reused_for_its_own_invite_only() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateDir::new(tmp.path());
    let (a, b) = (token(false), token(false));
    let first = own_key(&store, IFACE, &a, PrivateKey::generate).unwrap();
    let again = own_key(&store, IFACE, &a, || panic!("the pending key is resumed")).unwrap();
    assert_eq!(again.public_key(), first.public_key());
    let other = own_key(&store, IFACE, &b, PrivateKey::generate).unwrap();
    assert_ne!(
        other.public_key(),
        first.public_key(),
        "another token, another key"
    );
    let pending = store.load_pending(IFACE).unwrap().unwrap();
    assert_eq!(pending.invite, b.invite_key.public_key());
}

#[tokio::test(start_paused = true)]
async fn a_join_killed_before_its_key_was_saved_redeems_with_a_new_one() {
    // Killed at "token-parsed" or "iface-created": no pending key, and
    // the hub never heard of this join.
    let (tmp, hub, token) = (tempfile::tempdir().unwrap(), Hub::default(), token(false));
    let (inv, store) = (invitation(&token), StateDir::new(tmp.path()));
    assert!(store.load_pending(IFACE).unwrap().is_none());
    let own = own_key(&store, IFACE, &token, PrivateKey::generate).unwrap();
    let fake = Fake::new(&hub, &inv, &store, own.clone());
    assert_eq!(join(&fake, &Steps::default()).await.unwrap(), Chosen::Udp);
    assert_eq!(*hub.ledger.lock().unwrap(), Some(own.public_key()));
}
