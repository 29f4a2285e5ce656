//! `source-hash`: the same client IP goes to the same backend, consistently, by name.
//!
//! The build fills a Maglev lookup table (Eisenbud et al., NSDI 2016): a prime number of
//! slots, each backend walking its own permutation of them (offset and step from a stable
//! hash of its *name*) and taking the next free slot on each of its turns. Turns go in
//! order of `turns taken / weight`, ties by name, so a backend gets slots in proportion to
//! its weight, every backend gets at least one (a weight-1 backend among heavy ones would
//! otherwise round to none), and nothing depends on the order of the config file: two
//! balancers built over the same named backends agree slot for slot. A pick hashes the
//! client's address (stable xxh3 of its bytes; an IPv4-mapped IPv6 address counts as the
//! IPv4 one) to a slot.
//!
//! The table has at least 100 slots per backend, for resolution: 65,537 up to 655
//! backends, then the next prime size up. A change of size (a pool growing past 655
//! backends) moves most clients; any other change of the backend set moves few.
//!
//! The table is rebuilt only when the backend set or a weight changes, never on health.
//! When the slot's backend is ineligible or excluded, the pick falls back to weighted
//! rendezvous hashing of (client, name) over the available backends. So when a backend
//! goes down only its own clients move (each to its rendezvous winner among the rest), and
//! when it comes back they return to it.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::IpAddr;
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{available, weights};
use crate::backend::Backend;

/// Table sizes, primes: the smallest with at least `SLOTS_PER_BACKEND` slots per backend
/// is used (the largest beyond that), so that weights and balance keep their resolution.
const TABLE_SIZES: [u64; 5] = [65_537, 131_071, 262_139, 524_287, 1_048_573];
const SLOTS_PER_BACKEND: u64 = 100;

/// Fixed seeds: changing one moves every client, so they never change.
const SEED_OFFSET: u64 = 0x7765_6972_2d6f_6666; // "weir-off"
const SEED_STEP: u64 = 0x7765_6972_2d73_6b70; // "weir-skp"
const SEED_CLIENT: u64 = 0x7765_6972_2d63_6c69; // "weir-cli"
const SEED_NAME: u64 = 0x7765_6972_2d6e_616d; // "weir-nam"

pub struct SourceHash {
    /// Slot → backend index.
    table: Box<[u32]>,
    weights: Box<[u32]>,
    /// A stable hash of each backend's name, for rendezvous hashing.
    name_hashes: Box<[u64]>,
}

impl SourceHash {
    pub fn new(backends: &[Arc<Backend>]) -> Self {
        let weights = weights(backends);
        let name_hashes = backends
            .iter()
            .map(|b| xxh3_64_with_seed(b.name.as_bytes(), SEED_NAME))
            .collect();
        SourceHash {
            table: maglev(backends, &weights).into_boxed_slice(),
            weights,
            name_hashes,
        }
    }

    #[inline]
    pub fn pick(
        &self,
        backends: &[Arc<Backend>],
        client: IpAddr,
        exclude: &[usize],
    ) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let key = client_key(client);
        // Lemire's multiply-shift maps the hash onto the table without a division.
        let slot = ((u128::from(key) * self.table.len() as u128) >> 64) as usize;
        let i = self.table[slot] as usize;
        if available(backends, i, exclude) {
            return Some(i);
        }
        self.rendezvous(backends, key, exclude)
    }

    /// Weighted rendezvous hashing: each available backend scores `weight / -ln(u)` for a
    /// uniform `u` hashed from (client, name), the highest wins; a backend wins with a
    /// probability proportional to its weight, and removing one moves only its clients.
    fn rendezvous(&self, backends: &[Arc<Backend>], key: u64, exclude: &[usize]) -> Option<usize> {
        let mut best: Option<(usize, f64, u64)> = None;
        for i in 0..backends.len() {
            if !available(backends, i, exclude) {
                continue;
            }
            let h = xxh3_64_with_seed(&key.to_le_bytes(), self.name_hashes[i]);
            // 53 random bits, shifted into (0, 1] so the logarithm is finite.
            let u = ((h >> 11) + 1) as f64 / (1u64 << 53) as f64;
            let score = f64::from(self.weights[i]) / -u.ln();
            let better = match best {
                None => true,
                // Ties (never in practice) go by name hash, not by position in the file.
                Some((_, s, nh)) => score > s || (score == s && self.name_hashes[i] > nh),
            };
            if better {
                best = Some((i, score, self.name_hashes[i]));
            }
        }
        best.map(|(i, _, _)| i)
    }
}

fn client_key(client: IpAddr) -> u64 {
    match client.to_canonical() {
        IpAddr::V4(a) => xxh3_64_with_seed(&a.octets(), SEED_CLIENT),
        IpAddr::V6(a) => xxh3_64_with_seed(&a.octets(), SEED_CLIENT),
    }
}

/// One backend's turn in the fill: due at `taken / weight`, ties by name order.
#[derive(PartialEq, Eq)]
struct Turn {
    taken: u64,
    weight: u64,
    /// Position in name order.
    rank: u32,
}

impl Ord for Turn {
    /// Reversed, so that `BinaryHeap` (a max-heap) yields the earliest turn first.
    fn cmp(&self, other: &Self) -> Ordering {
        let due = u128::from(self.taken) * u128::from(other.weight);
        let other_due = u128::from(other.taken) * u128::from(self.weight);
        other_due.cmp(&due).then_with(|| other.rank.cmp(&self.rank))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The Maglev lookup table for these backends: slot → index in `backends`.
fn maglev(backends: &[Arc<Backend>], weights: &[u32]) -> Vec<u32> {
    let n = backends.len();
    if n == 0 {
        return Vec::new();
    }
    let size = TABLE_SIZES
        .into_iter()
        .find(|&m| m >= SLOTS_PER_BACKEND * n as u64)
        .unwrap_or(TABLE_SIZES[TABLE_SIZES.len() - 1]);
    // Name order (address, then file position, only for duplicate names, which config
    // rejects) so that the fill is the same whatever order the file lists them in.
    let mut by_name: Vec<usize> = (0..n).collect();
    by_name.sort_by(|&a, &b| {
        (&backends[a].name, &backends[a].address).cmp(&(&backends[b].name, &backends[b].address))
    });
    // Each backend's permutation: slot_j = (offset + j·step) mod size; size is prime, so
    // any step in 1..size visits every slot.
    let mut next: Vec<u64> = Vec::with_capacity(n);
    let mut step: Vec<u64> = Vec::with_capacity(n);
    for &i in &by_name {
        let name = backends[i].name.as_bytes();
        next.push(xxh3_64_with_seed(name, SEED_OFFSET) % size);
        step.push(xxh3_64_with_seed(name, SEED_STEP) % (size - 1) + 1);
    }
    let mut table = vec![u32::MAX; size as usize];
    let mut turns: BinaryHeap<Turn> = (0..n)
        .map(|rank| Turn {
            taken: 0,
            weight: u64::from(weights[by_name[rank]]),
            rank: rank as u32,
        })
        .collect();
    let mut filled = 0;
    while filled < size {
        let mut turn = turns.pop().expect("one turn per backend");
        let r = turn.rank as usize;
        while table[next[r] as usize] != u32::MAX {
            next[r] = (next[r] + step[r]) % size;
        }
        table[next[r] as usize] = by_name[r] as u32;
        next[r] = (next[r] + step[r]) % size;
        filled += 1;
        turn.taken += 1;
        turns.push(turn);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{Balancer, Strategy};
    use super::*;
    use crate::backend::{Admin, Health};

    fn names(backends: &[Arc<Backend>], balancer: &Balancer, clients: u32) -> Vec<String> {
        (0..clients)
            .map(|c| {
                let i = balancer.pick(backends, client(c * 7919), &[]).unwrap();
                backends[i].name.clone()
            })
            .collect()
    }

    #[test]
    fn the_same_client_sticks_to_the_same_backend() {
        let backends = backends(&[1, 1, 1, 1, 1]);
        let balancer = Balancer::new(Strategy::SourceHash, &backends);
        for c in 0..200 {
            let first = balancer.pick(&backends, client(c), &[]);
            for _ in 0..5 {
                assert_eq!(balancer.pick(&backends, client(c), &[]), first);
            }
        }
    }

    #[test]
    fn only_the_clients_of_a_down_backend_move_and_they_come_back() {
        let backends = backends(&[1, 1, 1, 1, 1]);
        let balancer = Balancer::new(Strategy::SourceHash, &backends);
        let before = names(&backends, &balancer, 1000);
        backends[2].set_health(Health::Down);
        let during = names(&backends, &balancer, 1000);
        let mut moved = 0;
        for (b, d) in before.iter().zip(&during) {
            if b == "b2" {
                assert_ne!(d, "b2");
                moved += 1;
            } else {
                assert_eq!(b, d, "a client of a healthy backend moved");
            }
        }
        assert!((100..=300).contains(&moved), "{moved} of 1000 were on b2");
        // Its clients spread over the others rather than all landing on one.
        for other in ["b0", "b1", "b3", "b4"] {
            let landed = before
                .iter()
                .zip(&during)
                .filter(|(b, d)| *b == "b2" && *d == other)
                .count();
            assert!(landed > moved / 10, "{landed} of {moved} moved to {other}");
        }
        backends[2].set_health(Health::Up);
        assert_eq!(names(&backends, &balancer, 1000), before);
        // Draining is the same as down for new picks.
        backends[2].set_admin(Admin::Drain);
        assert_eq!(names(&backends, &balancer, 1000), during);
    }

    #[test]
    fn independent_builds_agree_by_name_whatever_the_order() {
        let list = ["web-a", "web-b", "web-c", "web-d", "web-e", "web-f"];
        let first: Vec<_> = list.iter().map(|n| named(n, 1)).collect();
        let shuffled: Vec<_> = [3, 0, 5, 1, 4, 2]
            .iter()
            .map(|&i| named(list[i], 1))
            .collect();
        let one = Balancer::new(Strategy::SourceHash, &first);
        let two = Balancer::new(Strategy::SourceHash, &shuffled);
        assert_eq!(names(&first, &one, 1000), names(&shuffled, &two, 1000));
        // Also on the fallback path: the same backend down in both.
        first[1].set_health(Health::Down);
        shuffled[3].set_health(Health::Down);
        assert_eq!(names(&first, &one, 1000), names(&shuffled, &two, 1000));
    }

    #[test]
    fn spreads_clients_roughly_evenly() {
        let backends = backends(&[1, 1, 1, 1, 1]);
        let balancer = Balancer::new(Strategy::SourceHash, &backends);
        let mut counts = [0; 5];
        for c in 0..10_000 {
            counts[balancer.pick(&backends, client(c), &[]).unwrap()] += 1;
        }
        // 2,000 each expected; the binomial σ is 40.
        assert!(
            counts.iter().all(|&c| (1_800..=2_200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn table_slots_follow_the_weights() {
        let backends = backends(&[1, 2, 3, 10]);
        let Balancer::SourceHash(sh) = Balancer::new(Strategy::SourceHash, &backends) else {
            unreachable!()
        };
        let mut slots = [0usize; 4];
        sh.table.iter().for_each(|&i| slots[i as usize] += 1);
        for (i, w) in [1, 2, 3, 10].into_iter().enumerate() {
            let expected = sh.table.len() as f64 * w as f64 / 16.0;
            assert!((slots[i] as f64 - expected).abs() < 2.0, "{slots:?}");
        }
    }

    #[test]
    fn every_backend_gets_slots_even_when_outweighed() {
        let mut weights = vec![1000; 200];
        weights.push(1); // a fair share of 65,537 × 1/200,001 = 0.3 slots
        let backends = backends(&weights);
        let Balancer::SourceHash(sh) = Balancer::new(Strategy::SourceHash, &backends) else {
            unreachable!()
        };
        assert_eq!(sh.table.iter().filter(|&&i| i == 200).count(), 1);
    }

    #[test]
    fn rendezvous_fallback_follows_the_weights() {
        let backends = backends(&[1, 1, 3, 50]);
        let balancer = Balancer::new(Strategy::SourceHash, &backends);
        backends[3].set_health(Health::Down);
        let mut counts = [0; 4];
        for c in 0..20_000 {
            counts[balancer.pick(&backends, client(c), &[]).unwrap()] += 1;
        }
        // About 94% of clients are on the down one and spread 1:1:3 over the rest.
        let moved = counts[0] + counts[1] + counts[2];
        let share = counts[2] as f64 / moved as f64;
        assert!((0.55..0.65).contains(&share), "{counts:?}");
    }

    #[test]
    fn ipv4_mapped_ipv6_is_the_ipv4_client() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4), client_key(mapped));
        assert_ne!(client_key(v4), client_key("192.0.2.8".parse().unwrap()));
    }

    #[test]
    fn table_size_grows_with_the_pool() {
        let small = backends(&[1; 5]);
        let large = backends(&[1; 1024]);
        for (b, size) in [(&small, 65_537), (&large, 131_071)] {
            let Balancer::SourceHash(sh) = Balancer::new(Strategy::SourceHash, b) else {
                unreachable!()
            };
            assert_eq!(sh.table.len(), size);
            assert!(sh.table.iter().all(|&i| (i as usize) < b.len()));
        }
    }
}
