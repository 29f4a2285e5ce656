//! The kit agrees with the code: every metric name that deploy/, docs/ and the README
//! mention is one weir exports (`src/metrics/names.rs`), the README's metrics table lists
//! every one of them, and every metrics port in deploy/ and the shipped configs is the same.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn files_under(dir: &str, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(Path::new(ROOT).join(dir)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(path.strip_prefix(ROOT).unwrap().to_str().unwrap(), out);
        } else if path.extension().is_some_and(|e| {
            ["md", "yml", "yaml", "json", "service"].contains(&e.to_str().unwrap())
        }) {
            out.push(path);
        }
    }
}

fn kit() -> Vec<PathBuf> {
    let mut files = vec![Path::new(ROOT).join("README.md")];
    for dir in ["deploy", "docs", "config"] {
        files_under(dir, &mut files);
    }
    files
}

/// `weir_…` words in `text` (a metric name ends where a word does).
fn metric_words(text: &str) -> BTreeSet<String> {
    let mut words = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("weir_") {
        let start = i + at;
        let word_start =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = (start..text.len())
            .find(|&k| !(bytes[k].is_ascii_lowercase() || bytes[k] == b'_'))
            .unwrap_or(text.len());
        if word_start {
            words.insert(text[start..end].trim_end_matches('_').to_string());
        }
        i = end.max(start + 5);
    }
    words
}

fn defined() -> BTreeSet<String> {
    let names = std::fs::read_to_string(Path::new(ROOT).join("src/metrics/names.rs")).unwrap();
    (names.lines())
        .filter(|l| l.starts_with("pub const"))
        .filter_map(|l| Some(l.split('"').nth(1)?.to_string()))
        .filter(|n| n.starts_with("weir_"))
        .collect()
}

#[test]
fn every_metric_name_in_the_kit_is_one_weir_exports_and_the_readme_lists_them_all() {
    let defined = defined();
    assert!(defined.len() >= 20, "{defined:?}");
    let mut unknown = Vec::new();
    for file in kit() {
        let text = std::fs::read_to_string(&file).unwrap();
        for word in metric_words(&text) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(&word);
            if !defined.contains(&word) && !defined.contains(base) {
                unknown.push(format!(
                    "{}: {word}",
                    file.strip_prefix(ROOT).unwrap().display()
                ));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metric names weir doesn't export:\n{}",
        unknown.join("\n")
    );
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let missing: Vec<&String> = (defined.iter())
        .filter(|n| !readme.contains(&format!("| `{n}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "the README's metrics table misses {missing:?}"
    );
}

#[test]
fn every_metrics_port_in_the_kit_is_the_shipped_one() {
    // The port of the `bind:` line right under a `metrics:` key (comments skipped).
    let port_of = |text: &str| -> Option<String> {
        let mut lines = text.lines().map(|l| l.split('#').next().unwrap_or(""));
        lines.find(|l| l.trim() == "metrics:")?;
        let bind = lines
            .find(|l| !l.trim().is_empty())?
            .trim()
            .strip_prefix("bind:")?;
        Some(bind.trim().rsplit(':').next()?.to_string())
    };
    let shipped = std::fs::read_to_string(Path::new(ROOT).join("config/weir.yaml")).unwrap();
    let port = port_of(&shipped).expect("config/weir.yaml sets metrics.bind");
    let mut wrong = Vec::new();
    for file in kit() {
        let name = file.strip_prefix(ROOT).unwrap().display().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        if name.ends_with(".yaml")
            && name != "config/weir.yaml"
            && let Some(p) = port_of(&text)
            && p != port
        {
            wrong.push(format!("{name}: metrics.bind port {p}"));
        }
    }
    // What Prometheus scrapes, what the pods expose and announce, what the image exposes.
    let prometheus =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/prometheus.yml")).unwrap();
    if !prometheus.contains(&format!(":{port}")) {
        wrong.push(format!(
            "deploy/prometheus/prometheus.yml does not scrape :{port}"
        ));
    }
    let deployment =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/kubernetes/deployment.yaml")).unwrap();
    for needle in [
        format!("containerPort: {port}"),
        format!("prometheus.io/port: \"{port}\""),
    ] {
        if !deployment.contains(&needle) {
            wrong.push(format!("deploy/kubernetes/deployment.yaml lacks {needle}"));
        }
    }
    let containerfile =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/container/Containerfile")).unwrap();
    if !containerfile
        .lines()
        .any(|l| l.starts_with("EXPOSE") && l.contains(&port))
    {
        wrong.push(format!(
            "deploy/container/Containerfile does not EXPOSE {port}"
        ));
    }
    assert!(
        wrong.is_empty(),
        "metrics port {port} of config/weir.yaml, but:\n{}",
        wrong.join("\n")
    );
}
