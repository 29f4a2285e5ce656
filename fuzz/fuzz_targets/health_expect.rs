//! The health check's `expect` matcher, through the real probe (`weir::health::probe`)
//! against a server on loopback that sends a reply the fuzzer chose, split into the
//! segments it chose (TCP), or as one datagram (UDP). The verdict must be what a plain
//! search of the whole reply says, however the reply was split across reads, and a
//! failing probe's reason must name the expected bytes.
//!
//! Input: byte 0 = (needle length - 1) in bits 0-2, UDP in bit 3; byte 1 = how many
//! segment lengths follow (mod 8); those lengths (one byte each); the needle; the reply
//! (at most 4000 bytes, well under the probe's 64 KiB bound).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UdpSocket};
use weir::config::{HealthCheckConfig, Protocol};

struct Input<'a> {
    udp: bool,
    segments: &'a [u8],
    needle: &'a [u8],
    reply: &'a [u8],
}

fn decode(data: &[u8]) -> Option<Input<'_>> {
    let (&flags, rest) = data.split_first()?;
    let (&count, rest) = rest.split_first()?;
    let count = usize::from(count % 8);
    let needle_len = usize::from(flags & 7) + 1;
    if rest.len() < count + needle_len {
        return None;
    }
    let (segments, rest) = rest.split_at(count);
    let (needle, reply) = rest.split_at(needle_len);
    Some(Input {
        udp: flags & 8 != 0,
        segments,
        needle,
        reply: &reply[..reply.len().min(4000)],
    })
}

struct Servers {
    runtime: tokio::runtime::Runtime,
    tcp: TcpListener,
    udp: UdpSocket,
}

/// Bound at the first input, after AFL's fork server has forked.
fn servers() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tcp, udp) = runtime.block_on(async {
            let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            (tcp, udp)
        });
        Servers { runtime, tcp, udp }
    })
}

/// Accepts the probe's connection and writes `reply` in `segments`, each flushed on its
/// own (no Nagle) and the probe given a turn to read it, then the rest, then closes. A
/// probe that found its bytes closes without reading the rest: a write may then fail.
async fn serve_tcp(listener: &TcpListener, reply: &[u8], segments: &[u8]) {
    let (mut stream, _) = listener.accept().await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut at = 0;
    for len in segments
        .iter()
        .map(|&l| usize::from(l))
        .chain([reply.len()])
    {
        let end = (at + len).min(reply.len());
        if stream.write_all(&reply[at..end]).await.is_err() {
            return;
        }
        at = end;
        tokio::task::yield_now().await;
    }
}

async fn serve_udp(socket: &UdpSocket, reply: &[u8]) {
    let mut buf = [0u8; 64];
    let (_, from) = socket
        .recv_from(&mut buf)
        .await
        .expect("the probe's datagram");
    let _ = socket.send_to(reply, from).await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some(input) = decode(data) else {
            return;
        };
        let servers = servers();
        let config = HealthCheckConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            rise: 1,
            fall: 1,
            port: None,
            send: None,
            expect: Some(input.needle.to_vec()),
        };
        let verdict = servers.runtime.block_on(async {
            let (addr, protocol): (SocketAddr, _) = if input.udp {
                (servers.udp.local_addr().unwrap(), Protocol::Udp)
            } else {
                (servers.tcp.local_addr().unwrap(), Protocol::Tcp)
            };
            let probe = weir::health::probe(addr, &config, protocol);
            if input.udp {
                tokio::join!(probe, serve_udp(&servers.udp, input.reply)).0
            } else {
                let serve = serve_tcp(&servers.tcp, input.reply, input.segments);
                tokio::join!(probe, serve).0
            }
        });
        let wanted = contains(input.reply, input.needle);
        assert_eq!(
            verdict.is_ok(),
            wanted,
            "reply {:?} needle {:?}: {verdict:?}",
            input.reply,
            input.needle
        );
        if let Err(reason) = verdict {
            let quoted = input.needle.escape_ascii().to_string();
            assert!(
                reason.contains(&quoted),
                "{reason:?} does not name {quoted:?}"
            );
        }
    });
}
