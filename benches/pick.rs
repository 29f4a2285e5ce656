//! `pick()` of each strategy at 4, 64 and 1,024 backends, all eligible, weights varied,
//! each with a `max_connections` (far from reached: the check is an atomic compare);
//! and `Balancer::new` at 1,024, since round-robin and source-hash build tables.
//!
//! `cargo bench --bench pick -- --warm-up-time 1 --measurement-time 2` for a short run.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use weir::backend::Backend;
use weir::balance::Balancer;
use weir::balance::Strategy;

const STRATEGIES: [Strategy; 4] = [
    Strategy::RoundRobin,
    Strategy::LeastConnections,
    Strategy::WeightedRandom,
    Strategy::SourceHash,
];

/// `n` healthy backends with weights spread over 1..=1000 (gcd 1, so round-robin's
/// schedule is as long as it gets: about 500 slots per backend), each limited to 1,000
/// connections.
fn backends(n: usize) -> Vec<Arc<Backend>> {
    (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 8080));
            let weight = 1 + (i as u32 * 7919) % 1000;
            let backend = Backend::new(
                "bench",
                &format!("backend-{i}"),
                &addr.to_string(),
                addr,
                weight,
                true,
            );
            backend.set_max_connections(Some(1_000));
            backend
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    for strategy in STRATEGIES {
        let mut group = c.benchmark_group(format!("pick/{}", strategy.as_str()));
        for n in [4, 64, 1024] {
            let backends = backends(n);
            let balancer = Balancer::new(strategy, &backends);
            // A different client each pick, as source-hash would see.
            let mut client = 0u32;
            group.bench_function(BenchmarkId::from_parameter(n), |b| {
                b.iter(|| {
                    client = client.wrapping_add(0x9e37_79b9);
                    let ip = IpAddr::V4(Ipv4Addr::from(client));
                    balancer.pick(black_box(&backends), black_box(ip), &[])
                })
            });
        }
        group.finish();
    }
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build/1024");
    group.sample_size(10);
    let backends = backends(1024);
    for strategy in STRATEGIES {
        group.bench_function(strategy.as_str(), |b| {
            b.iter(|| Balancer::new(strategy, black_box(&backends)))
        });
    }
    group.finish();
}

criterion_group!(benches, pick, build);
criterion_main!(benches);
