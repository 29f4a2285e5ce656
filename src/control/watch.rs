//! Pools that lose their last eligible backend, and get one back: one line each way per
//! transition. Looked at on the control task's tick from the published tables, never from
//! the data path.

use std::collections::BTreeMap;

use crate::tables::Tables;

/// Whether each pool had an eligible backend when last looked at.
#[derive(Default)]
pub(super) struct PoolWatch {
    eligible: BTreeMap<String, bool>,
}

impl PoolWatch {
    /// Looks at every pool; logs the pools that lost or regained their last eligible
    /// backend since the last look. A pool seen for the first time is only noted (the
    /// start warns of its own, `server`).
    pub(super) fn observe(&mut self, tables: &Tables) {
        self.eligible
            .retain(|name, _| tables.pools.contains_key(name));
        for (name, pool) in &tables.pools {
            let snapshot = pool.snapshot();
            let backends = snapshot.backends.len();
            let eligible = snapshot.backends.iter().filter(|b| b.is_eligible()).count();
            let now = eligible > 0;
            let Some(was) = self.eligible.insert(name.clone(), now) else {
                continue;
            };
            match (was, now) {
                (true, false) => tracing::warn!(
                    pool = %name, eligible, backends, reason = "no_backend",
                    "pool {name}: no eligible backend left ({backends} down, drained or disabled): its clients are closed at once until one comes back"
                ),
                (false, true) => tracing::info!(
                    pool = %name, eligible, backends, reason = "backend_back",
                    "pool {name}: {eligible} of {backends} backends eligible again: serving"
                ),
                _ => {}
            }
        }
    }
}
