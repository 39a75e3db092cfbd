//! The two HTTP APIs and what they share.
//!
//! - [`tunnel`]: the hub's API on its tunnel address (redeem, register,
//!   leave, ping). It accepts only connections that arrive on the tunnel
//!   interface, and every request that changes the hub is signed with a
//!   WireGuard static key ([`auth`]).
//! - [`local`]: each running instance's API on a unix socket in the state
//!   directory (status, tokens, revoke, down), for root on the same host.
//!
//! Both are axum routers served by [`server`], which bounds connections,
//! header reads, connection lifetimes and bodies, so that no client can
//! exhaust the process. Requests, responses and errors are typed here and
//! shared by the server and the client side.

pub mod auth;
pub mod local;
pub mod server;
pub mod tunnel;

use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;

/// The TCP port of the API on the server's tunnel address.
pub const CONTROL_PORT: u16 = 51821;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {0}")]
    Timeout(String),
    /// Connected, so the server is there, but it did not answer in time:
    /// a busy server, not a lost one.
    #[error("{0} took the request but did not answer in time")]
    Unanswered(String),
    #[error("connecting to {target}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to {target}")]
    Http {
        target: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{target} answered something that is not the expected JSON")]
    Decode {
        target: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the server refused: {message}")]
    Refused { status: u16, message: String },
}

impl ControlError {
    /// Whether asking again later may succeed: no answer, or the server
    /// could not act just now. A refusal on the merits is final.
    /// Whether a connection was made: the server is there and our packets
    /// reach it, whatever it then said.
    pub fn connected(&self) -> bool {
        !matches!(
            self,
            ControlError::Timeout(_) | ControlError::Connect { .. } | ControlError::Bind { .. }
        )
    }

    pub fn is_transient(&self) -> bool {
        match self {
            ControlError::Refused { status, .. } => *status >= 500 || *status == 429,
            ControlError::Decode { .. } | ControlError::Bind { .. } => false,
            _ => true,
        }
    }
}

/// The body of every refusal.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// The server's clock (unix seconds), sent when a signed request's
    /// timestamp was too far off, so that the client can sign again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_time: Option<u64>,
}

/// A refusal as axum sends it.
pub type Refusal = (StatusCode, axum::Json<ErrorBody>);

pub fn refuse(status: StatusCode, e: impl std::fmt::Display) -> Refusal {
    (
        status,
        axum::Json(ErrorBody {
            error: e.to_string(),
            server_time: None,
        }),
    )
}

/// One request: what the client side sends.
pub(crate) struct Call<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub body: Vec<u8>,
    pub authorization: Option<String>,
}

/// One HTTP/1.1 exchange on an open stream.
async fn exchange_on<S>(
    stream: S,
    target: &str,
    call: Call<'_>,
) -> Result<(StatusCode, Bytes), ControlError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: Box<dyn std::error::Error + Send + Sync>| ControlError::Http {
        target: target.to_owned(),
        source: e,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.into()))?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(call.method)
        .uri(call.path)
        .header(hyper::header::HOST, "tunnel")
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(a) = call.authorization {
        req = req.header(hyper::header::AUTHORIZATION, a);
    }
    let req = req
        .body(Full::new(Bytes::from(call.body)))
        .map_err(|e| http(e.into()))?;
    let resp = sender.send_request(req).await.map_err(|e| http(e.into()))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| http(e.into()))?
        .to_bytes();
    Ok((status, bytes))
}

/// How long a call may take: to connect, and in all.
///
/// A connection that is made shows the server is there; a client that then
/// gives up after the same short bound as for connecting throws away work
/// the server has queued, which under load is all of it.
#[derive(Clone, Copy, Debug)]
pub struct Patience {
    pub connect: Duration,
    pub total: Duration,
}

impl From<Duration> for Patience {
    fn from(d: Duration) -> Self {
        Patience {
            connect: d,
            total: d,
        }
    }
}

/// Connects with `connect`, then one exchange, bounded by `patience`.
pub(crate) async fn exchange_via<S>(
    target: &str,
    connect: impl Future<Output = std::io::Result<S>>,
    call: Call<'_>,
    patience: impl Into<Patience>,
) -> Result<(StatusCode, Bytes), ControlError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let p = patience.into();
    let start = tokio::time::Instant::now();
    let stream = tokio::time::timeout(p.connect.min(p.total), connect)
        .await
        .map_err(|_| ControlError::Timeout(target.to_owned()))?
        .map_err(|source| ControlError::Connect {
            target: target.to_owned(),
            source,
        })?;
    let rest = p.total.saturating_sub(start.elapsed());
    tokio::time::timeout(rest, exchange_on(stream, target, call))
        .await
        .map_err(|_| ControlError::Unanswered(target.to_owned()))?
}

/// The refusal in a non-success answer.
pub(crate) fn refused(status: StatusCode, body: &Bytes) -> (ControlError, Option<u64>) {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => (
            ControlError::Refused {
                status: status.as_u16(),
                message: b.error,
            },
            b.server_time,
        ),
        Err(_) => (
            ControlError::Refused {
                status: status.as_u16(),
                message: format!("HTTP {status}"),
            },
            None,
        ),
    }
}

/// Decodes a successful JSON answer, or the refusal.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    target: &str,
    (status, bytes): (StatusCode, Bytes),
) -> Result<T, ControlError> {
    if !status.is_success() {
        return Err(refused(status, &bytes).0);
    }
    serde_json::from_slice(&bytes).map_err(|source| ControlError::Decode {
        target: target.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> Call<'static> {
        Call {
            method: "GET",
            path: "/",
            body: vec![],
            authorization: None,
        }
    }

    /// A server that takes the connection and is slow to answer is told
    /// apart from one that cannot be reached: the first is busy, and a
    /// joiner must not conclude that its token was used.
    #[tokio::test]
    async fn a_taken_but_unanswered_request_is_not_a_lost_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let patience = Patience {
            connect: Duration::from_secs(5),
            total: Duration::from_millis(200),
        };
        let err = exchange_via(
            "busy",
            tokio::net::TcpStream::connect(addr),
            call(),
            patience,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ControlError::Unanswered(_)), "{err:?}");
        assert!(err.connected() && err.is_transient());

        let never = std::future::pending::<std::io::Result<tokio::net::TcpStream>>();
        let err = exchange_via("gone", never, call(), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, ControlError::Timeout(_)), "{err:?}");
        assert!(!err.connected() && err.is_transient());
    }
}
