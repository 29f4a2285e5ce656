//! The routing tables' read side: every pool and listener, as one immutable snapshot that
//! the control task publishes whole (`ArcSwap`) and everyone else only reads — the admin
//! socket, the HTTP endpoint and the state file look here, never at the control task.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::backend::Backend;
use crate::pool::Pool;
use crate::proxy::Listener;

/// Everything live, as one immutable snapshot.
#[derive(Default, Clone)]
pub struct Tables {
    pub pools: BTreeMap<String, Arc<Pool>>,
    pub listeners: BTreeMap<String, Arc<Listener>>,
}

impl Tables {
    /// A backend named `POOL/BACKEND`.
    pub fn backend(&self, pool: &str, backend: &str) -> Option<Arc<Backend>> {
        self.pools.get(pool)?.snapshot().find(backend).cloned()
    }

    /// Every backend, pool by pool in name order, each pool's in its snapshot's order.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.pools
            .values()
            .flat_map(|p| p.snapshot().backends.clone())
            .collect()
    }
}
