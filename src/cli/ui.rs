//! What the commands share around a bring-up: the spinner, the summary
//! line on stdout, `--metrics` bound up front, Docker resolved up front,
//! and the error of a command that needs a running instance.

use super::{Failure, LocalArgs, MetricsArgs};

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
