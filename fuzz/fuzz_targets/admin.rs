//! The admin protocol's line parser (`weir::admin::parse`), and what it accepts executed
//! (`weir::admin::execute`) against a running server with pool `p` of backends `a` and
//! `b`, as the admin socket does with a client's line. Bytes that are not UTF-8 are
//! skipped: the socket answers `error: not UTF-8` before parsing. Besides never
//! panicking, every answer says something, and a change made by a line is undone before
//! the next (`enable`, weight 1), so that each input starts from the same state.

use std::sync::OnceLock;

use weir::admin::{Request, Target, execute, parse};
use weir::server::Server;

const CONFIG: &str = "\
listeners:
  front:
    bind: 127.0.0.1:0
    pool: p
pools:
  p:
    backends:
      - address: 127.0.0.1:9
        name: a
      - address: 127.0.0.1:10
        name: b
";

struct Running {
    runtime: tokio::runtime::Runtime,
    server: Server,
}

/// Started at the first input, after AFL's fork server has forked (its threads and
/// sockets belong to this process).
fn running() -> &'static Running {
    static RUNNING: OnceLock<Running> = OnceLock::new();
    RUNNING.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config = weir::config::parse(CONFIG, "admin.yaml").expect("the config is valid");
        let server = runtime
            .block_on(Server::start(config, None))
            .expect("weir starts");
        Running { runtime, server }
    })
}

fn changes_state(request: &Request) -> bool {
    matches!(
        request,
        Request::Drain(_) | Request::Disable(_) | Request::Enable(_) | Request::SetWeight(..)
    )
}

fn restore(running: &Running) {
    for backend in ["a", "b"] {
        let target = Target {
            pool: "p".into(),
            backend: backend.into(),
        };
        for request in [
            Request::Enable(target.clone()),
            Request::SetWeight(target, 1),
        ] {
            let reply = running
                .runtime
                .block_on(execute(request, &running.server.handle));
            reply.expect("restoring p/a and p/b");
        }
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(line) = std::str::from_utf8(data) else {
            return;
        };
        let request = match parse(line) {
            Ok(request) => request,
            Err(e) => {
                assert!(!e.to_string().is_empty(), "an empty reason for {line:?}");
                return;
            }
        };
        let running = running();
        let undo = changes_state(&request);
        let reply = running
            .runtime
            .block_on(execute(request.clone(), &running.server.handle));
        match reply {
            Ok(text) => assert!(!text.is_empty(), "an empty answer to {request:?}"),
            Err(e) => assert!(!e.to_string().is_empty(), "an empty reason for {request:?}"),
        }
        if undo {
            restore(running);
        }
    });
}
