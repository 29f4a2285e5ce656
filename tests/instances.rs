//! Instances that agree: two `weir run` processes with the same pool (listed in another
//! order), source-hash over five health-checked backends, and clients from 200 source
//! addresses. Every source must get the same backend from both — at start, while a backend
//! is down (only its sources move, to the same place on both), once it is back, and across
//! a restart of one instance. This is what lets several instances sit behind ECMP or a
//! cloud load balancer that may send a client's next connection to another of them.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use common::child::Weir as Instance;
use common::*;
use tokio::net::TcpSocket;

const SOURCES: usize = 200;
const BACKENDS: usize = 5;

/// Which backend each source address reached, by backend name.
type Mapping = BTreeMap<IpAddr, String>;

/// Source `i` of the 200: 127.0.1.1 … 127.0.1.200 (every 127/8 address is loopback).
fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + i as u8))
}

/// The backend name that answers a connection to `front` from `from`.
async fn backend_for(front: SocketAddr, from: IpAddr) -> String {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut stream = tokio::time::timeout(DEADLINE, socket.connect(front))
        .await
        .expect("connect in time")
        .expect("connect");
    read_line(&mut stream).await
}

async fn mapping(front: SocketAddr) -> Mapping {
    let mut map = Mapping::new();
    for i in 0..SOURCES {
        map.insert(source(i), backend_for(front, source(i)).await);
    }
    map
}

/// The config of one instance: its admin socket, the backends in the given order (each
/// named by its address as written, the same on both), a fast TCP health check.
fn config(dir: &TempDir, tag: &str, backends: &[SocketAddr]) -> (PathBuf, PathBuf) {
    let socket = dir.join(&format!("{tag}.sock"));
    let list: String = (backends.iter())
        .map(|b| format!("      - address: {b}\n"))
        .collect();
    let text = format!(
        "admin:\n  socket: {}\nlisteners:\n  front:\n    bind: 127.0.0.1:0\n    pool: p\n\
         pools:\n  p:\n    strategy: source-hash\n    health_check:\n      interval: 100ms\n      \
         timeout: 100ms\n      rise: 1\n      fall: 1\n    backends:\n{list}",
        socket.display()
    );
    let path = dir.join(&format!("{tag}.yaml"));
    std::fs::write(&path, text).unwrap();
    (path, socket)
}

fn changed(before: &Mapping, after: &Mapping) -> Vec<IpAddr> {
    (before.iter())
        .filter(|(ip, b)| after[*ip] != **b)
        .map(|(ip, _)| *ip)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_send_every_source_to_the_same_backend_through_failures_and_restarts() {
    let mut backends = Vec::new();
    for i in 0..BACKENDS {
        backends.push(TestBackend::start(&format!("b{i}")).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let dir = TempDir::new("instances");
    let (config_a, socket_a) = config(&dir, "a", &addrs);
    let reversed: Vec<SocketAddr> = addrs.iter().rev().copied().collect();
    let (config_b, socket_b) = config(&dir, "b", &reversed);
    let mut a = Instance::start(&config_a, &socket_a);
    let b = Instance::start(&config_b, &socket_b);
    a.wait_all_up().await;
    b.wait_all_up().await;

    let start = mapping(a.front).await;
    assert_eq!(
        start,
        mapping(b.front).await,
        "same backend from both at start"
    );
    let used: std::collections::BTreeSet<&String> = start.values().collect();
    assert_eq!(
        used.len(),
        BACKENDS,
        "200 sources spread over all five: {start:?}"
    );

    // b2 stops: both mark it down; only its sources move, and to the same place.
    let stopped = backends.remove(2);
    let stopped_addr = stopped.addr;
    stopped.stop();
    drop(stopped);
    let name = stopped_addr.to_string();
    a.wait_for(&name, "down").await;
    b.wait_for(&name, "down").await;
    let down = mapping(a.front).await;
    assert_eq!(
        down,
        mapping(b.front).await,
        "same backend from both with b2 down"
    );
    let moved = changed(&start, &down);
    let on_b2: Vec<IpAddr> = (start.iter())
        .filter(|(_, b)| **b == "b2")
        .map(|(ip, _)| *ip)
        .collect();
    assert!(!on_b2.is_empty());
    assert_eq!(
        moved, on_b2,
        "exactly the sources of the stopped backend moved"
    );

    // Back: they return to it, on both.
    let _b2 = TestBackend::restart("b2", stopped_addr).await;
    a.wait_for(&name, "up").await;
    b.wait_for(&name, "up").await;
    assert_eq!(
        mapping(a.front).await,
        start,
        "instance a: back as at start"
    );
    assert_eq!(
        mapping(b.front).await,
        start,
        "instance b: back as at start"
    );

    // One instance restarts: it sends every source where it did before.
    drop(a);
    a = Instance::start(&config_a, &socket_a);
    a.wait_all_up().await;
    assert_eq!(mapping(a.front).await, start, "a restarted instance agrees");
}
