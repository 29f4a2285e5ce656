//! Reload (admin `reload` and SIGHUP) and the admin state file, over real sockets.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir::backend::State;
use weir::server::Server;

/// A config file text: one tcp listener `front` on `bind` before pool `pool`.
fn yaml(bind: &str, strategy: &str, backends: &[(&str, SocketAddr, u32)], extra: &str) -> String {
    let mut text = format!(
        "{extra}listeners:\n  front:\n    bind: {bind}\n    pool: pool\npools:\n  pool:\n    strategy: {strategy}\n    backends:\n"
    );
    for (name, addr, weight) in backends {
        text +=
            &format!("      - address: {addr}\n        name: {name}\n        weight: {weight}\n");
    }
    text
}

async fn start_file(dir: &TempDir, text: &str) -> (Server, SocketAddr, std::path::PathBuf) {
    let path = dir.join("weir.yaml");
    std::fs::write(&path, text).unwrap();
    let config = weir::config::load(&path).expect("valid config");
    let server = Server::start(config, Some(path.clone()))
        .await
        .expect("weir starts");
    let front = server.listener_addr("front").unwrap();
    (server, front, path)
}

/// Sends `bytes` and reads the echo back: the connection still works end to end.
async fn echo(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).await.unwrap();
    let mut back = vec![0u8; bytes.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("connection intact");
    assert_eq!(back, bytes);
}

fn names(server: &Server) -> Vec<String> {
    let tables = server.handle.tables();
    let snapshot = tables.pools["pool"].load_full();
    snapshot.backends.iter().map(|b| b.name.clone()).collect()
}

#[tokio::test]
async fn reload_adds_removes_reweighs_and_keeps_open_connections() {
    let dir = TempDir::new("reload-diff");
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let c = TestBackend::start("c").await;
    let socket = dir.join("admin.sock");
    let admin_line = format!("admin:\n  socket: {}\n", socket.display());
    let (server, front, path) = start_file(
        &dir,
        &yaml(
            "127.0.0.1:0",
            "round-robin",
            &[("a", a.addr, 1), ("b", b.addr, 1)],
            &admin_line,
        ),
    )
    .await;

    // Open connections on both backends, bytes flowing.
    let (on_a, first) = connect_named(front).await;
    let (on_b, second) = connect_named(front).await;
    let mut seen = [first, second];
    seen.sort();
    assert_eq!(seen, ["a", "b"]);
    let (mut on_a, mut on_b) = if seen[0] == "a" {
        (on_a, on_b)
    } else {
        (on_b, on_a)
    };
    echo(&mut on_a, b"before reload").await;
    let backend_b = server.backend("pool", "b").unwrap();

    // The listener keeps its port: write the real one into the file.
    let bind = front.to_string();
    std::fs::write(
        &path,
        yaml(
            &bind,
            "least-connections",
            &[("a", a.addr, 5), ("c", c.addr, 1)],
            &admin_line,
        ),
    )
    .unwrap();
    let reply = admin(&socket, "reload").await;
    assert!(reply.starts_with("reloaded:"), "{reply}");
    assert!(
        reply.contains("1 backend added") && reply.contains("1 backend removed"),
        "{reply}"
    );

    // Same objects for what stayed; the new weight and strategy apply.
    let tables = server.handle.tables();
    let snapshot = tables.pools["pool"].load_full();
    assert_eq!(snapshot.strategy, weir::balance::Strategy::LeastConnections);
    assert_eq!(server.backend("pool", "a").unwrap().weight(), 5);
    assert!(std::sync::Arc::ptr_eq(
        &server.backend("pool", "b").unwrap(),
        &backend_b
    ));
    assert_eq!(
        backend_b.state(),
        State::Retiring,
        "removed but still carrying a connection: not an operator's drain"
    );
    let rows = admin(&socket, "show backends").await;
    let row = rows.lines().find(|l| l.contains(&b.addr.to_string()));
    assert!(row.is_some_and(|r| r.contains(" retiring ")), "{rows}");
    let json = admin(&socket, "show backends --json").await;
    let json: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let row = json.iter().find(|r| r["name"] == "b").expect("b shown");
    assert_eq!(row["state"], "retiring", "{row}");

    // An operator can't put the removed backend back into rotation by hand, and is told why.
    let refused = admin(&socket, "enable pool/b").await;
    assert!(
        refused.starts_with("error: pool/b is retiring") && refused.contains("removed by a reload"),
        "{refused}"
    );
    assert_eq!(backend_b.state(), State::Retiring);

    // Open connections are untouched, on the kept and on the removed backend.
    echo(&mut on_a, b"after reload").await;
    echo(&mut on_b, b"still on b").await;

    // New connections: the added backend gets traffic, the removed one none.
    let before_b = b.accepted();
    let mut held = Vec::new();
    let mut got_c = 0;
    for _ in 0..12 {
        let (stream, name) = connect_named(front).await;
        assert_ne!(name, "b");
        got_c += usize::from(name == "c");
        held.push(stream);
    }
    assert!(got_c > 0, "the added backend gets traffic");
    assert_eq!(b.accepted(), before_b);

    // Once its last connection closes, the removed backend is gone.
    drop(on_b);
    wait_until(DEADLINE, "b to disappear", || {
        let names = names(&server);
        async move { names == ["a", "c"] }
    })
    .await;
    let shown = admin(&socket, "show backends").await;
    assert!(
        !shown.contains("pool/b") && !shown.contains(" b "),
        "{shown}"
    );
    echo(&mut on_a, b"the end").await;
}

#[tokio::test]
async fn invalid_config_on_reload_changes_nothing_and_names_the_line() {
    let dir = TempDir::new("reload-invalid");
    let a = TestBackend::start("a").await;
    let socket = dir.join("admin.sock");
    let admin_line = format!("admin:\n  socket: {}\n", socket.display());
    let (server, front, path) = start_file(
        &dir,
        &yaml(
            "127.0.0.1:0",
            "round-robin",
            &[("a", a.addr, 1)],
            &admin_line,
        ),
    )
    .await;
    let (mut open, _) = connect_named(front).await;

    std::fs::write(
        &path,
        yaml(
            &front.to_string(),
            "fastest",
            &[("a", a.addr, 1)],
            &admin_line,
        ),
    )
    .unwrap();
    let reply = admin(&socket, "reload").await;
    let file = path.display().to_string();
    assert!(reply.starts_with("error: "), "{reply}");
    assert!(
        reply.contains(&format!("{file}:9:15: unknown strategy \"fastest\"")),
        "{reply}"
    );

    // weir serves on with the old config.
    assert_eq!(
        server.config().pools[0].strategy,
        weir::balance::Strategy::RoundRobin
    );
    echo(&mut open, b"still here").await;
    let (_next, name) = connect_named(front).await;
    assert_eq!(name, "a");

    // The ctl binary: exit 1 with the same message.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["ctl", "-s"])
        .arg(&socket)
        .arg("reload")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("unknown strategy"), "{stderr}");
}

#[tokio::test]
async fn listeners_added_and_removed_and_a_bind_conflict_rolls_back() {
    let dir = TempDir::new("reload-listeners");
    let a = TestBackend::start("a").await;
    let (server, front, path) = start_file(
        &dir,
        &yaml("127.0.0.1:0", "round-robin", &[("a", a.addr, 1)], ""),
    )
    .await;
    let (mut open, _) = connect_named(front).await;

    // A port that is taken: the reload fails and nothing changes.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let with_second = |second: SocketAddr| {
        yaml(&front.to_string(), "round-robin", &[("a", a.addr, 1)], "").replace(
            "pools:\n",
            &format!("  second:\n    bind: {second}\n    pool: pool\npools:\n"),
        )
    };
    std::fs::write(&path, with_second(taken_addr)).unwrap();
    let err = server.handle.reload().await.unwrap_err().to_string();
    assert!(
        err.contains("second") && err.contains(&taken_addr.to_string()),
        "{err}"
    );
    assert!(err.contains("nothing changed"), "{err}");
    assert!(server.listener_addr("second").is_none());
    echo(&mut open, b"unchanged").await;

    // A free port: the listener is added and serves.
    drop(taken);
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(&path, with_second(free)).unwrap();
    let reply = server.handle.reload().await.unwrap();
    assert!(reply.contains("1 listener added"), "{reply}");
    // The listener that stayed takes new settings without being rebound.
    let front_listener = server.handle.tables().listeners["front"].clone();
    std::fs::write(
        &path,
        with_second(free).replace(
            "    pool: pool\n  second:",
            "    pool: pool\n    max_connections: 7\n    idle_timeout: 5m\n    half_close_timeout: 2s\n  second:",
        ),
    )
    .unwrap();
    server.handle.reload().await.unwrap();
    assert_eq!(front_listener.max_connections(), Some(7));
    assert_eq!(
        front_listener.idle_timeout(),
        std::time::Duration::from_secs(300)
    );
    assert_eq!(
        front_listener.half_close_timeout(),
        std::time::Duration::from_secs(2)
    );
    assert!(std::sync::Arc::ptr_eq(
        &front_listener,
        &server.handle.tables().listeners["front"]
    ));
    let (_s, name) = connect_named(free).await;
    assert_eq!(name, "a");

    // Removed again: it stops accepting; the first listener's connection is untouched.
    std::fs::write(
        &path,
        yaml(&front.to_string(), "round-robin", &[("a", a.addr, 1)], ""),
    )
    .unwrap();
    let reply = server.handle.reload().await.unwrap();
    assert!(reply.contains("1 listener removed"), "{reply}");
    wait_until(
        DEADLINE,
        "the removed listener to stop accepting",
        || async move { TcpStream::connect(free).await.is_err() },
    )
    .await;
    echo(&mut open, b"first listener").await;
}

#[tokio::test]
async fn drained_stays_drained_across_reload_and_restart_with_the_state_file() {
    let dir = TempDir::new("reload-state");
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let state = dir.join("state.json");
    let socket = dir.join("admin.sock");
    let extra = format!(
        "admin:\n  socket: {}\n  state_file: {}\n",
        socket.display(),
        state.display()
    );
    let text = yaml(
        "127.0.0.1:0",
        "round-robin",
        &[("a", a.addr, 1), ("b", b.addr, 1)],
        &extra,
    );
    let (server, front, path) = start_file(&dir, &text).await;

    assert!(admin(&socket, "drain pool/a").await.contains("drained"));
    assert!(
        admin(&socket, "set weight pool/b 7")
            .await
            .contains("weight 7")
    );
    wait_until(DEADLINE, "the state file", || {
        let state = state.clone();
        async move {
            std::fs::read_to_string(&state).is_ok_and(|s| s.contains("drain") && s.contains("7"))
        }
    })
    .await;

    // Reload with the same file: drained stays drained.
    std::fs::write(&path, text.replace("127.0.0.1:0", &front.to_string())).unwrap();
    server.handle.reload().await.unwrap();
    assert_eq!(state_of(&server, "a"), State::Drained);
    for _ in 0..5 {
        let (_s, name) = connect_named(front).await;
        assert_eq!(name, "b");
    }

    // Restart: the state file brings both back. (On a fresh port: the one given up could be
    // taken meanwhile as the local port of some other test's outgoing connection.)
    server.stop().await;
    drop(server);
    std::fs::write(&path, &text).unwrap();
    let config = weir::config::load(&path).unwrap();
    let restarted = Server::start(config, Some(path.clone())).await.unwrap();
    assert_eq!(state_of(&restarted, "a"), State::Drained);
    assert_eq!(restarted.backend("pool", "b").unwrap().weight(), 7);

    // A state entry for a backend that no longer exists is ignored.
    restarted.stop().await;
    std::fs::write(
        &state,
        "{\"backends\":{\"pool/gone\":{\"admin\":\"drain\"}}}",
    )
    .unwrap();
    let config = weir::config::load(&path).unwrap();
    let again = Server::start(config, Some(path)).await.unwrap();
    assert_eq!(state_of(&again, "a"), State::Up);
}

fn state_of(server: &Server, backend: &str) -> State {
    server.backend("pool", backend).unwrap().state()
}

/// `metrics.bind` and `admin.socket` are bound once at start: a reload that changes them
/// says so in its reply, and both keep answering where they were.
#[tokio::test]
async fn reload_says_metrics_and_admin_socket_changes_wait_for_a_restart() {
    let dir = TempDir::new("reload-restart-notes");
    let a = TestBackend::start("a").await;
    let socket = dir.join("admin.sock");
    let moved_socket = dir.join("moved.sock");
    let settings = |admin: &std::path::Path, metrics: &str| {
        format!(
            "admin:\n  socket: {}\nmetrics:\n  bind: {metrics}\n",
            admin.display()
        )
    };
    let (server, front, path) = start_file(
        &dir,
        &yaml(
            "127.0.0.1:0",
            "round-robin",
            &[("a", a.addr, 1)],
            &settings(&socket, "127.0.0.1:0"),
        ),
    )
    .await;
    let metrics = server.metrics_addr().expect("metrics endpoint bound");
    let other_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    std::fs::write(
        &path,
        yaml(
            &front.to_string(),
            "round-robin",
            &[("a", a.addr, 1)],
            &settings(&moved_socket, &other_port.to_string()),
        ),
    )
    .unwrap();
    let reply = server.handle.reload().await.expect("the reload applies");
    assert!(
        reply.contains("metrics.bind changed: takes effect at the next restart"),
        "{reply}"
    );
    assert!(
        reply.contains("admin.socket changed: takes effect at the next restart"),
        "{reply}"
    );

    // Both still answer where they were; nothing listens at the new places.
    let rows = admin(&socket, "show backends").await;
    assert!(rows.contains(&a.addr.to_string()), "{rows}");
    assert!(!moved_socket.exists());
    let mut stream = TcpStream::connect(metrics)
        .await
        .expect("metrics still served");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    assert!(body.contains("weir_backend_up"), "{body}");
    assert!(TcpStream::connect(other_port).await.is_err());
    let (_s, name) = connect_named(front).await;
    assert_eq!(name, "a");
}

/// A backend that keeps its name but moves to another address: the old one drains until
/// its last connection closes and then goes; the new one serves from the reload on, and
/// stays when the old one goes.
#[tokio::test]
async fn a_backend_moved_to_another_address_under_the_same_name() {
    let dir = TempDir::new("reload-moved");
    let old = TestBackend::start("old").await;
    let new = TestBackend::start("new").await;
    let (server, front, path) = start_file(
        &dir,
        &yaml("127.0.0.1:0", "round-robin", &[("a", old.addr, 1)], ""),
    )
    .await;
    let (open, name) = connect_named(front).await;
    assert_eq!(name, "old");

    std::fs::write(
        &path,
        yaml(&front.to_string(), "round-robin", &[("a", new.addr, 1)], ""),
    )
    .unwrap();
    server.handle.reload().await.expect("the reload applies");
    for _ in 0..3 {
        let (_s, name) = connect_named(front).await;
        assert_eq!(name, "new", "new connections go to the new address");
    }

    // The old connection closes: the old backend leaves, the new one stays and serves.
    drop(open);
    let addrs = |server: &Server| -> Vec<SocketAddr> {
        let tables = server.handle.tables();
        let snapshot = tables.pools["pool"].load_full();
        snapshot.backends.iter().map(|b| b.addr).collect()
    };
    wait_until(DEADLINE, "the old backend to leave the pool", || {
        let left = addrs(&server);
        async move { left.len() == 1 }
    })
    .await;
    assert_eq!(addrs(&server), vec![new.addr]);
    assert_eq!(state_of(&server, "a"), State::Up);
    let (_s, name) = connect_named(front).await;
    assert_eq!(name, "new");
}

/// `yaml` with `check` (one line, indented for the pool) as the pool's health check.
fn with_check(text: String, check: &str) -> String {
    text.replacen(
        "    backends:\n",
        &format!("    health_check: {check}\n    backends:\n"),
        1,
    )
}

/// A port nothing listens on (yet).
fn unused_port() -> SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

/// A reload that adds a backend keeps the checker of the backend that stays, and with it
/// its rise progress: one that had 1 of rise=3 passes comes up on its third pass, not on a
/// fourth after a restarted checker counted from zero (and probed it again at once).
#[tokio::test]
async fn a_reload_that_adds_a_backend_keeps_the_other_checker_and_its_rise_progress() {
    let dir = TempDir::new("reload-checker-kept");
    let check = "{ interval: 300ms, timeout: 200ms, rise: 3, fall: 1 }";
    let a_addr = unused_port();
    let c = TestBackend::start("c").await;
    let (server, front, path) = start_file(
        &dir,
        &with_check(
            yaml("127.0.0.1:0", "round-robin", &[("a", a_addr, 1)], ""),
            check,
        ),
    )
    .await;
    assert_eq!(
        state_of(&server, "a"),
        State::Down,
        "its first probe failed"
    );

    // a starts listening: its next probe passes, 1 of 3.
    let a = TestBackend::restart("a", a_addr).await;
    wait_until(DEADLINE, "a's first passing probe", || {
        let n = a.accepted();
        async move { n >= 1 }
    })
    .await;
    std::fs::write(
        &path,
        with_check(
            yaml(
                &front.to_string(),
                "round-robin",
                &[("a", a_addr, 1), ("c", c.addr, 1)],
                "",
            ),
            check,
        ),
    )
    .unwrap();
    let reply = server.handle.reload().await.expect("the reload applies");
    assert!(reply.contains("1 backend added"), "{reply}");

    wait_for_state(&server, "pool", "a", State::Up, DEADLINE).await;
    assert_eq!(
        a.accepted(),
        3,
        "a came up on its third pass: the reload neither probed it again nor reset its count"
    );
}

/// A backend whose greeting comes `delay` after each connect (a probe expecting it takes
/// that long), then echoes.
async fn slow_greeter(name: &'static str, delay: std::time::Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if stream
                    .write_all(format!("{name}\n").as_bytes())
                    .await
                    .is_ok()
                {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    addr
}

/// A pool added by a reload is published once its first round of probes is done, as at
/// startup: its first client, right after the reload returns, is served.
#[tokio::test]
async fn a_pool_added_by_a_reload_serves_its_first_client_right_after_the_reload() {
    let dir = TempDir::new("reload-pool-added");
    let a = TestBackend::start("a").await;
    let (server, front, path) = start_file(
        &dir,
        &yaml("127.0.0.1:0", "round-robin", &[("a", a.addr, 1)], ""),
    )
    .await;
    // Its probe waits 150 ms for the greeting it expects.
    let slow = slow_greeter("slow", std::time::Duration::from_millis(150)).await;
    let second = unused_port();
    let text = yaml(&front.to_string(), "round-robin", &[("a", a.addr, 1)], "").replace(
        "pools:\n",
        &format!("  second:\n    bind: {second}\n    pool: added\npools:\n"),
    ) + &format!(
        "  added:\n    health_check: {{ interval: 5s, timeout: 2s, expect: \"slow\" }}\n    backends:\n      - address: {slow}\n        name: slow\n"
    );
    std::fs::write(&path, text).unwrap();
    let reply = server.handle.reload().await.expect("the reload applies");
    assert!(reply.contains("1 pool added"), "{reply}");
    assert_eq!(state_of_in(&server, "added", "slow"), State::Up);
    let (_client, name) = connect_named(second).await;
    assert_eq!(name, "slow");
}

fn state_of_in(server: &Server, pool: &str, backend: &str) -> State {
    server.backend(pool, backend).unwrap().state()
}

/// The reply says what changed compared with what runs: settings a reload applies in place
/// are listed, and `metrics.bind` put back to what is served is no change.
#[tokio::test]
async fn the_reload_reply_lists_exactly_what_changed() {
    let dir = TempDir::new("reload-reply");
    let a = TestBackend::start("a").await;
    let text = |bind: &str, metrics: &str, listener: &str, top: &str| {
        yaml(
            bind,
            "round-robin",
            &[("a", a.addr, 1)],
            &format!("{top}metrics:\n  bind: {metrics}\n"),
        )
        .replace("    pool: pool\n", &format!("    pool: pool\n{listener}"))
    };
    let (server, front, path) = start_file(&dir, &text("127.0.0.1:0", "127.0.0.1:0", "", "")).await;
    let metrics = server.metrics_addr().unwrap();
    let front = front.to_string();
    let reload = |body: String| {
        std::fs::write(&path, body).unwrap();
        server.handle.reload()
    };

    let same = reload(text(&front, "127.0.0.1:0", "", "")).await.unwrap();
    assert_eq!(same, "reloaded, nothing changed");
    let reply = reload(text(&front, "127.0.0.1:0", "    max_connections: 7\n", ""))
        .await
        .unwrap();
    assert_eq!(reply, "reloaded: 1 listener changed");
    let reply = reload(text(
        &front,
        "127.0.0.1:0",
        "    max_connections: 7\n    idle_timeout: 5m\n",
        "",
    ))
    .await
    .unwrap();
    assert_eq!(reply, "reloaded: 1 listener changed");
    let reply = reload(text(
        &front,
        "127.0.0.1:0",
        "    max_connections: 7\n    idle_timeout: 5m\n",
        "shutdown_timeout: 3s\n",
    ))
    .await
    .unwrap();
    assert_eq!(reply, "reloaded: shutdown_timeout changed");
    assert_eq!(
        server.config().shutdown_timeout,
        std::time::Duration::from_secs(3)
    );

    // metrics.bind: another port takes a restart; back to the running one is no change,
    // whether as configured (port 0) or as bound.
    let other = unused_port().to_string();
    let reply = reload(text(&front, &other, "", "")).await.unwrap();
    assert!(
        reply.contains("1 listener changed")
            && reply.contains("shutdown_timeout changed")
            && reply.contains(&format!(
                "metrics.bind changed: takes effect at the next restart (metrics are served on {metrics} until then)"
            )),
        "{reply}"
    );
    let back = reload(text(&front, "127.0.0.1:0", "", "")).await.unwrap();
    assert_eq!(back, "reloaded, nothing changed");
    let bound = reload(text(&front, &metrics.to_string(), "", ""))
        .await
        .unwrap();
    assert_eq!(bound, "reloaded, nothing changed");
}

/// One rule for an operator's `set weight`, at a reload and at a restart: it holds until
/// the file's weight for that backend changes.
#[tokio::test]
async fn an_operators_weight_holds_until_the_files_changes_at_reload_and_restart() {
    let dir = TempDir::new("reload-weights");
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let state = dir.join("state.json");
    let socket = dir.join("admin.sock");
    let extra = format!(
        "admin:\n  socket: {}\n  state_file: {}\n",
        socket.display(),
        state.display()
    );
    let text = |bind: &str, weight: u32| {
        yaml(
            bind,
            "round-robin",
            &[("a", a.addr, 1), ("b", b.addr, weight)],
            &extra,
        )
    };
    let weight = |server: &Server| server.backend("pool", "b").unwrap().weight();
    let restart = |server: Server, body: String| {
        let path = dir.join("weir.yaml");
        async move {
            server.stop().await;
            drop(server);
            std::fs::write(&path, body).unwrap();
            let config = weir::config::load(&path).unwrap();
            Server::start(config, Some(path)).await.unwrap()
        }
    };

    // Reload: the same file keeps the operator's 5; an edited one (1 -> 3) wins.
    let (server, front, path) = start_file(&dir, &text("127.0.0.1:0", 1)).await;
    let front = front.to_string();
    assert!(
        admin(&socket, "set weight pool/b 5")
            .await
            .contains("weight 5")
    );
    std::fs::write(&path, text(&front, 1)).unwrap();
    server.handle.reload().await.unwrap();
    assert_eq!(weight(&server), 5, "reload, file unchanged");
    std::fs::write(&path, text(&front, 3)).unwrap();
    server.handle.reload().await.unwrap();
    assert_eq!(weight(&server), 3, "reload, file edited");

    // Restart: the same file keeps the operator's 5; an edited one (3 -> 4) wins.
    assert!(
        admin(&socket, "set weight pool/b 5")
            .await
            .contains("weight 5")
    );
    let server = restart(server, text("127.0.0.1:0", 3)).await;
    assert_eq!(weight(&server), 5, "restart, file unchanged");
    let server = restart(server, text("127.0.0.1:0", 4)).await;
    assert_eq!(weight(&server), 4, "restart, file edited");
    // And the override is gone for good: not even the old file value brings it back.
    let server = restart(server, text("127.0.0.1:0", 3)).await;
    assert_eq!(weight(&server), 3, "a dropped override stays dropped");
}
