//! `weir demo`: the newcomer's first run. Starts a few in-process backends, weir in front
//! of them and a little traffic, and shows what happens. Kept apart from the core: it
//! only uses the public pieces (`Server`, configs built in code).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::balance::Strategy;
use crate::config::{BackendConfig, Config, ListenerConfig, OnDown, PoolConfig, Protocol};
use crate::server::Server;

/// A demo backend: greets each connection with its name, then echoes.
struct DemoBackend {
    name: &'static str,
    weight: u32,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

async fn start_backend(name: &'static str, weight: u32) -> std::io::Result<DemoBackend> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(format!("{name}\n").as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(DemoBackend {
        name,
        weight,
        addr,
        task,
    })
}

fn demo_config(strategy: Strategy, backends: &[DemoBackend]) -> Config {
    Config {
        admin_socket: None,
        state_file: None,
        metrics_bind: None,
        shutdown_timeout: Duration::from_secs(2),
        listeners: vec![ListenerConfig {
            name: "demo".into(),
            bind: "127.0.0.1:0".parse().expect("literal address"),
            protocol: Protocol::Tcp,
            pool: "app".into(),
            max_connections: None,
            idle_timeout: Duration::from_secs(60),
            half_close_timeout: Duration::from_secs(60),
            access_log: false,
            accept_proxy: Vec::new(),
            send_proxy: None,
        }],
        pools: vec![PoolConfig {
            name: "app".into(),
            strategy,
            protocol: Protocol::Tcp,
            connect_timeout: Duration::from_secs(1),
            retries: 2,
            on_down: OnDown::Keep,
            queue_timeout: Duration::ZERO,
            slow_start: Duration::ZERO,
            proxy_protocol: None,
            health_check: None,
            backends: backends
                .iter()
                .map(|b| BackendConfig {
                    name: b.name.into(),
                    address: b.addr.to_string(),
                    addr: b.addr,
                    host: None,
                    weight: b.weight,
                    max_connections: None,
                    backup: false,
                })
                .collect(),
            discover: None,
        }],
        resolvers: Vec::new(),
    }
}

/// Connects through weir and returns the name of the backend that answered.
async fn one_connection(
    front: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<String> {
    let stream = match source {
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(front).await?
        }
        None => TcpStream::connect(front).await?,
    };
    read_name(stream).await
}

async fn read_name(mut stream: TcpStream) -> std::io::Result<String> {
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).await? == 1 && byte[0] != b'\n' {
        name.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&name).into_owned())
}

struct Table {
    names: Vec<&'static str>,
    tty: bool,
}

impl Table {
    fn header(&self, backends: &[DemoBackend]) {
        let mut line = format!("{:<20}", "strategy");
        for b in backends {
            line += &format!("{:>14}", format!("{} (w{})", b.name, b.weight));
        }
        println!("{line}");
    }

    fn row(&self, label: &str, counts: &[AtomicU64], done: bool) {
        let mut line = format!("{label:<20}");
        for c in counts {
            line += &format!("{:>14}", c.load(Ordering::Relaxed));
        }
        if self.tty {
            print!("\r{line}");
            if done {
                println!();
            }
        } else if done {
            println!("{line}");
        }
        let _ = std::io::stdout().flush();
    }
}

pub async fn run() -> ExitCode {
    match tokio::select! {
        r = demo() => r,
        _ = tokio::signal::ctrl_c() => { println!("\ninterrupted"); Ok(()) }
    } {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir demo failed: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn demo() -> anyhow::Result<()> {
    println!(
        "weir demo: three backends on loopback, weighted 1, 2 and 3, and weir in front of them.\n"
    );
    let mut backends = vec![
        start_backend("alpha", 1).await?,
        start_backend("bravo", 2).await?,
        start_backend("charlie", 3).await?,
    ];
    let table = Table {
        names: backends.iter().map(|b| b.name).collect(),
        tty: std::io::stdout().is_terminal(),
    };

    println!("1. How each strategy spreads 600 new connections:\n");
    table.header(&backends);
    for strategy in [
        Strategy::RoundRobin,
        Strategy::LeastConnections,
        Strategy::WeightedRandom,
        Strategy::SourceHash,
    ] {
        let server = Server::start(demo_config(strategy, &backends), None).await?;
        let front = server.listener_addr("demo").expect("demo listener");
        let counts: Arc<Vec<AtomicU64>> =
            Arc::new(backends.iter().map(|_| AtomicU64::new(0)).collect());
        let hold = strategy == Strategy::LeastConnections;
        let mut held = Vec::new();
        for i in 0..600u32 {
            // source-hash: 600 clients from 127.0.0.0/8 addresses; the others from 127.0.0.1.
            let source = (strategy == Strategy::SourceHash)
                .then(|| std::net::IpAddr::from([127, 1 + (i / 250) as u8, (i % 250) as u8, 1]));
            let name = if hold {
                // least-connections: keep connections open so "fewest active per weight" matters.
                let stream = TcpStream::connect(front).await?;
                let (r, w) = stream.into_split();
                let stream = r.reunite(w).expect("same stream");
                let mut s = stream;
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while s.read(&mut byte).await? == 1 && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                held.push(s);
                String::from_utf8_lossy(&line).into_owned()
            } else {
                one_connection(front, source).await?
            };
            if let Some(i) = table.names.iter().position(|n| *n == name) {
                counts[i].fetch_add(1, Ordering::Relaxed);
            }
            if i % 20 == 0 {
                table.row(strategy.as_str(), &counts, false);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        table.row(strategy.as_str(), &counts, true);
        drop(held);
        server.stop().await;
    }
    println!(
        "\nround-robin interleaves by weight (NGINX's smooth algorithm); least-connections balances\n\
         open connections per weight; weighted-random follows the weights on average; source-hash\n\
         pins each client address to one backend, the same on every weir instance.\n"
    );

    health_and_drain(&mut backends).await?;

    for b in &backends {
        b.task.abort();
    }
    println!("\ndone. Next: `weir run -c config/weir.yaml` (see README.md).");
    Ok(())
}

/// Runs an admin command as `weir ctl` would, and prints it with its reply.
async fn admin(server: &Server, line: &str) -> anyhow::Result<()> {
    let request = crate::admin::parse(line).map_err(|e| anyhow::anyhow!(e))?;
    let reply = crate::admin::execute(request, &server.handle)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    println!(
        "   $ weir ctl {line}\n   {}",
        reply.trim_end().replace('\n', "\n   ")
    );
    Ok(())
}

fn states(server: &Server, backends: &[DemoBackend]) -> String {
    backends
        .iter()
        .map(|b| {
            let state = server
                .backend("app", b.name)
                .map(|backend| backend.state().to_string())
                .unwrap_or_default();
            format!("{}={state}", b.name)
        })
        .collect::<Vec<_>>()
        .join("  ")
}

/// Sends `n` connections, one every `gap`, and prints who answered once a second.
async fn traffic(
    server: &Server,
    front: SocketAddr,
    backends: &[DemoBackend],
    n: usize,
    gap: Duration,
) {
    let mut counts = vec![0u64; backends.len()];
    let mut failed = 0u64;
    let mut last_print = tokio::time::Instant::now();
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(2), one_connection(front, None)).await {
            Ok(Ok(name)) => {
                if let Some(i) = backends.iter().position(|b| b.name == name) {
                    counts[i] += 1;
                }
            }
            _ => failed += 1,
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            let spread: Vec<String> = backends
                .iter()
                .zip(&counts)
                .map(|(b, c)| format!("{}:{c:>3}", b.name))
                .collect();
            println!(
                "   last second: {}  failed:{failed}   [{}]",
                spread.join(" "),
                states(server, backends)
            );
            counts.iter_mut().for_each(|c| *c = 0);
            failed = 0;
            last_print = tokio::time::Instant::now();
        }
        tokio::time::sleep(gap).await;
    }
}

/// Part 2: a backend dies and health checks take it out; part 3: a drain.
async fn health_and_drain(backends: &mut [DemoBackend]) -> anyhow::Result<()> {
    let mut config = demo_config(Strategy::RoundRobin, backends);
    config.pools[0].health_check = Some(crate::config::HealthCheckConfig {
        interval: Duration::from_millis(250),
        timeout: Duration::from_millis(200),
        rise: 2,
        fall: 2,
        port: None,
        send: None,
        expect: None,
    });
    let server = Server::start(config, None).await?;
    let front = server.listener_addr("demo").expect("demo listener");

    println!("2. A backend dies. Health checks every 250ms (fall 2, rise 2), round-robin:\n");
    traffic(&server, front, backends, 150, Duration::from_millis(10)).await;
    println!("   -- charlie's process dies (its port now refuses connections) --");
    // Wait until its listening socket is really closed, as with a dead process.
    backends[2].task.abort();
    let _ = (&mut backends[2].task).await;
    traffic(&server, front, backends, 250, Duration::from_millis(10)).await;
    println!(
        "   No client saw a failure: a refused connect is retried on another backend, and\n   \
         charlie was marked down after two failures in a row (fall 2) — here two refused\n   \
         connects from traffic, which come sooner than the next health check (see its log line).\n"
    );

    println!("3. Draining bravo for maintenance while a client holds a connection to it:\n");
    // Hold one connection that landed on bravo.
    let mut held = None;
    for _ in 0..10 {
        let stream = TcpStream::connect(front).await?;
        let (r, w) = stream.into_split();
        let mut stream = r.reunite(w).expect("same stream");
        let mut name = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read(&mut byte).await? == 1 && byte[0] != b'\n' {
            name.push(byte[0]);
        }
        if name == b"bravo" {
            held = Some(stream);
            break;
        }
    }
    let Some(mut held) = held else {
        anyhow::bail!("no connection reached bravo");
    };
    admin(&server, "drain app/bravo").await?;
    traffic(&server, front, backends, 100, Duration::from_millis(10)).await;
    held.write_all(b"still works\n").await?;
    let mut echo = [0u8; 12];
    held.read_exact(&mut echo).await?;
    println!(
        "   the held connection still works (echoed {:?}); closing it",
        String::from_utf8_lossy(&echo[..11])
    );
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server
        .backend("app", "bravo")
        .is_some_and(|b| b.state() != crate::backend::State::Drained)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin(&server, "show backends").await?;
    admin(&server, "enable app/bravo").await?;
    traffic(&server, front, backends, 100, Duration::from_millis(10)).await;
    server.stop().await;
    Ok(())
}
