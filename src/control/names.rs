//! Listed backends whose address is a host name. A follower (`discovery.rs`) resolves
//! each one on its pool's DNS schedule; an answer that no longer holds the backend's
//! address (or the first answer for one that did not resolve at start) is applied here
//! like a moved backend: a successor of the same name at the new address takes its admin
//! state and operator weight and gets the pool's health check, while the old one retires
//! like a backend a reload removed, its open connections left to finish.
//!
//! An answer that still holds the current address changes nothing, so a name with several
//! addresses does not flap between them; a new one gets the lowest address, the choice
//! every instance makes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{ControlTask, joining, new_backend};
use crate::backend::Backend;
use crate::discover::Found;
use crate::pool::PoolSnapshot;

/// Where `current` should be now that its name resolved to `found`; None: where it is.
fn moved_to(current: &Backend, found: &[Found]) -> Option<SocketAddr> {
    let still_there = found.iter().any(|f| f.addr == current.addr);
    if still_there && !current.is_unresolved() {
        return None;
    }
    found.iter().map(|f| f.addr).min()
}

impl ControlTask {
    /// The host name of listed backend `name` of `pool_name` resolved to `found`.
    pub(super) async fn apply_host(&mut self, pool_name: &str, name: &str, found: &[Found]) {
        let config = self.config.load_full();
        let tables = self.tables.load_full();
        let (Some(pool_config), Some(pool)) = (
            config.pools.iter().find(|p| p.name == pool_name),
            tables.pools.get(pool_name),
        ) else {
            return;
        };
        let Some(listed) = pool_config.backends.iter().find(|b| b.name == name) else {
            return;
        };
        let snapshot = pool.load_full();
        let current = (snapshot.backends.iter()).find(|b| b.name == name && !self.is_retiring(b));
        let Some(old) = current.cloned() else { return };
        let Some(addr) = moved_to(&old, found) else {
            return;
        };
        let mut moved = listed.clone();
        moved.addr = addr;
        if let Some(host) = &mut moved.host {
            host.resolved = true;
        }
        let new = new_backend(pool_config, &moved, &self.shutdown.hard);
        joining(&new, pool_config);
        new.set_admin(old.admin());
        if old.weight() != listed.weight {
            new.set_weight(old.weight());
        }
        self.checkers.stop(std::slice::from_ref(&old)).await;
        let mut backends: Vec<Arc<Backend>> = (snapshot.backends.iter())
            .map(|b| {
                if Arc::ptr_eq(b, &old) {
                    Arc::clone(&new)
                } else {
                    Arc::clone(b)
                }
            })
            .collect();
        let open = old.active();
        if open > 0 {
            self.retire(&old);
            backends.push(Arc::clone(&old));
        }
        if let Some(check) = &pool_config.health_check {
            let _first =
                (self.checkers).start(&new, check, pool.protocol, &self.shutdown, Duration::ZERO);
        }
        pool.publish(PoolSnapshot::new(pool_config, backends));
        if old.is_unresolved() {
            tracing::info!(pool = %pool_name, backend = %name, "{} resolves to {addr}: the backend joins the pool", listed.address);
        } else {
            tracing::info!(pool = %pool_name, backend = %name, "{} now resolves to {addr} (was {}): new connections go there, {open} open ones continue", listed.address, old.addr);
        }
        // A failure is logged by save_state; the change is in force anyway.
        let _ = self.save_state();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(addrs: &[&str]) -> Vec<Found> {
        (addrs.iter())
            .map(|a| Found {
                name: a.to_string(),
                addr: a.parse().unwrap(),
                weight: 1,
            })
            .collect()
    }

    #[test]
    fn an_address_still_in_the_answer_stays_and_a_gone_one_moves_to_the_lowest() {
        let b = Backend::new(
            "p",
            "db",
            "db.test:5432",
            "10.0.0.2:5432".parse().unwrap(),
            1,
            true,
        );
        assert_eq!(
            moved_to(&b, &found(&["10.0.0.9:5432", "10.0.0.2:5432"])),
            None
        );
        assert_eq!(
            moved_to(&b, &found(&["10.0.0.9:5432", "10.0.0.3:5432"])),
            Some("10.0.0.3:5432".parse().unwrap())
        );
    }

    #[test]
    fn an_unresolved_backend_moves_to_its_first_answer() {
        let b = Backend::new(
            "p",
            "db",
            "db.test:5432",
            "0.0.0.0:5432".parse().unwrap(),
            1,
            false,
        );
        b.mark_unresolved("db.test does not resolve");
        assert_eq!(
            moved_to(&b, &found(&["10.0.0.4:5432"])),
            Some("10.0.0.4:5432".parse().unwrap())
        );
        assert_eq!(
            b.set_health(crate::backend::Health::Up),
            crate::backend::Health::Down
        );
        assert!(!b.is_eligible(), "an unresolved backend never comes up");
    }
}
