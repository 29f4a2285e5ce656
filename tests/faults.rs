//! Injected faults against a real `weir run` process: its file descriptors run out, its
//! config is reloaded in a storm, a backend flaps, a client reads slowly, a backend never
//! reads or never accepts. Each test asserts what a user would see (every byte, every
//! connection) and what weir's process looks like afterwards (fds, memory, state).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::child::Weir;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

fn write_config(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A config with an admin socket in `dir`, a metrics endpoint, listener `front` and pool
/// `p` with `pool` (its keys, indented 4) and these backends.
fn config_text(dir: &TempDir, pool: &str, backends: &[(SocketAddr, u32)]) -> String {
    let list: String = (backends.iter())
        .map(|(a, w)| format!("      - address: {a}\n        weight: {w}\n"))
        .collect();
    format!(
        "admin:\n  socket: {}\nmetrics:\n  bind: 127.0.0.1:0\nlisteners:\n  front:\n    \
         bind: 127.0.0.1:0\n    pool: p\npools:\n  p:\n{pool}    backends:\n{list}",
        dir.join("admin.sock").display()
    )
}

fn socket(dir: &TempDir) -> PathBuf {
    dir.join("admin.sock")
}

/// Its metrics endpoint, from the "serving metrics on http://ADDR/metrics" line.
fn metrics_addr(weir: &Weir) -> SocketAddr {
    let log = weir.log.lock().unwrap();
    let line = (log.iter())
        .find_map(|l| l.split("serving metrics on http://").nth(1))
        .expect("metrics address logged");
    line.split('/').next().unwrap().parse().unwrap()
}

/// The sum of every series of `name` in /metrics whose labels contain `labels`.
async fn metric(weir: &Weir, name: &str, labels: &str) -> f64 {
    let mut stream = TcpStream::connect(metrics_addr(weir)).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut body))
        .await
        .expect("metrics in time")
        .unwrap();
    (body.lines())
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One connection through weir: reads the greeting, echoes `payload` back, checks it.
async fn exchange(front: SocketAddr, payload: &[u8]) -> Result<String, String> {
    let work = async {
        let mut stream = (TcpStream::connect(front).await).map_err(|e| format!("connect: {e}"))?;
        let mut name = Vec::new();
        let mut byte = [0u8; 1];
        while name.last() != Some(&b'\n') {
            match stream.read(&mut byte).await {
                Ok(1) => name.push(byte[0]),
                other => return Err(format!("greeting: {other:?}")),
            }
        }
        let (mut r, mut w) = stream.split();
        let send = async {
            w.write_all(payload).await?;
            w.shutdown().await
        };
        let mut back = Vec::with_capacity(payload.len());
        let (sent, got) = tokio::join!(send, r.read_to_end(&mut back));
        sent.map_err(|e| format!("send: {e}"))?;
        got.map_err(|e| format!("receive: {e}"))?;
        if back != payload {
            return Err(format!(
                "{} bytes back of {}, or changed",
                back.len(),
                payload.len()
            ));
        }
        Ok(String::from_utf8_lossy(&name).trim().to_string())
    };
    tokio::time::timeout(DEADLINE, work)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

async fn wait_fds_at_most(weir: &Weir, limit: usize) {
    wait_until(DEADLINE, &format!("weir back to {limit} fds"), || async {
        weir.fds() <= limit
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_fds_backs_off_blames_no_backend_and_recovers() {
    let backend = TestBackend::start("b").await;
    let dir = TempDir::new("faults-fds");
    let check = "    health_check:\n      interval: 100ms\n      timeout: 100ms\n";
    let text = config_text(&dir, check, &[(backend.addr, 1)]);
    let weir = Weir::start_with_fd_limit(
        &write_config(&dir, "w.yaml", &text),
        &socket(&dir),
        Some(64),
    );
    weir.wait_all_up().await;
    exchange(weir.front, b"warm").await.unwrap();
    let idle_fds = weir.fds();

    // A flood of idle clients, far more than 64 descriptors' worth.
    let mut flood = Vec::new();
    for _ in 0..200 {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(weir.front)).await
        {
            flood.push(c);
        }
    }
    assert!(flood.len() >= 100, "only {} clients connected", flood.len());
    wait_until(DEADLINE, "weir at its fd limit", || async {
        weir.fds() >= 60
    })
    .await;
    // Held at the limit across several health-check intervals: probes fail for want of
    // a descriptor, which must not count against the backend.
    let held = Instant::now() + Duration::from_secs(1);
    while Instant::now() < held {
        assert!(
            !weir.logged("b down"),
            "a healthy backend blamed for weir's fds"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(flood);

    let released = Instant::now();
    let mut answered = None;
    while released.elapsed() < Duration::from_secs(5) {
        if exchange(weir.front, b"after").await.is_ok() {
            answered = Some(released.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answered = answered.expect("a new connection succeeds after the flood");
    assert!(
        answered < Duration::from_secs(2),
        "served again after {answered:?}"
    );
    let rows = weir.backends().await;
    let row = rows.values().next().unwrap();
    assert_eq!(row["state"], "up", "{row}");
    assert!(!weir.logged("down:"), "nothing marked down");
    let exhausted = metric(&weir, "weir_resource_exhaustion_total", "").await;
    assert!(exhausted > 0.0, "the exhaustion is counted");
    assert_eq!(
        metric(&weir, "weir_backend_connect_errors_total", "").await,
        0.0,
        "no connect error blamed on the backend"
    );
    wait_fds_at_most(&weir, idle_fds + 2).await;
    eprintln!(
        "fd flood: {idle_fds} fds idle, served again {answered:?} after release, {exhausted} exhaustion events"
    );
}

/// Writes `text` to `path` as an editor would: a new file renamed over the old one.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_storm_under_traffic_loses_nothing_and_ends_on_the_last_config() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let dir = TempDir::new("faults-reload");
    let one = config_text(&dir, "", &[(a.addr, 1), (b.addr, 1)]);
    let two = config_text(
        &dir,
        "    strategy: least-connections\n",
        &[(a.addr, 3), (b.addr, 7)],
    );
    let broken = format!("{one}\n  oops: [unclosed\n");
    let path = write_config(&dir, "w.yaml", &one);
    let weir = Weir::start(&path, &socket(&dir));
    weir.wait_all_up().await;

    let front = weir.front;
    let traffic = tokio::spawn(async move {
        let (mut ok, mut failed) = (0usize, Vec::new());
        let end = Instant::now() + Duration::from_secs(12);
        let mut seed = 0;
        while Instant::now() < end && ok + failed.len() < 5_000 {
            seed += 1;
            let payload = pseudo_random(16 * 1024 + seed as usize % 4096, seed);
            match exchange(front, &payload).await {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e),
            }
        }
        (ok, failed)
    });
    let mut rss_after_warmup = 0;
    for i in 0..50 {
        let text = [&one, &two, &broken][i % 3];
        replace_file(&path, text);
        weir.signal("HUP");
        tokio::time::sleep(Duration::from_millis(200)).await;
        if i == 5 {
            rss_after_warmup = weir.rss_kib();
        }
    }
    // The 50th (i = 49, 49 % 3 = 1) wrote `two`: it must be in force.
    wait_until(DEADLINE, "the last config in force", || async {
        let rows = weir.backends().await;
        rows[&a.addr.to_string()]["weight"] == 3 && rows[&b.addr.to_string()]["weight"] == 7
    })
    .await;
    let (ok, failed) = traffic.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} connections ran");
    assert!(
        weir.logged("reload failed, nothing changed"),
        "the broken file was refused"
    );
    let rss = weir.rss_kib();
    assert!(
        rss < rss_after_warmup + 4 * 1024,
        "memory grew from {rss_after_warmup} KiB to {rss} KiB over 44 reloads"
    );
    eprintln!("reload storm: {ok} connections, none failed; RSS {rss_after_warmup} -> {rss} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_backend_fails_no_client_and_its_changes_are_logged_once_each() {
    let steady = TestBackend::start("steady").await;
    let mut flapping = Some(TestBackend::start("flap").await);
    let flap_addr = flapping.as_ref().unwrap().addr;
    let dir = TempDir::new("faults-flap");
    let pool = "    retries: 2\n    health_check:\n      interval: 100ms\n      timeout: 100ms\n      rise: 1\n      fall: 1\n";
    let text = config_text(&dir, pool, &[(steady.addr, 1), (flap_addr, 1)]);
    let weir = Weir::start(&write_config(&dir, "w.yaml", &text), &socket(&dir));
    weir.wait_all_up().await;

    let front = weir.front;
    let traffic = tokio::spawn(async move {
        let (mut ok, mut failed) = (0usize, Vec::new());
        let end = Instant::now() + Duration::from_secs(21);
        while Instant::now() < end && ok + failed.len() < 200_000 {
            match exchange(front, b"ping").await {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e),
            }
        }
        (ok, failed)
    });
    // Its listener goes away and comes back every 300 ms for 20 s (open connections
    // finish).
    let mut flaps = 0;
    let flapping_since = Instant::now();
    let end = flapping_since + Duration::from_secs(20);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(300)).await;
        match flapping.take() {
            Some(up) => drop(up),
            None => flapping = Some(TestBackend::restart("flap", flap_addr).await),
        }
        flaps += 1;
    }
    let flapped_for = flapping_since.elapsed();
    let (ok, failed) = traffic.await.unwrap();
    // A connection the backend's kernel had completed but the backend never accepted is
    // reset when its listener goes away: weir passes that reset on (the backend did
    // accept the connect), so such a client sees a reset before its first byte — while
    // waiting for the greeting, or, when weir's reset comes before the client's task saw
    // its own connect complete, as the connect's error (weir resets a client for nothing
    // else: a failed backend connect closes it with a FIN). At most a few per flap; every
    // other failure (a refused connect reaching a client) is a defect.
    let (reset_in_backlog, other): (Vec<&String>, Vec<&String>) = (failed.iter()).partition(|e| {
        (e.starts_with("greeting:") || e.starts_with("connect:")) && e.contains("reset")
    });
    assert!(
        other.is_empty(),
        "{} of {} client connections failed: {:?}",
        other.len(),
        ok + failed.len(),
        &other[..other.len().min(5)]
    );
    assert!(
        reset_in_backlog.len() <= flaps,
        "{} resets before the first byte in {flaps} flaps",
        reset_in_backlog.len()
    );
    let name = flap_addr.to_string();
    let changes = (weir.log.lock().unwrap().iter())
        .filter(|l| l.contains(&format!("p/{name} up")) || l.contains(&format!("p/{name} down")))
        .count();
    assert!(
        changes >= 2,
        "the flaps were seen: {changes} state changes logged"
    );
    assert!(
        changes <= flaps + 2,
        "{changes} state-change lines for {flaps} flaps: one per change at most"
    );
    eprintln!(
        "flapping: {flaps} flaps in {flapped_for:.1?}, {changes} state changes logged ({:.1} a second), {ok} client connections served, {} reset in the dying backend's backlog ({} seen at connect)",
        changes as f64 / flapped_for.as_secs_f64(),
        reset_in_backlog.len(),
        (reset_in_backlog.iter())
            .filter(|e| e.starts_with("connect:"))
            .count()
    );
}

/// A backend that sends `total` bytes of `pseudo_random(total, 7)` to each client, then
/// closes.
async fn source_backend(total: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let data = pseudo_random(total, 7);
                let _ = stream.write_all(b"source\n").await;
                let _ = stream.write_all(&data).await;
            });
        }
    });
    addr
}

/// Named to sort first: libtest starts tests in name order, and this one (over three
/// minutes, mostly asleep) then runs beside all the others instead of after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_sending_50_mib_to_a_slow_reader_loses_nothing_and_the_kernel_holds_the_backlog()
{
    const TOTAL: usize = 50 << 20;
    /// The client reads 256 KiB a second: 50 MiB take 200 s.
    const RATE: f64 = 256.0 * 1024.0;
    let backend = source_backend(TOTAL).await;
    let dir = TempDir::new("faults-slow");
    let text = config_text(&dir, "", &[(backend, 1)]);
    let weir = Weir::start(&write_config(&dir, "w.yaml", &text), &socket(&dir));
    let idle = weir.rss_kib();

    let mut stream = TcpStream::connect(weir.front).await.unwrap();
    let greeting = b"source\n";
    let mut head = [0u8; 7];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, greeting);
    // Checked as it arrives, against what the backend sent.
    let want = pseudo_random(TOTAL, 7);
    let mut got = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    let mut peak = idle;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(260);
    loop {
        assert!(Instant::now() < deadline, "{got} of {TOTAL} bytes in 260 s");
        // Never ahead of 256 KiB/s: wait until the bytes read so far are due.
        let due = started + Duration::from_secs_f64(got as f64 / RATE);
        tokio::time::sleep_until(due).await;
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(got + n <= TOTAL, "more bytes than the backend sent");
        assert!(
            buf[..n] == want[got..got + n],
            "bytes {got}..{} changed or out of order",
            got + n
        );
        got += n;
        peak = peak.max(weir.rss_kib());
    }
    let took = started.elapsed();
    assert_eq!(got, TOTAL, "every byte arrived");
    assert!(
        peak < idle + 4 * 1024,
        "weir's RSS went from {idle} KiB to {peak} KiB behind a slow reader"
    );
    eprintln!(
        "slow reader: 50 MiB at {:.0} KiB/s in {took:.1?}, RSS idle {idle} KiB, peak {peak} KiB",
        TOTAL as f64 / 1024.0 / took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_that_never_read_or_never_accept_hold_nothing_and_hurt_no_one() {
    let good = TestBackend::start("good").await;
    // Accepts, then never reads.
    let deaf = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let deaf_addr = deaf.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = deaf.accept().await {
            held.push(s);
        }
    });
    // Never accepts: a backlog of one, filled first (further SYNs are dropped, so a
    // connect to it times out as to a host that has stopped answering).
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    full.listen(0).unwrap();
    let full_addr = full.local_addr().unwrap().as_socket().unwrap();
    let filler: Vec<_> = (0..4)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&full_addr, Duration::from_millis(200)).ok()
        })
        .collect();
    assert!(
        std::net::TcpStream::connect_timeout(&full_addr, Duration::from_millis(300)).is_err(),
        "the backlog is full"
    );

    let dir = TempDir::new("faults-deaf");
    let pool = "    connect_timeout: 300ms\n    retries: 2\n";
    let text = config_text(
        &dir,
        pool,
        &[(deaf_addr, 1), (full_addr, 1), (good.addr, 1)],
    );
    let weir = Weir::start(&write_config(&dir, "w.yaml", &text), &socket(&dir));
    let idle = weir.rss_kib();

    // To the deaf one: the first pick of round-robin.
    let mut to_deaf = TcpStream::connect(weir.front).await.unwrap();
    let chunk = vec![7u8; 256 * 1024];
    let mut written = 0usize;
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end && written < 256 << 20 {
        match tokio::time::timeout(Duration::from_millis(300), to_deaf.write(&chunk)).await {
            Ok(Ok(n)) => written += n,
            _ => break,
        }
    }
    assert!(
        written < 64 << 20,
        "{written} bytes accepted towards a backend that never reads"
    );
    let rss = weir.rss_kib();
    assert!(
        rss < idle + 4 * 1024,
        "RSS {idle} -> {rss} KiB holding a stuck write"
    );

    // With the deaf one drained (it holds its client), the others serve: a pick of the
    // one that never accepts times out after connect_timeout and goes to the good one.
    let deaf_name = format!("p/{deaf_addr}");
    assert!(
        weir.admin(&format!("drain {deaf_name}"))
            .await
            .contains("drain")
    );
    let started = Instant::now();
    for _ in 0..6 {
        let one = Instant::now();
        let name = exchange(weir.front, b"hello").await;
        assert_eq!(name.as_deref(), Ok("good"), "served by the good backend");
        assert!(
            one.elapsed() < Duration::from_secs(2),
            "{:?}",
            one.elapsed()
        );
    }
    let took = started.elapsed();
    assert!(
        weir.logged("timed out")
            || metric(&weir, "weir_backend_connect_errors_total", "").await > 0.0,
        "the backend that never accepts timed out"
    );
    drop((filler, full, held));
    eprintln!(
        "deaf backend: {written} bytes taken before writes stalled; RSS {idle} -> {rss} KiB; 6 connections in {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_the_admin_socket_never_locks_the_operator_out() {
    let backend = TestBackend::start("b").await;
    let dir = TempDir::new("faults-slowloris");
    let text = config_text(&dir, "", &[(backend.addr, 1)]);
    let weir = Weir::start(&write_config(&dir, "w.yaml", &text), &socket(&dir));
    let idle_fds = weir.fds();

    // 300 clients, each sending one byte of a command every 2 s and never a newline.
    let path = socket(&dir);
    let slow: Vec<_> = (0..300)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let Ok(mut stream) = tokio::net::UnixStream::connect(&path).await else {
                    return (started.elapsed(), "refused".to_string());
                };
                let mut reply = String::new();
                loop {
                    if stream.write_all(b"s").await.is_err() {
                        // Closed by weir: what it said is still there to read.
                        let mut rest = Vec::new();
                        let _ = stream.read_to_end(&mut rest).await;
                        reply.push_str(&String::from_utf8_lossy(&rest));
                        break;
                    }
                    let mut buf = [0u8; 256];
                    match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await
                    {
                        Err(_) => continue,
                        Ok(Ok(n)) if n > 0 => reply.push_str(&String::from_utf8_lossy(&buf[..n])),
                        Ok(_) => break,
                    }
                    if started.elapsed() > Duration::from_secs(20) {
                        return (started.elapsed(), "never closed".to_string());
                    }
                }
                (started.elapsed(), reply)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Meanwhile the operator's own commands are answered, at once.
    for _ in 0..20 {
        let asked = Instant::now();
        let reply = weir.admin("show backends --json").await;
        assert!(
            reply.trim_start().starts_with('['),
            "a real reply, got {reply:?}"
        );
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "answered in {:?}",
            asked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut evicted = 0;
    for task in slow {
        let (lasted, reply) = task.await.unwrap();
        assert!(
            lasted < Duration::from_secs(12),
            "a slow client held on for {lasted:?}: {reply:?}"
        );
        assert!(reply.starts_with("error: "), "told why: {reply:?}");
        evicted += usize::from(reply.contains("a newer one needed the slot"));
    }
    assert!(evicted > 0, "room was made by evicting idle clients");
    wait_fds_at_most(&weir, idle_fds).await;
    eprintln!(
        "slowloris: 300 slow admin clients, 20 real commands all answered in under 1 s, {evicted} slow clients evicted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_traffic_then_restart_keeps_admin_state_and_serves_again() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let dir = TempDir::new("faults-kill9");
    // A fixed port, so that clients find the restarted instance where they left it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = config_text(&dir, "", &[(a.addr, 1), (b.addr, 1)])
        .replace(
            "bind: 127.0.0.1:0\n    pool",
            &format!("bind: 127.0.0.1:{port}\n    pool"),
        )
        .replace(
            "admin:\n",
            &format!(
                "admin:\n  state_file: {}\n",
                dir.join("state.json").display()
            ),
        );
    let path = write_config(&dir, "w.yaml", &text);
    let weir = Weir::start(&path, &socket(&dir));
    let b_name = b.addr.to_string();
    let reply = weir.admin(&format!("drain p/{b_name}")).await;
    assert!(!reply.starts_with("error"), "{reply}");

    let front = weir.front;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let mut log = Vec::new();
            let end = Instant::now() + Duration::from_secs(20);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
                log.push((Instant::now(), exchange(front, b"x").await));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            log
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    weir.signal("KILL");
    drop(weir);
    let weir = Weir::start(&path, &socket(&dir));
    assert_eq!(
        weir.front.port(),
        port,
        "the listener is back on its address"
    );
    let back = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let log = traffic.await.unwrap();

    let rows = weir.backends().await;
    assert_eq!(
        rows[&b_name]["admin"], "drain",
        "the drain survived kill -9: {:?}",
        rows[&b_name]
    );
    let after: Vec<&Result<String, String>> = (log.iter())
        .filter(|(at, _)| *at > back + Duration::from_millis(100))
        .map(|(_, r)| r)
        .collect();
    assert!(
        after.len() >= 10,
        "traffic ran after the restart: {}",
        after.len()
    );
    assert!(
        after.iter().all(|r| r.as_deref() == Ok("a")),
        "served again, never by the drained backend: {after:?}"
    );
    let before_kill = log.iter().filter(|(at, _)| *at < killed).count();
    assert!(
        log.iter()
            .filter(|(at, _)| *at < killed)
            .all(|(_, r)| r.as_deref() == Ok("a"))
    );
    eprintln!(
        "kill -9: back {:?} after the kill; {before_kill} exchanges before, {} after, drain kept",
        back - killed,
        after.len()
    );
}

/// One slowloris client of the metrics endpoint, until `flood_end`: connects, sends a
/// request head a byte every 2 s (it never ends), and once weir closes it, reconnects
/// 1.5-2.5 s later (client `n`'s own spread, so that the clients don't reconnect in step:
/// a slow flood, not bursts of hundreds of connects at once). Returns each connection's
/// lifetime and what weir said before closing it.
async fn slow_http_client(addr: SocketAddr, n: u64, flood_end: Instant) -> Vec<(Duration, String)> {
    const HEAD: &[u8] =
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut lifetimes = Vec::new();
    while Instant::now() < flood_end && lifetimes.len() < 100 {
        let opened = Instant::now();
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            lifetimes.push((opened.elapsed(), "refused".to_string()));
            tokio::time::sleep(pause(n, lifetimes.len())).await;
            continue;
        };
        let mut said = Vec::new();
        for &byte in HEAD.iter().cycle().take(HEAD.len() + 20) {
            if stream.write_all(&[byte]).await.is_err() {
                let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut said)).await;
                break;
            }
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
                Err(_) => {}
                Ok(Ok(n)) if n > 0 => {
                    said.extend_from_slice(&buf[..n]);
                    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut said)).await;
                    break;
                }
                Ok(_) => break,
            }
            if opened.elapsed() > Duration::from_secs(30) {
                said = b"never closed".to_vec();
                break;
            }
        }
        lifetimes.push((opened.elapsed(), String::from_utf8_lossy(&said).to_string()));
        tokio::time::sleep(pause(n, lifetimes.len())).await;
    }
    lifetimes
}

/// Client `n`'s pause before its `k`th reconnect: 1.5-2.5 s, spread over the clients.
fn pause(n: u64, k: usize) -> Duration {
    Duration::from_millis(1500 + (n * 337 + k as u64 * 101) % 1000)
}

/// weir in front of one backend, once its metrics endpoint serves: the child, that
/// endpoint's address, and what must live as long as the test.
async fn serving_metrics(tag: &str) -> (Weir, SocketAddr, TestBackend, TempDir) {
    let backend = TestBackend::start("b").await;
    let dir = TempDir::new(tag);
    let text = config_text(&dir, "", &[(backend.addr, 1)]);
    let weir = Weir::start(&write_config(&dir, "w.yaml", &text), &socket(&dir));
    wait_until(DEADLINE, "the metrics endpoint", || async {
        weir.logged("serving metrics on")
    })
    .await;
    let addr = metrics_addr(&weir);
    (weir, addr, backend, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_the_metrics_endpoint_is_bounded_and_scrapes_are_answered() {
    let (weir, addr, _backend, _dir) = serving_metrics("faults-http-slowloris").await;
    weir.wait_all_up().await;
    let idle_fds = weir.fds();

    // 300 clients, each a byte every 2 s, reconnecting when closed, for 15 s; they
    // arrive over the first 2 s.
    let flood_end = Instant::now() + Duration::from_secs(15);
    let slow: Vec<_> = (0..300u64)
        .map(|n| {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(n * 2000 / 300)).await;
                slow_http_client(addr, n, flood_end).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Meanwhile scrapes are answered, at once, and weir holds at most its 32 clients
    // (and a few just accepted, about to make room).
    let mut scrapes = 0;
    let mut peak_fds = 0;
    while Instant::now() + Duration::from_secs(1) < flood_end && scrapes < 100 {
        peak_fds = peak_fds.max(weir.fds());
        let asked = Instant::now();
        let up = metric(&weir, "weir_backend_up", "").await;
        assert_eq!(up, 1.0, "a real answer");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "scrape answered in {:?}",
            asked.elapsed()
        );
        scrapes += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (mut connections, mut timed_out, mut longest) = (0, 0, Duration::ZERO);
    for task in slow {
        for (lasted, said) in task.await.unwrap() {
            connections += 1;
            longest = longest.max(lasted);
            // Closed without a word (its slot given to a newcomer) or told 408 at the
            // 5 s head timeout; never held past it.
            assert!(
                said.is_empty() || said.starts_with("HTTP/1.1 408"),
                "a slow client was told {said:?}"
            );
            assert!(
                lasted < Duration::from_secs(8),
                "a slow client held on for {lasted:?}: {said:?}"
            );
            timed_out += usize::from(lasted >= Duration::from_secs(4));
        }
    }
    assert!(connections > 300, "only {connections} slow connections");
    assert!(timed_out > 0, "some slow clients ran into the head timeout");
    assert!(
        peak_fds <= idle_fds + 32 + 16,
        "{peak_fds} fds during the flood, {idle_fds} idle: more than the 32 clients held"
    );
    wait_fds_at_most(&weir, idle_fds).await;
    eprintln!(
        "metrics slowloris: 300 slow clients, {connections} connections, {timed_out} closed at the head timeout, the rest evicted, longest {longest:.1?}; {scrapes} scrapes all answered in under 1 s; fds {idle_fds} idle, {peak_fds} peak"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connects_never_drops_a_scrape_already_sent() {
    let (_weir, addr, _backend, _dir) = serving_metrics("faults-http-burst").await;
    // 30 rounds: a scrape's request is sent, then 100 silent connects (three times the
    // 32 clients weir holds) arrive at once. The newcomers take the oldest idle slots,
    // but a request already in its socket is answered, not dropped with its slot.
    for round in 0..30 {
        let mut scrape = TcpStream::connect(addr).await.unwrap();
        scrape
            .write_all(b"GET /ready HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let burst: Vec<_> = (0..100)
            .map(|_| tokio::spawn(TcpStream::connect(addr)))
            .collect();
        let mut reply = String::new();
        let read = tokio::time::timeout(DEADLINE, scrape.read_to_string(&mut reply)).await;
        assert!(
            matches!(read, Ok(Ok(_))) && reply.starts_with("HTTP/1.0 200"),
            "round {round}: the scrape sent before the burst got {reply:?}"
        );
        for task in burst {
            drop(task.await.unwrap());
        }
    }
}
