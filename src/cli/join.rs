//! `tunnel join <TOKEN> <HOST[:PORT]>`: the other side.
//!
//! The whole token is validated before the host is touched. The interface
//! comes up with the token's invite key; the invite is redeemed over the
//! tunnel for a key made here, and the device switches to that key.

use super::{EndpointArgs, Failure, Shutdown};
use crate::containers::{EndpointSpec, Follower, endpoint_iface};
use crate::control::{self, ControlError};
use crate::docker::{ContainerInfo, ContainerRuntime};
use crate::keys::PrivateKey;
use crate::net::{Netlink, validate_ifname};
use crate::state::{ContainerRecord, Endpoint, JoinedState, StateDir};
use crate::status::{EndpointStatus, LocalApi, PeerReport};
use crate::token::Token;
use crate::wg::{self, DeviceSpec, PeerSpec, WgDevice};
use anyhow::{Context, anyhow};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Joiners are often behind NAT; 25 s keeps typical mappings alive.
pub const KEEPALIVE: u16 = 25;
/// After a handshake with the invite key, how long an unanswered redeem means
/// the server knows the invite but no longer admits it.
const USED_AFTER: Duration = Duration::from_secs(3);

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The join token printed by `tunnel serve` ("-" reads it from stdin, keeping it out of the process list)
    pub token: String,
    /// The server's address as reachable from here: HOST or HOST:PORT (the port defaults to the token's; without it, the token's --endpoint hint is used)
    pub server: Option<String>,
    #[command(flatten)]
    pub common: EndpointArgs,
    /// How long to wait for the tunnel to carry traffic
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
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

pub(crate) fn spinner() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template"),
    );
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

pub async fn run(args: JoinArgs, shutdown: Shutdown) -> Result<(), Failure> {
    let started = Instant::now();
    // Everything about the input is checked before the host is touched.
    let token = read_token(&args.token)?;
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
    crate::sys::require_net_admin()?;
    let docker = super::containers_up_front(&args.common.containers).await?;
    let store = StateDir::new(&args.common.state_dir);
    if let Some(Endpoint::Server(_)) = store.load(&iface)? {
        return Err(Failure::input(anyhow!(
            "{} holds a server for {iface}; use another --iface or --state-dir",
            store.file(&iface).display()
        )));
    }

    let own_key = PrivateKey::generate();
    let spec = DeviceSpec {
        name: iface.clone(),
        private_key: token.invite_key.clone(),
        listen_port: 0,
        peers: vec![PeerSpec {
            public_key: token.server_public_key,
            endpoint: Some(endpoint),
            allowed_ips: vec![token.subnet],
            keepalive: Some(KEEPALIVE),
        }],
        addresses: vec![token.assigned_network()],
        mtu: args.common.mtu,
    };
    let net = Arc::new(Netlink::connect()?);
    super::clean_up_after_crash(net.as_ref(), &store, &iface).await?;
    let device: Arc<dyn WgDevice> = Arc::from(
        wg::create(&spec, args.common.backend, net.clone(), None)
            .await
            .context(format!("creating {iface}"))?,
    );
    tracing::info!(
        "{iface} is up ({} backend) as {}",
        device.backend(),
        token.assigned_network()
    );

    let progress = spinner();
    let joined = async {
        let (mut joined, first_packet) = bring_up(
            &args,
            &server,
            &token,
            endpoint,
            &own_key,
            device.as_ref(),
            &store,
            &progress,
            started,
        )
        .await?;
        let containers = match docker {
            Some((runtime, infos)) => {
                progress.set_message("registering containers");
                let specs = register_containers(&args, &mut joined, &infos, &store).await?;
                Some((runtime, specs))
            }
            None => None,
        };
        Ok::<_, Failure>((joined, first_packet, containers))
    }
    .await;
    let (joined, first_packet, containers) = match joined {
        Ok(j) => j,
        Err(e) => {
            progress.finish_and_clear();
            if let Err(t) = device.destroy().await {
                tracing::warn!("removing {iface}: {t}");
            }
            return Err(e);
        }
    };
    let summary = format!(
        "joined {iface} as {}, server {} at {endpoint}, first packet after {} ms",
        token.assigned_network(),
        token.server_address,
        first_packet.as_millis()
    );
    let site = Site {
        device,
        net,
        joined,
        iface,
        backend: args.common.backend,
        store,
    };
    run_site(site, containers, summary, progress, shutdown).await
}

/// A joined site that is up: its device carries its own key.
pub(crate) struct Site {
    pub device: Arc<dyn WgDevice>,
    pub net: Arc<Netlink>,
    pub joined: JoinedState,
    pub iface: String,
    pub backend: crate::wg::BackendChoice,
    pub store: StateDir,
}

/// What `join` and `up` share once the site's own endpoint is up: attach
/// the containers, print the summary, answer on the local socket, follow
/// the containers until shutdown, then remove everything.
pub(crate) async fn run_site(
    site: Site,
    containers: Option<(Arc<dyn ContainerRuntime>, Vec<EndpointSpec>)>,
    summary: String,
    progress: ProgressBar,
    mut shutdown: Shutdown,
) -> Result<(), Failure> {
    let Site {
        device,
        net,
        joined,
        iface,
        backend,
        store,
    } = site;
    let server_address = joined.server_address;
    let mut follower = None;
    let result = async {
        let mut attached = String::new();
        if let Some((runtime, specs)) = containers {
            progress.set_message("attaching containers");
            for s in &specs {
                attached.push_str(&format!(", container {} as {}", s.container, s.address));
            }
            let f = follower.insert(Follower::new(runtime, net.clone(), backend, specs));
            f.reconcile_all().await?;
        }
        progress.finish_and_clear();
        let mut out = std::io::stdout().lock();
        writeln!(out, "{summary}{attached}")
            .and_then(|_| out.flush())
            .context("writing to stdout")?;
        let socket = store.socket(&iface);
        let listener = control::bind_local(&socket)?;
        let api = Arc::new(SiteApi {
            device: device.clone(),
            joined,
            iface: iface.clone(),
            containers: follower.as_ref().map(|f: &Follower| f.status()),
        });
        tokio::spawn(control::serve_local(
            listener,
            socket,
            api,
            shutdown.trigger_fn(),
            shutdown.waiter(),
        ));
        super::notify_ready();
        Ok::<(), Failure>(())
    }
    .await;
    progress.finish_and_clear();
    if result.is_ok() {
        match follower.as_mut() {
            Some(f) => f.follow(shutdown.waiter()).await,
            None => shutdown.wait().await,
        }
    }
    if let Some(f) = follower.as_mut() {
        f.detach_all().await;
    }
    if result.is_ok() {
        let api = SocketAddr::new(server_address, control::CONTROL_PORT);
        if let Err(e) = control::leave(api, Duration::from_millis(500)).await {
            tracing::debug!("telling the server we leave: {e}");
        }
    }
    let teardown = device.destroy().await.context(format!("removing {iface}"));
    tracing::info!("{iface} removed");
    result?;
    Ok(teardown?)
}

/// Probes the server's API through the tunnel until it answers or `deadline`.
pub(crate) async fn wait_for_flow(api: SocketAddr, deadline: Instant) -> Result<(), ControlError> {
    loop {
        let attempt =
            Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now()));
        match control::ping(api, attempt).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => tracing::debug!("ping: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn bring_up(
    args: &JoinArgs,
    server: &str,
    token: &Token,
    endpoint: SocketAddr,
    own_key: &PrivateKey,
    device: &dyn WgDevice,
    store: &StateDir,
    progress: &ProgressBar,
    started: Instant,
) -> Result<(JoinedState, Duration), Failure> {
    let deadline = started + args.timeout;
    let api = SocketAddr::new(token.server_address, control::CONTROL_PORT);
    let iface = &args.common.iface;

    progress.set_message(format!("handshaking with {endpoint}"));
    let mut handshake_at: Option<Instant> = None;
    let redeemed = loop {
        let attempt =
            Duration::from_millis(700).min(deadline.saturating_duration_since(Instant::now()));
        match control::redeem_invite(api, &own_key.public_key(), attempt).await {
            Ok(r) => break r,
            Err(ControlError::Refused(why)) => {
                return Err(Failure::input(anyhow!(
                    "the server refused this token: {why}"
                )));
            }
            Err(e) => tracing::debug!("redeem attempt: {e}"),
        }
        if handshake_at.is_none()
            && device
                .peers()
                .await?
                .iter()
                .any(|p| p.last_handshake.is_some())
        {
            handshake_at = Some(Instant::now());
            progress.set_message("redeeming the invite");
        }
        if handshake_at.is_some_and(|t| t.elapsed() > USED_AFTER) {
            return Err(Failure::input(anyhow!(
                "the token was already used: the server at {endpoint} recognised it but no longer admits it; ask for a new token"
            )));
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "server unreachable: no WireGuard handshake with {endpoint} within {} (is `tunnel serve` running there, and UDP port {} open?)",
                humantime::format_duration(args.timeout),
                endpoint.port()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if redeemed.address != token.assigned_network() {
        return Err(anyhow!(
            "the server assigned {} but the token says {}",
            redeemed.address,
            token.assigned_network()
        )
        .into());
    }

    // Saved before the switch: once the server has our key, losing it would
    // strand this site.
    let joined = JoinedState {
        private_key: own_key.clone(),
        mtu: args.common.mtu,
        backend: Some(format!("{:?}", args.common.backend).to_lowercase()),
        server_public_key: token.server_public_key,
        endpoint: server.to_owned(),
        port: endpoint.port(),
        address: token.assigned_network(),
        server_address: token.server_address,
        subnet: token.subnet,
        containers: vec![],
    };
    store.save(iface, &Endpoint::Joined(joined.clone()))?;
    device.set_private_key(own_key).await?;
    tracing::info!(
        "invite redeemed; now using this host's own key {}",
        own_key.public_key()
    );

    progress.set_message("waiting for traffic with our own key");
    wait_for_flow(api, deadline)
        .await
        .map_err(|e| anyhow!("the server admitted this host but traffic does not flow: {e}"))?;
    Ok((joined, started.elapsed()))
}

/// The joined site's status: live stats of its link to the server.
struct SiteApi {
    device: Arc<dyn WgDevice>,
    joined: JoinedState,
    iface: String,
    containers: Option<crate::containers::ContainerView>,
}

#[async_trait::async_trait]
impl LocalApi for SiteApi {
    async fn report(&self) -> Vec<EndpointStatus> {
        let mut main =
            crate::status::from_state(&self.iface, &Endpoint::Joined(self.joined.clone()))
                .swap_remove(0);
        main.state = "up".into();
        main.backend = Some(self.device.backend().to_string());
        main.listen_port = self.device.listen_port().await.ok();
        main.peers = self
            .device
            .peers()
            .await
            .unwrap_or_default()
            .iter()
            .map(|p| {
                PeerReport::from_live(p, Some("server".into()), Some(self.joined.server_address))
            })
            .collect();
        let mut out = vec![main];
        if let Some(c) = &self.containers {
            out.extend(c.report().await);
        }
        out
    }
}

/// Registers this site's containers with the hub (each with a key made
/// here) and saves them with the site's state.
async fn register_containers(
    args: &JoinArgs,
    joined: &mut JoinedState,
    infos: &[ContainerInfo],
    store: &StateDir,
) -> Result<Vec<EndpointSpec>, Failure> {
    let api = SocketAddr::new(joined.server_address, control::CONTROL_PORT);
    let endpoint = resolve(&joined.endpoint, joined.port).await?;
    let mut specs = Vec::new();
    for (n, info) in infos.iter().enumerate() {
        let key = PrivateKey::generate();
        let what = format!("container {}", info.name);
        let got = control::register_endpoint(api, &key.public_key(), &what, Duration::from_secs(5))
            .await
            .with_context(|| format!("registering {what} with the server"))?;
        let record = ContainerRecord {
            container: info.name.clone(),
            iface: endpoint_iface(&args.common.iface, n),
            private_key: key,
            address: got.address.ip(),
        };
        specs.push(EndpointSpec {
            container: record.container.clone(),
            iface: record.iface.clone(),
            key: record.private_key.clone(),
            address: got.address,
            hub: PeerSpec {
                public_key: joined.server_public_key,
                endpoint: Some(endpoint),
                allowed_ips: vec![joined.subnet],
                keepalive: Some(KEEPALIVE),
            },
            mtu: args.common.mtu,
            probe: api,
        });
        joined.containers.push(record);
    }
    store.save(&args.common.iface, &Endpoint::Joined(joined.clone()))?;
    Ok(specs)
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
