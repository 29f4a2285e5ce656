//! `least-connections`: the eligible backend with the fewest active connections for its
//! weight (`active / weight`, compared by cross-multiplication), ties broken round-robin.
//!
//! Exact rather than sampled (no power-of-two-choices): with two backends it always picks
//! the less loaded one. The cost is a scan of the backends' `active` counters per pick,
//! which is what an exact answer needs. Ties rotate: the scan starts at an offset taken
//! from an atomic counter and keeps the first best it meets, so idle backends of equal
//! weight take turns instead of the first one taking every connection.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{available, weights};
use crate::backend::Backend;

pub struct LeastConnections {
    weights: Box<[u32]>,
    start: AtomicUsize,
}

impl LeastConnections {
    pub fn new(backends: &[Arc<Backend>]) -> Self {
        LeastConnections {
            weights: weights(backends),
            start: AtomicUsize::new(0),
        }
    }

    #[inline]
    /// The client's address plays no part here.
    pub fn pick(
        &self,
        backends: &[Arc<Backend>],
        _client: IpAddr,
        exclude: &[usize],
    ) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = self.start.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = None;
        // The best ratio so far as active/weight; 1/0 stands for infinity, which any
        // backend beats.
        let (mut best_active, mut best_weight) = (1u128, 0u128);
        for k in 0..n {
            let i = if start + k < n {
                start + k
            } else {
                start + k - n
            };
            if !available(backends, i, exclude) {
                continue;
            }
            let active = u128::from(backends[i].active());
            let weight = u128::from(self.weights[i]);
            // active/weight < best_active/best_weight, without division or floats.
            if active * best_weight < best_active * weight {
                (best, best_active, best_weight) = (Some(i), active, weight);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{Balancer, Strategy};
    use crate::backend::Health;

    #[test]
    fn always_picks_the_less_loaded_of_two() {
        let backends = backends(&[1, 1]);
        let balancer = Balancer::new(Strategy::LeastConnections, &backends);
        let _held: Vec<_> = (0..3).map(|_| backends[0].connect_guard()).collect();
        let _one = backends[1].connect_guard();
        for _ in 0..100 {
            assert_eq!(balancer.pick(&backends, ip0(), &[]), Some(1));
        }
        let _more: Vec<_> = (0..3).map(|_| backends[1].connect_guard()).collect();
        for _ in 0..100 {
            assert_eq!(balancer.pick(&backends, ip0(), &[]), Some(0));
        }
    }

    #[test]
    fn each_pick_goes_to_a_least_loaded_backend_relative_to_weight() {
        let weights = [1, 2, 3, 5];
        let backends = backends(&weights);
        let balancer = Balancer::new(Strategy::LeastConnections, &backends);
        let mut held = Vec::new();
        for _ in 0..1100 {
            let i = balancer.pick(&backends, ip0(), &[]).unwrap();
            let ratio = |j: usize| backends[j].active() as f64 / weights[j] as f64;
            assert!((0..4).all(|j| ratio(i) <= ratio(j)), "picked {i}");
            held.push(backends[i].connect_guard());
        }
        // Held connections end up in proportion to the weights: 100/200/300/500.
        let active: Vec<u64> = backends.iter().map(|b| b.active()).collect();
        assert_eq!(active, [100, 200, 300, 500]);
    }

    #[test]
    fn weight_scales_the_load() {
        // 3 active on weight 3 (ratio 1) beats 2 active on weight 1 (ratio 2).
        let backends = backends(&[3, 1]);
        let balancer = Balancer::new(Strategy::LeastConnections, &backends);
        let _a: Vec<_> = (0..3).map(|_| backends[0].connect_guard()).collect();
        let _b: Vec<_> = (0..2).map(|_| backends[1].connect_guard()).collect();
        assert_eq!(balancer.pick(&backends, ip0(), &[]), Some(0));
    }

    #[test]
    fn ties_rotate() {
        let backends = backends(&[2, 2, 2]);
        let balancer = Balancer::new(Strategy::LeastConnections, &backends);
        let picks: Vec<usize> = (0..6)
            .map(|_| balancer.pick(&backends, ip0(), &[]).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert_eq!(counts(&balancer, &backends, 300), [100, 100, 100]);
    }

    #[test]
    fn skips_ineligible_and_excluded_even_when_least_loaded() {
        let backends = backends(&[1, 1, 1]);
        let balancer = Balancer::new(Strategy::LeastConnections, &backends);
        let _a = backends[0].connect_guard();
        let _b: Vec<_> = (0..2).map(|_| backends[2].connect_guard()).collect();
        backends[1].set_health(Health::Down);
        assert_eq!(balancer.pick(&backends, ip0(), &[]), Some(0));
        assert_eq!(balancer.pick(&backends, ip0(), &[0]), Some(2));
    }
}
