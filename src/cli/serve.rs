//! `tunnel serve`: the hub endpoint. The command checks its flags before
//! the host is touched, then runs [`crate::hub::run`] and prints the
//! tokens on stdout.

use super::{EndpointArgs, Failure, LanArgs, Toggle};
use crate::hub::run::{HubConfig, Prepared};
use crate::limits;
use crate::net::validate_ifname;
use crate::shutdown::Shutdown;
use crate::transport::ServeTransports;
use anyhow::anyhow;
use clap::Args;
use ipnetwork::IpNetwork;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

pub use crate::hub::run::{DEFAULT_PORT, PortChoice, Subnet6};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: EndpointArgs,
    /// UDP port WireGuard listens on, or "random" for a free one in 49152-65535 (kept in state) [default: 51820, or the saved one]
    #[arg(long, value_parser = parse_port)]
    pub port: Option<PortChoice>,
    /// Tunnel subnet (IPv4, or IPv6 for an IPv6-only tunnel); the server takes its first host address [default: a free random /24 of 100.64.0.0/10, or the saved one]
    #[arg(long)]
    pub subnet: Option<IpNetwork>,
    /// IPv6 subnet beside an IPv4 one, where every endpoint gets the twin of its address, or "none" [default: a random ULA /64, or the saved one]
    #[arg(long, value_parser = parse_subnet6, value_name = "CIDR|none")]
    pub subnet6: Option<Subnet6>,
    /// Number of join tokens to print, at most 1000 [default: 1 on the first start, 0 on a restart]
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=1000))]
    pub tokens: Option<u16>,
    /// How long a token stays valid (e.g. 30m, 1h, 2d; at most 366d)
    #[arg(long, default_value = "1h", value_parser = limits::parse_ttl)]
    pub token_ttl: Duration,
    /// A LAN (CIDR) the site that redeems a printed token may advertise without asking (`join --route` within it); repeatable. Other routes wait for `tunnel route approve`
    #[arg(long = "token-route", value_name = "CIDR")]
    pub token_routes: Vec<IpNetwork>,
    /// HOST[:PORT] at which joiners reach this server; a hint baked into tokens
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Transports to accept, comma-separated: udp, wss (WebSocket with TLS by this server), ws (plain WebSocket, behind a TLS-terminating reverse proxy)
    #[arg(long, default_value = "udp", value_parser = parse_transports)]
    pub transport: ServeTransports,
    /// TCP address for WebSocket connections (with --transport wss or ws)
    #[arg(long, default_value = "[::]:443", value_name = "ADDR:PORT")]
    pub wss_listen: SocketAddr,
    /// The URL joiners use when a reverse proxy stands in front, e.g. wss://vpn.example.org/tunnel (the secret path is appended)
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    #[command(flatten)]
    pub lan: LanArgs,
    /// Accept the UDP port only from this network (CIDR) and from the peers' last known endpoints; repeatable. Roaming sites and new joiners from elsewhere are then dropped
    #[arg(long = "allow-from", value_name = "CIDR")]
    pub allow_from: Vec<IpNetwork>,
    /// DNS zone the hub answers on its tunnel addresses: <container>.<site>.<zone> and <site>.<zone>
    #[arg(long, default_value = crate::dns::DEFAULT_ZONE, value_name = "ZONE")]
    pub dns_zone: String,
    /// How many endpoints (containers) one joined site may register
    #[arg(long, default_value_t = limits::DEFAULT_ENDPOINTS_PER_SITE, value_parser = clap::value_parser!(u16).range(0..=4096))]
    pub endpoints_per_site: u16,
    /// No mesh: sites reach each other only through this hub, which decrypts and re-encrypts their traffic (as before direct paths existed)
    #[arg(long)]
    pub no_mesh: bool,
}

fn parse_subnet6(s: &str) -> Result<Subnet6, String> {
    if s == "none" {
        return Ok(Subnet6::None);
    }
    s.parse::<IpNetwork>()
        .map(Subnet6::Net)
        .map_err(|e| format!("{s:?} is not a CIDR or \"none\": {e}"))
}

fn parse_port(s: &str) -> Result<PortChoice, String> {
    if s == "random" {
        return Ok(PortChoice::Random);
    }
    match s.parse::<u16>() {
        Ok(0) => Err("the server needs a fixed port for tokens; use a number or \"random\"".into()),
        Ok(p) => Ok(PortChoice::Fixed(p)),
        Err(_) => Err(format!("{s:?} is not a port (1-65535) or \"random\"")),
    }
}

fn parse_transports(s: &str) -> Result<ServeTransports, String> {
    ServeTransports::parse(s).map_err(|e| e.to_string())
}

pub(crate) fn check_hint(hint: &str) -> Result<(), Failure> {
    if hint.is_empty()
        || hint.len() > 255
        || hint.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(Failure::input(anyhow!(
            "--endpoint {hint:?} is not HOST[:PORT]"
        )));
    }
    Ok(())
}

impl ServeArgs {
    fn config(&self) -> HubConfig {
        HubConfig {
            iface: self.common.iface.clone(),
            state_dir: self.common.state_dir.clone(),
            backend: self.common.backend,
            mtu: self.common.mtu,
            name: self.common.name.clone(),
            attach_label: self.common.attach_label.clone(),
            docker_driver: self.common.docker_driver.clone(),
            port: self.port,
            subnet: self.subnet,
            subnet6: self.subnet6,
            tokens: self.tokens,
            token_ttl: self.token_ttl,
            token_routes: self.token_routes.clone(),
            endpoint: self.endpoint.clone(),
            transport: self.transport,
            wss_listen: self.wss_listen,
            public_url: self.public_url.clone(),
            routes: self.lan.routes.clone(),
            masquerade: self.lan.masquerade,
            firewall: self.lan.firewall == Toggle::On,
            allow_from: self.allow_from.clone(),
            dns_zone: self.dns_zone.clone(),
            endpoints_per_site: self.endpoints_per_site,
            mesh: !self.no_mesh,
        }
    }

    /// Everything about the flags that can be checked without root.
    fn check(&self) -> Result<(), Failure> {
        validate_ifname(&self.common.iface)?;
        self.common.metrics.check()?;
        if let Some(h) = &self.endpoint {
            check_hint(h)?;
        }
        let subnet: Vec<IpNetwork> = self.subnet.into_iter().collect();
        self.lan.check(&subnet)?;
        crate::hub::ledger::validate_routes(&self.token_routes, &subnet)
            .map_err(|e| Failure::input(anyhow!("--token-route: {e}")))?;
        crate::dns::parse_zone(&self.dns_zone).map_err(Failure::input)?;
        if let Some(n) = &self.common.docker_driver {
            crate::driver::check_name(n)?;
        }
        Ok(())
    }
}

fn print_tokens(tokens: &[crate::token::Token]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    for t in tokens {
        writeln!(out, "{}", t.encode())?;
    }
    out.flush()
}

pub async fn run(args: ServeArgs, shutdown: Shutdown) -> Result<(), Failure> {
    args.check()?;
    crate::sys::require_net_admin()?;
    // Docker and the containers are checked before the host is touched.
    let docker = super::containers_up_front(
        &args.common.containers,
        args.common.attach_label.is_some() || args.common.docker_driver.is_some(),
    )
    .await?;
    let metrics = super::bind_metrics(&args.common.metrics).await?;
    let prepared = Prepared {
        docker,
        metrics,
        net: std::sync::Arc::new(crate::net::Netlink::connect()?),
        firewall: Box::new(crate::firewall::Nftables),
    };
    Ok(crate::hub::run::run(args.config(), prepared, print_tokens, shutdown).await?)
}
