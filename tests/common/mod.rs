//! Test harness: backends on 127.0.0.1:0, configs built in code, weir started in-process,
//! and polling with a deadline (never sleep-and-hope).
#![allow(dead_code)]

pub mod child;
pub mod patroni;
pub mod unbound;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use weir::backend::State;
use weir::balance::Strategy;
use weir::config::{
    BackendConfig, Config, HealthCheckConfig, ListenerConfig, OnDown, PoolConfig, Protocol,
};
use weir::server::Server;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// A TCP backend that greets each connection with `NAME\n`, then echoes.
pub struct TestBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TestBackend {
    pub async fn start(name: &str) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(name, listener)
    }

    /// Serves again on the same address (after `stop`).
    pub async fn restart(name: &str, addr: SocketAddr) -> TestBackend {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        Self::serve(name, socket.listen(128).unwrap())
    }

    fn serve(name: &str, listener: TcpListener) -> TestBackend {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let greeting = format!("{name}\n");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    if stream.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        TestBackend {
            name: name.to_string(),
            addr,
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listening socket (open connections are dropped with their tasks' runtime).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn backend_config(name: &str, addr: SocketAddr, weight: u32) -> BackendConfig {
    BackendConfig {
        name: name.to_string(),
        address: addr.to_string(),
        addr,
        host: None,
        weight,
        max_connections: None,
        backup: false,
    }
}

/// One tcp listener `front` on 127.0.0.1:0 in front of pool `pool`.
pub fn tcp_config(strategy: Strategy, backends: Vec<BackendConfig>) -> Config {
    Config {
        admin_socket: None,
        state_file: None,
        metrics_bind: None,
        shutdown_timeout: Duration::from_secs(5),
        listeners: vec![ListenerConfig {
            name: "front".into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            protocol: Protocol::Tcp,
            pool: "pool".into(),
            max_connections: None,
            idle_timeout: Duration::from_secs(3600),
            half_close_timeout: Duration::from_secs(60),
            access_log: false,
            accept_proxy: Vec::new(),
            send_proxy: None,
        }],
        pools: vec![PoolConfig {
            name: "pool".into(),
            strategy,
            protocol: Protocol::Tcp,
            connect_timeout: Duration::from_secs(1),
            retries: 2,
            on_down: OnDown::Keep,
            queue_timeout: Duration::ZERO,
            slow_start: Duration::ZERO,
            proxy_protocol: None,
            health_check: None,
            backends,
            discover: None,
        }],
        resolvers: Vec::new(),
    }
}

pub async fn start(config: Config) -> (Server, SocketAddr) {
    let server = Server::start(config, None).await.expect("weir starts");
    let addr = server.listener_addr("front").expect("listener front");
    (server, addr)
}

/// Connects through weir and reads the backend's greeting line.
pub async fn connect_named(addr: SocketAddr) -> (TcpStream, String) {
    let mut stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let name = read_line(&mut stream).await;
    (stream, name)
}

pub async fn read_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut byte))
            .await
            .expect("greeting in time")
            .expect("read greeting");
        assert!(
            n == 1,
            "connection closed before the greeting; got {line:?}"
        );
        if byte[0] == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(byte[0]);
    }
}

/// Polls `condition` every 10 ms until it holds or `deadline` passes.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether a test that needs an external program may skip when it is missing:
/// plain `cargo test` skips (saying so); CI sets WEIR_REQUIRE_EXTERNAL=1 to fail instead.
pub fn require_program(program: &str) -> bool {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if found {
        return true;
    }
    if std::env::var_os("WEIR_REQUIRE_EXTERNAL").is_some_and(|v| v == "1") {
        panic!("{program} is not installed and WEIR_REQUIRE_EXTERNAL=1: install it (see .ci/run)");
    }
    eprintln!("SKIPPED: {program} is not installed; install it to run this test (.ci/run does)");
    false
}

/// A TCP-connect health check with these timings.
pub fn health_check(
    interval: Duration,
    timeout: Duration,
    rise: u32,
    fall: u32,
) -> HealthCheckConfig {
    HealthCheckConfig {
        interval,
        timeout,
        rise,
        fall,
        port: None,
        send: None,
        expect: None,
    }
}

/// The state of `pool/backend` as the admin socket shows it.
pub fn state(server: &Server, pool: &str, backend: &str) -> State {
    server
        .backend(pool, backend)
        .unwrap_or_else(|| panic!("no backend {pool}/{backend}"))
        .state()
}

/// Polls until `pool/backend` is in `wanted`; returns how long that took.
pub async fn wait_for_state(
    server: &Server,
    pool: &str,
    backend: &str,
    wanted: State,
    deadline: Duration,
) -> Duration {
    let started = tokio::time::Instant::now();
    let end = started + deadline;
    loop {
        let now = state(server, pool, backend);
        if now == wanted {
            return started.elapsed();
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{pool}/{backend} is still {now} after {deadline:?}, waiting for {wanted}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A private directory under the system temp dir, removed on drop.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "weir-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }

    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Sends one raw line (the caller adds the newline, or not) to an admin socket and
/// returns everything it answered before closing. A reset after the reply counts as
/// the close.
pub async fn admin_raw(socket: &std::path::Path, bytes: &[u8]) -> String {
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    let _ = stream.write_all(bytes).await;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut chunk))
            .await
            .expect("admin reply in time")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&reply).into_owned()
}

/// One admin command; returns the reply.
pub async fn admin(socket: &std::path::Path, line: &str) -> String {
    admin_raw(socket, format!("{line}\n").as_bytes()).await
}

/// A UDP backend that answers each datagram with `NAME:` followed by the datagram
/// (`echo` answers with the datagram alone), and remembers the size of each one it got.
pub struct UdpTestBackend {
    pub name: String,
    pub addr: SocketAddr,
    sizes: Arc<std::sync::Mutex<Vec<usize>>>,
    task: JoinHandle<()>,
}

impl UdpTestBackend {
    pub async fn start(name: &str) -> UdpTestBackend {
        Self::serve(name, format!("{name}:").into_bytes(), "127.0.0.1:0").await
    }

    /// Answers with exactly the datagram it got.
    pub async fn echo(name: &str) -> UdpTestBackend {
        Self::serve(name, Vec::new(), "127.0.0.1:0").await
    }

    async fn serve(name: &str, prefix: Vec<u8>, bind: &str) -> UdpTestBackend {
        let socket = tokio::net::UdpSocket::bind(bind).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&sizes);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            let mut answer = prefix.clone();
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                seen.lock().unwrap().push(n);
                answer.truncate(prefix.len());
                answer.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&answer, peer).await;
            }
        });
        UdpTestBackend {
            name: name.to_string(),
            addr,
            sizes,
            task,
        }
    }

    /// Sizes of the datagrams received so far, in order.
    pub fn sizes(&self) -> Vec<usize> {
        self.sizes.lock().unwrap().clone()
    }

    pub fn received(&self) -> usize {
        self.sizes.lock().unwrap().len()
    }
}

impl Drop for UdpTestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One udp listener `front` on 127.0.0.1:0 in front of pool `pool` (udp defaults:
/// max_connections 65536, idle_timeout 30s).
pub fn udp_config(strategy: Strategy, backends: Vec<BackendConfig>) -> Config {
    let mut config = tcp_config(strategy, backends);
    config.listeners[0].protocol = Protocol::Udp;
    config.listeners[0].max_connections = Some(65536);
    config.listeners[0].idle_timeout = Duration::from_secs(30);
    config.pools[0].protocol = Protocol::Udp;
    config
}

/// A client UDP socket on `ip`, any port.
pub async fn udp_client(ip: &str) -> tokio::net::UdpSocket {
    tokio::net::UdpSocket::bind((ip, 0)).await.unwrap()
}

/// Sends `payload` to `to` and returns the first datagram that comes back and its source.
pub async fn udp_exchange_from(
    socket: &tokio::net::UdpSocket,
    to: SocketAddr,
    payload: &[u8],
) -> (Vec<u8>, SocketAddr) {
    socket.send_to(payload, to).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, from) = tokio::time::timeout(DEADLINE, socket.recv_from(&mut buf))
        .await
        .expect("udp answer in time")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

/// Sends `payload` to `to` and returns the answer as text.
pub async fn udp_exchange(
    socket: &tokio::net::UdpSocket,
    to: SocketAddr,
    payload: &[u8],
) -> String {
    let (answer, _) = udp_exchange_from(socket, to, payload).await;
    String::from_utf8(answer).expect("a text answer")
}

/// The backend name in an answer `NAME:payload`.
pub fn answered_by(answer: &str) -> &str {
    answer.split(':').next().unwrap_or("")
}

/// `len` bytes that depend on every position and on `seed` (xorshift64): payloads whose
/// corruption, truncation or reordering a checksum or comparison catches.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
