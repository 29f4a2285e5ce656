//! Problems found in a config file, each with its position, and the collector that
//! validation writes them to.

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

/// A position in the file: 1-based line and column; line 0 where it is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Mark {
    pub(super) line: u64,
    pub(super) col: u64,
}

/// A YAML position as 1-based (line, column), or None where it is unknown.
pub(super) fn known(at: &Mark) -> Option<(u64, u64)> {
    (at.line > 0).then(|| (at.line, at.col.max(1)))
}

/// Collects the problems (and the warnings) of one file.
pub(super) struct Cx<'a> {
    file: &'a str,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl<'a> Cx<'a> {
    pub(super) fn new(file: &'a str) -> Cx<'a> {
        Cx {
            file,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn diagnostic(&self, at: Option<&Mark>, path: &str, message: String) -> Diagnostic {
        let position = at.and_then(known);
        let key_path = (position.is_none() && !path.is_empty()).then(|| path.to_string());
        Diagnostic {
            file: self.file.to_string(),
            position,
            key_path,
            message,
        }
    }

    /// Records a problem at `at`, or at `path` when YAML has no position for it.
    pub(super) fn error(&mut self, at: Option<&Mark>, path: &str, message: impl Into<String>) {
        let d = self.diagnostic(at, path, message.into());
        self.errors.push(d);
    }

    /// Records a likely mistake that doesn't stop the config from running; its message
    /// starts with `warning: `.
    pub(super) fn warn(&mut self, at: Option<&Mark>, path: &str, message: impl AsRef<str>) {
        let d = self.diagnostic(at, path, format!("warning: {}", message.as_ref()));
        self.warnings.push(d);
    }

    pub(super) fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// The problems, in file order; those without a position after those with one.
    pub(super) fn finish(self) -> ConfigErrors {
        ConfigErrors(sorted(self.errors))
    }

    /// The warnings, in file order.
    pub(super) fn warnings(&mut self) -> Vec<Diagnostic> {
        sorted(std::mem::take(&mut self.warnings))
    }
}

fn sorted(mut diags: Vec<Diagnostic>) -> Vec<Diagnostic> {
    diags.sort_by_key(|d| (d.position.is_none(), d.position, d.key_path.clone()));
    diags.dedup();
    diags
}

/// The candidate closest to `word`, when it is close enough to be what was meant: at most
/// a third of its characters different (a swap of two counts as one), like the "did you
/// mean" of HAProxy's `-c`.
pub(super) fn suggest<'c>(
    word: &str,
    candidates: impl Iterator<Item = &'c str>,
) -> Option<&'c str> {
    let lower = word.to_lowercase();
    candidates
        .filter(|&c| c != word)
        .map(|c| (distance(&lower, c), c))
        .filter(|&(d, c)| d * 3 <= lower.chars().count().max(c.chars().count()))
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// Edits (insert, delete, replace, swap two neighbours) from `a` to `b`: the optimal
/// string alignment distance.
fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // Three rows of the table: two back, one back, this one.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut last: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut row = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            row[j] = (last[j] + 1).min(row[j - 1] + 1).min(last[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                row[j] = row[j].min(before[j - 2] + 1);
            }
        }
        before = std::mem::replace(&mut last, row);
    }
    last[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(distance("stratgy", "strategy"), 1);
        assert_eq!(distance("wieght", "weight"), 1);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("same", "same"), 0);
    }

    #[test]
    fn suggestions_only_when_close() {
        let keys = [
            "strategy",
            "connect_timeout",
            "retries",
            "health_check",
            "backends",
        ];
        assert_eq!(suggest("stratgy", keys.into_iter()), Some("strategy"));
        assert_eq!(suggest("Strategy", keys.into_iter()), Some("strategy"));
        assert_eq!(suggest("backend", keys.into_iter()), Some("backends"));
        assert_eq!(
            suggest("conect_timout", keys.into_iter()),
            Some("connect_timeout")
        );
        assert_eq!(suggest("foo", keys.into_iter()), None);
        assert_eq!(suggest("weight", keys.into_iter()), None);
    }
}
