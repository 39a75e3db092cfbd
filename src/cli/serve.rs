//! `tunnel serve`: the hub endpoint.

use super::{EndpointArgs, Failure, Shutdown};
use crate::containers::{EndpointSpec, Follower, endpoint_iface};
use crate::control;
use crate::hub::{self, Hub};
use crate::keys::PrivateKey;
use crate::net::{Netlink, validate_ifname};
use crate::state::{ServerState, StateDir};
use crate::status::{EndpointStatus, LocalApi, PeerReport, TokenRequest};
use crate::wg::{self, DeviceSpec, PeerSpec, WgDevice};
use anyhow::{Context, anyhow};
use clap::Args;
use ipnetwork::IpNetwork;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub const DEFAULT_PORT: u16 = 51820;
pub const DEFAULT_SUBNET: &str = "10.77.0.0/24";

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: EndpointArgs,
    /// UDP port WireGuard listens on [default: 51820, or the saved one]
    #[arg(long)]
    pub port: Option<u16>,
    /// Tunnel subnet; the server takes its first host address [default: 10.77.0.0/24, or the saved one]
    #[arg(long)]
    pub subnet: Option<IpNetwork>,
    /// Number of join tokens to print [default: 1 on the first start, 0 on a restart]
    #[arg(long)]
    pub tokens: Option<usize>,
    /// How long a token stays valid (e.g. 30m, 1h, 2d)
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub token_ttl: Duration,
    /// HOST[:PORT] at which joiners reach this server; a hint baked into tokens
    #[arg(long)]
    pub endpoint: Option<String>,
}

fn check_hint(hint: &str) -> Result<(), Failure> {
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

/// Reuses the saved state (same key, port, subnet, peers) or makes a new one.
fn load_or_new(args: &ServeArgs, store: &StateDir) -> Result<ServerState, Failure> {
    let iface = &args.common.iface;
    match store.load_server(iface)? {
        Some(saved) => {
            if let Some(subnet) = args.subnet.filter(|s| *s != saved.subnet) {
                return Err(Failure::input(anyhow!(
                    "{} holds subnet {} for {iface}, not {subnet}; drop --subnet or use another --state-dir",
                    store.file(iface).display(),
                    saved.subnet
                )));
            }
            if let Some(port) = args.port.filter(|p| *p != saved.port) {
                return Err(Failure::input(anyhow!(
                    "{} holds port {} for {iface}, not {port}; drop --port or use another --state-dir",
                    store.file(iface).display(),
                    saved.port
                )));
            }
            tracing::info!(
                "reusing the key and peers saved in {}",
                store.file(iface).display()
            );
            Ok(ServerState {
                mtu: args.common.mtu,
                ..saved
            })
        }
        None => Ok(ServerState {
            private_key: PrivateKey::generate(),
            port: args.port.unwrap_or(DEFAULT_PORT),
            mtu: args.common.mtu,
            subnet: args
                .subnet
                .unwrap_or_else(|| DEFAULT_SUBNET.parse().expect("valid default")),
            peers: vec![],
            invites: vec![],
            containers: vec![],
        }),
    }
}

pub async fn run(args: ServeArgs, shutdown: Shutdown) -> Result<(), Failure> {
    let iface = args.common.iface.clone();
    validate_ifname(&iface)?;
    if let Some(h) = &args.endpoint {
        check_hint(h)?;
    }
    if args.port == Some(0) {
        return Err(Failure::input(anyhow!(
            "--port 0: the server needs a fixed port for tokens"
        )));
    }
    crate::sys::require_net_admin()?;
    // Docker and the containers are checked before the host is touched.
    let docker = super::containers_up_front(&args.common.containers).await?;
    let store = StateDir::new(&args.common.state_dir);
    let restart = store.load_server(&iface)?.is_some();
    let mut state = load_or_new(&args, &store)?;
    if let Some((_, infos)) = &docker {
        let names: Vec<String> = infos.iter().map(|c| c.name.clone()).collect();
        hub::ensure_containers(&mut state, &names, |n| endpoint_iface(&iface, n))?;
    }
    let server_ip = Hub::server_address(state.subnet)?;
    let now = SystemTime::now();

    let net = Arc::new(Netlink::connect()?);
    super::clean_up_after_crash(net.as_ref(), &store, &iface).await?;
    let spec = DeviceSpec {
        name: iface.clone(),
        private_key: state.private_key.clone(),
        listen_port: state.port,
        peers: hub::device_peers(&state, now),
        addresses: vec![
            IpNetwork::new(server_ip, state.subnet.prefix()).expect("prefix of the subnet"),
        ],
        mtu: state.mtu,
    };
    let device: Arc<dyn WgDevice> = Arc::from(
        wg::create(&spec, args.common.backend, net.clone(), None)
            .await
            .context(format!("creating {iface}"))?,
    );
    tracing::info!(
        "{iface} is up ({} backend): {server_ip}/{} on UDP port {}, public key {}",
        device.backend(),
        state.subnet.prefix(),
        state.port,
        state.private_key.public_key()
    );

    let mut follower = docker.map(|(runtime, infos)| {
        let specs = container_specs(&state, &infos, server_ip);
        Follower::new(runtime, net.clone(), args.common.backend, specs)
    });
    let tokens = args.tokens.unwrap_or(if restart { 0 } else { 1 });
    let result = serve(
        &args,
        tokens,
        net.as_ref(),
        device.clone(),
        store,
        state,
        follower.as_mut(),
        shutdown,
    )
    .await;
    if let Some(f) = follower.as_mut() {
        f.detach_all().await;
    }
    let teardown = device.destroy().await.context(format!("removing {iface}"));
    tracing::info!("{iface} removed");
    result?;
    Ok(teardown?)
}

/// The endpoints of this host's containers: the hub is their peer, on
/// loopback, as their UDP sockets live in this namespace too.
fn container_specs(
    state: &ServerState,
    infos: &[crate::docker::ContainerInfo],
    server_ip: IpAddr,
) -> Vec<EndpointSpec> {
    infos
        .iter()
        .filter_map(|info| state.containers.iter().find(|c| c.container == info.name))
        .map(|c| EndpointSpec {
            container: c.container.clone(),
            iface: c.iface.clone(),
            key: c.private_key.clone(),
            address: IpNetwork::new(c.address, state.subnet.prefix())
                .expect("prefix of the subnet"),
            hub: PeerSpec {
                public_key: state.private_key.public_key(),
                endpoint: Some(SocketAddr::from(([127, 0, 0, 1], state.port))),
                allowed_ips: vec![state.subnet],
                keepalive: Some(super::join::KEEPALIVE),
            },
            mtu: state.mtu,
            probe: SocketAddr::new(server_ip, control::CONTROL_PORT),
        })
        .collect()
}

/// After a restart, peers' sessions are gone on this side only; they would
/// notice after their rekey timeout (~15 s). A packet to each peer seen
/// before makes this side handshake with it now.
async fn nudge_known_peers(server_ip: IpAddr, state: &ServerState) {
    let Ok(sock) = tokio::net::UdpSocket::bind(SocketAddr::new(server_ip, 0)).await else {
        return;
    };
    for p in state.peers.iter().filter(|p| p.endpoint.is_some()) {
        // The discard port: the packet only has to enter the tunnel.
        let _ = sock.send_to(b"", SocketAddr::new(p.address, 9)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    args: &ServeArgs,
    tokens: usize,
    net: &dyn crate::net::NetOps,
    device: Arc<dyn WgDevice>,
    store: StateDir,
    state: ServerState,
    follower: Option<&mut Follower>,
    mut shutdown: Shutdown,
) -> Result<(), Failure> {
    let iface = &args.common.iface;
    // The hub relays between its peers (sites and containers).
    net.enable_forwarding(iface).await?;
    let server_ip = Hub::server_address(state.subnet)?;
    nudge_known_peers(server_ip, &state).await;
    let hub = Arc::new(Hub::new(device, store, iface, state)?);
    let now = SystemTime::now();
    hub.prune(now).await?;
    hub.persist().await?;

    let api_addr = SocketAddr::new(server_ip, control::CONTROL_PORT);
    let listener = control::bind(api_addr).await?;
    let api = tokio::spawn(control::serve(listener, hub.clone(), shutdown.waiter()));
    let socket = hub.store().socket(iface);
    let local = control::bind_local(&socket)?;
    let local_api = Arc::new(ServerApi {
        hub: hub.clone(),
        device: hub.device(),
        iface: iface.clone(),
        endpoint_hint: args.endpoint.clone(),
        containers: follower.as_ref().map(|f| f.status()),
    });
    let local = tokio::spawn(control::serve_local(
        local,
        socket,
        local_api,
        shutdown.trigger_fn(),
        shutdown.waiter(),
    ));

    let tokens = hub
        .mint(tokens, args.token_ttl, now, args.endpoint.as_deref(), None)
        .await?;
    let follower = match follower {
        Some(f) => {
            f.reconcile_all().await?;
            Some(f)
        }
        None => None,
    };
    {
        let mut out = std::io::stdout().lock();
        for t in &tokens {
            writeln!(out, "{}", t.encode()).context("writing tokens to stdout")?;
        }
        out.flush().context("writing tokens to stdout")?;
    }
    if !tokens.is_empty() {
        let hint = args.endpoint.as_deref().unwrap_or("<this host's address>");
        tracing::info!(
            "{} token(s) valid for {}; on the other host run: tunnel join <TOKEN> {hint}",
            tokens.len(),
            humantime::format_duration(args.token_ttl)
        );
    }
    super::notify_ready();

    let stop_following = shutdown.waiter();
    let follow = async move {
        if let Some(f) = follower {
            f.follow(stop_following).await;
        }
    };
    let swaps = async {
        let mut last_prune = Instant::now();
        let mut last_seen = Instant::now();
        loop {
            // Poll quickly only while a joiner is switching keys.
            let tick = if hub.has_pending().await {
                Duration::from_millis(20)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = shutdown.wait() => return Ok::<(), Failure>(()),
                _ = hub.redeemed() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            let swapped = hub.complete_swaps(Instant::now()).await?;
            // A fresh peer's endpoint is worth saving at once: a server that
            // is killed and restarted uses it to reach the peer first.
            if swapped > 0 || last_seen.elapsed() > Duration::from_secs(10) {
                hub.record_endpoints().await?;
                last_seen = Instant::now();
            }
            if last_prune.elapsed() > Duration::from_secs(60) {
                hub.prune(SystemTime::now()).await?;
                last_prune = Instant::now();
            }
        }
    };
    let ((), swapped) = tokio::join!(follow, swaps);
    if let Err(e) = hub.record_endpoints().await {
        tracing::warn!("saving peer endpoints: {e}");
    }
    for (what, task) in [("control API", api), ("local control socket", local)] {
        match tokio::time::timeout(Duration::from_secs(3), task).await {
            Ok(Ok(Err(e))) => tracing::warn!("{what}: {e}"),
            Err(_) => tracing::warn!("{what} did not stop in time"),
            _ => {}
        }
    }
    swapped
}

/// The running server's local API: live status (peer stats named from the
/// state), tokens and revocation.
struct ServerApi {
    hub: Arc<Hub>,
    device: Arc<dyn WgDevice>,
    iface: String,
    endpoint_hint: Option<String>,
    containers: Option<crate::containers::ContainerView>,
}

#[async_trait::async_trait]
impl LocalApi for ServerApi {
    async fn report(&self) -> Vec<EndpointStatus> {
        let state = self.hub.snapshot().await;
        let mut main =
            crate::status::from_state(&self.iface, &crate::state::Endpoint::Server(state.clone()))
                .swap_remove(0);
        main.state = "up".into();
        main.backend = Some(self.device.backend().to_string());
        let live = self.device.peers().await.unwrap_or_default();
        main.peers = live
            .iter()
            .map(|p| {
                let (name, address) = if let Some(r) =
                    state.peers.iter().find(|r| r.public_key == p.public_key)
                {
                    (
                        r.name.clone().unwrap_or_else(|| "site".into()),
                        Some(r.address),
                    )
                } else if let Some(c) = state
                    .containers
                    .iter()
                    .find(|c| c.private_key.public_key() == p.public_key)
                {
                    (format!("container {}", c.container), Some(c.address))
                } else if let Some(i) = state.invites.iter().find(|i| i.public_key == p.public_key)
                {
                    let what = if i.redeemed_by.is_some() {
                        "used invite"
                    } else {
                        "unused invite"
                    };
                    (what.to_owned(), Some(i.address))
                } else {
                    ("unknown".to_owned(), None)
                };
                PeerReport::from_live(p, Some(name), address)
            })
            .collect();
        let mut out = vec![main];
        if let Some(c) = &self.containers {
            out.extend(c.report().await);
        }
        out
    }

    async fn tokens(&self, req: TokenRequest) -> Result<Vec<String>, String> {
        let ttl = Duration::from_secs(req.ttl_secs);
        let tokens = self
            .hub
            .mint(
                req.count,
                ttl,
                SystemTime::now(),
                self.endpoint_hint.as_deref(),
                req.name.as_deref(),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(tokens.iter().map(|t| t.encode()).collect())
    }

    async fn revoke(&self, target: &str) -> Result<Vec<String>, String> {
        self.hub.revoke(target).await.map_err(|e| e.to_string())
    }
}
