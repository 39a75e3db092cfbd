//! The command line: one file per command, each with its args and `run`.
//!
//! Exit codes: 0 success, 2 bad usage or input (including a bad token,
//! address or name, and missing privileges), 1 runtime failure.

pub mod down;
pub mod exit;
pub mod export;
pub mod join;
pub mod peer;
pub mod revoke;
pub mod route;
pub mod serve;
pub mod status;
pub mod token;
pub mod up;

pub use crate::shutdown::Shutdown;
use crate::wg::BackendChoice;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

pub const EXIT_CODES: &str = "Exit codes: 0 success, 2 bad usage or input, 1 runtime failure.";

/// Site-to-site WireGuard tunnels: `tunnel serve` on one host, `tunnel join <token> <ip>` on the other.
#[derive(Debug, Parser)]
#[command(name = "tunnel", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub verbosity: Verbosity,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Verbosity {
    /// More logs on stderr (-v debug, -vv trace); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Fewer logs on stderr (-q warnings only, -qq errors only)
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    pub quiet: u8,
}

impl Verbosity {
    /// The tracing filter for this verbosity: our crate at the chosen level,
    /// dependencies one step quieter.
    pub fn filter(&self) -> String {
        let level = match (self.verbose, self.quiet) {
            (0, 0) => "info",
            (1, _) => "debug",
            (v, _) if v >= 2 => "trace",
            (_, 1) => "warn",
            _ => "error",
        };
        let deps = if self.verbose >= 2 { "debug" } else { "warn" };
        // gotatun logs ERROR for its own tasks ending whenever a device is
        // stopped or rebinds on a key change, which is routine here; its
        // messages show from -vv on.
        let gotatun = if self.verbose >= 2 { "debug" } else { "off" };
        format!("{deps},gotatun={gotatun},tunnel={level}")
    }
}

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
    fn exposure(&self) -> crate::metrics::Exposure {
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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the hub endpoint, print join tokens on stdout, run until SIGINT/SIGTERM
    Serve(serve::ServeArgs),
    /// Join a hub with a token and run until SIGINT/SIGTERM
    Join(join::JoinArgs),
    /// Show endpoints, addresses, containers and peers (live while running, else saved)
    Status(status::StatusArgs),
    /// Mint more join tokens from the running server (printed on stdout, one per line)
    Token(token::TokenArgs),
    /// Remove a peer from the running server at once and free its address
    Revoke(revoke::RevokeArgs),
    /// Stock WireGuard clients (phones, laptops) of the running server
    Peer(peer::PeerArgs),
    /// Approve or reject the LANs sites ask to route through the running server
    Route(route::RouteArgs),
    /// Bring a joined site back from its saved state, containers included (no token needed)
    Up(up::UpArgs),
    /// Stop a running serve/join/up cleanly (same as SIGTERM)
    Down(down::DownArgs),
    /// Print a standard wg-quick config for a local endpoint (includes its private key)
    Export(export::ExportArgs),
    /// Print shell completions
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// A failed command: its exit code and the one line to print.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn input(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 2,
            error: error.into(),
        }
    }
}

impl<E: exit::Exit + std::error::Error + Send + Sync + 'static> From<E> for Failure {
    fn from(e: E) -> Self {
        Self {
            code: e.code(),
            error: e.into(),
        }
    }
}

/// A failure the command layer described itself: a runtime one.
impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self { code: 1, error }
    }
}

/// A spinner on stderr while a bring-up waits, when stderr is a terminal.
/// The spinner shows the library's steps.
pub(crate) struct Spinner(pub indicatif::ProgressBar);

impl crate::site::Progress for Spinner {
    fn step(&self, message: &str) {
        self.0.set_message(message.to_owned());
    }

    fn done(&self) {
        self.0.finish_and_clear();
    }
}

pub(crate) fn spinner() -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template"),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(100));
    pb
}

/// What a bring-up prints on stdout once it is up: its summary, followed
/// by what was attached.
pub(crate) fn summary_line(summary: String) -> impl FnOnce(&str) -> std::io::Result<()> {
    move |attached| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{summary}{attached}").and_then(|_| out.flush())
    }
}

fn parse_metrics(s: &str) -> Result<std::net::SocketAddr, String> {
    crate::metrics::parse_addr(s).map_err(|e| e.to_string())
}

/// Binds `--metrics` before the host is touched: a port in use is bad input.
pub(crate) async fn bind_metrics(
    args: &MetricsArgs,
) -> Result<Option<crate::metrics::Listener>, Failure> {
    match args.addr {
        Some(a) => Ok(Some(
            crate::metrics::bind(a, args.exposure())
                .await
                .map_err(Failure::input)?,
        )),
        None => Ok(None),
    }
}

/// The error of a command that needs a running instance.
pub(crate) fn not_running(local: &LocalArgs, e: crate::control::ControlError) -> Failure {
    use crate::control::ControlError;
    match e {
        ControlError::Connect { .. } => anyhow::anyhow!(
            "no running tunnel serves {} (no answer on {}); start it with `tunnel serve` or `tunnel up`",
            local.iface,
            local.socket().display()
        )
        .into(),
        ControlError::Refused { status, message } if status < 500 => {
            Failure::input(anyhow::anyhow!("{message}"))
        }
        other => other.into(),
    }
}

/// Connects to Docker and resolves the containers, when any are asked for:
/// run before the host is touched, so that a stopped engine or a wrong name
/// changes nothing.
pub(crate) async fn containers_up_front(
    references: &[String],
    by_label: bool,
) -> Result<
    Option<(
        std::sync::Arc<dyn crate::docker::ContainerRuntime>,
        Vec<crate::docker::ContainerInfo>,
    )>,
    Failure,
> {
    if references.is_empty() && !by_label {
        return Ok(None);
    }
    let runtime: std::sync::Arc<dyn crate::docker::ContainerRuntime> =
        std::sync::Arc::new(crate::docker::Bollard::connect().await?);
    let infos = crate::docker::resolve_all(runtime.as_ref(), references).await?;
    Ok(Some((runtime, infos)))
}

pub async fn run(command: Command, shutdown: Shutdown) -> Result<(), Failure> {
    match command {
        Command::Serve(args) => serve::run(args, shutdown).await,
        Command::Join(args) => join::run(args, shutdown).await,
        Command::Status(args) => status::run(args).await,
        Command::Token(args) => token::run(args).await,
        Command::Revoke(args) => revoke::run(args).await,
        Command::Peer(args) => peer::run(args).await,
        Command::Route(args) => route::run(args).await,
        Command::Up(args) => up::run(args, shutdown).await,
        Command::Down(args) => down::run(args).await,
        Command::Export(args) => export::run(args).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "tunnel", &mut std::io::stdout());
            Ok(())
        }
    }
}
