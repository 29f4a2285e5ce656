//! `weir run`: load the config, start serving, and handle signals until told to stop.

use std::path::Path;
use std::process::ExitCode;

use crate::server::Server;
use crate::shutdown::{Signal, Signals};

pub async fn run(config_path: &Path) -> ExitCode {
    let config = match crate::config::load_with_warnings(config_path) {
        Ok((c, warnings)) => {
            // What `weir check` warns about (a pool no listener uses, a check timeout
            // longer than its interval): said at start too, for whoever skipped check.
            for warning in warnings {
                tracing::warn!("{warning}");
            }
            c
        }
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("weir: cannot install signal handlers: {e}");
            return ExitCode::from(1);
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
    let signal = loop {
        match signals.next().await {
            Signal::Terminate(name) => break name,
            // A reload resolves every backend name, which can take long: a SIGTERM
            // meanwhile stops weir instead of waiting for it.
            Signal::Reload => tokio::select! {
                () = reload(&server) => {}
                name = signals.terminate() => break name,
            },
        }
    };
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    tracing::info!(
        "{signal}: stopped accepting; letting open connections finish for up to {} (send it again to close them now)",
        humantime::format_duration(server.config().shutdown_timeout)
    );
    let left = tokio::select! {
        left = server.stop() => left,
        again = signals.terminate() => {
            tracing::warn!("{again} again: closing every open connection now");
            server.shutdown.hard.cancel();
            server.stop().await
        }
    };
    if left > 0 {
        tracing::warn!("closed {left} connections still open when the grace period ended");
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// SIGHUP: re-read the config file, as admin `reload` does. An invalid config changes
/// nothing; the control task logs the outcome, success or every problem.
async fn reload(server: &Server) {
    let path = server
        .handle
        .config_path
        .as_deref()
        .map(|p| p.display().to_string());
    tracing::info!("SIGHUP: reloading {}", path.unwrap_or_default());
    notify_systemd(&[sd_notify::NotifyState::Reloading, monotonic_now()]);
    let _ = server.handle.reload().await;
    notify_systemd(&[sd_notify::NotifyState::Ready]);
}

/// systemd (v253+) wants RELOADING=1 to come with MONOTONIC_USEC, CLOCK_MONOTONIC in µs.
fn monotonic_now() -> sd_notify::NotifyState<'static> {
    #[cfg(target_os = "linux")]
    {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = i128::from(now.tv_sec) * 1_000_000 + i128::from(now.tv_nsec) / 1_000;
        sd_notify::NotifyState::MonotonicUsec(usec)
    }
    #[cfg(not(target_os = "linux"))]
    {
        sd_notify::NotifyState::Status("reloading")
    }
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
