//! Real Redis behind weir: plain SET/GET through the proxy; and a `role:master` check
//! that sends writes to the primary only, following a failover (replica promoted, old
//! primary demoted) by itself.
//!
//! Needs `redis-server`; skipped when it is missing unless WEIR_REQUIRE_EXTERNAL=1.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir::backend::State;
use weir::balance::Strategy;
use weir::config::HealthCheckConfig;

/// A `redis-server` on a free loopback port, killed on drop.
struct Redis {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Redis {
    async fn start() -> Redis {
        // A free port can be taken between our probe and redis binding it: try again.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = TempDir::new("redis");
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                // Replicas sync at once instead of waiting for more replicas to join.
                .args(["--repl-diskless-sync-delay", "0"])
                .arg("--dir")
                .arg(&dir.path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let end = tokio::time::Instant::now() + DEADLINE;
            while tokio::time::Instant::now() < end {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: the port was taken
                }
                if let Ok(reply) = redis(addr, &["PING"]).await
                    && reply == "+PONG"
                {
                    return Redis {
                        child,
                        addr,
                        _dir: dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start");
    }

    async fn command(&self, args: &[&str]) -> String {
        redis(self.addr, args)
            .await
            .unwrap_or_else(|e| panic!("redis {} {args:?}: {e}", self.addr))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One command as RESP over a fresh connection; returns the reply's first line, or
/// for a bulk string its contents.
async fn redis(addr: SocketAddr, args: &[&str]) -> std::io::Result<String> {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("closed after {:?}", String::from_utf8_lossy(&reply)),
                ));
            }
            reply.extend_from_slice(&chunk[..n]);
            if let Some(done) = parse_reply(&reply) {
                return Ok(done);
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))?
}

fn parse_reply(reply: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(reply);
    let (first, rest) = text.split_once("\r\n")?;
    if let Some(len) = first.strip_prefix('$') {
        let len: i64 = len.parse().ok()?;
        if len < 0 {
            return Some("(nil)".into());
        }
        let len = len as usize;
        return (rest.len() >= len + 2).then(|| rest[..len].to_string());
    }
    Some(first.to_string())
}

#[tokio::test]
async fn set_then_get_through_weir() {
    if !require_program("redis-server") {
        return;
    }
    let redis_server = Redis::start().await;
    let (_server, front) = start(tcp_config(
        Strategy::RoundRobin,
        vec![backend_config("r", redis_server.addr, 1)],
    ))
    .await;
    assert_eq!(
        redis(front, &["SET", "weir:key", "through the proxy"])
            .await
            .unwrap(),
        "+OK"
    );
    assert_eq!(
        redis(front, &["GET", "weir:key"]).await.unwrap(),
        "through the proxy"
    );
    // And straight from the server: the write really landed there.
    assert_eq!(
        redis_server.command(&["GET", "weir:key"]).await,
        "through the proxy"
    );
}

#[tokio::test]
async fn writes_follow_the_primary_through_a_failover() {
    if !require_program("redis-server") {
        return;
    }
    let r1 = Redis::start().await;
    let r2 = Redis::start().await;
    let port1 = r1.addr.port().to_string();
    assert_eq!(r2.command(&["REPLICAOF", "127.0.0.1", &port1]).await, "+OK");

    let mut config = tcp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("r1", r1.addr, 1),
            backend_config("r2", r2.addr, 1),
        ],
    );
    config.pools[0].health_check = Some(HealthCheckConfig {
        send: Some(b"INFO replication\r\n".to_vec()),
        expect: Some(b"role:master".to_vec()),
        ..health_check(Duration::from_millis(100), Duration::from_millis(500), 2, 2)
    });
    let (server, front) = start(config).await;
    assert_eq!(state(&server, "pool", "r1"), State::Up, "the primary is up");
    assert_eq!(
        state(&server, "pool", "r2"),
        State::Down,
        "the replica is not"
    );
    assert_eq!(
        server.backend("pool", "r2").unwrap().last_check().as_str(),
        "fail: reply did not contain \"role:master\" within 500ms"
    );

    for i in 0..20 {
        let reply = redis(front, &["SET", "key", &format!("before-{i}")])
            .await
            .unwrap();
        assert_eq!(reply, "+OK", "write {i} through weir");
    }
    // The replica follows (and refuses writes itself).
    wait_until(DEADLINE, "the replica to catch up", || async {
        redis(r2.addr, &["GET", "key"]).await.ok().as_deref() == Some("before-19")
    })
    .await;
    assert!(
        r2.command(&["SET", "key", "x"])
            .await
            .starts_with("-READONLY")
    );

    // Failover: promote r2, demote r1.
    assert_eq!(r2.command(&["REPLICAOF", "NO", "ONE"]).await, "+OK");
    let port2 = r2.addr.port().to_string();
    assert_eq!(r1.command(&["REPLICAOF", "127.0.0.1", &port2]).await, "+OK");

    wait_for_state(&server, "pool", "r2", State::Up, DEADLINE).await;
    wait_for_state(&server, "pool", "r1", State::Down, DEADLINE).await;

    for i in 0..20 {
        let reply = redis(front, &["SET", "key", &format!("after-{i}")])
            .await
            .unwrap();
        assert_eq!(reply, "+OK", "write {i} through weir after the failover");
    }
    assert_eq!(redis(front, &["GET", "key"]).await.unwrap(), "after-19");
    assert_eq!(
        r2.command(&["GET", "key"]).await,
        "after-19",
        "written on the new primary"
    );
}
