//! The command line: one file per command, each with its args and `run`.
//!
//! Exit codes: 0 success, 2 bad usage or input (including a bad token,
//! address or name, and missing privileges), 1 runtime failure.

mod args;
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
mod ui;
pub mod up;

pub use args::{EndpointArgs, LanArgs, LocalArgs, MetricsArgs, Toggle};
pub(crate) use ui::{
    Spinner, bind_metrics, containers_up_front, not_running, spinner, summary_line,
};

pub use crate::shutdown::Shutdown;
use clap::{Args, Parser, Subcommand};

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

/// `--proxy-ca`: a file that can be read, checked before the host is
/// touched (its certificates are parsed when the proxy is dialled).
fn check_proxy_ca(file: Option<&std::path::Path>) -> Result<(), Failure> {
    match file {
        Some(f) => std::fs::metadata(f)
            .map(drop)
            .map_err(|e| Failure::input(anyhow::anyhow!("--proxy-ca {}: {e}", f.display()))),
        None => Ok(()),
    }
}
