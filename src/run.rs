//! `weir run`: load the config, start serving, and handle signals until told to stop.

use std::path::Path;
use std::process::ExitCode;

use crate::control::Server;
use crate::shutdown::terminate_signal;

pub async fn run(config_path: &Path) -> ExitCode {
    let config = match crate::config::load(config_path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    raise_open_file_limit();
    let server = match Server::start(config, Some(config_path.to_path_buf())).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot start: {e:#}");
            return ExitCode::from(1);
        }
    };
    tracing::info!("weir {} running", env!("CARGO_PKG_VERSION"));
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    let signal = terminate_signal().await;
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    tracing::info!(
        "{signal}: stopped accepting; letting open connections finish for up to {}",
        humantime::format_duration(server.config.shutdown_timeout)
    );
    let left = server.stop().await;
    if left > 0 {
        tracing::warn!("closed {left} connections still open when the grace period ended");
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// A load balancer holds two sockets per connection: raise the soft open-file limit to
/// the hard limit so the default 1024 doesn't cap it at ~500 connections.
pub fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        if limit.current < limit.maximum {
            let raised = rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => tracing::debug!("open-file limit raised to {:?}", limit.maximum),
                Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
            }
        }
    }
}

/// Tells systemd (Type=notify) what weir is doing; a no-op when not started by systemd.
pub fn notify_systemd(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}
