//! Backends from DNS (`pools.NAME.discover`): the resolver, and the task that follows one
//! pool's name.
//!
//! Lookups go through hickory-resolver (no DNS is written here): to `resolvers` when the
//! config has them (UDP, then TCP), else to the system's nameservers (/etc/resolv.conf,
//! with its search domains, as Kubernetes pods need). Its cache is cleared before each
//! round, so a round always asks the server and a record's TTL is the server's.
//!
//! The task only resolves and reports: each set it finds (different from the last one it
//! sent) goes to the control task, the one writer, which applies it as a diff like a
//! reload (`control::discovery`). A failed lookup sends nothing, so the last good set
//! stays; it is logged once per outage (and once when the name resolves again) and
//! counted in `weir_discovery_errors_total{pool}`. An answer without records counts as a
//! failure too: a DNS hiccup must not empty a pool.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::balance::WEIGHT_RANGE;
use crate::config::{Config, Diagnostic, DiscoverConfig, HostName};
use crate::metrics::names;

/// The shortest wait between two rounds, whatever the TTL says.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// One query's timeout, and attempts per round.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const ATTEMPTS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("cannot read the system's DNS config: {0}")]
    System(String),
    #[error("lookup of {name} failed: {why}")]
    Lookup { name: String, why: String },
    #[error("{0} has no records")]
    Empty(String),
}

/// One backend found in DNS: named `IP:PORT` (SRV: `TARGET:PORT`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    pub name: String,
    pub addr: SocketAddr,
    /// 1 for A/AAAA; the SRV weight scaled to 1..=1000 (`srv_weights`).
    pub weight: u32,
}

/// A round's result: the backends, sorted by name, and the records' shortest TTL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub found: Vec<Found>,
    pub ttl: Duration,
}

/// What the task sends the control task: `task` tells a stale task's message (one
/// stopped by a reload) from the current one's.
#[derive(Debug)]
pub struct Discovered {
    pub pool: String,
    pub task: u64,
    /// The listed backend whose host name was resolved; None for `discover`.
    pub backend: Option<String>,
    pub found: Vec<Found>,
}

#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// A resolver asking `servers`, or the system's nameservers when it is empty.
    pub fn new(servers: &[SocketAddr]) -> Result<Resolver, DiscoverError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if servers.is_empty() {
            TokioResolver::builder(provider).map_err(|e| DiscoverError::System(e.to_string()))?
        } else {
            let name_servers = servers
                .iter()
                .map(|s| {
                    let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                    for c in &mut ns.connections {
                        c.port = s.port();
                    }
                    ns
                })
                .collect();
            let mut b = TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(name_servers),
                provider,
            );
            b.options_mut().use_hosts_file = ResolveHosts::Never;
            b
        };
        let options = builder.options_mut();
        options.timeout = QUERY_TIMEOUT;
        options.attempts = ATTEMPTS;
        let inner = builder
            .build()
            .map_err(|e| DiscoverError::System(e.to_string()))?;
        Ok(Resolver { inner })
    }

    /// One round for `spec`: A/AAAA (each address one backend on `port`) or SRV (each
    /// target:port one backend, the target's first address).
    pub async fn lookup(&self, spec: &DiscoverConfig) -> Result<Answer, DiscoverError> {
        self.inner.clear_cache();
        let mut answer = match spec.port {
            Some(port) if !spec.is_srv() => self.addresses(&spec.dns, port).await?,
            _ => self.srv(&spec.dns).await?,
        };
        if answer.found.is_empty() {
            return Err(DiscoverError::Empty(spec.dns.clone()));
        }
        answer.found.sort();
        answer.found.dedup_by(|a, b| a.name == b.name);
        Ok(answer)
    }

    /// A listed backend's host name: its lowest address on `port` (A and AAAA; the
    /// system's hosts file too when weir asks the system's nameservers).
    pub async fn host(&self, name: &str, port: u16) -> Result<SocketAddr, String> {
        let (mut ips, _) = self.ips(name).await.map_err(|e| match e {
            DiscoverError::Lookup { why, .. } => why,
            e => e.to_string(),
        })?;
        ips.sort();
        let ip = ips
            .first()
            .ok_or_else(|| "it has no addresses".to_string())?;
        Ok(SocketAddr::new(*ip, port))
    }

    async fn ips(&self, name: &str) -> Result<(Vec<IpAddr>, u32), DiscoverError> {
        let lookup = self
            .inner
            .lookup_ip(name)
            .await
            .map_err(|e| DiscoverError::Lookup {
                name: name.to_string(),
                // hickory's own text for these two quotes its whole query.
                why: if e.is_nx_domain() {
                    "NXDOMAIN: no such name".to_string()
                } else if e.is_no_records_found() {
                    "no A or AAAA records".to_string()
                } else {
                    e.to_string()
                },
            })?;
        let ttl = (lookup.as_lookup().answers().iter())
            .map(|r| r.ttl)
            .min()
            .unwrap_or(0);
        Ok((lookup.iter().collect(), ttl))
    }

    async fn addresses(&self, name: &str, port: u16) -> Result<Answer, DiscoverError> {
        let (ips, ttl) = self.ips(name).await?;
        let found = ips
            .into_iter()
            .map(|ip| {
                let addr = SocketAddr::new(ip, port);
                Found {
                    name: addr.to_string(),
                    addr,
                    weight: 1,
                }
            })
            .collect();
        Ok(Answer {
            found,
            ttl: Duration::from_secs(ttl.into()),
        })
    }

    async fn srv(&self, name: &str) -> Result<Answer, DiscoverError> {
        let lookup = self
            .inner
            .srv_lookup(name)
            .await
            .map_err(|e| DiscoverError::Lookup {
                name: name.to_string(),
                why: e.to_string(),
            })?;
        let mut ttl = u32::MAX;
        let mut records = Vec::new();
        for record in lookup.answers() {
            if let RData::SRV(srv) = &record.data {
                ttl = ttl.min(record.ttl);
                let target = srv.target.to_string();
                records.push((
                    target.trim_end_matches('.').to_string(),
                    srv.port,
                    srv.weight,
                ));
            }
        }
        let weights = srv_weights(&records.iter().map(|r| r.2).collect::<Vec<_>>());
        let mut found = Vec::new();
        for ((target, port, _), weight) in records.into_iter().zip(weights) {
            // A target that does not resolve is left out; the others still count.
            let Ok((ips, target_ttl)) = self.ips(&target).await else {
                continue;
            };
            let Some(ip) = ips.first() else { continue };
            ttl = ttl.min(target_ttl);
            found.push(Found {
                name: format!("{target}:{port}"),
                addr: SocketAddr::new(*ip, port),
                weight,
            });
        }
        Ok(Answer {
            found,
            ttl: Duration::from_secs(ttl.into()),
        })
    }
}

/// A listed backend whose host name did not resolve: it starts (or, added by a reload,
/// joins) down, and comes up once the name resolves.
#[derive(Clone, Debug)]
pub struct Unresolved {
    pub pool: String,
    pub backend: String,
    pub host: HostName,
    pub why: String,
}

impl Unresolved {
    /// `weir check`'s warning, at the address in the file.
    pub fn diagnostic(&self, file: &str) -> Diagnostic {
        Diagnostic {
            file: file.to_string(),
            position: self.host.position,
            key_path: self
                .host
                .position
                .is_none()
                .then(|| self.host.key_path.clone()),
            message: format!("warning: {self}"),
        }
    }
}

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backend \"{}\" of pool \"{}\": host \"{}\" does not resolve ({}); it starts down and comes up once it resolves",
            self.backend, self.pool, self.host.name, self.why
        )
    }
}

/// Resolves every listed backend's host name in `config` at once (each bounded by
/// `timeout`), writing each answer's first address (the lowest, so that every instance
/// picks the same one) into its `addr`; returns those that did not resolve.
pub async fn resolve_listed(
    resolver: &Resolver,
    config: &mut Config,
    timeout: Duration,
) -> Vec<Unresolved> {
    let mut lookups = tokio::task::JoinSet::new();
    for (p, pool) in config.pools.iter().enumerate() {
        for (b, backend) in pool.backends.iter().enumerate() {
            let Some(host) = &backend.host else { continue };
            let (resolver, name, port) = (resolver.clone(), host.name.clone(), host.port);
            lookups.spawn(async move {
                let answer = tokio::time::timeout(timeout, resolver.host(&name, port)).await;
                (
                    p,
                    b,
                    answer.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}"))),
                )
            });
        }
    }
    let mut unresolved = Vec::new();
    while let Some(Ok((p, b, answer))) = lookups.join_next().await {
        let pool_name = config.pools[p].name.clone();
        let backend = &mut config.pools[p].backends[b];
        let host = backend.host.as_mut().expect("spawned for a host name");
        match answer {
            Ok(addr) => {
                backend.addr = addr;
                host.resolved = true;
            }
            Err(why) => unresolved.push(Unresolved {
                pool: pool_name,
                backend: backend.name.clone(),
                host: host.clone(),
                why,
            }),
        }
    }
    unresolved.sort_by(|a, b| (&a.pool, &a.backend).cmp(&(&b.pool, &b.backend)));
    unresolved
}

/// SRV weights (0..=65535) as weir weights (1..=1000): as they are when they fit, else
/// scaled so that the largest is 1000, keeping their ratios; 0 (and what scales below 1)
/// becomes 1, as weir has no zero weight.
pub fn srv_weights(weights: &[u16]) -> Vec<u32> {
    let (lo, hi) = (*WEIGHT_RANGE.start(), *WEIGHT_RANGE.end());
    let max = weights.iter().copied().max().map_or(0, u32::from);
    weights
        .iter()
        .map(|&w| {
            let w = u32::from(w);
            let scaled = if max > hi {
                (w * hi + max / 2) / max
            } else {
                w
            };
            scaled.clamp(lo, hi)
        })
        .collect()
}

/// When the next round is due: after `refresh`, or the records' TTL when shorter, but
/// never sooner than `MIN_REFRESH`.
pub fn next_round(refresh: Duration, ttl: Duration) -> Duration {
    refresh.min(ttl).max(MIN_REFRESH)
}

/// What a follower follows: a pool's `discover`, or the host name of one of its listed
/// backends (`backend`), as A/AAAA records on that backend's port.
#[derive(Clone, Debug)]
pub struct Following {
    pub pool: String,
    /// Tells a stale follower's messages (one stopped by a reload) from the current one's.
    pub task: u64,
    pub spec: DiscoverConfig,
    /// The listed backend whose host name this is; None for `discover`.
    pub backend: Option<String>,
}

/// Follows `what` until `stop`: a round at once, then each when due; every set that
/// differs from the last one sent goes to `sink`.
pub async fn follow(
    resolver: Arc<Resolver>,
    what: Following,
    sink: mpsc::Sender<Discovered>,
    stop: CancellationToken,
) {
    let Following {
        pool,
        task,
        spec,
        backend,
    } = what;
    let errors = metrics::counter!(names::DISCOVERY_ERRORS, "pool" => pool.clone());
    let mut last: Option<Vec<Found>> = None;
    let mut failing = false;
    loop {
        // A lookup to a server that is gone can take a while: shutdown and reload must
        // not wait for it.
        let answer = tokio::select! {
            answer = resolver.lookup(&spec) => answer,
            () = stop.cancelled() => return,
        };
        let wait = match answer {
            Ok(answer) => {
                if failing {
                    match &backend {
                        Some(b) => {
                            tracing::info!(pool = %pool, backend = %b, "{} resolves again", spec.dns)
                        }
                        None => {
                            tracing::info!(pool = %pool, "discover: {} resolves again ({} backends)", spec.dns, answer.found.len())
                        }
                    }
                    failing = false;
                }
                if last.as_ref() != Some(&answer.found) {
                    last = Some(answer.found.clone());
                    let message = Discovered {
                        pool: pool.clone(),
                        task,
                        backend: backend.clone(),
                        found: answer.found,
                    };
                    if sink.send(message).await.is_err() {
                        return;
                    }
                }
                next_round(spec.refresh, answer.ttl)
            }
            Err(e) => {
                errors.increment(1);
                if !failing {
                    let kept = last.as_ref().map_or(0, Vec::len);
                    match &backend {
                        Some(b) => {
                            tracing::warn!(pool = %pool, backend = %b, "{e}; the backend stays at the address it has (down if it never resolved) until the name resolves again")
                        }
                        None => {
                            tracing::warn!(pool = %pool, "discover: {e}; keeping the last {kept} backends found until it resolves again")
                        }
                    }
                    failing = true;
                }
                // Retried on the refresh schedule, but soon enough to notice the recovery.
                spec.refresh.min(Duration::from_secs(5)).max(MIN_REFRESH)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srv_weights_fit_or_scale_to_1_1000() {
        assert_eq!(srv_weights(&[0, 5, 1000]), vec![1, 5, 1000]);
        assert_eq!(srv_weights(&[65535, 32768, 10]), vec![1000, 500, 1]);
        assert_eq!(srv_weights(&[2000, 1000]), vec![1000, 500]);
        assert_eq!(srv_weights(&[]), Vec::<u32>::new());
    }

    #[test]
    fn the_ttl_wins_when_shorter_but_never_below_a_second() {
        let s = Duration::from_secs;
        assert_eq!(next_round(s(30), s(5)), s(5));
        assert_eq!(next_round(s(30), s(300)), s(30));
        assert_eq!(next_round(s(30), s(0)), s(1));
    }
}
