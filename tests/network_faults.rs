//! Network faults between weir and its backend: the backend runs in a network namespace
//! this test makes (`ip netns add`), joined to the host by a veth pair with link-local
//! addresses (169.254.77.1 on the host, .2 inside). The link is cut and restored
//! mid-transfer, rate-limited with `tc tbf`, and (where the kernel has `sch_netem`)
//! given loss and delay. Every transfer must arrive byte-exact, and weir's memory must stay
//! flat. Needs root and iproute2 (`.ci/run` has both); skipped otherwise, a failure
//! under `WEIR_REQUIRE_EXTERNAL=1`.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::child::Weir;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const BACKEND: &str = "169.254.77.2:7000";

/// A namespace with a veth pair to the host, and an echo server inside it; all removed
/// on drop. The two halves of the tests use different /30s so they may run at once.
struct Netns {
    name: String,
    subnet: String,
    host_link: String,
    ns_link: String,
    echo: Child,
    backend: SocketAddr,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A threaded echo server (Python's standard library: the test binary can't enter a
/// namespace without `unsafe`).
const ECHO: &str = "
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
def serve(c):
    while True:
        b = c.recv(65536)
        if not b: break
        c.sendall(b)
    c.shutdown(socket.SHUT_WR); c.close()
print('ready', flush=True)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
";

impl Netns {
    /// `net` picks the /30: 169.254.77.(4·net) — host .1+4·net, namespace .2+4·net.
    fn new(net: u8) -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id() % 10_000);
        let name = format!("weir-test-{id}");
        let (host_link, ns_link) = (format!("wh{id}"), format!("wn{id}"));
        let (host_ip, ns_ip) = (
            format!("169.254.77.{}", 1 + 4 * net),
            format!("169.254.77.{}", 2 + 4 * net),
        );
        // While the link is down its connected route is gone, and the host's default
        // route would carry the backend's packets off this machine: a route of last
        // resort keeps them here, unreachable.
        let subnet = format!("169.254.77.{}/30", 4 * net);
        ip(&["route", "replace", "unreachable", &subnet, "metric", "4000"]);
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", &ns_link,
        ]);
        ip(&["link", "set", &ns_link, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_link]);
        ip(&["link", "set", &host_link, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_link,
        ]);
        ip(&["-n", &name, "link", "set", &ns_link, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let mut echo = Command::new("ip")
            .args([
                "netns", "exec", &name, "python3", "-c", ECHO, &ns_ip, "7000",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(echo.stdout.take().unwrap()),
            &mut ready,
        )
        .unwrap();
        assert_eq!(ready.trim(), "ready", "the echo server in {name} started");
        Netns {
            name,
            subnet,
            host_link,
            ns_link,
            echo,
            backend: format!("{ns_ip}:7000").parse().unwrap(),
        }
    }

    fn link(&self, up: bool) {
        ip(&[
            "link",
            "set",
            &self.host_link,
            if up { "up" } else { "down" },
        ]);
    }

    /// `tc` on both ends of the link (each shapes what it sends).
    fn qdisc(&self, spec: &[&str]) -> Result<(), String> {
        for (netns, dev) in [(None, &self.host_link), (Some(&self.name), &self.ns_link)] {
            let mut tc = match netns {
                None => Command::new("tc"),
                Some(netns) => {
                    let mut tc = Command::new("ip");
                    tc.args(["netns", "exec", netns, "tc"]);
                    tc
                }
            };
            let out = tc
                .args(["qdisc", "add", "dev", dev, "root"])
                .args(spec)
                .output();
            let out = match out {
                Ok(out) => out,
                Err(e) => return Err(e.to_string()),
            };
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
            }
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.echo.kill();
        let _ = self.echo.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = (Command::new("ip"))
            .args([
                "route",
                "del",
                "unreachable",
                &self.subnet,
                "metric",
                "4000",
            ])
            .output();
    }
}

/// Root and iproute2, or a skip (a failure under WEIR_REQUIRE_EXTERNAL=1).
fn can_make_namespaces() -> bool {
    if !require_program("ip") || !require_program("tc") || !require_program("python3") {
        return false;
    }
    if common::patroni::is_root() {
        return true;
    }
    if std::env::var_os("WEIR_REQUIRE_EXTERNAL").is_some_and(|v| v == "1") {
        panic!("network namespaces need root, and WEIR_REQUIRE_EXTERNAL=1");
    }
    eprintln!("SKIPPED: network namespaces need root");
    false
}

fn start_weir(dir: &TempDir, backend: SocketAddr) -> Weir {
    let text = format!(
        "admin:\n  socket: {}\nlisteners:\n  front:\n    bind: 127.0.0.1:0\n    pool: p\n\
         pools:\n  p:\n    connect_timeout: 1s\n    health_check:\n      interval: 200ms\n      \
         timeout: 200ms\n      rise: 1\n      fall: 2\n    backends:\n      - address: {backend}\n        name: ns\n",
        dir.join("admin.sock").display()
    );
    let path = dir.join("weir.yaml");
    std::fs::write(&path, text).unwrap();
    Weir::start(&path, &dir.join("admin.sock"))
}

/// Sends `payload` through weir and reads the echo; `during` runs once `at` bytes came back.
async fn echo_through<F: std::future::Future<Output = ()>>(
    front: SocketAddr,
    payload: &[u8],
    at: usize,
    during: F,
    limit: Duration,
) -> Vec<u8> {
    let stream = TcpStream::connect(front).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let data = payload.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(payload.len());
    let mut buf = vec![0u8; 64 * 1024];
    let mut during = Some(Box::pin(during));
    let end = Instant::now() + limit;
    loop {
        let n = tokio::time::timeout_at(end, r.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} of {} bytes back in {limit:?}",
                    back.len(),
                    payload.len()
                )
            })
            .unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
        if back.len() >= at
            && let Some(f) = during.take()
        {
            f.await;
        }
    }
    writer.await.unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_is_noticed_by_health_checks_and_the_transfer_resumes_byte_exact() {
    if !can_make_namespaces() {
        return;
    }
    let ns = Netns::new(0);
    assert_eq!(ns.backend.to_string(), BACKEND);
    let dir = TempDir::new("netfault-cut");
    let weir = start_weir(&dir, ns.backend);
    weir.wait_for("ns", "up").await;

    const TOTAL: usize = 32 << 20;
    let payload = pseudo_random(TOTAL, 11);
    let cut = async {
        ns.link(false);
        let started = Instant::now();
        let end = started + DEADLINE;
        while weir.backends().await["ns"]["state"] != "down" {
            assert!(
                Instant::now() < end,
                "not marked down with the link cut; weir said:\n{}",
                weir.log.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let noticed = started.elapsed();
        // fall 2 × interval 200 ms, each probe's timeout 200 ms, and some slack.
        assert!(
            noticed < Duration::from_secs(2),
            "marked down after {noticed:?}"
        );
        ns.link(true);
        let started = Instant::now();
        weir.wait_for("ns", "up").await;
        eprintln!(
            "link cut: marked down after {noticed:?}, up {:?} after it was restored",
            started.elapsed()
        );
    };
    let back = echo_through(
        weir.front,
        &payload,
        TOTAL / 4,
        cut,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(back.len(), TOTAL, "every byte came back across the cut");
    assert!(back == payload, "unchanged and in order");

    // Between transfers: a new connection after the cut works too.
    let payload = pseudo_random(1 << 20, 12);
    let back = echo_through(weir.front, &payload, usize::MAX, async {}, DEADLINE).await;
    assert!(back == payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_keeps_bytes_exact_and_memory_flat_and_netem_runs_where_it_exists() {
    if !can_make_namespaces() {
        return;
    }
    let ns = Netns::new(1);
    ns.qdisc(&[
        "tbf", "rate", "40mbit", "burst", "32kbit", "latency", "400ms",
    ])
    .expect("tc tbf");
    let dir = TempDir::new("netfault-tbf");
    let weir = start_weir(&dir, ns.backend);
    weir.wait_for("ns", "up").await;
    let idle = weir.rss_kib();

    const TOTAL: usize = 16 << 20;
    let payload = pseudo_random(TOTAL, 13);
    let mut peak = idle;
    let started = Instant::now();
    let sample = async {
        peak = peak.max(weir.rss_kib());
    };
    let back = echo_through(
        weir.front,
        &payload,
        TOTAL / 2,
        sample,
        Duration::from_secs(60),
    )
    .await;
    let took = started.elapsed();
    peak = peak.max(weir.rss_kib());
    assert!(
        back == payload,
        "16 MiB through a 40 Mbit/s link, byte-exact"
    );
    assert!(peak < idle + 4 * 1024, "RSS {idle} -> {peak} KiB");
    let mbit = (TOTAL * 8) as f64 / took.as_secs_f64() / 1e6;
    assert!(mbit < 48.0, "the link was shaped: {mbit:.1} Mbit/s");
    eprintln!(
        "tbf 40mbit: 16 MiB each way in {took:?} ({mbit:.1} Mbit/s), RSS {idle} -> {peak} KiB"
    );

    // Loss, delay and reordering: only where the kernel has sch_netem.
    let lossy = Netns::new(2);
    match lossy.qdisc(&[
        "netem", "delay", "5ms", "2ms", "loss", "1%", "reorder", "5%",
    ]) {
        Err(e) if e.contains("Specified qdisc kind is unknown") => {
            eprintln!(
                "SKIPPED: this kernel has no sch_netem ({e}): loss, delay and reordering not tested"
            );
        }
        Err(e) => panic!("tc netem: {e}"),
        Ok(()) => {
            let weir = start_weir(&TempDir::new("netfault-netem"), lossy.backend);
            weir.wait_for("ns", "up").await;
            let payload = pseudo_random(8 << 20, 14);
            let back = echo_through(
                weir.front,
                &payload,
                usize::MAX,
                async {},
                Duration::from_secs(120),
            )
            .await;
            assert!(
                back == payload,
                "8 MiB through loss and reordering, byte-exact"
            );
        }
    }
}
