//! Load-balancing strategies, one file each, dispatched by a plain enum.
//!
//! A `Balancer` is built by the control task from a pool's backends (reading their
//! weights) and swapped in whole with the pool's snapshot; `pick` runs on the connection
//! path and takes no lock and allocates nothing: it reads atomics and the tables built here.
//!
//! Weights are read once, at build: a weight change is a rebuild. Eligibility (health and
//! admin state) is read live on every pick, because it changes without a rebuild.

use std::net::IpAddr;
use std::sync::Arc;

use crate::backend::Backend;
use crate::config::Strategy;

mod least_connections;
mod round_robin;
mod source_hash;
mod weighted_random;

pub use least_connections::LeastConnections;
pub use round_robin::RoundRobin;
pub use source_hash::SourceHash;
pub use weighted_random::WeightedRandom;

pub enum Balancer {
    RoundRobin(RoundRobin),
    LeastConnections(LeastConnections),
    WeightedRandom(WeightedRandom),
    SourceHash(SourceHash),
}

impl Balancer {
    /// Builds the strategy's tables for these backends. Runs off the connection path.
    pub fn new(strategy: Strategy, backends: &[Arc<Backend>]) -> Balancer {
        match strategy {
            Strategy::RoundRobin => Balancer::RoundRobin(RoundRobin::new(backends)),
            Strategy::LeastConnections => {
                Balancer::LeastConnections(LeastConnections::new(backends))
            }
            Strategy::WeightedRandom => Balancer::WeightedRandom(WeightedRandom::new(backends)),
            Strategy::SourceHash => Balancer::SourceHash(SourceHash::new(backends)),
        }
    }

    /// The index in `backends` of an eligible backend that is not in `exclude`
    /// (the ones already tried for this connection), or None when there is none.
    ///
    /// `backends` must be the slice the balancer was built from (the snapshot keeps them
    /// together).
    #[inline]
    pub fn pick(
        &self,
        backends: &[Arc<Backend>],
        client: IpAddr,
        exclude: &[usize],
    ) -> Option<usize> {
        match self {
            Balancer::RoundRobin(b) => b.pick(backends, exclude),
            Balancer::LeastConnections(b) => b.pick(backends, exclude),
            Balancer::WeightedRandom(b) => b.pick(backends, exclude),
            Balancer::SourceHash(b) => b.pick(backends, client, exclude),
        }
    }
}

/// Whether backend `i` may take this connection: eligible now and not already tried.
#[inline]
fn available(backends: &[Arc<Backend>], i: usize, exclude: &[usize]) -> bool {
    backends[i].is_eligible() && !exclude.contains(&i)
}

/// The weights as the tables use them. Config allows 1..=1000; a 0 (which nothing should
/// set) counts as 1 so that no table divides by zero or loses a backend silently.
fn weights(backends: &[Arc<Backend>]) -> Box<[u32]> {
    backends.iter().map(|b| b.weight().max(1)).collect()
}

/// A weighted choice among the available backends, made with `ticket` (any number: it is
/// reduced modulo their total weight). Two passes over the backends, no allocation: the
/// slow path of the strategies whose tables point at ineligible backends.
///
/// Eligibility may change between the two passes; the second pass then returns the last
/// available backend it saw rather than nothing.
fn weighted_scan(
    backends: &[Arc<Backend>],
    weights: &[u32],
    exclude: &[usize],
    ticket: u64,
) -> Option<usize> {
    let candidates = || {
        (weights.iter().enumerate())
            .filter(|&(i, _)| available(backends, i, exclude))
            .map(|(i, &w)| (i, u64::from(w)))
    };
    let total: u64 = candidates().map(|(_, w)| w).sum();
    if total == 0 {
        return None;
    }
    let mut left = ticket % total;
    let mut last = None;
    for (i, w) in candidates() {
        if left < w {
            return Some(i);
        }
        left -= w;
        last = Some(i);
    }
    last
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::Arc;

    use crate::backend::Backend;

    /// Backends named `b0`, `b1`, … with these weights, all healthy.
    pub fn backends(weights: &[u32]) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| named(&format!("b{i}"), w))
            .collect()
    }

    pub fn named(name: &str, weight: u32) -> Arc<Backend> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 10_000));
        Backend::new("test", name, &addr.to_string(), addr, weight, true)
    }

    /// A client address, distinct for each `n`.
    pub fn client(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    pub fn ip0() -> IpAddr {
        client(0)
    }

    /// How many times each backend is picked in `picks` picks.
    pub fn counts(
        balancer: &super::Balancer,
        backends: &[Arc<Backend>],
        picks: usize,
    ) -> Vec<usize> {
        let mut counts = vec![0; backends.len()];
        for _ in 0..picks {
            counts[balancer.pick(backends, ip0(), &[]).unwrap()] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use crate::backend::{Admin, Health};

    const ALL: [Strategy; 4] = [
        Strategy::RoundRobin,
        Strategy::LeastConnections,
        Strategy::WeightedRandom,
        Strategy::SourceHash,
    ];

    #[test]
    fn every_strategy_honours_exclude() {
        let backends = backends(&[1, 2, 3, 4]);
        for strategy in ALL {
            let balancer = Balancer::new(strategy, &backends);
            for n in 0..500 {
                let exclude = [n % 4, (n + 1) % 4];
                let i = balancer
                    .pick(&backends, client(n as u32), &exclude)
                    .unwrap();
                assert!(!exclude.contains(&i), "{strategy:?} picked excluded {i}");
            }
            assert_eq!(
                balancer.pick(&backends, ip0(), &[0, 1, 2, 3]),
                None,
                "{strategy:?}"
            );
            assert_eq!(
                balancer.pick(&backends, ip0(), &[0, 1, 3]),
                Some(2),
                "{strategy:?}"
            );
        }
    }

    #[test]
    fn every_strategy_returns_none_when_nothing_is_eligible() {
        let backends = backends(&[1, 2, 3]);
        backends[0].set_health(Health::Down);
        backends[1].set_admin(Admin::Drain);
        backends[2].set_admin(Admin::Disabled);
        for strategy in ALL {
            let balancer = Balancer::new(strategy, &backends);
            for n in 0..100 {
                assert_eq!(
                    balancer.pick(&backends, client(n), &[]),
                    None,
                    "{strategy:?}"
                );
            }
        }
        for strategy in ALL {
            let balancer = Balancer::new(strategy, &[]);
            assert_eq!(balancer.pick(&[], ip0(), &[]), None, "{strategy:?}");
        }
    }

    #[test]
    fn every_strategy_finds_the_one_eligible_backend() {
        let backends = backends(&[5, 1, 7, 2, 3]);
        for (i, b) in backends.iter().enumerate() {
            if i != 3 {
                b.set_health(Health::Down);
            }
        }
        for strategy in ALL {
            let balancer = Balancer::new(strategy, &backends);
            for n in 0..200 {
                assert_eq!(
                    balancer.pick(&backends, client(n), &[]),
                    Some(3),
                    "{strategy:?}"
                );
            }
        }
    }

    #[test]
    fn weighted_scan_is_proportional_over_consecutive_tickets() {
        let backends = backends(&[1, 2, 3, 4]);
        let w = weights(&backends);
        backends[3].set_health(Health::Down);
        let mut counts = [0; 4];
        for t in 0..600 {
            counts[weighted_scan(&backends, &w, &[], t).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 200, 300, 0]);
        assert_eq!(weighted_scan(&backends, &w, &[0, 1, 2], 7), None);
    }
}
