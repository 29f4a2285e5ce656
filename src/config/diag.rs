//! Problems found in a config file, each with its position, and the collector that
//! validation writes them to.

use serde_saphyr::Location;

/// One problem in a config file, with its position when YAML has one.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub file: String,
    /// 1-based line and column; None where YAML has no position.
    pub position: Option<(u64, u64)>,
    /// Where there is no position: the key path, e.g. `pools.redis.backends`.
    pub key_path: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.position, &self.key_path) {
            (Some((line, col)), _) => write!(f, "{}:{}:{}: {}", self.file, line, col, self.message),
            (None, Some(path)) => write!(f, "{}: {}: {}", self.file, path, self.message),
            (None, None) => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Every problem found in a config; `Display` prints one per line.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Collects the problems of one file.
pub(super) struct Cx<'a> {
    pub(super) file: &'a str,
    pub(super) diags: Vec<Diagnostic>,
}

/// A YAML position as 1-based (line, column), or None where it is unknown.
pub(super) fn known(loc: &Location) -> Option<(u64, u64)> {
    (loc.line() > 0).then(|| (loc.line(), loc.column().max(1)))
}

impl Cx<'_> {
    /// Records a problem at `loc`, or at `path` when YAML has no position for it.
    pub(super) fn error(&mut self, loc: Option<&Location>, path: &str, message: impl Into<String>) {
        let position = loc.and_then(known);
        let key_path = (position.is_none() && !path.is_empty()).then(|| path.to_string());
        self.diags.push(Diagnostic {
            file: self.file.to_string(),
            position,
            key_path,
            message: message.into(),
        });
    }

    pub(super) fn finish(mut self) -> ConfigErrors {
        // In file order; problems without a position after those with one.
        self.diags
            .sort_by_key(|d| (d.position.is_none(), d.position, d.key_path.clone()));
        self.diags.dedup();
        ConfigErrors(self.diags)
    }
}
