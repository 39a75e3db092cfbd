//! `tunnel serve`: the hub endpoint.

use super::{EndpointArgs, Failure, Shutdown};
use crate::control;
use crate::hub::{self, Hub};
use crate::keys::PrivateKey;
use crate::net::{Netlink, validate_ifname};
use crate::state::{ServerState, StateDir};
use crate::wg::{self, DeviceSpec, WgDevice};
use anyhow::{Context, anyhow};
use clap::Args;
use ipnetwork::IpNetwork;
use std::io::Write;
use std::net::SocketAddr;
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
    /// Number of join tokens to print (0 on a restart that needs none)
    #[arg(long, default_value_t = 1)]
    pub tokens: usize,
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
            Ok(saved)
        }
        None => Ok(ServerState {
            private_key: PrivateKey::generate(),
            port: args.port.unwrap_or(DEFAULT_PORT),
            subnet: args
                .subnet
                .unwrap_or_else(|| DEFAULT_SUBNET.parse().expect("valid default")),
            peers: vec![],
            invites: vec![],
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
    let store = StateDir::new(&args.common.state_dir);
    let state = load_or_new(&args, &store)?;
    let server_ip = Hub::server_address(state.subnet)?;
    let now = SystemTime::now();

    let net = Arc::new(Netlink::connect()?);
    let spec = DeviceSpec {
        name: iface.clone(),
        private_key: state.private_key.clone(),
        listen_port: state.port,
        peers: hub::device_peers(&state, now),
        addresses: vec![
            IpNetwork::new(server_ip, state.subnet.prefix()).expect("prefix of the subnet"),
        ],
        mtu: args.common.mtu,
    };
    let device: Arc<dyn WgDevice> = Arc::from(
        wg::create(&spec, args.common.backend, net)
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

    let result = serve(&args, device.clone(), store, state, shutdown).await;
    let teardown = device.destroy().await.context(format!("removing {iface}"));
    tracing::info!("{iface} removed");
    result?;
    Ok(teardown?)
}

async fn serve(
    args: &ServeArgs,
    device: Arc<dyn WgDevice>,
    store: StateDir,
    state: ServerState,
    mut shutdown: Shutdown,
) -> Result<(), Failure> {
    let server_ip = Hub::server_address(state.subnet)?;
    let hub = Arc::new(Hub::new(device, store, &args.common.iface, state)?);
    let now = SystemTime::now();
    hub.prune(now).await?;

    let api_addr = SocketAddr::new(server_ip, control::CONTROL_PORT);
    let listener = control::bind(api_addr).await?;
    let api_shutdown = {
        let mut s = shutdown.clone();
        async move { s.wait().await }
    };
    let api = tokio::spawn(control::serve(listener, hub.clone(), api_shutdown));

    let tokens = hub
        .mint(args.tokens, args.token_ttl, now, args.endpoint.as_deref())
        .await?;
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

    let mut last_prune = Instant::now();
    loop {
        // Poll quickly only while a joiner is switching keys.
        let tick = if hub.has_pending().await {
            Duration::from_millis(20)
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = hub.redeemed() => {}
            _ = tokio::time::sleep(tick) => {}
        }
        hub.complete_swaps(Instant::now()).await?;
        if last_prune.elapsed() > Duration::from_secs(60) {
            hub.prune(SystemTime::now()).await?;
            last_prune = Instant::now();
        }
    }
    match tokio::time::timeout(Duration::from_secs(3), api).await {
        Ok(Ok(Err(e))) => tracing::warn!("control API: {e}"),
        Err(_) => tracing::warn!("control API did not stop in time"),
        _ => {}
    }
    Ok(())
}
