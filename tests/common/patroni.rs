//! A real Patroni cluster for tests: one etcd and PostgreSQL nodes managed by Patroni
//! (Debian's `etcd-server`, `patroni` and `postgresql` packages), all on loopback.
//!
//! Each node has its own loopback address (127.0.0.2, 127.0.0.3, …) and listens there on
//! the same two ports, PostgreSQL's and Patroni's REST API: so weir's pool-level
//! `health_check.port` reaches every node's REST API (the check goes to the backend's IP).
//! etcd listens on 127.0.0.1. Every port is picked free at run time, the data lives in a
//! temp dir, and `Drop` kills every process the cluster started, even on a panic.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, etcd, Patroni and
//! PostgreSQL run as the `postgres` user (which Debian's package creates) and the temp
//! dir belongs to it.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{TempDir, require_program};

/// How long a node may take to come up: initdb or a base backup on a busy machine.
const START_DEADLINE: Duration = Duration::from_secs(90);

/// Patroni's `ttl`: a leader that stops renewing its key (a crash) loses it after this
/// long, and only then does a replica take over.
pub const TTL: Duration = Duration::from_secs(10);

/// The unprivileged user that runs etcd, Patroni and PostgreSQL when the tests run as root.
const DB_USER: &str = "postgres";

/// Whether everything the cluster needs is installed: etcd, patroni, patronictl, a
/// PostgreSQL server under /usr/lib/postgresql/NN/bin and (as root) the `postgres` user.
/// Says SKIPPED and returns false when not, or panics under WEIR_REQUIRE_EXTERNAL=1.
pub fn available() -> bool {
    for program in ["etcd", "patroni", "patronictl"] {
        if !require_program(program) {
            return false;
        }
    }
    if postgres_bin_dir().is_none() {
        return missing("PostgreSQL is not installed (no /usr/lib/postgresql/NN/bin/postgres)");
    }
    if is_root() && db_user_ids().is_none() {
        return missing(
            "there is no postgres user to run PostgreSQL as (it refuses root; Debian's \
             postgresql package creates the user)",
        );
    }
    true
}

/// The skip-or-fail rule of `require_program`, for what is not a program in PATH.
pub fn missing(problem: &str) -> bool {
    if std::env::var_os("WEIR_REQUIRE_EXTERNAL").is_some_and(|v| v == "1") {
        panic!("{problem} and WEIR_REQUIRE_EXTERNAL=1: install it (see .ci/run)");
    }
    eprintln!("SKIPPED: {problem}; install it to run this test (.ci/run does)");
    false
}

/// The newest /usr/lib/postgresql/NN/bin that holds a `postgres` binary.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

pub fn db_user_ids() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, DB_USER]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// A command that runs as the database user (as root), or as ourselves otherwise. It
/// stays in our process group: a Ctrl-C of `cargo test` reaches it too (Patroni then
/// stops its PostgreSQL).
pub fn db_command(program: &str, home: &Path) -> Command {
    let mut command = if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            DB_USER,
            "--regid",
            DB_USER,
            "--init-groups",
            program,
        ]);
        c
    } else {
        Command::new(program)
    };
    command
        .env("HOME", home)
        .current_dir(home)
        .stdin(Stdio::null());
    command
}

/// Ports that are free on every one of `ips` at once (held until the caller drops them,
/// so that two picks can't return the same port).
fn free_port_on(ips: &[Ipv4Addr]) -> (u16, Vec<TcpListener>) {
    for _ in 0..100 {
        let first = TcpListener::bind((ips[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let mut held = vec![first];
        for ip in &ips[1..] {
            match TcpListener::bind((*ip, port)) {
                Ok(l) => held.push(l),
                Err(_) => break,
            }
        }
        if held.len() == ips.len() {
            return (port, held);
        }
    }
    panic!("no port is free on all of {ips:?}");
}

/// One PostgreSQL node and the Patroni that manages it.
pub struct Node {
    pub name: String,
    pub ip: Ipv4Addr,
    /// PostgreSQL, straight (not through weir).
    pub pg: SocketAddr,
    /// Patroni's REST API.
    pub rest: SocketAddr,
    /// Patroni's config file (patronictl reads it too).
    pub config: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    patroni: Option<Child>,
}

impl Node {
    /// A libpq connection string for this node's PostgreSQL, straight.
    pub fn dsn(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres connect_timeout=5",
            self.pg.ip(),
            self.pg.port()
        )
    }

    /// The HTTP status Patroni's REST API answers for `path` (`/primary`, `/replica`).
    pub async fn rest_status(&self, path: &str) -> Option<u16> {
        http_status(self.rest, path).await
    }
}

/// etcd and the nodes; everything is killed and the data removed on drop.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// PostgreSQL's port, the same on every node's address.
    pub pg_port: u16,
    /// Patroni's REST API port, the same on every node's address.
    pub rest_port: u16,
    etcd: Option<Child>,
    etcd_log: PathBuf,
    /// Declared last: removed once the processes above are gone.
    dir: TempDir,
}

impl Cluster {
    /// Starts etcd, then the first node (which bootstraps with initdb and becomes the
    /// leader), then the others as its replicas; returns once each one says so on its REST
    /// API.
    pub async fn start(names: &[&str]) -> Cluster {
        let bin_dir = postgres_bin_dir().expect("PostgreSQL is installed (see available())");
        let dir = TempDir::new("patroni");
        let ips: Vec<Ipv4Addr> = (0..names.len())
            .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
            .collect();
        let (pg_port, held_pg) = free_port_on(&ips);
        let (rest_port, held_rest) = free_port_on(&ips);
        let local = [Ipv4Addr::LOCALHOST];
        let (etcd_client, held_client) = free_port_on(&local);
        let (etcd_peer, held_peer) = free_port_on(&local);
        drop((held_pg, held_rest, held_client, held_peer));

        let etcd_dir = dir.join("etcd");
        std::fs::create_dir_all(&etcd_dir).unwrap();
        let mut cluster = Cluster {
            nodes: Vec::new(),
            pg_port,
            rest_port,
            etcd: None,
            etcd_log: dir.join("etcd.log"),
            dir,
        };
        for (name, ip) in names.iter().zip(&ips) {
            let node_dir = cluster.dir.join(name);
            std::fs::create_dir_all(&node_dir).unwrap();
            let node = Node {
                name: name.to_string(),
                ip: *ip,
                pg: (*ip, pg_port).into(),
                rest: (*ip, rest_port).into(),
                config: node_dir.join("patroni.yaml"),
                data_dir: node_dir.join("data"),
                log: node_dir.join("patroni.log"),
                patroni: None,
            };
            let yaml = patroni_yaml(&node, &node_dir, &bin_dir, etcd_client);
            std::fs::write(&node.config, yaml).unwrap();
            cluster.nodes.push(node);
        }
        cluster.give_to_db_user();

        let client_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let log = std::fs::File::create(&cluster.etcd_log).unwrap();
        let etcd = db_command("etcd", &cluster.dir.path)
            .args(["--name", "etcd0", "--data-dir"])
            .arg(&etcd_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("etcd0={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        cluster.etcd = Some(etcd);
        let etcd_addr: SocketAddr = ([127, 0, 0, 1], etcd_client).into();
        cluster
            .wait_for("etcd to be healthy", || async {
                http_status(etcd_addr, "/health").await == Some(200)
            })
            .await;

        for i in 0..cluster.nodes.len() {
            cluster.start_patroni(i);
            let (path, what) = if i == 0 {
                ("/primary", "the leader")
            } else {
                ("/replica", "a replica")
            };
            let rest = cluster.nodes[i].rest;
            let name = cluster.nodes[i].name.clone();
            cluster
                .wait_for(&format!("{name} to be {what}"), || async {
                    http_status(rest, path).await == Some(200)
                })
                .await;
        }
        cluster
    }

    fn start_patroni(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(&node.log).unwrap();
        let child = db_command("patroni", &self.dir.path)
            .arg(&node.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start patroni");
        node.patroni = Some(child);
    }

    /// The temp dir and everything in it belong to the database user (as root).
    fn give_to_db_user(&self) {
        if !is_root() {
            return;
        }
        let (uid, gid) = db_user_ids().expect("the postgres user exists");
        fn walk(path: &Path, uid: u32, gid: u32) {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
            if path.is_dir() {
                for entry in std::fs::read_dir(path).unwrap() {
                    walk(&entry.unwrap().path(), uid, gid);
                }
            }
        }
        walk(&self.dir.path, uid, gid);
    }

    /// Polls `ready` every 100 ms until it holds; panics with the logs when a process
    /// of the cluster exited or START_DEADLINE passed.
    async fn wait_for<F, Fut>(&mut self, what: &str, mut ready: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let end = tokio::time::Instant::now() + START_DEADLINE;
        loop {
            if ready().await {
                return;
            }
            if let Some(exited) = self.exited() {
                panic!("waiting for {what}: {exited}\n{}", self.logs());
            }
            assert!(
                tokio::time::Instant::now() < end,
                "timed out after {START_DEADLINE:?} waiting for {what}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Which started process has exited, if one has.
    fn exited(&mut self) -> Option<String> {
        if let Some(etcd) = &mut self.etcd
            && let Ok(Some(status)) = etcd.try_wait()
        {
            return Some(format!("etcd exited ({status})"));
        }
        for node in &mut self.nodes {
            if let Some(child) = &mut node.patroni
                && let Ok(Some(status)) = child.try_wait()
            {
                return Some(format!("patroni of {} exited ({status})", node.name));
            }
        }
        None
    }

    /// The last lines of every log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = tail("etcd", &self.etcd_log, 15);
        for node in &self.nodes {
            out.push_str(&tail(&format!("patroni {}", node.name), &node.log, 40));
        }
        out
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The nodes whose REST API answers 200 on `/primary` right now.
    pub async fn leaders(&self) -> Vec<&Node> {
        let mut leaders = Vec::new();
        for node in &self.nodes {
            if node.rest_status("/primary").await == Some(200) {
                leaders.push(node);
            }
        }
        leaders
    }

    /// Kills `name`'s Patroni (SIGKILL) and its PostgreSQL (immediate shutdown), as a
    /// crash of that node would: its REST API and PostgreSQL stop answering, and its
    /// leader key (if it holds it) expires after `ttl`.
    pub fn crash(&mut self, name: &str) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"));
        if let Some(mut child) = node.patroni.take() {
            kill(&mut child);
        }
        stop_postmaster(&node.data_dir);
    }

    /// `patronictl switchover --leader LEADER --candidate CANDIDATE --force`; returns its
    /// combined output, panicking when it fails. patronictl returns once the candidate
    /// has taken over (or the switchover failed).
    pub async fn switchover(&self, leader: &str, candidate: &str) -> String {
        let out = tokio::process::Command::new("patronictl")
            .arg("-c")
            .arg(&self.nodes[0].config)
            .args(["switchover", "--leader", leader, "--candidate", candidate])
            .arg("--force")
            .env("HOME", &self.dir.path)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run patronictl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("Successfully switched over"),
            "patronictl switchover failed ({}):\n{text}\n{}",
            out.status,
            self.logs()
        );
        text
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // Patroni first, so that it doesn't restart PostgreSQL; then each postmaster,
        // which runs in a session of its own (Patroni detaches it), by its pid file.
        for node in &mut self.nodes {
            if let Some(mut child) = node.patroni.take() {
                kill(&mut child);
            }
        }
        for node in &self.nodes {
            stop_postmaster(&node.data_dir);
        }
        if let Some(mut etcd) = self.etcd.take() {
            kill(&mut etcd);
        }
        // `dir` (a TempDir) is removed when the fields drop, after this.
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Immediate shutdown (SIGQUIT: the postmaster ends its backends and exits) of the
/// postmaster of `data_dir`, then SIGKILL if it is still there after 10 s. The pid is
/// only signalled while it still runs `postgres` on this data dir.
pub fn stop_postmaster(data_dir: &Path) {
    let Ok(pid_file) = std::fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = pid_file
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let ours = || {
        let cmdline =
            std::fs::read(format!("/proc/{}/cmdline", pid.as_raw_nonzero())).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero()))
            .unwrap_or_default();
        // A zombie (state Z, after the comm in parentheses) has exited already.
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        !zombie && String::from_utf8_lossy(&cmdline).contains(data_dir.to_string_lossy().as_ref())
    };
    if !ours() {
        return;
    }
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::QUIT);
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while ours() {
        if std::time::Instant::now() > end {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(what: &str, path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    format!(
        "--- last {} lines of {what} ({})\n{}\n",
        all.len() - from,
        path.display(),
        all[from..].join("\n")
    )
}

/// Patroni's config for `node`: bootstrap with initdb; ttl/loop_wait/retry_timeout small so
/// that a switchover takes seconds (Patroni wants loop_wait + 2 × retry_timeout <= ttl);
/// trust on loopback for every user and for replication.
fn patroni_yaml(node: &Node, node_dir: &Path, bin_dir: &Path, etcd_port: u16) -> String {
    format!(
        r#"scope: weir-test
name: {name}
restapi:
  listen: {rest}
  connect_address: {rest}
etcd3:
  hosts: 127.0.0.1:{etcd_port}
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: 1
    retry_timeout: 4
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: false
  initdb:
    - encoding: UTF8
    - no-sync
postgresql:
  listen: {pg}
  connect_address: {pg}
  data_dir: {data}
  bin_dir: {bin}
  pgpass: {dir}/pgpass
  authentication:
    superuser:
      username: postgres
    replication:
      username: replicator
  parameters:
    unix_socket_directories: {dir}
  pg_hba:
    - local all all trust
    - host all all 127.0.0.0/8 trust
    - host replication all 127.0.0.0/8 trust
"#,
        name = node.name,
        rest = node.rest,
        pg = node.pg,
        data = node.data_dir.display(),
        bin = bin_dir.display(),
        dir = node_dir.display(),
        ttl = TTL.as_secs(),
    )
}

/// The status code of `GET PATH` over HTTP/1.0, or None when there is no answer in time.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.ok()?;
        let text = String::from_utf8_lossy(&reply);
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}
