//! The YAML config, from bytes: `weir::config::parse_with_warnings`, what `weir check` and
//! `weir run` call on a file's text. Bytes that are not UTF-8 are skipped (`load` refuses
//! them before parsing: `std::fs::read_to_string`). Besides never panicking, every
//! problem it reports names the file, as `weir check` prints it.
//!
//! A backend's host name is resolved at load time, so a mutated address may become a DNS
//! query: this target runs only in a network namespace of its own, with no interface but
//! loopback (`unshare -n`, see README.md), where such a lookup fails at once and no packet
//! leaves the machine.

const FILE: &str = "fuzz.yaml";

/// The interfaces of this process's network namespace (`/proc/self/net/dev`, which,
/// unlike /sys/class/net, follows the namespace of the reading process).
fn interfaces() -> Vec<String> {
    let dev = std::fs::read_to_string("/proc/self/net/dev").unwrap_or_default();
    (dev.lines().skip(2))
        .filter_map(|l| Some(l.split(':').next()?.trim().to_string()))
        .collect()
}

fn main() {
    let other: Vec<String> = interfaces().into_iter().filter(|i| i != "lo").collect();
    if !other.is_empty() {
        eprintln!(
            "config target: network interfaces {other:?} are present; run it under `unshare -n` \
             (fuzz/README.md) so that a mutated backend host name never becomes a DNS query off \
             this machine"
        );
        std::process::exit(2);
    }
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Err(problems) = weir::config::parse_with_warnings(text, FILE) {
            let shown = problems.to_string();
            assert!(shown.contains(FILE), "a problem without the file: {shown}");
        }
    });
}
