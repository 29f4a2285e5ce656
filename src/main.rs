//! `weir`: parse the command line, set up logging, run. Exit codes live here only:
//! 0 success, 1 runtime failure, 2 invalid config (or, for `ctl`, socket unreachable).

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use weir::cli::{Cli, Command, LogFormat};

/// jemalloc rather than glibc's malloc: per-connection allocations (the task, tokio's I/O
/// registrations) pack tighter, which roughly halves an idle connection's memory
/// (docs/performance.md).
#[cfg(all(unix, not(target_os = "macos")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo tells its own story on stdout; only warnings (a backend dying) join it.
    let default_level = if matches!(cli.command, Command::Demo) {
        "warn"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weir: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Check { config } => weir::check::run(&config).await,
            Command::Run { config } => weir::run::run(&config).await,
            Command::Ctl {
                socket,
                config,
                command,
            } => match weir::ctl::run(socket, config, command).await {
                weir::ctl::Outcome::Success => ExitCode::SUCCESS,
                weir::ctl::Outcome::Failed => ExitCode::from(1),
                weir::ctl::Outcome::Unreachable => ExitCode::from(2),
            },
            Command::Demo => weir::demo::run().await,
        }
    })
}

fn init_logging(format: LogFormat, default_level: &str) {
    // An invalid RUST_LOG falls back to the default level, with a warning naming it.
    let (filter, invalid) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => {
            let given = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
            let invalid = given.map(|v| (v, e.to_string()));
            (EnvFilter::new(default_level), invalid)
        }
    };
    // Colour only for a person at a terminal: never into files, pipes or the journal, and
    // never with NO_COLOR set (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    weir::proxy::access::set_text_format(format == LogFormat::Text);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some((value, why)) = invalid {
        tracing::warn!(rust_log = %value, "RUST_LOG {value:?} is invalid ({why}); using {default_level:?}");
    }
}
