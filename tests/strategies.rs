//! The four strategies through real sockets: what a client connecting through weir sees.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use common::*;
use tokio::net::TcpSocket;
use weir::balance::Strategy;

async fn backends(weights: &[(&str, u32)]) -> (Vec<TestBackend>, Vec<weir::config::BackendConfig>) {
    let mut servers = Vec::new();
    let mut configs = Vec::new();
    for (name, weight) in weights {
        let server = TestBackend::start(name).await;
        configs.push(backend_config(name, server.addr, *weight));
        servers.push(server);
    }
    (servers, configs)
}

/// Connects from `source` (any 127/8 address works on loopback) and returns the backend name.
async fn connect_from(front: SocketAddr, source: IpAddr) -> String {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut stream = socket.connect(front).await.unwrap();
    read_line(&mut stream).await
}

async fn spread(front: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let (_stream, name) = connect_named(front).await;
        *counts.entry(name).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn round_robin_600_connections_with_weights_1_2_3_are_exactly_100_200_300() {
    let (_servers, configs) = backends(&[("a", 1), ("b", 2), ("c", 3)]).await;
    let (_server, front) = start(tcp_config(Strategy::RoundRobin, configs)).await;
    let counts = spread(front, 600).await;
    assert_eq!(counts["a"], 100);
    assert_eq!(counts["b"], 200);
    assert_eq!(counts["c"], 300);
}

#[tokio::test]
async fn least_connections_sends_each_connection_to_the_least_loaded() {
    let (_servers, configs) = backends(&[("a", 1), ("b", 1)]).await;
    let (server, front) = start(tcp_config(Strategy::LeastConnections, configs)).await;
    // Held open: each new connection goes to the backend with fewer.
    let mut held: Vec<(tokio::net::TcpStream, String)> = Vec::new();
    for _ in 0..10 {
        held.push(connect_named(front).await);
    }
    let on_a = held.iter().filter(|(_, n)| n == "a").count();
    assert_eq!(on_a, 5, "10 held connections split 5/5");
    // Close three on a: the next three all go to a.
    let mut closed = 0;
    held.retain(|(_, name)| {
        if name == "a" && closed < 3 {
            closed += 1;
            false
        } else {
            true
        }
    });
    let a = server.backend("pool", "a").unwrap();
    wait_until(DEADLINE, "a's connections to close", || {
        let a = a.clone();
        async move { a.active() == 2 }
    })
    .await;
    for _ in 0..3 {
        let (stream, name) = connect_named(front).await;
        assert_eq!(name, "a");
        held.push((stream, name));
    }
}

#[tokio::test]
async fn weighted_random_follows_the_weights() {
    let (_servers, configs) = backends(&[("a", 1), ("b", 3)]).await;
    let (_server, front) = start(tcp_config(Strategy::WeightedRandom, configs)).await;
    let n = 2000;
    let counts = spread(front, n).await;
    // b expects 1500; one standard deviation is sqrt(2000 * 0.75 * 0.25) ≈ 19.4: ±5σ.
    let b = counts.get("b").copied().unwrap_or(0) as i64;
    assert!((b - 1500).abs() < 97, "b got {b} of {n}: {counts:?}");
}

#[tokio::test]
async fn source_hash_sticks_and_two_instances_agree_whatever_the_file_order() {
    let (_servers, configs) = backends(&[("a", 1), ("b", 1), ("c", 1)]).await;
    let mut reversed = configs.clone();
    reversed.reverse();
    let (_one, front_one) = start(tcp_config(Strategy::SourceHash, configs)).await;
    let (_two, front_two) = start(tcp_config(Strategy::SourceHash, reversed)).await;

    let mut used = BTreeMap::new();
    for i in 0..40u8 {
        let client = IpAddr::from([127, 0, 1, 10 + i]);
        let first = connect_from(front_one, client).await;
        assert_eq!(
            connect_from(front_one, client).await,
            first,
            "{client} sticks"
        );
        assert_eq!(
            connect_from(front_two, client).await,
            first,
            "{client}: the other instance agrees"
        );
        *used.entry(first).or_insert(0) += 1;
    }
    assert_eq!(
        used.len(),
        3,
        "40 clients spread over all three backends: {used:?}"
    );
}
