//! The admin socket and `weir ctl` over real sockets: every command, draining for
//! maintenance, exit codes, and bad input that must never hurt serving.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir::backend::State;
use weir::balance::Strategy;
use weir::config::Config;
use weir::server::{Server, StartOptions};

/// Admin clients in these tests must send their line within this long (the 10 s default
/// has a test of its own).
const SHORT_READ_TIMEOUT: Duration = Duration::from_millis(300);

struct Setup {
    server: Server,
    front: std::net::SocketAddr,
    socket: PathBuf,
    _backends: Vec<TestBackend>,
    _dir: TempDir,
}

fn config_with_admin(backends: &[TestBackend], socket: &Path) -> Config {
    let mut config = tcp_config(
        Strategy::RoundRobin,
        backends
            .iter()
            .map(|b| backend_config(&b.name, b.addr, 1))
            .collect(),
    );
    config.admin_socket = Some(socket.to_path_buf());
    config
}

async fn setup(names: &[&str]) -> Setup {
    setup_with(names, |_| {}).await
}

async fn setup_with(names: &[&str], tweak: impl FnOnce(&mut Config)) -> Setup {
    let dir = TempDir::new("admin");
    let socket = dir.join("admin.sock");
    let mut backends = Vec::new();
    for name in names {
        backends.push(TestBackend::start(name).await);
    }
    let mut config = config_with_admin(&backends, &socket);
    tweak(&mut config);
    let server = Server::start_with(
        config,
        None,
        StartOptions {
            admin_read_timeout: SHORT_READ_TIMEOUT,
        },
    )
    .await
    .expect("weir starts");
    let front = server.listener_addr("front").unwrap();
    Setup {
        server,
        front,
        socket,
        _backends: backends,
        _dir: dir,
    }
}

/// Runs the real `weir ctl -s SOCKET ARGS…`; returns (exit code, stdout, stderr).
async fn ctl(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("ctl")
        .arg("-s")
        .arg(socket)
        .args(args)
        .output()
        .await
        .expect("run weir ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_rows(reply: &str) -> Vec<serde_json::Value> {
    serde_json::from_str(reply).unwrap_or_else(|e| panic!("not JSON ({e}): {reply}"))
}

fn row<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no row {name} in {rows:?}"))
}

/// A connection through weir still serves: greeting and echo.
async fn traffic_flows(front: std::net::SocketAddr) {
    let (mut stream, _name) = connect_named(front).await;
    stream.write_all(b"still serving\n").await.unwrap();
    assert_eq!(read_line(&mut stream).await, "still serving");
}

#[tokio::test]
async fn socket_is_created_0600_and_removed_on_stop() {
    let s = setup(&["a"]).await;
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode is {mode:o}");
    let leftovers: Vec<_> = std::fs::read_dir(s.socket.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers,
        vec!["admin.sock"],
        "no temporary files left behind"
    );
    assert!(admin(&s.socket, "help").await.contains("show backends"));
    s.server.stop().await;
    assert!(!s.socket.exists(), "the socket file is removed at exit");
}

#[tokio::test]
async fn help_lists_every_command() {
    let s = setup(&["a"]).await;
    let help = admin(&s.socket, "help").await;
    for command in [
        "help",
        "show backends [--json]",
        "show listeners [--json]",
        "drain POOL/BACKEND",
        "disable POOL/BACKEND",
        "enable POOL/BACKEND",
        "set weight POOL/BACKEND N",
        "reload",
    ] {
        assert!(help.contains(command), "help lacks {command:?}:\n{help}");
    }
}

#[tokio::test]
async fn show_backends_and_listeners_as_tables_and_json() {
    let s = setup_with(&["a", "b"], |config| {
        config.pools[0].health_check = Some(health_check(
            Duration::from_secs(60),
            Duration::from_secs(1),
            2,
            3,
        ));
    })
    .await;
    // One open connection on a.
    let (_open, name) = connect_named(s.front).await;
    let a_addr = s.server.backend("pool", "a").unwrap().addr;
    let b_addr = s.server.backend("pool", "b").unwrap().addr;
    assert_eq!(name, "a", "the first connection goes to the first backend");

    let text = admin(&s.socket, "show backends").await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "POOL", "BACKEND", "ADDRESS", "STATE", "WEIGHT", "EFF", "ACTIVE", "MAX", "BACKUP",
            "QUEUED", "TOTAL", "LAST", "CHECK"
        ]
    );
    let state_column = lines[0].find("STATE").unwrap();
    for line in &lines[1..] {
        assert!(
            line[state_column..].starts_with("up "),
            "columns are aligned: {line:?} in\n{text}"
        );
    }
    let a_row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &a_row[..11],
        [
            "pool",
            "a",
            &a_addr.to_string(),
            "up",
            "1",
            "1",
            "1",
            "-",
            "no",
            "0",
            "1"
        ]
    );
    assert_eq!(a_row[11], "pass", "last check: {text}");
    assert!(a_row[12].ends_with("ms"), "{text}");
    let b_row: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        &b_row[..11],
        [
            "pool",
            "b",
            &b_addr.to_string(),
            "up",
            "1",
            "1",
            "0",
            "-",
            "no",
            "0",
            "0"
        ]
    );

    let rows = json_rows(&admin(&s.socket, "show backends --json").await);
    assert_eq!(rows.len(), 2);
    let a = row(&rows, "a");
    assert_eq!(a["pool"], "pool");
    assert_eq!(a["address"], a_addr.to_string());
    assert_eq!(a["state"], "up");
    assert_eq!(a["weight"], 1);
    assert_eq!(a["effective_weight"], 1, "not ramping: its weight");
    assert_eq!(a["active"], 1);
    assert_eq!(a["total"], 1);
    assert!(
        a["last_check"].as_str().unwrap().starts_with("pass "),
        "{a}"
    );
    assert_eq!(row(&rows, "b")["active"], 0);

    let text = admin(&s.socket, "show listeners").await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "LISTENER", "PROTOCOL", "BIND", "POOL", "ACTIVE", "QUEUED", "TOTAL"
        ]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["front", "tcp", &s.front.to_string(), "pool", "1", "0", "1"]
    );
    let rows = json_rows(&admin(&s.socket, "show listeners --json").await);
    assert_eq!(
        rows,
        vec![serde_json::json!({
            "name": "front",
            "protocol": "tcp",
            "bind": s.front.to_string(),
            "pool": "pool",
            "active": 1,
            "queued": 0,
            "total": 1,
        })]
    );
}

#[tokio::test]
async fn backends_without_checks_show_no_last_check() {
    let s = setup(&["a"]).await;
    let text = admin(&s.socket, "show backends").await;
    assert!(text.lines().nth(1).unwrap().ends_with(" -"), "{text}");
    let rows = json_rows(&admin(&s.socket, "show backends --json").await);
    assert!(rows[0]["last_check"].is_null());
}

#[tokio::test]
async fn drain_for_maintenance_with_ctl_wait() {
    let s = setup(&["a", "b", "c"]).await;
    // A long-lived connection on a, exchanging bytes.
    let (mut long, name) = connect_named(s.front).await;
    assert_eq!(name, "a");
    long.write_all(b"before\n").await.unwrap();
    assert_eq!(read_line(&mut long).await, "before");

    let reply = admin(&s.socket, "drain pool/a").await;
    assert_eq!(reply, "pool/a: draining, 1 connection open\n");
    assert_eq!(state(&s.server, "pool", "a"), State::Draining);

    for i in 0..100 {
        let (_stream, name) = connect_named(s.front).await;
        assert_ne!(name, "a", "connection {i} went to the draining backend");
    }
    // The old connection is untouched.
    long.write_all(b"during\n").await.unwrap();
    assert_eq!(read_line(&mut long).await, "during");

    let socket = s.socket.clone();
    let waiting = tokio::spawn(async move { ctl(&socket, &["drain", "pool/a", "--wait"]).await });
    // Still waiting while the connection is open.
    let a = s.server.backend("pool", "a").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "ctl --wait returned with a connection open"
    );
    assert_eq!(a.active(), 1);

    long.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, long.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    drop(long);
    let (code, stdout, stderr) = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("ctl --wait returns once drained")
        .unwrap();
    assert_eq!(code, 0, "stdout: {stdout} stderr: {stderr}");
    assert!(stdout.starts_with("pool/a: drained after "), "{stdout}");
    assert_eq!(state(&s.server, "pool", "a"), State::Drained);
    let rows = json_rows(&admin(&s.socket, "show backends --json").await);
    assert_eq!(row(&rows, "a")["state"], "drained");

    let reply = admin(&s.socket, "enable pool/a").await;
    assert_eq!(reply, "pool/a: enabled, now up\n");
    let mut back = false;
    for _ in 0..20 {
        let (_stream, name) = connect_named(s.front).await;
        if name == "a" {
            back = true;
            break;
        }
    }
    assert!(back, "a gets traffic again after enable");
}

#[tokio::test]
async fn ctl_wait_times_out_with_a_connection_still_open() {
    let s = setup(&["a", "b"]).await;
    let (_open, name) = connect_named(s.front).await;
    assert_eq!(name, "a");
    let started = Instant::now();
    let (code, stdout, stderr) = ctl(
        &s.socket,
        &["drain", "pool/a", "--wait", "--timeout", "200ms"],
    )
    .await;
    assert_eq!(code, 1, "stdout: {stdout} stderr: {stderr}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(
        stderr.trim_end(),
        "error: pool/a still draining after 200ms: 1 connection still open"
    );
    assert_eq!(state(&s.server, "pool", "a"), State::Draining);
}

#[tokio::test]
async fn ctl_exit_codes() {
    let s = setup(&["a"]).await;
    let (code, stdout, _) = ctl(&s.socket, &["show", "backends"]).await;
    assert_eq!(code, 0);
    assert!(stdout.starts_with("POOL "), "{stdout}");
    let (code, stdout, _) = ctl(&s.socket, &["show", "backends", "--json"]).await;
    assert_eq!(code, 0);
    assert_eq!(json_rows(&stdout).len(), 1);

    let (code, _, stderr) = ctl(&s.socket, &["frobnicate"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "error: unknown command \"frobnicate\"; try \"help\"\n"
    );
    let (code, _, stderr) = ctl(&s.socket, &["drain", "pool/nope", "--wait"]).await;
    assert_eq!(code, 1);
    assert_eq!(stderr, "error: no backend \"pool/nope\" (known: pool/a)\n");

    let missing = s.socket.with_file_name("nobody-here.sock");
    let (code, _, stderr) = ctl(&missing, &["help"]).await;
    assert_eq!(code, 2);
    assert!(
        stderr.contains(&missing.display().to_string()) && stderr.contains("No such file"),
        "names the path and the OS error: {stderr}"
    );

    let (code, _, stderr) = ctl(
        &s.socket,
        &["drain", "pool/a", "--wait", "--timeout", "soon"],
    )
    .await;
    assert_eq!(code, 2, "a usage error: {stderr}");
    assert_eq!(state(&s.server, "pool", "a"), State::Up, "nothing was sent");
}

#[tokio::test]
async fn disable_enable_and_set_weight() {
    let s = setup(&["a", "b"]).await;
    let reply = admin(&s.socket, "disable pool/a").await;
    assert_eq!(
        reply,
        "pool/a: disabled, health checks paused, 0 connections open\n"
    );
    assert_eq!(state(&s.server, "pool", "a"), State::Disabled);
    for _ in 0..10 {
        let (_stream, name) = connect_named(s.front).await;
        assert_eq!(name, "b");
    }
    assert_eq!(
        admin(&s.socket, "enable pool/a").await,
        "pool/a: enabled, now up\n"
    );

    assert_eq!(
        admin(&s.socket, "set weight pool/b 5").await,
        "pool/b: weight 5 (was 1)\n"
    );
    let rows = json_rows(&admin(&s.socket, "show backends --json").await);
    assert_eq!(row(&rows, "b")["weight"], 5);
    assert_eq!(
        admin(&s.socket, "set weight pool/b 0").await,
        "error: weight \"0\" is not a number from 1 to 1000\n"
    );
    assert_eq!(
        admin(&s.socket, "set weight pool/zzz 5").await,
        "error: no backend \"pool/zzz\" (known: pool/a, pool/b)\n"
    );
    assert_eq!(
        admin(&s.socket, "drain other/a").await,
        "error: no backend \"other/a\" (known: pool/a, pool/b)\n"
    );
    assert_eq!(
        admin(&s.socket, "enable a").await,
        "error: \"a\" is not POOL/BACKEND\n"
    );
    assert_eq!(
        admin(&s.socket, "reload").await,
        "error: this instance was started without a config file\n"
    );
}

#[tokio::test]
async fn bad_input_never_hurts_serving() {
    let s = setup(&["a"]).await;
    let long_line = {
        let mut line = vec![b'x'; 5000];
        line.push(b'\n');
        line
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "unknown command",
            b"frobnicate now\n".to_vec(),
            "error: unknown command \"frobnicate\"",
        ),
        ("empty line", b"\n".to_vec(), "error: empty command"),
        ("blank line", b"   \r\n".to_vec(), "error: empty command"),
        (
            "binary junk",
            b"\xff\xfe\x00\x01junk\n".to_vec(),
            "error: command is not valid UTF-8",
        ),
        (
            "control characters",
            b"\x00\x01\n".to_vec(),
            "error: unknown command \"\\0\\u{1}\"",
        ),
        (
            "a line over 4 KiB",
            long_line,
            "error: command line longer than 4096 bytes",
        ),
        (
            "half a line, then silence",
            b"show back".to_vec(),
            "error: no complete command line within 300ms",
        ),
        (
            "show junk",
            b"show everything\n".to_vec(),
            "error: unknown command \"show everything\"",
        ),
        (
            "extra words",
            b"drain pool/a now\n".to_vec(),
            "error: usage: drain POOL/BACKEND",
        ),
    ];
    for (what, bytes, expected) in cases {
        let reply = admin_raw(&s.socket, &bytes).await;
        assert!(reply.starts_with(expected), "{what}: got {reply:?}");
        traffic_flows(s.front).await;
    }

    // Nothing at all, then silence: disconnected after the read timeout.
    let started = Instant::now();
    let reply = admin_raw(&s.socket, b"").await;
    assert!(
        reply.starts_with("error: no complete command line"),
        "{reply:?}"
    );
    assert!(started.elapsed() >= SHORT_READ_TIMEOUT);

    // A megabyte without a newline: an error or a close, never unbounded buffering.
    let mut stream = tokio::net::UnixStream::connect(&s.socket).await.unwrap();
    let (mut r, mut w) = stream.split();
    let junk = vec![b'j'; 1 << 20];
    let (_, reply) = tokio::join!(w.write_all(&junk), async {
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, r.read_to_end(&mut reply)).await;
        reply
    });
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.is_empty() || reply.starts_with("error: "),
        "{reply:?}"
    );
    drop(stream);

    // A line ended by EOF instead of a newline is still a line.
    let mut stream = tokio::net::UnixStream::connect(&s.socket).await.unwrap();
    stream.write_all(b"help").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("commands:"), "{reply:?}");

    traffic_flows(s.front).await;
    assert_eq!(state(&s.server, "pool", "a"), State::Up);
}

#[tokio::test]
async fn a_hundred_admin_clients_at_once() {
    let s = setup(&["a", "b"]).await;
    let mut clients = Vec::new();
    for i in 0..100 {
        let socket = s.socket.clone();
        clients.push(tokio::spawn(async move {
            let bytes: &[u8] = match i % 4 {
                0 => b"\xffjunk\n",
                1 => b"sho",
                2 => b"show backends\n",
                _ => b"",
            };
            (i, admin_raw(&socket, bytes).await)
        }));
    }
    // Traffic flows meanwhile.
    for _ in 0..20 {
        traffic_flows(s.front).await;
    }
    for client in clients {
        let (i, reply) = tokio::time::timeout(DEADLINE, client)
            .await
            .unwrap()
            .unwrap();
        let fine = reply.is_empty()
            || reply.starts_with("error: ")
            || (i % 4 == 2 && reply.starts_with("POOL "));
        assert!(fine, "client {i}: {reply:?}");
    }
    traffic_flows(s.front).await;
    assert!(admin(&s.socket, "help").await.starts_with("commands:"));
}

#[tokio::test]
async fn silent_client_is_disconnected_after_ten_seconds_by_default() {
    let dir = TempDir::new("admin-default");
    let socket = dir.join("admin.sock");
    let backend = TestBackend::start("a").await;
    let server = Server::start(
        config_with_admin(std::slice::from_ref(&backend), &socket),
        None,
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    stream.write_all(b"show").await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_string(&mut reply))
        .await
        .expect("disconnected within 15 s")
        .unwrap();
    let took = started.elapsed();
    assert_eq!(
        reply,
        "error: no complete command line within 10s; closing\n"
    );
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(12),
        "disconnected after {took:?}"
    );
    traffic_flows(server.listener_addr("front").unwrap()).await;
}

#[tokio::test]
async fn a_second_instance_on_a_live_socket_is_refused_and_a_stale_one_replaced() {
    let s = setup(&["a"]).await;
    let other = TestBackend::start("b").await;
    let error = Server::start(
        config_with_admin(std::slice::from_ref(&other), &s.socket),
        None,
    )
    .await
    .err()
    .expect("a second instance on the same admin socket is refused");
    let message = format!("{error:#}");
    assert!(
        message.contains(&s.socket.display().to_string())
            && message.contains("another running weir"),
        "{message}"
    );
    // The first instance is unharmed.
    assert!(admin(&s.socket, "help").await.starts_with("commands:"));
    traffic_flows(s.front).await;

    // A stale socket file (its process is gone) is replaced.
    let dir = TempDir::new("admin-stale");
    let stale = dir.join("admin.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = Server::start(
        config_with_admin(std::slice::from_ref(&other), &stale),
        None,
    )
    .await
    .expect("a stale socket is replaced");
    assert!(admin(&stale, "help").await.starts_with("commands:"));
    server.stop().await;
    assert!(!stale.exists());

    // Something that is not a socket is never replaced.
    let file = dir.join("not-a-socket");
    std::fs::write(&file, "precious").unwrap();
    let error = Server::start(config_with_admin(std::slice::from_ref(&other), &file), None)
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{error:#}").contains("is not a socket"),
        "{error:#}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
}

/// Whether `config::parse` is built yet (it lands from another branch); until then the
/// tests of `ctl -c` say they skip.
fn config_parsing_available() -> bool {
    let yaml = "listeners: {}\npools: {}\n";
    if std::panic::catch_unwind(|| weir::config::parse(yaml, "probe.yaml")).is_err() {
        eprintln!("SKIPPED: config parsing is not available in this build");
        return false;
    }
    true
}

#[tokio::test]
async fn ctl_reads_the_socket_from_the_config_file() {
    if !config_parsing_available() {
        return;
    }
    let s = setup(&["a"]).await;
    let dir = TempDir::new("ctl-config");
    let with_socket = dir.join("weir.yaml");
    std::fs::write(
        &with_socket,
        format!(
            "admin:\n  socket: {}\nlisteners:\n  front:\n    bind: 127.0.0.1:0\n    pool: pool\npools:\n  pool:\n    backends:\n      - address: 127.0.0.1:1\n",
            s.socket.display()
        ),
    )
    .unwrap();
    let run = |args: Vec<std::ffi::OsString>| async move {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .arg("ctl")
            .args(args)
            .output()
            .await
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(vec![
        "-c".into(),
        with_socket.clone().into(),
        "show".into(),
        "listeners".into(),
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("LISTENER "), "{stdout}");

    // Only admin.socket is read: a backend whose name doesn't resolve (an outage) or a
    // mistake elsewhere in the file doesn't keep an operator from the admin socket.
    let broken = dir.join("broken.yaml");
    std::fs::write(
        &broken,
        format!(
            "admin:\n  socket: {}\nlisteners:\n  front:\n    bind: 127.0.0.1:0\n    pool: pool\npools:\n  pool:\n    strategy: fastest\n    backends:\n      - address: no-such-host.invalid:5432\n",
            s.socket.display()
        ),
    )
    .unwrap();
    let check = tokio::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["check", "-c"])
        .arg(&broken)
        .output()
        .await
        .unwrap();
    assert_eq!(check.status.code(), Some(2), "the file itself is invalid");
    let (code, stdout, stderr) = run(vec![
        "-c".into(),
        broken.clone().into(),
        "show".into(),
        "backends".into(),
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("POOL "), "{stdout}");

    let without = dir.join("no-admin.yaml");
    std::fs::write(
        &without,
        "listeners:\n  front:\n    bind: 127.0.0.1:0\n    pool: pool\npools:\n  pool:\n    backends:\n      - address: 127.0.0.1:1\n",
    )
    .unwrap();
    let (code, _, stderr) = run(vec!["-c".into(), without.clone().into(), "help".into()]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("admin.socket is not set"), "{stderr}");
}

#[tokio::test]
async fn show_info_as_text_and_json_follows_connections_and_reloads() {
    let s = setup(&["a", "b"]).await;
    let (_held, _name) = connect_named(s.front).await;
    let info: serde_json::Value =
        serde_json::from_str(&admin(&s.socket, "show info --json").await).unwrap();
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"), "{info}");
    // In-process: weir's pid is the test's.
    assert_eq!(info["pid"], std::process::id(), "{info}");
    assert!(info["uptime_seconds"].as_u64().is_some(), "{info}");
    assert_eq!(info["config_file"], serde_json::Value::Null, "{info}");
    assert_eq!(info["load_ok"], true, "{info}");
    assert_eq!(info["reloads"], 0, "{info}");
    assert!(info["loaded_at"].as_str().unwrap().ends_with('Z'), "{info}");
    assert_eq!(info["listeners"], 1, "{info}");
    assert_eq!(info["pools"], 1, "{info}");
    assert_eq!(info["backends"], 2, "{info}");
    assert_eq!(info["connections"], 1, "{info}");
    assert_eq!(info["udp_sessions"], 0, "{info}");
    let (open, max) = (info["fds_open"].as_u64(), info["fds_max"].as_u64());
    if cfg!(target_os = "linux") {
        assert!(open.unwrap() > 0 && max.unwrap() >= open.unwrap(), "{info}");
    }

    // Started without a file: a reload fails, and show info says so.
    assert!(admin(&s.socket, "reload").await.starts_with("error: "));
    let text = admin(&s.socket, "show info").await;
    for needle in [
        format!("version:          {}", env!("CARGO_PKG_VERSION")),
        format!("pid:              {}", std::process::id()),
        "config file:      -".to_string(),
        "(failed, the config before stays in force: this instance was started without a config file)".to_string(),
        "reloads:          1".to_string(),
        "backends:         2".to_string(),
        "connections:      1".to_string(),
        "udp sessions:     0".to_string(),
        "file descriptors: ".to_string(),
    ] {
        assert!(text.contains(&needle), "no {needle:?} in:\n{text}");
    }
    let help = admin(&s.socket, "help").await;
    assert!(help.contains("show info [--json]"), "{help}");
}
