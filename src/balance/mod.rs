//! Load-balancing strategies, one file each, dispatched by a plain enum.
//!
//! A `Balancer` is built by the control task from a pool's backends (reading their
//! weights) and swapped in whole with the pool's snapshot; `pick` runs on the connection
//! path and takes no lock and allocates nothing: it reads atomics and the tables built here.
//!
//! Weights are read once, at build: a weight change is a rebuild. Eligibility (health and
//! admin state) is read live on every pick, because it changes without a rebuild.
//!
//! This module owns what a strategy *is* for the rest of weir: [`Strategy`], its names in
//! the config (`strategy: round-robin`), the list of them ([`Strategy::ALL`], which config
//! messages and docs list) and parsing one from its name (`"…".parse::<Strategy>()`, whose
//! error is the message `weir check` prints). Config only calls these; nothing here knows
//! about config.
//!
//! # Adding a strategy
//!
//! 1. Write `src/balance/NAME.rs` (its module doc says what it does, in one paragraph)
//!    with a type that has
//!    `fn new(backends: &[Arc<Backend>]) -> Self`, which builds its tables off the
//!    connection path, and
//!    `fn pick(&self, backends: &[Arc<Backend>], client: IpAddr, exclude: &[usize]) -> Option<usize>`,
//!    which takes no lock and allocates nothing (see the helpers `available`,
//!    `weights` and `weighted_scan` below).
//! 2. Add its line to the `strategies!` list below: variant, config name, module, type.
//!
//! That is all: the `Strategy` variant, its name, `ALL`, parsing and the `Balancer`
//! dispatch are generated from that line, and `weir check` accepts the new name. The
//! tests below that loop over `Strategy::ALL` then cover it too. (The contract's key
//! table in the README and docs/ list the names for users: add it there as well.)

use std::net::IpAddr;
use std::sync::Arc;

use crate::backend::Backend;

/// The weights a backend may have (config `weight:`, admin `set weight`): 0 would take a
/// backend out of rotation, which is what `drain` is for; 1000 leaves room in the tables.
pub const WEIGHT_RANGE: std::ops::RangeInclusive<u32> = 1..=1000;

/// Declares the strategies: each line gives a `Strategy` variant, its config name, the
/// module that implements it and that module's type; the enums and their dispatch follow.
macro_rules! strategies {
    ($($(#[$doc:meta])* $variant:ident = $name:literal => $module:ident::$ty:ident,)+) => {
        $(mod $module;)+
        $(pub use $module::$ty;)+

        /// A pool's balancing strategy (config `strategy:`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Strategy {
            $($(#[$doc])* $variant,)+
        }

        impl Strategy {
            /// Every strategy, in the order messages and docs list them.
            pub const ALL: &'static [Strategy] = &[$(Strategy::$variant,)+];

            /// Its name in the config.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Strategy::$variant => $name,)+
                }
            }
        }

        /// A strategy's tables, built for one set of backends.
        pub enum Balancer {
            $($variant($ty),)+
        }

        impl Balancer {
            /// Builds the strategy's tables for these backends. Runs off the connection path.
            pub fn new(strategy: Strategy, backends: &[Arc<Backend>]) -> Balancer {
                match strategy {
                    $(Strategy::$variant => Balancer::$variant($ty::new(backends)),)+
                }
            }

            /// The index in `backends` of an eligible backend that is not in `exclude`
            /// (the ones already tried for this connection), or None when there is none.
            ///
            /// `backends` must be the slice the balancer was built from (the snapshot
            /// keeps them together).
            #[inline]
            pub fn pick(
                &self,
                backends: &[Arc<Backend>],
                client: IpAddr,
                exclude: &[usize],
            ) -> Option<usize> {
                match self {
                    $(Balancer::$variant(b) => b.pick(backends, client, exclude),)+
                }
            }
        }
    };
}

strategies! {
    /// Smooth weighted round-robin (NGINX's), the default.
    RoundRobin = "round-robin" => round_robin::RoundRobin,
    /// The fewest active connections for its weight.
    LeastConnections = "least-connections" => least_connections::LeastConnections,
    /// A random backend, in proportion to the weights.
    WeightedRandom = "weighted-random" => weighted_random::WeightedRandom,
    /// The same client IP to the same backend (Maglev hashing by backend name).
    SourceHash = "source-hash" => source_hash::SourceHash,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is no strategy's; `Display` is the message `weir check` shows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy \"{0}\" (expected one of: {names})", names = names())]
pub struct UnknownStrategy(pub String);

fn names() -> String {
    let names: Vec<&str> = Strategy::ALL.iter().map(|s| s.as_str()).collect();
    names.join(", ")
}

impl std::str::FromStr for Strategy {
    type Err = UnknownStrategy;

    /// A strategy from its config name; surrounding whitespace is ignored.
    fn from_str(text: &str) -> Result<Strategy, UnknownStrategy> {
        let name = text.trim();
        (Strategy::ALL.iter().copied())
            .find(|s| s.as_str() == name)
            .ok_or_else(|| UnknownStrategy(text.to_string()))
    }
}

/// Whether backend `i` may take this connection: eligible now, below its
/// `max_connections` (a full backend is skipped exactly like a down one, by every
/// strategy) and not already tried.
#[inline]
fn available(backends: &[Arc<Backend>], i: usize, exclude: &[usize]) -> bool {
    let b = &backends[i];
    b.is_eligible() && b.has_room() && !exclude.contains(&i)
}

/// The weights as the tables use them. Config allows `WEIGHT_RANGE`; a 0 (which nothing
/// should set) counts as 1 so that no table divides by zero or loses a backend silently.
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

    const ALL: &[Strategy] = Strategy::ALL;

    #[test]
    fn strategies_parse_from_their_names() {
        for &s in ALL {
            assert_eq!(s.as_str().parse::<Strategy>(), Ok(s));
            assert_eq!(format!(" {s} ").parse::<Strategy>(), Ok(s));
        }
        assert_eq!(
            "fastest".parse::<Strategy>().unwrap_err().to_string(),
            "unknown strategy \"fastest\" (expected one of: round-robin, least-connections, weighted-random, source-hash)"
        );
    }

    #[test]
    fn every_strategy_honours_exclude() {
        let backends = backends(&[1, 2, 3, 4]);
        for &strategy in ALL {
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
        for &strategy in ALL {
            let balancer = Balancer::new(strategy, &backends);
            for n in 0..100 {
                assert_eq!(
                    balancer.pick(&backends, client(n), &[]),
                    None,
                    "{strategy:?}"
                );
            }
        }
        for &strategy in ALL {
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
        for &strategy in ALL {
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
    fn every_strategy_skips_a_full_backend_like_a_down_one() {
        let backends = backends(&[3, 1, 2]);
        backends[0].set_max_connections(Some(1));
        let _holds_the_slot = backends[0].try_connect_guard().unwrap();
        assert!(backends[0].try_connect_guard().is_none(), "the limit holds");
        for &strategy in ALL {
            let balancer = Balancer::new(strategy, &backends);
            for n in 0..300 {
                let i = balancer.pick(&backends, client(n), &[]).unwrap();
                assert_ne!(i, 0, "{strategy:?} picked the full backend");
            }
            assert_eq!(
                balancer.pick(&backends, ip0(), &[1, 2]),
                None,
                "{strategy:?}"
            );
            backends[0].set_max_connections(Some(2));
            assert_eq!(
                balancer.pick(&backends, ip0(), &[1, 2]),
                Some(0),
                "{strategy:?} picks it again once it has room"
            );
            backends[0].set_max_connections(Some(1));
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
