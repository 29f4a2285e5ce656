//! The config file: YAML → raw types (`raw`: unknown keys rejected, positions kept) →
//! `validate` (values converted by `values`) → the runtime `Config` (`runtime`), which
//! the rest of weir uses.
//!
//! Every problem is reported, not just the first, as `FILE:LINE:COLUMN: message`
//! (`diag`). This file is the public face: `load`, `parse`, `admin_socket` and the
//! re-exported types; the submodules use each other bottom up (diag, runtime → raw →
//! values → validate), never this file.

use std::path::{Path, PathBuf};

mod diag;
mod raw;
mod runtime;
mod validate;
mod values;

pub use diag::{ConfigErrors, Diagnostic};
pub use runtime::{BackendConfig, Config, HealthCheckConfig, ListenerConfig, PoolConfig, Protocol};

use diag::Cx;

/// Where `weir run`, `weir check` and `weir ctl -c` look when no `-c FILE` is given.
pub const DEFAULT_PATH: &str = "config/weir.yaml";

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Diagnostic {
            file: file.clone(),
            position: None,
            key_path: None,
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse(&text, &file)
}

/// Only `admin.socket` of the file at `path`, for `weir ctl -c`: nothing else is checked
/// and no backend name is resolved, so an operator can still drain a backend when another
/// one's name doesn't resolve or the file has a mistake elsewhere.
pub fn admin_socket(path: &Path) -> Result<Option<PathBuf>, ConfigErrors> {
    let file = path.display().to_string();
    let mut cx = Cx {
        file: &file,
        diags: Vec::new(),
    };
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

/// Parses and validates config text; `file` is used in messages only.
///
/// Every problem found is reported. YAML syntax errors, unknown keys and values of the
/// wrong YAML shape stop deserialization, so only the first of those is reported; all
/// other problems (bad values, missing pools, clashing binds, unresolvable hosts, …) are
/// collected together.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    let mut cx = Cx {
        file,
        diags: Vec::new(),
    };
    let Some(raw) = raw::read(&mut cx, text) else {
        return Err(cx.finish());
    };
    let config = validate::validate(&mut cx, raw);
    if cx.diags.is_empty() {
        Ok(config)
    } else {
        Err(cx.finish())
    }
}
