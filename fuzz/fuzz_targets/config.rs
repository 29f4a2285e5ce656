//! The YAML config, from bytes: `weir::config::parse_with_warnings`, what `weir check` and
//! `weir run` call on a file's text. Bytes that are not UTF-8 are skipped (`load` refuses
//! them before parsing: `std::fs::read_to_string`). Besides never panicking, every
//! problem it reports names the file, as `weir check` prints it.
//!
//! Parsing never asks DNS (a backend's host name is resolved by `weir run` and `weir
//! check` after it), so a mutated address is only text here.

const FILE: &str = "fuzz.yaml";

fn main() {
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
