//! The admin socket: a Unix socket speaking one command a connection. The client writes
//! one line, weir writes the reply and closes; a reply that fails starts with `error: `.
//!
//! A line is parsed into a `Request` first, then acted on. Nothing an admin client sends
//! can hurt serving: lines are bounded (4 KiB), a client that sends no complete line in
//! time is disconnected, and clients at once are bounded too; when they are all taken, the
//! oldest one that has not sent its line yet makes room (`slots`), so slow clients can't
//! lock the operator out.
//!
//! The admin socket writes only single atomics (a backend's admin state) and asks the
//! control task for everything else (weights), so the control task stays the one writer
//! of the routing tables.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::backend::{Admin, Backend, Health};
use crate::balance::WEIGHT_RANGE;
use crate::control::{ControlError, ControlHandle};
use crate::net;
use crate::shutdown::Shutdown;
use crate::slots::{Slot, Slots};
use crate::tables::Tables;

/// A client must send its complete command line within this long.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest command line accepted, newline excluded.
pub const MAX_LINE: usize = 4096;
/// Admin clients at once; a newcomer beyond them takes the slot of the oldest client that
/// has not sent its line yet, or is told so and closed when every one is being answered.
pub const MAX_CLIENTS: usize = 64;

/// Why a command failed; the socket writes it as `error: …` (and only there).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("empty command; try \"help\"")]
    Empty,
    #[error("unknown command {0:?}; try \"help\"")]
    UnknownCommand(String),
    #[error(
        "unknown command {0:?}; usage: show backends [--json] | show listeners [--json] | show info [--json]"
    )]
    UnknownShow(String),
    #[error("usage: {0}")]
    Usage(String),
    #[error(
        "disconnected before a complete command line: {MAX_CLIENTS} admin clients at once, and a newer one needed the slot"
    )]
    Evicted,
    #[error("{0:?} is not POOL/BACKEND")]
    NotATarget(String),
    #[error("weight {0:?} is not a number from {lo} to {hi}", lo = WEIGHT_RANGE.start(), hi = WEIGHT_RANGE.end())]
    BadWeight(String),
    #[error("no backend {target:?} (known: {known})")]
    NoBackend { target: String, known: String },
    #[error(
        "{0} is retiring: it was removed by a reload and goes once its last connections close; add it back to the config to use it again"
    )]
    Retiring(Target),
    #[error("no complete command line within {0}; closing")]
    ReadTimeout(String),
    #[error("command line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("command is not valid UTF-8")]
    NotUtf8,
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// One parsed admin command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Help,
    ShowBackends { json: bool },
    ShowListeners { json: bool },
    ShowInfo { json: bool },
    Drain(Target),
    Disable(Target),
    Enable(Target),
    SetWeight(Target, u32),
    Reload,
}

/// A backend as typed: `POOL/BACKEND`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub pool: String,
    pub backend: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pool, self.backend)
    }
}

pub const HELP: &str = "\
commands:
  help                          this list
  show backends [--json]        every backend: pool, name, address, state, weight (and effective), connections, limit, queue, last check
  show listeners [--json]       every listener: name, protocol, bind, pool, connections
  show info [--json]            version, pid, uptime, config file and last reload, counts, file descriptors
  drain POOL/BACKEND            no new connections; open ones go on; health checks go on
  disable POOL/BACKEND          like drain, and its health checks pause
  enable POOL/BACKEND           back into rotation (state follows its health)
  set weight POOL/BACKEND N     weight 1..=1000, from the next pick on
  reload                        re-read the config file
states: up, down, draining, drained, disabled, retiring (removed by a reload, finishing its connections)
";

/// Parses one command line. `Err` is the reason, without the `error: ` prefix.
pub fn parse(line: &str) -> Result<Request, AdminError> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [] => Err(AdminError::Empty),
        ["help"] => Ok(Request::Help),
        ["show", "backends"] => Ok(Request::ShowBackends { json: false }),
        ["show", "backends", "--json"] => Ok(Request::ShowBackends { json: true }),
        ["show", "listeners"] => Ok(Request::ShowListeners { json: false }),
        ["show", "listeners", "--json"] => Ok(Request::ShowListeners { json: true }),
        ["show", "info"] => Ok(Request::ShowInfo { json: false }),
        ["show", "info", "--json"] => Ok(Request::ShowInfo { json: true }),
        ["show", ..] => Err(AdminError::UnknownShow(words.join(" "))),
        ["drain", target] => Ok(Request::Drain(target_of(target)?)),
        ["disable", target] => Ok(Request::Disable(target_of(target)?)),
        ["enable", target] => Ok(Request::Enable(target_of(target)?)),
        [verb @ ("drain" | "disable" | "enable"), ..] => {
            Err(AdminError::Usage(format!("{verb} POOL/BACKEND")))
        }
        ["set", "weight", target, weight] => {
            let target = target_of(target)?;
            let weight = weight
                .parse::<u32>()
                .ok()
                .filter(|w| WEIGHT_RANGE.contains(w))
                .ok_or_else(|| AdminError::BadWeight(weight.to_string()))?;
            Ok(Request::SetWeight(target, weight))
        }
        ["set", ..] => Err(AdminError::Usage("set weight POOL/BACKEND N".into())),
        ["reload"] => Ok(Request::Reload),
        [command, ..] => Err(AdminError::UnknownCommand(command.to_string())),
    }
}

fn target_of(word: &str) -> Result<Target, AdminError> {
    match word.split_once('/') {
        Some((pool, backend)) if !pool.is_empty() && !backend.is_empty() => Ok(Target {
            pool: pool.into(),
            backend: backend.into(),
        }),
        _ => Err(AdminError::NotATarget(word.to_string())),
    }
}

/// Acts on a request. `Err` is the reason, without the `error: ` prefix.
pub async fn execute(request: Request, control: &ControlHandle) -> Result<String, AdminError> {
    let tables = control.tables();
    match request {
        Request::Help => Ok(HELP.to_string()),
        Request::ShowBackends { json } => Ok(show_backends(&tables, json)),
        Request::ShowListeners { json } => Ok(show_listeners(&tables, json)),
        Request::ShowInfo { json } => {
            let info = crate::info::Info::of(control);
            Ok(if json {
                let mut text = serde_json::to_string_pretty(&info).unwrap_or_default();
                text.push('\n');
                text
            } else {
                info.text()
            })
        }
        Request::Drain(target) => {
            let backend = find(&tables, &target)?;
            backend.set_admin(Admin::Drain);
            control.admin_changed().await?;
            tracing::info!("{target}: drain (admin)");
            let open = backend.active();
            Ok(format!(
                "{target}: {}, {}\n",
                backend.state(),
                connections(open)
            ))
        }
        Request::Disable(target) => {
            let backend = find(&tables, &target)?;
            backend.set_admin(Admin::Disabled);
            control.admin_changed().await?;
            tracing::info!("{target}: disabled (admin); health checks paused");
            Ok(format!(
                "{target}: disabled, health checks paused, {}\n",
                connections(backend.active())
            ))
        }
        Request::Enable(target) => {
            let backend = find(&tables, &target)?;
            if backend.is_retiring() {
                return Err(AdminError::Retiring(target));
            }
            let config = control.config();
            let pool = config.pools.iter().find(|p| p.name == target.pool);
            let checked = pool.is_some_and(|p| p.health_check.is_some());
            let rechecked = checked && backend.enable_rechecked() == Admin::Disabled;
            if !checked {
                backend.set_admin(Admin::Enabled);
            }
            control.admin_changed().await?;
            if rechecked {
                tracing::info!("{target}: enabled (admin); down until a health check passes");
                return Ok(format!(
                    "{target}: enabled, now down until a health check passes (probing now)\n"
                ));
            }
            tracing::info!("{target}: enabled (admin)");
            Ok(format!("{target}: enabled, now {}\n", backend.state()))
        }
        Request::SetWeight(target, weight) => {
            let backend = find(&tables, &target)?;
            let was = backend.weight();
            control
                .set_weight(&target.pool, &target.backend, weight)
                .await?;
            Ok(format!("{target}: weight {weight} (was {was})\n"))
        }
        Request::Reload => Ok(control.reload().await? + "\n"),
    }
}

fn connections(n: u64) -> String {
    match n {
        1 => "1 connection open".into(),
        n => format!("{n} connections open"),
    }
}

fn find(tables: &Tables, target: &Target) -> Result<Arc<Backend>, AdminError> {
    if let Some(backend) = tables.backend(&target.pool, &target.backend) {
        return Ok(backend);
    }
    const SHOWN: usize = 20;
    let known: Vec<String> = tables
        .backends()
        .iter()
        .map(|b| format!("{}/{}", b.pool, b.name))
        .collect();
    let mut list = known
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if known.len() > SHOWN {
        let _ = write!(list, ", … {} more", known.len() - SHOWN);
    }
    if known.is_empty() {
        list = "none".into();
    }
    Err(AdminError::NoBackend {
        target: target.to_string(),
        known: list,
    })
}

fn show_backends(tables: &Tables, json: bool) -> String {
    let backends = tables.backends();
    if json {
        let rows: Vec<BackendRow> = (backends.iter())
            .map(|b| BackendRow::of(b, queued(tables, &b.pool)))
            .collect();
        return json_lines(&rows);
    }
    let header = [
        "POOL",
        "BACKEND",
        "ADDRESS",
        "STATE",
        "WEIGHT",
        "EFF",
        "ACTIVE",
        "MAX",
        "BACKUP",
        "QUEUED",
        "TOTAL",
        "LAST CHECK",
    ];
    let rows = backends
        .iter()
        .map(|b| {
            let last = b.last_check();
            vec![
                b.pool.clone(),
                b.name.clone(),
                b.shown_address(),
                b.state().to_string(),
                b.weight().to_string(),
                b.effective_weight().to_string(),
                b.active().to_string(),
                b.max_connections().map_or("-".into(), |m| m.to_string()),
                if b.is_backup() { "yes" } else { "no" }.to_string(),
                queued(tables, &b.pool).to_string(),
                b.total().to_string(),
                if last.is_empty() {
                    "-".to_string()
                } else {
                    last.to_string()
                },
            ]
        })
        .collect::<Vec<_>>();
    table(&header, &rows)
}

/// Connections waiting in the queue of pool `pool` (`queue_timeout`).
fn queued(tables: &Tables, pool: &str) -> usize {
    tables.pools.get(pool).map_or(0, |p| p.queue.len())
}

fn show_listeners(tables: &Tables, json: bool) -> String {
    let listeners = tables.listeners.values();
    if json {
        let rows: Vec<ListenerRow> = listeners
            .map(|l| ListenerRow {
                name: &l.name,
                protocol: l.protocol.as_str(),
                bind: l.bind.to_string(),
                pool: l.pool.load().name.clone(),
                active: l.active(),
                queued: l.pool.load().queue.len(),
                total: l.total(),
            })
            .collect();
        return json_lines(&rows);
    }
    let header = [
        "LISTENER", "PROTOCOL", "BIND", "POOL", "ACTIVE", "QUEUED", "TOTAL",
    ];
    let rows = listeners
        .map(|l| {
            vec![
                l.name.clone(),
                l.protocol.as_str().to_string(),
                l.bind.to_string(),
                l.pool.load().name.clone(),
                l.active().to_string(),
                l.pool.load().queue.len().to_string(),
                l.total().to_string(),
            ]
        })
        .collect::<Vec<_>>();
    table(&header, &rows)
}

/// One backend in `show backends --json`; fields in the order of the table.
#[derive(serde::Serialize)]
struct BackendRow<'a> {
    pool: &'a str,
    name: &'a str,
    /// As written in the config (may be a DNS name).
    address: &'a str,
    /// Where connections go: what it resolved to; null while its host name has not.
    resolved: Option<String>,
    state: &'static str,
    /// The two inputs of `state`: what the checks say, what the operator said.
    health: &'static str,
    admin: &'static str,
    weight: u32,
    /// The weight its share follows now: below `weight` during a slow-start ramp.
    effective_weight: u32,
    /// How far into its slow-start ramp, in percent; null when not ramping.
    slow_start_percent: Option<u8>,
    active: u64,
    /// `max_connections`; null when unlimited.
    max_connections: Option<u64>,
    backup: bool,
    /// Connections waiting in its pool's queue.
    queued: usize,
    total: u64,
    last_check: Option<String>,
}

impl<'a> BackendRow<'a> {
    fn of(b: &'a Backend, queued: usize) -> Self {
        let last = b.last_check();
        BackendRow {
            pool: &b.pool,
            name: &b.name,
            address: &b.address,
            resolved: b.resolved_addr().map(|a| a.to_string()),
            state: b.state().as_str(),
            health: match b.health() {
                Health::Up => "up",
                Health::Down => "down",
            },
            admin: match b.admin() {
                Admin::Enabled => "enabled",
                Admin::Drain => "drain",
                Admin::Disabled => "disabled",
            },
            weight: b.weight(),
            effective_weight: b.effective_weight(),
            slow_start_percent: b.ramp_percent(),
            active: b.active(),
            max_connections: b.max_connections(),
            backup: b.is_backup(),
            queued,
            total: b.total(),
            last_check: (!last.is_empty()).then(|| last.to_string()),
        }
    }
}

#[derive(serde::Serialize)]
struct ListenerRow<'a> {
    name: &'a str,
    protocol: &'static str,
    bind: String,
    pool: String,
    active: u64,
    /// Connections of its pool waiting for a backend slot.
    queued: usize,
    total: u64,
}

fn json_lines<T: serde::Serialize>(rows: &[T]) -> String {
    let mut text = serde_json::to_string_pretty(rows).unwrap_or_else(|_| "[]".into());
    text.push('\n');
    text
}

/// Left-aligned columns two spaces apart; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 == widths.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// The bound admin socket. Dropping it removes the socket file (when it is still ours).
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the file we created: another instance's file is never removed.
    identity: (u64, u64),
}

impl AdminSocket {
    /// Creates the socket at `path`, mode 0600 from the first moment it can be reached:
    /// it is bound inside a private (0700) directory next to `path`, chmodded, then
    /// renamed into place. A stale socket file (left by a crash) is replaced; a live one
    /// (another instance answers on it) is an error naming the path.
    pub async fn bind(path: &Path) -> anyhow::Result<AdminSocket> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    anyhow::bail!(
                        "admin socket {}: the path exists and is not a socket; refusing to replace it",
                        path.display()
                    );
                }
                if UnixStream::connect(path).await.is_ok() {
                    anyhow::bail!(
                        "admin socket {}: another running weir answers on it; stop it or choose another admin.socket",
                        path.display()
                    );
                }
                tracing::info!(
                    "admin socket {}: replacing a stale socket file",
                    path.display()
                );
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("admin socket {}", path.display()));
            }
        }
        // The staging path `weir check` measured: the two can't drift apart.
        let temporary = crate::config::admin_socket_staging(path, std::process::id());
        let private = temporary.parent().unwrap_or(Path::new(".")).to_path_buf();
        let listener = bind_private(&private, &temporary, path)
            .with_context(|| format!("cannot create the admin socket {}", path.display()));
        let _ = std::fs::remove_dir(&private);
        let listener = listener?;
        let meta =
            std::fs::metadata(path).with_context(|| format!("admin socket {}", path.display()))?;
        Ok(AdminSocket {
            listener,
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn bind_private(private: &Path, temporary: &Path, path: &Path) -> io::Result<UnixListener> {
    // Left over from a crashed process that had our pid: clear it.
    let _ = std::fs::remove_file(temporary);
    let _ = std::fs::remove_dir(private);
    std::fs::DirBuilder::new().mode(0o700).create(private)?;
    let result = (|| {
        let std_listener = std::os::unix::net::UnixListener::bind(temporary)?;
        std::fs::set_permissions(temporary, std::fs::Permissions::from_mode(0o600))?;
        std_listener.set_nonblocking(true)?;
        std::fs::rename(temporary, path)?;
        UnixListener::from_std(std_listener)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(temporary);
    }
    result
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.identity
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves the admin protocol until accepting stops, then removes the socket file.
pub async fn serve(
    socket: AdminSocket,
    control: ControlHandle,
    shutdown: Shutdown,
    read_timeout: Duration,
) {
    let slots = Slots::new(MAX_CLIENTS);
    let what = format!("admin socket {}", socket.path().display());
    tracing::info!("admin socket listening on {}", socket.path().display());
    let stop = shutdown.stop_accepting.clone();
    net::accept_loop(
        &what,
        &stop,
        || socket.listener.accept(),
        |(stream, _): (UnixStream, tokio::net::unix::SocketAddr)| {
            let Some(slot) = slots.take() else {
                // Never waits: a full socket buffer just loses the message.
                let _ = stream.try_write(b"error: too many admin clients at once; try again\n");
                return;
            };
            let control = control.clone();
            let stop = stop.clone();
            shutdown.tracker.spawn(async move {
                tokio::select! {
                    () = client(stream, &control, read_timeout, &slot) => {}
                    () = stop.cancelled() => {}
                }
                drop(slot);
            });
        },
    )
    .await;
    tracing::debug!("admin socket {}: closed", socket.path().display());
}

async fn client(
    mut stream: UnixStream,
    control: &ControlHandle,
    read_timeout: Duration,
    slot: &Slot,
) {
    let line = tokio::select! {
        // The line first: one whose line is already in the socket when a newcomer takes
        // its slot (a burst of connects) still gets it read, and answered.
        biased;
        line = tokio::time::timeout(read_timeout, read_line(&mut stream)) => line,
        () = slot.evicted.cancelled() => Ok(Err(LineError::Evicted)),
    };
    slot.request_read();
    let reply = match line {
        Err(_) => Err(AdminError::ReadTimeout(
            humantime::format_duration(read_timeout).to_string(),
        )),
        Ok(Err(LineError::Io)) => return,
        Ok(Err(LineError::Evicted)) => Err(AdminError::Evicted),
        Ok(Err(LineError::TooLong)) => Err(AdminError::TooLong),
        Ok(Ok(line)) => match std::str::from_utf8(&line) {
            Err(_) => Err(AdminError::NotUtf8),
            Ok(text) => match parse(text) {
                Ok(request) => execute(request, control).await,
                Err(e) => Err(e),
            },
        },
    };
    let text = match reply {
        Ok(text) => text,
        Err(reason) => format!("error: {reason}\n"),
    };
    // A client that doesn't read its reply doesn't hold the slot for long.
    let _ = tokio::time::timeout(read_timeout, async {
        stream.write_all(text.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

enum LineError {
    TooLong,
    Io,
    /// Its slot went to a newer client before the line was complete.
    Evicted,
}

/// Reads one line (up to `\n`, or EOF), without the line ending; never reads more than
/// `MAX_LINE` + 1 bytes.
async fn read_line(stream: &mut UnixStream) -> Result<Vec<u8>, LineError> {
    let mut line = Vec::with_capacity(256);
    let mut reader = BufReader::new(stream.take(MAX_LINE as u64 + 1));
    let n = reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|_| LineError::Io)?;
    if n == 0 {
        return Err(LineError::Io);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> Target {
        target_of(s).unwrap()
    }

    /// The reason as the socket writes it after `error: `.
    fn error(line: &str) -> String {
        parse(line).unwrap_err().to_string()
    }

    #[test]
    fn parses_every_command() {
        assert_eq!(parse("help").ok(), Some(Request::Help));
        assert_eq!(
            parse("show info --json").ok(),
            Some(Request::ShowInfo { json: true })
        );
        assert_eq!(
            parse("show info").ok(),
            Some(Request::ShowInfo { json: false })
        );
        assert_eq!(
            parse("  show   backends ").ok(),
            Some(Request::ShowBackends { json: false })
        );
        assert_eq!(
            parse("show backends --json").ok(),
            Some(Request::ShowBackends { json: true })
        );
        assert_eq!(
            parse("show listeners --json").ok(),
            Some(Request::ShowListeners { json: true })
        );
        assert_eq!(parse("drain p/b").ok(), Some(Request::Drain(target("p/b"))));
        assert_eq!(
            parse("disable p/b").ok(),
            Some(Request::Disable(target("p/b")))
        );
        assert_eq!(
            parse("enable p/b").ok(),
            Some(Request::Enable(target("p/b")))
        );
        assert_eq!(
            parse("set weight p/127.0.0.1:80 7").ok(),
            Some(Request::SetWeight(target("p/127.0.0.1:80"), 7))
        );
        assert_eq!(parse("reload").ok(), Some(Request::Reload));
    }

    #[test]
    fn errors_name_what_was_typed() {
        assert_eq!(error(""), "empty command; try \"help\"");
        assert_eq!(
            error("frobnicate now"),
            "unknown command \"frobnicate\"; try \"help\""
        );
        assert_eq!(error("drain pool"), "\"pool\" is not POOL/BACKEND");
        assert_eq!(error("drain"), "usage: drain POOL/BACKEND");
        assert_eq!(
            error("set weight p/b 0"),
            "weight \"0\" is not a number from 1 to 1000"
        );
        assert_eq!(
            error("set weight p/b lots"),
            "weight \"lots\" is not a number from 1 to 1000"
        );
        assert!(error("show everything").contains("show everything"));
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "BB", "C"],
            &[vec!["xxx".into(), "y".into(), "last".into()]],
        );
        assert_eq!(t, "A    BB  C\nxxx  y   last\n");
    }
}
