//! The config file: YAML → a positioned tree (`yaml`) → raw types (`raw`: exactly the
//! contract's keys) → `validate` (single values converted by `values`) → the runtime
//! `Config` (`runtime`), which the rest of weir uses.
//!
//! Every problem is reported in one run, not just the first, as `FILE:LINE:COLUMN:
//! message` (`diag`): an unknown key (with the key probably meant), a value of the wrong
//! shape, a bad value and a clash between keys all come out together; only a YAML syntax
//! error stops the rest. Likely mistakes that still run (a pool no listener uses, a check
//! timeout longer than its interval) are warnings, from `load_with_warnings`.
//!
//! This file is the public face: `load`, `parse`, `admin_socket` and the re-exported
//! types; the submodules use each other bottom up (diag → yaml, runtime → raw → values
//! → discover → validate), never this file.

use std::path::{Path, PathBuf};

mod diag;
mod discover;
mod raw;
mod runtime;
mod validate;
mod values;
mod yaml;

pub use diag::{ConfigErrors, Diagnostic};
pub use runtime::{
    BackendConfig, Config, DiscoverConfig, HealthCheckConfig, HostName, ListenerConfig, OnDown,
    PoolConfig, Protocol, SOCKET_PATH_MAX, admin_socket_staging,
};

use diag::Cx;

/// Where `weir run`, `weir check` and `weir ctl -c` look when no `-c FILE` is given.
pub const DEFAULT_PATH: &str = "config/weir.yaml";

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_warnings(path).map(|(config, _)| config)
}

/// Like `load`, with the warnings of a valid config: likely mistakes that don't stop it
/// from running, each displayed as `FILE:LINE:COLUMN: warning: message`, in file order.
/// (A config with problems gets only its problems: fix those first.)
pub fn load_with_warnings(path: &Path) -> Result<(Config, Vec<Diagnostic>), ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        let mut cx = Cx::new(&file);
        cx.error(None, "", format!("cannot read: {e}"));
        cx.finish()
    })?;
    parse_with_warnings(&text, &file)
}

/// Only `admin.socket` of the file at `path`, for `weir ctl -c`: nothing else is checked
/// and no backend name is resolved, so an operator can still drain a backend when another
/// one's name doesn't resolve or the file has a mistake elsewhere.
pub fn admin_socket(path: &Path) -> Result<Option<PathBuf>, ConfigErrors> {
    let file = path.display().to_string();
    let mut cx = Cx::new(&file);
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            cx.error(None, "", format!("cannot read: {e}"));
            return Err(cx.finish());
        }
    };
    match raw::read_admin_socket(&mut cx, &text) {
        Ok(socket) => Ok(socket.filter(|s| !s.trim().is_empty()).map(PathBuf::from)),
        Err(()) => Err(cx.finish()),
    }
}

/// Parses and validates config text; `file` is used in messages only. Every problem
/// found is reported.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    parse_with_warnings(text, file).map(|(config, _)| config)
}

/// Like `parse`, with the warnings of a valid config (see `load_with_warnings`).
pub fn parse_with_warnings(
    text: &str,
    file: &str,
) -> Result<(Config, Vec<Diagnostic>), ConfigErrors> {
    let mut cx = Cx::new(file);
    let Some(raw) = raw::read(&mut cx, text) else {
        return Err(cx.finish());
    };
    let config = validate::validate(&mut cx, raw);
    if cx.has_errors() {
        Err(cx.finish())
    } else {
        Ok((config, cx.warnings()))
    }
}
