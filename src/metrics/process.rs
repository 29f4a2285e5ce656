//! Process figures read from /proc (Linux): open and maximum file descriptors, memory, start
//! time. Elsewhere these series are simply absent.

#[cfg(target_os = "linux")]
use metrics::{Gauge, gauge};

#[cfg(target_os = "linux")]
use super::names::*;

/// Process figures read from /proc (Linux); elsewhere these series are simply absent.
pub struct ProcessMetrics {
    #[cfg(target_os = "linux")]
    open_fds: Gauge,
    #[cfg(target_os = "linux")]
    max_fds: Gauge,
    #[cfg(target_os = "linux")]
    resident: Gauge,
    #[cfg(target_os = "linux")]
    virtual_memory: Gauge,
}

#[cfg(target_os = "linux")]
impl ProcessMetrics {
    pub fn new() -> Self {
        let p = ProcessMetrics {
            open_fds: gauge!(PROCESS_OPEN_FDS),
            max_fds: gauge!(PROCESS_MAX_FDS),
            resident: gauge!(PROCESS_RESIDENT_MEMORY),
            virtual_memory: gauge!(PROCESS_VIRTUAL_MEMORY),
        };
        if let Some(start) = proc_stat().and_then(|s| s.start_time_seconds()) {
            gauge!(PROCESS_START_TIME).set(start);
        }
        p.refresh();
        p
    }

    pub fn refresh(&self) {
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // Minus one: the descriptor read_dir itself holds open.
            self.open_fds.set(dir.count().saturating_sub(1) as f64);
        }
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        if let Some(max) = limit.current {
            self.max_fds.set(max as f64);
        }
        if let Some(stat) = proc_stat() {
            self.resident
                .set((stat.rss_pages * rustix::param::page_size() as u64) as f64);
            self.virtual_memory.set(stat.vsize_bytes as f64);
        }
    }
}

#[cfg(not(target_os = "linux"))]
impl ProcessMetrics {
    pub fn new() -> Self {
        ProcessMetrics {}
    }

    pub fn refresh(&self) {}
}

/// The few fields of /proc/self/stat weir exports.
#[cfg(target_os = "linux")]
struct ProcStat {
    /// Clock ticks after boot.
    start_ticks: u64,
    vsize_bytes: u64,
    rss_pages: u64,
}

#[cfg(target_os = "linux")]
fn proc_stat() -> Option<ProcStat> {
    parse_proc_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

#[cfg(target_os = "linux")]
fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    // The command name (field 2) is in parentheses and may hold spaces or ')': fields
    // are counted from after its last ')'. The first one after it is field 3 (state).
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        start_ticks: field(22)?,
        vsize_bytes: field(23)?,
        rss_pages: field(24)?,
    })
}

#[cfg(target_os = "linux")]
impl ProcStat {
    fn start_time_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let boot: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let ticks = rustix::param::clock_ticks_per_second();
        Some(boot as f64 + self.start_ticks as f64 / ticks as f64)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        let text = "4242 (we ir) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 4 0 \
                    123456 987654321 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let stat = parse_proc_stat(text).unwrap();
        assert_eq!(stat.start_ticks, 123456);
        assert_eq!(stat.vsize_bytes, 987654321);
        assert_eq!(stat.rss_pages, 2048);
    }

    #[test]
    fn this_process_has_sane_figures() {
        let stat = proc_stat().unwrap();
        assert!(stat.rss_pages > 0);
        let start = stat.start_time_seconds().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(start <= now + 1.0 && start > now - 86400.0 * 365.0);
    }
}
