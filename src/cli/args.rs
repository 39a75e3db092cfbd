//! The flags several commands share, each a `#[derive(Args)]` struct
//! that a command flattens into its own.

use super::Failure;
use crate::wg::BackendChoice;
use clap::Args;
use std::path::PathBuf;

/// Flags shared by every command that brings up an endpoint.
#[derive(Debug, Clone, Args)]
pub struct EndpointArgs {
    /// WireGuard interface name (unique on this host: the UAPI socket directory is shared by all namespaces)
    #[arg(long, default_value = "wg-tunnel")]
    pub iface: String,
    /// Directory for keys and peers (created 0700)
    #[arg(long, default_value = "/var/lib/tunnel", env = "TUNNEL_STATE_DIR")]
    pub state_dir: PathBuf,
    /// WireGuard implementation: kernel module, embedded userspace (gotatun), or auto (kernel when available)
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Interface MTU [default: 1420 over UDP, 1400 over WebSocket, for a 1500-byte IPv4 path]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1280..=9000))]
    pub mtu: Option<u32>,
    /// Put an endpoint inside this Docker container (name or id); repeatable. Each gets its own key and address
    #[arg(long = "container", value_name = "NAME|ID")]
    pub containers: Vec<String>,
    /// Attach every container that carries this label, now and as they start, and give their endpoints back when they are removed [default label: tunnel.attach]
    #[arg(long, value_name = "KEY[=VALUE]", num_args = 0..=1, default_missing_value = crate::docker::Label::DEFAULT, value_parser = crate::docker::Label::parse)]
    pub attach_label: Option<crate::docker::Label>,
    /// Serve Docker's network-plugin API under this name: docker network create -d NAME --ipam-driver NAME NET gives containers tunnel endpoints as they are created [default name: tunnel]
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = crate::driver::DEFAULT_NAME)]
    pub docker_driver: Option<String>,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// This host's name on the tunnel, unique among its sites; DNS names its containers <container>.<name>.<zone> [default: the host name, numbered if taken]
    #[arg(long, value_parser = crate::limits::parse_name)]
    pub name: Option<String>,
}

/// `--metrics` and its opt-ins: whoever can connect reads the metrics, on
/// loopback every local user, so showing more is the operator's choice.
#[derive(Debug, Clone, Default, Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on GET /metrics at this address, a loopback one unless --metrics-public [default: 127.0.0.1:9580]
    #[arg(id = "metrics", long = "metrics", value_name = "ADDR:PORT", num_args = 0..=1, default_missing_value = crate::metrics::DEFAULT_ADDR, value_parser = parse_metrics)]
    pub addr: Option<std::net::SocketAddr>,
    /// Allow --metrics on an address off loopback (other hosts can then read the metrics)
    #[arg(long, requires = "metrics")]
    pub metrics_public: bool,
    /// Label each peer's metrics with its public key and name, not only its tunnel address (every local user can read them)
    #[arg(long, requires = "metrics")]
    pub metrics_peers: bool,
}

impl MetricsArgs {
    pub(super) fn exposure(&self) -> crate::metrics::Exposure {
        crate::metrics::Exposure {
            public: self.metrics_public,
            peers: self.metrics_peers,
        }
    }

    /// Refuses an address off loopback without the opt-in; run first, so
    /// that it changes nothing.
    pub fn check(&self) -> Result<(), Failure> {
        match self.addr {
            Some(a) => crate::metrics::check(a, self.exposure()).map_err(Failure::input),
            None => Ok(()),
        }
    }
}

/// The LANs behind this host, and the host's firewall.
#[derive(Debug, Clone, Args)]
pub struct LanArgs {
    /// Advertise a LAN behind this host, e.g. 192.168.1.0/24; repeatable. The others route it through this host, which forwards for that prefix only
    #[arg(long = "route", value_name = "CIDR")]
    pub routes: Vec<ipnetwork::IpNetwork>,
    /// Be a gateway: masquerade what the tunnel sends to the advertised LANs, so that their hosts need no route back
    #[arg(long)]
    pub masquerade: bool,
    /// Our nftables table: confines forwarding to the tunnel and the advertised LANs, holds the masquerade rules, opens Docker's FORWARD chain for them
    #[arg(long, value_enum, default_value_t = Toggle::On)]
    pub firewall: Toggle,
}

impl LanArgs {
    /// Checks the flags (against the tunnel's subnet, when known) before
    /// the host is touched.
    pub fn check(&self, subnets: &[ipnetwork::IpNetwork]) -> Result<(), Failure> {
        if self.masquerade && self.routes.is_empty() {
            return Err(Failure::input(anyhow::anyhow!(
                "--masquerade needs the LANs to masquerade towards: add --route CIDR"
            )));
        }
        if self.masquerade && self.firewall == Toggle::Off {
            return Err(Failure::input(anyhow::anyhow!(
                "--masquerade needs the firewall: its rules live there (drop --firewall off)"
            )));
        }
        crate::hub::ledger::validate_routes(&self.routes, subnets).map_err(Failure::input)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Toggle {
    On,
    Off,
}

/// Which local endpoint a command is about.
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// WireGuard interface name of the endpoint
    #[arg(long, default_value = "wg-tunnel")]
    pub iface: String,
    /// Directory for keys and peers
    #[arg(long, default_value = "/var/lib/tunnel", env = "TUNNEL_STATE_DIR")]
    pub state_dir: PathBuf,
}

impl LocalArgs {
    pub fn socket(&self) -> PathBuf {
        crate::store::StateDir::new(&self.state_dir).socket(&self.iface)
    }
}

fn parse_metrics(s: &str) -> Result<std::net::SocketAddr, String> {
    crate::metrics::parse_addr(s).map_err(|e| e.to_string())
}
