//! `tunnel join <TOKEN> <HOST[:PORT]>`: the other side.
//!
//! The whole token is validated before the host is touched. The interface
//! comes up with the token's invite key; the invite is redeemed over the
//! tunnel for a key made here, and the device switches to that key
//! ([`crate::site`] does the work).

use super::{EndpointArgs, Failure, LanArgs, Toggle, spinner};
use crate::keys::PrivateKey;
use crate::net::{Netlink, validate_ifname};
use crate::shutdown::Shutdown;
use crate::site::{self, Containers, Invitation, Site};
use crate::state::Endpoint;
use crate::store::StateDir;
use crate::token::Token;
use crate::transport::{JoinTransport, Relay};
use anyhow::{Context, anyhow};
use clap::Args;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The join token printed by `tunnel serve` ("-" reads it from stdin, keeping it out of the process list)
    pub token: String,
    /// The server's address as reachable from here: HOST or HOST:PORT (the port defaults to the token's; without it, the token's --endpoint hint is used)
    pub server: Option<String>,
    #[command(flatten)]
    pub common: EndpointArgs,
    /// How long to wait for the tunnel to carry traffic
    #[arg(long, default_value = "20s", value_parser = crate::limits::parse_timeout)]
    pub timeout: Duration,
    /// How to reach the server: auto tries UDP, then WebSocket direct, then through the proxy (from the token's offer)
    #[arg(long, value_enum, default_value_t = JoinTransport::Auto)]
    pub transport: JoinTransport,
    /// HTTP proxy for the WebSocket transport, http://[user:pass@]host:port [default: HTTPS_PROXY, HTTP_PROXY, unless NO_PROXY]
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
    #[command(flatten)]
    pub lan: LanArgs,
    /// Send this host's traffic for the server's address through the tunnel (except the tunnel's own transport); direct again when the tunnel is down
    #[arg(long)]
    pub transparent: bool,
    /// With --transparent: the server sees this host's public address as the source, not its tunnel address
    #[arg(long, requires = "transparent")]
    pub snat_public: bool,
}

/// `HOST`, `HOST:PORT`, `IPv6` or `[IPv6]:PORT`, resolved to one address.
pub async fn resolve(server: &str, default_port: u16) -> Result<SocketAddr, Failure> {
    if let Ok(sa) = server.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = server
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<IpAddr>()
    {
        return Ok(SocketAddr::new(ip, default_port));
    }
    let (host, port) = match server.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| Failure::input(anyhow!("{server:?}: {p:?} is not a port")))?;
            (h, port)
        }
        _ => (server, default_port),
    };
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
    if !valid {
        return Err(Failure::input(anyhow!("{server:?} is not HOST[:PORT]")));
    }
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Failure::input(anyhow!("cannot resolve {host}: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| Failure::input(anyhow!("{host} has no address")))
}

/// `up`'s arguments for a join that finds its site saved already.
fn resume_args(args: &JoinArgs) -> super::up::UpArgs {
    super::up::UpArgs {
        local: super::LocalArgs {
            iface: args.common.iface.clone(),
            state_dir: args.common.state_dir.clone(),
        },
        backend: Some(args.common.backend),
        timeout: args.timeout,
        proxy: args.proxy.clone(),
        attach_label: args.common.attach_label.clone(),
        docker_driver: args.common.docker_driver.clone(),
        metrics: args.common.metrics.clone(),
        firewall: args.lan.firewall,
    }
}

fn read_token(arg: &str) -> Result<Token, Failure> {
    let text = if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the token from stdin")?;
        zeroize::Zeroizing::new(s)
    } else {
        zeroize::Zeroizing::new(arg.to_owned())
    };
    Token::decode(&text).map_err(Failure::input)
}

pub async fn run(args: JoinArgs, shutdown: Shutdown) -> Result<(), Failure> {
    let started = Instant::now();
    // Everything about the input is checked before the host is touched.
    args.common.metrics.check()?;
    let token = read_token(&args.token)?;
    crate::sys::crash_point("token-parsed");
    let store = StateDir::new(&args.common.state_dir);
    // A join with this token that crashed after saving the site: the
    // token is spent on us, and `up` is what brings the site back.
    if let Some(Endpoint::Joined(j)) = store.load(&args.common.iface)?
        && j.server_public_key == token.server_public_key
        && j.address == token.assigned_network()
    {
        eprintln!(
            "{} joined with this token already ({}): bringing it up from its saved state, as `tunnel up` does",
            args.common.iface,
            store.file(&args.common.iface).display()
        );
        store.remove_pending(&args.common.iface);
        return super::up::run(resume_args(&args), shutdown).await;
    }
    token
        .check_expiry(SystemTime::now())
        .map_err(Failure::input)?;
    let iface = args.common.iface.clone();
    validate_ifname(&iface)?;
    let server = args
        .server
        .clone()
        .or_else(|| token.endpoint_hint.clone())
        .ok_or_else(|| {
            Failure::input(anyhow!(
                "give the server's address (tunnel join <TOKEN> <HOST[:PORT]>): this token carries no endpoint hint"
            ))
        })?;
    let endpoint = resolve(&server, token.port).await?;
    args.lan.check(&token.subnets().all())?;
    crate::sys::require_net_admin()?;
    if let Some(n) = &args.common.docker_driver {
        crate::driver::check_name(n)?;
    }
    let docker = super::containers_up_front(
        &args.common.containers,
        args.common.attach_label.is_some() || args.common.docker_driver.is_some(),
    )
    .await?;
    if let Some(Endpoint::Server(_)) = store.load(&iface)? {
        return Err(Failure::input(anyhow!(
            "{} holds a server for {iface}; use another --iface or --state-dir",
            store.file(&iface).display()
        )));
    }
    let metrics = super::bind_metrics(&args.common.metrics).await?;

    let inv = Invitation {
        token: &token,
        server: &server,
        endpoint,
        iface: &iface,
        mtu: args.common.mtu,
        backend: args.common.backend,
        transport: args.transport,
        proxy: args.proxy.as_deref(),
        timeout: args.timeout,
        routes: &args.lan.routes,
        masquerade: args.lan.masquerade,
        transparent: args.transparent,
        snat_public: args.snat_public,
        name: args.common.name.as_deref(),
        attach_label: args.common.attach_label.as_ref().map(|l| l.to_string()),
    };
    inv.check()?;
    if let Some(p) = &args.proxy {
        crate::transport::proxy::Proxy::parse(p).map_err(Failure::input)?;
    }
    let relay = inv.websocket().then(|| Relay::new("websocket"));
    let net = Arc::new(Netlink::connect()?);
    let mut gateway = site::start_gateway(
        net.as_ref(),
        &store,
        &iface,
        &inv,
        args.lan.firewall == Toggle::On,
    )
    .await?;
    let mut spec = inv.device_spec(relay.clone());
    spec.confine = gateway.confine();
    let device =
        match crate::endpoint::create(&spec, args.common.backend, net.clone(), &store).await {
            Ok(d) => d,
            Err(e) => {
                gateway.stop(net.as_ref()).await;
                return Err(e.into());
            }
        };

    crate::sys::crash_point("iface-created");
    let own_key = match site::own_key(&store, &iface, &token, PrivateKey::generate) {
        Ok(k) => k,
        Err(e) => {
            let _ = device.destroy().await;
            gateway.stop(net.as_ref()).await;
            return Err(e.into());
        }
    };
    let progress = super::Spinner(spinner());
    let deadline = started + args.timeout;
    let joined = async {
        let joiner = site::Joiner {
            inv: &inv,
            device: device.as_ref(),
            relay: relay.as_ref(),
            net: net.as_ref(),
            store: &store,
            own_key: &own_key,
        };
        let (route, mut joined) = site::establish(&joiner, &progress, deadline).await?;
        let first_packet = started.elapsed();
        let transparent = site::prepare_host(
            &mut gateway,
            net.as_ref(),
            device.as_ref(),
            &joined,
            &iface,
            endpoint,
            &route,
        )
        .await?;
        let containers = match docker {
            Some((runtime, infos)) => {
                progress.0.set_message("registering containers");
                let specs =
                    site::register_containers(&mut joined, &iface, &infos, &route, &store).await?;
                Some(Containers {
                    runtime,
                    specs,
                    label: args.common.attach_label.clone(),
                    driver: args.common.docker_driver.clone(),
                })
            }
            None => None,
        };
        Ok::<_, site::SiteError>((joined, route, first_packet, containers, transparent))
    }
    .await;
    let (joined, route, first_packet, containers, transparent) = match joined {
        Ok(j) => {
            store.remove_pending(&iface);
            j
        }
        Err(e) => {
            // Refused by the server: the saved key is of no more use.
            // (AlreadyUsed is the joiner's guess from a handshake without
            // an answer, which a crashed hub also gives: the key stays.)
            if matches!(e, site::SiteError::Refused(_)) {
                store.remove_pending(&iface);
            }
            progress.0.finish_and_clear();
            if let Err(t) = device.destroy().await {
                tracing::warn!("removing {iface}: {t}");
            }
            gateway.stop(net.as_ref()).await;
            return Err(e.into());
        }
    };
    let summary = format!(
        "joined {iface} as {}, server {} at {endpoint} over {}, first packet after {} ms",
        token.assigned_network(),
        token.server_address,
        route.path,
        first_packet.as_millis()
    );
    let site = Site {
        device,
        route,
        net,
        joined,
        iface,
        backend: args.common.backend,
        store,
        gateway,
        transparent,
        metrics,
    };
    Ok(site::run(
        site,
        containers,
        super::summary_line(summary),
        &progress,
        shutdown,
    )
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn server_address_forms() {
        assert_eq!(
            resolve("192.0.2.1", 51820).await.unwrap().to_string(),
            "192.0.2.1:51820"
        );
        assert_eq!(
            resolve("192.0.2.1:1234", 51820).await.unwrap().to_string(),
            "192.0.2.1:1234"
        );
        assert_eq!(
            resolve("fd00::1", 5).await.unwrap().to_string(),
            "[fd00::1]:5"
        );
        assert_eq!(
            resolve("[fd00::1]:7", 5).await.unwrap().to_string(),
            "[fd00::1]:7"
        );
        assert_eq!(resolve("localhost:9", 5).await.unwrap().port(), 9);
        for bad in ["", "a b", "host:0", "host:x", "192.0.2.1:99999"] {
            let f = resolve(bad, 5).await.unwrap_err();
            assert_eq!(f.code, 2, "{bad}");
        }
    }
}
