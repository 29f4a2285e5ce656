//! `round-robin`: NGINX's smooth weighted round-robin, made lock-free.
//!
//! NGINX keeps a `current` per peer: each pick adds every peer's weight to its `current`,
//! takes the peer with the largest (the first one on a tie) and subtracts the total weight
//! from it. Weights 5/1/1 give `a a b a c a a`: interleaved, never a burst. The sequence is
//! periodic: after `W` picks (`W` the sum of the weights) every `current` is back at 0 and
//! each peer was picked exactly its weight's number of times.
//!
//! Doing that per pick needs a lock, so the build computes one period of the sequence (the
//! weights divided by their gcd first, so 100/200/300 is a period of 6) and `pick` walks it
//! with an atomic cursor. Skipping an ineligible backend *consumes* its slot (takes the next
//! cursor value) rather than looking at the next slot, so the eligible backends share its
//! turns in proportion to their weights instead of its successor in the schedule taking
//! them all. After a few consumed slots in a row (a heavy backend is down), `pick` makes a
//! weighted choice over a scan of the backends instead.
//!
//! Building the period naively costs `W × n`: 1,024 backends with weights up to 1,000 is
//! half a billion steps. The build instead simulates NGINX exactly with a kinetic
//! tournament tree: each peer's `current` is a line over time (`c + t·w`, `c` changing only
//! when the peer is picked), each tree node keeps the winner of its two children and the
//! first time at which the other child's line would overtake it, so a step only revisits
//! the nodes whose winner changed. The period is capped at `MAX_PERIOD` slots: beyond it
//! (only possible above ~1,000 backends with large coprime weights) the weights are scaled
//! down to fit, which keeps proportions to within one part in the smallest scaled weight.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{available, weighted_scan, weights};
use crate::backend::Backend;

/// The longest schedule built (4 MiB of `u32`); 1,024 backends of weight ≤ 1,000 fit.
const MAX_PERIOD: u64 = 1 << 20;

/// Slots consumed by one pick before it falls back to a scan of the backends.
const MAX_SKIPS: usize = 16;

pub struct RoundRobin {
    /// One period of the smooth weighted round-robin sequence, as backend indexes.
    schedule: Box<[u32]>,
    weights: Box<[u32]>,
    cursor: AtomicUsize,
}

impl RoundRobin {
    pub fn new(backends: &[Arc<Backend>]) -> Self {
        let weights = weights(backends);
        RoundRobin {
            schedule: swrr_period(&reduce(&weights)).into_boxed_slice(),
            weights,
            cursor: AtomicUsize::new(0),
        }
    }

    #[inline]
    pub fn pick(&self, backends: &[Arc<Backend>], exclude: &[usize]) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let mut pos = 0;
        for _ in 0..MAX_SKIPS.min(len) {
            pos = self.cursor.fetch_add(1, Ordering::Relaxed);
            let i = self.schedule[pos % len] as usize;
            if available(backends, i, exclude) {
                return Some(i);
            }
        }
        weighted_scan(backends, &self.weights, exclude, pos as u64)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The weights divided by their gcd, then scaled down if their sum exceeds `MAX_PERIOD`.
fn reduce(weights: &[u32]) -> Vec<u64> {
    let g = weights.iter().fold(0, |g, &w| gcd(g, u64::from(w)));
    let mut reduced: Vec<u64> = weights.iter().map(|&w| u64::from(w) / g.max(1)).collect();
    let total: u64 = reduced.iter().sum();
    if total > MAX_PERIOD {
        // n ≤ MAX_PERIOD / 2 here in practice (weights ≤ 1,000), so the sum still fits
        // within about MAX_PERIOD + n.
        let budget = MAX_PERIOD.saturating_sub(reduced.len() as u64).max(1);
        for w in &mut reduced {
            *w = (*w * budget / total).max(1);
        }
        let g = reduced.iter().fold(0, |g, &w| gcd(g, w));
        reduced.iter_mut().for_each(|w| *w /= g.max(1));
    }
    reduced
}

/// One period of NGINX's smooth weighted round-robin over `weights` (all ≥ 1), computed
/// in about `O(W log n)` by a kinetic tournament tree (see the module docs).
fn swrr_period(weights: &[u64]) -> Vec<u32> {
    let n = weights.len();
    let total: u64 = weights.iter().sum();
    let mut schedule = Vec::with_capacity(total as usize);
    if n == 0 {
        return schedule;
    }
    let mut tree = Tournament::new(weights);
    for t in 1..=total as i64 {
        tree.refresh(1, t);
        let j = tree.winner[1];
        schedule.push(j);
        tree.offset[j as usize] -= total as i64;
        tree.update_path(j as usize, t);
    }
    schedule
}

const NONE: u32 = u32::MAX;
const NEVER: i64 = i64::MAX;

/// A kinetic tournament over the lines `current_i(t) = offset_i + t·weight_i`: node `k`
/// holds the winner among its leaves at the time it was last computed (larger `current`,
/// lower index on a tie, as NGINX) and the first time its winner would change while its
/// children's winners stay the same.
struct Tournament {
    size: usize,
    weight: Vec<i64>,
    offset: Vec<i64>,
    winner: Vec<u32>,
    /// The earliest expiry among a node and its descendants.
    expiry: Vec<i64>,
}

impl Tournament {
    fn new(weights: &[u64]) -> Self {
        let size = weights.len().next_power_of_two();
        let mut tree = Tournament {
            size,
            weight: weights.iter().map(|&w| w as i64).collect(),
            offset: vec![0; weights.len()],
            winner: vec![NONE; 2 * size],
            expiry: vec![NEVER; 2 * size],
        };
        for i in 0..weights.len() {
            tree.winner[size + i] = i as u32;
        }
        for k in (1..size).rev() {
            tree.compute(k, 0);
        }
        tree
    }

    /// Brings every node whose winner may have changed by time `t` up to date.
    fn refresh(&mut self, k: usize, t: i64) {
        if self.expiry[k] > t || k >= self.size {
            return;
        }
        self.refresh(2 * k, t);
        self.refresh(2 * k + 1, t);
        self.compute(k, t);
    }

    /// Recomputes the path from leaf `i` (whose offset changed) to the root at time `t`.
    fn update_path(&mut self, i: usize, t: i64) {
        let mut k = (self.size + i) / 2;
        while k >= 1 {
            self.compute(k, t);
            k /= 2;
        }
    }

    /// Node `k`'s winner at time `t` from its children's, and when that would change.
    fn compute(&mut self, k: usize, t: i64) {
        let (a, b) = (self.winner[2 * k], self.winner[2 * k + 1]);
        let (winner, own) = if b == NONE {
            (a, NEVER)
        } else if a == NONE {
            (b, NEVER)
        } else {
            let (wa, wb) = (self.weight[a as usize], self.weight[b as usize]);
            let (ca, cb) = (self.offset[a as usize], self.offset[b as usize]);
            if ca + t * wa >= cb + t * wb {
                // `b` (right) overtakes once strictly above: t'·(wb − wa) > ca − cb.
                let own = if wb > wa {
                    (ca - cb).div_euclid(wb - wa) + 1
                } else {
                    NEVER
                };
                (a, own)
            } else {
                // `a` (left, lower index) retakes on a tie: t'·(wa − wb) ≥ cb − ca.
                let own = if wa > wb {
                    (cb - ca + (wa - wb) - 1).div_euclid(wa - wb)
                } else {
                    NEVER
                };
                (b, own)
            }
        };
        self.winner[k] = winner;
        self.expiry[k] = own.min(self.expiry[2 * k]).min(self.expiry[2 * k + 1]);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{Balancer, Strategy};
    use super::*;
    use crate::backend::{Admin, Health};

    /// NGINX's loop, verbatim: the reference the fast build must match.
    fn nginx(weights: &[u64], picks: usize) -> Vec<u32> {
        let total: i64 = weights.iter().sum::<u64>() as i64;
        let mut current = vec![0i64; weights.len()];
        let mut out = Vec::with_capacity(picks);
        for _ in 0..picks {
            let mut best = 0;
            for i in 0..weights.len() {
                current[i] += weights[i] as i64;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            out.push(best as u32);
        }
        out
    }

    /// A small deterministic generator, so these tests need no seedable RNG.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn weights_1_2_3_give_exactly_100_200_300_in_600_picks() {
        let backends = backends(&[1, 2, 3]);
        let balancer = Balancer::new(Strategy::RoundRobin, &backends);
        assert_eq!(counts(&balancer, &backends, 600), [100, 200, 300]);
    }

    #[test]
    fn weights_5_1_1_interleave_like_nginx() {
        let backends = backends(&[5, 1, 1]);
        let balancer = Balancer::new(Strategy::RoundRobin, &backends);
        let seq: String = (0..14)
            .map(|_| match balancer.pick(&backends, ip0(), &[]).unwrap() {
                0 => 'a',
                1 => 'b',
                _ => 'c',
            })
            .collect();
        assert_eq!(seq, "aabacaaaabacaa");
    }

    #[test]
    fn weights_are_divided_by_their_gcd() {
        let backends = backends(&[100, 200, 300]);
        let Balancer::RoundRobin(rr) = Balancer::new(Strategy::RoundRobin, &backends) else {
            unreachable!()
        };
        assert_eq!(&*rr.schedule, &[2, 1, 0, 2, 1, 2]);
        assert_eq!(rr.schedule.to_vec(), nginx(&[1, 2, 3], 6));
    }

    #[test]
    fn tournament_matches_nginx_exactly() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for round in 0..300 {
            let n = 1 + (xorshift(&mut seed) % 24) as usize;
            let max = [2, 10, 100, 1000][round % 4];
            let weights: Vec<u64> = (0..n).map(|_| 1 + xorshift(&mut seed) % max).collect();
            let total = weights.iter().sum::<u64>() as usize;
            assert_eq!(swrr_period(&weights), nginx(&weights, total), "{weights:?}");
        }
    }

    #[test]
    fn large_pool_builds_a_full_exact_period() {
        // 1,024 backends with weights up to 1,000 and gcd 1: ~500,000 slots.
        let weights: Vec<u32> = (0..1024).map(|i| 1 + (i * 7919 % 1000)).collect();
        let backends = backends(&weights);
        let Balancer::RoundRobin(rr) = Balancer::new(Strategy::RoundRobin, &backends) else {
            unreachable!()
        };
        let mut counts = vec![0u32; weights.len()];
        rr.schedule.iter().for_each(|&i| counts[i as usize] += 1);
        assert_eq!(counts, weights);
        // Smooth: nowhere does the heaviest backend take more than two slots in a row.
        let heaviest = (0..1024).max_by_key(|&i| weights[i]).unwrap() as u32;
        assert!(
            rr.schedule
                .windows(3)
                .all(|w| w.iter().any(|&i| i != heaviest))
        );
    }

    #[test]
    fn oversized_periods_are_scaled_down_in_proportion() {
        let weights: Vec<u32> = (0..3000).map(|i| 1 + (i * 7919 % 1000)).collect();
        let reduced = reduce(&weights);
        let total: u64 = reduced.iter().sum();
        assert!(total <= MAX_PERIOD + weights.len() as u64, "{total}");
        for (&w, &r) in weights.iter().zip(&reduced) {
            let exact = w as f64 * total as f64 / weights.iter().map(|&w| w as f64).sum::<f64>();
            assert!(
                (r as f64 - exact).abs() <= 1.0 + exact * 0.01,
                "{w} → {r} vs {exact}"
            );
        }
    }

    #[test]
    fn skips_an_ineligible_backend_and_shares_its_turns_fairly() {
        let backends = backends(&[1, 1, 1]);
        let balancer = Balancer::new(Strategy::RoundRobin, &backends);
        backends[1].set_health(Health::Down);
        // Its turns go alternately to the others, not all to its successor.
        assert_eq!(counts(&balancer, &backends, 600), [300, 0, 300]);
        backends[1].set_health(Health::Up);
        backends[0].set_admin(Admin::Drain);
        assert_eq!(counts(&balancer, &backends, 600), [0, 300, 300]);
    }

    #[test]
    fn keeps_proportions_among_the_rest_when_the_heaviest_is_down() {
        let backends = backends(&[1, 2, 1000]);
        let balancer = Balancer::new(Strategy::RoundRobin, &backends);
        backends[2].set_health(Health::Down);
        let counts = counts(&balancer, &backends, 3000);
        assert_eq!(counts[2], 0);
        assert_eq!(counts[0] + counts[1], 3000);
        assert!((900..=1100).contains(&counts[0]), "{counts:?}");
    }
}
