//! The access log (`listeners.NAME.access_log: true`): one line per finished connection
//! (udp: per ended session), at info level under the tracing target `weir::access`, so
//! `RUST_LOG` can route or silence it (`RUST_LOG=info,weir::access=off`).
//!
//! A line is formatted once the connection has ended, from what the data path already
//! knows; nothing is added to the accept or splice path. With `--log-format json` its
//! facts are fields of their own (`listener`, `pool`, `backend`, `client`,
//! `bytes_to_backend`, `bytes_to_client`, `duration_ms`, `connect_ms`, `retries`, `end`);
//! as text it is one line after HAProxy's `tcplog`:
//!
//! ```text
//! CLIENT LISTENER POOL/BACKEND CONNECT_MS/DURATION_MS BYTES_TO_BACKEND/BYTES_TO_CLIENT END retries=N
//! ```
//!
//! with `-` for a backend never picked and `-1` for a connect never made.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The tracing target of access lines.
pub const TARGET: &str = "weir::access";

/// Whether logs are text (set once by `main` before the first connection): text lines
/// carry the facts in the message, JSON lines as fields.
static TEXT: AtomicBool = AtomicBool::new(true);

/// Chooses the text or JSON shape of access lines (`--log-format`).
pub fn set_text_format(text: bool) {
    TEXT.store(text, Ordering::Relaxed);
}

/// One finished connection or session.
pub struct Entry<'a> {
    pub listener: &'a str,
    pub pool: &'a str,
    /// Empty when no backend was picked (`no_backend`, `max_connections`).
    pub backend: &'a str,
    pub client: SocketAddr,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    /// From accept (udp: the session's first datagram) to the end.
    pub duration: Duration,
    /// The successful connect's duration; None when none was made.
    pub connect: Option<Duration>,
    /// Other backends tried after a failed connect.
    pub retries: u32,
    /// Its name in shared/interface.md (`closed`, `client_reset`, `no_backend`, …).
    pub end: &'a str,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Entry<'_> {
    /// Logs the entry (a no-op unless `weir::access` is enabled at info).
    pub fn log(&self) {
        if TEXT.load(Ordering::Relaxed) {
            tracing::info!(target: TARGET, "{}", self.text());
        } else {
            tracing::info!(
                target: TARGET,
                listener = self.listener,
                pool = self.pool,
                backend = self.backend,
                client = %self.client,
                bytes_to_backend = self.bytes_to_backend,
                bytes_to_client = self.bytes_to_client,
                duration_ms = ms(self.duration),
                connect_ms = self.connect.map(ms),
                retries = self.retries,
                end = self.end,
                "access"
            );
        }
    }

    /// The text line (module docs).
    pub fn text(&self) -> String {
        let backend = if self.backend.is_empty() {
            "-"
        } else {
            self.backend
        };
        let connect = self.connect.map_or(-1, |c| ms(c) as i64);
        format!(
            "{} {} {}/{} {}/{} {}/{} {} retries={}",
            self.client,
            self.listener,
            self.pool,
            backend,
            connect,
            ms(self.duration),
            self.bytes_to_backend,
            self.bytes_to_client,
            self.end,
            self.retries
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_line_reads_like_a_tcplog() {
        let mut entry = Entry {
            listener: "front",
            pool: "app",
            backend: "b1",
            client: "10.0.0.1:5555".parse().unwrap(),
            bytes_to_backend: 12,
            bytes_to_client: 3456,
            duration: Duration::from_millis(2304),
            connect: Some(Duration::from_micros(1500)),
            retries: 1,
            end: "closed",
        };
        assert_eq!(
            entry.text(),
            "10.0.0.1:5555 front app/b1 1/2304 12/3456 closed retries=1"
        );
        entry.backend = "";
        entry.connect = None;
        entry.end = "no_backend";
        assert_eq!(
            entry.text(),
            "10.0.0.1:5555 front app/- -1/2304 12/3456 no_backend retries=1"
        );
    }
}
