//! `weir run` as a child process, as an operator runs it: started from a config file,
//! its log drained on a thread, its admin socket and `/proc` entries read by the test.
//! Killed on drop.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{DEADLINE, wait_until};

pub struct Weir {
    pub child: Child,
    /// The first listener's address, from its "accepting on ADDR" line.
    pub front: SocketAddr,
    pub socket: PathBuf,
    /// Every line it logged so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Weir {
    /// Starts `weir run -c config` and waits for its first listener.
    pub fn start(config: &Path, socket: &Path) -> Weir {
        Self::start_with_fd_limit(config, socket, None)
    }

    /// Like `start`, with `RLIMIT_NOFILE` set to `fds` for the child (by the shell's
    /// `ulimit -n`, then `exec`, so the limit is weir's own).
    pub fn start_with_fd_limit(config: &Path, socket: &Path, fds: Option<u32>) -> Weir {
        let bin = env!("CARGO_BIN_EXE_weir");
        let mut command = match fds {
            None => Command::new(bin),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), bin]);
                sh
            }
        };
        let mut child = command
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .expect("weir starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                kept.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + DEADLINE;
        let front = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                panic!(
                    "weir did not start in time; it said:\n{}",
                    log.lock().unwrap().join("\n")
                );
            };
            if let Some(rest) = line.split("accepting on ").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        Weir {
            child,
            front,
            socket: socket.to_path_buf(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One admin command's reply.
    pub async fn admin(&self, command: &str) -> String {
        let mut stream = tokio::time::timeout(DEADLINE, UnixStream::connect(&self.socket))
            .await
            .expect("admin connect in time")
            .expect("admin socket");
        stream
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        let mut reply = String::new();
        tokio::time::timeout(DEADLINE, stream.read_to_string(&mut reply))
            .await
            .expect("admin reply in time")
            .unwrap();
        reply
    }

    /// `show backends --json`, by backend name.
    pub async fn backends(&self) -> BTreeMap<String, serde_json::Value> {
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&self.admin("show backends --json").await).unwrap();
        (rows.into_iter())
            .map(|r| (r["name"].as_str().unwrap().to_string(), r))
            .collect()
    }

    pub async fn wait_for(&self, backend: &str, state: &str) {
        wait_until(DEADLINE, &format!("{backend} {state}"), || async {
            (self.backends().await.get(backend)).is_some_and(|r| r["state"] == state)
        })
        .await;
    }

    pub async fn wait_all_up(&self) {
        wait_until(DEADLINE, "every backend up", || async {
            self.backends().await.values().all(|r| r["state"] == "up")
        })
        .await;
    }

    /// Its open file descriptors, from `/proc/PID/fd`.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Its resident memory in KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        (status.lines())
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Whether some logged line contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// Sends a signal by name (`HUP`, `TERM`, `KILL`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }
}

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
