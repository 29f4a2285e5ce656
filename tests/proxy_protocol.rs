//! The PROXY protocol with real peers: nginx's stream module (`listen … proxy_protocol`)
//! as a backend that answers with the client address it was told, HAProxy with
//! `send-proxy-v2` in front of a weir listener with `accept_proxy`, and the refusals
//! (missing, malformed, late or untrusted headers) seen by a client and in the metrics.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use weir::balance::Strategy;
use weir::config::Config;
use weir::proxy_protocol::{Cidr, Version};
use weir::server::Server;

/// A child process killed (and reaped) on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Polls until something accepts on `addr` (the daemon is up).
async fn wait_listening(addr: SocketAddr, what: &str) {
    wait_until(DEADLINE, what, || async move {
        TcpStream::connect(addr).await.is_ok()
    })
    .await;
}

/// nginx's stream module on a free port, answering every connection with
/// `$proxy_protocol_addr:$proxy_protocol_port\n` (it reads v1 and v2 alike).
async fn nginx(dir: &TempDir) -> (Daemon, SocketAddr) {
    let port = free_port();
    let conf = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         daemon off;\nmaster_process off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log info;\n\
         events {{ worker_connections 64; }}\n\
         stream {{ server {{ listen 127.0.0.1:{port} proxy_protocol; \
         return \"$proxy_protocol_addr:$proxy_protocol_port\\n\"; }} }}\n",
        dir = dir.path.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .arg("-p")
        .arg(&dir.path)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx starts");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let daemon = Daemon(child);
    wait_listening(addr, "nginx listening").await;
    (daemon, addr)
}

/// weir with one listener `{tag}_front` to `backend`, with metrics.
fn config(tag: &str, backend: SocketAddr, send: Option<Version>, accept: &[&str]) -> Config {
    let mut config = tcp_config(Strategy::RoundRobin, vec![backend_config("b", backend, 1)]);
    config.listeners[0].name = format!("{tag}_front");
    config.listeners[0].accept_proxy = accept.iter().map(|c| Cidr::parse(c).unwrap()).collect();
    // What validation copies from the pool.
    config.listeners[0].send_proxy = send;
    config.pools[0].proxy_protocol = send;
    config.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    config
}

async fn start_tagged(tag: &str, config: Config) -> (Server, SocketAddr) {
    let server = Server::start(config, None).await.expect("weir starts");
    let front = server.listener_addr(&format!("{tag}_front")).unwrap();
    (server, front)
}

/// A connection to `to` from `ip` (a loopback address of 127.0.0.0/8).
async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let stream = tokio::time::timeout(DEADLINE, socket.connect(to))
        .await
        .expect("connect in time")
        .expect("connect");
    stream.set_nodelay(true).unwrap();
    stream
}

/// `weir_listener_rejected_total{listener="{tag}_front",reason="proxy_header"}`.
async fn rejected(server: &Server, tag: &str) -> f64 {
    let addr = server.metrics_addr().unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    let series =
        format!("weir_listener_rejected_total{{listener=\"{tag}_front\",reason=\"proxy_header\"}}");
    body.lines()
        .find_map(|l| l.strip_prefix(&series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The connection ends (EOF or reset) without a byte of the backend's.
async fn assert_closed(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: not closed within {DEADLINE:?}"));
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "{what}: got {read:?} instead of a close"
    );
}

#[tokio::test]
async fn nginx_reads_each_clients_own_address_from_v1_and_v2() {
    if !require_program("nginx") {
        return;
    }
    let dir = TempDir::new("pp-nginx");
    let (_nginx, backend) = nginx(&dir).await;
    for version in [Version::V1, Version::V2] {
        let tag = format!("pp_nginx_{}", version.as_str());
        let (_server, front) = start_tagged(&tag, config(&tag, backend, Some(version), &[])).await;
        for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
            let mut client = connect_from(ip, front).await;
            let me = client.local_addr().unwrap();
            let line = read_line(&mut client).await;
            assert_eq!(
                line,
                me.to_string(),
                "{version:?}: nginx saw another client"
            );
        }
    }
}

#[tokio::test]
async fn behind_haproxy_send_proxy_v2_the_backend_sees_the_original_client() {
    if !require_program("nginx") || !require_program("haproxy") {
        return;
    }
    let dir = TempDir::new("pp-haproxy");
    let (_nginx, backend) = nginx(&dir).await;
    let tag = "pp_haproxy";
    let (_server, front) = start_tagged(
        tag,
        config(tag, backend, Some(Version::V1), &["127.0.0.0/8"]),
    )
    .await;
    let port = free_port();
    let cfg = format!(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n\
         backend b\n  server s {front} send-proxy-v2\n"
    );
    std::fs::write(dir.join("haproxy.cfg"), cfg).unwrap();
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(dir.join("haproxy.cfg"))
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy starts");
    let _haproxy = Daemon(child);
    let haproxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(haproxy, "haproxy listening").await;
    for ip in ["127.0.0.5", "127.0.0.6"] {
        let mut client = connect_from(ip, haproxy).await;
        let me = client.local_addr().unwrap();
        assert_eq!(
            read_line(&mut client).await,
            me.to_string(),
            "through haproxy and weir"
        );
    }
}

#[tokio::test]
async fn a_trusted_client_without_a_header_or_with_garbage_is_closed_and_counted() {
    let backend = TestBackend::start("a").await;
    let tag = "pp_missing";
    let (server, front) =
        start_tagged(tag, config(tag, backend.addr, None, &["127.0.0.0/8"])).await;
    let mut plain = connect_from("127.0.0.2", front).await;
    plain.write_all(b"hello\r\n").await.unwrap();
    assert_closed(&mut plain, "no header").await;
    let mut garbage = connect_from("127.0.0.2", front).await;
    garbage
        .write_all(b"\r\n\r\n\0\r\nQUIX\n\x21\x11\0\x0c")
        .await
        .unwrap();
    assert_closed(&mut garbage, "a broken v2 signature").await;
    let mut bad_v1 = connect_from("127.0.0.2", front).await;
    bad_v1
        .write_all(b"PROXY TCP4 1.2.3.4 nope 1 2\r\n")
        .await
        .unwrap();
    assert_closed(&mut bad_v1, "a bad v1 address").await;
    wait_until(DEADLINE, "three rejections counted", || async {
        rejected(&server, tag).await == 3.0
    })
    .await;
    assert_eq!(backend.accepted(), 0, "nothing reached the backend");
}

#[tokio::test]
async fn a_header_split_over_several_writes_works_and_bytes_after_it_are_kept() {
    let backend = TestBackend::start("a").await;
    let tag = "pp_split";
    let (server, front) =
        start_tagged(tag, config(tag, backend.addr, None, &["127.0.0.0/8"])).await;
    for header in [
        b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 80\r\n".to_vec(),
        weir::proxy_protocol::write(
            Version::V2,
            weir::proxy_protocol::Transport::Stream,
            "[2001:db8::1]:4000".parse().unwrap(),
            "[2001:db8::2]:80".parse().unwrap(),
        )
        .as_bytes()
        .to_vec(),
    ] {
        let mut client = connect_from("127.0.0.2", front).await;
        for piece in header.chunks(7) {
            client.write_all(piece).await.unwrap();
            // Separate segments: each write leaves before the next (TCP_NODELAY).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(read_line(&mut client).await, "a");
        client.write_all(b"ping\n").await.unwrap();
        assert_eq!(read_line(&mut client).await, "ping");
        // The header and the first payload in one segment: the payload is not lost.
        let mut together = connect_from("127.0.0.3", front).await;
        together
            .write_all(&[header.as_slice(), b"pong\n"].concat())
            .await
            .unwrap();
        assert_eq!(read_line(&mut together).await, "a");
        assert_eq!(read_line(&mut together).await, "pong");
    }
    assert_eq!(rejected(&server, tag).await, 0.0);
}

#[tokio::test]
async fn a_header_from_an_untrusted_source_is_refused() {
    let backend = TestBackend::start("a").await;
    let tag = "pp_untrusted";
    let (server, front) =
        start_tagged(tag, config(tag, backend.addr, None, &["127.0.0.9/32"])).await;
    let mut spoof = connect_from("127.0.0.2", front).await;
    spoof
        .write_all(b"PROXY TCP4 10.1.1.1 10.2.2.2 1 2\r\nhello\n")
        .await
        .unwrap();
    assert_closed(&mut spoof, "an untrusted header").await;
    wait_until(DEADLINE, "the refusal counted", || async {
        rejected(&server, tag).await == 1.0
    })
    .await;
    // Without a header, an untrusted source is served as usual.
    let mut plain = connect_from("127.0.0.2", front).await;
    assert_eq!(read_line(&mut plain).await, "a");
}

#[tokio::test]
async fn a_trusted_client_that_sends_nothing_is_closed_at_the_deadline() {
    let backend = TestBackend::start("a").await;
    let tag = "pp_slow";
    let mut config = config(tag, backend.addr, None, &["127.0.0.0/8"]);
    // The header's deadline is 5 s or idle_timeout, when shorter.
    config.listeners[0].idle_timeout = Duration::from_millis(800);
    let (server, front) = start_tagged(tag, config).await;
    let started = Instant::now();
    let mut silent = connect_from("127.0.0.2", front).await;
    let mut partial = connect_from("127.0.0.3", front).await;
    partial.write_all(b"PROXY TCP4 1.2").await.unwrap();
    assert_closed(&mut silent, "a silent client").await;
    assert_closed(&mut partial, "half a header").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
    wait_until(DEADLINE, "both counted", || async {
        rejected(&server, tag).await == 2.0
    })
    .await;
}

// ----- the keys in `weir check` -----------------------------------------------------

fn check_problems(text: &str) -> Vec<String> {
    match weir::config::parse(text, "weir.yaml") {
        Ok(_) => panic!("expected problems:\n{text}"),
        Err(e) => e.0.iter().map(|d| d.to_string()).collect(),
    }
}

#[test]
fn the_keys_are_read_and_copied_to_the_listeners_of_the_pool() {
    let text = "\
listeners:
  edge:
    bind: 127.0.0.1:7000
    pool: app
    accept_proxy: [10.0.0.0/8, \"fd00::/8\", 192.0.2.7]
  inner:
    bind: 127.0.0.1:7001
    pool: app
pools:
  app:
    proxy_protocol: v2
    backends:
      - address: 127.0.0.1:6379
";
    let config = weir::config::parse(text, "weir.yaml").unwrap();
    let edge = &config.listeners[0];
    assert_eq!(edge.name, "edge");
    let shown: Vec<String> = edge.accept_proxy.iter().map(|c| c.to_string()).collect();
    assert_eq!(shown, ["10.0.0.0/8", "fd00::/8", "192.0.2.7/32"]);
    assert!(config.listeners[1].accept_proxy.is_empty());
    assert_eq!(config.pools[0].proxy_protocol, Some(Version::V2));
    assert!(
        config
            .listeners
            .iter()
            .all(|l| l.send_proxy == Some(Version::V2))
    );
}

#[test]
fn bad_values_and_udp_are_errors_with_their_position() {
    let text = "\
listeners:
  edge:
    bind: 127.0.0.1:7000
    pool: app
    accept_proxy: [10.0.0.1/8, nonsense]
  dns:
    bind: 127.0.0.1:5300
    protocol: udp
    pool: dns
    accept_proxy: [10.0.0.0/8]
pools:
  app:
    proxy_protocol: v3
    backends:
      - address: 127.0.0.1:6379
  dns:
    proxy_protocol: v1
    backends:
      - address: 127.0.0.1:53
";
    let all = check_problems(text).join("\n");
    for expected in [
        "weir.yaml:5:20: accept_proxy: \"10.0.0.1/8\" has bits set",
        "weir.yaml:5:32: accept_proxy: \"nonsense\" is not a CIDR",
        "weir.yaml:10:19: accept_proxy is for tcp listeners only",
        "weir.yaml:13:21: unknown proxy_protocol \"v3\" (expected one of: v1, v2)",
        "weir.yaml:17:21: pool \"dns\" serves udp (listener \"dns\"), and PROXY protocol v1 has no datagrams",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
}

/// A udp pool with `proxy_protocol: v2` prepends a DGRAM header to every datagram; the
/// backend answers with the source it read, and the payload after it is intact.
#[tokio::test]
async fn udp_datagrams_carry_a_v2_header_each() {
    let backend = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let baddr = backend.local_addr().unwrap();
    let answering = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (n, from) = backend.recv_from(&mut buf).await.unwrap();
            let header = weir::proxy_protocol::parse(&buf[..n]).unwrap().unwrap();
            assert_eq!(header.version, Version::V2);
            let (source, _) = header.addresses.expect("addresses");
            let payload = String::from_utf8_lossy(&buf[header.len..n]).into_owned();
            seen.push(n - header.len);
            let reply = format!("{source} {payload}");
            backend.send_to(reply.as_bytes(), from).await.unwrap();
        }
        seen
    });
    let mut config = udp_config(Strategy::RoundRobin, vec![backend_config("u", baddr, 1)]);
    let tag = "pp_udp";
    config.listeners[0].name = format!("{tag}_front");
    config.listeners[0].send_proxy = Some(Version::V2);
    config.pools[0].proxy_protocol = Some(Version::V2);
    let (_server, front) = start_tagged(tag, config).await;
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let client = udp_client(ip).await;
        let me = client.local_addr().unwrap();
        for payload in ["one", "two"] {
            let answer = udp_exchange(&client, front, payload.as_bytes()).await;
            assert_eq!(answer, format!("{me} {payload}"));
        }
    }
    let sizes = tokio::time::timeout(DEADLINE, answering)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        sizes,
        [3, 3, 3, 3],
        "each payload arrived whole after its header"
    );
}

/// source-hash picks by the header's source, not by the load balancer's address: from one
/// real address, ten claimed clients spread over both backends, each always to the same.
#[tokio::test]
async fn source_hash_picks_by_the_address_in_the_header() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let mut config = tcp_config(
        Strategy::SourceHash,
        vec![
            backend_config("a", a.addr, 1),
            backend_config("b", b.addr, 1),
        ],
    );
    let tag = "pp_hash";
    config.listeners[0].name = format!("{tag}_front");
    config.listeners[0].accept_proxy = vec![Cidr::parse("127.0.0.0/8").unwrap()];
    let (_server, front) = start_tagged(tag, config).await;
    let mut picked = Vec::new();
    for i in 1..=10u8 {
        let header = format!("PROXY TCP4 198.51.100.{i} 192.0.2.1 4000 80\r\n");
        let mut names = Vec::new();
        for _ in 0..2 {
            let mut client = connect_from("127.0.0.2", front).await;
            client.write_all(header.as_bytes()).await.unwrap();
            names.push(read_line(&mut client).await);
        }
        assert_eq!(names[0], names[1], "198.51.100.{i} moved between backends");
        picked.push(names.swap_remove(0));
    }
    assert!(
        picked.iter().any(|n| n == "a") && picked.iter().any(|n| n == "b"),
        "every claimed client went to one backend: {picked:?}"
    );
}

/// The binary on a YAML file: `proxy_protocol` reaches the listeners through validation,
/// and the access log names the client from the header (and `end: proxy_header` for a
/// refusal).
#[tokio::test]
async fn end_to_end_from_yaml_with_the_access_log() {
    use std::io::{BufRead, BufReader};
    // A backend that answers with the first line it reads (weir's PROXY header).
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let baddr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in backend.incoming().take(4) {
            let Ok(stream) = stream else { continue };
            let mut line = String::new();
            let mut reader = BufReader::new(&stream);
            if reader.read_line(&mut line).is_ok() {
                let _ = std::io::Write::write_all(&mut &stream, line.as_bytes());
            }
        }
    });
    let dir = TempDir::new("pp-e2e");
    let port = free_port();
    let yaml = format!(
        "listeners:\n  e2e:\n    bind: 127.0.0.1:{port}\n    pool: app\n    access_log: true\n    accept_proxy: [127.0.0.2/32]\n\
         pools:\n  app:\n    proxy_protocol: v1\n    backends:\n      - address: {baddr}\n"
    );
    let path = dir.join("weir.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["--log-format", "json", "run", "-c"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _weir = Daemon(child);
    let (tx, logs) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = logs.recv_timeout(left).expect("weir accepting in time");
        if line.contains("accepting on") {
            break;
        }
    }
    let mut client = connect_from("127.0.0.2", front).await;
    client
        .write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 443\r\n")
        .await
        .unwrap();
    let line = read_line(&mut client).await;
    assert_eq!(line, "PROXY TCP4 203.0.113.7 192.0.2.1 5555 443\r");
    drop(client);
    let mut ends = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    // Each connection's line before the next connection starts: the first one's end
    // (its close passed to the backend and back) would otherwise race the second's refusal.
    let mut plain = None;
    while ends.len() < 2 {
        if ends.len() == 1 && plain.is_none() {
            let mut refused = connect_from("127.0.0.2", front).await;
            refused.write_all(b"no header\r\n").await.unwrap();
            assert_closed(&mut refused, "no header").await;
            plain = Some(refused);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let line = logs.recv_timeout(left).expect("two access lines in time");
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        if value["target"] == "weir::access" {
            let f = &value["fields"];
            ends.push((
                f["client"].as_str().unwrap().to_string(),
                f["end"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert_eq!(
        ends[0],
        ("203.0.113.7:5555".to_string(), "closed".to_string())
    );
    assert_eq!(ends[1].1, "proxy_header");
    assert!(ends[1].0.starts_with("127.0.0.2:"), "{:?}", ends[1]);
}
