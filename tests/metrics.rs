//! Metrics over real sockets: `/metrics` after real traffic, its HTTP behaviour, the
//! Prometheus kit in deploy/ checked by promtool, and a real Prometheus scraping weir.
//!
//! The recorder is global to this test binary and tests run in parallel: every test uses
//! its own pool and listener names and asserts only on series carrying them.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir::backend::{Health, State};
use weir::balance::Strategy;
use weir::config::{BackendConfig, Config};
use weir::server::Server;

/// The "nothing listens" test counts this process's listening sockets; every other test
/// holds this for reading while it runs so that count isn't disturbed.
static LISTENING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Listener `{tag}_front` in front of pool `{tag}`, with metrics on 127.0.0.1:0.
fn config(tag: &str, backends: Vec<BackendConfig>) -> Config {
    let mut config = tcp_config(Strategy::RoundRobin, backends);
    config.listeners[0].name = format!("{tag}_front");
    config.listeners[0].pool = tag.to_string();
    config.pools[0].name = tag.to_string();
    config.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    config
}

async fn start_tagged(tag: &str, config: Config) -> (Server, SocketAddr, SocketAddr) {
    let server = Server::start(config, None).await.expect("weir starts");
    let front = server
        .listener_addr(&format!("{tag}_front"))
        .expect("listener");
    let metrics = server.metrics_addr().expect("metrics address");
    (server, front, metrics)
}

/// One HTTP/1.0 request; returns the status code and the body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = tokio::time::timeout(DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} answered in time"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let reply = String::from_utf8(reply).expect("utf-8 reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line in {head:?}"));
    (status, body.to_string())
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (enough of it for weir's output).
fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("a number in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let mut labels = BTreeMap::new();
                let mut rest = rest.strip_suffix('}').expect("closing brace");
                while !rest.is_empty() {
                    let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
                    let mut value = String::new();
                    let mut chars = after.char_indices();
                    let end = loop {
                        match chars.next().expect("closing quote") {
                            (_, '\\') => value.push(chars.next().expect("escaped char").1),
                            (i, '"') => break i,
                            (_, c) => value.push(c),
                        }
                    };
                    labels.insert(key.to_string(), value);
                    rest = after[end + 1..].trim_start_matches(',');
                }
                (name.to_string(), labels)
            }
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// The value of the one series `name` whose labels include all of `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert!(
        matching.len() <= 1,
        "{name}{labels:?} matches several series: {matching:?}"
    );
    matching.first().map(|s| s.value)
}

fn get(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    value(samples, name, labels).unwrap_or_else(|| panic!("no series {name}{labels:?}"))
}

/// Scrapes until `check` passes on the parsed output, or fails with the last output.
async fn scrape_until(addr: SocketAddr, what: &str, check: impl Fn(&[Sample]) -> bool) -> String {
    let end = Instant::now() + DEADLINE;
    loop {
        let text = scrape(addr).await;
        if check(&parse(&text)) {
            return text;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An address nothing listens on: a backend that was killed.
fn killed_backend() -> SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

/// One connection through weir: greeting, `len` bytes echoed, clean close.
/// Returns (bytes sent, bytes received).
async fn echo_once(front: SocketAddr, expect_backend: &str, len: usize) -> (u64, u64) {
    let (mut stream, greeting) = connect_named(front).await;
    assert_eq!(greeting, expect_backend);
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    stream.write_all(&payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut echoed))
        .await
        .expect("echo in time")
        .unwrap();
    assert!(echoed == payload, "echo intact");
    (len as u64, (greeting.len() + 1 + len) as u64)
}

/// Runs `promtool ARGS` with `stdin`; returns (success, stdout + stderr).
fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    if let Some(input) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn kit_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every PromQL expression of the Grafana dashboard (panels and variables).
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&kit_file("deploy/grafana/weir.json")).expect("valid JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(q) = var["query"]["query"].as_str() {
            // label_values(SELECTOR, label): the selector is the query.
            let inner = q.strip_prefix("label_values(").expect("label_values");
            queries.push(inner[..inner.rfind(',').unwrap()].to_string());
        }
    }
    assert!(queries.len() > 10);
    queries
}

/// A dashboard query with Grafana's variables replaced by what "All" means.
fn with_variables_resolved(query: &str) -> String {
    query
        .replace("$__rate_interval", "1m")
        .replace("$instance", ".*")
        .replace("$job", ".*")
        .replace("$pool", ".*")
        .replace("$listener", ".*")
}

/// The metric names (weir_*, process_*) an expression or rule file mentions.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = text[i..].starts_with("weir_") || text[i..].starts_with("process_");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let end = text[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |n| i + n);
            names.push(text[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Labels weir may put on a series: never a client address or anything unbounded.
const ALLOWED_LABELS: &[&str] = &[
    "listener",
    "pool",
    "backend",
    "state",
    "reason",
    "result",
    "direction",
    "version",
    "le",
];

#[tokio::test]
async fn metrics_after_real_traffic_match_it_and_pass_promtool() {
    let _listening = LISTENING.read().await;
    let tag = "mt_traffic";
    let live = TestBackend::start("live").await;
    let mut config = config(
        tag,
        vec![
            // First, so any strategy (even first-eligible) tries it.
            backend_config("dead", killed_backend(), 1),
            backend_config("a", live.addr, 1),
        ],
    );
    config.listeners[0].max_connections = Some(2);
    let (server, front, metrics) = start_tagged(tag, config).await;
    let listener = format!("{tag}_front");
    let a = [("pool", tag), ("backend", "a")];
    let dead = [("pool", tag), ("backend", "dead")];
    let front_labels = [("listener", listener.as_str())];

    // Traffic: every connection ends up on `a` (connects to `dead` are refused and retried).
    let (mut sent, mut received) = (0, 0);
    for i in 0..6 {
        let (s, r) = echo_once(front, "live", 1000 + i * 777).await;
        sent += s;
        received += r;
    }
    assert_eq!(live.accepted(), 6);
    let dead_backend = server.backend(tag, "dead").unwrap();
    let text = scrape_until(metrics, "byte counts and closed connections", |m| {
        value(m, "weir_backend_bytes_sent_total", &a) == Some(sent as f64)
            && value(m, "weir_backend_bytes_received_total", &a) == Some(received as f64)
            && value(m, "weir_backend_connections_active", &a) == Some(0.0)
            && value(m, "weir_listener_connections_active", &front_labels) == Some(0.0)
    })
    .await;
    let m = parse(&text);
    assert_eq!(get(&m, "weir_backend_connections_total", &a), 6.0);
    assert_eq!(get(&m, "weir_backend_connect_errors_total", &a), 0.0);
    let dead_errors = dead_backend.metrics_connect_errors() as f64;
    assert!(dead_errors >= 1.0, "the dead backend was tried");
    assert_eq!(
        get(&m, "weir_backend_connect_errors_total", &dead),
        dead_errors
    );
    // Attempts count too: every one to `dead` failed.
    assert_eq!(
        get(&m, "weir_backend_connections_total", &dead),
        dead_errors
    );
    assert_eq!(get(&m, "weir_backend_bytes_sent_total", &dead), 0.0);
    assert_eq!(get(&m, "weir_backend_bytes_received_total", &dead), 0.0);
    assert_eq!(
        get(&m, "weir_listener_connections_total", &front_labels),
        6.0
    );
    assert_eq!(get(&m, "weir_listener_max_connections", &front_labels), 2.0);

    // Histograms are real histograms, with buckets.
    for (name, smallest) in [
        ("weir_backend_connect_duration_seconds", "0.0001"),
        ("weir_connection_duration_seconds", "0.001"),
    ] {
        assert_eq!(get(&m, &format!("{name}_count"), &a), 6.0, "{name}");
        let inf = [a[0], a[1], ("le", "+Inf")];
        assert_eq!(get(&m, &format!("{name}_bucket"), &inf), 6.0, "{name}");
        let first = [a[0], a[1], ("le", smallest)];
        assert!(
            value(&m, &format!("{name}_bucket"), &first).is_some(),
            "{name} le={smallest}"
        );
        assert!(get(&m, &format!("{name}_sum"), &a) > 0.0, "{name}");
    }
    assert_eq!(
        get(&m, "weir_backend_connect_duration_seconds_count", &dead),
        0.0
    );
    // Health checks (none configured here): the series exist, at zero.
    for result in ["pass", "fail"] {
        let labels = [a[0], a[1], ("result", result)];
        assert_eq!(get(&m, "weir_health_checks_total", &labels), 0.0);
    }
    assert!(
        value(
            &m,
            "weir_health_check_duration_seconds_bucket",
            &[a[0], a[1], ("le", "0.0001")]
        )
        .is_some()
    );

    // Backend state: up, then marked down.
    assert_eq!(get(&m, "weir_backend_up", &a), 1.0);
    // No health check: up until marked, and `PASSIVE_FALL` failed connects in a row from
    // traffic mark it.
    let marked_by_traffic = dead_errors >= f64::from(weir::pool::PASSIVE_FALL);
    assert_eq!(
        get(&m, "weir_backend_up", &dead),
        if marked_by_traffic { 0.0 } else { 1.0 },
        "no health check: up until {} failed connects",
        weir::pool::PASSIVE_FALL
    );
    dead_backend.set_health(Health::Down);
    let text = scrape(metrics).await; // refreshed right before the render, no waiting
    let m = parse(&text);
    assert_eq!(get(&m, "weir_backend_up", &dead), 0.0);
    for (backend, current) in [("a", State::Up), ("dead", State::Down)] {
        for state in State::ALL {
            let labels = [
                ("pool", tag),
                ("backend", backend),
                ("state", state.as_str()),
            ];
            let expected = if state == current { 1.0 } else { 0.0 };
            assert_eq!(
                get(&m, "weir_backend_state", &labels),
                expected,
                "{backend} {state}"
            );
        }
    }
    assert_eq!(get(&m, "weir_backend_weight", &a), 1.0);

    // Rejections: over max_connections, then with no backend up.
    let (_held1, _) = connect_named(front).await;
    let (_held2, _) = connect_named(front).await;
    let mut over = TcpStream::connect(front).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, over.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the connection over max_connections is closed");
    let max_reason = [front_labels[0], ("reason", "max_connections")];
    let no_backend = [front_labels[0], ("reason", "no_backend")];
    let m = parse(&scrape(metrics).await);
    assert_eq!(get(&m, "weir_listener_rejected_total", &max_reason), 1.0);
    assert_eq!(get(&m, "weir_listener_rejected_total", &no_backend), 0.0);
    assert_eq!(
        get(&m, "weir_listener_connections_active", &front_labels),
        2.0
    );
    assert_eq!(get(&m, "weir_backend_connections_active", &a), 2.0);
    drop((_held1, _held2));
    server.backend(tag, "a").unwrap().set_health(Health::Down);
    scrape_until(metrics, "held connections closed", |m| {
        value(m, "weir_listener_connections_active", &front_labels) == Some(0.0)
    })
    .await;
    let mut refused = TcpStream::connect(front).await.unwrap();
    let n = tokio::time::timeout(DEADLINE, refused.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "no backend: closed");
    let text = scrape_until(metrics, "the no_backend rejection", |m| {
        value(m, "weir_listener_rejected_total", &no_backend) == Some(1.0)
    })
    .await;
    let m = parse(&text);
    assert_eq!(get(&m, "weir_backend_up", &a), 0.0);
    assert_eq!(
        get(&m, "weir_listener_connections_total", &front_labels),
        9.0
    );

    // The process and build series.
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(get(&m, "weir_build_info", &version), 1.0);
    if cfg!(target_os = "linux") {
        assert!(get(&m, "process_open_fds", &[]) > 0.0);
        assert!(get(&m, "process_max_fds", &[]) > 0.0);
        assert!(get(&m, "process_resident_memory_bytes", &[]) > 0.0);
        let start = get(&m, "process_start_time_seconds", &[]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start > now - 3600.0 && start <= now + 1.0,
            "start {start}, now {now}"
        );
    }

    // Every contract metric is there with its labels.
    for (name, labels) in [
        ("weir_backend_up", &["pool", "backend"][..]),
        ("weir_backend_state", &["pool", "backend", "state"]),
        ("weir_backend_connections_active", &["pool", "backend"]),
        ("weir_backend_connections_total", &["pool", "backend"]),
        ("weir_backend_connect_errors_total", &["pool", "backend"]),
        ("weir_backend_bytes_sent_total", &["pool", "backend"]),
        ("weir_backend_bytes_received_total", &["pool", "backend"]),
        (
            "weir_backend_connect_duration_seconds_bucket",
            &["pool", "backend", "le"],
        ),
        ("weir_health_checks_total", &["pool", "backend", "result"]),
        ("weir_listener_connections_total", &["listener"]),
        ("weir_listener_rejected_total", &["listener", "reason"]),
        ("weir_listener_connections_active", &["listener"]),
        (
            "weir_connection_duration_seconds_bucket",
            &["pool", "backend", "le"],
        ),
        (
            "weir_health_check_duration_seconds_bucket",
            &["pool", "backend", "le"],
        ),
    ] {
        let mine: Vec<&Sample> = m
            .iter()
            .filter(|s| {
                s.name == name
                    && (s.labels.get("pool").map(String::as_str) == Some(tag)
                        || s.labels.get("listener") == Some(&listener))
            })
            .collect();
        assert!(!mine.is_empty(), "{name} is missing");
        for s in mine {
            let keys: Vec<&str> = s.labels.keys().map(String::as_str).collect();
            let mut want = labels.to_vec();
            want.sort();
            assert_eq!(keys, want, "labels of {name}");
        }
    }
    for s in &m {
        for key in s.labels.keys() {
            assert!(
                ALLOWED_LABELS.contains(&key.as_str()),
                "label {key} on {s:?}"
            );
        }
    }
    for s in m.iter().filter(|s| s.name.starts_with("weir_")) {
        let typed = format!(
            "# TYPE {} ",
            s.name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
        );
        assert!(text.contains(&typed), "{} has a TYPE line", s.name);
    }

    // And the whole text is valid for Prometheus.
    if require_program("promtool") {
        let (ok, out) = promtool(&["check", "metrics"], Some(&text));
        assert!(
            ok,
            "promtool check metrics failed:\n{out}\n--- input:\n{text}"
        );
    }
}

#[tokio::test]
async fn other_paths_are_404_and_other_methods_405() {
    let _listening = LISTENING.read().await;
    let tag = "mt_paths";
    let backend = TestBackend::start("b").await;
    let (_server, _front, metrics) =
        start_tagged(tag, config(tag, vec![backend_config("b", backend.addr, 1)])).await;
    for path in ["/metricsx", "/metrics/", "/favicon.ico", "/api/v1/query"] {
        let (status, _) = http(metrics, "GET", path).await;
        assert_eq!(status, 404, "GET {path}");
    }
    let (status, _) = http(metrics, "POST", "/metrics").await;
    assert_eq!(status, 405);
    // Readiness for Kubernetes: served once listeners accept.
    let (status, body) = http(metrics, "GET", "/ready").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, body) = http(metrics, "HEAD", "/metrics").await;
    assert_eq!((status, body.as_str()), (200, ""));
    let (status, body) = http(metrics, "GET", "/metrics?name[]=weir_backend_up").await;
    assert_eq!(status, 200);
    assert!(body.contains("weir_backend_up{"));

    // A request head over the size bound is refused, not buffered.
    let mut stream = TcpStream::connect(metrics).await.unwrap();
    let huge = format!(
        "GET /metrics HTTP/1.0\r\nX: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let _ = stream.write_all(huge.as_bytes()).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 431"), "got {reply:?}");
}

/// Listening TCP ports of this process, from /proc (Linux).
#[cfg(target_os = "linux")]
fn listening_ports() -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is f[1] (ADDR:PORT in hex), st is f[3] (0A = LISTEN), inode f[9].
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports.sort();
    ports
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn without_metrics_bind_nothing_listens() {
    let _alone = LISTENING.write().await;
    let tag = "mt_nobind";
    let backend = TestBackend::start("b").await;
    let mut config = config(tag, vec![backend_config("b", backend.addr, 1)]);
    config.metrics_bind = None;
    let before = listening_ports();
    let server = Server::start(config, None).await.expect("weir starts");
    assert_eq!(server.metrics_addr(), None);
    let front = server.listener_addr(&format!("{tag}_front")).unwrap();
    let mut after = listening_ports();
    after.retain(|p| !before.contains(p));
    assert_eq!(after, vec![front.port()], "only the listener listens");
    server.stop().await;
}

#[tokio::test]
async fn metrics_bind_failure_is_a_startup_error_naming_the_address() {
    let _listening = LISTENING.read().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let backend = TestBackend::start("b").await;
    let mut config = config("mt_bindfail", vec![backend_config("b", backend.addr, 1)]);
    config.metrics_bind = Some(addr);
    let error = match Server::start(config, None).await {
        Ok(_) => panic!("weir started with metrics.bind on a taken address"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains(&addr.to_string()) && error.contains("metrics.bind"),
        "{error}"
    );
}

#[tokio::test]
async fn shutdown_is_not_held_by_the_metrics_endpoint() {
    let _listening = LISTENING.read().await;
    let tag = "mt_stop";
    let backend = TestBackend::start("b").await;
    let (server, _front, metrics) =
        start_tagged(tag, config(tag, vec![backend_config("b", backend.addr, 1)])).await;
    scrape(metrics).await;
    // A scraper that connected and says nothing must not hold shutdown either.
    let _silent = TcpStream::connect(metrics).await.unwrap();
    let started = Instant::now();
    let left = server.stop().await;
    assert_eq!(left, 0);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        started.elapsed()
    );
    assert!(
        TcpStream::connect(metrics).await.is_err(),
        "endpoint closed"
    );
}

#[tokio::test]
async fn a_backend_that_is_gone_leaves_no_series() {
    let _listening = LISTENING.read().await;
    let backend = TestBackend::start("g").await;
    let gone = "mt_gone";
    let (server, _, _) = start_tagged(
        gone,
        config(gone, vec![backend_config("g", backend.addr, 1)]),
    )
    .await;
    // Another instance's endpoint shows it too: the registry is per process.
    let watcher = "mt_watcher";
    let (_watcher, _, metrics) = start_tagged(
        watcher,
        config(watcher, vec![backend_config("w", backend.addr, 1)]),
    )
    .await;
    let labels = [("pool", gone), ("backend", "g")];
    scrape_until(metrics, "mt_gone up", |m| {
        value(m, "weir_backend_up", &labels) == Some(1.0)
    })
    .await;
    server.stop().await;
    drop(server);
    let m = parse(&scrape(metrics).await);
    let left: Vec<&Sample> = m
        .iter()
        .filter(|s| s.labels.get("pool").map(String::as_str) == Some(gone))
        .collect();
    assert!(
        left.is_empty(),
        "series of a stopped server's backend: {left:?}"
    );
}

#[tokio::test]
async fn metrics_answer_while_1000_connections_are_open() {
    let _listening = LISTENING.read().await;
    weir::run::raise_open_file_limit();
    let tag = "mt_busy";
    let backend = TestBackend::start("busy").await;
    let (_server, front, metrics) = start_tagged(
        tag,
        config(tag, vec![backend_config("busy", backend.addr, 1)]),
    )
    .await;
    let mut open = Vec::with_capacity(1000);
    for _ in 0..10 {
        let batch: Vec<_> = (0..100)
            .map(|_| tokio::spawn(connect_named(front)))
            .collect();
        for task in batch {
            let (stream, name) = task.await.unwrap();
            assert_eq!(name, "busy");
            open.push(stream);
        }
    }
    let started = Instant::now();
    let text = tokio::time::timeout(Duration::from_secs(5), scrape(metrics))
        .await
        .expect("/metrics answers within 5 s with 1000 connections open");
    let m = parse(&text);
    let labels = [("pool", tag), ("backend", "busy")];
    assert_eq!(get(&m, "weir_backend_connections_active", &labels), 1000.0);
    assert_eq!(
        get(
            &m,
            "weir_listener_connections_active",
            &[("listener", "mt_busy_front")]
        ),
        1000.0
    );
    if cfg!(target_os = "linux") {
        // Two sockets per proxied connection in weir, plus the test's own ends.
        assert!(get(&m, "process_open_fds", &[]) >= 2000.0);
    }
    eprintln!(
        "scrape with 1000 open connections took {:?}",
        started.elapsed()
    );
    drop(open);
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_metrics_weir_exports() {
    let _listening = LISTENING.read().await;
    let tag = "mt_kit";
    let backend = TestBackend::start("k").await;
    let (_server, _front, metrics) =
        start_tagged(tag, config(tag, vec![backend_config("k", backend.addr, 1)])).await;
    let text = scrape(metrics).await;
    let exported = |name: &str| {
        let base = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_count"))
            .or_else(|| name.strip_suffix("_sum"))
            .unwrap_or(name);
        text.contains(&format!("# TYPE {base} "))
    };
    let mut used = metric_names(&dashboard_queries().join("\n"));
    assert!(used.len() >= 10, "{used:?}");
    used.extend(metric_names(&kit_file("deploy/prometheus/alerts.yml")));
    for name in used {
        if name == "weir_listener_max_connections" {
            continue; // exported only for listeners with max_connections (none here)
        }
        if name.starts_with("weir_udp_") {
            // Exported only for udp listeners (none here): tests/deploy_kit.rs checks the
            // names against src/metrics/names.rs, and tests/udp.rs scrapes them.
            continue;
        }
        assert!(
            exported(&name),
            "{name} is used in deploy/ but weir does not export it"
        );
    }
}

#[tokio::test]
async fn promtool_checks_the_alert_rules_and_their_tests() {
    let _listening = LISTENING.read().await;
    if !require_program("promtool") {
        return;
    }
    let (ok, out) = promtool(&["check", "rules", "deploy/prometheus/alerts.yml"], None);
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(
        &["check", "config", "deploy/prometheus/prometheus.yml"],
        None,
    );
    assert!(ok, "promtool check config:\n{out}");
    let (ok, out) = promtool(
        &["test", "rules", "deploy/prometheus/alerts_test.yml"],
        None,
    );
    assert!(ok, "promtool test rules:\n{out}");
    // The unit tests do show the backend-down alert firing (not just "no alerts").
    let tests = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts_test.yml"),
    )
    .unwrap();
    assert!(tests.contains("alertname: WeirBackendDown"));
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server on loopback, killed (and its data removed) on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir().join(format!(
            "weir-prometheus-{}-{}",
            std::process::id(),
            target.port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: weir\n    static_configs:\n      - targets: ['{target}']\n",
            rules = rules.display()
        );
        std::fs::write(dir.join("prom.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prom.yml").display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        Prometheus { child, dir, addr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` from Prometheus's HTTP API; the body as JSON.
    async fn api(&self, path: &str) -> Option<serde_json::Value> {
        let exchange = async {
            let mut stream = TcpStream::connect(self.addr).await.ok()?;
            let request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut reply = Vec::new();
            stream.read_to_end(&mut reply).await.ok()?;
            Some(reply)
        };
        let reply = tokio::time::timeout(DEADLINE, exchange).await.ok()??;
        let reply = String::from_utf8(reply).ok()?;
        let (_, body) = reply.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    }

    /// The value of an instant query's first result, if any.
    async fn query(&self, query: &str) -> Option<f64> {
        let encoded = url_encode(query);
        let json = self.api(&format!("/api/v1/query?query={encoded}")).await?;
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_weir() {
    let _listening = LISTENING.read().await;
    if !require_program("prometheus") {
        return;
    }
    let tag = "mt_prom";
    let backend = TestBackend::start("p").await;
    let (_server, front, metrics) =
        start_tagged(tag, config(tag, vec![backend_config("p", backend.addr, 1)])).await;
    for _ in 0..3 {
        echo_once(front, "p", 100).await;
    }
    let mut prometheus = Prometheus::start(metrics);
    let query = format!("weir_backend_connections_total{{pool=\"{tag}\",backend=\"p\"}}");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = prometheus.query(&query).await
            && v > 0.0
        {
            assert_eq!(v, 3.0);
            break;
        }
        if let Ok(Some(status)) = prometheus.child.try_wait() {
            panic!("prometheus exited ({status}):\n{}", prometheus.log());
        }
        assert!(
            Instant::now() < end,
            "prometheus did not see {query} within 30 s; up = {:?}\n{}",
            prometheus.query("up{job=\"weir\"}").await,
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The kit's alerting rules load in a real server too.
    let rules = prometheus.api("/api/v1/rules").await.expect("rules");
    assert!(
        rules.to_string().contains("WeirBackendDown"),
        "alerts.yml loaded: {rules}"
    );
    // Every dashboard query is valid PromQL, and the ones over connections find data.
    for query in dashboard_queries() {
        let resolved = with_variables_resolved(&query);
        let encoded = url_encode(&resolved);
        let reply = prometheus
            .api(&format!("/api/v1/query?query={encoded}"))
            .await
            .expect("an answer");
        assert_eq!(reply["status"], "success", "{resolved}: {reply}");
    }
    // The histogram arrives as buckets PromQL can take a quantile of.
    let quantile = format!(
        "histogram_quantile(0.99, sum by (le) (weir_backend_connect_duration_seconds_bucket{{pool=\"{tag}\"}}))"
    );
    let q = prometheus.query(&quantile).await;
    assert!(
        q.is_some_and(|q| q > 0.0 && q <= 10.0),
        "p99 connect time: {q:?}"
    );
}

/// A config file: listener `{tag}_front` on `bind` before pool `{tag}` with `backends`
/// (name, address), metrics on 127.0.0.1:0.
fn tagged_yaml(tag: &str, bind: &str, backends: &[(&str, SocketAddr)]) -> String {
    let mut text = format!(
        "metrics:\n  bind: 127.0.0.1:0\nlisteners:\n  {tag}_front:\n    bind: {bind}\n    pool: {tag}\npools:\n  {tag}:\n    backends:\n"
    );
    for (name, addr) in backends {
        text += &format!("      - address: {addr}\n        name: {name}\n");
    }
    text
}

/// Starts weir from `text` written to `dir/weir.yaml`, so that it can be reloaded.
async fn start_file(
    dir: &TempDir,
    tag: &str,
    text: &str,
) -> (Server, SocketAddr, SocketAddr, PathBuf) {
    let path = dir.join("weir.yaml");
    std::fs::write(&path, text).unwrap();
    let config = weir::config::load(&path).expect("valid config");
    let server = Server::start(config, Some(path.clone()))
        .await
        .expect("weir starts");
    let front = server.listener_addr(&format!("{tag}_front")).unwrap();
    let metrics = server.metrics_addr().expect("metrics address");
    (server, front, metrics, path)
}

/// The series of a backend are named by pool and backend name: a backend moved to a new
/// address by a reload shares them with its predecessor while that one retires. They show
/// the live backend throughout, and its predecessor's going doesn't zero them.
#[tokio::test]
async fn a_moved_backend_shows_its_own_state_while_and_after_the_old_one_retires() {
    let _listening = LISTENING.read().await;
    let tag = "mt_moved";
    let dir = TempDir::new(tag);
    let old = TestBackend::start("old").await;
    let new = TestBackend::start("new").await;
    let (server, front, metrics, path) = start_file(
        &dir,
        tag,
        &tagged_yaml(tag, "127.0.0.1:0", &[("m", old.addr)]),
    )
    .await;
    let (open, name) = connect_named(front).await;
    assert_eq!(name, "old");
    let predecessor = std::sync::Arc::downgrade(&server.backend(tag, "m").unwrap());

    std::fs::write(
        &path,
        tagged_yaml(tag, &front.to_string(), &[("m", new.addr)]),
    )
    .unwrap();
    server.handle.reload().await.expect("the reload applies");
    let (_s, name) = connect_named(front).await;
    assert_eq!(name, "new");

    let labels = [("pool", tag), ("backend", "m")];
    let state = |m: &[Sample], s: &str| {
        get(
            m,
            "weir_backend_state",
            &[labels[0], labels[1], ("state", s)],
        )
    };
    let m = parse(&scrape(metrics).await);
    assert_eq!(
        get(&m, "weir_backend_up", &labels),
        1.0,
        "while the old one retires"
    );
    assert_eq!(state(&m, "up"), 1.0);
    assert_eq!(state(&m, "draining"), 0.0);

    // The old connection closes: the old backend leaves (and is dropped).
    drop(open);
    wait_until(DEADLINE, "the old backend to be dropped", || {
        let gone = predecessor.upgrade().is_none();
        async move { gone }
    })
    .await;
    let m = parse(&scrape(metrics).await);
    assert_eq!(
        get(&m, "weir_backend_up", &labels),
        1.0,
        "after the old one left"
    );
    assert_eq!(state(&m, "up"), 1.0);
    assert_eq!(state(&m, "draining"), 0.0);
}

/// A backend removed by a reload while a connection is open on it is `retiring` in
/// `weir_backend_state`, not an operator's `draining`.
#[tokio::test]
async fn a_removed_backend_with_a_connection_open_is_retiring() {
    let _listening = LISTENING.read().await;
    let tag = "mt_retiring";
    let dir = TempDir::new(tag);
    let a = TestBackend::start("a").await;
    let (server, front, metrics, path) = start_file(
        &dir,
        tag,
        &tagged_yaml(tag, "127.0.0.1:0", &[("a", a.addr)]),
    )
    .await;
    let (_open, name) = connect_named(front).await;
    assert_eq!(name, "a");
    let b = TestBackend::start("b").await;
    std::fs::write(
        &path,
        tagged_yaml(tag, &front.to_string(), &[("b", b.addr)]),
    )
    .unwrap();
    server.handle.reload().await.expect("the reload applies");

    let labels = [("pool", tag), ("backend", "a")];
    let m = parse(&scrape(metrics).await);
    let state = |s: &str| {
        get(
            &m,
            "weir_backend_state",
            &[labels[0], labels[1], ("state", s)],
        )
    };
    assert_eq!(state("retiring"), 1.0);
    assert_eq!(state("draining"), 0.0);
    assert_eq!(get(&m, "weir_backend_up", &labels), 0.0);
}

/// A backend removed by a reload takes its series with it once its last connection has
/// closed and it is gone; a live backend keeps its series however idle.
#[tokio::test]
async fn a_removed_backend_takes_its_series_with_it_and_an_idle_one_keeps_them() {
    let _listening = LISTENING.read().await;
    let tag = "mt_forget";
    let dir = TempDir::new(tag);
    let live = TestBackend::start("live").await;
    let extra = TestBackend::start("extra").await;
    let (server, front, metrics, path) = start_file(
        &dir,
        tag,
        &tagged_yaml(tag, "127.0.0.1:0", &[("live", live.addr)]),
    )
    .await;
    echo_once(front, "live", 10).await;
    let bind = front.to_string();
    std::fs::write(
        &path,
        tagged_yaml(tag, &bind, &[("live", live.addr), ("extra", extra.addr)]),
    )
    .unwrap();
    server.handle.reload().await.expect("the reload adds extra");
    // Round robin: one of the next two connections goes to extra; keep it open.
    let mut on_extra = None;
    for _ in 0..2 {
        let (stream, name) = connect_named(front).await;
        if name == "extra" {
            on_extra = Some(stream);
        }
    }
    let mut on_extra = on_extra.expect("a connection on extra");
    on_extra.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    on_extra.read_exact(&mut back).await.unwrap();
    let removed = std::sync::Arc::downgrade(&server.backend(tag, "extra").unwrap());

    std::fs::write(&path, tagged_yaml(tag, &bind, &[("live", live.addr)])).unwrap();
    server
        .handle
        .reload()
        .await
        .expect("the reload removes extra");
    let extra_labels = [("pool", tag), ("backend", "extra")];
    let m = parse(&scrape(metrics).await);
    assert_eq!(
        get(&m, "weir_backend_connections_active", &extra_labels),
        1.0
    );

    drop(on_extra);
    wait_until(DEADLINE, "the removed backend to be dropped", || {
        let gone = removed.upgrade().is_none();
        async move { gone }
    })
    .await;
    let m = parse(&scrape(metrics).await);
    let left: Vec<&Sample> = m
        .iter()
        .filter(|s| {
            s.labels.get("pool").map(String::as_str) == Some(tag)
                && s.labels.get("backend").map(String::as_str) == Some("extra")
        })
        .collect();
    assert!(left.is_empty(), "series of the removed backend: {left:?}");
    let live_labels = [("pool", tag), ("backend", "live")];
    assert!(get(&m, "weir_backend_connections_total", &live_labels) >= 2.0);
    assert_eq!(get(&m, "weir_backend_up", &live_labels), 1.0);
    assert!(
        value(
            &m,
            "weir_backend_connect_duration_seconds_count",
            &live_labels
        )
        .is_some_and(|n| n >= 2.0),
        "the live backend's histograms stay"
    );
}

/// `weir_listener_max_connections` follows the config in force: a reload that changes a
/// limit changes it, one that removes the limit or the listener removes the series.
#[tokio::test]
async fn listener_max_connections_follows_reloads() {
    let _listening = LISTENING.read().await;
    let tag = "mt_limit";
    let dir = TempDir::new(tag);
    let a = TestBackend::start("a").await;
    let second = format!("{tag}_second");
    let text = |bind: &str, front_limit: &str, second_listener: Option<(SocketAddr, &str)>| {
        let mut listeners = format!("    pool: {tag}\n{front_limit}");
        if let Some((addr, limit)) = second_listener {
            listeners += &format!("  {second}:\n    bind: {addr}\n    pool: {tag}\n{limit}");
        }
        tagged_yaml(tag, bind, &[("a", a.addr)]).replacen(
            &format!("    pool: {tag}\n"),
            &listeners,
            1,
        )
    };
    let second_addr = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let (server, front, metrics, path) = start_file(
        &dir,
        tag,
        &text(
            "127.0.0.1:0",
            "    max_connections: 5\n",
            Some((second_addr, "    max_connections: 3\n")),
        ),
    )
    .await;
    let front_name = format!("{tag}_front");
    let limit = |m: &[Sample], listener: &str| {
        value(
            m,
            "weir_listener_max_connections",
            &[("listener", listener)],
        )
    };
    let m = parse(&scrape(metrics).await);
    assert_eq!(limit(&m, &front_name), Some(5.0));
    assert_eq!(limit(&m, &second), Some(3.0));

    let bind = front.to_string();
    let reload = |body: String| {
        std::fs::write(&path, body).unwrap();
        server.handle.reload()
    };
    reload(text(
        &bind,
        "    max_connections: 9\n",
        Some((second_addr, "    max_connections: 3\n")),
    ))
    .await
    .unwrap();
    let m = parse(&scrape(metrics).await);
    assert_eq!(limit(&m, &front_name), Some(9.0));

    // front's limit removed, second removed: neither has a series any more.
    reload(text(&bind, "", None)).await.unwrap();
    let m = parse(&scrape(metrics).await);
    assert_eq!(limit(&m, &front_name), None, "the limit was removed");
    assert_eq!(limit(&m, &second), None, "the listener was removed");
}
