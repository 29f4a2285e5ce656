//! The TCP data path over real sockets: splicing, half-close, resets, failover, limits,
//! graceful shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weir::backend::{Admin, State};
use weir::balance::Strategy;
use weir::config::OnDown;

/// A backend that reads until EOF, then answers with `answer_len` bytes derived from what it got.
async fn answer_after_eof_backend(answer_len: usize) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                stream.read_to_end(&mut got).await.unwrap();
                let seed = xxhash_rust::xxh3::xxh3_64(&got);
                let answer = pseudo_random(answer_len, seed);
                stream.write_all(&answer).await.unwrap();
                stream.shutdown().await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test]
async fn half_close_client_sends_then_backend_answers_after_eof() {
    let backend = answer_after_eof_backend(256 * 1024).await;
    let (_server, front) = start(tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("b", backend, 1)],
    ))
    .await;

    let request = pseudo_random(1024 * 1024, 42);
    let mut client = TcpStream::connect(front).await.unwrap();
    client.write_all(&request).await.unwrap();
    client.shutdown().await.unwrap(); // half-close: we still read

    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, client.read_to_end(&mut answer))
        .await
        .expect("answer in time")
        .unwrap();
    let expected = pseudo_random(256 * 1024, xxhash_rust::xxh3::xxh3_64(&request));
    assert_eq!(
        answer.len(),
        expected.len(),
        "the whole answer arrives after our EOF"
    );
    assert!(answer == expected, "answer bytes differ");
}

#[tokio::test]
async fn sixty_four_mib_each_way_arrive_intact() {
    let backend = TestBackend::start("echo").await;
    let (_server, front) = start(tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("echo", backend.addr, 1)],
    ))
    .await;

    let (stream, name) = connect_named(front).await;
    assert_eq!(name, "echo");
    let payload = pseudo_random(64 * 1024 * 1024, 7);
    let sent_sum = xxhash_rust::xxh3::xxh3_64(&payload);
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut echoed = Vec::with_capacity(64 * 1024 * 1024);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut echoed))
        .await
        .expect("64 MiB echoed in time")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), 64 * 1024 * 1024);
    assert_eq!(
        xxhash_rust::xxh3::xxh3_64(&echoed),
        sent_sum,
        "checksums equal"
    );
}

#[tokio::test]
async fn backend_reset_mid_stream_ends_client_connection_promptly() {
    // A backend that reads a little, then resets (SO_LINGER 0 + close).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4];
                if stream.read_exact(&mut buf).await.is_err() {
                    return;
                }
                if &buf == b"ping" {
                    stream.write_all(b"pong").await.unwrap();
                    return; // keep a normal close for the healthy probe
                }
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(stream);
            });
        }
    });
    let (_server, front) = start(tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("r", addr, 1)],
    ))
    .await;

    let mut client = TcpStream::connect(front).await.unwrap();
    client.write_all(b"boom").await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let result = tokio::time::timeout(Duration::from_secs(1), client.read(&mut buf))
        .await
        .expect("client connection ends within a second");
    match result {
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "reset passed on"
        ),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
    assert!(started.elapsed() < Duration::from_secs(1));

    // weir serves the next connection.
    let mut next = TcpStream::connect(front).await.unwrap();
    next.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    tokio::time::timeout(DEADLINE, next.read_exact(&mut pong))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&pong, b"pong");
}

#[tokio::test]
async fn client_reset_resets_backend_side() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (got_bytes, bytes_arrived) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 64];
        let mut result = Ok(0);
        let mut got_bytes = Some(got_bytes);
        // Read until the connection ends one way or another.
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    result = Ok(n);
                    if let Some(tx) = got_bytes.take() {
                        let _ = tx.send(());
                    }
                }
                Err(e) => {
                    result = Err(e.kind());
                    break;
                }
            }
        }
        let _ = tx.send(result);
    });
    let (_server, front) = start(tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("b", addr, 1)],
    ))
    .await;
    let mut client = TcpStream::connect(front).await.unwrap();
    client.write_all(b"hello").await.unwrap();
    // The bytes reach the backend before the reset.
    tokio::time::timeout(DEADLINE, bytes_arrived)
        .await
        .expect("the backend reads the client's bytes")
        .unwrap();
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    let outcome = tokio::time::timeout(Duration::from_secs(1), rx)
        .await
        .expect("backend side ends within a second")
        .unwrap();
    assert_eq!(outcome, Err(std::io::ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn refused_backend_is_skipped_and_connection_succeeds_through_another() {
    // A port that refuses: bind, take the address, close.
    let refused = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let good = TestBackend::start("good").await;
    let (server, front) = start(tcp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("dead", refused, 1),
            backend_config("good", good.addr, 1),
        ],
    ))
    .await;
    for _ in 0..10 {
        let (_stream, name) = connect_named(front).await;
        assert_eq!(name, "good");
    }
    let dead = server.backend("pool", "dead").unwrap();
    assert!(dead.metrics_connect_errors() >= 1);
}

#[tokio::test]
async fn no_backend_left_closes_client_at_once() {
    let refused = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (_server, front) = start(tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("dead", refused, 1)],
    ))
    .await;
    let mut client = TcpStream::connect(front).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without data");
}

#[tokio::test]
async fn max_connections_rejects_at_once_and_keeps_serving() {
    let backend = TestBackend::start("b").await;
    let mut config = tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("b", backend.addr, 1)],
    );
    config.listeners[0].max_connections = Some(2);
    let (server, front) = start(config).await;

    let (_a, _) = connect_named(front).await;
    let (b, _) = connect_named(front).await;
    // The third is accepted and closed at once.
    let mut third = TcpStream::connect(front).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
        .await
        .expect("closed at once, not left waiting")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let listener = server.handle.tables().listeners["front"].clone();
    assert_eq!(listener.active(), 2);

    // Closing one frees a slot.
    drop(b);
    wait_until(DEADLINE, "a free slot", || {
        let l = listener.clone();
        async move { l.active() < 2 }
    })
    .await;
    let (_c, name) = connect_named(front).await;
    assert_eq!(name, "b");
}

#[tokio::test]
async fn idle_timeout_closes_both_sides() {
    let backend = TestBackend::start("b").await;
    let mut config = tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("b", backend.addr, 1)],
    );
    config.listeners[0].idle_timeout = Duration::from_millis(300);
    let (_server, front) = start(config).await;
    let (mut stream, _) = connect_named(front).await;
    let started = Instant::now();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
        .await
        .expect("closed by idle timeout")
        .unwrap();
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the idle timeout"
    );
}

#[tokio::test]
async fn graceful_stop_lets_open_connection_finish_and_refuses_new_ones() {
    let backend = TestBackend::start("b").await;
    let (server, front) = start(tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("b", backend.addr, 1)],
    ))
    .await;
    let (mut open, _) = connect_named(front).await;

    let stopping = tokio::spawn(async move {
        let left = server.stop().await;
        (left, server)
    });
    // New connections are refused once accepting stopped.
    wait_until(DEADLINE, "the listener to close", || async move {
        TcpStream::connect(front).await.is_err()
    })
    .await;

    // The open connection still works.
    open.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    tokio::time::timeout(DEADLINE, open.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"still here");
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, open.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    drop(open);
    let (left, _server) = tokio::time::timeout(DEADLINE, stopping)
        .await
        .expect("stop completes")
        .unwrap();
    assert_eq!(left, 0, "nothing was cut by the grace period");
}

#[tokio::test]
async fn ipv6_listener_and_backend() {
    let Ok(v6) = TcpListener::bind("[::1]:0").await else {
        eprintln!("SKIPPED: no IPv6 loopback on this machine");
        return;
    };
    let addr = v6.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = v6.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"v6\n").await;
            });
        }
    });
    let mut config = tcp_config(Strategy::RoundRobin, vec![backend_config("v6", addr, 1)]);
    config.listeners[0].bind = "[::1]:0".parse().unwrap();
    let (_server, front) = start(config).await;
    assert!(front.is_ipv6());
    let (_s, name) = connect_named(front).await;
    assert_eq!(name, "v6");
}

/// Half-close: the client sends a request and shuts down writing; the backend answers with
/// `chunks` small writes `every` apart, then closes. Returns the listener's address.
async fn trickling_backend(chunks: usize, every: Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                stream.read_to_end(&mut request).await.unwrap();
                let mut tick = tokio::time::interval(every);
                for i in 0..chunks {
                    tick.tick().await;
                    if stream.write_all(&[i as u8; 100]).await.is_err() {
                        return;
                    }
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_half_closed_connection_stays_open_while_the_other_side_keeps_sending() {
    // 16 chunks 100 ms apart: 1.5 s of answer, five times half_close_timeout.
    let backend = trickling_backend(16, Duration::from_millis(100)).await;
    let mut config = tcp_config(Strategy::RoundRobin, vec![backend_config("b", backend, 1)]);
    config.listeners[0].half_close_timeout = Duration::from_millis(300);
    let (_server, front) = start(config).await;

    let mut client = TcpStream::connect(front).await.unwrap();
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, client.read_to_end(&mut answer))
        .await
        .expect("the answer ends in time")
        .expect("a clean end, not a reset");
    let expected: Vec<u8> = (0..16u8).flat_map(|i| [i; 100]).collect();
    assert_eq!(answer.len(), expected.len(), "the whole answer arrives");
    assert!(answer == expected);
}

#[tokio::test]
async fn a_half_closed_connection_with_nothing_sent_ends_after_half_close_timeout() {
    // The backend reads the request to its EOF, then sends nothing and keeps the socket.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (got_tx, got) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await.unwrap();
        let _ = got_tx.send((request, stream));
    });
    let mut config = tcp_config(Strategy::RoundRobin, vec![backend_config("b", addr, 1)]);
    config.listeners[0].half_close_timeout = Duration::from_millis(300);
    let (_server, front) = start(config).await;

    let mut client = TcpStream::connect(front).await.unwrap();
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(DEADLINE, client.read_to_end(&mut rest))
        .await
        .expect("closed by half_close_timeout")
        .expect("a clean close");
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before half_close_timeout: {:?}",
        started.elapsed()
    );
    let (request, mut backend) = tokio::time::timeout(DEADLINE, got).await.unwrap().unwrap();
    assert_eq!(request, b"request");
    // weir closed its backend socket too: a byte sent to it is answered with a reset.
    let _ = backend.write_all(b"late").await;
    tokio::time::timeout(DEADLINE, backend.ready(tokio::io::Interest::ERROR))
        .await
        .expect("weir's backend socket is closed")
        .unwrap();
}

/// Writes to `stream` until a write makes no progress for 200 ms: everything between it
/// and a peer that doesn't read is full (its buffers, weir's pipe and buffers). Returns
/// the bytes written.
async fn write_until_stalled(stream: &mut TcpStream) -> usize {
    let chunk = vec![0x5a; 64 * 1024];
    let mut written = 0;
    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_millis(200), stream.write(&chunk)).await {
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => panic!("write failed after {written} bytes: {e}"),
            Err(_) => return written,
        }
        assert!(
            started.elapsed() < DEADLINE,
            "still writing after {DEADLINE:?}"
        );
    }
}

/// Reads until EOF or an error; returns the bytes read and how it ended.
async fn read_until_end(stream: &mut TcpStream) -> (usize, Result<(), std::io::ErrorKind>) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut read = 0;
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buf))
            .await
            .expect("the stream ends in time")
        {
            Ok(0) => return (read, Ok(())),
            Ok(n) => read += n,
            Err(e) => return (read, Err(e.kind())),
        }
    }
}

/// A backend that accepts one connection, never reads, and hands it over.
async fn idle_backend() -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Receiver<TcpStream>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let _ = tx.send(stream);
    });
    (addr, rx)
}

#[tokio::test]
async fn bytes_cut_off_by_the_idle_timeout_end_in_a_reset_not_a_clean_eof() {
    // Client → backend: the backend doesn't read, so weir still holds bytes for it when
    // the idle timeout fires.
    let (addr, accepted) = idle_backend().await;
    let mut config = tcp_config(Strategy::RoundRobin, vec![backend_config("b", addr, 1)]);
    config.listeners[0].idle_timeout = Duration::from_millis(500);
    let (_server, front) = start(config).await;
    let mut client = TcpStream::connect(front).await.unwrap();
    let mut backend = tokio::time::timeout(DEADLINE, accepted)
        .await
        .unwrap()
        .unwrap();
    let sent = write_until_stalled(&mut client).await;
    // weir closing the client socket with bytes unread in it resets the client: the sign
    // that the idle timeout fired.
    tokio::time::timeout(DEADLINE, client.ready(tokio::io::Interest::ERROR))
        .await
        .expect("the idle timeout ends the connection")
        .unwrap();
    let (got, end) = read_until_end(&mut backend).await;
    assert!(got < sent, "weir held bytes back: got {got} of {sent}");
    assert_eq!(
        end,
        Err(std::io::ErrorKind::ConnectionReset),
        "a stream cut short ends in a reset (got {got} of {sent} bytes)"
    );

    // Backend → client: the same the other way.
    let (addr, accepted) = idle_backend().await;
    let mut config = tcp_config(Strategy::RoundRobin, vec![backend_config("b", addr, 1)]);
    config.listeners[0].idle_timeout = Duration::from_millis(500);
    let (_server, front) = start(config).await;
    let mut client = TcpStream::connect(front).await.unwrap();
    let mut backend = tokio::time::timeout(DEADLINE, accepted)
        .await
        .unwrap()
        .unwrap();
    let sent = write_until_stalled(&mut backend).await;
    tokio::time::timeout(DEADLINE, backend.ready(tokio::io::Interest::ERROR))
        .await
        .expect("the idle timeout ends the connection")
        .unwrap();
    let (got, end) = read_until_end(&mut client).await;
    assert!(got < sent, "weir held bytes back: got {got} of {sent}");
    assert_eq!(
        end,
        Err(std::io::ErrorKind::ConnectionReset),
        "a stream cut short ends in a reset (got {got} of {sent} bytes)"
    );
}

/// Resets `stream`: SO_LINGER 0, then close.
fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

/// Waits up to a second for `stream` to be reset by its peer (without reading: what it
/// holds stays unread), then reads it to its end, which must be the reset.
async fn assert_reset_within_a_second(mut stream: TcpStream, what: &str) {
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(1),
        stream.ready(tokio::io::Interest::ERROR),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: no reset within a second"))
    .unwrap();
    let (_, end) = read_until_end(&mut stream).await;
    assert_eq!(
        end,
        Err(std::io::ErrorKind::ConnectionReset),
        "{what}: reset after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_client_reset_reaches_a_backend_that_is_not_reading() {
    let (addr, accepted) = idle_backend().await;
    let (_server, front) = start(tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("b", addr, 1)],
    ))
    .await;
    let mut client = TcpStream::connect(front).await.unwrap();
    let backend = tokio::time::timeout(DEADLINE, accepted)
        .await
        .unwrap()
        .unwrap();
    // weir's write to the backend blocks: its pump waits on the backend, not the client.
    write_until_stalled(&mut client).await;
    reset(client);
    assert_reset_within_a_second(backend, "backend").await;
}

#[tokio::test]
async fn a_backend_reset_reaches_a_client_that_is_not_reading() {
    let (addr, accepted) = idle_backend().await;
    let (_server, front) = start(tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("b", addr, 1)],
    ))
    .await;
    let client = TcpStream::connect(front).await.unwrap();
    let mut backend = tokio::time::timeout(DEADLINE, accepted)
        .await
        .unwrap()
        .unwrap();
    write_until_stalled(&mut backend).await;
    reset(backend);
    assert_reset_within_a_second(client, "client").await;
}

#[tokio::test]
async fn a_reset_after_a_half_close_is_passed_on() {
    // The client finishes sending, then resets while the backend is still to answer.
    let (addr, accepted) = idle_backend().await;
    let (_server, front) = start(tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("b", addr, 1)],
    ))
    .await;
    let mut client = TcpStream::connect(front).await.unwrap();
    let mut backend = tokio::time::timeout(DEADLINE, accepted)
        .await
        .unwrap()
        .unwrap();
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let mut request = [0u8; 7];
    backend.read_exact(&mut request).await.unwrap();
    let mut eof = [0u8; 1];
    assert_eq!(
        backend.read(&mut eof).await.unwrap(),
        0,
        "the EOF passed on"
    );
    reset(client);
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(1),
        backend.ready(tokio::io::Interest::ERROR),
    )
    .await
    .expect("the reset passed on within a second")
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));

    // The backend finishes sending, then resets while the client is still to send.
    let (addr, accepted) = idle_backend().await;
    let (_server, front) = start(tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("b", addr, 1)],
    ))
    .await;
    let mut client = TcpStream::connect(front).await.unwrap();
    let mut backend = tokio::time::timeout(DEADLINE, accepted)
        .await
        .unwrap()
        .unwrap();
    backend.write_all(b"greeting").await.unwrap();
    backend.shutdown().await.unwrap();
    let mut greeting = Vec::new();
    client.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"greeting");
    reset(backend);
    tokio::time::timeout(
        Duration::from_secs(1),
        client.ready(tokio::io::Interest::ERROR),
    )
    .await
    .expect("the reset passed on within a second")
    .unwrap();
}

/// `weir_backend_closed_on_down_total` of `pool/backend`, from this process's recorder.
fn closed_on_down(pool: &str, backend: &str) -> f64 {
    let text = weir::metrics::recorder().expect("weir's recorder").render();
    let series =
        format!("weir_backend_closed_on_down_total{{pool=\"{pool}\",backend=\"{backend}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// A pool `pool` with `on_down` and a fast health check on a port of its own (the
/// returned listener: close it and the checks fail while the data port stays up), one
/// connection open through weir to its backend `name`, which is up.
async fn connection_to_a_checked_backend(
    pool: &str,
    on_down: OnDown,
) -> (
    weir::server::Server,
    TestBackend,
    std::net::TcpListener,
    TcpStream,
) {
    let backend = TestBackend::start(pool).await;
    let check_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = tcp_config(
        Strategy::RoundRobin,
        vec![backend_config(pool, backend.addr, 1)],
    );
    config.listeners[0].pool = pool.to_string();
    config.pools[0].name = pool.to_string();
    config.pools[0].on_down = on_down;
    let mut check = health_check(Duration::from_millis(100), Duration::from_millis(100), 1, 2);
    check.port = Some(check_port.local_addr().unwrap().port());
    config.pools[0].health_check = Some(check);
    let (server, front) = start(config).await;
    wait_for_state(&server, pool, pool, State::Up, DEADLINE).await;
    let (stream, name) = connect_named(front).await;
    assert_eq!(name, pool);
    (server, backend, check_port, stream)
}

/// The connection still carries bytes both ways.
async fn assert_open(stream: &mut TcpStream) {
    stream.write_all(b"still open").await.unwrap();
    let mut echoed = [0u8; 10];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut echoed))
        .await
        .expect("echoed in time")
        .expect("the connection is open");
    assert_eq!(&echoed, b"still open");
}

#[tokio::test]
async fn on_down_close_resets_the_connections_of_a_backend_marked_down() {
    let pool = "on_down_close";
    let (server, _backend, check_port, mut stream) =
        connection_to_a_checked_backend(pool, OnDown::Close).await;
    assert_open(&mut stream).await;
    drop(check_port);
    let started = Instant::now();
    // interval × fall + 1 s
    let within = Duration::from_millis(100 * 2) + Duration::from_secs(1);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(within, stream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no reset within {within:?}"));
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "reset after {:?}",
        started.elapsed()
    );
    assert_eq!(state(&server, pool, pool), State::Down);
    assert_eq!(closed_on_down(pool, pool), 1.0);
}

#[tokio::test]
async fn on_down_keep_leaves_the_connections_of_a_backend_marked_down_open() {
    let pool = "on_down_keep";
    let (server, _backend, check_port, mut stream) =
        connection_to_a_checked_backend(pool, OnDown::Keep).await;
    drop(check_port);
    wait_for_state(&server, pool, pool, State::Down, DEADLINE).await;
    assert_open(&mut stream).await;
    assert_eq!(closed_on_down(pool, pool), 0.0);
}

#[tokio::test]
async fn on_down_close_never_closes_a_drained_or_disabled_backend_s_connections() {
    for (pool, admin, shown) in [
        ("on_down_drain", Admin::Drain, State::Draining),
        ("on_down_disable", Admin::Disabled, State::Disabled),
    ] {
        let (server, _backend, _check_port, mut stream) =
            connection_to_a_checked_backend(pool, OnDown::Close).await;
        server.backend(pool, pool).unwrap().set_admin(admin);
        assert_eq!(state(&server, pool, pool), shown);
        // A few check rounds go by (they pass: the check port is still open).
        let checks = || async {
            let text = weir::metrics::recorder().unwrap().render();
            let series = format!(
                "weir_health_checks_total{{pool=\"{pool}\",backend=\"{pool}\",result=\"pass\"}} "
            );
            text.lines()
                .find_map(|line| line.strip_prefix(&series))
                .map_or(0.0, |v| v.parse::<f64>().unwrap())
        };
        let before = checks().await;
        if admin == Admin::Drain {
            wait_until(DEADLINE, "three more checks", || async {
                checks().await >= before + 3.0
            })
            .await;
        }
        assert_open(&mut stream).await;
        assert_eq!(closed_on_down(pool, pool), 0.0);
    }
}

#[tokio::test]
async fn a_reload_to_on_down_close_applies_to_open_connections() {
    let dir = TempDir::new("on-down-reload");
    let path = dir.join("weir.yaml");
    let backend = TestBackend::start("b").await;
    let check_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let file = |on_down: &str| {
        format!(
            "listeners:\n  front:\n    bind: 127.0.0.1:0\n    pool: on_down_reload\npools:\n  on_down_reload:\n    on_down: {on_down}\n    health_check:\n      interval: 100ms\n      timeout: 100ms\n      rise: 1\n      fall: 2\n      port: {}\n    backends:\n      - address: {}\n        name: b\n",
            check_port.local_addr().unwrap().port(),
            backend.addr
        )
    };
    std::fs::write(&path, file("keep")).unwrap();
    let config = weir::config::load(&path).unwrap();
    let server = weir::server::Server::start(config, Some(path.clone()))
        .await
        .unwrap();
    let front = server.listener_addr("front").unwrap();
    wait_for_state(&server, "on_down_reload", "b", State::Up, DEADLINE).await;
    let (mut stream, _) = connect_named(front).await;

    std::fs::write(&path, file("close")).unwrap();
    server.handle.reload().await.unwrap();
    drop(check_port);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_millis(1200), stream.read(&mut buf))
        .await
        .expect("reset once marked down");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    assert_eq!(closed_on_down("on_down_reload", "b"), 1.0);
}

/// A backend that greets with `b\n` and echoes, with a backlog for a burst of 300 (the
/// common test backend's 128 would drop SYNs of weir's connects, which then wait for
/// their retransmission).
fn roomy_backend() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1024).unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if stream.write_all(b"b\n").await.is_ok() {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_in_the_backlog_at_stop_are_served_not_reset() {
    let (backend, _serving) = roomy_backend();
    let mut config = tcp_config(Strategy::RoundRobin, vec![backend_config("b", backend, 1)]);
    config.shutdown_timeout = Duration::from_secs(15);
    let server = std::sync::Arc::new(weir::server::Server::start(config, None).await.unwrap());
    let front = server.listener_addr("front").unwrap();
    // Connections the kernel completes faster than weir accepts them: a burst from a
    // blocking thread, then the stop at once, while some still wait in the backlog.
    let connected = tokio::task::spawn_blocking(move || {
        (0..300)
            .map(|_| std::net::TcpStream::connect(front).expect("connect"))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let stopping = tokio::spawn({
        let server = std::sync::Arc::clone(&server);
        async move { server.stop().await }
    });
    wait_until(DEADLINE, "new connections refused", || async move {
        TcpStream::connect(front).await.is_err()
    })
    .await;
    // Every client whose connect succeeded is served to the end.
    for (served, stream) in connected.into_iter().enumerate() {
        stream.set_nonblocking(true).unwrap();
        let mut stream = TcpStream::from_std(stream).unwrap();
        let mut greeting = [0u8; 2];
        let read = tokio::time::timeout(DEADLINE, stream.read_exact(&mut greeting)).await;
        assert!(
            matches!(read, Ok(Ok(_))),
            "connection {served} was dropped at stop: {read:?}"
        );
        assert_eq!(&greeting, b"b\n");
        stream.write_all(b"bye\n").await.unwrap();
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"bye\n");
    }
    let left = tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("stop ends")
        .unwrap();
    assert_eq!(left, 0, "every connection finished within the grace period");
}
