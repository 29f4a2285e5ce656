//! UDP load balancing in front of real DNS servers: two unbound instances on free loopback
//! ports, each serving a small static zone that says which server answered
//! (`who.weir.test TXT "u1"` / `"u2"`). Needs `unbound` and `dig` (skipped without them,
//! unless WEIR_REQUIRE_EXTERNAL=1).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::unbound::Unbound;
use common::*;
use weir::backend::State;
use weir::balance::Strategy;
use weir::config::HealthCheckConfig;

const QTYPE_A: u16 = 1;
const QTYPE_TXT: u16 = 16;

/// The answer both servers give for `a.weir.test A`: RDLENGTH 4, 10.0.0.1.
const A_RDATA: [u8; 6] = [0, 4, 10, 0, 0, 1];

/// A DNS query (recursion desired) for `name`, as sent on the wire.
fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]); // flags: RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // class IN
    q
}

/// Checks a reply's header: the query's id, a response, NOERROR, at least one answer.
fn check_reply(reply: &[u8], id: u16) {
    assert!(reply.len() > 12, "a reply with a header: {reply:?}");
    assert_eq!(
        u16::from_be_bytes([reply[0], reply[1]]),
        id,
        "the query's id"
    );
    assert!(reply[2] & 0x80 != 0, "a response");
    assert_eq!(reply[3] & 0x0f, 0, "NOERROR");
    assert!(
        u16::from_be_bytes([reply[6], reply[7]]) >= 1,
        "at least one answer"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Which server a `who.weir.test TXT` reply came from: the TXT rdata is `\x02uN`.
fn who(reply: &[u8]) -> String {
    for n in 1..=2 {
        let rdata = [0, 3, 2, b'u', b'0' + n];
        if contains(reply, &rdata) {
            return format!("u{n}");
        }
    }
    panic!("no who.weir.test TXT answer in {reply:?}");
}

/// An unbound process serving zone `weir.test.` as server `name` (its TXT record for
/// `who.weir.test` says which); killed on drop.
async fn unbound(name: &str) -> Unbound {
    let who = format!("who.weir.test. TXT \"{name}\"");
    let data = ["a.weir.test. A 10.0.0.1", "b.weir.test. A 10.0.0.2", &who];
    let server = Unbound::start("weir.test.", &data).await;
    let addr = server.addr();
    wait_until(
        DEADLINE,
        &format!("unbound {name} to answer"),
        || async move {
            dig(addr, "who.weir.test", "TXT").await.as_deref() == Some(&format!("\"{name}\"")[..])
        },
    )
    .await;
    server
}

/// `dig @addr name type +short`: the first answer line, None when there is none.
async fn dig(addr: SocketAddr, name: &str, qtype: &str) -> Option<String> {
    let output = tokio::process::Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .arg("-p")
        .arg(addr.port().to_string())
        .args([name, qtype, "+short", "+tries=1", "+time=1"])
        .output()
        .await
        .expect("dig runs");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().next()?.trim().to_string();
    (output.status.success() && !line.is_empty() && !line.starts_with(";;")).then_some(line)
}

/// One query on `socket` (a session of its own), answered within the deadline.
async fn ask(
    socket: &tokio::net::UdpSocket,
    front: SocketAddr,
    id: u16,
    name: &str,
    qtype: u16,
) -> Vec<u8> {
    let (reply, from) = udp_exchange_from(socket, front, &dns_query(id, name, qtype)).await;
    assert_eq!(from, front, "the answer comes from the listener");
    check_reply(&reply, id);
    reply
}

fn have_tools() -> bool {
    require_program("unbound") && require_program("dig")
}

#[tokio::test]
async fn round_robin_over_two_unbound_servers_answers_every_query() {
    if !have_tools() {
        return;
    }
    let u1 = unbound("u1").await;
    let u2 = unbound("u2").await;
    let (server, front) = start(udp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("u1", u1.addr(), 1),
            backend_config("u2", u2.addr(), 1),
        ],
    ))
    .await;

    // 200 raw queries from 20 client sockets (20 sessions), 10 each, A and TXT in turn.
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    let mut id = 0u16;
    for _ in 0..20 {
        let client = udp_client("127.0.0.1").await;
        let mut session_server = None;
        for i in 0..10 {
            id = id.wrapping_add(1);
            if i % 2 == 0 {
                let reply = ask(&client, front, id, "a.weir.test", QTYPE_A).await;
                assert!(contains(&reply, &A_RDATA), "a.weir.test is 10.0.0.1");
            } else {
                let reply = ask(&client, front, id, "who.weir.test", QTYPE_TXT).await;
                let by = who(&reply);
                assert_eq!(
                    *session_server.get_or_insert_with(|| by.clone()),
                    by,
                    "a session stays on its server"
                );
            }
        }
        *answered.entry(session_server.unwrap()).or_default() += 10;
    }
    let total: usize = answered.values().sum();
    assert_eq!(total, 200);
    assert!(
        answered.get("u1").is_some_and(|n| *n > 0) && answered.get("u2").is_some_and(|n| *n > 0),
        "both servers answered: {answered:?}"
    );

    // dig: a new client socket, so a new session, each time: round-robin alternates.
    for _ in 0..2 {
        assert_eq!(
            dig(front, "a.weir.test", "A").await.as_deref(),
            Some("10.0.0.1")
        );
    }
    let mut seen = BTreeMap::new();
    for _ in 0..4 {
        let by = dig(front, "who.weir.test", "TXT")
            .await
            .expect("a TXT answer");
        *seen.entry(by).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "dig reached both: {seen:?}");

    let tables = server.handle.tables();
    let stats = tables.listeners["front"].udp.as_ref().unwrap();
    assert_eq!(stats.datagrams_to_backend(), stats.datagrams_to_client());
}

#[tokio::test]
async fn dns_health_check_marks_a_killed_server_down_and_a_restarted_one_up() {
    if !have_tools() {
        return;
    }
    let u1 = unbound("u1").await;
    let mut u2 = unbound("u2").await;
    let mut config = udp_config(
        Strategy::RoundRobin,
        vec![
            backend_config("u1", u1.addr(), 1),
            backend_config("u2", u2.addr(), 1),
        ],
    );
    // The probe: a query for a.weir.test A; a pass needs the 10.0.0.1 answer in the reply.
    config.pools[0].health_check = Some(HealthCheckConfig {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(300),
        rise: 2,
        fall: 2,
        port: None,
        send: Some(dns_query(0x5eed, "a.weir.test", QTYPE_A)),
        expect: Some(A_RDATA.to_vec()),
    });
    let (server, front) = start(config).await;
    wait_for_state(&server, "pool", "u1", State::Up, DEADLINE).await;
    wait_for_state(&server, "pool", "u2", State::Up, DEADLINE).await;

    // Sessions on both servers.
    let mut clients = Vec::new();
    let mut id = 0u16;
    for _ in 0..4 {
        let client = udp_client("127.0.0.1").await;
        id += 1;
        let by = who(&ask(&client, front, id, "who.weir.test", QTYPE_TXT).await);
        clients.push((client, by));
    }
    assert!(clients.iter().any(|(_, by)| by == "u2"), "a session on u2");

    u2.kill();
    wait_for_state(&server, "pool", "u2", State::Down, DEADLINE).await;
    // Every query keeps being answered: u2's sessions move to u1, new sessions go there.
    for (client, _) in &clients {
        for _ in 0..3 {
            id += 1;
            assert_eq!(
                who(&ask(client, front, id, "who.weir.test", QTYPE_TXT).await),
                "u1"
            );
        }
    }
    for _ in 0..10 {
        let client = udp_client("127.0.0.1").await;
        id += 1;
        let reply = ask(&client, front, id, "a.weir.test", QTYPE_A).await;
        assert!(contains(&reply, &A_RDATA));
        id += 1;
        assert_eq!(
            who(&ask(&client, front, id, "who.weir.test", QTYPE_TXT).await),
            "u1"
        );
    }

    u2.restart().await;
    wait_for_state(&server, "pool", "u2", State::Up, DEADLINE).await;
    // Used again: new sessions are spread over both.
    let mut seen = BTreeMap::new();
    for _ in 0..10 {
        let client = udp_client("127.0.0.1").await;
        id += 1;
        let by = who(&ask(&client, front, id, "who.weir.test", QTYPE_TXT).await);
        *seen.entry(by).or_insert(0) += 1;
    }
    assert!(
        seen.get("u2").is_some_and(|n| *n > 0),
        "u2 serves again: {seen:?}"
    );
    assert!(seen.get("u1").is_some_and(|n| *n > 0), "{seen:?}");
}
