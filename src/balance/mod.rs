//! Load-balancing strategies, one file each, dispatched by a plain enum.
//!
//! A `Balancer` is built by the control task from a pool's backends (reading their
//! weights) and swapped in whole with the pool's snapshot; `pick` runs on the connection
//! path and takes no lock: it reads atomics and the precomputed tables only.

use std::net::IpAddr;
use std::sync::Arc;

use crate::backend::Backend;
use crate::config::Strategy;

pub enum Balancer {
    /// Placeholder until the strategies land: the first eligible backend.
    First,
}

impl Balancer {
    pub fn new(strategy: Strategy, backends: &[Arc<Backend>]) -> Balancer {
        let _ = (strategy, backends);
        Balancer::First
    }

    /// The index in `backends` of an eligible backend that is not in `exclude`
    /// (the ones already tried for this connection), or None when there is none.
    pub fn pick(
        &self,
        backends: &[Arc<Backend>],
        client: IpAddr,
        exclude: &[usize],
    ) -> Option<usize> {
        let _ = client;
        match self {
            Balancer::First => {
                (0..backends.len()).find(|i| !exclude.contains(i) && backends[*i].is_eligible())
            }
        }
    }
}
