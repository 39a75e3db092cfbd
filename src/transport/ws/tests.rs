//! The listener and the dialer together, over loopback sockets: the
//! bounds as a client meets them (places, handshake time, idle links).

use super::*;
use crate::transport::{HUB_LINK, Relay, TransportError, WsOffer, WsTarget, virtual_addr};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as TMessage;

#[tokio::test]
async fn a_link_carries_datagrams_through_the_listener_and_wrong_paths_get_404() {
    let hub_relay = Relay::new("ws");
    let mut hub_device = hub_relay.attach();
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        hub_relay.clone(),
        "/t/secret".into(),
        None,
        async {
            let _ = stopped.await;
        },
    ));

    let offer = WsOffer {
        target: WsTarget::Plain { port },
        path: "/t/secret".into(),
    };
    let site_relay = Relay::new("ws");
    let mut site_device = site_relay.attach();
    let dialer = Arc::new(Dialer::new(&offer, "127.0.0.1", None).unwrap());
    assert_eq!(dialer.url(), format!("ws://127.0.0.1:{port}/t/secret"));
    assert_eq!(dialer.shown(), format!("ws://127.0.0.1:{port}/t/…"));
    assert!(!format!("{dialer:?}").contains("secret"));
    let _link = Link::spawn(dialer, site_relay.clone(), None);
    let hub_addr = virtual_addr(HUB_LINK);
    // The link is up once the site can send.
    let mut tries = 0;
    while !site_relay.send(&hub_addr, Bytes::from_static(b"hello hub")) {
        tries += 1;
        assert!(tries < 500, "the link never came up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (data, from) = hub_device.recv().await.unwrap();
    assert_eq!(data, Bytes::from_static(b"hello hub"));
    assert!(crate::transport::is_virtual(&from));
    assert!(hub_relay.send(&from, Bytes::from_static(b"hello site")));
    let (data, from_hub) = site_device.recv().await.unwrap();
    assert_eq!((data.as_ref(), from_hub), (&b"hello site"[..], hub_addr));

    // Any other path: a 404, never a WebSocket.
    let wrong = WsOffer {
        target: WsTarget::Plain { port },
        path: "/t/guess".into(),
    };
    let err = Dialer::new(&wrong, "127.0.0.1", None)
        .unwrap()
        .connect(Duration::from_secs(5))
        .await
        .err()
        .expect("a wrong path is refused");
    assert!(format!("{:?}", err).contains("404"), "{err:?}");
    stop.send(()).unwrap();
    server.await.unwrap();
}

/// Bounds that no test reaches unless it means to.
fn roomy() -> Limits {
    Limits {
        total: 64,
        per_source: 64,
        per_loopback: 64,
        handshake: Duration::from_secs(5),
        ping_every: Duration::from_secs(3600),
        idle: Duration::from_secs(3600),
    }
}

const PATH: &str = "/t/secret";

/// A listener on 127.0.0.1 within `limits`; its port and relay.
async fn hub(limits: Limits) -> (u16, Arc<Relay>) {
    let relay = Relay::new("ws");
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(serve_within(
        listener,
        relay.clone(),
        PATH.into(),
        None,
        limits,
        std::future::pending(),
    ));
    (port, relay)
}

/// A TCP connection from loopback address `from` that has sent an
/// upgrade request for `path`.
async fn ask(from: &str, port: u16, path: &str) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut tcp = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    // The hub may have closed a refused connection already.
    let _ = tcp.write_all(request.as_bytes()).await;
    tcp
}

/// The answer's status line; an error when the hub closed first.
async fn answer(tcp: &mut TcpStream) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if tcp.read(&mut b).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    Ok(head.lines().next().unwrap_or_default().to_owned())
}

/// A WebSocket made by hand that never answers a ping and sends
/// nothing, or the error that refused it.
async fn idle_link(from: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut tcp = ask(from, port, PATH).await;
    let status = answer(&mut tcp).await?;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    Ok(tcp)
}

/// Reads until the hub closes `tcp`, at most `within`; what came and
/// when the end came, or `None` if it stayed open.
async fn until_closed(tcp: &mut TcpStream, within: Duration) -> Option<(Vec<u8>, Duration)> {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok()?;
    Some((got, start.elapsed()))
}

async fn links_become(relay: &Relay, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while relay.links() != n {
        assert!(
            Instant::now() < deadline,
            "{} links, not {n}, after 2 s",
            relay.links()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn the_per_source_cap_refuses_one_address_and_not_another() {
    let (port, relay) = hub(Limits {
        per_loopback: 2,
        ..roomy()
    })
    .await;
    let first = idle_link("127.0.0.1", port).await.unwrap();
    let _second = idle_link("127.0.0.1", port).await.unwrap();
    let third = idle_link("127.0.0.1", port).await;
    assert!(third.is_err(), "a third link from one address got in");
    let _other = idle_link("127.0.0.2", port)
        .await
        .expect("another address is not affected");
    links_become(&relay, 3).await;
    // A closed link gives its place back.
    drop(first);
    links_become(&relay, 2).await;
    let _again = idle_link("127.0.0.1", port)
        .await
        .expect("the place of a closed link is free again");
}

#[tokio::test]
async fn an_idle_link_is_pinged_and_then_closed() {
    let idle = Duration::from_millis(400);
    let (port, relay) = hub(Limits {
        ping_every: Duration::from_millis(100),
        idle,
        ..roomy()
    })
    .await;
    let start = Instant::now();
    let mut tcp = idle_link("127.0.0.1", port).await.unwrap();
    links_become(&relay, 1).await;
    let (got, _) = until_closed(&mut tcp, Duration::from_secs(2))
        .await
        .expect("an idle link is still open after 2 s");
    let after = start.elapsed();
    assert!(
        after >= idle * 3 / 4,
        "closed after {after:?}, before it was idle"
    );
    // A ping with an empty payload, unmasked from the server.
    assert!(
        got.windows(2).any(|w| w == [0x89, 0x00]),
        "the hub never pinged: {got:?}"
    );
    links_become(&relay, 0).await;
}

#[tokio::test]
async fn a_link_that_answers_pings_or_carries_data_stays() {
    let idle = Duration::from_millis(400);
    let (port, relay) = hub(Limits {
        ping_every: Duration::from_millis(100),
        idle,
        ..roomy()
    })
    .await;
    let mut device = relay.attach();
    let url = format!("ws://127.0.0.1:{port}{PATH}");
    // One reads all the time, and so answers the hub's pings, but
    // sends nothing of its own.
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (answering, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut answering = answering;
        while let Some(Ok(_)) = answering.next().await {}
    });
    // The other sends data and never reads, so it never pongs.
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut sending, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
        .await
        .unwrap();
    links_become(&relay, 2).await;
    let start = Instant::now();
    while start.elapsed() < idle * 3 {
        sending
            .send(TMessage::Binary(Bytes::from_static(b"data")))
            .await
            .expect("the sending link was closed");
        let (data, _) = device.recv().await.unwrap();
        assert_eq!(data.as_ref(), b"data");
        tokio::time::sleep(idle / 8).await;
    }
    assert!(!reader.is_finished(), "the answering link was closed");
    assert_eq!(relay.links(), 2);
}

#[tokio::test]
async fn an_upgraded_link_keeps_its_place_until_it_closes() {
    let (port, relay) = hub(Limits {
        total: 2,
        ..roomy()
    })
    .await;
    let first = idle_link("127.0.0.1", port).await.unwrap();
    let _second = idle_link("127.0.0.2", port).await.unwrap();
    links_become(&relay, 2).await;
    // The listener is full: a third waits, unanswered.
    let mut third = ask("127.0.0.3", port, PATH).await;
    let waited = tokio::time::timeout(Duration::from_millis(500), answer(&mut third)).await;
    assert!(waited.is_err(), "a third link got an answer: {waited:?}");
    // A link that ends gives its place to the one waiting.
    drop(first);
    let status = tokio::time::timeout(Duration::from_secs(2), answer(&mut third))
        .await
        .expect("the waiting link got no place when one closed")
        .unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    links_become(&relay, 2).await;
}

#[tokio::test]
async fn a_connection_that_does_not_upgrade_in_time_is_closed_and_gives_its_place_back() {
    let (port, _relay) = hub(Limits {
        per_loopback: 1,
        handshake: Duration::from_millis(300),
        ..roomy()
    })
    .await;
    // Silent from the start: it holds the address's one place...
    let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        idle_link("127.0.0.1", port).await.is_err(),
        "the address had a second place"
    );
    // ...until the hub closes it.
    until_closed(&mut silent, Duration::from_secs(2))
        .await
        .expect("a silent connection is still open after 2 s");
    // Half a request, then nothing: the same.
    let mut half = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut half, b"GET /t/secret HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    until_closed(&mut half, Duration::from_secs(2))
        .await
        .expect("a half request is still open after 2 s");
    // A 404, then the connection kept alive and unused: the same.
    let mut wrong = ask("127.0.0.1", port, "/t/guess").await;
    let status = answer(&mut wrong).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    until_closed(&mut wrong, Duration::from_secs(2))
        .await
        .expect("a kept-alive connection is still open after 2 s");
    let _link = idle_link("127.0.0.1", port)
        .await
        .expect("the place was not given back");
}

#[tokio::test]
async fn a_pin_mismatch_is_reported_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let id = crate::transport::tls::Identity::load_or_create(
        &tmp.path().join("c.pem"),
        vec!["x".into()],
    )
    .unwrap();
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let relay = Relay::new("wss");
    let _server = tokio::spawn(serve(
        listener,
        relay,
        "/p".into(),
        Some(id.acceptor().unwrap()),
        std::future::pending(),
    ));
    let good = WsOffer {
        target: WsTarget::Pinned {
            port,
            sha256: id.fingerprint(),
        },
        path: "/p".into(),
    };
    assert!(
        Dialer::new(&good, "127.0.0.1", None)
            .unwrap()
            .connect(Duration::from_secs(5))
            .await
            .is_ok()
    );
    let bad = WsOffer {
        target: WsTarget::Pinned {
            port,
            sha256: [7; 32],
        },
        path: "/p".into(),
    };
    let err = Dialer::new(&bad, "127.0.0.1", None)
        .unwrap()
        .connect(Duration::from_secs(5))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, TransportError::PinMismatch { .. }), "{err}");
    assert!(err.is_input());
}
