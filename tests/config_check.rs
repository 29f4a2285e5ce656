//! `weir check`'s view of config files: every problem, each at its position, named as
//! the user wrote it; and valid files parsed with the contract's defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use weir::balance::Strategy;
use weir::config::{Config, OnDown, Protocol, load, parse};

const FILE: &str = "config/weir.yaml";

/// The problems `parse` reports, one rendered line each.
fn problems(text: &str) -> Vec<String> {
    match parse(text, FILE) {
        Ok(_) => panic!("expected problems, but the config is valid:\n{text}"),
        Err(e) => {
            let lines: Vec<String> = e.0.iter().map(|d| d.to_string()).collect();
            assert_eq!(e.to_string(), lines.join("\n"));
            lines
        }
    }
}

/// Asserts that one problem is reported at LINE:COLUMN and mentions every needle.
fn assert_problem(text: &str, line: u64, column: u64, needles: &[&str]) -> Vec<String> {
    let all = problems(text);
    let prefix = format!("{FILE}:{line}:{column}: ");
    let found = all
        .iter()
        .any(|p| p.starts_with(&prefix) && needles.iter().all(|n| p.contains(n)));
    assert!(
        found,
        "no problem at {line}:{column} mentioning {needles:?}; got:\n{}",
        all.join("\n")
    );
    all
}

fn valid(text: &str) -> Config {
    parse(text, FILE).unwrap_or_else(|e| panic!("expected a valid config, got:\n{e}"))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const MINIMAL: &str = "\
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: redis
pools:
  redis:
    backends:
      - address: 127.0.0.1:6379
";

// ----- valid files -----------------------------------------------------------------

#[test]
fn minimal_file_from_the_contract_gets_every_default() {
    let c = valid(MINIMAL);
    assert_eq!(c.admin_socket, None);
    assert_eq!(c.metrics_bind, None);
    assert_eq!(c.shutdown_timeout, Duration::from_secs(30));

    assert_eq!(c.listeners.len(), 1);
    let l = &c.listeners[0];
    assert_eq!(l.name, "redis");
    assert_eq!(l.bind, addr("127.0.0.1:7379"));
    assert_eq!(l.protocol, Protocol::Tcp);
    assert_eq!(l.pool, "redis");
    assert_eq!(l.max_connections, None);
    assert_eq!(l.idle_timeout, Duration::from_secs(3600));

    assert_eq!(c.pools.len(), 1);
    let p = &c.pools[0];
    assert_eq!(p.name, "redis");
    assert_eq!(p.strategy, Strategy::RoundRobin);
    assert_eq!(p.protocol, Protocol::Tcp);
    assert_eq!(p.connect_timeout, Duration::from_secs(3));
    assert_eq!(p.retries, 2);
    assert_eq!(p.health_check, None);
    assert_eq!(p.backends.len(), 1);
    let b = &p.backends[0];
    assert_eq!(b.name, "127.0.0.1:6379");
    assert_eq!(b.address, "127.0.0.1:6379");
    assert_eq!(b.addr, addr("127.0.0.1:6379"));
    assert_eq!(b.weight, 1);
}

#[test]
fn udp_listener_defaults_and_pool_protocol() {
    let c = valid(
        "\
listeners:
  dns:
    bind: \"[::1]:5353\"
    protocol: udp
    pool: dns
pools:
  dns:
    health_check:
      send_hex: 00
    backends:
      - address: \"[::1]:53\"
  unused:
    backends:
      - address: 127.0.0.1:53
",
    );
    let l = &c.listeners[0];
    assert_eq!(l.bind, addr("[::1]:5353"));
    assert_eq!(l.protocol, Protocol::Udp);
    assert_eq!(l.max_connections, Some(65536));
    assert_eq!(l.idle_timeout, Duration::from_secs(30));
    assert_eq!(c.pools[0].name, "dns");
    assert_eq!(c.pools[0].protocol, Protocol::Udp);
    assert_eq!(c.pools[0].backends[0].addr, addr("[::1]:53"));
    // A pool no listener uses is tcp.
    assert_eq!(c.pools[1].name, "unused");
    assert_eq!(c.pools[1].protocol, Protocol::Tcp);
}

#[test]
fn full_file_with_every_key() {
    let c = valid(
        "\
admin:
  socket: /run/weir/admin.sock
metrics:
  bind: 127.0.0.1:9490
shutdown_timeout: 250ms
listeners:
  zeta:
    bind: 127.0.0.1:7000
    protocol: tcp
    pool: redis
    max_connections: 100
    idle_timeout: 5m
  alpha:
    bind: 0.0.0.0:7001
    protocol: udp
    pool: dns
    max_connections: 7
    idle_timeout: 1h30m
pools:
  redis:
    strategy: weighted-random
    connect_timeout: 2s
    retries: 4294967296000
    health_check:
      interval: 3s
      timeout: 750ms
      rise: 5
      fall: 1
      port: 8008
      send: \"PING\\r\\n\\x01\"
      expect: '+PONG'
    backends:
      - address: 127.0.0.1:6379
        name: primary
        weight: 1000
      - address: localhost:6380
  dns:
    strategy: source-hash
    connect_timeout: 1s
    retries: 0
    health_check:
      send_hex: \"DE ad BE ef\"
      expect: \"ok\"
    backends:
      - address: 127.0.0.1:53
        weight: 3
",
    );
    assert_eq!(c.admin_socket, Some(PathBuf::from("/run/weir/admin.sock")));
    assert_eq!(c.metrics_bind, Some(addr("127.0.0.1:9490")));
    assert_eq!(c.shutdown_timeout, Duration::from_millis(250));

    // Sorted by name, not in file order.
    let names: Vec<&str> = c.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["alpha", "zeta"]);
    let (alpha, zeta) = (&c.listeners[0], &c.listeners[1]);
    assert_eq!(alpha.bind, addr("0.0.0.0:7001"));
    assert_eq!(alpha.protocol, Protocol::Udp);
    assert_eq!(alpha.pool, "dns");
    assert_eq!(alpha.max_connections, Some(7));
    assert_eq!(alpha.idle_timeout, Duration::from_secs(5400));
    assert_eq!(zeta.protocol, Protocol::Tcp);
    assert_eq!(zeta.max_connections, Some(100));
    assert_eq!(zeta.idle_timeout, Duration::from_secs(300));

    let names: Vec<&str> = c.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["dns", "redis"]);
    let (dns, redis) = (&c.pools[0], &c.pools[1]);
    assert_eq!(dns.strategy, Strategy::SourceHash);
    assert_eq!(dns.protocol, Protocol::Udp);
    assert_eq!(dns.retries, 0);
    let dc = dns.health_check.as_ref().unwrap();
    assert_eq!(dc.send.as_deref(), Some(&[0xde, 0xad, 0xbe, 0xef][..]));
    assert_eq!(dc.expect.as_deref(), Some(&b"ok"[..]));
    assert_eq!(dc.interval, Duration::from_secs(2));
    assert_eq!(dc.timeout, Duration::from_secs(1));
    assert_eq!((dc.rise, dc.fall, dc.port), (2, 3, None));
    assert_eq!(dns.backends[0].weight, 3);

    assert_eq!(redis.strategy, Strategy::WeightedRandom);
    assert_eq!(redis.protocol, Protocol::Tcp);
    assert_eq!(redis.connect_timeout, Duration::from_secs(2));
    // A huge number of retries is accepted (and saturates).
    assert_eq!(redis.retries, u32::MAX);
    let rc = redis.health_check.as_ref().unwrap();
    assert_eq!(rc.interval, Duration::from_secs(3));
    assert_eq!(rc.timeout, Duration::from_millis(750));
    assert_eq!((rc.rise, rc.fall, rc.port), (5, 1, Some(8008)));
    // YAML escapes are applied by the parser: \r \n \x01 are single bytes.
    assert_eq!(rc.send.as_deref(), Some(&b"PING\r\n\x01"[..]));
    assert_eq!(rc.expect.as_deref(), Some(&b"+PONG"[..]));
    assert_eq!(redis.backends.len(), 2);
    assert_eq!(redis.backends[0].name, "primary");
    assert_eq!(redis.backends[0].weight, 1000);
    // A DNS name is kept as written (weir resolves it when it starts, never the config
    // loader); the name defaults to the address as written.
    let local = &redis.backends[1];
    assert_eq!(local.name, "localhost:6380");
    assert_eq!(local.address, "localhost:6380");
    let host = local.host.as_ref().expect("a host name");
    assert_eq!((host.name.as_str(), host.port), ("localhost", 6380));
    assert!(local.is_unresolved(), "not asked of DNS while loading");
    assert!(
        redis.backends[0].host.is_none(),
        "an IP literal is no host name"
    );
}

#[test]
fn empty_health_check_means_all_check_defaults() {
    let c = valid(&MINIMAL.replace("    backends:", "    health_check: {}\n    backends:"));
    let hc = c.pools[0].health_check.as_ref().unwrap();
    assert_eq!(hc.interval, Duration::from_secs(2));
    assert_eq!(hc.timeout, Duration::from_secs(1));
    assert_eq!((hc.rise, hc.fall, hc.port), (2, 3, None));
    assert_eq!((&hc.send, &hc.expect), (&None, &None));
}

#[test]
fn same_address_over_tcp_and_udp_is_allowed() {
    let c = valid(
        "\
listeners:
  t:
    bind: 127.0.0.1:5353
    pool: t
  u:
    bind: 127.0.0.1:5353
    protocol: udp
    pool: u
pools:
  t:
    backends:
      - address: 127.0.0.1:53
  u:
    backends:
      - address: 127.0.0.1:53
",
    );
    assert_eq!(c.listeners.len(), 2);
}

// ----- one bad-config case each --------------------------------------------------------

#[test]
fn yaml_syntax_error_has_the_parser_position() {
    assert_problem(
        "\
listeners:
  redis:
    bind: \"127.0.0.1:7379
    pool: redis
",
        3,
        11,
        &["unclosed quote"],
    );
    assert_problem(
        "\
listeners:
  redis:
    bind: 127.0.0.1:7379
     pool: redis
",
        4,
        10,
        &["mapping values are not allowed"],
    );
}

#[test]
fn unknown_key_is_named_with_the_keys_allowed_there() {
    let all = assert_problem(
        "\
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: redis
pools:
  redis:
    stratgy: least-connections
    backends:
      - address: 127.0.0.1:6379
",
        7,
        5,
        &[
            "unknown key \"stratgy\"",
            "in a pool",
            "strategy, connect_timeout, retries, on_down, queue_timeout,",
        ],
    );
    assert_eq!(all.len(), 1);
    assert_problem(
        "shutdown_timeot: 3s\n",
        1,
        1,
        &[
            "unknown key \"shutdown_timeot\"",
            "admin, metrics, shutdown_timeout",
        ],
    );
    assert_problem(
        &MINIMAL.replace(
            "address: 127.0.0.1:6379",
            "address: 127.0.0.1:6379\n        wieght: 2",
        ),
        9,
        9,
        &[
            "unknown key \"wieght\"",
            "in a backend",
            "address, name, weight",
        ],
    );
}

#[test]
fn unknown_strategy_lists_the_valid_ones() {
    assert_problem(
        "\
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: redis
pools:
  redis:
    strategy: round-robbin
    backends:
      - address: 127.0.0.1:6379
",
        7,
        15,
        &[
            "unknown strategy \"round-robbin\" (expected one of: round-robin, least-connections, weighted-random, source-hash)",
        ],
    );
}

#[test]
fn unknown_protocol_lists_the_valid_ones() {
    assert_problem(
        &MINIMAL.replace("    pool: redis\n", "    pool: redis\n    protocol: sctp\n"),
        5,
        15,
        &["unknown protocol \"sctp\"", "tcp, udp"],
    );
}

#[test]
fn bad_duration_names_the_key_and_the_value() {
    let text = "\
shutdown_timeout: soon
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: redis
    idle_timeout: 10
pools:
  redis:
    connect_timeout: 3 parsecs
    backends:
      - address: 127.0.0.1:6379
";
    assert_problem(text, 1, 19, &["shutdown_timeout", "\"soon\""]);
    assert_problem(text, 6, 19, &["idle_timeout", "\"10\"", "no unit"]);
    assert_problem(text, 9, 22, &["connect_timeout", "\"3 parsecs\"", "unit"]);
}

#[test]
fn listener_naming_a_missing_pool() {
    assert_problem(
        &MINIMAL.replace("    pool: redis", "    pool: rediss"),
        4,
        11,
        &[
            "listener \"redis\"",
            "pool \"rediss\"",
            "not defined",
            "redis",
        ],
    );
}

#[test]
fn two_listeners_on_one_bind_address() {
    let text = "\
listeners:
  first:
    bind: 127.0.0.1:7379
    pool: redis
  second:
    bind: 127.0.0.1:7379
    pool: redis
  third:
    bind: 0.0.0.0:7379
    pool: redis
pools:
  redis:
    backends:
      - address: 127.0.0.1:6379
";
    let all = assert_problem(
        text,
        6,
        11,
        &["\"second\"", "127.0.0.1:7379", "listener \"first\""],
    );
    // A wildcard address overlaps every address of its family on that port.
    assert_problem(
        text,
        9,
        11,
        &["\"third\"", "0.0.0.0:7379", "listener \"first\""],
    );
    assert_eq!(all.len(), 2, "{all:?}");
}

#[test]
fn listener_on_the_metrics_address() {
    assert_problem(
        &format!("metrics:\n  bind: 127.0.0.1:7379\n{MINIMAL}"),
        5,
        11,
        &["127.0.0.1:7379", "metrics"],
    );
}

#[test]
fn weight_out_of_range() {
    let text = "\
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: redis
pools:
  redis:
    backends:
      - address: 127.0.0.1:6379
        weight: 0
      - address: 127.0.0.1:6380
        weight: 1001
      - address: 127.0.0.1:6381
        weight: heavy
";
    assert_problem(text, 9, 17, &["weight 0", "1..=1000"]);
    assert_problem(text, 11, 17, &["weight 1001", "1..=1000"]);
    assert_problem(text, 13, 17, &["weight \"heavy\"", "whole number"]);
}

#[test]
fn empty_pool() {
    let text = "\
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: redis
pools:
  redis:
    backends: []
  spare:
    strategy: source-hash
";
    assert_problem(text, 7, 15, &["pool \"redis\"", "no backends"]);
    // No `backends` key at all: at the pool's name.
    assert_problem(text, 8, 3, &["pool \"spare\"", "no backends"]);
}

#[test]
fn bad_bind_address() {
    let text = "\
metrics:
  bind: 127.0.0.1
listeners:
  a:
    bind: localhost:7379
    pool: redis
  b:
    bind: ::1:7379
    pool: redis
  c:
    bind: 127.0.0.1:99999
    pool: redis
pools:
  redis:
    backends:
      - address: 127.0.0.1:6379
";
    assert_problem(text, 2, 9, &["\"127.0.0.1\"", "no port", "IP:PORT"]);
    assert_problem(
        text,
        5,
        11,
        &[
            "\"localhost:7379\"",
            "not an IP address",
            "IP:PORT or [IPv6]:PORT",
        ],
    );
    assert_problem(text, 8, 11, &["\"::1:7379\"", "brackets"]);
    assert_problem(text, 11, 11, &["\"127.0.0.1:99999\"", "port \"99999\""]);
}

#[test]
fn bad_backend_address() {
    let text = "\
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: redis
pools:
  redis:
    backends:
      - address: 127.0.0.1
      - address: db:x
      - address: 127.0.0.1:0
";
    assert_problem(text, 8, 18, &["\"127.0.0.1\"", "no port", "HOST:PORT"]);
    assert_problem(text, 9, 18, &["\"db:x\"", "port \"x\""]);
    assert_problem(text, 10, 18, &["\"127.0.0.1:0\"", "port 0"]);
}

#[test]
fn a_backend_host_that_does_not_resolve_is_a_warning_naming_it() {
    // `.invalid` never resolves (RFC 6761); the other backend is an IP.
    let text = MINIMAL.replace(
        "      - address: 127.0.0.1:6379\n",
        "      - address: 127.0.0.1:6379\n      - address: no-such-host.invalid:6379\n        name: replica\n",
    );
    let (code, stdout, stderr) = weir_check("unresolved", &text);
    assert_eq!(
        code,
        Some(0),
        "a DNS blip at boot never fails the check: {stderr}"
    );
    assert!(stdout.contains("FILE: ok"), "{stdout}");
    let warning = stderr.lines().find(|l| l.contains("no-such-host.invalid"));
    let warning = warning.unwrap_or_else(|| panic!("no warning names the host: {stderr}"));
    assert!(
        warning.starts_with("FILE:9:18: warning: "),
        "at the address: {warning}"
    );
    for needle in [
        "backend \"replica\"",
        "pool \"redis\"",
        "does not resolve",
        "starts down",
    ] {
        assert!(warning.contains(needle), "{needle:?} missing: {warning}");
    }
}

#[test]
fn a_backend_host_that_can_never_resolve_is_an_error() {
    let text = MINIMAL.replace("127.0.0.1:6379", "db..internal:6379");
    assert_problem(&text, 8, 18, &["\"db..internal\" is not a host name"]);
    let text = MINIMAL.replace("127.0.0.1:6379", "_pg._tcp.internal:6379");
    assert_problem(&text, 8, 18, &["names SRV records", "discover"]);
}

#[test]
fn duplicate_backend_names_within_a_pool() {
    let text = "\
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: redis
pools:
  redis:
    backends:
      - address: 127.0.0.1:6379
        name: main
      - address: 127.0.0.1:6380
        name: main
      - address: 127.0.0.1:6379
  other:
    backends:
      - address: 127.0.0.1:6379
        name: main
";
    let all = assert_problem(
        text,
        11,
        15,
        &[
            "duplicate backend name \"main\"",
            "pool \"redis\"",
            "line 9",
        ],
    );
    // The third backend is named by its address, which is no other backend's name (the
    // first is "main"), so it is fine; "main" again in another pool is fine too.
    assert_eq!(all.len(), 1, "{all:?}");
    assert_problem(
        &MINIMAL.replace(
            "      - address: 127.0.0.1:6379\n",
            "      - address: 127.0.0.1:6379\n      - address: 127.0.0.1:6379\n",
        ),
        9,
        18,
        &["duplicate backend name \"127.0.0.1:6379\""],
    );
}

#[test]
fn zero_rise_fall_interval_timeout() {
    let text = "\
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: redis
pools:
  redis:
    health_check:
      interval: 0s
      timeout: 0ms
      rise: 0
      fall: 0
    backends:
      - address: 127.0.0.1:6379
";
    assert_problem(text, 8, 17, &["interval \"0s\"", "more than zero"]);
    assert_problem(text, 9, 16, &["timeout \"0ms\"", "more than zero"]);
    assert_problem(text, 10, 13, &["rise 0"]);
    assert_problem(text, 11, 13, &["fall 0"]);
    assert_eq!(problems(text).len(), 4);
}

#[test]
fn send_and_send_hex_both_set() {
    assert_problem(
        "\
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: redis
pools:
  redis:
    health_check:
      send: \"PING\\r\\n\"
      send_hex: 50494e470d0a
    backends:
      - address: 127.0.0.1:6379
",
        9,
        17,
        &["send and send_hex"],
    );
}

#[test]
fn bad_send_hex() {
    assert_problem(
        &MINIMAL.replace(
            "    backends:",
            "    health_check:\n      send_hex: 0g1\n    backends:",
        ),
        8,
        17,
        &["send_hex \"0g1\"", "'g'"],
    );
}

#[test]
fn expect_without_send_checks_the_greeting() {
    // The server speaks first (SSH, SMTP, MySQL): connect, read, look for `expect`.
    let c = valid(&MINIMAL.replace(
        "    backends:",
        "    health_check:\n      expect: \"SSH-2.0-\"\n    backends:",
    ));
    let hc = c.pools[0].health_check.as_ref().unwrap();
    assert_eq!(hc.send, None);
    assert_eq!(hc.expect.as_deref(), Some(&b"SSH-2.0-"[..]));
}

#[test]
fn udp_health_check_needs_a_datagram_to_send() {
    let text = "\
listeners:
  dns:
    bind: 127.0.0.1:5353
    protocol: udp
    pool: dns
pools:
  dns:
    health_check:
      interval: 1s
    backends:
      - address: 127.0.0.1:53
";
    assert_problem(
        text,
        9,
        7,
        &["pool \"dns\"", "UDP health check needs a datagram to send"],
    );
}

#[test]
fn pool_used_over_tcp_and_udp() {
    assert_problem(
        "\
listeners:
  a:
    bind: 127.0.0.1:5353
    pool: dns
  b:
    bind: 127.0.0.1:5353
    protocol: udp
    pool: dns
pools:
  dns:
    backends:
      - address: 127.0.0.1:53
",
        8,
        11,
        &[
            "pool \"dns\"",
            "tcp listener \"a\"",
            "udp listener \"b\"",
            "one protocol",
        ],
    );
}

#[test]
fn listener_missing_its_keys() {
    let text = "\
listeners:
  a:
    protocol: tcp
  b:
pools:
  p:
    backends:
      - address: 127.0.0.1:1
";
    assert_problem(text, 2, 3, &["listener \"a\"", "no bind"]);
    assert_problem(text, 2, 3, &["listener \"a\"", "no pool"]);
    assert_problem(text, 4, 3, &["listener \"b\"", "no settings"]);
}

#[test]
fn names_that_admin_commands_could_not_address() {
    let text = "\
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: a/b
pools:
  a/b:
    backends:
      - address: 127.0.0.1:6379
        name: my backend
";
    assert_problem(text, 6, 3, &["pool name \"a/b\"", "'/'"]);
    assert_problem(text, 9, 15, &["backend name \"my backend\"", "whitespace"]);
}

#[test]
fn duplicate_listener_name_is_a_yaml_error() {
    assert_problem(
        &MINIMAL.replace(
            "pools:",
            "  redis:\n    bind: 127.0.0.1:1\n    pool: redis\npools:",
        ),
        5,
        3,
        &["duplicate key \"redis\""],
    );
}

#[test]
fn wrong_shape_of_value() {
    assert_problem(
        &MINIMAL.replace("      - address: 127.0.0.1:6379", "      - 127.0.0.1:6379"),
        8,
        9,
        &["expected a mapping"],
    );
}

#[test]
fn no_position_uses_the_key_path() {
    let all = problems("shutdown_timeout: 1s\n");
    assert!(
        all.contains(&format!(
            "{FILE}: listeners: no listeners: at least one listener is needed"
        )),
        "{all:?}"
    );
    assert!(
        all.contains(&format!(
            "{FILE}: pools: no pools: at least one pool is needed"
        )),
        "{all:?}"
    );
    let empty = problems("");
    assert_eq!(empty.len(), 1);
    assert!(empty[0].starts_with(&format!("{FILE}: ")), "{empty:?}");
}

#[test]
fn every_problem_in_a_file_is_reported() {
    let text = "\
shutdown_timeout: 30 secs please
listeners:
  a:
    bind: 127.0.0.1:7000
    pool: web
  b:
    bind: 127.0.0.1:7000
    pool: wbe
pools:
  web:
    strategy: fastest
    connect_timeout: 0s
    health_check:
      rise: 0
      send_hex: 0x
    backends:
      - address: 127.0.0.1:8080
        weight: 5000
      - address: 127.0.0.1
  empty:
    backends: []
";
    let all = problems(text);
    let expected = [
        (1, 19, "shutdown_timeout"),
        (7, 11, "listener \"a\""),
        (8, 11, "\"wbe\""),
        (11, 15, "\"fastest\""),
        (12, 22, "connect_timeout"),
        (14, 13, "rise 0"),
        (15, 17, "send_hex \"0x\""),
        (18, 17, "weight 5000"),
        (19, 18, "\"127.0.0.1\""),
        (21, 15, "pool \"empty\""),
    ];
    for (line, column, needle) in expected {
        let prefix = format!("{FILE}:{line}:{column}: ");
        assert!(
            all.iter()
                .any(|p| p.starts_with(&prefix) && p.contains(needle)),
            "missing {line}:{column} {needle}; got:\n{}",
            all.join("\n")
        );
    }
    assert_eq!(all.len(), expected.len(), "{}", all.join("\n"));
    // Reported in file order, with the position also in the structured form.
    let err = parse(text, FILE).unwrap_err();
    let positions: Vec<_> = err.0.iter().map(|d| d.position.unwrap()).collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(positions, sorted);
    assert_eq!(err.0[0].file, FILE);
    assert_eq!(err.0[0].key_path, None);
}

// ----- the shipped files -----------------------------------------------------------

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn reference_config_loads() {
    let path = manifest_dir().join(weir::config::DEFAULT_PATH);
    let c = load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.admin_socket.is_some());
    assert!(c.metrics_bind.is_some());
    assert!(c.listeners.iter().any(|l| l.protocol == Protocol::Udp));
    assert!(c.listeners.iter().any(|l| l.protocol == Protocol::Tcp));
    let dns = c.pools.iter().find(|p| p.name == "dns").unwrap();
    assert_eq!(dns.protocol, Protocol::Udp);
    let check = dns.health_check.as_ref().unwrap();
    // The DNS query from send_hex: id 0x1234, then flags, one question for example.com.
    let send = check.send.as_ref().unwrap();
    assert_eq!(&send[..4], &[0x12, 0x34, 0x01, 0x00]);
    assert!(send.windows(13).any(|w| w == b"\x07example\x03com\x00"));
    assert_eq!(check.expect.as_deref(), Some(&b"\x07example\x03com"[..]));
}

#[test]
fn every_shipped_config_parses() {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["config", "config/examples"] {
        for entry in std::fs::read_dir(manifest_dir().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    for f in &files {
        if let Err(e) = load(f) {
            panic!("{} does not parse:\n{e}", f.display());
        }
    }
}

#[test]
fn example_health_checks_send_what_they_say() {
    let pg = load(&manifest_dir().join("config/examples/postgres.yaml")).unwrap();
    let primary = pg.pools.iter().find(|p| p.name == "pg-primary").unwrap();
    assert_eq!(primary.strategy, Strategy::LeastConnections);
    let hc = primary.health_check.as_ref().unwrap();
    assert_eq!(hc.port, Some(8008));
    assert_eq!(
        hc.send.as_deref(),
        Some(&b"GET /primary HTTP/1.0\r\n\r\n"[..])
    );
    assert_eq!(hc.expect.as_deref(), Some(&b"200 OK"[..]));

    let redis = load(&manifest_dir().join("config/examples/redis.yaml")).unwrap();
    let hc = redis.pools[0].health_check.as_ref().unwrap();
    assert_eq!(hc.send.as_deref(), Some(&b"INFO replication\r\n"[..]));
    assert_eq!(hc.expect.as_deref(), Some(&b"role:master"[..]));

    let dns = load(&manifest_dir().join("config/examples/dns.yaml")).unwrap();
    let udp = dns.pools.iter().find(|p| p.name == "dns-udp").unwrap();
    assert_eq!(udp.protocol, Protocol::Udp);
    let hc = udp.health_check.as_ref().unwrap();
    let send = hc.send.as_ref().unwrap();
    assert_eq!(send.len(), 12 + 13 + 4);
    assert_eq!(hc.expect.as_deref(), Some(&b"\x07example\x03com\x00"[..]));
}

#[test]
fn unreadable_file() {
    let err = load(Path::new("/nonexistent/weir.yaml")).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert!(
        err.to_string()
            .starts_with("/nonexistent/weir.yaml: cannot read"),
        "{err}"
    );
}

#[test]
fn escapes_outside_double_quotes_are_named_with_the_fix() {
    let text = "listeners:
  front:
    bind: 127.0.0.1:7379
    pool: redis
pools:
  redis:
    health_check:
      send: PING\\r\\n
      expect: '+PONG\\r\\n'
    backends:
      - address: 127.0.0.1:6379
";
    assert_problem(
        text,
        8,
        13,
        &[
            "send contains \"\\r\" as two characters",
            "write send: \"PING\\r\\n\"",
        ],
    );
    assert_problem(text, 9, 15, &["expect contains \"\\r\" as two characters"]);
    // Double-quoted, YAML turns them into the bytes: valid.
    let quoted = text
        .replace("send: PING\\r\\n", "send: \"PING\\r\\n\"")
        .replace("expect: '+PONG\\r\\n'", "expect: \"+PONG\"");
    let config = valid(&quoted);
    assert_eq!(
        config.pools[0]
            .health_check
            .as_ref()
            .unwrap()
            .send
            .as_deref(),
        Some(&b"PING\r\n"[..])
    );
}

#[test]
fn a_number_above_its_range_names_the_upper_bound() {
    let text = "listeners:
  front:
    bind: 127.0.0.1:7379
    pool: p
pools:
  p:
    health_check:
      rise: 99999999999
    backends:
      - address: 127.0.0.1:6379
";
    assert_problem(
        text,
        8,
        13,
        &["rise 99999999999 is out of range: it must be at most"],
    );
}

// ----- issue 13 ----------------------------------------------------------------------

/// Writes `text` to a fresh file and runs `weir check -c` on it: (exit code, stdout, stderr).
fn weir_check(name: &str, text: &str) -> (Option<i32>, String, String) {
    let dir = std::env::temp_dir().join(format!("weir-config-check-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("weir.yaml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text =
        |b: Vec<u8>| String::from_utf8_lossy(&b).replace(&path.display().to_string(), "FILE");
    (out.status.code(), text(out.stdout), text(out.stderr))
}

const TYPO_AND_ZERO_WEIGHT: &str = "\
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: redis
    idle_timout: 5m
pools:
  redis:
    backends:
      - address: 127.0.0.1:6379
        weight: 0
";

#[test]
fn schema_and_value_problems_come_out_together() {
    let all = problems(TYPO_AND_ZERO_WEIGHT);
    assert_problem(
        TYPO_AND_ZERO_WEIGHT,
        5,
        5,
        &["unknown key \"idle_timout\"", "in a listener"],
    );
    assert_problem(TYPO_AND_ZERO_WEIGHT, 10, 17, &["weight 0", "1..=1000"]);
    assert_eq!(all.len(), 2, "{all:?}");

    // Values of the wrong shape, unknown keys at every level, a duplicate key and bad
    // values: each reported at its place, in one run.
    let text = "\
shutdown_timeout: [1s]
admin:
  sokcet: /run/weir.sock
listeners:
  a:
    bind: 127.0.0.1:7000
    pool: web
    protocol: {tcp: yes}
  a:
    bind: 127.0.0.1:7001
pools:
  web:
    strategy: fastest
    health_check:
      intervall: 1s
    backends:
      - 127.0.0.1:8080
      - address: 127.0.0.1:8081
        wieght: 2
        weight: 1001
";
    let expected = [
        (
            1,
            19,
            "expected a single value here for shutdown_timeout, found a list",
        ),
        (
            3,
            3,
            "unknown key \"sokcet\" in admin; did you mean \"socket\"?",
        ),
        (
            8,
            15,
            "expected a single value here for protocol, found a mapping",
        ),
        (9, 3, "duplicate key \"a\""),
        (13, 15, "unknown strategy \"fastest\""),
        (
            15,
            7,
            "unknown key \"intervall\" in a health_check; did you mean \"interval\"?",
        ),
        (
            17,
            9,
            "expected a mapping (`key: value` entries) here for a backend, found a single value",
        ),
        (
            19,
            9,
            "unknown key \"wieght\" in a backend; did you mean \"weight\"?",
        ),
        (20, 17, "weight 1001"),
    ];
    let all = problems(text);
    for (line, column, needle) in expected {
        assert_problem(text, line, column, &[needle]);
    }
    assert_eq!(all.len(), expected.len(), "{}", all.join("\n"));
}

#[test]
fn a_misspelled_key_is_not_also_reported_missing() {
    let text = MINIMAL
        .replace("    bind: 127.0.0.1:7379", "    bnid: 127.0.0.1:7379")
        .replace(
            "      - address: 127.0.0.1:6379",
            "      - adress: 127.0.0.1:6379",
        );
    let all = problems(&text);
    assert_problem(
        &text,
        3,
        5,
        &["unknown key \"bnid\"", "did you mean \"bind\"?"],
    );
    assert_problem(
        &text,
        8,
        9,
        &["unknown key \"adress\"", "did you mean \"address\"?"],
    );
    assert_eq!(all.len(), 2, "{all:?}");
    // A hint for a key that is there anyway: the other key's absence is still reported.
    let text = MINIMAL.replace("    pool: redis\n", "    pool: redis\n    pools: x\n");
    let all = problems(&text);
    assert_problem(
        &text,
        5,
        5,
        &["unknown key \"pools\"", "did you mean \"pool\"?"],
    );
    assert_eq!(all.len(), 1, "{all:?}");
}

#[test]
fn weir_check_names_every_line() {
    let (code, stdout, stderr) = weir_check("every-line", TYPO_AND_ZERO_WEIGHT);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines[0].starts_with(
            "FILE:5:5: unknown key \"idle_timout\" in a listener; did you mean \"idle_timeout\"?"
        ),
        "{stderr}"
    );
    assert!(lines[1].starts_with("FILE:10:17: weight 0"), "{stderr}");
    assert_eq!(lines.len(), 2, "{stderr}");
}

#[test]
fn every_duration_has_a_range() {
    let text = "\
shutdown_timeout: 25h
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: redis
    idle_timeout: 30d
pools:
  redis:
    connect_timeout: 500us
    health_check:
      interval: 10000000000000000s
      timeout: 300000000000y
    backends:
      - address: 127.0.0.1:6379
";
    assert_problem(
        text,
        1,
        19,
        &["shutdown_timeout \"25h\" is too long", "0s..=24h"],
    );
    assert_problem(
        text,
        6,
        19,
        &["idle_timeout \"30d\" is too long", "1ms..=24d"],
    );
    assert_problem(
        text,
        9,
        22,
        &["connect_timeout \"500us\" is too short", "1ms..=1h"],
    );
    assert_problem(
        text,
        11,
        17,
        &["interval \"10000000000000000s\"", "1ms..=24h"],
    );
    assert_problem(
        text,
        12,
        16,
        &["timeout \"300000000000y\" is too long", "1ms..=1h"],
    );
    assert_eq!(problems(text).len(), 5);

    // The bounds themselves are fine.
    let c = valid(
        &MINIMAL
            .replace("    pool: redis\n", "    pool: redis\n    idle_timeout: 24d\n")
            .replace(
                "    backends:",
                "    connect_timeout: 1h\n    health_check:\n      interval: 24h\n      timeout: 1ms\n    backends:",
            ),
    );
    assert_eq!(
        c.listeners[0].idle_timeout,
        Duration::from_secs(24 * 86_400)
    );
    let hc = c.pools[0].health_check.as_ref().unwrap();
    assert_eq!(hc.interval, Duration::from_secs(86_400));
    assert_eq!(hc.timeout, Duration::from_millis(1));
    assert!(
        valid(&format!("shutdown_timeout: 0s\n{MINIMAL}"))
            .shutdown_timeout
            .is_zero()
    );
}

#[test]
fn send_and_expect_escapes_are_bytes() {
    let check = |lines: &str| {
        let c = valid(&MINIMAL.replace(
            "    backends:",
            &format!("    health_check:\n{lines}    backends:"),
        ));
        let hc = c.pools[0].health_check.clone().unwrap();
        (hc.send, hc.expect)
    };
    // \xc0 is the byte 0xc0, not U+00C0 as UTF-8 (0xc3 0x80).
    let (send, expect) = check(
        "      send: \"\\x16\\x03\\x01\\xff\"\n      expect: \"\\x00\\x04\\xc0\\x00\\x02\\x01\"\n",
    );
    assert_eq!(send.as_deref(), Some(&[0x16, 0x03, 0x01, 0xff][..]));
    assert_eq!(
        expect.as_deref(),
        Some(&[0x00, 0x04, 0xc0, 0x00, 0x02, 0x01][..])
    );
    // A character written as itself (or as \u) is its UTF-8.
    let (_, expect) = check("      send: x\n      expect: \"é\\u00e9\"\n");
    assert_eq!(expect.as_deref(), Some("éé".as_bytes()));
    // expect_hex, beside send_hex.
    let (_, expect) = check("      expect_hex: \"00 04 C0\"\n");
    assert_eq!(expect.as_deref(), Some(&[0x00, 0x04, 0xc0][..]));
    // Inside double quotes, \\r is a deliberate backslash: no "two characters" problem.
    let (send, _) = check("      send: \"a\\\\r\"\n");
    assert_eq!(send.as_deref(), Some(&b"a\\r"[..]));

    let text = MINIMAL.replace(
        "    backends:",
        "    health_check:\n      expect: ok\n      expect_hex: 6f6b\n    backends:",
    );
    assert_problem(&text, 9, 19, &["expect and expect_hex are both set"]);
    let text = MINIMAL.replace(
        "    backends:",
        "    health_check:\n      expect_hex: 6g\n    backends:",
    );
    assert_problem(&text, 8, 19, &["bad expect_hex \"6g\"", "'g'"]);
    let text = MINIMAL.replace(
        "    backends:",
        "    health_check:\n      expect_hex: \"\"\n    backends:",
    );
    assert_problem(&text, 8, 19, &["expect_hex is empty"]);
}

#[test]
fn admin_socket_path_fits_what_run_binds() {
    // weir binds DIR/.weir-admin.PID/s first, then renames it to the path: both must fit
    // in sun_path (108 bytes on Linux, with the NUL).
    let max = weir::config::SOCKET_PATH_MAX;
    let staging = |p: &Path| weir::config::admin_socket_staging(p, 4_194_304);
    let extra = staging(Path::new("/d/x")).as_os_str().len() - "/d".len();
    let dir_max = max - extra;

    let base = std::env::temp_dir().join(format!("wsock{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    // A directory of exactly `len` bytes under `base`.
    let dir_of = |len: usize| {
        let pad = len - base.as_os_str().len() - 1;
        base.join("d".repeat(pad))
    };
    let config = |socket: &Path| format!("admin:\n  socket: {}\n{MINIMAL}", socket.display());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // At the limit: check accepts it and the admin socket really binds there.
    let dir = dir_of(dir_max);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("s".repeat(max - dir_max - 1));
    assert_eq!(socket.as_os_str().len(), max);
    let c = valid(&config(&socket));
    assert_eq!(c.admin_socket.as_deref(), Some(socket.as_path()));
    runtime.block_on(async {
        let bound = weir::admin::AdminSocket::bind(&socket).await;
        assert!(bound.is_ok(), "{:#}", bound.err().unwrap());
    });

    // One byte more in the directory: with the longest PID the staging path wouldn't
    // fit, so check refuses it (whatever PID this run has).
    let dir = dir_of(dir_max + 1);
    let socket = dir.join("a.sock");
    assert!(socket.as_os_str().len() < 100);
    let all = assert_problem(
        &config(&socket),
        2,
        11,
        &[
            "admin socket path is too long",
            &format!("at most {max} bytes"),
            &format!("its directory can be at most {dir_max} bytes"),
        ],
    );
    assert_eq!(all.len(), 1, "{all:?}");
    // Where this process's own staging path doesn't fit, bind does fail: what check
    // prevents.
    let own = weir::config::admin_socket_staging(Path::new("/d/x"), std::process::id())
        .as_os_str()
        .len()
        - "/d".len();
    let dir = dir_of(max - own + 1);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("a.sock");
    assert!(!problems(&config(&socket)).is_empty());
    runtime.block_on(async {
        assert!(weir::admin::AdminSocket::bind(&socket).await.is_err());
    });
    // The path itself too long, in a short directory.
    let socket = base.join("s".repeat(max));
    assert_problem(&config(&socket), 2, 11, &["admin socket path is too long"]);
    let _ = std::fs::remove_dir_all(&base);
}

const WARNED: &str = "\
listeners:
  redis:
    bind: 127.0.0.1:7379
    pool: redis
pools:
  redis:
    health_check:
      interval: 1s
      timeout: 3s
    backends:
      - address: 127.0.0.1:6379
  spare:
    backends:
      - address: 127.0.0.1:6380
";

#[test]
fn likely_mistakes_are_warnings() {
    let (config, warnings) = weir::config::parse_with_warnings(WARNED, FILE).unwrap();
    assert_eq!(config.pools.len(), 2);
    let warnings: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].starts_with(&format!(
            "{FILE}:9:16: warning: timeout 3s is longer than interval 1s"
        )),
        "{warnings:?}"
    );
    assert!(
        warnings[1].starts_with(&format!(
            "{FILE}:12:3: warning: no listener uses pool \"spare\""
        )),
        "{warnings:?}"
    );
    assert_eq!(
        weir::config::parse_with_warnings(MINIMAL, FILE).unwrap().1,
        []
    );

    let (code, stdout, stderr) = weir_check("warnings", WARNED);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "FILE: ok\n");
    assert!(
        stderr.contains("FILE:9:16: warning: timeout 3s"),
        "{stderr}"
    );
    assert!(
        stderr.contains("FILE:12:3: warning: no listener uses pool \"spare\""),
        "{stderr}"
    );
}

#[test]
fn a_missing_pool_gets_a_hint() {
    assert_problem(
        &MINIMAL.replace("    pool: redis", "    pool: rdis"),
        4,
        11,
        &["pool \"rdis\", which is not defined (defined: redis); did you mean \"redis\"?"],
    );
}

#[test]
fn half_close_timeout_and_on_down() {
    let c = valid(MINIMAL);
    assert_eq!(c.listeners[0].half_close_timeout, Duration::from_secs(60));
    assert_eq!(c.pools[0].on_down, OnDown::Keep);

    let c = valid(
        &MINIMAL
            .replace(
                "    pool: redis\n",
                "    pool: redis\n    half_close_timeout: 250ms\n",
            )
            .replace("    backends:", "    on_down: close\n    backends:"),
    );
    assert_eq!(
        c.listeners[0].half_close_timeout,
        Duration::from_millis(250)
    );
    assert_eq!(c.pools[0].on_down, OnDown::Close);
    let c = valid(&MINIMAL.replace("    backends:", "    on_down: keep\n    backends:"));
    assert_eq!(c.pools[0].on_down, OnDown::Keep);

    let text = MINIMAL
        .replace(
            "    pool: redis\n",
            "    pool: redis\n    half_close_timeout: 25d\n",
        )
        .replace("    backends:", "    on_down: drain\n    backends:");
    assert_problem(
        &text,
        5,
        25,
        &["half_close_timeout \"25d\" is too long", "1ms..=24d"],
    );
    assert_problem(
        &text,
        8,
        14,
        &["unknown on_down \"drain\" (expected one of: keep, close)"],
    );
    assert_eq!(problems(&text).len(), 2);
    assert_problem(
        &MINIMAL.replace(
            "    pool: redis\n",
            "    pool: redis\n    half_close_timeout: 0s\n",
        ),
        5,
        25,
        &["half_close_timeout \"0s\" must be more than zero"],
    );
}

#[test]
fn half_close_timeout_on_a_udp_listener_is_a_warning() {
    let text = "\
listeners:
  dns:
    bind: 127.0.0.1:5353
    protocol: udp
    pool: dns
    half_close_timeout: 5s
pools:
  dns:
    backends:
      - address: 127.0.0.1:53
";
    let (_, warnings) = weir::config::parse_with_warnings(text, FILE).unwrap();
    let warnings: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        warnings,
        [format!(
            "{FILE}:6:25: warning: half_close_timeout has no effect on a udp listener (only tcp connections are half-closed)"
        )]
    );
}

// ----- generated configs -------------------------------------------------------------

mod generated {
    use std::time::{Duration, Instant};

    use proptest::prelude::*;
    use proptest::sample::select;

    use super::{FILE, parse};

    /// `text` as a YAML double-quoted scalar: any string at all.
    fn quoted(text: &str) -> String {
        let mut out = String::from("\"");
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// Mostly durations that a config would have, sometimes huge, odd or not one at all.
    fn duration() -> impl Strategy<Value = String> {
        let unit = select(&["ns", "us", "ms", "s", "m", "h", "d", "w", "M", "y", "", "x"][..]);
        let usual = select(&["ms", "s", "m", "h"][..]);
        prop_oneof![
            8 => (1u64..1000, usual).prop_map(|(n, u)| format!("{n}{u}")),
            1 => (any::<u64>(), unit.clone()).prop_map(|(n, u)| format!("{n}{u}")),
            1 => (0u64..100_000, unit).prop_map(|(n, u)| format!("{n}{u}")),
            1 => "[0-9a-z .]{0,12}",
        ]
    }

    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => (1u64..100).prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => (0u64..2000).prop_map(|n| n.to_string()),
            1 => "[0-9]{15,30}",
            1 => "[a-z0-9_.x-]{0,8}",
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-zA-Z0-9+]{1,8}",
            1 => "\\PC{0,16}",
            1 => "[\\x00-\\x7f]{0,8}",
            1 => "(\\\\x[0-9a-f]{2}){0,4}",
        ]
        .prop_map(|s| quoted(&s))
    }

    /// Addresses that need no DNS server: literals, localhost, and broken ones.
    fn address() -> impl Strategy<Value = String> {
        const ODD: [&str; 6] = [
            "localhost:1",
            "127.0.0.1",
            "h:70000",
            "[::1:5",
            ":1",
            "[::1]:0",
        ];
        prop_oneof![
            1 => select(&ODD[..]).prop_map(str::to_string),
            6 => (any::<u8>(), 1u16..).prop_map(|(h, p)| format!("127.0.0.{h}:{p}")),
            1 => any::<u16>().prop_map(|p| format!("\"[::1]:{p}\"")),
        ]
    }

    /// `key: value` lines at `indent`, for the keys that are set.
    fn lines(indent: &str, pairs: &[(&str, &Option<String>)]) -> String {
        let mut out = String::new();
        for (key, value) in pairs {
            if let Some(v) = value {
                out.push_str(&format!("{indent}{key}: {v}\n"));
            }
        }
        out
    }

    type Opt = Option<String>;

    prop_compose! {
        fn check()(
            interval in proptest::option::of(duration()),
            timeout in proptest::option::of(duration()),
            rise in proptest::option::of(number()),
            fall in proptest::option::of(number()),
            port in proptest::option::of(number()),
            send in proptest::option::of(text()),
            send_hex in proptest::option::of("([0-9a-fA-F]{2} ?){0,4}|[0-9a-g ]{0,5}"),
            expect in proptest::option::of(text()),
            expect_hex in proptest::option::of("([0-9a-f]{2}){0,3}|[0-9a-g]{0,5}"),
        ) -> String {
            let (send_hex, expect_hex): (Opt, Opt) = (send_hex.map(|s| super::generated::quoted(&s)), expect_hex);
            format!("    health_check:\n{}", lines("      ", &[
                ("interval", &interval), ("timeout", &timeout), ("rise", &rise), ("fall", &fall),
                ("port", &port), ("send", &send), ("send_hex", &send_hex), ("expect", &expect),
                ("expect_hex", &expect_hex),
            ]))
        }
    }

    prop_compose! {
        fn config()(
            shutdown in proptest::option::of(duration()),
            socket in proptest::option::of("/tmp/[a-z]{1,12}|[a-z/]{1,120}"),
            bind in address(),
            protocol in proptest::option::of(select(&["tcp", "udp", "sctp"][..])),
            max_connections in proptest::option::of(number()),
            (idle, half_close) in (proptest::option::of(duration()), proptest::option::of(duration())),
            strategy in proptest::option::of(select(&["round-robin", "source-hash", "fastest"][..])),
            connect in proptest::option::of(duration()),
            retries in proptest::option::of(number()),
            check in proptest::option::of(check()),
            backends in proptest::collection::vec(
                (address(), proptest::option::of(text()), proptest::option::of(number())),
                1..4,
            ),
        ) -> String {
            let protocol = protocol.map(str::to_string);
            let strategy = strategy.map(str::to_string);
            let mut yaml = lines("", &[("shutdown_timeout", &shutdown)]);
            if let Some(socket) = socket {
                yaml.push_str(&format!("admin:\n  socket: {socket}\n"));
            }
            yaml.push_str(&format!("listeners:\n  front:\n    bind: {bind}\n    pool: p\n"));
            yaml.push_str(&lines("    ", &[
                ("protocol", &protocol), ("max_connections", &max_connections),
                ("idle_timeout", &idle), ("half_close_timeout", &half_close),
            ]));
            yaml.push_str("pools:\n  p:\n");
            yaml.push_str(&lines("    ", &[
                ("strategy", &strategy), ("connect_timeout", &connect), ("retries", &retries),
            ]));
            yaml.push_str(&check.unwrap_or_default());
            yaml.push_str("    backends:\n");
            for (address, name, weight) in backends {
                yaml.push_str(&format!("      - address: {address}\n"));
                yaml.push_str(&lines("        ", &[("name", &name), ("weight", &weight)]));
            }
            yaml
        }
    }

    /// What weir run does with durations: deadlines from now, and ±10% jitter.
    fn usable(d: Duration) {
        let _ = Instant::now() + d.mul_f64(1.1);
        let _ = tokio::time::Instant::now() + d.mul_f64(1.1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn generated_configs_never_panic_and_accepted_durations_are_usable(text in config()) {
            if let Ok(c) = parse(&text, FILE) {
                usable(c.shutdown_timeout);
                for l in &c.listeners {
                    usable(l.idle_timeout);
                    usable(l.half_close_timeout);
                }
                for p in &c.pools {
                    usable(p.connect_timeout);
                    if let Some(hc) = &p.health_check {
                        usable(hc.interval);
                        usable(hc.timeout);
                        prop_assert!(hc.send.as_ref().is_none_or(|s| !s.is_empty()));
                        prop_assert!(hc.expect.as_ref().is_none_or(|e| !e.is_empty()));
                    }
                    for b in &p.backends {
                        prop_assert!(weir::balance::WEIGHT_RANGE.contains(&b.weight));
                    }
                }
            }
        }

        #[test]
        fn any_text_never_panics(text in "(?s).{0,200}") {
            let _ = parse(&text, FILE);
        }

        #[test]
        fn yaml_like_text_never_panics(
            text in "([a-z_]{1,8}|[ ]{1,4}|\n|: |- |\\[|\\]|\\{|\\}|, |&a |\\*a|<<: |\"|'|\\\\x[c0-f]{2}|#|!!str |\\||>|---\n|~){0,60}"
        ) {
            let _ = parse(&text, FILE);
        }
    }
}

#[test]
fn traffic_control_keys_parse_and_their_mistakes_are_named() {
    let config = valid(
        "\
listeners:
  pg:
    bind: 127.0.0.1:5000
    pool: pg
pools:
  pg:
    queue_timeout: 5s
    backends:
      - address: 127.0.0.1:5432
        max_connections: 5
      - address: 127.0.0.1:5433
        backup: true
",
    );
    let pool = &config.pools[0];
    assert_eq!(pool.queue_timeout, std::time::Duration::from_secs(5));
    assert_eq!(pool.backends[0].max_connections, Some(5));
    assert!(!pool.backends[0].backup);
    assert_eq!(pool.backends[1].max_connections, None);
    assert!(pool.backends[1].backup);

    let all = problems(
        "\
listeners:
  pg:
    bind: 127.0.0.1:5000
    pool: pg
pools:
  pg:
    queue_timeout: 2h
    backends:
      - address: 127.0.0.1:5432
        max_connections: 0
        backup: maybe
",
    );
    let text = all.join("\n");
    assert_eq!(all.len(), 3, "{text}");
    assert!(
        text.contains(":7:20: queue_timeout \"2h\" is too long"),
        "{text}"
    );
    assert!(text.contains(":10:26: max_connections 0"), "{text}");
    assert!(
        text.contains(":11:17: backup \"maybe\" must be true or false"),
        "{text}"
    );
}

#[test]
fn access_log_is_a_boolean_off_by_default() {
    assert!(!valid(MINIMAL).listeners[0].access_log);
    let with = |v: &str| {
        MINIMAL.replace(
            "    pool: redis\n",
            &format!("    pool: redis\n    access_log: {v}\n"),
        )
    };
    assert!(valid(&with("true")).listeners[0].access_log);
    assert!(!valid(&with("false")).listeners[0].access_log);
    assert_problem(
        &with("loud"),
        5,
        17,
        &["access_log \"loud\" must be true or false"],
    );
}

#[test]
fn slow_start_is_a_duration_off_by_default_and_ignored_with_source_hash() {
    assert!(valid(MINIMAL).pools[0].slow_start.is_zero());
    let with = |strategy: &str, ramp: &str| {
        format!(
            "\
listeners:
  pg:
    bind: 127.0.0.1:5000
    pool: pg
pools:
  pg:
    strategy: {strategy}
    slow_start: {ramp}
    backends:
      - address: 127.0.0.1:5432
"
        )
    };
    let text = with("least-connections", "30s");
    let (config, warnings) = weir::config::parse_with_warnings(&text, FILE).unwrap();
    assert_eq!(
        config.pools[0].slow_start,
        std::time::Duration::from_secs(30)
    );
    assert!(warnings.is_empty(), "{warnings:?}");

    let text = with("source-hash", "30s");
    let (_, warnings) = weir::config::parse_with_warnings(&text, FILE).unwrap();
    let warnings: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with(&format!(
            "{FILE}:8:17: warning: slow_start does not apply to strategy source-hash"
        )),
        "{warnings:?}"
    );

    let all = problems(&with("round-robin", "2d"));
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(
        all[0].contains(":8:17: slow_start \"2d\" is too long"),
        "{all:?}"
    );
}
