//! The UDP data path over real sockets: session affinity, balancing of sessions, expiry,
//! the session cap, maximum-size datagrams, drain (also of clients that never pause, and
//! removal by a reload), ICMP unreachable and re-pick, `on_down: close`, running out of
//! file descriptors, reply source addresses on wildcard binds, shutdown.
//!
//! Every test runs on a runtime with two worker threads, so each listener receives on two
//! SO_REUSEPORT sockets (one per worker), as it does in production on a multi-core host:
//! what is asserted holds whichever socket the kernel hands a client to.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use weir::backend::{Admin, Health, State};
use weir::balance::Strategy;
use weir::config::HealthCheckConfig;
use weir::proxy::Listener;
use weir::proxy::udp::DropReason;

fn listener(server: &weir::server::Server) -> Arc<Listener> {
    server.handle.tables().listeners["front"].clone()
}

/// Backends `a` and `b` (their answers start with their name) behind a round-robin udp
/// listener: the backends, the server, and the listener's address.
async fn round_robin_over_a_and_b() -> (
    UdpTestBackend,
    UdpTestBackend,
    weir::server::Server,
    SocketAddr,
) {
    let a = UdpTestBackend::start("a").await;
    let b = UdpTestBackend::start("b").await;
    let (server, front) = start(udp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("a", a.addr, 1),
            backend_config("b", b.addr, 1),
        ],
    ))
    .await;
    (a, b, server, front)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_socket_sticks_to_one_backend_for_1000_datagrams() {
    let (a, b, server, front) = round_robin_over_a_and_b().await;
    let client = udp_client("127.0.0.1").await;
    let mut names = HashSet::new();
    for i in 0..1000 {
        let payload = format!("datagram {i}");
        let answer = udp_exchange(&client, front, payload.as_bytes()).await;
        assert_eq!(answer.split_once(':').unwrap().1, payload, "answer intact");
        names.insert(answered_by(&answer).to_string());
    }
    assert_eq!(names.len(), 1, "one session, one backend: {names:?}");
    assert_eq!(a.received() + b.received(), 1000);
    let l = listener(&server);
    assert_eq!(l.active(), 1, "one session");
    assert_eq!(l.total(), 1);
    let stats = l.udp.as_ref().unwrap();
    assert_eq!(stats.datagrams_to_backend(), 1000);
    assert_eq!(stats.datagrams_to_client(), 1000);
    let name = names.into_iter().next().unwrap();
    assert_eq!(server.backend("pool", &name).unwrap().active(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_client_sockets_over_backends() {
    let (_a, _b, server, front) = round_robin_over_a_and_b().await;
    let mut clients = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..10 {
        let client = udp_client("127.0.0.1").await;
        let answer = udp_exchange(&client, front, format!("hello {i}").as_bytes()).await;
        *counts.entry(answered_by(&answer).to_string()).or_default() += 1;
        clients.push((client, answered_by(&answer).to_string()));
    }
    assert_eq!(counts.get("a"), Some(&5), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&5), "{counts:?}");
    // Each keeps its backend.
    for (i, (client, name)) in clients.iter().enumerate() {
        let answer = udp_exchange(client, front, format!("again {i}").as_bytes()).await;
        assert_eq!(answered_by(&answer), name);
    }
    assert_eq!(server.backend("pool", "a").unwrap().active(), 5);
    assert_eq!(server.backend("pool", "b").unwrap().active(), 5);
    assert_eq!(listener(&server).active(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_hash_keeps_each_client_address_on_the_backend_the_pool_picks() {
    let a = UdpTestBackend::start("a").await;
    let b = UdpTestBackend::start("b").await;
    let c = UdpTestBackend::start("c").await;
    let (server, front) = start(udp_config(
        Strategy::SourceHash,
        vec![
            backend_config("a", a.addr, 1),
            backend_config("b", b.addr, 1),
            backend_config("c", c.addr, 1),
        ],
    ))
    .await;
    let pool = listener(&server).pool.load_full();
    let mut used = HashSet::new();
    for host in 2..=21 {
        let ip = format!("127.0.0.{host}");
        let expected = {
            let snapshot = pool.snapshot();
            let index = snapshot
                .pick(ip.parse::<IpAddr>().unwrap(), &[])
                .expect("a backend");
            snapshot.backends[index].name.clone()
        };
        // Two sockets (two ports, so two sessions) on the same address, a few datagrams each.
        for _ in 0..2 {
            let client = udp_client(&ip).await;
            for i in 0..3 {
                let answer = udp_exchange(&client, front, format!("{ip} {i}").as_bytes()).await;
                assert_eq!(answered_by(&answer), expected, "client {ip}");
            }
        }
        used.insert(expected);
    }
    assert!(
        used.len() >= 2,
        "20 addresses over 3 backends use more than one: {used:?}"
    );
    assert_eq!(listener(&server).active(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_expire_and_release_their_counts() {
    let a = UdpTestBackend::start("a").await;
    let mut config = udp_config(Strategy::RoundRobin, vec![backend_config("a", a.addr, 1)]);
    config.listeners[0].idle_timeout = Duration::from_millis(200);
    let (server, front) = start(config).await;
    let l = listener(&server);
    let backend = server.backend("pool", "a").unwrap();

    let client = udp_client("127.0.0.1").await;
    assert_eq!(udp_exchange(&client, front, b"one").await, "a:one");
    assert_eq!(l.active(), 1);
    assert_eq!(backend.active(), 1);

    let idle_from = Instant::now();
    wait_until(DEADLINE, "the idle session to expire", || {
        let (l, backend) = (l.clone(), backend.clone());
        async move { l.active() == 0 && backend.active() == 0 }
    })
    .await;
    assert!(
        idle_from.elapsed() >= Duration::from_millis(190),
        "not before idle_timeout"
    );

    // The same client opens a new session.
    assert_eq!(udp_exchange(&client, front, b"two").await, "a:two");
    assert_eq!(l.total(), 2);
    assert_eq!(backend.total(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_either_way_keeps_a_session_open() {
    // A backend that answers "stream" with five datagrams, 300 ms apart.
    let socket = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let backend_addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            if &buf[..n] == b"stream" {
                let socket = Arc::clone(&socket);
                tokio::spawn(async move {
                    for i in 0..5 {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let _ = socket.send_to(format!("tick {i}").as_bytes(), peer).await;
                    }
                });
            } else {
                let _ = socket.send_to(&buf[..n], peer).await;
            }
        }
    });
    let mut config = udp_config(
        Strategy::RoundRobin,
        vec![backend_config("b", backend_addr, 1)],
    );
    config.listeners[0].idle_timeout = Duration::from_secs(1);
    let (server, front) = start(config).await;
    let l = listener(&server);

    // Client datagrams more often than idle_timeout.
    let client = udp_client("127.0.0.1").await;
    for _ in 0..5 {
        assert_eq!(udp_exchange(&client, front, b"keep").await, "keep");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(l.total(), 1, "one session all along");

    // Backend datagrams alone: one request, then 1.5 s of answers.
    let client = udp_client("127.0.0.1").await;
    client.send_to(b"stream", front).await.unwrap();
    let mut buf = [0u8; 64];
    for i in 0..5 {
        let (n, _) = tokio::time::timeout(DEADLINE, client.recv_from(&mut buf))
            .await
            .expect("tick in time")
            .unwrap();
        assert_eq!(&buf[..n], format!("tick {i}").as_bytes());
    }
    assert_eq!(l.total(), 2, "the second client's one session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cap_drops_and_counts_then_serves_after_expiry() {
    let a = UdpTestBackend::start("a").await;
    let mut config = udp_config(Strategy::RoundRobin, vec![backend_config("a", a.addr, 1)]);
    config.listeners[0].max_connections = Some(2);
    config.listeners[0].idle_timeout = Duration::from_secs(1);
    let (server, front) = start(config).await;
    let l = listener(&server);
    let stats = l.udp.as_ref().unwrap();

    let first = udp_client("127.0.0.1").await;
    let second = udp_client("127.0.0.1").await;
    let third = udp_client("127.0.0.1").await;
    assert_eq!(udp_exchange(&first, front, b"1").await, "a:1");
    assert_eq!(udp_exchange(&second, front, b"2").await, "a:2");
    assert_eq!(l.active(), 2);

    third.send_to(b"3", front).await.unwrap();
    wait_until(
        DEADLINE,
        "the third client's datagram to be dropped",
        || async { stats.dropped(DropReason::MaxConnections) == 1 },
    )
    .await;
    assert_eq!(
        a.received(),
        2,
        "the dropped datagram never reached the backend"
    );
    let mut buf = [0u8; 16];
    assert!(
        third.try_recv_from(&mut buf).is_err(),
        "no answer to a dropped datagram"
    );
    assert_eq!(l.active(), 2);
    assert_eq!(l.total(), 2);

    wait_until(DEADLINE, "the two sessions to expire", || async {
        l.active() == 0
    })
    .await;
    assert_eq!(udp_exchange(&third, front, b"3 again").await, "a:3 again");
    assert_eq!(l.active(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_datagram_passes_whole_each_way() {
    let echo = UdpTestBackend::echo("echo").await;
    let (_server, front) = start(udp_config(
        Strategy::RoundRobin,
        vec![backend_config("echo", echo.addr, 1)],
    ))
    .await;
    let client = udp_client("127.0.0.1").await;
    let big = pseudo_random(65_507, 99);
    let (answer, _) = udp_exchange_from(&client, front, &big).await;
    assert_eq!(answer.len(), 65_507, "nothing truncated");
    assert!(answer == big, "bytes intact");

    // Boundaries kept: small ones after a big one arrive as they were sent.
    for len in [0usize, 1, 1500, 9000, 65_507, 3] {
        let payload = pseudo_random(len, len as u64);
        let (answer, _) = udp_exchange_from(&client, front, &payload).await;
        assert_eq!(answer.len(), len);
        assert!(answer == payload);
    }
    assert_eq!(echo.sizes(), vec![65_507, 0, 1, 1500, 9000, 65_507, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_live_sessions_and_sends_new_ones_elsewhere() {
    let a = UdpTestBackend::start("a").await;
    let b = UdpTestBackend::start("b").await;
    let mut config = udp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("a", a.addr, 1),
            backend_config("b", b.addr, 1),
        ],
    );
    config.listeners[0].idle_timeout = Duration::from_secs(1);
    let (server, front) = start(config).await;

    let client = udp_client("127.0.0.1").await;
    let first = answered_by(&udp_exchange(&client, front, b"x").await).to_string();
    let other = if first == "a" { "b" } else { "a" };
    let drained = server.backend("pool", &first).unwrap();
    drained.set_admin(Admin::Drain);
    assert_eq!(drained.state(), State::Draining);

    // The open session keeps its backend; new sessions go to the other one.
    for i in 0..5 {
        let answer = udp_exchange(&client, front, format!("x{i}").as_bytes()).await;
        assert_eq!(answered_by(&answer), first);
        let newcomer = udp_client("127.0.0.1").await;
        let answer = udp_exchange(&newcomer, front, b"new").await;
        assert_eq!(answered_by(&answer), other);
    }
    assert_eq!(drained.active(), 1);

    wait_until(DEADLINE, "the drained backend's session to expire", || {
        let d = drained.clone();
        async move { d.state() == State::Drained }
    })
    .await;
    assert_eq!(drained.active(), 0);
    // The client's next datagram is a new session, on the other backend.
    let answer = udp_exchange(&client, front, b"after").await;
    assert_eq!(answered_by(&answer), other);
}

/// An address with nothing listening: datagrams to it come back as ICMP port unreachable.
async fn dead_udp_address() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icmp_unreachable_counts_a_connect_error_and_a_down_backend_loses_its_sessions() {
    let dead = dead_udp_address().await;
    let live = UdpTestBackend::start("live").await;
    let (server, front) = start(udp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("dead", dead, 1),
            backend_config("live", live.addr, 1),
        ],
    ))
    .await;
    let dead_backend = server.backend("pool", "dead").unwrap();
    let live_backend = server.backend("pool", "live").unwrap();

    // Make the first session land on the dead backend, whatever the strategy's order.
    live_backend.set_admin(Admin::Drain);
    let client = udp_client("127.0.0.1").await;
    client.send_to(b"hello?", front).await.unwrap();
    wait_until(
        DEADLINE,
        "the ICMP error to count as a connect error",
        || {
            let d = dead_backend.clone();
            async move { d.metrics_connect_errors() >= 1 }
        },
    )
    .await;
    assert_eq!(dead_backend.active(), 1, "the session is still on it");
    // Two errors mark nothing down (fewer than passive checking needs): the session
    // stays, each ICMP counts.
    client.send_to(b"anyone?", front).await.unwrap();
    wait_until(DEADLINE, "a second connect error", || {
        let d = dead_backend.clone();
        async move { d.metrics_connect_errors() >= 2 }
    })
    .await;

    // Marked down (as a health check would): the session's next datagram re-picks.
    live_backend.set_admin(Admin::Enabled);
    dead_backend.set_health(Health::Down);
    let answer = udp_exchange(&client, front, b"now?").await;
    assert_eq!(answer, "live:now?");
    assert_eq!(dead_backend.active(), 0, "the old upstream was released");
    assert_eq!(live_backend.active(), 1);
    let l = listener(&server);
    assert_eq!(l.active(), 1, "still one session");
    assert_eq!(l.total(), 1);
    for i in 0..10 {
        let payload = format!("{i}");
        assert_eq!(
            udp_exchange(&client, front, payload.as_bytes()).await,
            format!("live:{i}")
        );
    }
}

/// Without a health check, ICMP errors are passive checking's failed connects too:
/// three in a row mark the backend down, and its client's next datagram moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_health_check_three_icmp_errors_mark_a_udp_backend_down() {
    let dead = dead_udp_address().await;
    let live = UdpTestBackend::start("live").await;
    let (server, front) = start(udp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("dead", dead, 1),
            backend_config("live", live.addr, 1),
        ],
    ))
    .await;
    let dead_backend = server.backend("pool", "dead").unwrap();
    let live_backend = server.backend("pool", "live").unwrap();
    live_backend.set_admin(Admin::Drain);
    let client = udp_client("127.0.0.1").await;
    for n in 1..=3u64 {
        client.send_to(b"hello?", front).await.unwrap();
        wait_until(DEADLINE, "an ICMP error counted", || {
            let d = dead_backend.clone();
            async move { d.metrics_connect_errors() >= n }
        })
        .await;
    }
    assert_eq!(
        dead_backend.state(),
        State::Down,
        "three ICMP errors in a row"
    );
    live_backend.set_admin(Admin::Enabled);
    let answer = udp_exchange(&client, front, b"now?").await;
    assert_eq!(answer, "live:now?");
    assert_eq!(dead_backend.active(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_backend_that_goes_down_loses_its_sessions_too() {
    let (_a, _b, server, front) = round_robin_over_a_and_b().await;
    let client = udp_client("127.0.0.1").await;
    let first = answered_by(&udp_exchange(&client, front, b"x").await).to_string();
    let backend = server.backend("pool", &first).unwrap();
    backend.set_admin(Admin::Drain);
    assert_eq!(
        answered_by(&udp_exchange(&client, front, b"y").await),
        first,
        "draining: the session stays"
    );
    backend.set_health(Health::Down);
    let answer = udp_exchange(&client, front, b"z").await;
    assert_ne!(answered_by(&answer), first, "down: the session moves");
    assert_eq!(backend.active(), 0);
    assert_eq!(backend.state(), State::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_ipv4_bind_replies_from_the_address_the_client_sent_to() {
    let a = UdpTestBackend::start("a").await;
    let mut config = udp_config(Strategy::RoundRobin, vec![backend_config("a", a.addr, 1)]);
    config.listeners[0].bind = "0.0.0.0:0".parse().unwrap();
    let (_server, front) = start(config).await;
    for (client_ip, to_ip) in [
        ("127.0.0.5", "127.0.0.2"),
        ("127.0.0.6", "127.0.0.3"),
        ("127.0.0.1", "127.0.0.1"),
    ] {
        let to = SocketAddr::new(to_ip.parse().unwrap(), front.port());
        let client = udp_client(client_ip).await;
        for _ in 0..2 {
            let (answer, from) = udp_exchange_from(&client, to, b"where").await;
            assert_eq!(answer, b"a:where");
            assert_eq!(from, to, "the reply comes from the address the client used");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_ipv6_bind_replies_from_the_address_the_client_sent_to() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: no IPv6 loopback here");
        return;
    }
    let a = UdpTestBackend::start("a").await;
    let mut config = udp_config(Strategy::RoundRobin, vec![backend_config("a", a.addr, 1)]);
    config.listeners[0].bind = "[::]:0".parse().unwrap();
    let (_server, front) = start(config).await;

    let to = SocketAddr::new("::1".parse().unwrap(), front.port());
    let client = udp_client("::1").await;
    let (answer, from) = udp_exchange_from(&client, to, b"six").await;
    assert_eq!(answer, b"a:six");
    assert_eq!(from, to);

    // IPv4 clients of the dual-stack socket get their answer from the IPv4 address used.
    let to = SocketAddr::new("127.0.0.3".parse().unwrap(), front.port());
    let client = udp_client("127.0.0.7").await;
    let (answer, from) = udp_exchange_from(&client, to, b"four").await;
    assert_eq!(answer, b"a:four");
    assert_eq!(from, to);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_listener_and_backend() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: no IPv6 loopback here");
        return;
    }
    let socket = tokio::net::UdpSocket::bind("[::1]:0").await.unwrap();
    let backend_addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], peer).await;
        }
    });
    let mut config = udp_config(
        Strategy::RoundRobin,
        vec![backend_config("v6", backend_addr, 1)],
    );
    config.listeners[0].bind = "[::1]:0".parse().unwrap();
    let (_server, front) = start(config).await;
    let client = udp_client("::1").await;
    let (answer, from) = udp_exchange_from(&client, front, b"over v6").await;
    assert_eq!(answer, b"over v6");
    assert_eq!(from, front);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_drops_and_counts() {
    let a = UdpTestBackend::start("a").await;
    let (server, front) = start(udp_config(
        Strategy::RoundRobin,
        vec![backend_config("a", a.addr, 1)],
    ))
    .await;
    server
        .backend("pool", "a")
        .unwrap()
        .set_admin(Admin::Disabled);
    let client = udp_client("127.0.0.1").await;
    client.send_to(b"anyone", front).await.unwrap();
    let l = listener(&server);
    wait_until(DEADLINE, "the datagram to be dropped", || {
        let l = l.clone();
        async move { l.udp.as_ref().unwrap().dropped(DropReason::NoBackend) == 1 }
    })
    .await;
    assert_eq!(l.active(), 0, "no session held");
    assert_eq!(
        l.total(),
        0,
        "a dropped datagram is not counted as a session"
    );
    assert_eq!(a.received(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_stops_receiving_and_ends_sessions() {
    let a = UdpTestBackend::start("a").await;
    let (server, front) = start(udp_config(
        Strategy::RoundRobin,
        vec![backend_config("a", a.addr, 1)],
    ))
    .await;
    let l = listener(&server);
    let client = udp_client("127.0.0.1").await;
    assert_eq!(udp_exchange(&client, front, b"before").await, "a:before");

    let started = Instant::now();
    let left = tokio::time::timeout(DEADLINE, server.stop())
        .await
        .expect("stop in time");
    assert_eq!(left, 0, "sessions ended within the grace period");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "sessions linger briefly, not for idle_timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(l.active(), 0);
    assert_eq!(server.backend("pool", "a").unwrap().active(), 0);

    let received = a.received();
    client.send_to(b"after", front).await.unwrap();
    let mut buf = [0u8; 64];
    let answer = tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await;
    assert!(
        !matches!(answer, Ok(Ok(_))),
        "no answer after shutdown: {answer:?}"
    );
    assert_eq!(a.received(), received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_and_drop_counters_are_exported() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = UdpTestBackend::start("a").await;
    let mut config = udp_config(Strategy::RoundRobin, vec![backend_config("a", a.addr, 1)]);
    // The recorder is process-wide: a listener name no other test uses.
    config.listeners[0].name = "udp_metrics".into();
    config.listeners[0].max_connections = Some(1);
    config.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    let server = weir::server::Server::start(config, None).await.unwrap();
    let front = server.listener_addr("udp_metrics").unwrap();
    let metrics = server.metrics_addr().expect("metrics address");

    let client = udp_client("127.0.0.1").await;
    for i in 0..3 {
        let payload = format!("{i}");
        assert_eq!(
            udp_exchange(&client, front, payload.as_bytes()).await,
            format!("a:{i}")
        );
    }
    let over = udp_client("127.0.0.1").await;
    over.send_to(b"no room", front).await.unwrap();
    let l = server.handle.tables().listeners["udp_metrics"].clone();
    wait_until(DEADLINE, "the drop", || {
        let l = l.clone();
        async move { l.udp.as_ref().unwrap().dropped(DropReason::MaxConnections) == 1 }
    })
    .await;

    let mut stream = tokio::net::TcpStream::connect(metrics).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut text))
        .await
        .expect("scrape in time")
        .unwrap();
    for line in [
        r#"weir_udp_datagrams_total{listener="udp_metrics",direction="to_backend"} 3"#,
        r#"weir_udp_datagrams_total{listener="udp_metrics",direction="to_client"} 3"#,
        r#"weir_udp_dropped_total{listener="udp_metrics",reason="max_connections"} 1"#,
        r#"weir_listener_rejected_total{listener="udp_metrics",reason="max_connections"} 1"#,
        r#"weir_listener_connections_total{listener="udp_metrics"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_sessions_applies_idle_timeout_and_moves_the_listener() {
    let a = UdpTestBackend::start("a").await;
    let dir = TempDir::new("udp-reload");
    let path = dir.join("weir.yaml");
    let yaml = |bind: &str, idle: &str| {
        format!(
            "listeners:\n  front:\n    bind: {bind}\n    protocol: udp\n    pool: pool\n    idle_timeout: {idle}\npools:\n  pool:\n    backends:\n      - address: {}\n        name: a\n",
            a.addr
        )
    };
    std::fs::write(&path, yaml("127.0.0.1:0", "30s")).unwrap();
    let config = weir::config::load(&path).expect("valid config");
    let server = weir::server::Server::start(config, Some(path.clone()))
        .await
        .unwrap();
    let front = server.listener_addr("front").unwrap();
    let l = listener(&server);
    let client = udp_client("127.0.0.1").await;
    assert_eq!(udp_exchange(&client, front, b"1").await, "a:1");

    // Same address, shorter idle_timeout: the session survives the reload, then expires.
    std::fs::write(&path, yaml("127.0.0.1:0", "200ms")).unwrap();
    server.handle.reload().await.expect("reload");
    assert!(Arc::ptr_eq(&l, &listener(&server)), "the same listener");
    assert_eq!(udp_exchange(&client, front, b"2").await, "a:2");
    assert_eq!(l.total(), 1, "the same session");
    wait_until(
        DEADLINE,
        "the session to expire under the new timeout",
        || {
            let l = l.clone();
            async move { l.active() == 0 }
        },
    )
    .await;

    // Another port: the new listener serves, the old one stops.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(&path, yaml(&format!("127.0.0.1:{port}"), "200ms")).unwrap();
    server.handle.reload().await.expect("reload");
    let moved = server.listener_addr("front").unwrap();
    assert_eq!(moved.port(), port);
    assert_eq!(udp_exchange(&client, moved, b"3").await, "a:3");
    let old_socket_closed = || async {
        // Once the old loop has ended, its port can be bound again.
        std::net::UdpSocket::bind(front).is_ok()
    };
    wait_until(
        DEADLINE,
        "the old listener's socket to close",
        old_socket_closed,
    )
    .await;
}

/// Bursts from several clients at once: the listener reads them several per call and the
/// replies go back several per call. Every client gets every answer of its own, in order,
/// and none of another client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_from_several_clients_each_get_all_their_own_answers_in_order() {
    let backend = UdpTestBackend::echo("echo").await;
    let (server, front) = start(udp_config(
        Strategy::RoundRobin,
        vec![backend_config("echo", backend.addr, 1)],
    ))
    .await;
    const CLIENTS: usize = 4;
    const BURST: usize = 40;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(udp_client("127.0.0.1").await);
    }
    // All of every burst is sent before any answer is read.
    for (c, client) in clients.iter().enumerate() {
        for i in 0..BURST {
            client
                .send_to(format!("client {c} datagram {i}").as_bytes(), front)
                .await
                .unwrap();
        }
    }
    let mut buf = vec![0u8; 65536];
    for (c, client) in clients.iter().enumerate() {
        for i in 0..BURST {
            let (n, from) = tokio::time::timeout(DEADLINE, client.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("client {c}: answer {i} in time"))
                .unwrap();
            assert_eq!(
                from, front,
                "answers come from the address the client sent to"
            );
            assert_eq!(
                std::str::from_utf8(&buf[..n]).unwrap(),
                format!("client {c} datagram {i}")
            );
        }
    }
    let l = listener(&server);
    let stats = l.udp.as_ref().unwrap();
    assert_eq!(stats.datagrams_to_backend(), (CLIENTS * BURST) as u64);
    assert_eq!(stats.datagrams_to_client(), (CLIENTS * BURST) as u64);
    assert_eq!(l.active(), CLIENTS as u64);
}

/// 64 clients over a listener's two sockets: each client keeps one session (one backend
/// for all its datagrams), and each session is counted once, whichever socket holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_spread_over_the_listeners_sockets_keep_one_session_each() {
    let (_a, _b, server, front) = round_robin_over_a_and_b().await;
    assert_eq!(
        listener(&server).udp.as_ref().unwrap().sockets(),
        2,
        "one socket per worker thread on {front}"
    );
    const CLIENTS: usize = 64;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(udp_client("127.0.0.1").await);
    }
    let mut backend_of: Vec<String> = Vec::new();
    for round in 0..5 {
        for (c, client) in clients.iter().enumerate() {
            let payload = format!("{c}/{round}");
            let answer = udp_exchange(client, front, payload.as_bytes()).await;
            assert_eq!(
                answer.split_once(':').unwrap().1,
                payload,
                "client {c}'s own answer"
            );
            let name = answered_by(&answer).to_string();
            if round == 0 {
                backend_of.push(name);
            } else {
                assert_eq!(name, backend_of[c], "client {c} stays on one backend");
            }
        }
    }
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for name in &backend_of {
        *per_backend.entry(name).or_default() += 1;
    }
    assert_eq!(
        per_backend.len(),
        2,
        "round-robin over both: {per_backend:?}"
    );
    let l = listener(&server);
    assert_eq!(l.total(), CLIENTS as u64, "one session per client");
    assert_eq!(l.active(), CLIENTS as u64);
    assert_eq!(
        server.backend("pool", "a").unwrap().active()
            + server.backend("pool", "b").unwrap().active(),
        CLIENTS as u64
    );
}

/// A client that sends a datagram every 100 ms, each answered before the next, until
/// told to stop; returns who answered each one, in order.
fn steady_client(
    front: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let client = udp_client("127.0.0.1").await;
        let mut every = tokio::time::interval(Duration::from_millis(100));
        let mut answers = Vec::new();
        while !stop.is_cancelled() {
            every.tick().await;
            let answer =
                udp_exchange(&client, front, format!("{}", answers.len()).as_bytes()).await;
            answers.push(answered_by(&answer).to_string());
        }
        answers
    })
}

/// The contract: a udp session on a drained backend lasts at most idle_timeout after the
/// drain began, even while its client keeps sending, so `drain --wait` returns; the
/// client's next datagram is a new session on another backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_returns_while_the_client_keeps_sending() {
    let a = UdpTestBackend::start("a").await;
    let b = UdpTestBackend::start("b").await;
    let dir = TempDir::new("udp-drain");
    let socket = dir.join("admin.sock");
    let idle = Duration::from_secs(1);
    let mut config = udp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("a", a.addr, 1),
            backend_config("b", b.addr, 1),
        ],
    );
    config.listeners[0].idle_timeout = idle;
    config.admin_socket = Some(socket.clone());
    let (server, front) = start(config).await;
    let l = listener(&server);

    let stop = tokio_util::sync::CancellationToken::new();
    let client = steady_client(front, stop.clone());
    wait_until(DEADLINE, "the client's session", || {
        let l = l.clone();
        async move { l.active() == 1 }
    })
    .await;
    let on = ["a", "b"]
        .into_iter()
        .find(|name| server.backend("pool", name).unwrap().active() == 1)
        .expect("the session's backend");
    let other = if on == "a" { "b" } else { "a" };
    let drained = server.backend("pool", on).unwrap();

    let began = Instant::now();
    let command = ["drain", &format!("pool/{on}"), "--wait", "--timeout", "5s"];
    let outcome = weir::ctl::run(
        Some(socket.clone()),
        None,
        command.iter().map(|w| w.to_string()).collect(),
    )
    .await;
    let took = began.elapsed();
    assert_eq!(
        outcome,
        weir::ctl::Outcome::Success,
        "drain --wait returned"
    );
    assert!(took >= idle, "the session lasted idle_timeout: {took:?}");
    assert!(
        took < idle + Duration::from_secs(1),
        "and not much longer: {took:?}"
    );
    assert_eq!(drained.active(), 0);
    assert_eq!(drained.state(), State::Drained);

    // The client keeps going, now answered by the other backend.
    let answered = b.received() + a.received();
    wait_until(DEADLINE, "five more answers", || {
        let done = b.received() + a.received() >= answered + 5;
        async move { done }
    })
    .await;
    stop.cancel();
    let answers = client.await.expect("the client never went unanswered");
    let switched = answers
        .iter()
        .position(|name| name == other)
        .expect("answers from the other backend");
    assert!(
        switched >= 5,
        "the session stayed on {on} at first: {answers:?}"
    );
    assert!(
        answers[..switched].iter().all(|name| name == on)
            && answers[switched..].iter().all(|name| name == other),
        "one switch, from {on} to {other}: {answers:?}"
    );
    assert_eq!(server.backend("pool", other).unwrap().active(), 1);
    assert_eq!(l.active(), 1);
    assert_eq!(l.total(), 2, "the client's next datagram was a new session");
}

/// Ending sessions of drained backends leaves alone a busy session on an enabled one,
/// and one on a backend drained and enabled again before idle_timeout passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_session_on_an_enabled_backend_is_not_ended() {
    let a = UdpTestBackend::start("a").await;
    let mut config = udp_config(Strategy::RoundRobin, vec![backend_config("a", a.addr, 1)]);
    let idle = Duration::from_secs(1);
    config.listeners[0].idle_timeout = idle;
    let (server, front) = start(config).await;
    let l = listener(&server);
    let backend = server.backend("pool", "a").unwrap();

    // Watched for a while: nothing to wait for, the point is that nothing happens.
    let stop = tokio_util::sync::CancellationToken::new();
    let client = steady_client(front, stop.clone());
    tokio::time::sleep(idle * 2).await;
    backend.set_admin(Admin::Drain);
    tokio::time::sleep(idle / 5).await;
    backend.set_admin(Admin::Enabled);
    tokio::time::sleep(idle * 2).await;
    stop.cancel();
    let answers = client.await.unwrap();
    assert!(answers.len() >= 30, "{} answers", answers.len());
    assert_eq!(l.total(), 1, "one session all along");
    assert_eq!(backend.total(), 1);
    assert_eq!(backend.active(), 1);
}

/// `on_down: close` ends a backend's sessions as soon as it is marked down, without a
/// datagram from their clients; the default (keep) leaves them to move on their next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marked_down_under_on_down_close_ends_sessions_at_once_and_keep_leaves_them() {
    let a = UdpTestBackend::start("a").await;
    let b = UdpTestBackend::start("b").await;
    let c = UdpTestBackend::start("c").await;
    let (server, front) = start(udp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("a", a.addr, 1),
            backend_config("b", b.addr, 1),
            backend_config("c", c.addr, 1),
        ],
    ))
    .await;
    let l = listener(&server);
    let backend = |name: &str| server.backend("pool", name).unwrap();
    let mut clients = BTreeMap::new();
    for i in 0..3 {
        let client = udp_client("127.0.0.1").await;
        let answer = udp_exchange(&client, front, format!("{i}").as_bytes()).await;
        clients.insert(answered_by(&answer).to_string(), client);
    }
    assert_eq!(clients.len(), 3, "one session on each backend");
    backend("a").set_close_on_down(true);

    assert!(backend("a").mark_down());
    assert!(backend("b").mark_down());
    wait_until(Duration::from_millis(500), "a's session to end", || {
        let a = backend("a");
        async move { a.active() == 0 }
    })
    .await;
    assert_eq!(l.active(), 2, "a's session ended, the others are open");
    assert_eq!(
        backend("b").active(),
        1,
        "b (on_down: keep) keeps its session"
    );

    // a's client gets a new session, b's moves (the same session), both to c.
    let answer = udp_exchange(&clients["a"], front, b"again").await;
    assert_eq!(answer, "c:again");
    let answer = udp_exchange(&clients["b"], front, b"again").await;
    assert_eq!(answer, "c:again");
    assert_eq!(backend("b").active(), 0);
    assert_eq!(backend("c").active(), 3);
    assert_eq!(l.total(), 4, "a new session for a's client only");
}

/// A UDP backend with a health endpoint: it answers "PING" with "PONG" while `healthy`,
/// and every other datagram with `NAME:` and the datagram.
struct CheckedUdpBackend {
    addr: SocketAddr,
    healthy: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CheckedUdpBackend {
    async fn start(name: &str) -> CheckedUdpBackend {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let up = Arc::clone(&healthy);
        let prefix = format!("{name}:").into_bytes();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let answer = if &buf[..n] == b"PING" {
                    if !up.load(std::sync::atomic::Ordering::SeqCst) {
                        continue;
                    }
                    b"PONG".to_vec()
                } else {
                    [&prefix[..], &buf[..n]].concat()
                };
                let _ = socket.send_to(&answer, peer).await;
            }
        });
        CheckedUdpBackend {
            addr,
            healthy,
            task,
        }
    }
}

impl Drop for CheckedUdpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// End to end: a udp health check marks a backend down under `on_down: close`; its
/// sessions end at once and are counted in weir_backend_closed_on_down_total; the clients'
/// next datagrams open sessions on the other backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_udp_health_check_under_on_down_close_ends_the_backends_sessions() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = CheckedUdpBackend::start("on_down_a").await;
    let b = CheckedUdpBackend::start("on_down_b").await;
    let mut config = udp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("on_down_a", a.addr, 1),
            backend_config("on_down_b", b.addr, 1),
        ],
    );
    let interval = Duration::from_millis(100);
    config.pools[0].health_check = Some(HealthCheckConfig {
        send: Some(b"PING".to_vec()),
        expect: Some(b"PONG".to_vec()),
        ..health_check(interval, interval, 1, 1)
    });
    config.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    let server = weir::server::Server::start(config, None).await.unwrap();
    let front = server.listener_addr("front").unwrap();
    for name in ["on_down_a", "on_down_b"] {
        wait_for_state(&server, "pool", name, State::Up, DEADLINE).await;
        server
            .backend("pool", name)
            .unwrap()
            .set_close_on_down(true);
    }
    let closing = server.backend("pool", "on_down_a").unwrap();
    let mut on_a = Vec::new();
    for i in 0..4 {
        let client = udp_client("127.0.0.1").await;
        let answer = udp_exchange(&client, front, format!("{i}").as_bytes()).await;
        if answered_by(&answer) == "on_down_a" {
            on_a.push(client);
        }
    }
    assert_eq!(on_a.len(), 2, "round-robin: two sessions on each");
    assert_eq!(closing.active(), 2);

    a.healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_for_state(&server, "pool", "on_down_a", State::Down, DEADLINE).await;
    wait_until(Duration::from_millis(500), "its sessions to end", || {
        let closing = closing.clone();
        async move { closing.active() == 0 }
    })
    .await;

    let mut stream = tokio::net::TcpStream::connect(server.metrics_addr().unwrap())
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut text))
        .await
        .expect("scrape in time")
        .unwrap();
    let line = r#"weir_backend_closed_on_down_total{pool="pool",backend="on_down_a"} 2"#;
    assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");

    for client in &on_a {
        let answer = udp_exchange(client, front, b"next").await;
        assert_eq!(answer, "on_down_b:next");
    }
    assert_eq!(server.backend("pool", "on_down_b").unwrap().active(), 4);
    assert_eq!(listener(&server).total(), 6, "two new sessions");
}

/// weir running out of file descriptors is weir's problem: the datagrams that find no
/// socket for their session are dropped as `reason="resources"`, the backend's health and
/// connect errors are untouched, and clients are served again once descriptors are back.
/// The open-file limit is the process's, so this runs in a child process of its own
/// (`out_of_descriptors_in_a_child_process`).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_not_held_against_the_backend() {
    let child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "out_of_descriptors_in_a_child_process"])
        .args(["--ignored", "--nocapture", "--test-threads=1"])
        .env("WEIR_UDP_FD_CHILD", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .expect("the child in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{stderr}"
    );
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "lowers the process's open-file limit: run by running_out_of_descriptors_is_not_held_against_the_backend"]
async fn out_of_descriptors_in_a_child_process() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    if std::env::var_os("WEIR_UDP_FD_CHILD").is_none() {
        return;
    }
    let a = UdpTestBackend::start("a").await;
    let (server, front) = start(udp_config(
        Strategy::RoundRobin,
        vec![backend_config("a", a.addr, 1)],
    ))
    .await;
    let backend = server.backend("pool", "a").unwrap();
    let l = listener(&server);
    let stats = l.udp.as_ref().unwrap();
    const CLIENTS: usize = 40;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(udp_client("127.0.0.1").await);
    }

    // Room for two more descriptors: the limit is one above the second free number (those
    // open above it stay open; a new one must be below it).
    let open: HashSet<u64> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // read_dir's own descriptor is in the list but closed by now: not counted as open.
    let free =
        |fd: &u64| !open.contains(fd) || std::fs::metadata(format!("/proc/self/fd/{fd}")).is_err();
    let limit = (0u64..).filter(free).nth(1).unwrap() + 1;
    let saved = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(limit),
            maximum: saved.maximum,
        },
    )
    .unwrap();
    for client in &clients {
        client.send_to(b"x", front).await.unwrap();
    }
    wait_until(DEADLINE, "every datagram sent on or dropped", || {
        let handled = stats.datagrams_to_backend() + stats.dropped(DropReason::Resources);
        let done = handled + stats.dropped(DropReason::UpstreamSocket) >= CLIENTS as u64;
        async move { done }
    })
    .await;
    setrlimit(Resource::Nofile, saved).unwrap();

    let dropped = stats.dropped(DropReason::Resources);
    assert!(dropped > 0, "some sessions found no descriptor");
    assert_eq!(stats.dropped(DropReason::UpstreamSocket), 0);
    assert_eq!(l.active() + dropped, CLIENTS as u64);
    assert_eq!(
        backend.metrics_connect_errors(),
        0,
        "not the backend's fault"
    );
    assert_eq!(backend.health(), Health::Up);
    // Descriptors are back: every client is served (those that got a session may see the
    // answer to their first datagram first).
    for client in &clients {
        let mut answer = udp_exchange(client, front, b"y").await;
        if answer == "a:x" {
            let mut buf = [0u8; 16];
            let (n, _) = tokio::time::timeout(DEADLINE, client.recv_from(&mut buf))
                .await
                .expect("the answer in time")
                .unwrap();
            answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        }
        assert_eq!(answer, "a:y");
    }
    assert_eq!(l.active(), CLIENTS as u64);
}

/// A backend removed by a reload is retired like a drained one: its busy session ends
/// idle_timeout after the reload, the client's next datagram goes to a backend that stays,
/// and the removed backend leaves its pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_removed_by_a_reload_loses_its_busy_session_after_idle_timeout() {
    let a = UdpTestBackend::start("a").await;
    let b = UdpTestBackend::start("b").await;
    let dir = TempDir::new("udp-retire");
    let path = dir.join("weir.yaml");
    let yaml = |backends: &[&UdpTestBackend]| {
        let mut text = "listeners:\n  front:\n    bind: 127.0.0.1:0\n    protocol: udp\n    pool: pool\n    idle_timeout: 1s\npools:\n  pool:\n    backends:\n".to_string();
        for backend in backends {
            text += &format!(
                "      - address: {}\n        name: {}\n",
                backend.addr, backend.name
            );
        }
        text
    };
    std::fs::write(&path, yaml(&[&a, &b])).unwrap();
    let config = weir::config::load(&path).expect("valid config");
    let server = weir::server::Server::start(config, Some(path.clone()))
        .await
        .unwrap();
    let front = server.listener_addr("front").unwrap();
    let l = listener(&server);

    let stop = tokio_util::sync::CancellationToken::new();
    let client = steady_client(front, stop.clone());
    wait_until(DEADLINE, "the client's session", || {
        let l = l.clone();
        async move { l.active() == 1 }
    })
    .await;
    let (removed, stays) = if server.backend("pool", "a").unwrap().active() == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let retired = server.backend("pool", &removed.name).unwrap();
    std::fs::write(&path, yaml(&[stays])).unwrap();
    let began = Instant::now();
    server.handle.reload().await.expect("reload");
    wait_until(DEADLINE, "the removed backend's session to end", || {
        let retired = retired.clone();
        async move { retired.active() == 0 }
    })
    .await;
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "kept for idle_timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(2), "not much longer: {took:?}");
    wait_until(DEADLINE, "the removed backend to leave its pool", || {
        let gone = server.backend("pool", &removed.name).is_none();
        async move { gone }
    })
    .await;

    let answered = stays.received();
    wait_until(DEADLINE, "answers from the backend that stays", || {
        let more = stays.received() >= answered + 3;
        async move { more }
    })
    .await;
    stop.cancel();
    let answers = client.await.expect("the client never went unanswered");
    assert_eq!(answers.last().unwrap(), &stays.name);
}
