//! Backends from DNS (`discover`) against a real DNS server: unbound on a free loopback
//! port, its local data changed at run time with `unbound-control`. Backends listen on
//! 127.0.0.2, 127.0.0.3, … on one port, so that each A record is one backend. Needs
//! `unbound` and `unbound-control` (skipped without them, unless WEIR_REQUIRE_EXTERNAL=1).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::unbound::Unbound;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir::backend::State;
use weir::server::Server;

fn have_tools() -> bool {
    require_program("unbound") && require_program("unbound-control")
}

/// Test backends on 127.0.0.N:PORT for each N of `hosts`, one port for all.
async fn backends_on(hosts: &[u8]) -> (u16, Vec<TestBackend>) {
    'again: for _ in 0..20 {
        let first = TestBackend::restart(
            &format!("b{}", hosts[0]),
            SocketAddr::from(([127, 0, 0, hosts[0]], 0)),
        )
        .await;
        let port = first.addr.port();
        let mut all = vec![first];
        for &h in &hosts[1..] {
            let addr = SocketAddr::from(([127, 0, 0, h], port));
            if std::net::TcpListener::bind(addr).is_err() {
                continue 'again;
            }
            all.push(TestBackend::restart(&format!("b{h}"), addr).await);
        }
        return (port, all);
    }
    panic!("no port free on every backend address");
}

/// A config: listener `front` on a free port, pool `web` with `discover` (`discover` is
/// its YAML body), the admin socket in `dir`, metrics on a free port.
fn config(dns: &Unbound, discover: &str, dir: &TempDir, extra: &str) -> weir::config::Config {
    write_config(dns, dir, &format!("{extra}    discover: {discover}\n"))
}

/// Writes (and loads) a config whose pool `web` has `pool_body` (its YAML lines).
fn write_config(dns: &Unbound, dir: &TempDir, pool_body: &str) -> weir::config::Config {
    let text = format!(
        "resolvers: [\"{dns}\"]\nmetrics:\n  bind: 127.0.0.1:0\nadmin:\n  socket: {socket}\n  state_file: {state}\nlisteners:\n  front:\n    bind: 127.0.0.1:0\n    pool: web\npools:\n  web:\n{pool_body}",
        dns = dns.addr(),
        socket = dir.join("admin.sock").display(),
        state = dir.join("state.json").display(),
    );
    let path = dir.join("weir.yaml");
    std::fs::write(&path, &text).unwrap();
    weir::config::load(&path).unwrap()
}

/// Starts weir on `config` with its file (so that it can reload).
async fn start(config: weir::config::Config, dir: &TempDir) -> (Server, SocketAddr) {
    let server = Server::start(config, Some(dir.join("weir.yaml")))
        .await
        .unwrap();
    let front = server.listener_addr("front").unwrap();
    (server, front)
}

fn names(server: &Server) -> Vec<(String, State)> {
    let tables = server.handle.tables();
    let snapshot = tables.pools["web"].load_full();
    let mut names: Vec<_> = (snapshot.backends.iter())
        .map(|b| (b.name.clone(), b.state()))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    names
}

async fn wait_for_names(server: &Server, wanted: &[(String, State)], what: &str) {
    let mut wanted = wanted.to_vec();
    wanted.sort_by(|a, b| a.0.cmp(&b.0));
    wait_until(DEADLINE, what, || {
        let now = names(server);
        let ok = now == wanted;
        async move { ok }
    })
    .await;
}

fn up(names: &[String]) -> Vec<(String, State)> {
    names.iter().map(|n| (n.clone(), State::Up)).collect()
}

/// Connects through weir and returns the stream and the backend's greeting.
async fn through(front: SocketAddr) -> (TcpStream, String) {
    connect_named(front).await
}

async fn echo(stream: &mut TcpStream, text: &str) {
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; text.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(String::from_utf8(buf).unwrap(), text);
}

async fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut body))
        .await
        .expect("metrics in time")
        .unwrap();
    body
}

fn discovery_errors(metrics: &str) -> u64 {
    (metrics.lines())
        .find(|l| l.starts_with("weir_discovery_errors_total{pool=\"web\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Stops the DNS server and waits for a failed lookup to be counted (from the count now:
/// the counter is the process's, shared by the tests of this file).
async fn stop_dns_until_a_failure_is_counted(dns: &mut Unbound, server: &Server) {
    let metrics = server.metrics_addr().unwrap();
    let before = discovery_errors(&scrape(metrics).await);
    dns.kill();
    wait_until(
        Duration::from_secs(20),
        "a failed lookup to be counted",
        || async move { discovery_errors(&scrape(metrics).await) > before },
    )
    .await;
}

#[tokio::test]
async fn addresses_added_and_removed_follow_dns_and_open_connections_continue() {
    if !have_tools() {
        return;
    }
    let (port, _backends) = backends_on(&[2, 3, 4]).await;
    let dns = Unbound::start("disc.test.", &["web.disc.test. 1 IN A 127.0.0.2"]).await;
    let dir = TempDir::new("discover-a");
    let discover = format!("{{ dns: web.disc.test, port: {port}, refresh: 1s }}");
    let (server, front) = start(config(&dns, &discover, &dir, ""), &dir).await;
    let (b2, b3, b4) = (
        format!("127.0.0.2:{port}"),
        format!("127.0.0.3:{port}"),
        format!("127.0.0.4:{port}"),
    );
    // Found by the first lookup at start, before any client.
    assert_eq!(names(&server), up(std::slice::from_ref(&b2)));
    let (mut open, greeting) = through(front).await;
    assert_eq!(greeting, "b2");

    dns.add("web.disc.test. 1 IN A 127.0.0.3").await;
    wait_for_names(
        &server,
        &up(&[b2.clone(), b3.clone()]),
        "127.0.0.3 to be discovered",
    )
    .await;
    let shown = admin(&dir.join("admin.sock"), "show backends").await;
    assert!(
        shown.contains(&b2) && shown.contains(&b3),
        "show backends lists discovered ones:\n{shown}"
    );

    // 127.0.0.2 leaves DNS: it retires, its open connection goes on, new ones go to .3.
    dns.set("web.disc.test.", &["web.disc.test. 1 IN A 127.0.0.3"])
        .await;
    wait_for_names(
        &server,
        &[(b2.clone(), State::Retiring), (b3.clone(), State::Up)],
        "127.0.0.2 to retire",
    )
    .await;
    echo(&mut open, "still here\n").await;
    for _ in 0..4 {
        assert_eq!(through(front).await.1, "b3");
    }
    drop(open);
    wait_for_names(
        &server,
        &up(std::slice::from_ref(&b3)),
        "127.0.0.2 to go once idle",
    )
    .await;

    // A drained discovered backend stays drained across re-resolutions.
    let reply = admin(&dir.join("admin.sock"), &format!("drain web/{b3}")).await;
    assert!(
        reply.starts_with("ok") || reply.contains("drain"),
        "{reply}"
    );
    dns.add("web.disc.test. 1 IN A 127.0.0.4").await;
    wait_for_names(
        &server,
        &[(b3.clone(), State::Drained), (b4.clone(), State::Up)],
        "127.0.0.4 to be discovered, .3 still drained",
    )
    .await;
    let state = std::fs::read_to_string(dir.join("state.json")).unwrap();
    assert!(state.contains(&format!("web/{b3}")), "drain saved: {state}");
    server.stop().await;
    drop(server);

    // And across a restart (the state file, keyed by name).
    let (again, _) = start(config(&dns, &discover, &dir, ""), &dir).await;
    assert_eq!(
        names(&again),
        vec![(b3.clone(), State::Drained), (b4.clone(), State::Up)]
    );
    again.stop().await;
}

#[tokio::test]
async fn srv_targets_and_ports_changed_and_weights_scaled() {
    if !have_tools() {
        return;
    }
    let (port, _backends) = backends_on(&[2, 3]).await;
    let (_, _other) = backends_on(&[5]).await;
    let dns = Unbound::start(
        "disc.test.",
        &[
            "db1.disc.test. 1 IN A 127.0.0.2",
            "db2.disc.test. 1 IN A 127.0.0.3",
            &format!("_pg._tcp.disc.test. 1 IN SRV 0 65535 {port} db1.disc.test."),
        ],
    )
    .await;
    let dir = TempDir::new("discover-srv");
    let discover = "{ dns: _pg._tcp.disc.test, refresh: 1s }";
    let (server, front) = start(config(&dns, discover, &dir, ""), &dir).await;
    let db1 = format!("db1.disc.test:{port}");
    assert_eq!(names(&server), up(std::slice::from_ref(&db1)));
    assert_eq!(
        server.backend("web", &db1).unwrap().weight(),
        1000,
        "65535 scaled to 1000"
    );

    // A second target, and the first one's weight changed.
    dns.set(
        "_pg._tcp.disc.test.",
        &[
            &format!("_pg._tcp.disc.test. 1 IN SRV 0 100 {port} db1.disc.test."),
            &format!("_pg._tcp.disc.test. 1 IN SRV 0 300 {port} db2.disc.test."),
        ],
    )
    .await;
    let db2 = format!("db2.disc.test:{port}");
    wait_for_names(
        &server,
        &up(&[db1.clone(), db2.clone()]),
        "db2 to be discovered",
    )
    .await;
    let db1_backend = server.backend("web", &db1).unwrap();
    wait_until(DEADLINE, "db1's DNS weight applied", || {
        let w = db1_backend.weight();
        async move { w == 100 }
    })
    .await;
    assert_eq!(server.backend("web", &db2).unwrap().weight(), 300);

    // db2's port changes: another backend (TARGET:PORT), the old one goes.
    let other_port = _other[0].addr.port();
    dns.set(
        "_pg._tcp.disc.test.",
        &[
            &format!("_pg._tcp.disc.test. 1 IN SRV 0 100 {port} db1.disc.test."),
            &format!("_pg._tcp.disc.test. 1 IN SRV 0 300 {other_port} db2.disc.test."),
        ],
    )
    .await;
    let db2_moved = format!("db2.disc.test:{other_port}");
    wait_for_names(
        &server,
        &up(&[db1.clone(), db2_moved.clone()]),
        "db2's new port",
    )
    .await;
    // db1's address changes (the target's A record): the same name, a new address; the
    // old one finishes its connection, the new one takes new ones, enabled.
    let mut open = None;
    for _ in 0..20 {
        let (stream, greeting) = connect_named(front).await;
        if greeting == "b2" {
            open = Some(stream);
            break;
        }
    }
    let mut open = open.expect("a connection to db1 (127.0.0.2)");
    dns.set("db1.disc.test.", &["db1.disc.test. 1 IN A 127.0.0.3"])
        .await;
    let want: SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
    wait_until(DEADLINE, "db1 to follow its A record", || {
        let tables = server.handle.tables();
        let moved = (tables.pools["web"].load_full().backends.iter())
            .any(|b| b.name == db1 && b.addr == want && b.state() == State::Up);
        async move { moved }
    })
    .await;
    assert_eq!(db1_backend.state(), State::Retiring);
    echo(&mut open, "old address\n").await;
    let state = std::fs::read_to_string(dir.join("state.json")).unwrap_or_default();
    assert!(
        !state.contains("db1"),
        "the old address is not saved as a drain: {state}"
    );
    drop(open);
    // The old address retires once its connection is gone (the control task looks every
    // 500 ms); until then it is in the snapshot too.
    wait_for_names(
        &server,
        &up(&[db1.clone(), db2_moved.clone()]),
        "the old address retired",
    )
    .await;
    // A reload keeps discovered backends (the file does not list them).
    let before = server.backend("web", &db1).unwrap();
    let summary = server.handle.reload().await.unwrap();
    assert_eq!(
        names(&server),
        up(&[db1.clone(), db2_moved.clone()]),
        "{summary}"
    );
    assert!(
        Arc::ptr_eq(&before, &server.backend("web", &db1).unwrap()),
        "the same backend"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_stopped_server_keeps_the_last_set_counts_errors_and_a_short_ttl_wins() {
    if !have_tools() {
        return;
    }
    let (port, _backends) = backends_on(&[2, 3]).await;
    let mut dns = Unbound::start("disc.test.", &["web.disc.test. 2 IN A 127.0.0.2"]).await;
    let dir = TempDir::new("discover-ttl");
    // refresh is an hour: only the 2 s TTL can make weir ask again this soon.
    let discover = format!("{{ dns: web.disc.test, port: {port}, refresh: 1h }}");
    let (server, front) = start(config(&dns, &discover, &dir, ""), &dir).await;
    let (b2, b3) = (format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}"));
    assert_eq!(names(&server), up(std::slice::from_ref(&b2)));
    let started = tokio::time::Instant::now();
    dns.add("web.disc.test. 2 IN A 127.0.0.3").await;
    wait_for_names(
        &server,
        &up(&[b2.clone(), b3.clone()]),
        "the TTL to bring a re-resolution",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    stop_dns_until_a_failure_is_counted(&mut dns, &server).await;
    // The last good set stays and serves.
    assert_eq!(names(&server), up(&[b2.clone(), b3.clone()]));
    let (stream, greeting) = through(front).await;
    assert!(greeting == "b2" || greeting == "b3", "{greeting}");
    drop(stream); // else the stop waits its shutdown_timeout for it
    server.stop().await;
}

// ----- the config keys (no DNS server needed) ----------------------------------------

fn parse_problems(text: &str) -> Vec<String> {
    match weir::config::parse(text, "weir.yaml") {
        Ok(_) => panic!("expected problems in:\n{text}"),
        Err(e) => e.0.iter().map(|d| d.to_string()).collect(),
    }
}

const HEAD: &str = "listeners:\n  l:\n    bind: 127.0.0.1:7000\n    pool: p\npools:\n  p:\n";

#[test]
fn a_pool_with_discover_needs_no_listed_backend_and_gets_the_defaults() {
    let text = format!(
        "resolvers: [\"127.0.0.1:5353\", \"[::1]:53\"]\n{HEAD}    discover:\n      dns: web.example\n      port: 8080\n"
    );
    let config = weir::config::parse(&text, "weir.yaml").unwrap();
    assert_eq!(
        config.resolvers,
        vec![addr("127.0.0.1:5353"), addr("[::1]:53")]
    );
    let discover = config.pools[0].discover.clone().unwrap();
    assert_eq!(
        (discover.dns.as_str(), discover.port, discover.refresh),
        ("web.example", Some(8080), Duration::from_secs(30))
    );
    assert!(config.pools[0].backends.is_empty());
    let srv = format!(
        "{HEAD}    discover: {{ dns: _pg._tcp.db.example, refresh: 5s }}\n    backends: []\n"
    );
    let config = weir::config::parse(&srv, "weir.yaml").unwrap();
    assert!(config.pools[0].discover.as_ref().unwrap().is_srv());
    assert!(config.resolvers.is_empty(), "the system's nameservers");
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn discover_problems_are_positioned_and_say_what_to_do() {
    let cases = [
        (
            "    discover: { dns: web.example }\n",
            "weir.yaml:7:15: ",
            "add port: PORT",
        ),
        (
            "    discover: { dns: _x._tcp.example, port: 80 }\n",
            "weir.yaml:7:45: ",
            "remove port",
        ),
        (
            "    discover: { dns: \"\", port: 80 }\n",
            "weir.yaml:7:22: ",
            "dns is empty",
        ),
        (
            "    discover: { dns: a.example, port: 80, refresh: 500ms }\n",
            "weir.yaml:7:52: ",
            "refresh \"500ms\" is too short",
        ),
        (
            "    discover: { dns: a.example, port: 0 }\n",
            "weir.yaml:7:39: ",
            "port 0 is out of range",
        ),
        (
            "    discover: { dns: a.example, prot: 80 }\n",
            "weir.yaml:7:33: ",
            "did you mean \"port\"",
        ),
    ];
    for (body, at, needle) in cases {
        let problems = parse_problems(&format!("{HEAD}{body}"));
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(at) && p.contains(needle)),
            "{body}: no problem at {at} saying {needle:?}: {problems:#?}"
        );
        assert_eq!(problems.len(), 1, "one problem each: {problems:#?}");
    }
    let problems = parse_problems(&format!(
        "resolvers: [dns.example:53]\n{HEAD}    discover: {{ dns: a.example, port: 80 }}\n"
    ));
    assert!(
        problems[0].starts_with("weir.yaml:1:13: ") && problems[0].contains("expected IP:PORT"),
        "{problems:?}"
    );
    // Without discover, a pool still needs backends.
    let problems = parse_problems(&format!("{HEAD}    backends: []\n"));
    assert!(problems[0].contains("has no backends"), "{problems:?}");
}

#[tokio::test]
async fn a_reload_that_removes_discover_retires_its_backends_and_one_that_adds_it_back_finds_them()
{
    if !have_tools() {
        return;
    }
    let (port, _backends) = backends_on(&[2, 3]).await;
    let listed = TestBackend::start("listed").await;
    let dns = Unbound::start("disc.test.", &["web.disc.test. 1 IN A 127.0.0.2"]).await;
    let dir = TempDir::new("discover-reload");
    let discover = format!("{{ dns: web.disc.test, port: {port}, refresh: 1s }}");
    let extra = format!(
        "    backends:\n      - {{ address: \"{}\", name: listed }}\n",
        listed.addr
    );
    let with = config(&dns, &discover, &dir, &extra);
    let text = std::fs::read_to_string(dir.join("weir.yaml")).unwrap();
    let (server, _front) = start(with, &dir).await;
    let b2 = format!("127.0.0.2:{port}");
    assert_eq!(names(&server), up(&[b2.clone(), "listed".to_string()]));

    let without: String = text
        .lines()
        .filter(|l| !l.contains("discover:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join("weir.yaml"), &without).unwrap();
    server.handle.reload().await.unwrap();
    assert_eq!(
        names(&server),
        up(&["listed".to_string()]),
        "idle: gone at once"
    );
    // With discover gone, a DNS change does nothing.
    dns.add("web.disc.test. 1 IN A 127.0.0.3").await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // two refreshes: nothing may come
    assert_eq!(names(&server), up(&["listed".to_string()]));

    std::fs::write(dir.join("weir.yaml"), &text).unwrap();
    server.handle.reload().await.unwrap();
    let b3 = format!("127.0.0.3:{port}");
    wait_for_names(
        &server,
        &up(&[b2, b3, "listed".to_string()]),
        "discover back after the reload",
    )
    .await;
    server.stop().await;
}

// ----- listed backends named by a host name ------------------------------------------

/// The backend of pool `web` named `name` that is not retiring.
fn serving(server: &Server, name: &str) -> Arc<weir::backend::Backend> {
    let tables = server.handle.tables();
    let snapshot = tables.pools["web"].load_full();
    (snapshot.backends.iter())
        .find(|b| b.name == name && b.state() != State::Retiring)
        .cloned()
        .unwrap_or_else(|| panic!("no backend {name}"))
}

async fn wait_for_address(server: &Server, name: &str, addr: SocketAddr, state: State) {
    let what = format!("{name} at {addr}, {state:?}");
    wait_until(DEADLINE, &what, || {
        let b = serving(server, name);
        let ok = b.addr == addr && b.state() == state;
        async move { ok }
    })
    .await;
}

/// `resolved` of backend `name` in `show backends --json` and in /status.json.
async fn resolved_of(
    server: &Server,
    socket: &std::path::Path,
    name: &str,
) -> [serde_json::Value; 2] {
    let shown = admin(socket, "show backends --json").await;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&shown).unwrap();
    let row = rows.iter().find(|r| r["name"] == name).unwrap();
    let mut stream = TcpStream::connect(server.metrics_addr().unwrap())
        .await
        .unwrap();
    stream
        .write_all(b"GET /status.json HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    let body = reply.split_once("\r\n\r\n").unwrap().1;
    let status: serde_json::Value = serde_json::from_str(body).unwrap();
    let pools = status["pools"].as_array().unwrap();
    let backends = pools.iter().flat_map(|p| p["backends"].as_array().unwrap());
    let page = backends.into_iter().find(|b| b["name"] == name).unwrap();
    assert_eq!(page["address"], row["address"], "both as written");
    [row["resolved"].clone(), page["resolved"].clone()]
}

#[tokio::test]
async fn a_listed_host_name_follows_dns_its_old_connections_continue_and_its_admin_state_is_kept() {
    if !have_tools() {
        return;
    }
    let (port, _backends) = backends_on(&[2, 3]).await;
    let dns = Unbound::start("disc.test.", &["db.disc.test. 1 IN A 127.0.0.2"]).await;
    let dir = TempDir::new("host-name-moves");
    let body = format!(
        "    backends:\n      - {{ address: \"db.disc.test:{port}\", name: db, weight: 3 }}\n"
    );
    let (server, front) = start(write_config(&dns, &dir, &body), &dir).await;
    let socket = dir.join("admin.sock");
    let (a2, a3) = (
        addr(&format!("127.0.0.2:{port}")),
        addr(&format!("127.0.0.3:{port}")),
    );
    let first = serving(&server, "db");
    assert_eq!(
        (first.addr, first.state()),
        (a2, State::Up),
        "resolved at start"
    );
    let (mut open, greeting) = through(front).await;
    assert_eq!(greeting, "b2");
    let reply = admin(&socket, "set weight web/db 7").await;
    assert!(!reply.starts_with("error"), "{reply}");

    // The record changes: a successor at the new address, the old one retiring with
    // its connection, which still works; the operator's weight carries over.
    dns.set("db.disc.test.", &["db.disc.test. 1 IN A 127.0.0.3"])
        .await;
    wait_for_address(&server, "db", a3, State::Up).await;
    assert_eq!(
        serving(&server, "db").weight(),
        7,
        "the operator's weight is kept"
    );
    assert_eq!(first.state(), State::Retiring);
    echo(&mut open, "old address still answers\n").await;
    for _ in 0..3 {
        assert_eq!(
            through(front).await.1,
            "b3",
            "new connections go to the new address"
        );
    }
    let shown = admin(&socket, "show backends").await;
    let row = format!("db.disc.test:{port} (127.0.0.3)");
    assert!(
        shown.contains(&row),
        "show backends has the new address:\n{shown}"
    );
    drop(open);
    wait_until(DEADLINE, "the old address to go once idle", || {
        let count = names(&server).len();
        async move { count == 1 }
    })
    .await;

    // A drain holds across a move, and a reload keeps the same backend wherever its
    // name resolves now.
    let reply = admin(&socket, "drain web/db").await;
    assert!(!reply.starts_with("error"), "{reply}");
    dns.set("db.disc.test.", &["db.disc.test. 1 IN A 127.0.0.2"])
        .await;
    wait_for_address(&server, "db", a2, State::Drained).await;
    let before = serving(&server, "db");
    let reply = admin(&socket, "reload").await;
    assert!(!reply.starts_with("error"), "{reply}");
    assert!(
        Arc::ptr_eq(&before, &serving(&server, "db")),
        "a reload keeps it"
    );
    let state = std::fs::read_to_string(dir.join("state.json")).unwrap();
    assert!(state.contains("web/db"), "drain saved by name: {state}");
    server.stop().await;
}

#[tokio::test]
async fn a_host_name_that_does_not_resolve_at_start_is_a_warning_and_a_backend_down_until_it_does()
{
    if !have_tools() {
        return;
    }
    let (port, _backends) = backends_on(&[2, 3]).await;
    let mut dns = Unbound::start("disc.test.", &["other.disc.test. 1 IN A 127.0.0.9"]).await;
    let dir = TempDir::new("host-name-late");
    let body = format!(
        "    health_check: {{ interval: 200ms, timeout: 200ms, rise: 1, fall: 1 }}\n    backends:\n      - {{ address: \"127.0.0.3:{port}\", name: ip }}\n      - {{ address: \"late.disc.test:{port}\", name: late }}\n"
    );
    let config = write_config(&dns, &dir, &body);

    // weir check: exit 0, the name and where it is written in a warning.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["check", "-c"])
        .arg(dir.join("weir.yaml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(":16:20: warning: backend \"late\"")
            && stderr.contains("host \"late.disc.test\" does not resolve (NXDOMAIN: no such name"),
        "a warning names it at its line:\n{stderr}"
    );

    // weir starts anyway, serving the other backend; the unresolved one is down and
    // says why.
    let (server, front) = start(config, &dir).await;
    let late = serving(&server, "late");
    assert_eq!(late.state(), State::Down);
    assert!(
        late.last_check()
            .contains("late.disc.test does not resolve"),
        "{}",
        late.last_check()
    );
    for _ in 0..3 {
        assert_eq!(through(front).await.1, "b3");
    }
    // What the operator sees: `show backends`, its JSON, and /status.json.
    let socket = dir.join("admin.sock");
    let row = format!("late.disc.test:{port} (unresolved)");
    let shown = admin(&socket, "show backends").await;
    assert!(shown.contains(&row), "{shown}");
    assert_eq!(
        resolved_of(&server, &socket, "late").await,
        [serde_json::Value::Null, serde_json::Value::Null]
    );

    // Once it resolves, it is checked and comes up; clients reach both.
    let a2 = addr(&format!("127.0.0.2:{port}"));
    dns.add("late.disc.test. 1 IN A 127.0.0.2").await;
    wait_for_address(&server, "late", a2, State::Up).await;
    let now = serde_json::Value::from(a2.to_string());
    assert_eq!(
        resolved_of(&server, &socket, "late").await,
        [now.clone(), now]
    );
    let mut greetings = std::collections::BTreeSet::new();
    for _ in 0..4 {
        greetings.insert(through(front).await.1);
    }
    assert_eq!(
        greetings,
        ["b2", "b3"].map(String::from).into(),
        "both serve"
    );

    // The DNS server going away keeps the address it has.
    stop_dns_until_a_failure_is_counted(&mut dns, &server).await;
    let kept = serving(&server, "late");
    assert_eq!(
        (kept.addr, kept.state()),
        (a2, State::Up),
        "the last address found stays"
    );
    server.stop().await;
}
