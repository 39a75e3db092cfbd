//! What a token and the command line say about the site being joined:
//! the ways to try, the device to bring up first, what to ask the hub.

use super::SiteError;
use super::machine::Plan;
use crate::token::Token;
use crate::transport::{JoinTransport, Relay, UDP_MTU, WS_MTU};
use crate::wg::{BackendChoice, DeviceSpec, KEEPALIVE, PeerSpec};
use ipnetwork::IpNetwork;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a token and the command line say about the site being joined.
pub struct Invitation<'a> {
    pub token: &'a Token,
    /// The server as the user gave it (`HOST[:PORT]`), kept for `up`.
    pub server: &'a str,
    pub endpoint: SocketAddr,
    pub iface: &'a str,
    /// As given with `--mtu`; otherwise it follows the transport.
    pub mtu: Option<u32>,
    pub backend: BackendChoice,
    pub transport: JoinTransport,
    /// `--proxy`, which wins over the environment.
    pub proxy: Option<&'a str>,
    /// `--proxy-ca`, for an https:// proxy.
    pub proxy_ca: Option<&'a std::path::Path>,
    /// How long the whole bring-up may take.
    pub timeout: Duration,
    /// The LANs behind this site, advertised with the redeem.
    pub routes: &'a [IpNetwork],
    pub masquerade: bool,
    /// `--transparent`, and `--snat-public` with it.
    pub transparent: bool,
    pub snat_public: bool,
    /// `--name`, else the host name (which the hub may number).
    pub name: Option<&'a str>,
    /// `--attach-label`, saved for `up`.
    pub attach_label: Option<String>,
    /// `--advertise-endpoint`, saved for `up`.
    pub advertise_endpoint: Option<SocketAddr>,
}

impl Invitation<'_> {
    /// Whether WebSocket is among the ways to try.
    pub fn websocket(&self) -> bool {
        self.token.websocket.is_some() && self.transport != JoinTransport::Udp
    }

    /// Whether UDP is among the ways to try.
    pub fn udp(&self) -> bool {
        self.token.udp && self.transport != JoinTransport::Wss
    }

    /// Checks the choice against the token before anything is touched.
    pub fn check(&self) -> Result<(), SiteError> {
        match self.transport {
            JoinTransport::Wss if self.token.websocket.is_none() => Err(SiteError::Refused(
                "the token offers no WebSocket transport (serve with --transport udp,wss)".into(),
            )),
            JoinTransport::Udp if !self.token.udp => Err(SiteError::Refused(
                "the server takes no UDP (the token offers WebSocket only)".into(),
            )),
            _ => Ok(()),
        }
    }

    pub(super) fn initial_mtu(&self) -> u32 {
        self.mtu
            .unwrap_or(if self.udp() { UDP_MTU } else { WS_MTU })
    }

    /// The device to bring up first: the invite key, the hub as its peer,
    /// with a relay for WebSocket links when they may be needed.
    pub fn device_spec(&self, relay: Option<Arc<Relay>>) -> DeviceSpec {
        DeviceSpec {
            name: self.iface.to_owned(),
            private_key: self.token.invite_key.clone(),
            listen_port: 0,
            peers: vec![self.hub(self.endpoint)],
            addresses: self.token.subnets().interface(self.token.assigned),
            mtu: self.initial_mtu(),
            confine: None,
            relay,
            quarantine: None,
            mesh: None,
            udp: true,
        }
    }

    pub(super) fn hub(&self, endpoint: SocketAddr) -> PeerSpec {
        PeerSpec {
            public_key: self.token.server_public_key,
            endpoint: Some(endpoint),
            allowed_ips: self.token.subnets().all(),
            keepalive: Some(KEEPALIVE),
        }
    }

    /// What the join machine is told: the ways to try, the address to be
    /// admitted with, and the deadline.
    pub(super) fn plan(&self, deadline: Instant) -> Plan {
        Plan {
            endpoint: self.endpoint,
            udp: self.udp(),
            websocket: self.websocket(),
            assigned: self.token.assigned_network(),
            deadline,
            timeout: self.timeout,
        }
    }
}
