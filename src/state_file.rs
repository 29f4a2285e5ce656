//! The admin state file (`admin.state_file`): drained and disabled backends and weights
//! changed at runtime, kept across restarts so a backend under maintenance doesn't come
//! back into rotation because weir restarted.
//!
//! Only the control task writes it (after every admin change and reload), durably and
//! atomically: a uniquely named temporary file in the same folder (created with O_EXCL,
//! so a symlink planted there is never followed), fsynced, renamed over the file
//! (`tempfile`), then the folder fsynced. The admin socket answers only after that, so a
//! change it acknowledged survives a crash or power loss.
//!
//! It is read with O_NOFOLLOW: a state file that is a symbolic link is refused like an
//! unreadable one (logged at error, counted in `weir_state_file_errors_total{op="read"}`,
//! weir serves with the config's state), and the next admin change replaces the link
//! with a regular file: weir never writes through a link.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::{Admin, Backend};
use crate::balance::WEIGHT_RANGE;
use crate::config::Config;
use crate::tables::Tables;

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is a symbolic link; weir never follows one (remove it: the next admin change writes a regular file there)"
    )]
    Symlink { path: String },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// Keyed by `POOL/BACKEND`.
    pub backends: BTreeMap<String, BackendState>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendState {
    /// `drain` or `disabled`; absent: enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// Absent: the weight from the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// The config's weight for this backend when `weight` was set: an operator's weight
    /// holds until the file's value changes, at a restart as at a reload. Absent (files
    /// written before it existed): `weight` holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_weight: Option<u32>,
}

/// What differs from the config in `tables`: the admin state of every backend that
/// isn't enabled, and every weight that isn't the config's.
pub fn capture(tables: &Tables, config: &Config) -> StateFile {
    capture_with(tables, config, |_, _| None)
}

/// `capture`, with the backends found by `discover` too: `discovered(pool, name)` is the
/// weight DNS gave a discovered backend (None: not one), which plays the config's part.
/// They are keyed by name like listed ones, so a drain outlives re-resolution and restart.
pub fn capture_with(
    tables: &Tables,
    config: &Config,
    discovered: impl Fn(&str, &str) -> Option<u32>,
) -> StateFile {
    let mut state = StateFile::default();
    for pool_config in &config.pools {
        let Some(pool) = tables.pools.get(&pool_config.name) else {
            continue;
        };
        let snapshot = pool.load_full();
        for backend_config in &pool_config.backends {
            let Some(backend) = snapshot.find(&backend_config.name) else {
                continue;
            };
            insert(&mut state, backend, backend_config.weight);
        }
        // A retiring one (a moved backend's old address) shares its successor's name.
        for backend in snapshot.backends.iter().filter(|b| !b.is_retiring()) {
            if let Some(weight) = discovered(&backend.pool, &backend.name) {
                insert(&mut state, backend, weight);
            }
        }
    }
    state
}

/// `backend`'s entry, when its admin state or weight (against `base`) needs one.
fn insert(state: &mut StateFile, backend: &Backend, base: u32) {
    let admin = match backend.admin() {
        Admin::Enabled => None,
        Admin::Drain => Some("drain".to_string()),
        Admin::Disabled => Some("disabled".to_string()),
    };
    let weight = (backend.weight() != base).then(|| backend.weight());
    let config_weight = weight.map(|_| base);
    if admin.is_some() || weight.is_some() {
        state.backends.insert(
            format!("{}/{}", backend.pool, backend.name),
            BackendState {
                admin,
                weight,
                config_weight,
            },
        );
    }
}

/// Writes `state` durably (see the module doc); a failure is counted and names the file.
pub fn write(path: &Path, state: &StateFile) -> Result<(), StateFileError> {
    write_durably(path, state).map_err(|source| {
        errors("write").increment(1);
        StateFileError::Write {
            path: path.display().to_string(),
            source,
        }
    })
}

fn write_durably(path: &Path, state: &StateFile) -> std::io::Result<()> {
    use std::io::Write as _;
    let text = serde_json::to_string_pretty(state).map_err(std::io::Error::other)? + "\n";
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut temporary = tempfile::Builder::new()
        .prefix(".weir-state.")
        .tempfile_in(folder)?;
    temporary.write_all(text.as_bytes())?;
    temporary.as_file().sync_all()?;
    // rename(2) replaces a link at `path` itself, never the file it points to.
    temporary.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(folder)?.sync_all()
}

/// `weir_state_file_errors_total{op}`: a lookup by name, on the rare error path only.
fn errors(op: &'static str) -> metrics::Counter {
    metrics::counter!(crate::metrics::names::STATE_FILE_ERRORS, "op" => op)
}

/// Reads the file; a missing file is an empty state.
/// Reads the file; a missing file is an empty state. Anything else that keeps it from
/// being read — unreadable, empty, not JSON, a symbolic link — is an error, counted in
/// `weir_state_file_errors_total{op="read"}`.
pub fn read(path: &Path) -> Result<StateFile, StateFileError> {
    let result = read_no_follow(path);
    if result.is_err() {
        errors("read").increment(1);
    }
    result
}

fn read_no_follow(path: &Path) -> Result<StateFile, StateFileError> {
    use rustix::fs::{Mode, OFlags};
    use std::io::Read as _;
    let shown = || path.display().to_string();
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let file = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => std::fs::File::from(fd),
        Err(rustix::io::Errno::NOENT) => return Ok(StateFile::default()),
        Err(rustix::io::Errno::LOOP) => return Err(StateFileError::Symlink { path: shown() }),
        Err(e) => {
            return Err(StateFileError::Read {
                path: shown(),
                source: e.into(),
            });
        }
    };
    let mut text = String::new();
    let mut reader = std::io::BufReader::new(file);
    reader
        .read_to_string(&mut text)
        .map_err(|source| StateFileError::Read {
            path: shown(),
            source,
        })?;
    serde_json::from_str(&text).map_err(|source| StateFileError::Parse {
        path: shown(),
        source,
    })
}

/// Applies a state file to freshly built backends (whose weight is still the config's),
/// logging each restored entry; entries whose backend no longer exists are ignored with a
/// warning. An operator's weight is restored only while the config still has the weight it
/// had when it was set (`config_weight`): an edited weight in the file wins, as at a
/// reload. Returns whether a weight changed (the caller rebuilds that pool's snapshot).
pub fn restore(
    state: &StateFile,
    find: impl Fn(&str, &str) -> Option<std::sync::Arc<Backend>>,
) -> bool {
    let mut weights_changed = false;
    for (key, entry) in &state.backends {
        let Some((pool, name)) = key.split_once('/') else {
            tracing::warn!("state file: ignoring {key:?}: not POOL/BACKEND");
            continue;
        };
        let Some(backend) = find(pool, name) else {
            tracing::warn!("state file: ignoring {key}: no such backend in the config");
            continue;
        };
        match entry.admin.as_deref() {
            None => {}
            Some("drain") => backend.set_admin(Admin::Drain),
            Some("disabled") => backend.set_admin(Admin::Disabled),
            Some(other) => {
                tracing::warn!("state file: ignoring {key}: unknown admin state {other:?}");
                continue;
            }
        }
        let config_weight = backend.weight();
        let weight = entry.weight.filter(|w| {
            let edited = entry.config_weight.is_some_and(|was| was != config_weight);
            if edited {
                tracing::info!(
                    "state file: not restoring weight {w} of {key}: the config's weight changed since it was set ({} -> {config_weight})",
                    entry.config_weight.unwrap_or_default()
                );
            }
            !edited
        });
        if let Some(weight) = weight {
            if WEIGHT_RANGE.contains(&weight) {
                backend.set_weight(weight);
                weights_changed = true;
            } else {
                tracing::warn!(
                    "state file: ignoring weight {weight} of {key}: out of {}..={}",
                    WEIGHT_RANGE.start(),
                    WEIGHT_RANGE.end()
                );
            }
        }
        tracing::info!(
            "state file: restored {key}: {}{}",
            entry.admin.as_deref().unwrap_or("enabled"),
            weight.map(|w| format!(", weight {w}")).unwrap_or_default()
        );
    }
    weights_changed
}
