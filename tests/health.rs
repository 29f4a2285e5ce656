//! Active health checking over real sockets: probes, rise/fall, the first round before
//! listeners bind, passive marks, and probes never overriding the operator.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use weir::backend::{Health, State};
use weir::balance::Strategy;
use weir::config::{HealthCheckConfig, Protocol};
use weir::health::probe;

/// Scheduling slack on a busy 2-core machine, on top of what the timings promise.
const SLACK: Duration = Duration::from_millis(750);

/// A port on 127.0.0.1 that refuses connections.
async fn refused_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A TCP server that answers each connection with `reply(n)` (n counts connections
/// from 0) and closes; `None` accepts and never answers.
async fn scripted_server(
    reply: impl Fn(usize) -> Option<&'static [u8]> + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            match reply(n) {
                Some(bytes) => {
                    tokio::spawn(async move {
                        let _ = stream.write_all(bytes).await;
                        let _ = stream.shutdown().await;
                    });
                }
                None => {
                    tokio::spawn(async move {
                        let mut sink = [0u8; 64];
                        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                    });
                }
            }
        }
    });
    (addr, count)
}

fn send_expect(send: &str, expect: &str, timeout: Duration) -> HealthCheckConfig {
    HealthCheckConfig {
        send: Some(send.as_bytes().to_vec()),
        expect: Some(expect.as_bytes().to_vec()),
        ..health_check(Duration::from_secs(1), timeout, 1, 1)
    }
}

#[tokio::test]
async fn dead_backend_goes_down_within_fall_intervals_and_comes_back_after_rise() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let c = TestBackend::start("c").await;
    let (interval, timeout, rise, fall) =
        (Duration::from_millis(100), Duration::from_millis(200), 2, 3);
    let mut config = tcp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("a", a.addr, 1),
            backend_config("b", b.addr, 1),
            backend_config("c", c.addr, 1),
        ],
    );
    config.pools[0].health_check = Some(health_check(interval, timeout, rise, fall));
    let (server, front) = start(config).await;
    for name in ["a", "b", "c"] {
        assert_eq!(
            state(&server, "pool", name),
            State::Up,
            "{name} up after the first round"
        );
    }

    a.stop();
    let down_bound = interval.mul_f64(1.1) * fall + timeout + SLACK;
    let took = wait_for_state(&server, "pool", "a", State::Down, down_bound).await;
    eprintln!("a marked down after {took:?}");
    let last = server.backend("pool", "a").unwrap().last_check();
    assert_eq!(last.as_str(), "fail: connection refused");

    for i in 0..200 {
        let (_stream, name) = connect_named(front).await;
        assert_ne!(name, "a", "connection {i} went to the dead backend");
    }

    let _a = TestBackend::restart("a", a.addr).await;
    let up_bound = interval.mul_f64(1.1) * rise + timeout + SLACK;
    let took = wait_for_state(&server, "pool", "a", State::Up, up_bound).await;
    eprintln!("a up again after {took:?}");
    assert!(
        server
            .backend("pool", "a")
            .unwrap()
            .last_check()
            .starts_with("pass ")
    );

    let mut back = false;
    for _ in 0..50 {
        let (_stream, name) = connect_named(front).await;
        if name == "a" {
            back = true;
            break;
        }
    }
    assert!(back, "a gets traffic again once it is up");
}

#[tokio::test]
async fn first_round_runs_before_listeners_bind_so_no_client_meets_a_dead_backend() {
    let dead = refused_addr().await;
    let good = TestBackend::start("good").await;
    let mut config = tcp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("dead", dead, 1),
            backend_config("good", good.addr, 1),
        ],
    );
    // Only the first round can matter: the next one is a minute away.
    config.pools[0].health_check = Some(health_check(
        Duration::from_secs(60),
        Duration::from_millis(500),
        2,
        3,
    ));
    let (server, front) = start(config).await;
    assert_eq!(state(&server, "pool", "dead"), State::Down);
    assert_eq!(state(&server, "pool", "good"), State::Up);
    assert_eq!(
        server
            .backend("pool", "dead")
            .unwrap()
            .last_check()
            .as_str(),
        "fail: connection refused"
    );
    for _ in 0..20 {
        let (_stream, name) = connect_named(front).await;
        assert_eq!(name, "good");
    }
    assert_eq!(
        server
            .backend("pool", "dead")
            .unwrap()
            .metrics_connect_errors(),
        0,
        "no client connection was ever tried on the dead backend"
    );
}

#[tokio::test]
async fn first_round_is_bounded_by_the_check_timeout() {
    // Accepts and never answers: the first probe runs into its timeout.
    let (silent, _) = scripted_server(|_| None).await;
    let good = TestBackend::start("good").await;
    let timeout = Duration::from_millis(300);
    let mut config = tcp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("silent", silent, 1),
            backend_config("good", good.addr, 1),
        ],
    );
    config.pools[0].health_check = Some(HealthCheckConfig {
        interval: Duration::from_secs(60),
        ..send_expect("PING\r\n", "PONG", timeout)
    });
    let started = Instant::now();
    let (server, _front) = start(config).await;
    let took = started.elapsed();
    assert!(took >= timeout, "waited for the first round ({took:?})");
    assert!(
        took < timeout + SLACK,
        "but not much longer than its timeout ({took:?})"
    );
    assert_eq!(state(&server, "pool", "silent"), State::Down);
    assert_eq!(
        state(&server, "pool", "good"),
        State::Down,
        "good doesn't answer PONG either"
    );
    assert_eq!(
        server
            .backend("pool", "silent")
            .unwrap()
            .last_check()
            .as_str(),
        "fail: timed out after 300ms waiting for a reply containing \"PONG\""
    );
}

#[tokio::test]
async fn backend_marked_down_by_traffic_is_brought_back_by_probes() {
    // Traffic goes to a dead port; the check probes a live port of the same host.
    let traffic = refused_addr().await;
    let health_port = TestBackend::start("health").await;
    let (interval, rise, fall) = (Duration::from_millis(200), 2, 2);
    let mut config = tcp_config(Strategy::RoundRobin, vec![backend_config("x", traffic, 1)]);
    config.pools[0].health_check = Some(HealthCheckConfig {
        port: Some(health_port.addr.port()),
        ..health_check(interval, Duration::from_millis(500), rise, fall)
    });
    let (server, front) = start(config).await;
    assert_eq!(
        state(&server, "pool", "x"),
        State::Up,
        "the check port answers"
    );

    // `fall` failed connects from traffic mark it down at once.
    for _ in 0..fall {
        let mut client = TcpStream::connect(front).await.unwrap();
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(DEADLINE, client.read(&mut buf))
            .await
            .expect("closed promptly")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    let x = server.backend("pool", "x").unwrap();
    assert_eq!(x.health(), Health::Down, "marked down by traffic");

    let bound = interval.mul_f64(1.1) * rise + SLACK;
    let took = wait_for_state(&server, "pool", "x", State::Up, bound).await;
    eprintln!("probes brought x back after {took:?}");
}

/// A backend whose check alternates pass and fail on every probe.
async fn flapping_server() -> (SocketAddr, Arc<AtomicUsize>) {
    scripted_server(|n| Some(if n % 2 == 0 { b"ok\n" } else { b"no\n" })).await
}

#[tokio::test]
async fn operator_state_holds_while_probes_flap() {
    let (addr, probes) = flapping_server().await;
    let mut config = tcp_config(Strategy::RoundRobin, vec![backend_config("f", addr, 1)]);
    let interval = Duration::from_millis(20);
    config.pools[0].health_check = Some(HealthCheckConfig {
        send: None,
        expect: Some(b"ok".to_vec()),
        ..health_check(interval, Duration::from_millis(500), 1, 1)
    });
    let (server, _front) = start(config).await;
    let f = server.backend("pool", "f").unwrap();

    // It flaps: both healths show up.
    let (mut seen_up, mut seen_down) = (false, false);
    wait_until(DEADLINE, "the backend to flap", || {
        match f.health() {
            Health::Up => seen_up = true,
            Health::Down => seen_down = true,
        }
        let both = seen_up && seen_down;
        async move { both }
    })
    .await;

    // Drain: health checks go on (and keep flapping), the state stays drained.
    let reply = admin_command(&server, "drain pool/f").await;
    assert_eq!(reply, Ok("pool/f: drained, 0 connections open\n".into()));
    let at = probes.load(Ordering::SeqCst);
    let (mut seen_up, mut seen_down) = (false, false);
    wait_until(DEADLINE, "ten more probes while drained", || {
        assert_eq!(f.state(), State::Drained, "a probe never overrides drain");
        match f.health() {
            Health::Up => seen_up = true,
            Health::Down => seen_down = true,
        }
        let done = probes.load(Ordering::SeqCst) >= at + 10 && seen_up && seen_down;
        async move { done }
    })
    .await;

    // Disable: probes pause, the state stays disabled.
    let reply = admin_command(&server, "disable pool/f").await.unwrap();
    assert!(reply.starts_with("pool/f: disabled"), "{reply}");
    // A probe already in flight may still land.
    let at = probes.load(Ordering::SeqCst) + 1;
    let window = Instant::now() + interval * 20;
    while Instant::now() < window {
        assert_eq!(f.state(), State::Disabled);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        probes.load(Ordering::SeqCst) <= at,
        "no probes while disabled: {} after {}",
        probes.load(Ordering::SeqCst),
        at
    );

    // Enable: the state follows health again, probes resume.
    let reply = admin_command(&server, "enable pool/f").await.unwrap();
    assert!(reply.starts_with("pool/f: enabled, now "), "{reply}");
    let at = probes.load(Ordering::SeqCst);
    wait_until(DEADLINE, "probes to resume", || {
        let state = f.state();
        assert!(matches!(state, State::Up | State::Down), "{state}");
        let resumed = probes.load(Ordering::SeqCst) >= at + 4;
        async move { resumed }
    })
    .await;
}

async fn admin_command(server: &weir::server::Server, line: &str) -> Result<String, String> {
    let request = weir::admin::parse(line).map_err(|e| e.to_string())?;
    weir::admin::execute(request, &server.handle)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn tcp_probe_reasons_read_like_an_operator_would_write_them() {
    let timeout = Duration::from_millis(200);
    let refused = refused_addr().await;
    assert_eq!(
        probe(
            refused,
            &health_check(timeout, timeout, 1, 1),
            Protocol::Tcp
        )
        .await,
        Err("connection refused".into())
    );

    let (silent, _) = scripted_server(|_| None).await;
    assert_eq!(
        probe(
            silent,
            &send_expect("INFO replication\r\n", "role:master", timeout),
            Protocol::Tcp
        )
        .await,
        Err("timed out after 200ms waiting for a reply containing \"role:master\"".into())
    );

    let (replica, _) = scripted_server(|_| Some(b"$30\r\n# Replication\r\nrole:slave\r\n")).await;
    assert_eq!(
        probe(
            replica,
            &send_expect("INFO replication\r\n", "role:master", timeout),
            Protocol::Tcp
        )
        .await,
        Err("reply did not contain \"role:master\"".into())
    );

    let (primary, _) = scripted_server(|_| Some(b"$31\r\n# Replication\r\nrole:master\r\n")).await;
    assert_eq!(
        probe(
            primary,
            &send_expect("INFO replication\r\n", "role:master", timeout),
            Protocol::Tcp
        )
        .await,
        Ok(())
    );

    // Answers and keeps the connection open, as Redis does.
    let holder = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let held = holder.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = holder.accept().await {
            tokio::spawn(async move {
                let _ = stream
                    .write_all(b"$29\r\n# Replication\r\nrole:slave\r\n")
                    .await;
                let mut sink = [0u8; 64];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    assert_eq!(
        probe(
            held,
            &send_expect("INFO replication\r\n", "role:master", timeout),
            Protocol::Tcp
        )
        .await,
        Err("reply did not contain \"role:master\" within 200ms".into())
    );

    let (closer, _) = scripted_server(|_| Some(b"")).await;
    assert_eq!(
        probe(
            closer,
            &send_expect("GET /primary HTTP/1.0\r\n\r\n", "200 OK", timeout),
            Protocol::Tcp
        )
        .await,
        Err("connection closed without a reply (expected \"200 OK\")".into())
    );

    // `port`: the probe goes to another port of the backend's host.
    let (side, _) = scripted_server(|_| Some(b"HTTP/1.1 200 OK\r\n\r\n")).await;
    let config = HealthCheckConfig {
        port: Some(side.port()),
        ..send_expect("GET /primary HTTP/1.0\r\n\r\n", "200 OK", timeout)
    };
    let target = weir::health::probe_addr(refused, &config);
    assert_eq!(target, side);
    assert_eq!(probe(target, &config, Protocol::Tcp).await, Ok(()));
}

/// A UDP server that answers every datagram with `reply`.
async fn udp_server(reply: &'static [u8]) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(reply, from).await;
        }
    });
    addr
}

#[tokio::test]
async fn udp_probe_sends_one_datagram_and_checks_the_reply() {
    let timeout = Duration::from_millis(200);
    let dns_like = udp_server(b"\x12\x34\x81\x80answer").await;
    let config = HealthCheckConfig {
        send: Some(b"\x12\x34\x01\x00query".to_vec()),
        expect: Some(b"\x81\x80".to_vec()),
        ..health_check(timeout, timeout, 1, 1)
    };
    assert_eq!(probe(dns_like, &config, Protocol::Udp).await, Ok(()));

    let wrong = udp_server(b"nope").await;
    assert_eq!(
        probe(wrong, &config, Protocol::Udp).await,
        Err(r#"reply did not contain "\x81\x80""#.into())
    );

    // No expect: any reply passes.
    let any = HealthCheckConfig {
        expect: None,
        ..config.clone()
    };
    assert_eq!(probe(wrong, &any, Protocol::Udp).await, Ok(()));

    // Nobody listening: the ICMP port-unreachable comes back as a refusal.
    let closed = {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.local_addr().unwrap()
    };
    assert_eq!(
        probe(closed, &config, Protocol::Udp).await,
        Err("connection refused".into())
    );

    // Bound but silent: the timeout.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(
        probe(silent.local_addr().unwrap(), &any, Protocol::Udp).await,
        Err("timed out after 200ms waiting for a reply".into())
    );
}

/// `enable` after `disable`: health measured before the maintenance is not trusted. The
/// backend shows `down` at once and a probe runs at once (the interval here is a minute,
/// so only that immediate probe can bring it back).
#[tokio::test]
async fn enable_after_disable_is_down_until_a_fresh_probe_passes() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let mut config = tcp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("a", a.addr, 1),
            backend_config("b", b.addr, 1),
        ],
    );
    config.pools[0].health_check = Some(health_check(
        Duration::from_secs(60),
        Duration::from_millis(500),
        2,
        3,
    ));
    let (server, front) = start(config).await;
    assert_eq!(state(&server, "pool", "a"), State::Up);

    // Maintenance on a: disabled, and it dies meanwhile.
    admin_command(&server, "disable pool/a").await.unwrap();
    a.stop();
    let reply = admin_command(&server, "enable pool/a").await.unwrap();
    assert!(
        reply.contains("down until a health check passes"),
        "{reply}"
    );
    assert_eq!(
        state(&server, "pool", "a"),
        State::Down,
        "not trusted on health from before the maintenance"
    );
    // Every client goes to b; the immediate probe of the dead a keeps it down.
    for _ in 0..10 {
        let (_c, name) = connect_named(front).await;
        assert_eq!(name, "b");
    }
    let a_back = TestBackend::restart("a", a.addr).await;

    // A healthy backend disabled and enabled again is back after one probe, long
    // before the minute-long interval.
    admin_command(&server, "disable pool/b").await.unwrap();
    admin_command(&server, "enable pool/b").await.unwrap();
    assert_eq!(state(&server, "pool", "b"), State::Down);
    let took = wait_for_state(&server, "pool", "b", State::Up, Duration::from_secs(2)).await;
    eprintln!("b back after one probe, {took:?} after enable");
    drop(a_back);
}

/// Without a health check, a backend whose connects keep failing is marked down after
/// 3 in a row, so clients stop paying a failed connect each; traffic tries it again
/// after a backoff, and the first connect that succeeds brings it back.
#[tokio::test]
async fn without_a_health_check_a_dead_backend_is_marked_down_and_retried() {
    let dead = refused_addr().await;
    let b = TestBackend::start("b").await;
    let mut config = tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("x", dead, 1), backend_config("b", b.addr, 1)],
    );
    config.pools[0].retries = 1;
    let (server, front) = start(config).await;
    let x = server.backend("pool", "x").unwrap();
    // Every client is served (the failed connect is retried on b) until x is down.
    for i in 0..8 {
        let (_c, name) = connect_named(front).await;
        assert_eq!(name, "b", "client {i}");
    }
    assert_eq!(x.state(), State::Down, "marked down by failed connects");
    let errors = x.metrics_connect_errors();
    assert_eq!(errors, 3, "3 failed connects mark it down; none after");
    for _ in 0..8 {
        connect_named(front).await;
    }
    assert_eq!(
        x.metrics_connect_errors(),
        3,
        "no connect to x while it is down"
    );

    // It comes back: the port answers again, and after the backoff (1 s) traffic
    // tries it and finds it up.
    let x_back = TestBackend::restart("x", dead).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_c, name) = connect_named(front).await;
        if name == "x" {
            break;
        }
        assert!(Instant::now() < deadline, "x never tried again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        x.state(),
        State::Up,
        "a connect that succeeded brings it back"
    );
    drop(x_back);
}
