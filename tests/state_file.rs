//! The admin state file, tried the way it fails: weir killed with SIGKILL the moment it
//! acknowledges a change, a state file that is a symlink, an empty one.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// weir, killed when the test ends however it ends.
struct Weir(Child);

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weir-state-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A config with an admin socket and a state file in `dir`, one pool `p` with backend `a`.
fn config(dir: &Path) -> PathBuf {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = backend.local_addr().unwrap();
    // Kept open for the test's life: nothing connects, the address just stays taken.
    std::mem::forget(backend);
    let text = format!(
        "admin:\n  socket: {}\n  state_file: {}\nlisteners:\n  front:\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  p:\n    backends:\n      - {{ name: a, address: {addr} }}\n",
        dir.join("admin.sock").display(),
        dir.join("state.json").display()
    );
    let path = dir.join("weir.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts weir and waits until its admin socket answers; returns it and its log so far.
fn start(config: &Path, socket: &Path) -> (Weir, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", "-c"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let weir = Weir(child);
    let deadline = Instant::now() + common::DEADLINE;
    while admin(socket, "help").is_none() {
        assert!(Instant::now() < deadline, "the admin socket never answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    (weir, rx)
}

/// One admin command; None when the socket can't be reached.
fn admin(socket: &Path, line: &str) -> Option<String> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    Some(reply)
}

/// The lines weir logged so far, waiting (with a deadline) until one matches `wanted`.
fn logged(log: &std::sync::mpsc::Receiver<String>, wanted: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + common::DEADLINE;
    let mut said = Vec::new();
    while !said.iter().any(|l: &String| wanted(l)) {
        match log.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => said.push(line),
            Err(_) => panic!(
                "weir never logged the line wanted; it said:\n{}",
                said.join("\n")
            ),
        }
    }
    said
}

fn file_says_disabled(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains("\"disabled\""))
}

/// Every change the socket acknowledged is on disk: SIGKILL sent the moment the reply
/// arrives never loses it (before, weir answered first and wrote after: about half
/// were lost).
#[test]
fn an_acknowledged_change_survives_sigkill_sent_as_the_reply_arrives() {
    let dir = dir("kill9");
    let config = config(&dir);
    let socket = dir.join("admin.sock");
    let state = dir.join("state.json");
    for round in 0..20 {
        let (mut weir, _log) = start(&config, &socket);
        // Toggle what the file says now.
        let (command, want_disabled) = if file_says_disabled(&state) {
            ("enable p/a", false)
        } else {
            ("disable p/a", true)
        };
        let reply = admin(&socket, command).expect("a reply");
        assert!(!reply.starts_with("error:"), "{reply}");
        weir.0.kill().unwrap();
        weir.0.wait().unwrap();
        assert_eq!(
            file_says_disabled(&state),
            want_disabled,
            "round {round}: {command:?} was acknowledged ({reply:?}) but is not in the state file"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A state file that is a symbolic link is never read or written through: weir says so at
/// start, serves with the config's state, and the next admin change replaces the link.
#[test]
fn a_state_file_that_is_a_symlink_is_never_written_through() {
    let dir = dir("symlink");
    let config = config(&dir);
    let socket = dir.join("admin.sock");
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("state.json")).unwrap();
    // And the temporary name an older weir used, planted too.
    std::os::unix::fs::symlink(&victim, dir.join("state.json.tmp")).unwrap();
    let (_weir, log) = start(&config, &socket);
    logged(&log, |l| {
        l.contains("ERROR") && l.contains("is a symbolic link")
    });
    let reply = admin(&socket, "drain p/a").unwrap();
    assert!(!reply.starts_with("error:"), "{reply}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    let meta = std::fs::symlink_metadata(dir.join("state.json")).unwrap();
    assert!(meta.is_file(), "the link was replaced by a regular file");
    assert!(
        std::fs::read_to_string(dir.join("state.json"))
            .unwrap()
            .contains("drain")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An empty state file (a crash on a filesystem that lost the write) is reported loudly,
/// naming the file; weir serves, and the next admin change rewrites it.
#[test]
fn an_empty_state_file_is_reported_and_rewritten_at_the_next_change() {
    let dir = dir("empty");
    let config = config(&dir);
    let socket = dir.join("admin.sock");
    let state = dir.join("state.json");
    std::fs::write(&state, "").unwrap();
    let (_weir, log) = start(&config, &socket);
    let said = logged(&log, |l| l.contains("ERROR") && l.contains("state file"));
    let line = said.last().unwrap();
    assert!(line.contains(&state.display().to_string()), "{line}");
    let shown = admin(&socket, "show backends").unwrap();
    assert!(
        shown.contains(" up "),
        "serving with the config's state: {shown}"
    );
    admin(&socket, "disable p/a").unwrap();
    assert!(
        file_says_disabled(&state),
        "rewritten at the next admin change"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
