//! `weighted-random`: each backend with probability proportional to its weight.
//!
//! The build makes rand's `WeightedIndex` (a cumulative weight table and a uniform sampler
//! over its total, made once); a pick samples it with the thread-local RNG (a binary search). A draw that lands on an ineligible or
//! excluded backend is redrawn (rejection keeps the choice proportional among the rest) a
//! few times; after that — most of the weight is unavailable — one weighted draw over a
//! scan of the available backends decides.

use std::net::IpAddr;
use std::sync::Arc;

use rand::RngExt;
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;

use super::{available, weighted_scan, weights};
use crate::backend::Backend;

/// Draws from the whole table before falling back to a scan.
const DRAWS: usize = 4;

pub struct WeightedRandom {
    /// None without backends (or, which config forbids, with every weight 0).
    index: Option<WeightedIndex<u64>>,
    weights: Box<[u32]>,
}

impl WeightedRandom {
    pub fn new(backends: &[Arc<Backend>]) -> Self {
        let weights = weights(backends);
        let index = WeightedIndex::new(weights.iter().map(|&w| u64::from(w))).ok();
        WeightedRandom { index, weights }
    }

    #[inline]
    /// The client's address plays no part here.
    pub fn pick(
        &self,
        backends: &[Arc<Backend>],
        _client: IpAddr,
        exclude: &[usize],
    ) -> Option<usize> {
        let index = self.index.as_ref()?;
        let mut rng = rand::rng();
        for _ in 0..DRAWS {
            let i = index.sample(&mut rng);
            if available(backends, i, exclude) {
                return Some(i);
            }
        }
        weighted_scan(backends, &self.weights, exclude, rng.random())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{Balancer, Strategy};
    use crate::backend::Health;

    /// Asserts that each count is within 6 binomial standard deviations of its expectation
    /// (`picks·p ± 6·√(picks·p·(1−p))`): a false failure has a probability of about 2e-9
    /// per count, so these tests, with an unseeded RNG, are not flaky.
    fn assert_binomial(counts: &[usize], weights: &[u32]) {
        let picks: usize = counts.iter().sum();
        let total: u32 = weights.iter().sum();
        for (&count, &w) in counts.iter().zip(weights) {
            let p = f64::from(w) / f64::from(total);
            let mean = picks as f64 * p;
            let sigma = (picks as f64 * p * (1.0 - p)).sqrt();
            assert!(
                (count as f64 - mean).abs() <= 6.0 * sigma,
                "count {count} for p={p}: expected {mean} ± {}",
                6.0 * sigma
            );
        }
    }

    #[test]
    fn picks_in_proportion_to_weight() {
        let weights = [1, 2, 3];
        let backends = backends(&weights);
        let balancer = Balancer::new(Strategy::WeightedRandom, &backends);
        // Expected 10,000/20,000/30,000 with σ ≈ 91/115/122.
        assert_binomial(&counts(&balancer, &backends, 60_000), &weights);
    }

    #[test]
    fn stays_proportional_among_the_rest_when_one_is_down() {
        let backends = backends(&[1, 2, 3, 994]);
        let balancer = Balancer::new(Strategy::WeightedRandom, &backends);
        // The heaviest down: nearly every pick exhausts its draws and takes the fallback.
        backends[3].set_health(Health::Down);
        let counts = counts(&balancer, &backends, 60_000);
        assert_eq!(counts[3], 0);
        assert_binomial(&counts[..3], &[1, 2, 3]);
        // A light one down: the redraws decide.
        backends[3].set_health(Health::Up);
        backends[0].set_health(Health::Down);
        let counts = super::super::testutil::counts(&balancer, &backends, 60_000);
        assert_eq!(counts[0], 0);
        assert_binomial(&counts[1..], &[2, 3, 994]);
    }

    #[test]
    fn the_index_holds_each_backends_weight() {
        let backends = backends(&[3, 1, 4]);
        let Balancer::WeightedRandom(wr) = Balancer::new(Strategy::WeightedRandom, &backends)
        else {
            unreachable!()
        };
        let index = wr.index.as_ref().unwrap();
        assert_eq!(index.total_weight(), 8);
        let weights: Vec<u64> = (0..3).map(|i| index.weight(i).unwrap()).collect();
        assert_eq!(weights, [3, 1, 4]);
        let none = Balancer::new(Strategy::WeightedRandom, &[]);
        assert_eq!(none.pick(&[], "127.0.0.1".parse().unwrap(), &[]), None);
    }
}
