//! The status page on `metrics.bind`: `GET /` in a real browser (headless Chromium:
//! the rendered DOM, and a screenshot kept under target/), `GET /status.json`, and the
//! endpoint's bounds (a silent client, idle clients holding every slot; the head-size
//! bound is in tests/metrics.rs).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use weir::backend::State;
use weir::balance::Strategy;
use weir::server::Server;

/// weir with pool `pool`: backend `healthy` (a real one) and `gone` (nobody listens),
/// health-checked, and the metrics endpoint on.
async fn start() -> (Server, SocketAddr, TestBackend) {
    let backend = TestBackend::start("healthy").await;
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone_addr = gone.local_addr().unwrap();
    drop(gone);
    let mut config = tcp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("healthy", backend.addr, 3),
            backend_config("gone", gone_addr, 1),
        ],
    );
    let fast = Duration::from_millis(100);
    config.pools[0].health_check = Some(health_check(fast, fast, 1, 1));
    config.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    let server = Server::start(config, None).await.expect("weir starts");
    wait_for_state(&server, "pool", "gone", State::Down, DEADLINE).await;
    wait_for_state(&server, "pool", "healthy", State::Up, DEADLINE).await;
    let metrics = server.metrics_addr().unwrap();
    (server, metrics, backend)
}

async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut reply))
        .await
        .expect("answered in time")
        .unwrap();
    let reply = String::from_utf8(reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_has_every_listener_pool_and_backend() {
    let (server, metrics, _backend) = start().await;
    let (_c, _) = connect_named(server.listener_addr("front").unwrap()).await;
    let (head, body) = get(metrics, "/status.json").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["process"]["pid"], std::process::id());
    assert_eq!(status["listeners"][0]["name"], "front");
    assert_eq!(status["listeners"][0]["active"], 1);
    let backends = status["pools"][0]["backends"].as_array().unwrap();
    let by = |name: &str| backends.iter().find(|b| b["name"] == name).unwrap().clone();
    assert_eq!(by("healthy")["state"], "up");
    assert_eq!(by("healthy")["weight"], 3);
    assert_eq!(by("healthy")["effective_weight"], 3);
    assert_eq!(by("healthy")["active"], 1);
    assert_eq!(by("gone")["state"], "down");
    assert!(
        by("gone")["last_check"]
            .as_str()
            .unwrap()
            .starts_with("fail"),
        "{}",
        by("gone")
    );
    let age = by("healthy")["last_check_age_ms"].as_u64().unwrap();
    assert!(age < 2_000, "checked every 100 ms: {age} ms ago");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_in_chromium_with_both_backends_and_their_states() {
    if !require_program("chromium") {
        return;
    }
    let (_server, metrics, _backend) = start().await;
    let (head, html) = get(metrics, "/").await;
    assert!(
        head.to_lowercase().contains("content-type: text/html"),
        "{head}"
    );
    assert!(!html.contains("<script"), "no script on the page");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing fetched from elsewhere"
    );

    let profile = TempDir::new("chromium");
    let chromium = |extra: &[String]| {
        let mut command = std::process::Command::new("chromium");
        command.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,700",
        ]);
        command.arg(format!("--user-data-dir={}", profile.path.display()));
        command.args(extra);
        command.arg(format!("http://{metrics}/"));
        command.output().expect("chromium runs")
    };
    let dom = chromium(&["--dump-dom".to_string()]);
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8_lossy(&dom.stdout);
    // Rendered rows: a backend's name cell and its state cell with the state's class.
    assert!(dom.contains("<td>healthy</td>"), "{dom}");
    assert!(dom.contains("<td class=\"state up\">up</td>"), "{dom}");
    assert!(dom.contains("<td>gone</td>"), "{dom}");
    assert!(dom.contains("<td class=\"state down\">down</td>"), "{dom}");
    assert!(dom.contains("<title>weir status</title>"));

    let shot = concat!(env!("CARGO_MANIFEST_DIR"), "/target/status-page.png");
    let _ = std::fs::remove_file(shot);
    let out = chromium(&[format!("--screenshot={shot}")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(shot).expect("the screenshot is written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real picture: {} bytes",
        png.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_bounds_silent_and_idle_clients() {
    let (_server, metrics, _backend) = start().await;

    // A client that sends nothing is closed after the 5 s head timeout.
    let mut silent = TcpStream::connect(metrics).await.unwrap();
    let opened = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(DEADLINE, silent.read(&mut buf)).await;
    let after = opened.elapsed();
    let said = match read {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("never closed"),
    };
    assert!(
        said.is_empty() || said.starts_with("HTTP/1.1 408"),
        "closed, or told 408: {said:?}"
    );
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(8)).contains(&after),
        "closed after {after:?}"
    );

    // 60 idle connections (the endpoint serves 32 at once): a scrape is still answered,
    // at once, by taking the slot of the oldest idle one.
    let mut idle = Vec::new();
    for _ in 0..60 {
        idle.push(TcpStream::connect(metrics).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        let asked = Instant::now();
        let (head, body) = get(metrics, "/metrics").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(body.contains("weir_backend_up"));
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
    }
    drop(idle);
    // A head over 8 KiB gets 431: tests/metrics.rs (`other_paths_are_404_and_other_methods_405`).
}
