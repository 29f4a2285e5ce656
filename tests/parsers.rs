//! Parsers of operator and untrusted input never panic (property tests, proptest on
//! stable): the YAML config, from arbitrary bytes and from structure-aware mutations of
//! the shipped files (and whatever `weir check` accepts also builds and starts), and the
//! admin protocol's line parser and its execution against a running server.
//!
//! Mutations never edit an address or bind line character by character: a mutated IP
//! literal may become a host name, and resolving it would send a DNS query off this
//! machine. They delete, duplicate, swap and truncate lines, and replace values with
//! others from a vocabulary of likely mistakes.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use weir::config::Config;
use weir::server::Server;

const SHIPPED: &[(&str, &str)] = &[
    ("config/weir.yaml", include_str!("../config/weir.yaml")),
    (
        "config/examples/postgres.yaml",
        include_str!("../config/examples/postgres.yaml"),
    ),
    (
        "config/examples/redis.yaml",
        include_str!("../config/examples/redis.yaml"),
    ),
    (
        "config/examples/dns.yaml",
        include_str!("../config/examples/dns.yaml"),
    ),
];

/// Values an operator might write in the wrong place.
const VALUES: &[&str] = &[
    "",
    "0",
    "-1",
    "1000",
    "1001",
    "18446744073709551616",
    "0s",
    "250ms",
    "2d",
    "5 m",
    "true",
    "maybe",
    "~",
    "[]",
    "{}",
    "[1, 2",
    "\"unterminated",
    "'x'",
    "*anchor",
    "&anchor x",
    "!!binary aGVsbG8=",
    "udp",
    "source-hash",
    "v3",
    "127.0.0.1:0",
    "[::1]:0",
    "\"\\x00\\xff\"",
];

#[derive(Clone, Debug)]
enum Mutation {
    Delete(usize),
    Duplicate(usize),
    Swap(usize, usize),
    Truncate(usize),
    ReplaceValue(usize, usize),
    Indent(usize, bool),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Duplicate),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>()).prop_map(|(l, v)| Mutation::ReplaceValue(l, v)),
        (any::<usize>(), any::<bool>()).prop_map(|(l, more)| Mutation::Indent(l, more)),
    ]
}

fn is_address_line(line: &str) -> bool {
    line.contains("address:") || line.contains("bind:") || line.contains("- ")
}

fn apply(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for m in mutations {
        if lines.is_empty() {
            break;
        }
        let n = lines.len();
        match *m {
            Mutation::Delete(i) => {
                lines.remove(i % n);
            }
            Mutation::Duplicate(i) => lines.insert(i % n, lines[i % n].clone()),
            Mutation::Swap(a, b) => lines.swap(a % n, b % n),
            Mutation::Truncate(i) => {
                let line = &mut lines[i % n];
                if !is_address_line(line) {
                    let cut = (i / n) % (line.len() + 1);
                    let cut = (0..=cut).rev().find(|&c| line.is_char_boundary(c)).unwrap();
                    line.truncate(cut);
                }
            }
            Mutation::ReplaceValue(i, v) => {
                let line = &mut lines[i % n];
                if let Some(colon) = line.find(": ")
                    && !is_address_line(line)
                {
                    line.truncate(colon + 2);
                    line.push_str(VALUES[v % VALUES.len()]);
                }
            }
            Mutation::Indent(i, more) => {
                let line = &mut lines[i % n];
                if more {
                    line.insert_str(0, "  ");
                } else if let Some(rest) = line.strip_prefix("  ") {
                    *line = rest.to_string();
                }
            }
        }
    }
    lines.join("\n") + "\n"
}

/// `config` with everything it binds or writes moved where a test may: listeners and
/// the metrics endpoint on 127.0.0.1:0, the admin socket and state file in a temp dir.
fn confined(mut config: Config, dir: &common::TempDir) -> Config {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    for l in &mut config.listeners {
        l.bind = any;
    }
    config.metrics_bind = config.metrics_bind.map(|_| any);
    config.admin_socket = config.admin_socket.as_ref().map(|_| dir.join("admin.sock"));
    config.state_file = config.state_file.as_ref().map(|_| dir.join("state"));
    config
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic_the_config_parser(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = weir::config::parse_with_warnings(&text, "fuzz.yaml");
    }

    #[test]
    fn mutated_shipped_configs_never_panic_the_parser(
        file in 0..SHIPPED.len(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let text = apply(SHIPPED[file].1, &mutations);
        if let Err(problems) = weir::config::parse(&text, SHIPPED[file].0) {
            // Every problem names the file, as `weir check` prints it.
            let shown = problems.to_string();
            prop_assert!(shown.contains(SHIPPED[file].0), "{}", shown);
        }
    }

    #[test]
    fn admin_lines_never_panic_the_parser_or_the_server(
        words in proptest::collection::vec(
            prop_oneof![
                Just("show".to_string()), Just("backends".to_string()),
                Just("listeners".to_string()), Just("info".to_string()),
                Just("--json".to_string()), Just("drain".to_string()),
                Just("disable".to_string()), Just("enable".to_string()),
                Just("set".to_string()), Just("weight".to_string()),
                Just("help".to_string()), Just("pool/a".to_string()),
                Just("pool/".to_string()), Just("/a".to_string()),
                Just("pool/a/b".to_string()), Just("0".to_string()),
                Just("1001".to_string()), Just("7".to_string()),
                "[ -~]{0,12}",
                "\\PC{0,4}",
            ],
            0..5,
        ),
    ) {
        let line = words.join(" ");
        let server = admin_server();
        if let Ok(request) = weir::admin::parse(&line) {
            let reply = runtime().block_on(weir::admin::execute(request, &server.handle));
            if let Err(e) = reply {
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}

/// One server for the admin cases, in front of a backend that is never connected to.
fn admin_server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let config = common::tcp_config(
            weir::balance::Strategy::RoundRobin,
            vec![common::backend_config("a", addr, 1)],
        );
        runtime().block_on(Server::start(config, None)).unwrap()
    })
}

static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
fn some_mutations_are_accepted_and_started() {
    // The property below is only worth something if it starts servers: run it here and
    // check that a fair share of its cases got that far.
    every_accepted_mutation_builds_and_starts();
    let started = STARTED.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        started >= 3,
        "only {started} of 24 mutated configs were accepted and started"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever the parser accepts builds and starts (with its binds confined to
    /// loopback port 0), and stops.
    #[test]
    fn every_accepted_mutation_builds_and_starts(
        file in 0..SHIPPED.len(),
        mutations in proptest::collection::vec(mutation(), 1..3),
    ) {
        let text = apply(SHIPPED[file].1, &mutations);
        if let Ok(config) = weir::config::parse(&text, SHIPPED[file].0) {
            let dir = common::TempDir::new("parsers");
            let config = confined(config, &dir);
            let started = runtime().block_on(async {
                let server = Server::start(config, None).await?;
                server.stop().await;
                anyhow::Ok(())
            });
            prop_assert!(started.is_ok(), "accepted but did not start: {:?}\n{}", started.err(), text);
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The seed files of fuzz target `target` (fuzz/corpus/TARGET/), by name.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            (path.display().to_string(), std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(
        seeds.len() >= 5,
        "only {} seeds in {}",
        seeds.len(),
        dir.display()
    );
    seeds
}

/// The fuzz targets' seed corpora still say what they were written to say, through the
/// entry functions the targets call: a seed that weir no longer accepts would only seed
/// the fuzzer with an error path. (The health_expect seeds are in that target's own
/// input format; its probe runs against a server of its own, not checked here.)
#[test]
fn every_fuzz_seed_is_still_accepted_by_its_parser() {
    for (name, bytes) in seeds("config") {
        let text = String::from_utf8(bytes).expect("a config seed is UTF-8");
        if let Err(problems) = weir::config::parse_with_warnings(&text, &name) {
            panic!("{name} is no longer a valid config:\n{problems}");
        }
    }
    for (name, bytes) in seeds("admin") {
        let line = String::from_utf8(bytes).expect("an admin seed is UTF-8");
        let parsed = weir::admin::parse(&line);
        assert!(parsed.is_ok(), "{name}: {line:?} -> {parsed:?}");
    }
    for (name, bytes) in seeds("proxy_protocol") {
        let header = weir::proxy_protocol::parse(&bytes);
        assert!(
            matches!(header, Ok(Some(h)) if h.len == bytes.len()),
            "{name}: not one complete header: {header:?}"
        );
    }
}
