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
//! tournament tree, in `O(W log n)`: each peer's `current` is a line over time (`c + t·w`,
//! `c` changing only when the peer is picked); each tree node keeps the winning line of its
//! two children and the first time at which the losing line would overtake it, so a step
//! recomputes only the picked peer's path and the nodes that expired. The tree's leaves
//! are in order of weight, since lines of near-equal slope rarely cross.
//!
//! The period is capped at `MAX_PERIOD` slots, which builds in 25–30 ms: beyond it
//! (say 1,024 backends with coprime weights averaging over 256) the weights are scaled to
//! fit, rounded to nearest and at least 1. Each backend's share of the picks is then off by
//! less than one slot in `MAX_PERIOD` (0.0004% of the traffic), which is noticeable, in
//! relative terms, only between the lightest weights of such a pool.

use std::hint::select_unpredictable;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{available, weighted_scan, weights};
use crate::backend::Backend;

/// The longest schedule built exactly (1 MiB of `u32`); longer ones are scaled down.
const MAX_PERIOD: u64 = 1 << 18;

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
    /// The client's address plays no part here.
    pub fn pick(
        &self,
        backends: &[Arc<Backend>],
        _client: IpAddr,
        exclude: &[usize],
    ) -> Option<usize> {
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

/// The weights divided by their gcd; scaled to sum to about `MAX_PERIOD` if they sum to
/// more (see the module docs).
fn reduce(weights: &[u32]) -> Vec<u64> {
    fn divide_by_gcd(mut weights: Vec<u64>) -> Vec<u64> {
        let g = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
        weights.iter_mut().for_each(|w| *w /= g);
        weights
    }
    let reduced = divide_by_gcd(weights.iter().map(|&w| u64::from(w)).collect());
    let total: u64 = reduced.iter().sum();
    if total <= MAX_PERIOD {
        return reduced;
    }
    let scale = |w: u64| ((w * MAX_PERIOD + total / 2) / total).max(1);
    divide_by_gcd(reduced.into_iter().map(scale).collect())
}

/// One period of NGINX's smooth weighted round-robin over `weights` (all ≥ 1), computed
/// in about `O(W log n)` by a kinetic tournament tree (see the module docs).
fn swrr_period(weights: &[u64]) -> Vec<u32> {
    let total: u64 = weights.iter().sum();
    let mut schedule = Vec::with_capacity(total as usize);
    if weights.is_empty() {
        return schedule;
    }
    let mut tree = Tournament::new(weights);
    for t in 1..=total as i64 {
        let j = tree.refresh(1, t).index;
        schedule.push(j);
        tree.picked(j as usize, total as i64, t);
    }
    schedule
}

const NEVER: i64 = i64::MAX;

/// A kinetic tournament over the lines `current_i(t) = offset_i + t·weight_i`: each node
/// holds a copy of the winning line among its leaves (larger `current`, lower index on a
/// tie, as NGINX) as of the last time it was computed, and the earliest time at which the
/// winner of it or of a node below it would change.
///
/// `combine` is written without branches: which child wins and which line is steeper are
/// coin flips, and mispredicting them cost more than all the rest of the build.
struct Tournament {
    /// Node `k`'s children are `2k` and `2k + 1`; the root is 1; the leaves are the second
    /// half, padded to a power of two.
    nodes: Vec<Node>,
    /// Backend index → its leaf.
    leaf: Vec<usize>,
}

#[derive(Clone, Copy)]
struct Node {
    offset: i64,
    weight: i64,
    index: u32,
    expiry: i64,
}

impl Tournament {
    fn new(weights: &[u64]) -> Self {
        let size = weights.len().next_power_of_two();
        // Padding leaves: weight 0 and far below any real line, so they never win and
        // never overtake.
        let pad = Node {
            offset: -(1 << 60),
            weight: 0,
            index: u32::MAX,
            expiry: NEVER,
        };
        let mut nodes = vec![pad; 2 * size];
        let mut leaf = vec![0; weights.len()];
        // Leaves in order of weight: lines of near-equal slope cross rarely, so siblings
        // rarely swap and far fewer nodes expire than with the leaves in file order.
        let mut order: Vec<usize> = (0..weights.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(weights[i]), i));
        for (pos, &i) in order.iter().enumerate() {
            leaf[i] = size + pos;
            nodes[size + pos] = Node {
                offset: 0,
                weight: weights[i] as i64,
                index: i as u32,
                expiry: NEVER,
            };
        }
        for k in (1..size).rev() {
            nodes[k] = combine(nodes[2 * k], nodes[2 * k + 1], 0);
        }
        Tournament { nodes, leaf }
    }

    /// Brings every node whose winner may have changed by time `t` up to date.
    fn refresh(&mut self, k: usize, t: i64) -> Node {
        let node = self.nodes[k];
        if node.expiry > t {
            return node;
        }
        // Leaves never expire, so `k` is an inner node here.
        let a = self.refresh(2 * k, t);
        let b = self.refresh(2 * k + 1, t);
        self.nodes[k] = combine(a, b, t);
        self.nodes[k]
    }

    /// Leaf `i` was picked at time `t`: its offset drops by the total weight, and it is
    /// the winner all the way up, so every node on its path is recomputed.
    fn picked(&mut self, i: usize, total: i64, t: i64) {
        let mut k = self.leaf[i];
        self.nodes[k].offset -= total;
        while k > 1 {
            // Both children from the array: no branch on which side `k` is.
            let node = combine(self.nodes[k & !1], self.nodes[k | 1], t);
            k /= 2;
            self.nodes[k] = node;
        }
    }
}

/// `Ord::min` without a branch, for values whose difference cannot overflow (times, and
/// gaps within ±2^61): LLVM turns `min`, and even `select_unpredictable`, into a branch
/// here, and which is smaller is a coin flip.
#[inline]
fn min(x: i64, y: i64) -> i64 {
    let d = x - y;
    y + (d & (d >> 63))
}

/// A parent from its children `a` (left) and `b` (right) at time `t`: the winner, and
/// when the loser would overtake it (never if the loser's line is not steeper).
#[inline]
fn combine(a: Node, b: Node, t: i64) -> Node {
    let (va, vb) = (a.offset + t * a.weight, b.offset + t * b.weight);
    // `|` and `&` rather than `||` and `&&`: no branch.
    let right_wins = (vb > va) | ((vb == va) & (b.index < a.index));
    // Field by field: a select of whole nodes compiles to a branch.
    let sel = |x: i64, y: i64| select_unpredictable(right_wins, y, x);
    let (win_offset, lose_offset) = (sel(a.offset, b.offset), sel(b.offset, a.offset));
    let (win_weight, lose_weight) = (sel(a.weight, b.weight), sel(b.weight, a.weight));
    let (win_index, lose_index) = (
        select_unpredictable(right_wins, b.index, a.index),
        select_unpredictable(right_wins, a.index, b.index),
    );
    // The loser overtakes at the first t' with lose(t') > win(t'), or ≥ when it has the
    // lower index: t'·steeper > gap (or ≥ gap). The gap is positive at `t`, so t' > t.
    let steeper = lose_weight - win_weight;
    let gap = win_offset - lose_offset - i64::from(lose_index < win_index);
    // Divides unconditionally and selects after. Clamped at 0 so that the division is
    // unsigned (when the gap is negative, the loser is not steeper and the quotient is
    // unused).
    let divisor = select_unpredictable(steeper > 0, steeper, 1);
    let q = ((gap - min(gap, 0)) as u64 / divisor as u64) as i64;
    let own = select_unpredictable(steeper > 0, q + 1, NEVER);
    Node {
        offset: win_offset,
        weight: win_weight,
        index: win_index,
        expiry: min(min(own, a.expiry), b.expiry),
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

    /// Weights 1..=1000, all different, gcd 1.
    fn spread(n: u32) -> Vec<u32> {
        (0..n).map(|i| 1 + (i * 7919 % 1000)).collect()
    }

    #[test]
    fn large_pool_builds_a_full_exact_period() {
        // 512 backends: ~256,000 slots, just under the cap.
        let weights = spread(512);
        assert!(weights.iter().sum::<u32>() as u64 <= MAX_PERIOD);
        let backends = backends(&weights);
        let Balancer::RoundRobin(rr) = Balancer::new(Strategy::RoundRobin, &backends) else {
            unreachable!()
        };
        let mut counts = vec![0u32; weights.len()];
        rr.schedule.iter().for_each(|&i| counts[i as usize] += 1);
        assert_eq!(counts, weights);
        // Smooth: nowhere does the heaviest backend take two slots in a row.
        let heaviest = (0..512).max_by_key(|&i| weights[i]).unwrap() as u32;
        assert!(rr.schedule.windows(2).all(|w| w != [heaviest; 2]));
    }

    #[test]
    fn oversized_periods_are_scaled_down_in_proportion() {
        for weights in [spread(1024), spread(3000), vec![1000; 1023]] {
            let mut weights = weights;
            weights.push(999); // gcd 1
            let reduced = reduce(&weights);
            let total: u64 = reduced.iter().sum();
            let n = weights.len() as u64;
            assert!(total <= MAX_PERIOD + n, "{total}");
            let sum: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            for (&w, &r) in weights.iter().zip(&reduced) {
                // Within one slot of the exact share of the period.
                let exact = f64::from(w) * total as f64 / sum;
                assert!((r as f64 - exact).abs() < 1.0, "{w} → {r}, exactly {exact}");
            }
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
