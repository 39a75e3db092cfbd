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

/// Connects with `connect`, then one exchange; all bounded by `timeout`.
pub(crate) async fn exchange_via<S>(
    target: &str,
    connect: impl Future<Output = std::io::Result<S>>,
    call: Call<'_>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), ControlError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let work = async {
        let stream = connect.await.map_err(|source| ControlError::Connect {
            target: target.to_owned(),
            source,
        })?;
        exchange_on(stream, target, call).await
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ControlError::Timeout(target.to_owned()))?
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
