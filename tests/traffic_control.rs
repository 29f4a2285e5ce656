//! Traffic control: `backends[].max_connections`, the pool's queue (`queue_timeout`) and
//! `backends[].backup`, over real sockets (docs/traffic-control.md).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::patroni;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use weir::backend::{Admin, Health, State};
use weir::balance::Strategy;
use weir::config::Config;
use weir::server::Server;

/// A config whose listener is `{tag}_front` and pool `tag` (metric series of their own),
/// with `max` connections per backend and `queue_timeout`.
fn config(tag: &str, backends: &[&TestBackend], max: u64, queue: Duration) -> Config {
    let list = backends
        .iter()
        .map(|b| {
            let mut c = backend_config(&b.name, b.addr, 1);
            c.max_connections = Some(max);
            c
        })
        .collect();
    let mut config = tcp_config(Strategy::RoundRobin, list);
    config.listeners[0].name = format!("{tag}_front");
    config.listeners[0].pool = tag.to_string();
    config.pools[0].name = tag.to_string();
    config.pools[0].queue_timeout = queue;
    config.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    config
}

async fn start_tagged(tag: &str, config: Config) -> (Server, SocketAddr) {
    let server = Server::start(config, None).await.expect("weir starts");
    let front = server.listener_addr(&format!("{tag}_front")).unwrap();
    (server, front)
}

fn queued(server: &Server, pool: &str) -> usize {
    server.handle.tables().pools[pool].queue.len()
}

async fn wait_queued(server: &Server, pool: &str, n: usize) {
    wait_until(DEADLINE, &format!("{n} queued in {pool}"), || async {
        queued(server, pool) == n
    })
    .await;
}

/// A connection to weir that has been accepted (and so is queued or connected).
async fn open(front: SocketAddr) -> TcpStream {
    tokio::time::timeout(DEADLINE, TcpStream::connect(front))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Waits for weir to close `stream` without a byte (EOF or reset); returns when.
async fn closed(stream: &mut TcpStream) -> Instant {
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed without data: {read:?}"
    );
    Instant::now()
}

/// The value of one series in weir's /metrics (0 when absent).
async fn metric(server: &Server, series: &str) -> f64 {
    let addr = server.metrics_addr().unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn rejected(tag: &str, reason: &str) -> String {
    format!("weir_listener_rejected_total{{listener=\"{tag}_front\",reason=\"{reason}\"}}")
}

#[tokio::test]
async fn a_full_backend_without_a_queue_closes_new_connections_at_once() {
    let a = TestBackend::start("a").await;
    let (server, front) = start_tagged("full", config("full", &[&a], 1, Duration::ZERO)).await;
    let (_held, name) = connect_named(front).await;
    assert_eq!(name, "a");
    let mut extra = open(front).await;
    closed(&mut extra).await;
    assert_eq!(a.accepted(), 1, "the full backend got no second connection");
    wait_until(DEADLINE, "backend_full counted", || async {
        metric(&server, &rejected("full", "backend_full")).await == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_freed_slot_goes_to_the_oldest_waiter() {
    let a = TestBackend::start("a").await;
    let (server, front) = start_tagged("fifo", config("fifo", &[&a], 1, DEADLINE)).await;
    let (first, _) = connect_named(front).await;
    let mut second = open(front).await;
    wait_queued(&server, "fifo", 1).await;
    let mut third = open(front).await;
    wait_queued(&server, "fifo", 2).await;
    assert_eq!(a.accepted(), 1, "waiting holds no backend connection");
    let gauge = "weir_pool_queue_length{pool=\"fifo\"}";
    assert_eq!(metric(&server, gauge).await, 2.0);

    drop(first);
    assert_eq!(read_line(&mut second).await, "a", "the oldest waiter first");
    wait_queued(&server, "fifo", 1).await;
    assert_eq!(a.accepted(), 2);
    drop(second);
    assert_eq!(read_line(&mut third).await, "a");
    wait_queued(&server, "fifo", 0).await;
    assert_eq!(metric(&server, gauge).await, 0.0);
}

#[tokio::test]
async fn a_queued_connection_is_closed_after_queue_timeout_and_counted() {
    let a = TestBackend::start("a").await;
    let timeout = Duration::from_millis(800);
    let (server, front) = start_tagged("qto", config("qto", &[&a], 1, timeout)).await;
    let (_held, _) = connect_named(front).await;
    let started = Instant::now();
    let mut waiting = open(front).await;
    let waited = closed(&mut waiting).await - started;
    assert!(
        waited >= timeout && waited < timeout + Duration::from_secs(1),
        "closed after {waited:?}"
    );
    assert_eq!(a.accepted(), 1);
    wait_until(DEADLINE, "queue_timeout counted", || async {
        metric(&server, &rejected("qto", "queue_timeout")).await == 1.0
    })
    .await;
    assert_eq!(metric(&server, &rejected("qto", "backend_full")).await, 0.0);
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_leaves_at_once() {
    let a = TestBackend::start("a").await;
    let (server, front) = start_tagged("leave", config("leave", &[&a], 1, DEADLINE)).await;
    let (first, _) = connect_named(front).await;
    let gone = open(front).await;
    wait_queued(&server, "leave", 1).await;
    drop(gone);
    wait_queued(&server, "leave", 0).await;
    let mut next = open(front).await;
    wait_queued(&server, "leave", 1).await;
    drop(first);
    assert_eq!(
        read_line(&mut next).await,
        "a",
        "the slot went to the waiter still there"
    );
    assert_eq!(a.accepted(), 2, "none for the client that left");
}

#[tokio::test]
async fn a_queued_connection_never_goes_to_a_drained_or_down_backend() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let tag = "ineligible";
    let (server, front) = start_tagged(tag, config(tag, &[&a, &b], 1, DEADLINE)).await;
    let (on_a, name) = connect_named(front).await;
    assert_eq!(name, "a");
    let (on_b, name) = connect_named(front).await;
    assert_eq!(name, "b");
    let mut waiting = open(front).await;
    wait_queued(&server, tag, 1).await;

    let backend_a = server.backend(tag, "a").unwrap();
    let backend_b = server.backend(tag, "b").unwrap();
    backend_a.set_admin(Admin::Drain);
    drop(on_a);
    wait_until(DEADLINE, "a's connection closed", || async {
        backend_a.active() == 0
    })
    .await;
    assert_eq!(queued(&server, tag), 1, "a drained slot is not handed on");
    drop(on_b);
    assert_eq!(read_line(&mut waiting).await, "b");

    // Down: b full again with `waiting`, a drained; a new waiter.
    let mut last = open(front).await;
    wait_queued(&server, tag, 1).await;
    backend_b.set_health(Health::Down);
    drop(waiting);
    wait_until(DEADLINE, "b's connection closed", || async {
        backend_b.active() == 0
    })
    .await;
    assert_eq!(
        queued(&server, tag),
        1,
        "a down backend's slot is not handed on"
    );
    // A slot that opens without a release (a back in rotation) goes to the head waiter.
    backend_a.set_admin(Admin::Enabled);
    assert_eq!(read_line(&mut last).await, "a");
    assert_eq!(b.accepted(), 2);
}

#[tokio::test]
async fn a_backup_takes_connections_only_while_no_primary_can() {
    let p = TestBackend::start("p").await;
    let s = TestBackend::start("s").await;
    let tag = "backup";
    let mut config = config(tag, &[&p, &s], 1, Duration::ZERO);
    config.pools[0].backends[1].backup = true;
    let (server, front) = start_tagged(tag, config).await;
    let primary = server.backend(tag, "p").unwrap();
    let backup = server.backend(tag, "s").unwrap();
    assert!(backup.is_backup() && !primary.is_backup());

    for _ in 0..5 {
        let (c, name) = connect_named(front).await;
        assert_eq!(name, "p", "the primary while it is eligible");
        drop(c);
        wait_until(DEADLINE, "p idle", || async { primary.active() == 0 }).await;
    }
    let (on_p, _) = connect_named(front).await;
    let (on_s, name) = connect_named(front).await;
    assert_eq!(name, "s", "the backup while the primary is full");
    drop((on_p, on_s));
    wait_until(DEADLINE, "both idle", || async {
        primary.active() == 0 && backup.active() == 0
    })
    .await;

    primary.set_health(Health::Down);
    let (mut on_backup, name) = connect_named(front).await;
    assert_eq!(name, "s", "the backup while the primary is down");
    primary.set_health(Health::Up);
    let (_back, name) = connect_named(front).await;
    assert_eq!(name, "p", "the primary as soon as it is up again");
    on_backup.write_all(b"still here").await.unwrap();
    let mut echoed = [0u8; 10];
    tokio::time::timeout(DEADLINE, on_backup.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        &echoed, b"still here",
        "open backup connections are left alone"
    );

    let request = weir::admin::parse("show backends").unwrap();
    let shown = weir::admin::execute(request, &server.handle).await.unwrap();
    let row = shown
        .lines()
        .find(|l| l.contains(&s.addr.to_string()))
        .unwrap();
    assert!(row.contains(" yes "), "BACKUP shown: {shown}");
}

/// A PostgreSQL server of its own (`max_connections = 10`) on 127.0.0.1, run as the
/// postgres user when the tests run as root; stopped on drop.
struct Postgres {
    postmaster: std::process::Child,
    dir: TempDir,
    port: u16,
    bin: std::path::PathBuf,
}

impl Postgres {
    /// None (SKIPPED said) when PostgreSQL or pgbench is not installed.
    fn available() -> Option<std::path::PathBuf> {
        let bin = patroni::postgres_bin_dir();
        let Some(bin) = bin.filter(|b| b.join("pgbench").is_file()) else {
            patroni::missing("PostgreSQL (server and pgbench) is not installed");
            return None;
        };
        if patroni::is_root() && patroni::db_user_ids().is_none() {
            patroni::missing("there is no postgres user to run PostgreSQL as");
            return None;
        }
        Some(bin)
    }

    async fn start(bin: std::path::PathBuf) -> Postgres {
        let dir = TempDir::new("pg");
        if patroni::is_root() {
            let chown = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir.path)
                .status()
                .unwrap();
            assert!(chown.success());
        }
        let data = dir.join("data");
        let init = patroni::db_command(bin.join("initdb").to_str().unwrap(), &dir.path)
            .args(["-U", "postgres", "--auth=trust", "-D"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(init.success(), "initdb");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.join("postgres.log")).unwrap();
        let postmaster = patroni::db_command(bin.join("postgres").to_str().unwrap(), &dir.path)
            .arg("-D")
            .arg(&data)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                &format!("port={port}"),
            ])
            .args(["-c", "max_connections=10", "-c"])
            .arg(format!("unix_socket_directories={}", dir.path.display()))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let pg = Postgres {
            postmaster,
            dir,
            port,
            bin,
        };
        wait_until(Duration::from_secs(60), "PostgreSQL up", || async {
            pg.pgbench(port, &["-i", "-s", "1", "-q"]).await.0
        })
        .await;
        pg
    }

    /// Runs pgbench against 127.0.0.1:`port`; (success, stdout + stderr).
    async fn pgbench(&self, port: u16, args: &[&str]) -> (bool, String) {
        let out = tokio::process::Command::new(self.bin.join("pgbench"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        patroni::stop_postmaster(&self.dir.join("data"));
        let _ = self.postmaster.wait();
    }
}

/// The case: 30 pgbench clients (a new connection per transaction) through weir,
/// whose one backend allows 5 connections with a 5 s queue, in front of a PostgreSQL
/// allowing 10: every transaction succeeds, none sees "too many clients".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_never_sees_too_many_clients() {
    let Some(bin) = Postgres::available() else {
        return;
    };
    let pg = Postgres::start(bin).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", pg.port).parse().unwrap();
    let mut config = tcp_config(
        Strategy::LeastConnections,
        vec![backend_config("pg", addr, 1)],
    );
    config.listeners[0].name = "pgbench_front".into();
    config.listeners[0].pool = "pgbench".into();
    config.pools[0].name = "pgbench".into();
    config.pools[0].backends[0].max_connections = Some(5);
    config.pools[0].queue_timeout = Duration::from_secs(5);
    let (server, front) = start_tagged("pgbench", config).await;
    let args = ["-c", "30", "-j", "30", "-C", "-S", "-t", "10"];
    let (ok, out) = pg.pgbench(front.port(), &args).await;
    eprintln!("{out}");
    assert!(!out.contains("too many clients"), "{out}");
    assert!(ok, "pgbench: {out}");
    assert!(out.contains("actually processed: 300/300"), "{out}");
    let backend = server.backend("pgbench", "pg").unwrap();
    assert!(
        backend.total() >= 300,
        "a connection per transaction: {out}"
    );
}

/// Connections opened during `window`, spread over it; how many of them `name` took.
async fn share_of(front: SocketAddr, name: &str, window: Duration) -> (usize, usize) {
    let end = Instant::now() + window;
    let (mut to_name, mut all) = (0, 0);
    while Instant::now() < end && all < 2_000 {
        let (c, got) = connect_named(front).await;
        drop(c);
        all += 1;
        to_name += usize::from(got == name);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (to_name, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_comes_back_ramps_its_share_over_slow_start() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let tag = "ramp";
    let ramp = Duration::from_secs(4);
    let mut config = config(tag, &[&a, &b], 1_000, Duration::ZERO);
    for backend in &mut config.pools[0].backends {
        backend.weight = 10;
    }
    config.pools[0].slow_start = ramp;
    let fast = Duration::from_millis(50);
    config.pools[0].health_check = Some(health_check(fast, fast, 1, 1));
    let (server, front) = start_tagged(tag, config).await;
    wait_for_state(&server, tag, "b", State::Up, DEADLINE).await;
    let backend = server.backend(tag, "b").unwrap();
    assert!(!backend.is_ramping(), "the startup round is not slowed");
    let (to_b, all) = share_of(front, "b", Duration::from_millis(300)).await;
    assert!(
        (to_b * 2).abs_diff(all) <= 1,
        "round-robin halves at once after startup: {to_b} of {all}"
    );

    let b_addr = b.addr;
    b.stop();
    drop(b);
    wait_for_state(&server, tag, "b", State::Down, DEADLINE).await;
    let _b = TestBackend::restart("b", b_addr).await;
    wait_for_state(&server, tag, "b", State::Up, DEADLINE).await;
    let up = Instant::now();
    assert!(backend.is_ramping());
    assert!(
        backend.effective_weight() <= 2,
        "{}",
        backend.effective_weight()
    );

    // At admission p, round-robin over two gives it p / (1 + p) (a pick not kept moves
    // the schedule on): about 9 % over the first fifth of the ramp.
    let (early, early_all) = share_of(front, "b", ramp / 5).await;
    // The fourth fifth: about 41 %.
    tokio::time::sleep_until(up + ramp * 3 / 5).await;
    let middle_weight = backend.effective_weight();
    let (late, late_all) = share_of(front, "b", ramp / 5).await;
    tokio::time::sleep_until(up + ramp + Duration::from_millis(100)).await;
    let (after, after_all) = share_of(front, "b", Duration::from_millis(300)).await;
    let share = |n: usize, all: usize| n as f64 / all as f64;
    let shares =
        format!("early {early}/{early_all}, late {late}/{late_all}, after {after}/{after_all}");
    eprintln!("slow start, shares of the returning backend: {shares}");
    assert!(early_all >= 30 && late_all >= 30, "{shares}");
    assert!(share(early, early_all) < 0.2, "{shares}");
    assert!((0.15..0.48).contains(&share(late, late_all)), "{shares}");
    assert!(share(early, early_all) < share(late, late_all), "{shares}");
    assert!(
        (5..=9).contains(&middle_weight),
        "effective weight {middle_weight} at 3/5"
    );
    assert!(!backend.is_ramping(), "over after slow_start");
    assert_eq!(backend.effective_weight(), 10);
    assert!(
        (after * 2).abs_diff(after_all) <= 1,
        "full share after the ramp: {shares}"
    );
}

#[tokio::test]
async fn enable_after_a_drain_ramps_and_show_backends_says_so() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let tag = "ramp_enable";
    let mut config = config(tag, &[&a, &b], 1_000, Duration::ZERO);
    config.pools[0].backends[1].weight = 100;
    config.pools[0].slow_start = Duration::from_secs(600);
    let (server, _front) = start_tagged(tag, config).await;
    let backend = server.backend(tag, "b").unwrap();
    assert!(
        !backend.is_ramping(),
        "without a health check: up from the start"
    );
    backend.set_admin(Admin::Drain);
    let run = |line: &str| {
        let request = weir::admin::parse(line).unwrap();
        weir::admin::execute(request, &server.handle)
    };
    run("enable ramp_enable/b").await.unwrap();
    assert!(backend.is_ramping(), "back in rotation");
    let shown = run("show backends --json").await.unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&shown).unwrap();
    let row = rows.into_iter().find(|r| r["name"] == "b").unwrap();
    assert_eq!(row["weight"], 100);
    assert_eq!(row["effective_weight"], 1, "{row}");
    assert_eq!(row["slow_start_percent"], 0, "{row}");
    let text = run("show backends").await.unwrap();
    let b_row: Vec<&str> = (text.lines())
        .find(|l| l.contains(&b.addr.to_string()))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(&b_row[4..6], ["100", "1"], "WEIGHT and EFF: {text}");
}

#[tokio::test]
async fn a_backend_a_reload_adds_to_a_serving_pool_ramps_and_the_startup_ones_do_not() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let c = TestBackend::start("c").await;
    let dir = TempDir::new("ramp-reload");
    let path = dir.join("weir.yaml");
    let file = |backends: &[&TestBackend], check: &str| {
        let list: String = (backends.iter())
            .map(|t| {
                format!(
                    "      - {{ address: \"{}\", name: {}, weight: 100 }}\n",
                    t.addr, t.name
                )
            })
            .collect();
        let text = format!(
            "listeners:\n  ramp_reload_front:\n    bind: 127.0.0.1:0\n    pool: ramp_reload\npools:\n  ramp_reload:\n    slow_start: 600s\n{check}    backends:\n{list}"
        );
        std::fs::write(&path, text).unwrap();
    };
    file(&[&a], "");
    let config = weir::config::load(&path).unwrap();
    let server = Server::start(config, Some(path.clone())).await.unwrap();
    let first = server.backend("ramp_reload", "a").unwrap();
    assert!(!first.is_ramping(), "the startup round: no ramp");

    // Without a health check the added backend is up at once, so it ramps from now.
    file(&[&a, &b], "");
    server.handle.reload().await.unwrap();
    let added = server.backend("ramp_reload", "b").unwrap();
    assert!(added.is_ramping(), "joined a serving pool");
    assert!(
        added.effective_weight() < 100,
        "{}",
        added.effective_weight()
    );
    assert!(!first.is_ramping(), "a backend that stays is left alone");

    // With one, the probe that brings it up starts the ramp.
    let check = "    health_check: { interval: 100ms, timeout: 100ms, rise: 1 }\n";
    file(&[&a, &b, &c], check);
    server.handle.reload().await.unwrap();
    let checked = server.backend("ramp_reload", "c").unwrap();
    wait_until(DEADLINE, "c's first probe to pass", || {
        let up = checked.health() == Health::Up;
        async move { up }
    })
    .await;
    assert!(
        checked.is_ramping(),
        "up by its first probe, in a serving pool"
    );
    server.stop().await;
}
