//! `listeners.NAME.access_log` and the other log lines operators read: the binary with
//! `--log-format json`, connections that end in different ways, each line parsed back and
//! checked field by field.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A weir process, its listeners' addresses and its stderr lines.
struct Weir {
    child: Child,
    listeners: HashMap<String, SocketAddr>,
    logs: Receiver<String>,
    /// What it logged until its listeners accepted.
    start: Vec<String>,
}

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `weir --log-format json run` on `config` and waits until its `count` listeners
/// accept.
fn spawn(name: &str, config: &str, count: usize, rust_log: &str) -> Weir {
    let dir = std::env::temp_dir().join(format!("weir-access-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("weir.yaml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["--log-format", "json", "run", "-c"])
        .arg(&path)
        .env("RUST_LOG", rust_log)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, logs) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut weir = Weir {
        child,
        listeners: HashMap::new(),
        logs,
        start: Vec::new(),
    };
    while weir.listeners.len() < count {
        let line = weir.next_line("a listener accepting");
        weir.start.push(line.clone());
        let value = json(&line);
        let message = value["fields"]["message"].as_str().unwrap_or_default();
        let rest = message
            .strip_prefix("accepting on ")
            .or_else(|| message.strip_prefix("receiving on "));
        if let Some(rest) = rest {
            let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
            let listener = value["fields"]["listener"].as_str().unwrap().to_string();
            weir.listeners.insert(listener, addr);
        }
    }
    weir
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

impl Weir {
    fn next_line(&self, waiting_for: &str) -> String {
        self.logs
            .recv_timeout(common::DEADLINE)
            .unwrap_or_else(|_| panic!("no log line in time, waiting for {waiting_for}"))
    }

    /// The next access line's fields.
    fn next_access(&self) -> Value {
        let deadline = Instant::now() + common::DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .logs
                .recv_timeout(left)
                .expect("an access line in time");
            let value = json(&line);
            if value["target"] == "weir::access" {
                assert_eq!(value["level"], "INFO", "{line}");
                return value["fields"].clone();
            }
        }
    }

    /// Every line logged within `wait`.
    fn lines_for(&self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut lines = Vec::new();
        while let Ok(line) = self
            .logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            lines.push(line);
        }
        lines
    }
}

/// A backend that reads until EOF (reporting each read on the channel), then answers
/// `goodbye` and closes.
fn goodbye_backend() -> (SocketAddr, Receiver<usize>) {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = backend.local_addr().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for stream in backend.incoming() {
            let Ok(mut stream) = stream else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => {
                            let _ = stream.write_all(b"goodbye");
                            return;
                        }
                        Ok(n) => {
                            let _ = tx.send(n);
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn dead_port() -> SocketAddr {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    dead.local_addr().unwrap()
}

fn check(line: &Value, listener: &str, backend: &str, client: SocketAddr, bytes: (u64, u64)) {
    assert_eq!(line["listener"], listener, "{line}");
    assert_eq!(line["backend"], backend, "{line}");
    assert_eq!(line["client"], client.to_string(), "{line}");
    assert_eq!(line["bytes_to_backend"], bytes.0, "{line}");
    assert_eq!(line["bytes_to_client"], bytes.1, "{line}");
    assert!(line["duration_ms"].as_u64().is_some(), "{line}");
    assert_eq!(line["retries"], 0, "{line}");
}

/// The client sees the connection closed (EOF or reset) without any byte.
fn closed_at_once(client: &mut TcpStream) {
    client.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("not closed at once: {other:?}"),
    }
}

#[test]
fn each_finished_connection_is_one_json_line_with_the_contract_fields() {
    let (echo, seen) = goodbye_backend();
    let dead = dead_port();
    let config = format!(
        "listeners:
  front:
    bind: 127.0.0.1:0
    pool: app
    max_connections: 1
    access_log: true
  lonely:
    bind: 127.0.0.1:0
    pool: empty
    access_log: true
  quiet:
    bind: 127.0.0.1:0
    pool: app
pools:
  app:
    backends:
      - address: {echo}
        name: echo
  empty:
    health_check:
      interval: 1s
      timeout: 500ms
    backends:
      - address: {dead}
"
    );
    let weir = spawn("contract", &config, 3, "info");
    let front = weir.listeners["front"];

    // Closed normally, while a second connection is over max_connections.
    let mut held = TcpStream::connect(front).unwrap();
    held.write_all(b"hello world").unwrap();
    assert_eq!(seen.recv_timeout(common::DEADLINE).unwrap(), 11);
    let mut over = TcpStream::connect(front).unwrap();
    closed_at_once(&mut over);
    let line = weir.next_access();
    check(&line, "front", "", over.local_addr().unwrap(), (0, 0));
    assert_eq!(line["end"], "max_connections", "{line}");
    assert_eq!(line["pool"], "app", "{line}");
    assert!(line.get("connect_ms").is_none(), "{line}");

    held.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    held.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"goodbye");
    let line = weir.next_access();
    check(&line, "front", "echo", held.local_addr().unwrap(), (11, 7));
    assert_eq!(line["end"], "closed", "{line}");
    assert_eq!(line["pool"], "app", "{line}");
    assert!(line["connect_ms"].as_u64().is_some(), "{line}");

    // Reset by the client after three bytes.
    let client = TcpStream::connect(front).unwrap();
    let client_addr = client.local_addr().unwrap();
    (&client).write_all(b"abc").unwrap();
    assert_eq!(seen.recv_timeout(common::DEADLINE).unwrap(), 3);
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    let line = weir.next_access();
    check(&line, "front", "echo", client_addr, (3, 0));
    assert_eq!(line["end"], "client_reset", "{line}");

    // No backend up.
    let mut client = TcpStream::connect(weir.listeners["lonely"]).unwrap();
    closed_at_once(&mut client);
    let line = weir.next_access();
    check(&line, "lonely", "", client.local_addr().unwrap(), (0, 0));
    assert_eq!(line["end"], "no_backend", "{line}");
    assert_eq!(line["pool"], "empty", "{line}");

    // A listener without access_log logs nothing of the kind.
    let mut client = TcpStream::connect(weir.listeners["quiet"]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"goodbye");
    let lines = weir.lines_for(Duration::from_millis(300));
    assert!(
        !lines.iter().any(|l| l.contains("weir::access")),
        "{lines:#?}"
    );
}

#[test]
fn rust_log_can_turn_the_access_log_off_and_a_bad_rust_log_is_named() {
    let (echo, _seen) = goodbye_backend();
    let config = format!(
        "listeners:
  front:
    bind: 127.0.0.1:0
    pool: app
    access_log: true
pools:
  app:
    backends:
      - address: {echo}
"
    );
    let weir = spawn("off", &config, 1, "info,weir::access=off");
    let mut client = TcpStream::connect(weir.listeners["front"]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).unwrap();
    let lines = weir.lines_for(Duration::from_millis(300));
    assert!(
        !lines.iter().any(|l| l.contains("weir::access")),
        "{lines:#?}"
    );
    drop(weir);

    // An invalid filter: the default level, and a warning naming it.
    let weir = spawn("bad", &config, 1, "info,weir=loud");
    let warning = weir
        .start
        .iter()
        .map(|l| json(l))
        .find(|l| l["fields"]["rust_log"] == "info,weir=loud")
        .unwrap_or_else(|| panic!("no warning naming RUST_LOG: {:#?}", weir.start));
    assert_eq!(warning["level"], "WARN", "{warning}");
    let mut client = TcpStream::connect(weir.listeners["front"]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    client.read_to_end(&mut Vec::new()).unwrap();
    assert_eq!(weir.next_access()["end"], "closed");
}

/// A udp echo backend on a std thread.
fn udp_echo() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    addr
}

#[test]
fn an_ended_udp_session_is_one_access_line() {
    let echo = udp_echo();
    let config = format!(
        "listeners:
  dns:
    bind: 127.0.0.1:0
    protocol: udp
    pool: resolvers
    idle_timeout: 300ms
    access_log: true
pools:
  resolvers:
    backends:
      - address: {echo}
        name: echo
"
    );
    let weir = spawn("udp", &config, 1, "info");
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(common::DEADLINE)).unwrap();
    client.connect(weir.listeners["dns"]).unwrap();
    let mut buf = [0u8; 64];
    for datagram in [&b"ping"[..], b"hello"] {
        client.send(datagram).unwrap();
        assert_eq!(client.recv(&mut buf).unwrap(), datagram.len());
    }
    let line = weir.next_access();
    check(&line, "dns", "echo", client.local_addr().unwrap(), (9, 9));
    assert_eq!(line["end"], "idle_timeout", "{line}");
    assert_eq!(line["pool"], "resolvers", "{line}");
    assert!(line["duration_ms"].as_u64().unwrap() >= 300, "{line}");
}

// ----- operator-facing log lines: facts as fields of their own ------------------------

impl Weir {
    /// The next line whose `fields.message` contains `needle`, parsed.
    fn next_matching(&self, needle: &str) -> Value {
        let deadline = Instant::now() + common::DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .logs
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {needle:?} in time"));
            let value = json(&line);
            let message = value["fields"]["message"].as_str().unwrap_or_default();
            if message.contains(needle) {
                return value;
            }
        }
    }
}

#[test]
fn max_connections_rejections_are_one_warning_per_burst() {
    let (echo, seen) = goodbye_backend();
    let config = format!(
        "listeners:
  front:
    bind: 127.0.0.1:0
    pool: app
    max_connections: 1
pools:
  app:
    backends:
      - address: {echo}
"
    );
    let weir = spawn("max", &config, 1, "info");
    let front = weir.listeners["front"];
    let mut held = TcpStream::connect(front).unwrap();
    held.write_all(b"x").unwrap();
    assert_eq!(seen.recv_timeout(common::DEADLINE).unwrap(), 1);
    for _ in 0..3 {
        let mut over = TcpStream::connect(front).unwrap();
        closed_at_once(&mut over);
    }
    let warning = weir.next_matching("connections rejected");
    assert_eq!(warning["level"], "WARN", "{warning}");
    let fields = &warning["fields"];
    assert_eq!(fields["listener"], "front", "{warning}");
    assert_eq!(fields["reason"], "max_connections", "{warning}");
    assert_eq!(fields["rejected"], 1, "{warning}");
    assert_eq!(fields["max_connections"], 1, "{warning}");
    let later = weir.lines_for(Duration::from_millis(300));
    assert!(
        !later.iter().any(|l| l.contains("connections rejected")),
        "one warning per 10 s: {later:#?}"
    );
    held.shutdown(Shutdown::Write).unwrap();
    held.read_to_end(&mut Vec::new()).unwrap();
}

#[test]
fn state_changes_and_connect_failures_carry_pool_backend_and_reason_fields() {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = backend.local_addr().unwrap();
    let dead = dead_port();
    let config = format!(
        "listeners:
  front:
    bind: 127.0.0.1:0
    pool: checked
  broken:
    bind: 127.0.0.1:0
    pool: unchecked
pools:
  checked:
    health_check:
      interval: 100ms
      timeout: 100ms
      rise: 1
      fall: 1
    backends:
      - address: {addr}
        name: only
  unchecked:
    retries: 0
    backends:
      - address: {dead}
        name: gone
"
    );
    let weir = spawn("fields", &config, 2, "info");

    // A connect that fails: the failure and the closed connection, both with fields.
    let mut client = TcpStream::connect(weir.listeners["broken"]).unwrap();
    closed_at_once(&mut client);
    let failed = weir.next_matching("connect failed");
    assert_eq!(failed["level"], "WARN", "{failed}");
    assert_eq!(failed["fields"]["pool"], "unchecked", "{failed}");
    assert_eq!(failed["fields"]["backend"], "gone", "{failed}");
    assert_eq!(failed["fields"]["reason"], "connection refused", "{failed}");
    let closed = weir.next_matching("connection closed");
    assert_eq!(closed["fields"]["listener"], "broken", "{closed}");
    assert_eq!(closed["fields"]["pool"], "unchecked", "{closed}");
    assert_eq!(closed["fields"]["backend"], "gone", "{closed}");
    assert_eq!(closed["fields"]["reason"], "connect_failed", "{closed}");

    // The pool's only backend goes down: its line, then the pool's.
    drop(backend);
    let down = weir.next_matching("only down");
    assert_eq!(down["level"], "WARN", "{down}");
    assert_eq!(down["fields"]["pool"], "checked", "{down}");
    assert_eq!(down["fields"]["backend"], "only", "{down}");
    assert_eq!(down["fields"]["state"], "down", "{down}");
    assert!(down["fields"]["reason"].as_str().is_some(), "{down}");
    let empty = weir.next_matching("no eligible backend left");
    assert_eq!(empty["level"], "WARN", "{empty}");
    assert_eq!(empty["fields"]["pool"], "checked", "{empty}");
    assert_eq!(empty["fields"]["reason"], "no_backend", "{empty}");

    // It comes back on the same port.
    let _backend = std::net::TcpListener::bind(addr).unwrap();
    let up = weir.next_matching("only up");
    assert_eq!(up["level"], "INFO", "{up}");
    assert_eq!(up["fields"]["pool"], "checked", "{up}");
    assert_eq!(up["fields"]["backend"], "only", "{up}");
    assert_eq!(up["fields"]["state"], "up", "{up}");
    let back = weir.next_matching("eligible again");
    assert_eq!(back["fields"]["pool"], "checked", "{back}");
    assert_eq!(back["fields"]["eligible"], 1, "{back}");
    let again = weir.lines_for(Duration::from_millis(300));
    assert!(
        !again
            .iter()
            .any(|l| l.contains("eligible again") || l.contains("no eligible backend")),
        "once per transition: {again:#?}"
    );
}
