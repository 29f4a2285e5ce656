//! `weir check`: the file validated (every problem, or the warnings of a valid one), then
//! each listed backend's host name asked of DNS as `weir run` would ask it. A name that
//! does not resolve is a warning, never a failure: `weir run` starts that backend down
//! and brings it in once the name resolves, so a DNS blip at boot (the shipped unit runs
//! `weir check` before `weir run`) never keeps weir from serving the rest.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::discover::{self, Resolver};

/// How long `weir check` waits for every name's answer (they are asked at once).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Exit 0 for a valid config (whatever DNS says), 2 with every problem otherwise.
pub async fn run(path: &Path) -> ExitCode {
    let (mut config, mut warnings) = match crate::config::load_with_warnings(path) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let file = path.display().to_string();
    if config.has_host_names() {
        match Resolver::new(&config.resolvers) {
            Ok(resolver) => {
                let unresolved =
                    discover::resolve_listed(&resolver, &mut config, LOOKUP_TIMEOUT).await;
                warnings.extend(unresolved.iter().map(|u| u.diagnostic(&file)));
            }
            Err(e) => eprintln!(
                "{file}: warning: {e}: backend host names cannot be resolved (weir run starts those backends down)"
            ),
        }
    }
    warnings.sort_by_key(|d| (d.position.is_none(), d.position));
    for warning in &warnings {
        eprintln!("{warning}");
    }
    println!("{file}: ok");
    ExitCode::SUCCESS
}
