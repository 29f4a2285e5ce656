//! The `weir` binary as an operator runs it: `check`, `run` with a bad file, SIGTERM.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn weir() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir"))
}

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("weir.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weir-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const BAD: &str = "listeners:
  front:
    bind: 127.0.0.1:0
    pool: missing
pools:
  app:
    strategy: fastest
    backends:
      - address: 127.0.0.1:9
";

#[test]
fn check_exits_0_on_a_valid_file_and_2_listing_every_problem() {
    let dir = temp_dir("check");
    let good = write_config(
        &dir,
        "listeners:\n  a:\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  p:\n    backends:\n      - address: 127.0.0.1:9\n",
    );
    let out = weir().args(["check", "-c"]).arg(&good).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = write_config(&dir, BAD);
    let out = weir().args(["check", "-c"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = bad.display().to_string();
    assert!(
        stderr.contains(&format!("{file}:4:11:")),
        "missing pool at 4:11 in:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("{file}:7:15:")),
        "unknown strategy at 7:15 in:\n{stderr}"
    );
    assert!(stderr.contains("\"fastest\""), "{stderr}");
}

#[test]
fn run_with_a_bad_file_prints_the_same_and_exits_2() {
    let dir = temp_dir("run-bad");
    let bad = write_config(&dir, BAD);
    let check = weir().args(["check", "-c"]).arg(&bad).output().unwrap();
    let run = weir().args(["run", "-c"]).arg(&bad).output().unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&run.stderr),
        String::from_utf8_lossy(&check.stderr)
    );
}

/// Starts `weir run`, returning the child and the address its listener `front` bound.
fn spawn_weir(
    config: &std::path::Path,
) -> (
    std::process::Child,
    SocketAddr,
    std::sync::mpsc::Receiver<String>,
) {
    spawn_weir_with(weir().args(["run", "-c"]).arg(config))
}

/// Like `spawn_weir`, for a prepared command.
fn spawn_weir_with(
    command: &mut Command,
) -> (
    std::process::Child,
    SocketAddr,
    std::sync::mpsc::Receiver<String>,
) {
    let (child, front, logs, _) = spawn_weir_keeping_start_log(command);
    (child, front, logs)
}

/// Like `spawn_weir_with`, also returning the lines weir logged before it accepted.
fn spawn_weir_keeping_start_log(
    command: &mut Command,
) -> (
    std::process::Child,
    SocketAddr,
    std::sync::mpsc::Receiver<String>,
    Vec<String>,
) {
    let mut child = command
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + common::DEADLINE;
    let mut before = Vec::new();
    loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "weir did not log its listener address in time; it said:\n{}",
                before.join("\n")
            );
        };
        if let Some(rest) = line.split("accepting on ").nth(1) {
            let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
            return (child, addr, rx, before);
        }
        before.push(line);
    }
}

/// An echo backend on std threads (these tests are synchronous); returns its address.
fn echo_backend_thread() -> SocketAddr {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in backend.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn sigterm_lets_the_open_connection_finish_refuses_new_ones_and_exits_0() {
    let backend_addr = echo_backend_thread();
    let dir = temp_dir("sigterm");
    let config = write_config(
        &dir,
        &format!(
            "shutdown_timeout: 20s\nlisteners:\n  front:\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  p:\n    backends:\n      - address: {backend_addr}\n"
        ),
    );
    let (mut child, front, logs) = spawn_weir(&config);
    let mut open = TcpStream::connect(front).unwrap();
    open.set_read_timeout(Some(common::DEADLINE)).unwrap();
    open.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).unwrap();

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Accepting stops at once.
    let deadline = Instant::now() + common::DEADLINE;
    while TcpStream::connect_timeout(&front, Duration::from_millis(200)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "weir still accepts after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The open connection still works.
    open.write_all(b"after!").unwrap();
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after!");
    assert!(
        child.try_wait().unwrap().is_none(),
        "weir waits for the open connection"
    );
    drop(open);

    let deadline = Instant::now() + common::DEADLINE;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            Instant::now() < deadline,
            "weir exits once the last connection closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
    let logs: Vec<String> = logs.try_iter().collect();
    assert!(
        logs.iter().any(|l| l.contains("SIGTERM")),
        "the signal is logged: {logs:?}"
    );
}

#[test]
fn json_log_format_prints_one_object_a_line() {
    let dir = temp_dir("json");
    let config = write_config(
        &dir,
        "listeners:\n  front:\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  p:\n    backends:\n      - address: 127.0.0.1:9\n",
    );
    let mut child = weir()
        .args(["--log-format", "json", "run", "-c"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let first = lines.next().expect("a log line").unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let value: serde_json::Value = serde_json::from_str(&first).expect("a JSON object");
    assert!(value.get("level").is_some(), "{first}");
}

#[test]
fn tells_systemd_ready_then_stopping() {
    let dir = temp_dir("notify");
    let socket_path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    notify.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let config = write_config(
        &dir,
        "listeners:\n  front:\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  p:\n    backends:\n      - address: 127.0.0.1:9\n",
    );
    let mut child = weir()
        .args(["run", "-c"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("a notification");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let n = notify.recv(&mut buf).expect("a notification");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// One admin command over the socket, from a synchronous test.
fn admin_sync(socket: &std::path::Path, line: &str) -> String {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(common::DEADLINE)).unwrap();
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn sighup_reloads_the_config_file_and_keeps_open_connections() {
    let backend_addr = echo_backend_thread();
    let dir = temp_dir("sighup");
    let socket = dir.join("admin.sock");
    let text = |bind: &str, extra_backend: &str| {
        format!(
            "admin:\n  socket: {}\nlisteners:\n  front:\n    bind: {bind}\n    pool: p\npools:\n  p:\n    backends:\n      - address: {backend_addr}\n        name: one\n{extra_backend}",
            socket.display()
        )
    };
    let config = write_config(&dir, &text("127.0.0.1:0", ""));
    let (mut child, front, logs) = spawn_weir(&config);
    let mut open = TcpStream::connect(front).unwrap();
    open.set_read_timeout(Some(common::DEADLINE)).unwrap();

    write_config(
        &dir,
        &text(
            &front.to_string(),
            &format!("      - address: {backend_addr}\n        name: two\n"),
        ),
    );
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + common::DEADLINE;
    while !admin_sync(&socket, "show backends").contains("two") {
        assert!(
            Instant::now() < deadline,
            "backend two appears after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The connection opened before the reload still works.
    open.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    // An invalid file on SIGHUP: nothing changes, weir keeps serving.
    write_config(&dir, "listeners: [");
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        let line = logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("weir logs the failed reload");
        if line.contains("reload failed, nothing changed") {
            break;
        }
    }
    let reply = admin_sync(&socket, "show backends");
    assert!(reply.contains("one") && reply.contains("two"), "{reply}");
    open.write_all(b"again").unwrap();
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"again");

    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn demo_shows_strategies_a_backend_going_down_and_a_drain_then_exits_0() {
    let out = weir().arg("demo").env_remove("RUST_LOG").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |label: &str| -> Vec<String> {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label} row in:\n{stdout}"));
        line.split_whitespace().skip(1).map(String::from).collect()
    };
    assert_eq!(row("round-robin"), ["100", "200", "300"]);
    assert_eq!(row("least-connections"), ["100", "200", "300"]);
    assert!(stdout.contains("charlie=down"), "{stdout}");
    assert!(stdout.contains("bravo=draining"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("bravo") && l.contains("drained")),
        "{stdout}"
    );
    assert!(stdout.contains("app/bravo: enabled, now up"), "{stdout}");
    // No client connection failed at any point.
    for line in stdout.lines().filter(|l| l.contains("failed:")) {
        assert!(line.contains("failed:0"), "{line}");
    }
}

#[test]
fn out_of_file_descriptors_the_accept_loop_backs_off_logs_once_and_recovers() {
    let backend_addr = echo_backend_thread();
    let dir = temp_dir("emfile");
    let config = write_config(
        &dir,
        &format!(
            "listeners:\n  front:\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  p:\n    backends:\n      - address: {backend_addr}\n"
        ),
    );
    // A hard limit of 64 open files that weir cannot raise: a few dozen connections exhaust it.
    let (mut child, front, logs) = spawn_weir_with(
        Command::new("sh")
            .arg("-c")
            .arg("ulimit -n 64 && exec \"$0\" run -c \"$1\"")
            .arg(env!("CARGO_BIN_EXE_weir"))
            .arg(&config),
    );
    let mut clients = Vec::new();
    for _ in 0..80 {
        // The kernel completes handshakes into the backlog even while weir can't accept.
        if let Ok(stream) = TcpStream::connect_timeout(&front, Duration::from_secs(2)) {
            clients.push(stream);
        }
    }
    let deadline = Instant::now() + common::DEADLINE;
    let mut exhaustion_lines = 0;
    while exhaustion_lines == 0 {
        let Ok(line) = logs.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("weir never logged running out of file descriptors");
        };
        if line.contains("accept failed") {
            exhaustion_lines += 1;
        }
    }
    // Free the descriptors. Until weir says it accepts again, the burst goes on: it is
    // logged once, not once per failed accept.
    drop(clients);
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        let Ok(line) = logs.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("weir never logged accepting again");
        };
        if line.contains("accepting again") {
            break;
        }
        assert!(
            !line.contains("accept failed"),
            "logged once per burst, not per failure: {line}"
        );
    }
    // And it serves.
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        let mut stream = TcpStream::connect(front).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 4];
        if stream.write_all(b"back").is_ok()
            && stream.read_exact(&mut buf).is_ok()
            && &buf == b"back"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "weir serves again once descriptors are free"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(child.try_wait().unwrap().is_none(), "weir is still running");
    let _ = child.kill();
    let _ = child.wait();
}

/// weir's own descriptors running out is never a backend's fault: a flood past the fd
/// limit makes connects and probes fail with EMFILE, and no healthy backend is marked
/// down for it (before, passive checking and the probes both blamed the backend, and
/// the outage outlasted the flood).
#[test]
fn running_out_of_descriptors_never_marks_a_healthy_backend_down() {
    let backend_addr = echo_backend_thread();
    let dir = temp_dir("emfile-health");
    let socket = dir.join("admin.sock");
    let config = write_config(
        &dir,
        &format!(
            "admin:\n  socket: {}\nlisteners:\n  front:\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  p:\n    health_check: {{ interval: 100ms, timeout: 500ms, rise: 1, fall: 1 }}\n    backends:\n      - address: {backend_addr}\n",
            socket.display()
        ),
    );
    let (child, front, logs) = spawn_weir_with(
        Command::new("sh")
            .arg("-c")
            .arg("ulimit -n 64 && exec \"$0\" run -c \"$1\"")
            .arg(env!("CARGO_BIN_EXE_weir"))
            .arg(&config),
    );
    let _child = KillOnDrop(child);
    // Idle clients: each one weir serves holds two descriptors (client and backend).
    let mut clients = Vec::new();
    for _ in 0..80 {
        if let Ok(stream) = TcpStream::connect_timeout(&front, Duration::from_secs(2)) {
            clients.push(stream);
        }
    }
    // Hold the flood through several probe intervals, reading what weir says.
    let mut said = Vec::new();
    let until = Instant::now() + Duration::from_millis(1500);
    while let Ok(line) = logs.recv_timeout(until.saturating_duration_since(Instant::now())) {
        said.push(line);
    }
    assert!(
        said.iter()
            .any(|l| l.contains("out of resources") || l.contains("accept failed")),
        "the flood exhausted weir's descriptors:\n{}",
        said.join("\n")
    );
    drop(clients);
    // The backend stayed up throughout, and weir says so once descriptors are free.
    let deadline = Instant::now() + common::DEADLINE;
    let shown = loop {
        let out = weir()
            .args(["ctl", "-s"])
            .arg(&socket)
            .args(["show", "backends"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            break text;
        }
        assert!(Instant::now() < deadline, "the admin socket answers again");
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(line) = logs.try_recv() {
        said.push(line);
    }
    let downs: Vec<&String> = said.iter().filter(|l| l.contains(" down:")).collect();
    assert!(
        downs.is_empty(),
        "a healthy backend was marked down: {downs:?}"
    );
    assert!(shown.contains(" up "), "{shown}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kills the child when the test ends, passing or panicking.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Logs written to a file or a pipe (`weir run … 2> weir.log`, the journal) carry no
/// terminal colour codes.
#[test]
fn logs_into_a_pipe_have_no_colour_codes() {
    let dir = temp_dir("colour");
    let config = write_config(
        &dir,
        "listeners:\n  front:\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  p:\n    backends:\n      - address: 127.0.0.1:9\n",
    );
    let (child, _front, logs, mut lines) =
        spawn_weir_keeping_start_log(weir().args(["run", "-c"]).arg(&config));
    let _child = KillOnDrop(child);
    // The line after "accepting on …": "weir … running".
    lines.push(
        logs.recv_timeout(common::DEADLINE)
            .expect("weir says it runs"),
    );
    assert!(lines.iter().any(|l| l.contains("INFO")), "{lines:?}");
    for line in &lines {
        assert!(!line.contains('\u{1b}'), "a colour code in {line:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_sigterm_closes_open_connections_at_once() {
    let backend_addr = echo_backend_thread();
    let dir = temp_dir("sigterm-twice");
    let config = write_config(
        &dir,
        &format!(
            "shutdown_timeout: 1h\nlisteners:\n  front:\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  p:\n    backends:\n      - address: {backend_addr}\n"
        ),
    );
    let (mut child, front, logs) = spawn_weir(&config);
    let mut open = TcpStream::connect(front).unwrap();
    open.set_read_timeout(Some(common::DEADLINE)).unwrap();
    open.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    open.read_exact(&mut buf).unwrap();

    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    // Wait until the first signal was taken (draining), then send the second.
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        let line = logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("weir logs the first SIGTERM");
        if line.contains("SIGTERM: stopped accepting") {
            break;
        }
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the open connection holds the first stop (1h grace)"
    );
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + common::DEADLINE;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            Instant::now() < deadline,
            "the second SIGTERM ends weir promptly"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
    // The open connection was closed by weir.
    let n = open.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
}

/// A pool whose every backend fails its first health check: weir still starts, warns once
/// at start naming the pool, and closes its clients at once instead of leaving them hanging.
#[test]
fn starting_with_no_backend_up_warns_and_closes_clients_at_once() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let dir = temp_dir("none-up");
    let config = write_config(
        &dir,
        &format!(
            "listeners:\n  front:\n    bind: 127.0.0.1:0\n    pool: db\npools:\n  db:\n    health_check:\n      interval: 1s\n      timeout: 500ms\n    backends:\n      - address: {dead_addr}\n"
        ),
    );
    let (mut child, front, _logs, before_accepting) =
        spawn_weir_keeping_start_log(weir().args(["run", "-c"]).arg(&config));
    let warnings: Vec<_> = before_accepting
        .iter()
        .filter(|l| l.contains("no backend is up"))
        .collect();
    assert_eq!(warnings.len(), 1, "{before_accepting:#?}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("db"),
        "{}",
        warnings[0]
    );

    let mut client = TcpStream::connect(front).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    let closed = match client.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(n) => panic!("{n} bytes from a pool with no backend up"),
    };
    assert!(closed, "the client is closed at once");
    child.kill().unwrap();
    child.wait().unwrap();
}
