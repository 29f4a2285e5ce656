//! `weir ctl`: the client side of the admin socket. Sends one command, prints the reply.
//!
//! `drain POOL/BACKEND --wait [--timeout DURATION]` is the one command with client-side
//! behaviour: after the drain it polls `show backends --json` until the backend is
//! `drained` or the timeout passes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How `weir ctl` ended; `main` turns it into the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The command succeeded (exit 0).
    Success,
    /// weir answered with an `error:` reply, or `--wait` timed out (exit 1).
    Failed,
    /// The socket could not be reached, or the command line or config was unusable (exit 2).
    Unreachable,
}

/// Why `weir ctl` could not do what was typed; printed as `weir ctl: …`.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the admin socket {socket}: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error("no reply on the admin socket {socket} within {timeout}")]
    NoReply { socket: String, timeout: String },
    #[error("the admin socket {0} closed without a reply")]
    Closed(String),
}

/// A reply takes at most this long; a hung instance is reported, not waited on forever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// `drain --wait` without `--timeout`.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(300);
const POLL_INTERVAL: Duration = Duration::from_millis(100);

pub async fn run(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    command: Vec<String>,
) -> Outcome {
    let socket = match socket {
        Some(path) => path,
        None => {
            let config_path = config.unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH));
            match crate::config::admin_socket(&config_path) {
                Ok(socket) => match socket {
                    Some(path) => path,
                    None => {
                        eprintln!(
                            "weir ctl: {}: admin.socket is not set; set it or pass -s SOCKET",
                            config_path.display()
                        );
                        return Outcome::Unreachable;
                    }
                },
                Err(errors) => {
                    eprintln!("{errors}");
                    return Outcome::Unreachable;
                }
            }
        }
    };
    let wait = match parse_wait(&command) {
        Ok(w) => w,
        Err(message) => {
            eprintln!("weir ctl: {message}");
            return Outcome::Unreachable;
        }
    };
    match wait {
        None => {
            let line = command.join(" ");
            match send(&socket, &line).await {
                Ok(reply) => print_reply(&reply),
                Err(message) => {
                    eprintln!("weir ctl: {message}");
                    Outcome::Unreachable
                }
            }
        }
        Some(wait) => drain_and_wait(&socket, &wait).await,
    }
}

/// `drain TARGET --wait [--timeout D]`, parsed.
#[derive(Debug, PartialEq)]
struct Wait {
    target: String,
    timeout: Duration,
}

/// `Ok(None)`: not a `--wait` command, send it as typed.
fn parse_wait(command: &[String]) -> Result<Option<Wait>, CtlError> {
    let usage = |text: &str| CtlError::Usage(text.to_string());
    if !command.iter().any(|w| w == "--wait" || w == "--timeout") {
        return Ok(None);
    }
    let mut words = command.iter().map(String::as_str);
    if words.next() != Some("drain") {
        return Err(usage(
            "--wait and --timeout only go with drain POOL/BACKEND",
        ));
    }
    let mut target = None;
    let mut wait = false;
    let mut timeout = DEFAULT_WAIT_TIMEOUT;
    while let Some(word) = words.next() {
        match word {
            "--wait" => wait = true,
            "--timeout" => {
                let value = words
                    .next()
                    .ok_or_else(|| usage("--timeout needs a duration, e.g. 5m or 30s"))?;
                timeout = humantime::parse_duration(value)
                    .map_err(|e| usage(&format!("--timeout {value:?}: {e}")))?;
            }
            w if target.is_none() && !w.starts_with("--") => target = Some(w.to_string()),
            w => {
                return Err(usage(&format!(
                    "unexpected {w:?}; usage: drain POOL/BACKEND --wait [--timeout DURATION]"
                )));
            }
        }
    }
    if !wait {
        return Err(usage("--timeout only goes with --wait"));
    }
    let target =
        target.ok_or_else(|| usage("usage: drain POOL/BACKEND --wait [--timeout DURATION]"))?;
    Ok(Some(Wait { target, timeout }))
}

fn print_reply(reply: &str) -> Outcome {
    if reply.starts_with("error:") {
        eprint!("{}", with_newline(reply));
        Outcome::Failed
    } else {
        print!("{}", with_newline(reply));
        Outcome::Success
    }
}

fn with_newline(text: &str) -> String {
    if text.is_empty() || text.ends_with('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    }
}

/// Sends one line and returns the whole reply. `Err` names the socket and the OS error.
pub async fn send(socket: &Path, line: &str) -> Result<String, CtlError> {
    let shown = || socket.display().to_string();
    let reach = |e: std::io::Error| CtlError::Unreachable {
        socket: shown(),
        reason: e.to_string(),
    };
    let mut stream = UnixStream::connect(socket).await.map_err(reach)?;
    let exchange = async {
        stream.write_all(format!("{line}\n").as_bytes()).await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = tokio::time::timeout(REPLY_TIMEOUT, exchange)
        .await
        .map_err(|_| CtlError::NoReply {
            socket: shown(),
            timeout: humantime::format_duration(REPLY_TIMEOUT).to_string(),
        })?
        .map_err(reach)?;
    if reply.is_empty() {
        return Err(CtlError::Closed(shown()));
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

async fn drain_and_wait(socket: &Path, wait: &Wait) -> Outcome {
    let started = Instant::now();
    match send(socket, &format!("drain {}", wait.target)).await {
        Ok(reply) if reply.starts_with("error:") => return print_reply(&reply),
        Ok(_) => {}
        Err(message) => {
            eprintln!("weir ctl: {message}");
            return Outcome::Unreachable;
        }
    }
    let deadline = started + wait.timeout;
    loop {
        let reply = match send(socket, "show backends --json").await {
            Ok(reply) if reply.starts_with("error:") => return print_reply(&reply),
            Ok(reply) => reply,
            Err(message) => {
                eprintln!("weir ctl: {message}");
                return Outcome::Unreachable;
            }
        };
        let Some((state, active)) = backend_state(&reply, &wait.target) else {
            eprintln!("error: {} is gone (removed by a reload?)", wait.target);
            return Outcome::Failed;
        };
        match state.as_str() {
            "drained" => {
                println!(
                    "{}: drained after {}",
                    wait.target,
                    format_elapsed(started.elapsed())
                );
                return Outcome::Success;
            }
            "draining" => {}
            other => {
                eprintln!(
                    "error: {} is {other} now, no longer draining (enabled or disabled meanwhile?)",
                    wait.target
                );
                return Outcome::Failed;
            }
        }
        if Instant::now() >= deadline {
            eprintln!(
                "error: {} still draining after {}: {} still open",
                wait.target,
                humantime::format_duration(wait.timeout),
                if active == 1 {
                    "1 connection".to_string()
                } else {
                    format!("{active} connections")
                }
            );
            return Outcome::Failed;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(POLL_INTERVAL.min(left)).await;
    }
}

/// (state, active) of `POOL/BACKEND` in a `show backends --json` reply.
fn backend_state(reply: &str, target: &str) -> Option<(String, u64)> {
    let rows: Vec<serde_json::Value> = serde_json::from_str(reply).ok()?;
    let (pool, name) = target.split_once('/')?;
    rows.iter()
        .find(|row| row["pool"] == pool && row["name"] == name)
        .map(|row| {
            (
                row["state"].as_str().unwrap_or("").to_string(),
                row["active"].as_u64().unwrap_or(0),
            )
        })
}

/// Tenths of a second below ten seconds, whole seconds above.
fn format_elapsed(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn wait_flags_parse() {
        assert_eq!(parse_wait(&words("show backends")), Ok(None));
        assert_eq!(
            parse_wait(&words("drain p/b --wait")),
            Ok(Some(Wait {
                target: "p/b".into(),
                timeout: DEFAULT_WAIT_TIMEOUT
            }))
        );
        assert_eq!(
            parse_wait(&words("drain p/b --wait --timeout 200ms")),
            Ok(Some(Wait {
                target: "p/b".into(),
                timeout: Duration::from_millis(200)
            }))
        );
        assert!(parse_wait(&words("enable p/b --wait")).is_err());
        assert!(parse_wait(&words("drain p/b --timeout 1s")).is_err());
        assert!(parse_wait(&words("drain p/b --wait --timeout soon")).is_err());
    }
}
